//! Pack files: many sealed chunk records in one immutable file, with a sealed
//! table of contents (TOC) at the end, so a pack alone (e.g. fetched back from
//! the cloud) says which chunks it holds and where.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! offset  size  field
//! 0       8     PACK_MAGIC "TBPACK01"
//! 8       1     FORMAT_VERSION
//! 9       7     reserved, zero
//! 16      16    pack id
//! 32      …     chunk records: each exactly the bytes of crypto::seal_chunk
//!               (nonce ‖ ciphertext ‖ tag), back to back, nothing between
//! T       L     sealed TOC: crypto::seal(pack key, toc_ad(pack id), TOC plaintext)
//! T+L     8     trailer: TOC offset T (u64)
//! T+L+8   4     trailer: TOC length L (u32)
//! T+L+12  4     trailer: CRC-32C of the 12 bytes above (u32)
//! T+L+16  8     PACK_TRAILER_MAGIC "TBPKEND1"
//! ```
//!
//! TOC plaintext: `TOC_MAGIC (8) ‖ entry count (u32) ‖ reserved (u32, zero)`,
//! then per chunk, in file order: `chunk id (32) ‖ offset (u64) ‖ sealed length
//! (u32) ‖ plaintext length (u32)`.
//!
//! [`PackWriter`] streams a pack into any `Write`; decoders take byte slices
//! and validate every offset and length before anyone uses them.

use std::io::{self, Write};

use crate::crypto::{open, seal, toc_ad, CryptoError, MAX_SEALED_CHUNK_LEN};
use crate::ids::{ChunkId, PackId};
use crate::magic::{FORMAT_VERSION, MAX_CHUNK_SIZE, PACK_MAGIC, PACK_TRAILER_MAGIC, TOC_MAGIC};

/// Bytes of the pack header (magic, version, reserved, pack id).
pub const PACK_HEADER_LEN: usize = 32;
/// Bytes of the pack trailer (TOC offset, TOC length, CRC, magic).
pub const PACK_TRAILER_LEN: usize = 24;
/// Bytes of the TOC plaintext header (magic, count, reserved).
pub const TOC_HEADER_LEN: usize = 16;
/// Bytes of one TOC entry (chunk id, offset, sealed length, plaintext length).
pub const TOC_ENTRY_LEN: usize = 48;

const _: () = assert!(PACK_HEADER_LEN == PACK_MAGIC.len() + 1 + 7 + PackId::LEN);
const _: () = assert!(PACK_TRAILER_LEN == 8 + 4 + 4 + PACK_TRAILER_MAGIC.len());
const _: () = assert!(TOC_HEADER_LEN == TOC_MAGIC.len() + 4 + 4);
const _: () = assert!(TOC_ENTRY_LEN == ChunkId::LEN + 8 + 4 + 4);

/// Errors decoding a pack's header, trailer or TOC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// Too short to hold the structure being decoded.
    #[error("pack truncated: {0}")]
    Truncated(&'static str),
    /// A magic number is wrong: not a pack, or a damaged one.
    #[error("bad {0} magic")]
    BadMagic(&'static str),
    /// Written by a newer (or unknown) format version.
    #[error("pack format version {0} is not supported")]
    UnsupportedVersion(u8),
    /// The trailer's CRC does not match its fields.
    #[error("pack trailer checksum mismatch")]
    TrailerChecksum,
    /// The trailer's fields do not fit the file.
    #[error("pack trailer inconsistent: {0}")]
    BadTrailer(String),
    /// The TOC did not decrypt (wrong key, wrong pack id, damage).
    #[error("pack TOC: {0}")]
    Toc(#[from] CryptoError),
    /// The TOC decrypted but its content is inconsistent.
    #[error("pack TOC malformed: {0}")]
    BadToc(String),
}

/// One chunk of a pack, as listed in its TOC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TocEntry {
    /// Stored id of the chunk.
    pub chunk_id: ChunkId,
    /// Offset of the sealed record from the start of the pack file.
    pub offset: u64,
    /// Length of the sealed record.
    pub len: u32,
    /// Length of the chunk's plaintext.
    pub raw_len: u32,
}

/// The decoded trailer: where the sealed TOC is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackTrailer {
    /// Offset of the sealed TOC from the start of the pack file.
    pub toc_offset: u64,
    /// Length of the sealed TOC.
    pub toc_len: u32,
}

