//! The key file: the master key, stored only wrapped — by the admin's
//! passphrase (Argon2id) and by a random 256-bit recovery key printed once at
//! `init`.
//!
//! The file is versioned JSON ([`KeyFile::to_json`] / [`KeyFile::from_json`]);
//! reading and writing it to disk is the caller's job. A wrapped key is a
//! sealed object (see [`crate::crypto`]) with associated data
//! `FORMAT_VERSION ‖ ObjectType::KeyWrap ‖ "passphrase"|"recovery"`:
//!
//! * passphrase wrap key = Argon2id(passphrase, salt, m, t, p) → 32 bytes;
//! * recovery wrap key = HKDF-SHA256(recovery key, info `tierback/v1/recovery-wrap`).
//!
//! A wrong passphrase fails the AES-GCM tag and is reported as
//! [`KeyError::WrongPassphrase`], a distinct kind the CLI can act on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::crypto::{associated_data, hkdf_sha256, open, seal, CryptoError, MasterKey};
use crate::magic::{ObjectType, KEYFILE_VERSION};

/// Largest Argon2 memory cost a key file may ask for (4 GiB, in KiB), so a
/// tampered file cannot make unlock allocate without bound.
pub const MAX_M_COST_KIB: u32 = 4 << 20;
/// Largest Argon2 time cost a key file may ask for.
pub const MAX_T_COST: u32 = 64;
/// Largest Argon2 parallelism a key file may ask for.
pub const MAX_P_COST: u32 = 64;

const SALT_LEN: usize = 16;
const PASSPHRASE_LABEL: &[u8] = b"passphrase";
const RECOVERY_LABEL: &[u8] = b"recovery";

/// Errors of creating, parsing and unlocking key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The passphrase does not unwrap the master key.
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// The recovery key does not unwrap the master key.
    #[error("wrong recovery key")]
    WrongRecoveryKey,
    /// The recovery key text is not a recovery key (bad length, characters or
    /// checksum — usually a typo).
    #[error("recovery key is malformed: {0}")]
    BadRecoveryKey(String),
    /// The key file has a version this build cannot read.
    #[error("key file version {0} is not supported (this build reads version {KEYFILE_VERSION})")]
    UnsupportedVersion(u32),
    /// The key file is structurally invalid (bad hex, lengths, parameters).
    #[error("key file is invalid: {0}")]
    Invalid(String),
    /// Argon2id refused the parameters.
    #[error("key derivation (Argon2id) failed: {0}")]
    Kdf(String),
    /// The key file is not valid JSON of the expected shape.
    #[error("key file is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Argon2id cost parameters, stored in the key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Argon2Params {
    /// Memory cost in KiB (default 65536 = 64 MiB).
    pub m_cost_kib: u32,
    /// Number of passes (default 3).
    pub t_cost: u32,
    /// Parallelism (default 1).
    pub p_cost: u32,
}

impl Default for Argon2Params {
    fn default() -> Self {
        Self {
            m_cost_kib: 64 << 10,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl Argon2Params {
    /// Minimal parameters, for tests only: no protection against guessing.
    pub const fn insecure_for_tests() -> Self {
        Self {
            m_cost_kib: 8,
            t_cost: 1,
            p_cost: 1,
        }
    }

    fn derive(&self, passphrase: &[u8], salt: &[u8]) -> Result<[u8; 32], KeyError> {
        if self.m_cost_kib > MAX_M_COST_KIB || self.t_cost > MAX_T_COST || self.p_cost > MAX_P_COST
        {
            return Err(KeyError::Invalid(format!(
                "Argon2 parameters m={} KiB t={} p={} exceed the limits m={MAX_M_COST_KIB} t={MAX_T_COST} p={MAX_P_COST}",
                self.m_cost_kib, self.t_cost, self.p_cost
            )));
        }
        let params = argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| KeyError::Kdf(e.to_string()))?;
        let a2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        a2.hash_password_into(passphrase, salt, &mut out)
            .map_err(|e| KeyError::Kdf(e.to_string()))?;
        Ok(out)
    }
}

/// The passphrase wrapping of the master key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassphraseWrap {
    /// Always `"argon2id"` in version 1.
    pub kdf: String,
    /// Argon2id costs.
    #[serde(flatten)]
    pub params: Argon2Params,
    /// Random salt, 16 bytes, hex.
    pub salt: String,
    /// Sealed master key, hex.
    pub wrapped: String,
}

/// The recovery-key wrapping of the master key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryWrap {
    /// Sealed master key, hex.
    pub wrapped: String,
}

