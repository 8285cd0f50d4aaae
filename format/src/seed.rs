//! Offline seeds: the first full of a VM written by the agent to removable
//! media and imported by the gateway (initial replica without the network).
//!
//! A seed is a folder:
//!
//! ```text
//! manifest.tbs        magic ‖ version ‖ seed id ‖ sealed JSON SeedManifest
//! data-000000.tbs     header (32 bytes) ‖ records, append-only
//! data-000001.tbs     …
//! ```
//!
//! Everything is sealed with AES-256-GCM under a key derived from a random
//! 256-bit **seed key** that the exporting command prints once and never
//! writes to the media. Each record's associated data binds the seed id, the
//! file number and the record's offset, so a record moved within or between
//! files or seeds, a swapped file or a flipped byte fails to open; the
//! manifest lists every file's exact length and record count, so a truncated
//! or missing file is refused before anything is read from it.
//!
//! This module owns bytes only (no files): encoders return buffers, decoders
//! read slices. Byte layout: docs/formats.md §11.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::crypto::{self, hkdf_sha256, CryptoError, SEAL_OVERHEAD};
use crate::ids::ChunkHash;
use crate::keyfile::RecoveryKey;
use crate::magic::{
    ObjectType, FORMAT_VERSION, MAX_CHUNK_SIZE, SEED_DATA_MAGIC, SEED_MANIFEST_MAGIC,
};
use crate::wire::{StreamSpec, VmInfo};

/// Bytes of a data file's header.
pub const DATA_HEADER_LEN: usize = 32;
/// Bytes before the sealed JSON of a manifest file.
pub const MANIFEST_HEADER_LEN: usize = 32;
/// Bytes of the length prefix of a record.
pub const RECORD_PREFIX_LEN: usize = 4;
/// Largest sealed record (hash + codec flag + raw chunk + seal overhead).
pub const MAX_SEALED_RECORD_LEN: usize = 32 + 1 + MAX_CHUNK_SIZE + SEAL_OVERHEAD;
/// Largest sealed manifest accepted (refused before decryption).
pub const MAX_MANIFEST_LEN: usize = 1 << 30;
/// File name of the manifest.
pub const MANIFEST_NAME: &str = "manifest.tbs";

/// Name of data file `n`.
pub fn data_file_name(n: u32) -> String {
    format!("data-{n:06}.tbs")
}

/// Errors decoding a seed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeedError {
    /// Not a seed file, or another version.
    #[error("not a Tierback seed {0} (bad magic or version)")]
    BadHeader(&'static str),
    /// The file belongs to another seed or is another file of this seed.
    #[error("belongs to another seed or is in the wrong place ({0})")]
    WrongFile(String),
    /// The data ended inside a record or header.
    #[error("truncated: {0}")]
    Truncated(String),
    /// The AES-GCM tag did not verify.
    #[error("does not authenticate: wrong seed key, or the file is damaged")]
    Auth,
    /// A record or manifest is malformed after decryption.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A chunk's content does not hash to the hash recorded with it.
    #[error("chunk content does not match its hash {0}")]
    HashMismatch(ChunkHash),
}

impl From<CryptoError> for SeedError {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::Auth => SeedError::Auth,
            CryptoError::Truncated { .. } => SeedError::Truncated(e.to_string()),
            other => SeedError::Malformed(other.to_string()),
        }
    }
}

/// The random 256-bit key of one export. Text form as a recovery key (56
/// base32 characters with a checksum, dash-grouped). `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct SeedKey(RecoveryKey);

impl fmt::Debug for SeedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SeedKey(<redacted>)")
    }
}

impl SeedKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(RecoveryKey::generate())
    }

    /// Wraps raw key bytes.
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        Self(RecoveryKey::from_bytes(b))
    }

    /// The AES-256-GCM key sealing records and manifest
    /// (HKDF-SHA256, info `tierback/v1/seed`).
    pub fn data_key(&self) -> [u8; 32] {
        hkdf_sha256(self.0.as_bytes(), &[b"tierback/v1/seed"])
    }
}

impl fmt::Display for SeedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for SeedKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RecoveryKey::from_str(s)
            .map(SeedKey)
            .map_err(|e| format!("not a seed key: {e}"))
    }
}

/// One data file as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedFile {
    /// File number (its name is [`data_file_name`]).
    pub file_no: u32,
    /// Exact length in bytes.
    pub len: u64,
    /// Records in the file.
    pub records: u64,
}