/// Encodes the 32-byte header of pack `id`.
pub fn encode_header(id: &PackId) -> [u8; PACK_HEADER_LEN] {
    let mut h = [0u8; PACK_HEADER_LEN];
    h[..8].copy_from_slice(&PACK_MAGIC);
    h[8] = FORMAT_VERSION;
    h[16..32].copy_from_slice(&id.0);
    h
}

/// Decodes a pack header from the first [`PACK_HEADER_LEN`] bytes of `bytes`.
pub fn parse_header(bytes: &[u8]) -> Result<PackId, PackError> {
    let h = bytes
        .get(..PACK_HEADER_LEN)
        .ok_or(PackError::Truncated("header"))?;
    if h[..8] != PACK_MAGIC {
        return Err(PackError::BadMagic("pack header"));
    }
    if h[8] != FORMAT_VERSION {
        return Err(PackError::UnsupportedVersion(h[8]));
    }
    if h[9..16].iter().any(|&b| b != 0) {
        return Err(PackError::BadMagic("pack header reserved bytes"));
    }
    PackId::from_slice(&h[16..32]).map_err(|_| PackError::Truncated("header"))
}

/// Encodes a trailer.
pub fn encode_trailer(t: &PackTrailer) -> [u8; PACK_TRAILER_LEN] {
    let mut out = [0u8; PACK_TRAILER_LEN];
    out[..8].copy_from_slice(&t.toc_offset.to_le_bytes());
    out[8..12].copy_from_slice(&t.toc_len.to_le_bytes());
    let crc = crc32c::crc32c(&out[..12]);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out[16..].copy_from_slice(&PACK_TRAILER_MAGIC);
    out
}

/// Decodes the trailer from the last [`PACK_TRAILER_LEN`] bytes of `tail`
/// (pass at least the file's last 24 bytes; the whole file also works) and
/// checks it against the pack's total length `file_len`: the TOC must lie
/// between the header and the trailer and end exactly at the trailer.
pub fn parse_trailer(file_len: u64, tail: &[u8]) -> Result<PackTrailer, PackError> {
    if tail.len() < PACK_TRAILER_LEN || file_len < (PACK_HEADER_LEN + PACK_TRAILER_LEN) as u64 {
        return Err(PackError::Truncated("trailer"));
    }
    let t = &tail[tail.len() - PACK_TRAILER_LEN..];
    if t[16..] != PACK_TRAILER_MAGIC {
        return Err(PackError::BadMagic("pack trailer"));
    }
    let crc = u32::from_le_bytes([t[12], t[13], t[14], t[15]]);
    if crc != crc32c::crc32c(&t[..12]) {
        return Err(PackError::TrailerChecksum);
    }
    let toc_offset = u64::from_le_bytes([t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]]);
    let toc_len = u32::from_le_bytes([t[8], t[9], t[10], t[11]]);
    let toc_end = toc_offset.checked_add(u64::from(toc_len));
    if toc_offset < PACK_HEADER_LEN as u64 || toc_end != Some(file_len - PACK_TRAILER_LEN as u64) {
        return Err(PackError::BadTrailer(format!(
            "TOC at {toc_offset}+{toc_len} does not end at the trailer of a {file_len}-byte pack"
        )));
    }
    Ok(PackTrailer {
        toc_offset,
        toc_len,
    })
}

