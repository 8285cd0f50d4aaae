//! The gateway's configuration (`<data-dir>/gateway.toml`) and the layout of
//! its data directory. Every setting has a default; secrets live in files
//! beside it (mode 0600) or come from the environment, never in the TOML.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the config file inside the data dir; its presence marks an
/// initialised data dir.
pub const CONFIG_FILE: &str = "gateway.toml";

/// `gateway.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address the HTTPS API listens on.
    pub listen: String,
    /// File holding the passphrase that unwraps the master key, relative to
    /// the data dir unless absolute. `TIERBACK_PASSPHRASE_FILE` overrides it.
    pub passphrase_file: Option<PathBuf>,
    /// Chunk size for VMs not in a protection group (power of two, 256 KiB–8 MiB).
    pub chunk_size: u32,
    /// Target size of a pack before it is sealed.
    pub pack_target_size: u64,
    /// zstd level for chunk compression.
    pub zstd_level: i32,
    /// A backup session with no request for this long is abandoned.
    pub session_idle_timeout_secs: u64,
    /// Lifetime of an agent enrolment token.
    pub enroll_token_ttl_secs: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8443".into(),
            passphrase_file: None,
            chunk_size: tierback_format::wire::DEFAULT_CHUNK_SIZE,
            pack_target_size: 64 << 20,
            zstd_level: 1,
            session_idle_timeout_secs: 1800,
            enroll_token_ttl_secs: 24 * 3600,
        }
    }
}

impl GatewayConfig {
    /// Checks values a typo could make dangerous.
    pub fn validate(&self) -> anyhow::Result<()> {
        let cs = self.chunk_size;
        if !cs.is_power_of_two()
            || !(tierback_format::wire::MIN_CHUNK_SIZE..=tierback_format::wire::MAX_CHUNK_SIZE)
                .contains(&cs)
        {
            anyhow::bail!("chunk_size {cs} must be a power of two between 256 KiB and 8 MiB");
        }
        if !(1 << 20..=1 << 30).contains(&self.pack_target_size) {
            anyhow::bail!("pack_target_size must be between 1 MiB and 1 GiB");
        }
        if !(-7..=22).contains(&self.zstd_level) {
            anyhow::bail!("zstd_level must be between -7 and 22");
        }
        self.listen.parse::<std::net::SocketAddr>().map_err(|_| {
            anyhow::anyhow!(
                "listen {:?} is not an address like 127.0.0.1:8443",
                self.listen
            )
        })?;
        Ok(())
    }
}

/// Paths inside a data dir.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }
    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog.db")
    }
    pub fn keys(&self) -> PathBuf {
        self.root.join("keys.json")
    }
    pub fn passphrase(&self) -> PathBuf {
        self.root.join("passphrase")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn tls_cert(&self) -> PathBuf {
        self.tls_dir().join("cert.pem")
    }
    pub fn tls_key(&self) -> PathBuf {
        self.tls_dir().join("key.pem")
    }
    pub fn is_initialised(&self) -> bool {
        self.config().exists()
    }

    /// Loads gateway.toml, or explains that the dir is not a gateway.
    pub fn load_config(&self) -> anyhow::Result<GatewayConfig> {
        let path = self.config();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "{} is not an initialised gateway data dir (no {CONFIG_FILE}): run `tierback-gateway init --data-dir {}` first",
                    self.root.display(),
                    self.root.display()
                )
            } else {
                anyhow::anyhow!("reading {}: {e}", path.display())
            }
        })?;
        let cfg: GatewayConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// The passphrase file in effect (environment, then config, then default).
    pub fn passphrase_file(&self, cfg: &GatewayConfig) -> PathBuf {
        if let Some(p) = std::env::var_os("TIERBACK_PASSPHRASE_FILE") {
            return PathBuf::from(p);
        }
        match &cfg.passphrase_file {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => self.root.join(p),
            None => self.passphrase(),
        }
    }
}

/// Writes a file durably: tmp, fsync, rename, fsync dir (DESIGN §6 rule 6).
/// `private` makes it mode 0600.
pub fn write_file_durably(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_are_named() {
        GatewayConfig::default()
            .validate()
            .expect("defaults are valid");
        let bad = GatewayConfig {
            chunk_size: 3 << 20,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("chunk_size"));
        let bad = GatewayConfig {
            listen: "nowhere".into(),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("listen"));
    }

    #[test]
    fn unknown_keys_are_rejected_and_missing_dir_explained() {
        let d = tempfile::tempdir().expect("tmp");
        let dd = DataDir::new(d.path());
        let err = dd.load_config().unwrap_err().to_string();
        assert!(err.contains("init"), "{err}");
        std::fs::write(dd.config(), "lisen = \"x\"\n").expect("write");
        assert!(dd.load_config().is_err());
        std::fs::write(dd.config(), "zstd_level = 5\n").expect("write");
        assert_eq!(dd.load_config().expect("load").zstd_level, 5);
    }
}