/// What a seed holds: one VM's recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedManifest {
    /// Random id of this seed (32 hex), bound into every record.
    pub seed_id: String,
    /// Unix seconds of the export.
    pub created_at: i64,
    /// The exporting agent (the point is recorded as made by it).
    pub agent_id: String,
    /// The point id the import commits (the agent's change-tracking state
    /// already names it, so its next backup is an incremental of it).
    pub point: String,
    /// The VM as the export found it.
    pub vm: VmInfo,
    /// Chunk size the streams were cut into.
    pub chunk_size: u32,
    /// Streams (disks in vm.json order, then config files, `vm.json` first).
    pub streams: Vec<StreamSpec>,
    /// Per stream, the complete index: `(chunk number, plaintext BLAKE3)`,
    /// ascending, all-zero chunks omitted.
    pub indexes: Vec<Vec<(u64, ChunkHash)>>,
    /// The data files, in order.
    pub files: Vec<SeedFile>,
    /// Plaintext bytes of the distinct chunks stored.
    pub bytes: u64,
}

/// The 16-byte id of a seed.
pub type SeedId = [u8; 16];

fn record_ad(seed: &SeedId, file_no: u32, offset: u64) -> Vec<u8> {
    crypto::associated_data(
        ObjectType::SeedRecord,
        &[seed, &file_no.to_le_bytes(), &offset.to_le_bytes()],
    )
}

fn manifest_ad(seed: &SeedId) -> Vec<u8> {
    crypto::associated_data(ObjectType::SeedManifest, &[seed])
}

/// Header of data file `file_no`: magic ‖ version ‖ 3 zero ‖ file no ‖ seed id ‖ 4 zero.
pub fn encode_data_header(seed: &SeedId, file_no: u32) -> [u8; DATA_HEADER_LEN] {
    let mut h = [0u8; DATA_HEADER_LEN];
    h[..8].copy_from_slice(&SEED_DATA_MAGIC);
    h[8] = FORMAT_VERSION;
    h[12..16].copy_from_slice(&file_no.to_le_bytes());
    h[16..32].copy_from_slice(seed);
    h
}

/// Checks a data file's header against the seed and file number expected.
pub fn check_data_header(b: &[u8], seed: &SeedId, file_no: u32) -> Result<(), SeedError> {
    if b.len() < DATA_HEADER_LEN {
        return Err(SeedError::Truncated("data file header".into()));
    }
    if b[..8] != SEED_DATA_MAGIC || b[8] != FORMAT_VERSION {
        return Err(SeedError::BadHeader("data file"));
    }
    let n = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    if &b[16..32] != seed || n != file_no {
        return Err(SeedError::WrongFile(format!(
            "header says file {n}, expected {file_no}"
        )));
    }
    Ok(())
}

/// Encodes one record for offset `offset` of file `file_no`:
/// `sealed length u32 ‖ sealed(hash ‖ codec ‖ payload)`.
pub fn encode_record(
    key: &[u8; 32],
    seed: &SeedId,
    file_no: u32,
    offset: u64,
    hash: &ChunkHash,
    data: &[u8],
    zstd_level: i32,
) -> Vec<u8> {
    let payload = crypto::encode_chunk_payload(data, zstd_level);
    let mut plain = Vec::with_capacity(32 + payload.len());
    plain.extend_from_slice(&hash.0);
    plain.extend_from_slice(&payload);
    let sealed = crypto::seal(key, &record_ad(seed, file_no, offset), &plain);
    let mut out = Vec::with_capacity(RECORD_PREFIX_LEN + sealed.len());
    out.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
    out.extend_from_slice(&sealed);
    out
}

/// The sealed length announced by a record's prefix, checked against the
/// limit.
pub fn record_len(prefix: [u8; RECORD_PREFIX_LEN]) -> Result<usize, SeedError> {
    let n = u32::from_le_bytes(prefix) as usize;
    if !(32 + 1 + SEAL_OVERHEAD..=MAX_SEALED_RECORD_LEN).contains(&n) {
        return Err(SeedError::Malformed(format!("record length {n}")));
    }
    Ok(n)
}