/// Encodes a TOC's plaintext.
pub fn encode_toc(entries: &[TocEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(TOC_HEADER_LEN + entries.len() * TOC_ENTRY_LEN);
    out.extend_from_slice(&TOC_MAGIC);
    // A pack cannot hold 2^32 records: each is at least SEAL_OVERHEAD bytes and
    // the TOC length is a u32.
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    for e in entries {
        out.extend_from_slice(&e.chunk_id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
    }
    out
}

/// Decodes a TOC's plaintext and checks that every record lies in
/// `[PACK_HEADER_LEN, toc_offset)`, records are in file order without
/// overlap, and lengths are within chunk limits.
pub fn decode_toc(plain: &[u8], toc_offset: u64) -> Result<Vec<TocEntry>, PackError> {
    let bad = |m: String| PackError::BadToc(m);
    if plain.len() < TOC_HEADER_LEN || plain[..8] != TOC_MAGIC {
        return Err(PackError::BadMagic("TOC"));
    }
    let count = u32::from_le_bytes([plain[8], plain[9], plain[10], plain[11]]) as usize;
    if plain[12..16] != [0u8; 4] {
        return Err(bad("reserved bytes not zero".into()));
    }
    let body = &plain[TOC_HEADER_LEN..];
    if count.checked_mul(TOC_ENTRY_LEN) != Some(body.len()) {
        return Err(bad(format!(
            "{count} entries declared, {} bytes present",
            body.len()
        )));
    }
    let mut entries = Vec::with_capacity(count);
    let mut next_free = PACK_HEADER_LEN as u64;
    for (i, e) in body.chunks_exact(TOC_ENTRY_LEN).enumerate() {
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[..32]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&e[32..40]);
        let entry = TocEntry {
            chunk_id: ChunkId(id),
            offset: u64::from_le_bytes(off),
            len: u32::from_le_bytes([e[40], e[41], e[42], e[43]]),
            raw_len: u32::from_le_bytes([e[44], e[45], e[46], e[47]]),
        };
        if entry.offset < next_free {
            return Err(bad(format!(
                "entry {i} at {} overlaps the previous record",
                entry.offset
            )));
        }
        if entry.len as usize > MAX_SEALED_CHUNK_LEN || entry.raw_len as usize > MAX_CHUNK_SIZE {
            return Err(bad(format!(
                "entry {i} lengths {}/{} exceed chunk limits",
                entry.len, entry.raw_len
            )));
        }
        next_free = entry
            .offset
            .checked_add(u64::from(entry.len))
            .ok_or_else(|| bad(format!("entry {i} offset overflows")))?;
        if next_free > toc_offset {
            return Err(bad(format!(
                "entry {i} extends past the TOC at {toc_offset}"
            )));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Decrypts and decodes the sealed TOC of pack `pack` located by `trailer`.
/// `sealed_toc` is exactly the `trailer.toc_len` bytes at `trailer.toc_offset`.
pub fn open_toc(
    pack_key: &[u8; 32],
    pack: &PackId,
    trailer: &PackTrailer,
    sealed_toc: &[u8],
) -> Result<Vec<TocEntry>, PackError> {
    if sealed_toc.len() != trailer.toc_len as usize {
        return Err(PackError::Truncated("TOC"));
    }
    let plain = open(pack_key, &toc_ad(pack), sealed_toc)?;
    decode_toc(&plain, trailer.toc_offset)
}

/// Decodes a whole pack held in memory: header, trailer, TOC. Returns the pack
/// id and its TOC entries. Chunk records are not opened.
pub fn parse_pack(
    pack_key_of: impl Fn(&PackId) -> [u8; 32],
    bytes: &[u8],
) -> Result<(PackId, Vec<TocEntry>), PackError> {
    let id = parse_header(bytes)?;
    let trailer = parse_trailer(bytes.len() as u64, bytes)?;
    // parse_trailer proved toc_offset + toc_len <= bytes.len().
    let start = trailer.toc_offset as usize;
    let toc = &bytes[start..start + trailer.toc_len as usize];
    let entries = open_toc(&pack_key_of(&id), &id, &trailer, toc)?;
    Ok((id, entries))
}

/// Writes one pack to `W`: the header at creation, records as appended, then
/// TOC and trailer at [`PackWriter::finish`]. Holds only the TOC entries in
/// memory (plus whatever `W` holds: with `W = Vec<u8>` the whole pack).
#[derive(Debug)]
pub struct PackWriter<W: Write> {
    w: W,
    id: PackId,
    pos: u64,
    entries: Vec<TocEntry>,
}

/// A pack built in memory.
pub type PackBuilder = PackWriter<Vec<u8>>;

impl<W: Write> PackWriter<W> {
    /// Starts pack `id`, writing its header.
    pub fn new(mut w: W, id: PackId) -> io::Result<Self> {
        w.write_all(&encode_header(&id))?;
        Ok(Self {
            w,
            id,
            pos: PACK_HEADER_LEN as u64,
            entries: Vec::new(),
        })
    }

    /// The pack's id.
    pub fn id(&self) -> &PackId {
        &self.id
    }

    /// Bytes written so far (header and records).
    pub fn len(&self) -> u64 {
        self.pos
    }

    /// True when no record has been appended.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The underlying writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// Records appended so far, in file order.
    pub fn entries(&self) -> &[TocEntry] {
        &self.entries
    }

    /// Appends one sealed chunk record (from [`crate::crypto::seal_chunk`] for
    /// this pack) whose plaintext is `raw_len` bytes. Returns its offset and
    /// length in the pack.
    pub fn append(
        &mut self,
        chunk_id: ChunkId,
        sealed_record: &[u8],
        raw_len: u32,
    ) -> io::Result<(u64, u32)> {
        if sealed_record.len() > MAX_SEALED_CHUNK_LEN || raw_len as usize > MAX_CHUNK_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "chunk record exceeds chunk limits",
            ));
        }
        if TOC_HEADER_LEN + (self.entries.len() + 1) * TOC_ENTRY_LEN + crate::crypto::SEAL_OVERHEAD
            > u32::MAX as usize
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "pack TOC would exceed 4 GiB",
            ));
        }
        self.w.write_all(sealed_record)?;
        let offset = self.pos;
        let len = sealed_record.len() as u32;
        self.pos += u64::from(len);
        self.entries.push(TocEntry {
            chunk_id,
            offset,
            len,
            raw_len,
        });
        Ok((offset, len))
    }

    /// Writes the sealed TOC and the trailer; returns the writer, the pack's
    /// total length and its TOC entries.
    pub fn finish(mut self, pack_key: &[u8; 32]) -> io::Result<(W, u64, Vec<TocEntry>)> {
        let tail = pack_tail(pack_key, &self.id, &self.entries, self.pos);
        self.w.write_all(&tail)?;
        let total = self.pos + tail.len() as u64;
        Ok((self.w, total, self.entries))
    }

    /// Gives up the writer without finishing the pack: the writer, the bytes
    /// written so far (header and records) and the TOC entries, for a caller
    /// that writes the tail itself with [`pack_tail`] (e.g. again after a
    /// failed attempt, on a file truncated back to the records' end).
    pub fn into_parts(self) -> (W, u64, Vec<TocEntry>) {
        (self.w, self.pos, self.entries)
    }
}

