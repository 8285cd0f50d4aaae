//! Every magic number, format version and AEAD object-type byte of Tierback's
//! stored objects, in one place.
//!
//! These values are frozen: packs, indexes and key files written with them live
//! for years, locally and in the cloud. Changing one is a format change that
//! needs a new version number and a reader for the old one. Nothing in this
//! module may depend on anything else in the crate.

/// Version of the sealed-object formats (packs, TOCs, indexes, manifests). It is
/// written into pack headers and index headers and bound into every AEAD's
/// associated data, so an object sealed under another version never opens.
pub const FORMAT_VERSION: u8 = 1;

/// First 8 bytes of every pack file.
pub const PACK_MAGIC: [u8; 8] = *b"TBPACK01";

/// Last 8 bytes of every pack file (end of the trailer).
pub const PACK_TRAILER_MAGIC: [u8; 8] = *b"TBPKEND1";

/// First 8 bytes of an encoded (plaintext) disk index.
pub const INDEX_MAGIC: [u8; 8] = *b"TBINDX01";

/// First 8 bytes of a pack's table of contents (plaintext, before sealing).
pub const TOC_MAGIC: [u8; 8] = *b"TBPKTOC1";

/// First 8 bytes of an offline seed's data file (`data-NNNNNN.tbs`).
pub const SEED_DATA_MAGIC: [u8; 8] = *b"TBSEED01";

/// First 8 bytes of an offline seed's manifest (`manifest.tbs`).
pub const SEED_MANIFEST_MAGIC: [u8; 8] = *b"TBSEEDM1";

/// Version of the JSON key file (`KeyFile::version`).
pub const KEYFILE_VERSION: u32 = 1;

/// Largest plaintext chunk any Tierback component produces or accepts (8 MiB).
/// Decoders never allocate more than this for one chunk from untrusted input.
pub const MAX_CHUNK_SIZE: usize = 8 << 20;

/// Smallest chunk size a disk index may declare (64 KiB).
pub const MIN_INDEX_CHUNK_SIZE: u32 = 64 << 10;

/// Largest chunk size a disk index may declare (8 MiB, = [`MAX_CHUNK_SIZE`]).
pub const MAX_INDEX_CHUNK_SIZE: u32 = 8 << 20;

/// Payload flag byte of a sealed chunk: the rest is the raw plaintext.
pub const CHUNK_CODEC_RAW: u8 = 0;

/// Payload flag byte of a sealed chunk: the rest is one zstd frame.
pub const CHUNK_CODEC_ZSTD: u8 = 1;

/// Payload flag byte of a sealed chunk stored as a delta: the rest is the
/// keyed id of its base chunk (32 bytes), the chunk length, a bitmap of the
/// 4 KiB blocks that differ from the base, and those blocks as a raw or zstd
/// payload (`crypto::encode_delta_payload`). The base is never itself a
/// delta.
pub const CHUNK_CODEC_DELTA: u8 = 2;

/// Kind of a sealed object; its byte is the second byte of the AEAD associated
/// data (after [`FORMAT_VERSION`]), so an object of one kind can never be opened
/// as another.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectType {
    /// One chunk record in a pack; object id = pack id ‖ chunk id.
    Chunk = 1,
    /// A pack's table of contents; object id = pack id.
    Toc = 2,
    /// A disk (stream) index; object id = point id ‖ stream number (u32 LE).
    Index = 3,
    /// A recovery-point manifest; object id = point id.
    Manifest = 4,
    /// The master key wrapped in a key file; object id = wrap label
    /// (`b"passphrase"` or `b"recovery"`).
    KeyWrap = 5,
    /// One chunk record in an offline seed's data file; object id = seed id
    /// ‖ file number (u32 LE) ‖ record offset (u64 LE).
    SeedRecord = 6,
    /// An offline seed's manifest; object id = seed id.
    SeedManifest = 7,
}

impl ObjectType {
    /// The byte written into associated data.
    pub const fn as_byte(self) -> u8 {
        self as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_values() {
        // A change here is a format change: see the module docs.
        assert_eq!(FORMAT_VERSION, 1);
        assert_eq!(&PACK_MAGIC, b"TBPACK01");
        assert_eq!(&PACK_TRAILER_MAGIC, b"TBPKEND1");
        assert_eq!(&INDEX_MAGIC, b"TBINDX01");
        assert_eq!(&TOC_MAGIC, b"TBPKTOC1");
        assert_eq!(ObjectType::Chunk.as_byte(), 1);
        assert_eq!(ObjectType::Toc.as_byte(), 2);
        assert_eq!(ObjectType::Index.as_byte(), 3);
        assert_eq!(ObjectType::Manifest.as_byte(), 4);
        assert_eq!(ObjectType::KeyWrap.as_byte(), 5);
        assert_eq!(ObjectType::SeedRecord.as_byte(), 6);
        assert_eq!(ObjectType::SeedManifest.as_byte(), 7);
        assert_eq!(&SEED_DATA_MAGIC, b"TBSEED01");
        assert_eq!(&SEED_MANIFEST_MAGIC, b"TBSEEDM1");
        assert_eq!(MAX_CHUNK_SIZE, 8 * 1024 * 1024);
        assert_eq!(MAX_INDEX_CHUNK_SIZE as usize, MAX_CHUNK_SIZE);
    }
}
