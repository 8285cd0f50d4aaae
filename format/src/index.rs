//! Disk (stream) indexes: for one stream of one recovery point (a virtual
//! disk or a file), which chunk id holds each non-zero chunk. Every recovery
//! point has a complete index per stream ("synthetic full"); chunks absent
//! from the index are all zeros.
//!
//! Encoding (little-endian), 32-byte header then 40 bytes per entry:
//!
//! ```text
//! offset  size  field
//! 0       8     INDEX_MAGIC "TBINDX01"
//! 8       1     FORMAT_VERSION
//! 9       3     reserved, zero
//! 12      4     chunk size (u32, power of two, 64 KiB ..= 8 MiB)
//! 16      8     stream size in bytes (u64)
//! 24      8     entry count (u64)
//! 32      40×n  entries: chunk number (u64) ‖ chunk id (32), strictly
//!               increasing chunk numbers, each with number × chunk size < size
//! ```
//!
//! On disk and in the cloud the encoding is sealed with the index key and
//! associated data bound to point id and stream number ([`seal_index`]).

use crate::crypto::{index_ad, open, seal, CryptoError};
use crate::ids::{ChunkId, PointId};
use crate::magic::{FORMAT_VERSION, INDEX_MAGIC, MAX_INDEX_CHUNK_SIZE, MIN_INDEX_CHUNK_SIZE};

/// Bytes of the index header.
pub const INDEX_HEADER_LEN: usize = 32;
/// Bytes of one index entry.
pub const INDEX_ENTRY_LEN: usize = 40;

const _: () = assert!(INDEX_HEADER_LEN == INDEX_MAGIC.len() + 1 + 3 + 4 + 8 + 8);
const _: () = assert!(INDEX_ENTRY_LEN == 8 + ChunkId::LEN);

/// Errors encoding, decoding or opening an index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// Not an index, or a damaged one.
    #[error("bad index magic")]
    BadMagic,
    /// Written by an unknown format version.
    #[error("index format version {0} is not supported")]
    UnsupportedVersion(u8),
    /// Lengths, chunk size, order or bounds are wrong.
    #[error("invalid index: {0}")]
    Invalid(String),
    /// The sealed index did not open (wrong key, point, stream, or damage).
    #[error("index: {0}")]
    Crypto(#[from] CryptoError),
}

/// The chunk map of one stream of one recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIndex {
    /// Bytes of the stream: the virtual disk size, or the file size.
    pub size: u64,
    /// Chunk size in bytes (power of two, 64 KiB ..= 8 MiB).
    pub chunk_size: u32,
    /// (chunk number, chunk id), sorted by chunk number, only non-zero chunks.
    pub entries: Vec<(u64, ChunkId)>,
}

impl DiskIndex {
    /// Number of chunk slots the stream has (`ceil(size / chunk_size)`),
    /// stored or zero.
    pub fn chunk_slots(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size.max(1)))
    }

    /// Checks the invariants the decoder enforces: chunk size, strictly
    /// increasing chunk numbers, every chunk inside the stream.
    pub fn validate(&self) -> Result<(), IndexError> {
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(MIN_INDEX_CHUNK_SIZE..=MAX_INDEX_CHUNK_SIZE).contains(&cs) {
            return Err(IndexError::Invalid(format!(
                "chunk size {cs} is not a power of two in 64 KiB..=8 MiB"
            )));
        }
        let mut prev: Option<u64> = None;
        for &(no, _) in &self.entries {
            if prev.is_some_and(|p| no <= p) {
                return Err(IndexError::Invalid(format!(
                    "chunk {no} out of order or repeated"
                )));
            }
            match no.checked_mul(u64::from(cs)) {
                Some(start) if start < self.size => {}
                _ => {
                    return Err(IndexError::Invalid(format!(
                        "chunk {no} lies beyond the end of a {}-byte stream",
                        self.size
                    )))
                }
            }
            prev = Some(no);
        }
        Ok(())
    }

    /// Encodes the index after [`DiskIndex::validate`], so nothing is written
    /// that could not be read back.
    pub fn encode(&self) -> Result<Vec<u8>, IndexError> {
        self.validate()?;
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + self.entries.len() * INDEX_ENTRY_LEN);
        out.extend_from_slice(&INDEX_MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&[0u8; 3]);
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (no, id) in &self.entries {
            out.extend_from_slice(&no.to_le_bytes());
            out.extend_from_slice(&id.0);
        }
        Ok(out)
    }

    /// Decodes and validates an encoded index. Never allocates more than the
    /// input's size justifies.
    pub fn decode(bytes: &[u8]) -> Result<Self, IndexError> {
        if bytes.len() < INDEX_HEADER_LEN || bytes[..8] != INDEX_MAGIC {
            return Err(IndexError::BadMagic);
        }
        if bytes[8] != FORMAT_VERSION {
            return Err(IndexError::UnsupportedVersion(bytes[8]));
        }
        if bytes[9..12] != [0u8; 3] {
            return Err(IndexError::Invalid("reserved bytes not zero".into()));
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let chunk_size = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        let size = u64_at(16);
        let count = u64_at(24);
        let body = &bytes[INDEX_HEADER_LEN..];
        let expected = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(INDEX_ENTRY_LEN));
        if expected != Some(body.len()) {
            return Err(IndexError::Invalid(format!(
                "{count} entries declared, {} bytes present",
                body.len()
            )));
        }
        let entries = body
            .chunks_exact(INDEX_ENTRY_LEN)
            .map(|e| {
                let mut no = [0u8; 8];
                no.copy_from_slice(&e[..8]);
                let mut id = [0u8; 32];
                id.copy_from_slice(&e[8..]);
                (u64::from_le_bytes(no), ChunkId(id))
            })
            .collect();
        let index = DiskIndex {
            size,
            chunk_size,
            entries,
        };
        index.validate()?;
        Ok(index)
    }
}