/// Opens the sealed part of a record read at `offset` (of its prefix),
/// decompresses it and checks that the data hashes to its recorded hash.
pub fn open_record(
    key: &[u8; 32],
    seed: &SeedId,
    file_no: u32,
    offset: u64,
    sealed: &[u8],
) -> Result<(ChunkHash, Vec<u8>), SeedError> {
    let plain = crypto::open(key, &record_ad(seed, file_no, offset), sealed)?;
    if plain.len() < 33 {
        return Err(SeedError::Malformed("record shorter than its hash".into()));
    }
    let mut h = [0u8; 32];
    h.copy_from_slice(&plain[..32]);
    let hash = ChunkHash(h);
    let data = crypto::decode_chunk_payload(&plain[32..])?;
    if ChunkHash::of(&data) != hash {
        return Err(SeedError::HashMismatch(hash));
    }
    Ok((hash, data))
}

/// Splits a whole data file into its records, opening each (for tests and
/// small files; importers stream with [`record_len`] and [`open_record`]).
pub fn decode_data_file(
    key: &[u8; 32],
    seed: &SeedId,
    file_no: u32,
    b: &[u8],
) -> Result<Vec<(ChunkHash, Vec<u8>)>, SeedError> {
    check_data_header(b, seed, file_no)?;
    let mut pos = DATA_HEADER_LEN;
    let mut out = Vec::new();
    while pos < b.len() {
        let prefix: [u8; 4] = b
            .get(pos..pos + 4)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| SeedError::Truncated(format!("record prefix at offset {pos}")))?;
        let n = record_len(prefix)?;
        let sealed = b
            .get(pos + 4..pos + 4 + n)
            .ok_or_else(|| SeedError::Truncated(format!("record at offset {pos}")))?;
        out.push(open_record(key, seed, file_no, pos as u64, sealed)?);
        pos += 4 + n;
    }
    Ok(out)
}

/// Encodes the manifest file: magic ‖ version ‖ 7 zero ‖ seed id ‖ sealed JSON.
pub fn encode_manifest(key: &[u8; 32], seed: &SeedId, m: &SeedManifest) -> Vec<u8> {
    let json = serde_json::to_vec(m).unwrap_or_default();
    let mut out = Vec::with_capacity(MANIFEST_HEADER_LEN + json.len() + SEAL_OVERHEAD);
    out.extend_from_slice(&SEED_MANIFEST_MAGIC);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&[0u8; 7]);
    out.extend_from_slice(seed);
    out.extend_from_slice(&crypto::seal(key, &manifest_ad(seed), &json));
    out
}

/// The seed id named by a manifest file's header (not yet authenticated).
pub fn manifest_seed_id(b: &[u8]) -> Result<SeedId, SeedError> {
    if b.len() < MANIFEST_HEADER_LEN {
        return Err(SeedError::Truncated("manifest header".into()));
    }
    if b[..8] != SEED_MANIFEST_MAGIC || b[8] != FORMAT_VERSION {
        return Err(SeedError::BadHeader("manifest"));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&b[16..32]);
    Ok(id)
}