/// A key file (JSON, versioned). Holds no secret in the clear.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFile {
    /// Format version, [`KEYFILE_VERSION`].
    pub version: u32,
    /// [`MasterKey::fingerprint`] of the wrapped key, so an admin can tell
    /// which key a file holds without unlocking it.
    pub fingerprint: String,
    /// Wrapping by the admin's passphrase.
    pub passphrase: PassphraseWrap,
    /// Wrapping by the recovery key.
    pub recovery: RecoveryWrap,
}

impl KeyFile {
    /// Creates a new master key wrapped by `passphrase` (default Argon2id
    /// costs: 64 MiB, 3 passes, 1 lane) and by a new recovery key. The
    /// recovery key must be shown to the admin once and never stored.
    pub fn create(passphrase: &[u8]) -> (KeyFile, MasterKey, RecoveryKey) {
        Self::create_with_params(passphrase, Argon2Params::default())
            .expect("default Argon2 parameters are valid")
    }

    /// [`KeyFile::create`] with explicit Argon2id costs.
    pub fn create_with_params(
        passphrase: &[u8],
        params: Argon2Params,
    ) -> Result<(KeyFile, MasterKey, RecoveryKey), KeyError> {
        let master = MasterKey::generate();
        let recovery = RecoveryKey::generate();
        let file = KeyFile {
            version: KEYFILE_VERSION,
            fingerprint: master.fingerprint(),
            passphrase: wrap_with_passphrase(&master, passphrase, params)?,
            recovery: RecoveryWrap {
                wrapped: hex::encode(seal(
                    &recovery.wrap_key(),
                    &wrap_ad(RECOVERY_LABEL),
                    master.as_bytes(),
                )),
            },
        };
        Ok((file, master, recovery))
    }

    /// Unwraps the master key with the passphrase.
    pub fn unlock(&self, passphrase: &[u8]) -> Result<MasterKey, KeyError> {
        self.check_version()?;
        let salt = decode_hex("passphrase.salt", &self.passphrase.salt)?;
        if self.passphrase.kdf != "argon2id" {
            return Err(KeyError::Invalid(format!(
                "unknown kdf {:?}",
                self.passphrase.kdf
            )));
        }
        if salt.len() != SALT_LEN {
            return Err(KeyError::Invalid(format!(
                "salt must be {SALT_LEN} bytes, is {}",
                salt.len()
            )));
        }
        let kek = self.passphrase.params.derive(passphrase, &salt)?;
        let wrapped = decode_hex("passphrase.wrapped", &self.passphrase.wrapped)?;
        match open(&kek, &wrap_ad(PASSPHRASE_LABEL), &wrapped) {
            Ok(key) => self.finish_unwrap(&key),
            Err(CryptoError::Auth) => Err(KeyError::WrongPassphrase),
            Err(e) => Err(KeyError::Invalid(format!("passphrase.wrapped: {e}"))),
        }
    }

    /// Unwraps the master key with the recovery key.
    pub fn unlock_with_recovery(&self, recovery: &RecoveryKey) -> Result<MasterKey, KeyError> {
        self.check_version()?;
        let wrapped = decode_hex("recovery.wrapped", &self.recovery.wrapped)?;
        match open(&recovery.wrap_key(), &wrap_ad(RECOVERY_LABEL), &wrapped) {
            Ok(key) => self.finish_unwrap(&key),
            Err(CryptoError::Auth) => Err(KeyError::WrongRecoveryKey),
            Err(e) => Err(KeyError::Invalid(format!("recovery.wrapped: {e}"))),
        }
    }

    /// A copy of this key file whose passphrase wrapping uses `new_passphrase`
    /// (fresh salt, same Argon2 costs); the recovery wrapping is kept.
    pub fn rewrap(
        &self,
        old_passphrase: &[u8],
        new_passphrase: &[u8],
    ) -> Result<KeyFile, KeyError> {
        let master = self.unlock(old_passphrase)?;
        self.with_passphrase(&master, new_passphrase, self.passphrase.params)
    }

