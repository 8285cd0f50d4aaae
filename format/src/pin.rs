//! Certificate pinning for Tierback's HTTPS clients. The gateway serves a
//! self-signed certificate made at `init`; agents and remote admin CLIs trust
//! exactly the certificate whose SHA-256 fingerprint they were given, and no
//! other — no CA, no hostname. The fingerprint is the SHA-256 of the
//! certificate's DER bytes, as lowercase hex (colons and case are ignored).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Errors building a pinned client.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The fingerprint is not 64 hex digits.
    #[error("certificate fingerprint must be 64 hex digits (SHA-256), got {0:?}")]
    BadFingerprint(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// SHA-256 of a DER certificate as lowercase hex.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// Parses a fingerprint given by a user: hex, optional colons, any case.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], PinError> {
    let clean: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(clean.to_ascii_lowercase(), &mut out)
        .map_err(|_| PinError::BadFingerprint(s.to_string()))?;
    Ok(out)
}

/// The crypto provider every Tierback TLS endpoint uses (ring), with
/// AES-128-GCM preferred over AES-256-GCM: backup traffic is bulk data and
/// TLS is a fifth of the agent's CPU in a full backup, where AES-128 needs
/// 10 rounds a block instead of 14 (docs/protocol.md). The
/// chunks themselves are sealed with AES-256-GCM before they are stored;
/// that does not change.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        _ => 1,
    });
    Arc::new(p)
}

/// A rustls client configuration that accepts only the pinned certificate.
pub fn pinned_client_config(fingerprint_text: &str) -> Result<rustls::ClientConfig, PinError> {
    let pin = parse_fingerprint(fingerprint_text)?;
    let provider = provider();
    let verifier = Arc::new(PinnedVerifier {
        pin,
        provider: provider.clone(),
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

#[derive(Debug)]
struct PinnedVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the gateway's certificate fingerprint is {} but {} was pinned",
                hex::encode(got),
                hex::encode(self.pin)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_colons_and_case() {
        let fp = fingerprint(b"abc");
        assert_eq!(fp.len(), 64);
        let with_colons: String = fp
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap_or("").to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(
            parse_fingerprint(&with_colons).expect("parse"),
            parse_fingerprint(&fp).expect("parse")
        );
        assert!(parse_fingerprint("abcd").is_err());
        assert!(pinned_client_config("zz").is_err());
        assert!(pinned_client_config(&fp).is_ok());
    }

    #[test]
    fn aes_128_gcm_is_preferred_and_no_suite_is_dropped() {
        let p = provider();
        let ours = &p.cipher_suites;
        let mut default: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let tls13: Vec<_> = ours
            .iter()
            .filter(|s| s.tls13().is_some())
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            tls13.first(),
            Some(&rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert!(tls13.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
        let mut sorted: Vec<_> = ours.iter().map(|s| s.suite()).collect();
        sorted.sort_by_key(|s| u16::from(*s));
        default.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, default);
    }
}
