//! The gateway's TLS identity: a self-signed certificate made at `init`, whose
//! SHA-256 fingerprint agents pin instead of trusting any CA.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A freshly made identity: PEM certificate and key.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: String,
}

/// Makes a self-signed certificate valid for `localhost`, 127.0.0.1 and the
/// listen host.
pub fn generate(listen_host: &str) -> anyhow::Result<Identity> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !names.iter().any(|n| n == listen_host)
        && !listen_host.is_empty()
        && listen_host != "0.0.0.0"
    {
        names.push(listen_host.to_string());
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating TLS key")?;
    let mut params = rcgen::CertificateParams::new(names).context("certificate names")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Tierback gateway");
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = params.self_signed(&key).context("signing certificate")?;
    Ok(Identity {
        fingerprint: tierback_format::pin::fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn read_cert(path: &Path) -> anyhow::Result<CertificateDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let cert = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .with_context(|| format!("{} holds no certificate", path.display()))?
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(cert)
}

/// SHA-256 fingerprint of the certificate in a PEM file.
pub fn fingerprint_of(cert_path: &Path) -> anyhow::Result<String> {
    Ok(tierback_format::pin::fingerprint(
        read_cert(cert_path)?.as_ref(),
    ))
}

/// Server configuration from the data dir's PEM files.
pub fn server_config(
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    server_config_with(cert_path, key_path, rustls::DEFAULT_VERSIONS)
}

/// [`server_config`] offering only `versions` (tests offer TLS 1.2 alone).
pub(crate) fn server_config_with(
    cert_path: &Path,
    key_path: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let cert = read_cert(cert_path)?;
    let key_pem =
        std::fs::read(key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("parsing {}", key_path.display()))?
        .with_context(|| format!("{} holds no private key", key_path.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(tierback_format::pin::provider())
        .with_protocol_versions(versions)
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .context("TLS certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // An upgraded chunk stream takes its connection's traffic secrets and
    // protects its records itself (api/stream_conn.rs).
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}