    /// Sets a new passphrase using the recovery key (forgotten passphrase);
    /// the recovery wrapping is kept.
    pub fn rewrap_with_recovery(
        &self,
        recovery: &RecoveryKey,
        new_passphrase: &[u8],
    ) -> Result<KeyFile, KeyError> {
        let master = self.unlock_with_recovery(recovery)?;
        self.with_passphrase(&master, new_passphrase, self.passphrase.params)
    }

    /// A copy wrapping `master` (which must be this file's key) with
    /// `new_passphrase` and explicit Argon2 costs.
    pub fn with_passphrase(
        &self,
        master: &MasterKey,
        new_passphrase: &[u8],
        params: Argon2Params,
    ) -> Result<KeyFile, KeyError> {
        if master.fingerprint() != self.fingerprint {
            return Err(KeyError::Invalid(
                "master key does not belong to this key file".into(),
            ));
        }
        Ok(KeyFile {
            passphrase: wrap_with_passphrase(master, new_passphrase, params)?,
            ..self.clone()
        })
    }

    /// Pretty JSON text of the file.
    pub fn to_json(&self) -> String {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string_pretty(self).expect("key file serializes")
    }

    /// Parses a key file, refusing unknown versions.
    pub fn from_json(text: &str) -> Result<KeyFile, KeyError> {
        let file: KeyFile = serde_json::from_str(text)?;
        file.check_version()?;
        Ok(file)
    }

    fn check_version(&self) -> Result<(), KeyError> {
        if self.version != KEYFILE_VERSION {
            return Err(KeyError::UnsupportedVersion(self.version));
        }
        Ok(())
    }

    fn finish_unwrap(&self, key: &[u8]) -> Result<MasterKey, KeyError> {
        let bytes: [u8; 32] = key.try_into().map_err(|_| {
            KeyError::Invalid(format!("wrapped key is {} bytes, not 32", key.len()))
        })?;
        let master = MasterKey::from_bytes(bytes);
        if master.fingerprint() != self.fingerprint {
            return Err(KeyError::Invalid(
                "fingerprint does not match the unwrapped key".into(),
            ));
        }
        Ok(master)
    }
}

fn wrap_ad(label: &[u8]) -> Vec<u8> {
    associated_data(ObjectType::KeyWrap, &[label])
}

fn wrap_with_passphrase(
    master: &MasterKey,
    passphrase: &[u8],
    params: Argon2Params,
) -> Result<PassphraseWrap, KeyError> {
    let salt: [u8; SALT_LEN] = rand::random();
    let kek = params.derive(passphrase, &salt)?;
    Ok(PassphraseWrap {
        kdf: "argon2id".into(),
        params,
        salt: hex::encode(salt),
        wrapped: hex::encode(seal(&kek, &wrap_ad(PASSPHRASE_LABEL), master.as_bytes())),
    })
}

fn decode_hex(field: &str, text: &str) -> Result<Vec<u8>, KeyError> {
    hex::decode(text).map_err(|e| KeyError::Invalid(format!("{field}: {e}")))
}

/// RFC 4648 base32 alphabet (no padding).
const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Key bytes + checksum bytes in the text form.
const RECOVERY_TEXT_BYTES: usize = 35;
/// Base32 characters of the text form (35 bytes × 8 / 5).
const RECOVERY_TEXT_CHARS: usize = 56;

/// The random 256-bit recovery key. Its text form is 56 uppercase base32
/// characters in 14 dash-separated groups of 4 (32 key bytes + 3 checksum
/// bytes of BLAKE3, so typos are caught before trying to unlock). Parsing
/// ignores dashes, spaces and case, and reads `0`/`1`/`8` as `O`/`I`/`B`.
/// `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryKey([u8; 32]);

impl fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoveryKey(<redacted>)")
    }
}

impl RecoveryKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
        Self(k)
    }

    /// Wraps raw key bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn wrap_key(&self) -> [u8; 32] {
        hkdf_sha256(&self.0, &[b"tierback/v1/recovery-wrap"])
    }

    fn checksum(key: &[u8; 32]) -> [u8; 3] {
        let h = blake3::hash(key);
        [h.as_bytes()[0], h.as_bytes()[1], h.as_bytes()[2]]
    }
}