/// Opens a manifest file and checks it is consistent with its header.
pub fn decode_manifest(key: &[u8; 32], b: &[u8]) -> Result<(SeedId, SeedManifest), SeedError> {
    let seed = manifest_seed_id(b)?;
    if b.len() > MAX_MANIFEST_LEN {
        return Err(SeedError::Malformed("manifest too large".into()));
    }
    let json = crypto::open(key, &manifest_ad(&seed), &b[MANIFEST_HEADER_LEN..])?;
    let m: SeedManifest =
        serde_json::from_slice(&json).map_err(|e| SeedError::Malformed(e.to_string()))?;
    if m.seed_id != hex::encode(seed) {
        return Err(SeedError::WrongFile("manifest names another seed".into()));
    }
    if m.indexes.len() != m.streams.len() {
        return Err(SeedError::Malformed("one index per stream expected".into()));
    }
    Ok((seed, m))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest(seed: &SeedId) -> SeedManifest {
        SeedManifest {
            seed_id: hex::encode(seed),
            created_at: 1,
            agent_id: "agent-1".into(),
            point: "00".repeat(16),
            vm: VmInfo {
                id: "vm-1".into(),
                name: "vm".into(),
                generation: 2,
                config_version: "9.0".into(),
                state: "Off".into(),
                folder: "/x".into(),
                disks: vec![],
            },
            chunk_size: 1 << 20,
            streams: vec![],
            indexes: vec![],
            files: vec![SeedFile {
                file_no: 0,
                len: 32,
                records: 0,
            }],
            bytes: 0,
        }
    }

    fn file(key: &[u8; 32], seed: &SeedId, chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut f = encode_data_header(seed, 3).to_vec();
        for c in chunks {
            let off = f.len() as u64;
            f.extend(encode_record(key, seed, 3, off, &ChunkHash::of(c), c, 3));
        }
        f
    }

    #[test]
    fn data_file_round_trip_and_tamper() {
        let key = SeedKey::generate().data_key();
        let seed = [7u8; 16];
        let chunks = vec![vec![1u8; 5000], (0..3000u32).map(|i| i as u8).collect()];
        let f = file(&key, &seed, &chunks);
        let back = decode_data_file(&key, &seed, 3, &f).unwrap();
        assert_eq!(back.iter().map(|c| c.1.clone()).collect::<Vec<_>>(), chunks);
        // Wrong key.
        let other = SeedKey::generate().data_key();
        assert_eq!(decode_data_file(&other, &seed, 3, &f), Err(SeedError::Auth));
        // A flipped byte anywhere after the header.
        for i in [40, f.len() / 2, f.len() - 1] {
            let mut bad = f.clone();
            bad[i] ^= 1;
            assert!(decode_data_file(&key, &seed, 3, &bad).is_err(), "byte {i}");
        }
        // Truncated mid-record.
        assert!(matches!(
            decode_data_file(&key, &seed, 3, &f[..f.len() - 10]),
            Err(SeedError::Truncated(_))
        ));
        // Renamed to another file number, or another seed.
        assert!(matches!(
            decode_data_file(&key, &seed, 4, &f),
            Err(SeedError::WrongFile(_))
        ));
        assert!(decode_data_file(&key, &[8u8; 16], 3, &f).is_err());
    }

    #[test]
    fn records_are_bound_to_their_offset() {
        let key = SeedKey::generate().data_key();
        let seed = [1u8; 16];
        let a = encode_record(&key, &seed, 0, 32, &ChunkHash::of(b"a"), b"a", 3);
        assert!(open_record(&key, &seed, 0, 32, &a[4..]).is_ok());
        assert_eq!(
            open_record(&key, &seed, 0, 33, &a[4..]),
            Err(SeedError::Auth)
        );
        assert_eq!(
            open_record(&key, &seed, 1, 32, &a[4..]),
            Err(SeedError::Auth)
        );
        // A record sealed with a lying hash is refused after opening.
        let lie = encode_record(&key, &seed, 0, 32, &ChunkHash::of(b"b"), b"a", 3);
        assert!(matches!(
            open_record(&key, &seed, 0, 32, &lie[4..]),
            Err(SeedError::HashMismatch(_))
        ));
    }

    #[test]
    fn manifest_round_trip_and_tamper() {
        let key = SeedKey::generate().data_key();
        let seed = [9u8; 16];
        let m = manifest(&seed);
        let b = encode_manifest(&key, &seed, &m);
        assert_eq!(decode_manifest(&key, &b).unwrap(), (seed, m));
        let mut bad = b.clone();
        bad[20] ^= 1; // the seed id in the header
        assert_eq!(decode_manifest(&key, &bad), Err(SeedError::Auth));
        assert!(decode_manifest(&key, &b[..b.len() - 1]).is_err());
        assert_eq!(
            decode_manifest(&SeedKey::generate().data_key(), &b),
            Err(SeedError::Auth)
        );
        assert!(matches!(
            decode_manifest(&key, &b[..20]),
            Err(SeedError::Truncated(_))
        ));
    }

    #[test]
    fn seed_key_text_round_trip() {
        let k = SeedKey::from_bytes([0; 32]);
        let t = k.to_string();
        assert_eq!(t.parse::<SeedKey>().unwrap(), k);
        assert!("AAAA-BBBB".parse::<SeedKey>().is_err());
        assert!(!format!("{k:?}").contains("AAAA"));
    }

    proptest! {
        #[test]
        fn any_chunks_round_trip(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 1..3000), 0..6)) {
            let key = [5u8; 32];
            let seed = [2u8; 16];
            let f = file(&key, &seed, &chunks);
            let back = decode_data_file(&key, &seed, 3, &f).unwrap();
            prop_assert_eq!(back.into_iter().map(|c| c.1).collect::<Vec<_>>(), chunks);
        }
    }
}
