//! `init`: creates a gateway data dir — config, catalog, TLS identity, keys,
//! admin credential — and prints the certificate fingerprint and the recovery
//! material once.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use crate::api::{random_secret, secret_hash, ADMIN_TOKEN_PREFIX};
use crate::catalog::Catalog;
use crate::config::{write_file_durably, DataDir, GatewayConfig};

/// What `init` reports.
#[derive(Debug, Serialize)]
pub struct InitReport {
    pub data_dir: String,
    pub fingerprint: String,
    pub listen: String,
    pub recovery_key: String,
    pub passphrase_file: String,
    pub generated_passphrase: bool,
    pub admin_token_file: String,
}

pub async fn init(
    data_dir: &Path,
    passphrase_file: Option<&Path>,
    listen: &str,
) -> anyhow::Result<InitReport> {
    let dd = DataDir::new(data_dir);
    if dd.is_initialised() {
        anyhow::bail!(
            "{} is already an initialised gateway data dir; refusing to overwrite it (use another --data-dir)",
            data_dir.display()
        );
    }
    if data_dir.exists()
        && std::fs::read_dir(data_dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        anyhow::bail!(
            "{} exists and is not empty; init needs a new or empty directory",
            data_dir.display()
        );
    }
    let cfg = GatewayConfig {
        listen: listen.to_string(),
        passphrase_file: passphrase_file.map(absolute).transpose()?,
        ..Default::default()
    };
    cfg.validate()?;
    let pass = match passphrase_file {
        Some(p) => crate::server::read_passphrase(p)?,
        None => Vec::new(),
    };
    std::fs::create_dir_all(dd.tls_dir())
        .with_context(|| format!("creating {}", data_dir.display()))?;
    set_mode(data_dir, 0o700)?;

    let generated = pass.is_empty();
    let pass = if generated {
        let p = random_secret();
        write_file_durably(&dd.passphrase(), p.as_bytes(), true)
            .context("writing the generated passphrase")?;
        p.into_bytes()
    } else {
        pass
    };
    let (keyfile, _master, recovery) = tierback_format::keyfile::KeyFile::create(&pass);
    let kf = serde_json::to_vec_pretty(&keyfile).context("encoding the key file")?;
    write_file_durably(&dd.keys(), &kf, true).context("writing keys.json")?;

    let host = listen.rsplit_once(':').map(|(h, _)| h).unwrap_or(listen);
    let id = crate::tls::generate(host)?;
    write_file_durably(&dd.tls_key(), id.key_pem.as_bytes(), true)
        .context("writing the TLS key")?;
    write_file_durably(&dd.tls_cert(), id.cert_pem.as_bytes(), false)
        .context("writing the TLS certificate")?;

    let token = format!("{ADMIN_TOKEN_PREFIX}{}", random_secret());
    let catalog = Catalog::open(&dd.catalog())
        .await
        .context("creating the catalog")?;
    catalog
        .add_admin_token(&secret_hash(&token), "local")
        .await?;
    catalog.close().await;
    write_file_durably(&dd.admin_token(), token.as_bytes(), true).context("writing admin.token")?;

    // Last: the config marks the dir as initialised.
    let text = toml::to_string_pretty(&cfg).context("encoding gateway.toml")?;
    write_file_durably(&dd.config(), text.as_bytes(), false).context("writing gateway.toml")?;
    Ok(InitReport {
        data_dir: data_dir.display().to_string(),
        fingerprint: id.fingerprint,
        listen: cfg.listen.clone(),
        recovery_key: recovery.to_string(),
        passphrase_file: dd.passphrase_file(&cfg).display().to_string(),
        generated_passphrase: generated,
        admin_token_file: dd.admin_token().display().to_string(),
    })
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

fn set_mode(p: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}