impl fmt::Display for RecoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = [0u8; RECOVERY_TEXT_BYTES];
        bytes[..32].copy_from_slice(&self.0);
        bytes[32..].copy_from_slice(&Self::checksum(&self.0));
        let (mut acc, mut bits, mut n) = (0u32, 0u32, 0usize);
        for b in bytes {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                if n > 0 && n % 4 == 0 {
                    f.write_str("-")?;
                }
                let c = B32[((acc >> bits) & 31) as usize];
                write!(f, "{}", c as char)?;
                n += 1;
            }
        }
        Ok(())
    }
}

impl FromStr for RecoveryKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let mut bytes = Vec::with_capacity(RECOVERY_TEXT_BYTES);
        let (mut acc, mut bits, mut n) = (0u32, 0u32, 0usize);
        for ch in s.chars() {
            if ch == '-' || ch.is_whitespace() {
                continue;
            }
            let c = match ch.to_ascii_uppercase() {
                '0' => 'O',
                '1' => 'I',
                '8' => 'B',
                c => c,
            };
            let v = B32
                .iter()
                .position(|&b| char::from(b) == c)
                .ok_or_else(|| {
                    KeyError::BadRecoveryKey(format!("character {ch:?} is not base32"))
                })?;
            n += 1;
            if n > RECOVERY_TEXT_CHARS {
                break;
            }
            acc = (acc << 5) | v as u32;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                bytes.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        if n != RECOVERY_TEXT_CHARS {
            return Err(KeyError::BadRecoveryKey(format!(
                "expected {RECOVERY_TEXT_CHARS} characters (ignoring dashes and spaces), got {n}"
            )));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[..32]);
        if bytes[32..] != Self::checksum(&key) {
            return Err(KeyError::BadRecoveryKey(
                "checksum mismatch (probably a typo)".into(),
            ));
        }
        Ok(Self(key))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHEAP: Argon2Params = Argon2Params::insecure_for_tests();

    #[test]
    fn defaults_are_the_documented_costs() {
        assert_eq!(
            Argon2Params::default(),
            Argon2Params {
                m_cost_kib: 65536,
                t_cost: 3,
                p_cost: 1
            }
        );
    }

    #[test]
    fn argon2id_known_answer() {
        let k = CHEAP.derive(b"password", &[1u8; 16]).unwrap();
        assert_eq!(hex::encode(k), KAT_ARGON2);
    }
    const KAT_ARGON2: &str = "55dbcec536a7ea872cbe528dfbbdb777efd2d13a7c8ea45133d0f58684ca1fe7";

    #[test]
    fn create_unlock_recover_rewrap() {
        let (file, master, recovery) =
            KeyFile::create_with_params(b"correct horse", CHEAP).unwrap();
        assert_eq!(file.unlock(b"correct horse").unwrap(), master);
        let err = file.unlock(b"wrong horse").unwrap_err();
        assert!(matches!(err, KeyError::WrongPassphrase));
        assert_eq!(err.to_string(), "wrong passphrase");
        assert_eq!(file.unlock_with_recovery(&recovery).unwrap(), master);
        assert!(matches!(
            file.unlock_with_recovery(&RecoveryKey::generate()),
            Err(KeyError::WrongRecoveryKey)
        ));

        let changed = file.rewrap(b"correct horse", b"battery staple").unwrap();
        assert_eq!(changed.unlock(b"battery staple").unwrap(), master);
        assert!(matches!(
            changed.unlock(b"correct horse"),
            Err(KeyError::WrongPassphrase)
        ));
        assert_eq!(changed.unlock_with_recovery(&recovery).unwrap(), master);
        assert!(matches!(
            file.rewrap(b"nope", b"x"),
            Err(KeyError::WrongPassphrase)
        ));

        let reset = file.rewrap_with_recovery(&recovery, b"new").unwrap();
        assert_eq!(reset.unlock(b"new").unwrap(), master);
        assert!(file
            .with_passphrase(&MasterKey::generate(), b"x", CHEAP)
            .is_err());
    }

    #[test]
    fn json_round_trip_and_version() {
        let (file, master, _) = KeyFile::create_with_params(b"pw", CHEAP).unwrap();
        let text = file.to_json();
        assert!(!text.contains(&hex::encode(master.as_bytes())));
        let back = KeyFile::from_json(&text).unwrap();
        assert_eq!(back, file);
        assert_eq!(back.unlock(b"pw").unwrap(), master);
        let v2 = text.replace("\"version\": 1", "\"version\": 2");
        assert!(matches!(
            KeyFile::from_json(&v2),
            Err(KeyError::UnsupportedVersion(2))
        ));
        assert!(matches!(KeyFile::from_json("{"), Err(KeyError::Json(_))));
    }

    #[test]
    fn tampered_files_error_without_panic() {
        let (file, _, recovery) = KeyFile::create_with_params(b"pw", CHEAP).unwrap();
        // Every hex digit of both wrapped keys and the salt, changed.
        for field in 0..3 {
            let text = match field {
                0 => &file.passphrase.wrapped,
                1 => &file.recovery.wrapped,
                _ => &file.passphrase.salt,
            };
            for i in 0..text.len() {
                let mut t = text.clone().into_bytes();
                t[i] = if t[i] == b'0' { b'1' } else { b'0' };
                let t = String::from_utf8(t).unwrap();
                let mut f = file.clone();
                match field {
                    0 => f.passphrase.wrapped = t,
                    1 => f.recovery.wrapped = t,
                    _ => f.passphrase.salt = t,
                }
                if field == 1 {
                    assert!(f.unlock_with_recovery(&recovery).is_err());
                } else {
                    assert!(f.unlock(b"pw").is_err());
                }
            }
        }
        let mut f = file.clone();
        f.passphrase.wrapped.truncate(10);
        assert!(matches!(f.unlock(b"pw"), Err(KeyError::Invalid(_))));
        let mut f = file.clone();
        f.passphrase.salt = "zz".into();
        assert!(matches!(f.unlock(b"pw"), Err(KeyError::Invalid(_))));
        let mut f = file.clone();
        f.passphrase.params.m_cost_kib = u32::MAX;
        assert!(matches!(f.unlock(b"pw"), Err(KeyError::Invalid(_))));
        let mut f = file.clone();
        f.passphrase.params.p_cost = 0;
        assert!(matches!(f.unlock(b"pw"), Err(KeyError::Kdf(_))));
        let mut f = file;
        f.fingerprint = "0000000000000000".into();
        assert!(matches!(f.unlock(b"pw"), Err(KeyError::Invalid(_))));
    }

    #[test]
    fn recovery_key_text_form() {
        let k = RecoveryKey::from_bytes([0u8; 32]);
        let text = k.to_string();
        assert_eq!(text.len(), 56 + 13);
        assert_eq!(text.split('-').count(), 14);
        assert!(text.split('-').all(|g| g.len() == 4));
        assert!(text.chars().all(|c| c == '-' || B32.contains(&(c as u8))));
        assert_eq!(text, KAT_RECOVERY_ZERO);
        assert_eq!(format!("{k:?}"), "RecoveryKey(<redacted>)");

        let r = RecoveryKey::generate();
        let t = r.to_string();
        assert_eq!(t.parse::<RecoveryKey>().unwrap(), r);
        let sloppy = t.to_lowercase().replace('-', " ").replace('o', "0");
        assert_eq!(sloppy.parse::<RecoveryKey>().unwrap(), r);
        assert_eq!(t.replace('-', "").parse::<RecoveryKey>().unwrap(), r);

        assert!(matches!(
            "ABCD".parse::<RecoveryKey>(),
            Err(KeyError::BadRecoveryKey(_))
        ));
        assert!(matches!(
            format!("{t}A").parse::<RecoveryKey>(),
            Err(KeyError::BadRecoveryKey(_))
        ));
        assert!(matches!(
            t.replace('-', "!").parse::<RecoveryKey>(),
            Err(KeyError::BadRecoveryKey(_))
        ));
        // One changed character is caught by the checksum (or decodes elsewhere and fails it).
        let mut chars: Vec<char> = t.chars().collect();
        chars[0] = if chars[0] == 'A' { 'B' } else { 'A' };
        let typo: String = chars.into_iter().collect();
        assert!(matches!(
            typo.parse::<RecoveryKey>(),
            Err(KeyError::BadRecoveryKey(_))
        ));
    }
    const KAT_RECOVERY_ZERO: &str =
        "AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAC-VWUD";

    proptest! {
        #[test]
        fn recovery_key_round_trip(b in proptest::array::uniform32(any::<u8>())) {
            let k = RecoveryKey::from_bytes(b);
            prop_assert_eq!(k.to_string().parse::<RecoveryKey>().unwrap(), k);
        }

        #[test]
        fn recovery_parse_never_panics(s in ".{0,100}") {
            let _ = s.parse::<RecoveryKey>();
        }
    }
}
