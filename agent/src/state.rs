//! The agent's state dir: `agent.toml` (gateway URL, pinned fingerprint, host
//! root, agent id) and `credential` (mode 0600), written at enrolment.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// `agent.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Gateway base URL, https://HOST:PORT.
    pub gateway: String,
    /// Pinned SHA-256 fingerprint of the gateway's certificate.
    pub fingerprint: String,
    /// Folder host root (one folder per VM).
    pub host_root: PathBuf,
    /// The agent's id at the gateway.
    pub agent_id: String,
    /// Chunks hashed per "which do you lack?" request (at most 16 MiB of
    /// chunk data: the read-ahead of the backup pipeline).
    #[serde(default = "default_lack_batch")]
    pub lack_batch: usize,
    /// Bytes of chunk data per upload request (at most 4 MiB; 4 requests are
    /// in flight at once).
    #[serde(default = "default_upload_batch")]
    pub upload_batch_bytes: usize,
    /// Least chunks re-read by the sample check of an RCT/checkpoint
    /// incremental (0.1 % of the disk's chunks if more, at most 256).
    #[serde(default = "default_sample_min")]
    pub sample_min: usize,
}

fn default_sample_min() -> usize {
    8
}

/// Default of [`AgentConfig::lack_batch`].
pub fn default_lack_batch() -> usize {
    16
}
/// Default of [`AgentConfig::upload_batch_bytes`].
pub fn default_upload_batch() -> usize {
    4 << 20
}

/// A loaded state dir.
pub struct AgentState {
    pub dir: PathBuf,
    pub cfg: AgentConfig,
    pub credential: String,
}

impl AgentState {
    pub fn config_path(dir: &Path) -> PathBuf {
        dir.join("agent.toml")
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let p = Self::config_path(dir);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "{} is not an enrolled agent state dir: run `tierback-agent enroll --state-dir {} …` first",
                    dir.display(),
                    dir.display()
                )
            } else {
                anyhow::anyhow!("reading {}: {e}", p.display())
            }
        })?;
        let cfg: AgentConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", p.display(), e.message()))?;
        let cp = dir.join("credential");
        let credential = std::fs::read_to_string(&cp)
            .with_context(|| format!("reading {}", cp.display()))?
            .trim()
            .to_string();
        Ok(Self {
            dir: dir.to_path_buf(),
            cfg,
            credential,
        })
    }

    /// Writes a new state dir (credential first, config last: the config
    /// marks the dir enrolled).
    pub fn save_new(dir: &Path, cfg: &AgentConfig, credential: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_durably(&dir.join("credential"), credential.as_bytes(), true)?;
        let text = toml::to_string_pretty(cfg)?;
        write_durably(&Self::config_path(dir), text.as_bytes(), false)?;
        Ok(())
    }
}

pub(crate) fn write_durably(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    if let Some(d) = path.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}