/// Encodes and seals `index` as stream `stream_no` of point `point`.
pub fn seal_index(
    index_key: &[u8; 32],
    point: &PointId,
    stream_no: u32,
    index: &DiskIndex,
) -> Result<Vec<u8>, IndexError> {
    Ok(seal(
        index_key,
        &index_ad(point, stream_no),
        &index.encode()?,
    ))
}

/// Opens and decodes a sealed index; fails if it belongs to another point or
/// stream, or any byte changed.
pub fn open_index(
    index_key: &[u8; 32],
    point: &PointId,
    stream_no: u32,
    sealed: &[u8],
) -> Result<DiskIndex, IndexError> {
    let plain = open(index_key, &index_ad(point, stream_no), sealed)?;
    DiskIndex::decode(&plain)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u32 = 1 << 20;

    fn sample() -> DiskIndex {
        DiskIndex {
            size: 10 * u64::from(MIB) + 5,
            chunk_size: MIB,
            entries: vec![(0, ChunkId([1; 32])), (10, ChunkId([2; 32]))],
        }
    }

    #[test]
    fn encoding_known_answer() {
        let enc = sample().encode().unwrap();
        assert_eq!(enc.len(), 32 + 2 * 40);
        assert_eq!(
            hex::encode(&enc[..32]),
            format!(
                "{}01000000{}{}{}",
                hex::encode(b"TBINDX01"),
                "00001000",
                "0500a00000000000",
                "0200000000000000"
            )
        );
        assert_eq!(&enc[32..40], &[0u8; 8]);
        assert_eq!(&enc[72..80], &[10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(DiskIndex::decode(&enc).unwrap(), sample());
        assert_eq!(sample().chunk_slots(), 11);
    }

    #[test]
    fn validation() {
        let mut i = sample();
        i.entries.swap(0, 1);
        assert!(i.encode().is_err(), "unsorted");
        let mut i = sample();
        i.entries[1].0 = 0;
        assert!(i.encode().is_err(), "repeated");
        let mut i = sample();
        i.entries[1].0 = 11;
        assert!(i.encode().is_err(), "beyond end");
        let mut i = sample();
        i.entries[1].0 = u64::MAX;
        assert!(i.encode().is_err(), "overflowing");
        for cs in [0, 3 * MIB, 32 << 10, 16 * MIB] {
            let mut i = sample();
            i.chunk_size = cs;
            assert!(i.encode().is_err(), "chunk size {cs}");
        }
        for cs in [64 << 10, 8 * MIB] {
            let i = DiskIndex {
                size: 1,
                chunk_size: cs,
                entries: vec![(0, ChunkId([0; 32]))],
            };
            assert!(i.encode().is_ok());
        }
        let empty = DiskIndex {
            size: 0,
            chunk_size: MIB,
            entries: vec![],
        };
        assert_eq!(DiskIndex::decode(&empty.encode().unwrap()).unwrap(), empty);
    }

    #[test]
    fn decode_rejects_bad_headers_and_lengths() {
        let enc = sample().encode().unwrap();
        assert_eq!(DiskIndex::decode(&enc[..31]), Err(IndexError::BadMagic));
        assert!(DiskIndex::decode(&enc[..enc.len() - 1]).is_err());
        let mut v = enc.clone();
        v[8] = 2;
        assert_eq!(
            DiskIndex::decode(&v),
            Err(IndexError::UnsupportedVersion(2))
        );
        let mut v = enc.clone();
        v[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(DiskIndex::decode(&v).is_err());
    }

    #[test]
    fn sealed_index_is_bound_to_point_and_stream() {
        let key = [9u8; 32];
        let p = PointId([1; 16]);
        let sealed = seal_index(&key, &p, 0, &sample()).unwrap();
        assert_eq!(open_index(&key, &p, 0, &sealed).unwrap(), sample());
        assert!(open_index(&key, &p, 1, &sealed).is_err());
        assert!(open_index(&key, &PointId([2; 16]), 0, &sealed).is_err());
        assert!(open_index(&[8u8; 32], &p, 0, &sealed).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x04;
            assert!(open_index(&key, &p, 0, &bad).is_err(), "byte {i}");
        }
    }

    fn arb_index() -> impl Strategy<Value = DiskIndex> {
        (16u32..=23, 1u64..1 << 40).prop_flat_map(|(shift, size)| {
            let cs = 1u32 << shift;
            let slots = size.div_ceil(u64::from(cs));
            proptest::collection::btree_map(0..slots, any::<[u8; 32]>(), 0..40).prop_map(move |m| {
                DiskIndex {
                    size,
                    chunk_size: cs,
                    entries: m.into_iter().map(|(n, id)| (n, ChunkId(id))).collect(),
                }
            })
        })
    }

    proptest! {
        #[test]
        fn round_trip(index in arb_index()) {
            prop_assert_eq!(DiskIndex::decode(&index.encode().unwrap()).unwrap(), index);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = DiskIndex::decode(&data);
        }

        #[test]
        fn flipped_header_byte_never_panics(index in arb_index(), pos in 0usize..32, bit in 0u8..8) {
            let mut enc = index.encode().unwrap();
            enc[pos] ^= 1 << bit;
            let _ = DiskIndex::decode(&enc);
        }
    }
}