/// The end of a pack whose header and records fill `records_end` bytes: the
/// sealed TOC of `entries` followed by the trailer.
pub fn pack_tail(
    pack_key: &[u8; 32],
    id: &PackId,
    entries: &[TocEntry],
    records_end: u64,
) -> Vec<u8> {
    let sealed = seal(pack_key, &toc_ad(id), &encode_toc(entries));
    let trailer = PackTrailer {
        toc_offset: records_end,
        toc_len: sealed.len() as u32,
    };
    let mut out = sealed;
    out.extend_from_slice(&encode_trailer(&trailer));
    out
}

impl PackWriter<Vec<u8>> {
    /// Starts an in-memory pack (cannot fail).
    pub fn in_memory(id: PackId) -> Self {
        let mut w = Vec::new();
        w.extend_from_slice(&encode_header(&id));
        Self {
            w,
            id,
            pos: PACK_HEADER_LEN as u64,
            entries: Vec::new(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crypto::{open_chunk_verified, seal_chunk, MasterKey};
    use proptest::prelude::*;

    fn build(m: &MasterKey, chunks: &[Vec<u8>]) -> (PackId, Vec<u8>, Vec<ChunkId>) {
        let id = PackId::random();
        let key = m.pack_key(&id);
        let mut pb = PackBuilder::in_memory(id);
        let mut ids = Vec::new();
        for c in chunks {
            let cid = ChunkId::of_data(&m.id_key(), c);
            let rec = seal_chunk(&key, &id, &cid, c, 3);
            let (off, len) = pb.append(cid, &rec, c.len() as u32).unwrap();
            assert_eq!(len as usize, rec.len());
            assert_eq!(off + u64::from(len), pb.len());
            ids.push(cid);
        }
        let (bytes, total, entries) = pb.finish(&key).unwrap();
        assert_eq!(total, bytes.len() as u64);
        assert_eq!(entries.len(), chunks.len());
        (id, bytes, ids)
    }

    #[test]
    fn header_and_trailer_layout() {
        let h = encode_header(&PackId([0xee; 16]));
        assert_eq!(
            hex::encode(h),
            format!(
                "{}01{}{}",
                hex::encode(b"TBPACK01"),
                "00".repeat(7),
                "ee".repeat(16)
            )
        );
        let t = encode_trailer(&PackTrailer {
            toc_offset: 0x20,
            toc_len: 0x40,
        });
        assert_eq!(&t[..12], &[0x20, 0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0]);
        assert_eq!(
            u32::from_le_bytes([t[12], t[13], t[14], t[15]]),
            crc32c::crc32c(&t[..12])
        );
        assert_eq!(&t[16..], b"TBPKEND1");
        assert_eq!(
            parse_trailer(0x20 + 0x40 + 24, &t).unwrap(),
            PackTrailer {
                toc_offset: 0x20,
                toc_len: 0x40
            }
        );
    }

    #[test]
    fn build_and_parse_round_trip() {
        let m = MasterKey::from_bytes([3; 32]);
        let chunks = vec![
            vec![1u8; 1000],
            b"hello".to_vec(),
            vec![],
            vec![7u8; 70_000],
        ];
        let (id, bytes, ids) = build(&m, &chunks);
        let (pid, entries) = parse_pack(|p| m.pack_key(p), &bytes).unwrap();
        assert_eq!(pid, id);
        for ((e, cid), c) in entries.iter().zip(&ids).zip(&chunks) {
            assert_eq!(e.chunk_id, *cid);
            assert_eq!(e.raw_len as usize, c.len());
            let rec = &bytes[e.offset as usize..(e.offset + u64::from(e.len)) as usize];
            assert_eq!(
                &open_chunk_verified(&m.pack_key(&id), &id, cid, rec, &m.id_key()).unwrap(),
                c
            );
        }
        // Streaming to another Write gives the same layout.
        let mut w = PackWriter::new(Vec::new(), id).unwrap();
        assert!(w.is_empty());
        w.append(ids[0], &bytes[32..32 + entries[0].len as usize], 1000)
            .unwrap();
        let (out, total, _) = w.finish(&m.pack_key(&id)).unwrap();
        assert_eq!(out.len() as u64, total);
        assert_eq!(parse_pack(|p| m.pack_key(p), &out).unwrap().1.len(), 1);
    }

    #[test]
    fn empty_pack_parses() {
        let m = MasterKey::from_bytes([3; 32]);
        let (_, bytes, _) = build(&m, &[]);
        assert!(parse_pack(|p| m.pack_key(p), &bytes).unwrap().1.is_empty());
    }

    #[test]
    fn every_flipped_byte_of_metadata_is_an_error() {
        let m = MasterKey::from_bytes([3; 32]);
        let (_, bytes, _) = build(&m, &[b"abc".to_vec(), b"defgh".to_vec()]);
        let (_, entries) = parse_pack(|p| m.pack_key(p), &bytes).unwrap();
        let records_end = (entries[1].offset + u64::from(entries[1].len)) as usize;
        // Header, sealed TOC and trailer: every byte protected.
        let protected = (0..PACK_HEADER_LEN).chain(records_end..bytes.len());
        for i in protected {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(parse_pack(|p| m.pack_key(p), &bad).is_err(), "byte {i}");
        }
        for n in 0..bytes.len() {
            assert!(
                parse_pack(|p| m.pack_key(p), &bytes[..n]).is_err(),
                "truncated to {n}"
            );
        }
        // Wrong key.
        assert!(matches!(
            parse_pack(|_| [0u8; 32], &bytes),
            Err(PackError::Toc(CryptoError::Auth))
        ));
    }

    #[test]
    fn toc_of_another_pack_does_not_open() {
        let m = MasterKey::from_bytes([3; 32]);
        let (a, bytes_a, _) = build(&m, &[b"abc".to_vec()]);
        let (b, _, _) = build(&m, &[b"abc".to_vec()]);
        let t = parse_trailer(bytes_a.len() as u64, &bytes_a).unwrap();
        let toc = &bytes_a[t.toc_offset as usize..][..t.toc_len as usize];
        assert!(open_toc(&m.pack_key(&a), &a, &t, toc).is_ok());
        assert!(open_toc(&m.pack_key(&b), &b, &t, toc).is_err());
        assert!(open_toc(&m.pack_key(&a), &b, &t, toc).is_err());
    }

    #[test]
    fn decode_toc_rejects_inconsistent_entries() {
        let e = |off, len| TocEntry {
            chunk_id: ChunkId([1; 32]),
            offset: off,
            len,
            raw_len: 1,
        };
        assert!(decode_toc(&encode_toc(&[e(32, 10), e(42, 10)]), 52).is_ok());
        assert!(
            decode_toc(&encode_toc(&[e(31, 10)]), 100).is_err(),
            "inside the header"
        );
        assert!(
            decode_toc(&encode_toc(&[e(32, 10), e(41, 10)]), 100).is_err(),
            "overlap"
        );
        assert!(
            decode_toc(&encode_toc(&[e(32, 10)]), 41).is_err(),
            "past the TOC"
        );
        assert!(decode_toc(&encode_toc(&[e(u64::MAX - 5, 10)]), u64::MAX).is_err());
        let mut big = e(32, 10);
        big.raw_len = u32::MAX;
        assert!(decode_toc(&encode_toc(&[big]), 100).is_err());
        let mut enc = encode_toc(&[e(32, 10)]);
        enc.pop();
        assert!(decode_toc(&enc, 100).is_err());
        let mut enc = encode_toc(&[]);
        enc[8] = 1;
        assert!(decode_toc(&enc, 100).is_err());
    }

    #[test]
    fn append_refuses_oversized_records() {
        let mut pb = PackBuilder::in_memory(PackId([0; 16]));
        assert!(pb
            .append(ChunkId([0; 32]), &vec![0u8; MAX_SEALED_CHUNK_LEN + 1], 1)
            .is_err());
        assert!(pb
            .append(ChunkId([0; 32]), &[0u8; 40], (MAX_CHUNK_SIZE + 1) as u32)
            .is_err());
        assert!(pb.is_empty());
    }

    proptest! {
        #[test]
        fn toc_round_trip(lens in proptest::collection::vec((0u32..100_000, 0u32..1000, any::<[u8; 32]>()), 0..50)) {
            let mut off = PACK_HEADER_LEN as u64;
            let mut entries = Vec::new();
            for (len, gap, id) in lens {
                off += u64::from(gap);
                entries.push(TocEntry { chunk_id: ChunkId(id), offset: off, len, raw_len: len / 2 });
                off += u64::from(len);
            }
            prop_assert_eq!(decode_toc(&encode_toc(&entries), off).unwrap(), entries);
        }

        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300), len in 0u64..400) {
            let _ = parse_header(&data);
            let _ = parse_trailer(len, &data);
            let _ = decode_toc(&data, len);
            let _ = parse_pack(|_| [0u8; 32], &data);
        }
    }
}
