//! Keys and sealing: the master key, the keys derived from it, AES-256-GCM
//! sealing with associated data, and the chunk payload codec (raw, zstd, or a
//! zstd delta against a base chunk).
//!
//! Key hierarchy (HKDF-SHA256, no salt, master key as input key material; the
//! `info` strings below are frozen):
//!
//! | key | info |
//! |---|---|
//! | id key (keyed chunk ids) | `tierback/v1/chunk-id` |
//! | pack key | `tierback/v1/pack` ‖ pack id (16 bytes) |
//! | index key | `tierback/v1/index` |
//! | other subkeys | `tierback/v1/subkey/` ‖ label (UTF-8) |
//! | key fingerprint | `tierback/v1/fingerprint` (first 8 bytes shown as hex) |
//!
//! A sealed object is `nonce (12) ‖ ciphertext ‖ tag (16)`, with a random nonce
//! per object and associated data `FORMAT_VERSION ‖ object type ‖ object id`
//! (see [`crate::magic::ObjectType`]), so an object moved to another place,
//! swapped with another one or replayed under another id fails to open.
//!
//! This module never logs, never touches files, and never prints key material
//! (the `Debug` of [`MasterKey`] is redacted).

use std::fmt;

use hkdf::Hkdf;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::Sha256;

use crate::ids::{ChunkHash, ChunkId, PackId, PointId};
use crate::magic::{
    ObjectType, CHUNK_CODEC_DELTA, CHUNK_CODEC_RAW, CHUNK_CODEC_ZSTD, FORMAT_VERSION,
    MAX_CHUNK_SIZE,
};

/// Length of the random AES-GCM nonce at the start of a sealed object.
pub const NONCE_LEN: usize = 12;
/// Length of the AES-GCM tag at the end of a sealed object.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed object adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Largest sealed chunk record [`open_chunk`] accepts: a raw (uncompressible)
/// payload of [`MAX_CHUNK_SIZE`] plus its flag byte plus the seal overhead.
pub const MAX_SEALED_CHUNK_LEN: usize = MAX_CHUNK_SIZE + 1 + SEAL_OVERHEAD;

/// Errors opening sealed objects and chunk payloads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// Shorter than nonce + tag.
    #[error("sealed object too short ({len} bytes)")]
    Truncated {
        /// Length of the input.
        len: usize,
    },
    /// The AES-GCM tag did not verify.
    #[error("authentication failed: wrong key, or the object is damaged, swapped or replayed")]
    Auth,
    /// Larger than any valid object of its kind; refused before allocating.
    #[error("object of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Length of the input (or of its declared output).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The decrypted chunk payload is malformed (unknown codec, bad zstd frame).
    #[error("malformed chunk payload: {0}")]
    BadPayload(String),
    /// The chunk decrypted and decompressed, but its content does not hash to
    /// its id.
    #[error("chunk content does not match its id {expected} (content gives {actual})")]
    IdMismatch {
        /// The id the chunk was stored under.
        expected: ChunkId,
        /// The id its content hashes to.
        actual: ChunkId,
    },
}

/// The tenant's 256-bit master key. Every other key is derived from it; it is
/// stored only wrapped (see [`crate::keyfile`]). `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// Wraps raw key bytes (e.g. just unwrapped from a key file).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
        Self(k)
    }

    /// The raw key bytes (for wrapping only).
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Key of the keyed chunk-id hash ([`ChunkId::derive`]).
    pub fn id_key(&self) -> [u8; 32] {
        hkdf_sha256(&self.0, &[b"tierback/v1/chunk-id"])
    }

    /// Data key of one pack: seals its chunk records and its TOC.
    pub fn pack_key(&self, pack: &PackId) -> [u8; 32] {
        hkdf_sha256(&self.0, &[b"tierback/v1/pack", &pack.0])
    }

    /// Key sealing disk indexes.
    pub fn index_key(&self) -> [u8; 32] {
        hkdf_sha256(&self.0, &[b"tierback/v1/index"])
    }

    /// A key for any other purpose, named by `label` (e.g. `"token-hash"`,
    /// `"manifest"`). Labels live in their own namespace
    /// (`tierback/v1/subkey/<label>`), so no label yields one of the keys above.
    pub fn subkey(&self, label: &str) -> [u8; 32] {
        hkdf_sha256(&self.0, &[b"tierback/v1/subkey/", label.as_bytes()])
    }

    /// A short public fingerprint (16 hex characters) that names this key in
    /// key files and logs without revealing it.
    pub fn fingerprint(&self) -> String {
        let fp = hkdf_sha256(&self.0, &[b"tierback/v1/fingerprint"]);
        hex::encode(&fp[..8])
    }
}

/// HKDF-SHA256 (no salt) of `ikm` with `info` = concatenation of `info_parts`.
pub(crate) fn hkdf_sha256(ikm: &[u8], info_parts: &[&[u8]]) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(None, ikm);
    let mut okm = [0u8; 32];
    // expand_multi_info only fails when asking for more than 255 × 32 bytes.
    if hk.expand_multi_info(info_parts, &mut okm).is_err() {
        unreachable!("HKDF-SHA256 can always produce 32 bytes");
    }
    okm
}

/// Associated data of a sealed object: `FORMAT_VERSION ‖ type ‖ id parts…`.
pub fn associated_data(kind: ObjectType, id_parts: &[&[u8]]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(2 + id_parts.iter().map(|p| p.len()).sum::<usize>());
    ad.push(FORMAT_VERSION);
    ad.push(kind.as_byte());
    for p in id_parts {
        ad.extend_from_slice(p);
    }
    ad
}

/// Associated data of a chunk record: binds pack id and chunk id.
pub fn chunk_ad(pack: &PackId, chunk: &ChunkId) -> Vec<u8> {
    associated_data(ObjectType::Chunk, &[&pack.0, &chunk.0])
}

/// Associated data of a pack's TOC: binds the pack id.
pub fn toc_ad(pack: &PackId) -> Vec<u8> {
    associated_data(ObjectType::Toc, &[&pack.0])
}

/// Associated data of a disk index: binds point id and stream number (u32 LE).
pub fn index_ad(point: &PointId, stream_no: u32) -> Vec<u8> {
    associated_data(ObjectType::Index, &[&point.0, &stream_no.to_le_bytes()])
}

/// Associated data of a recovery-point manifest: binds the point id.
pub fn manifest_ad(point: &PointId) -> Vec<u8> {
    associated_data(ObjectType::Manifest, &[&point.0])
}

/// Seals `plaintext` under `key` with AES-256-GCM and a random nonce, binding
/// `ad`. Output: `nonce ‖ ciphertext ‖ tag` (`plaintext.len() + SEAL_OVERHEAD`
/// bytes).
pub fn seal(key: &[u8; 32], ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    seal_with_nonce(key, &random_nonce(), ad, plaintext)
}

fn seal_with_nonce(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = SealBuf::from_payload(plaintext).0;
    seal_in_place(key, nonce, ad, &mut out);
    out
}

/// Seals `buf = (NONCE_LEN bytes of room) ‖ plaintext` in place: the nonce
/// goes into the room, the plaintext is encrypted where it lies, the tag is
/// appended.
fn seal_in_place(key: &[u8; 32], nonce: &[u8; NONCE_LEN], ad: &[u8], buf: &mut Vec<u8>) {
    buf[..NONCE_LEN].copy_from_slice(nonce);
    let tag = aead_key(key)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(ad),
            &mut buf[NONCE_LEN..],
        )
        // Only fails above 64 GiB of plaintext; every caller seals bounded objects.
        .expect("AES-GCM plaintext under 64 GiB");
    buf.extend_from_slice(tag.as_ref());
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    nonce
}

/// AES-256-GCM (ring's implementation: AES-NI/VAES and carry-less multiply).
fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is always valid for AES-256-GCM.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key"))
}

/// Opens an object made by [`seal`] with the same key and associated data.
/// Any change to key, `ad` or any byte of `sealed` gives [`CryptoError::Auth`]
/// (or `Truncated`), never a panic.
pub fn open(key: &[u8; 32], ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(CryptoError::Truncated { len: sealed.len() });
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Auth)?;
    let mut buf = rest.to_vec();
    let plain_len = aead_key(key)
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(ad), &mut buf)
        .map_err(|_| CryptoError::Auth)?
        .len();
    buf.truncate(plain_len);
    Ok(buf)
}

/// Encodes a chunk's plaintext as a payload: `CHUNK_CODEC_ZSTD ‖ zstd frame`
/// when that is smaller than the plaintext, else `CHUNK_CODEC_RAW ‖ plaintext`.
/// Independent of any pack, so the costly part of sealing can run before the
/// chunk's pack is known.
pub fn encode_chunk_payload(plaintext: &[u8], zstd_level: i32) -> Vec<u8> {
    encode_after(Vec::new(), plaintext, zstd_level, 0)
}

/// Appends the payload of `plaintext` (see [`encode_chunk_payload`]) to
/// `out`, with `spare` bytes of capacity left after it. zstd writes its
/// frame straight behind the codec byte: no copy of the compressed data.
fn encode_after(mut out: Vec<u8>, plaintext: &[u8], level: i32, spare: usize) -> Vec<u8> {
    let start = out.len();
    out.reserve(1 + zstd::zstd_safe::compress_bound(plaintext.len()) + spare);
    out.push(CHUNK_CODEC_ZSTD);
    let mut cursor = std::io::Cursor::new(out);
    cursor.set_position((start + 1) as u64);
    let compressed = compress_into(plaintext, level, &mut cursor);
    let mut out = cursor.into_inner();
    match compressed {
        Ok(n) if n < plaintext.len() => out,
        _ => {
            out.truncate(start);
            out.push(CHUNK_CODEC_RAW);
            out.extend_from_slice(plaintext);
            out
        }
    }
}

/// A chunk payload laid out for sealing in place: room for the nonce in
/// front and for the tag behind ([`encode_chunk_for_seal`],
/// [`seal_chunk_in_place`]).
pub struct SealBuf(Vec<u8>);

impl SealBuf {
    /// A copy of an encoded `payload` (e.g. a delta's), ready for sealing
    /// (any plaintext, for [`seal`]).
    pub fn from_payload(payload: &[u8]) -> SealBuf {
        let mut v = Vec::with_capacity(payload.len() + SEAL_OVERHEAD);
        v.resize(NONCE_LEN, 0);
        v.extend_from_slice(payload);
        SealBuf(v)
    }

    /// The encoded payload.
    pub fn payload(&self) -> &[u8] {
        self.0.get(NONCE_LEN..).unwrap_or_default()
    }
}

/// [`encode_chunk_payload`] into a [`SealBuf`]: the payload that
/// [`seal_chunk_in_place`] then seals without copying it again.
pub fn encode_chunk_for_seal(plaintext: &[u8], zstd_level: i32) -> SealBuf {
    SealBuf(encode_after(
        vec![0; NONCE_LEN],
        plaintext,
        zstd_level,
        TAG_LEN,
    ))
}

/// Seals an encoded payload as the chunk record of `chunk` in `pack`, in its
/// own buffer: the same record as [`seal_chunk_payload`] makes.
pub fn seal_chunk_in_place(
    pack_key: &[u8; 32],
    pack: &PackId,
    chunk: &ChunkId,
    buf: SealBuf,
) -> Vec<u8> {
    let mut out = buf.0;
    seal_in_place(pack_key, &random_nonce(), &chunk_ad(pack, chunk), &mut out);
    out
}

/// Turns the record of `chunk` sealed for pack `from` into its record for
/// pack `to`, in place (opened, then sealed again with a fresh nonce). A
/// record that does not open under `from` is [`CryptoError::Auth`].
pub fn reseal_chunk(
    from: (&[u8; 32], &PackId),
    to: (&[u8; 32], &PackId),
    chunk: &ChunkId,
    mut sealed: Vec<u8>,
) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(CryptoError::Truncated { len: sealed.len() });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[..NONCE_LEN]);
    let plain_len = aead_key(from.0)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(chunk_ad(from.1, chunk)),
            &mut sealed[NONCE_LEN..],
        )
        .map_err(|_| CryptoError::Auth)?
        .len();
    sealed.truncate(NONCE_LEN + plain_len);
    seal_in_place(to.0, &random_nonce(), &chunk_ad(to.1, chunk), &mut sealed);
    Ok(sealed)
}

/// zstd into `dst` (after its cursor) with one compression context per
/// thread, reused: a fresh context per chunk costs an allocation (and page
/// faults) of its tables every time. Returns the frame's length.
fn compress_into(
    plaintext: &[u8],
    level: i32,
    dst: &mut std::io::Cursor<Vec<u8>>,
) -> std::io::Result<usize> {
    thread_local! {
        static CCTX: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match slot.as_mut() {
            Some((_, c)) => c.compress_to_buffer(plaintext, dst),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

/// zstd frame to plaintext of at most [`MAX_CHUNK_SIZE`] bytes, with one
/// decompression context per thread, reused (a fresh context per chunk was
/// 1 % of the gateway's CPU in an incremental backup that decodes a base per
/// changed chunk, and allocates its tables every time).
fn decompress(frame: &[u8]) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(frame, MAX_CHUNK_SIZE),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

/// Granularity of a delta: 4 KiB blocks at the same offsets in chunk and
/// base (a disk write changes whole sectors in place).
pub const DELTA_BLOCK: usize = 4096;

/// Encodes a chunk's plaintext as a delta against `base` (the plaintext of
/// the chunk stored under `base_id`, itself not a delta):
///
/// `CHUNK_CODEC_DELTA ‖ base_id (32) ‖ chunk length u32 LE ‖ bitmap ‖
/// inner payload`, where bit i of the bitmap (LSB first, ⌈blocks/8⌉ bytes)
/// says 4 KiB block i differs from the base's block i (or lies beyond the
/// base), and the inner payload is [`encode_chunk_payload`] of those blocks
/// concatenated. A scattered 64 KiB write costs ~64 KiB before compression
/// instead of the whole chunk, found by comparing memory, with no hash table
/// over the base. Falls back to [`encode_chunk_payload`] when the delta is
/// not smaller than the plaintext (so the payload never exceeds the bound of
/// [`MAX_SEALED_CHUNK_LEN`]).
pub fn encode_delta_payload(
    plaintext: &[u8],
    base_id: &ChunkId,
    base: &[u8],
    zstd_level: i32,
) -> Vec<u8> {
    let blocks = plaintext.len().div_ceil(DELTA_BLOCK);
    let mut bitmap = vec![0u8; blocks.div_ceil(8)];
    let mut changed = Vec::new();
    for (i, block) in plaintext.chunks(DELTA_BLOCK).enumerate() {
        let at = i * DELTA_BLOCK;
        if base.get(at..at + block.len()) != Some(block) {
            bitmap[i / 8] |= 1 << (i % 8);
            changed.extend_from_slice(block);
        }
    }
    // Mostly changed: a plain chunk decodes without reading the base.
    if changed.len() * 2 > plaintext.len() {
        return encode_chunk_payload(plaintext, zstd_level);
    }
    let inner = encode_chunk_payload(&changed, zstd_level);
    let len = 1 + ChunkId::LEN + 4 + bitmap.len() + inner.len();
    if len >= plaintext.len() {
        return encode_chunk_payload(plaintext, zstd_level);
    }
    let mut out = Vec::with_capacity(len);
    out.push(CHUNK_CODEC_DELTA);
    out.extend_from_slice(&base_id.0);
    out.extend_from_slice(&(plaintext.len() as u32).to_le_bytes());
    out.extend_from_slice(&bitmap);
    out.extend_from_slice(&inner);
    out
}

/// The base chunk a payload is a delta against, or `None` for a raw or zstd
/// payload (which [`decode_chunk_payload`] decodes alone).
pub fn payload_delta_base(payload: &[u8]) -> Result<Option<ChunkId>, CryptoError> {
    match payload.split_first() {
        Some((&CHUNK_CODEC_DELTA, rest)) => rest
            .get(..ChunkId::LEN)
            .and_then(|b| ChunkId::from_slice(b).ok())
            .map(Some)
            .ok_or_else(|| CryptoError::BadPayload("delta payload without its base id".into())),
        _ => Ok(None),
    }
}

/// Decodes a payload of [`encode_delta_payload`] given the plaintext of its
/// base (see [`payload_delta_base`]); other payloads as
/// [`decode_chunk_payload`] (ignoring `base`). Never produces more than
/// [`MAX_CHUNK_SIZE`] bytes; a bitmap that does not match the data, or
/// names a base block the base lacks, is an error.
pub fn decode_delta_payload(payload: &[u8], base: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let Some((&CHUNK_CODEC_DELTA, rest)) = payload.split_first() else {
        return decode_chunk_payload(payload);
    };
    let bad = |what: &str| CryptoError::BadPayload(format!("delta payload: {what}"));
    let head = rest
        .get(..ChunkId::LEN + 4)
        .ok_or_else(|| bad("truncated header"))?;
    let mut l = [0u8; 4];
    l.copy_from_slice(&head[ChunkId::LEN..]);
    let len = u32::from_le_bytes(l) as usize;
    if len > MAX_CHUNK_SIZE {
        return Err(CryptoError::TooLarge {
            len,
            max: MAX_CHUNK_SIZE,
        });
    }
    let blocks = len.div_ceil(DELTA_BLOCK);
    let rest = &rest[ChunkId::LEN + 4..];
    let bitmap = rest
        .get(..blocks.div_ceil(8))
        .ok_or_else(|| bad("truncated bitmap"))?;
    let changed = decode_chunk_payload(&rest[bitmap.len()..])?;
    compose_blocks(base, len, bitmap, &changed).map_err(|e| {
        bad(match e {
            ComposeError::Short => "fewer changed bytes than the bitmap names",
            ComposeError::BeyondBase => "names a block beyond its base",
            ComposeError::Long => "more changed bytes than the bitmap names",
        })
    })
}

/// Why [`compose_blocks`] cannot build a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComposeError {
    /// Fewer changed bytes (or bitmap bytes) than the bitmap names.
    Short,
    /// An unchanged block lies beyond the base.
    BeyondBase,
    /// More changed bytes than the bitmap names.
    Long,
}

/// Builds a chunk of `len` bytes from [`DELTA_BLOCK`] blocks: block i from
/// `changed` (in order; the last block may be short) where bit i of
/// `bitmap` (LSB first) is set, from `base` at the same offset otherwise.
/// The block layout of delta payloads and of patch uploads
/// (`wire::CHUNK_RECORD_PATCH_FLAG`).
pub fn compose_blocks(
    base: &[u8],
    len: usize,
    bitmap: &[u8],
    changed: &[u8],
) -> Result<Vec<u8>, ComposeError> {
    let blocks = len.div_ceil(DELTA_BLOCK);
    if bitmap.len() < blocks.div_ceil(8) {
        return Err(ComposeError::Short);
    }
    let mut out = Vec::with_capacity(len);
    let mut next = 0usize;
    for i in 0..blocks {
        let at = i * DELTA_BLOCK;
        let n = DELTA_BLOCK.min(len - at);
        let src = if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            let b = changed.get(next..next + n).ok_or(ComposeError::Short)?;
            next += n;
            b
        } else {
            base.get(at..at + n).ok_or(ComposeError::BeyondBase)?
        };
        out.extend_from_slice(src);
    }
    if next != changed.len() {
        return Err(ComposeError::Long);
    }
    Ok(out)
}

/// Decodes a payload from [`encode_chunk_payload`], never producing (or
/// allocating for) more than [`MAX_CHUNK_SIZE`] bytes. A delta payload is
/// refused: it needs its base ([`decode_delta_payload`]).
pub fn decode_chunk_payload(payload: &[u8]) -> Result<Vec<u8>, CryptoError> {
    match payload.split_first() {
        Some((&CHUNK_CODEC_DELTA, _)) => Err(CryptoError::BadPayload(
            "a delta payload cannot be decoded without its base chunk".into(),
        )),
        None => Err(CryptoError::BadPayload("empty payload".into())),
        Some((&CHUNK_CODEC_RAW, raw)) => {
            if raw.len() > MAX_CHUNK_SIZE {
                return Err(CryptoError::TooLarge {
                    len: raw.len(),
                    max: MAX_CHUNK_SIZE,
                });
            }
            Ok(raw.to_vec())
        }
        Some((&CHUNK_CODEC_ZSTD, z)) => {
            if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(z) {
                if declared > MAX_CHUNK_SIZE as u64 {
                    return Err(CryptoError::TooLarge {
                        len: usize::try_from(declared).unwrap_or(usize::MAX),
                        max: MAX_CHUNK_SIZE,
                    });
                }
            }
            // Capacity is min(declared size, MAX_CHUNK_SIZE); output beyond it is an error.
            decompress(z).map_err(|e| CryptoError::BadPayload(format!("zstd: {e}")))
        }
        Some((flag, _)) => Err(CryptoError::BadPayload(format!(
            "unknown codec flag {flag}"
        ))),
    }
}

/// Seals an encoded chunk payload as the chunk record of `chunk` in `pack`.
pub fn seal_chunk_payload(
    pack_key: &[u8; 32],
    pack: &PackId,
    chunk: &ChunkId,
    payload: &[u8],
) -> Vec<u8> {
    seal(pack_key, &chunk_ad(pack, chunk), payload)
}

/// Compresses (or stores raw) and seals one chunk as a record of `pack`.
/// The plaintext must not exceed [`MAX_CHUNK_SIZE`]: larger chunks would seal
/// but never open.
pub fn seal_chunk(
    pack_key: &[u8; 32],
    pack: &PackId,
    chunk: &ChunkId,
    plaintext: &[u8],
    zstd_level: i32,
) -> Vec<u8> {
    seal_chunk_payload(
        pack_key,
        pack,
        chunk,
        &encode_chunk_payload(plaintext, zstd_level),
    )
}

/// Opens a chunk record: checks the tag (bound to `pack` and `chunk`),
/// decompresses within [`MAX_CHUNK_SIZE`]. Does NOT check the content against
/// the id; see [`open_chunk_verified`].
pub fn open_chunk(
    pack_key: &[u8; 32],
    pack: &PackId,
    chunk: &ChunkId,
    sealed: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() > MAX_SEALED_CHUNK_LEN {
        return Err(CryptoError::TooLarge {
            len: sealed.len(),
            max: MAX_SEALED_CHUNK_LEN,
        });
    }
    let payload = open(pack_key, &chunk_ad(pack, chunk), sealed)?;
    decode_chunk_payload(&payload)
}

/// [`open_chunk`], then checks `ChunkId::derive(id_key, blake3(plaintext)) ==
/// chunk`, so the caller gets exactly the chunk it asked for or an error.
pub fn open_chunk_verified(
    pack_key: &[u8; 32],
    pack: &PackId,
    chunk: &ChunkId,
    sealed: &[u8],
    id_key: &[u8; 32],
) -> Result<Vec<u8>, CryptoError> {
    let plain = open_chunk(pack_key, pack, chunk, sealed)?;
    let actual = ChunkId::derive(id_key, &ChunkHash::of(&plain));
    if actual != *chunk {
        return Err(CryptoError::IdMismatch {
            expected: *chunk,
            actual,
        });
    }
    Ok(plain)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn test_master() -> MasterKey {
        MasterKey::from_bytes(std::array::from_fn(|i| i as u8))
    }

    /// 1 MiB of varied, compressible text-like bytes.
    fn sample_chunk(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..1 << 20)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 7 == 0 {
                    b' '
                } else {
                    b'a' + (x % 26) as u8
                }
            })
            .collect()
    }

    #[test]
    fn delta_payload_round_trips_and_is_small_for_a_small_change() {
        let base = sample_chunk(1);
        let mut new = base.clone();
        // One scattered 64 KiB write of other content, not block aligned.
        new[300_000..300_000 + 65_536].copy_from_slice(&sample_chunk(2)[..65_536]);
        let base_id = ChunkId([7; 32]);
        let payload = encode_delta_payload(&new, &base_id, &base, 3);
        assert_eq!(payload[0], CHUNK_CODEC_DELTA);
        assert_eq!(payload_delta_base(&payload).unwrap(), Some(base_id));
        let plain = encode_chunk_payload(&new, 3);
        assert!(
            payload.len() * 4 < plain.len(),
            "delta {} bytes, plain zstd {} bytes",
            payload.len(),
            plain.len()
        );
        assert_eq!(decode_delta_payload(&payload, &base).unwrap(), new);
        // Without its base it does not decode; with another base it does
        // not give the chunk back.
        assert!(decode_chunk_payload(&payload).is_err());
        let other = sample_chunk(3);
        assert_ne!(
            decode_delta_payload(&payload, &other).ok(),
            Some(new.clone())
        );
    }

    #[test]
    fn delta_falls_back_when_most_changed_and_refuses_bad_bitmaps() {
        // Everything differs: stored as a plain chunk.
        let base = sample_chunk(5);
        let new = sample_chunk(6);
        let p = encode_delta_payload(&new, &ChunkId([1; 32]), &base, 3);
        assert_ne!(p[0], CHUNK_CODEC_DELTA);
        assert_eq!(payload_delta_base(&p).unwrap(), None);
        assert_eq!(decode_delta_payload(&p, &base).unwrap(), new);
        // A chunk longer than its base (a grown last chunk): the blocks
        // beyond the base travel in the delta.
        let short = base[..100_000].to_vec();
        let mut new = base[..110_000].to_vec();
        new[5] ^= 1;
        let p = encode_delta_payload(&new, &ChunkId([2; 32]), &short, 3);
        assert_eq!(p[0], CHUNK_CODEC_DELTA);
        assert_eq!(decode_delta_payload(&p, &short).unwrap(), new);
        // ... and a base too short for the blocks it should supply fails.
        assert!(decode_delta_payload(&p, &short[..50_000]).is_err());
        // Damaged payloads are errors, not panics.
        assert!(payload_delta_base(&p[..10]).is_err());
        for cut in [1, 20, 33, 37, 40, p.len() - 1] {
            assert!(
                decode_delta_payload(&p[..cut], &short).is_err(),
                "cut {cut}"
            );
        }
        let mut flipped = p.clone();
        flipped[1 + 32 + 4] ^= 0x80; // one more block named in the bitmap
        assert!(decode_delta_payload(&flipped, &short).is_err());
        let mut huge = p.clone();
        huge[33..37].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_delta_payload(&huge, &short).is_err());
    }

    proptest! {
        #[test]
        fn delta_round_trips_any_edit(
            seed in 0u64..1000,
            len in 1usize..200_000,
            base_len in 0usize..200_000,
            edits in proptest::collection::vec((0usize..200_000, 1usize..9000, any::<u8>()), 0..6),
        ) {
            let base: Vec<u8> = sample_chunk(seed)[..base_len].to_vec();
            let mut new: Vec<u8> = sample_chunk(seed)[..len].to_vec();
            for (at, n, v) in edits {
                let at = at % len;
                let end = (at + n).min(len);
                new[at..end].iter_mut().for_each(|b| *b = v);
            }
            let p = encode_delta_payload(&new, &ChunkId([3; 32]), &base, 1);
            prop_assert_eq!(decode_delta_payload(&p, &base).unwrap(), new);
        }
    }

    #[test]
    fn key_derivation_known_answers() {
        // Cross-checked independently with Python (hmac/hashlib HKDF-SHA256, salt = 32 zero bytes).
        let m = test_master();
        assert_eq!(hex::encode(m.id_key()), KAT_ID_KEY);
        assert_eq!(hex::encode(m.pack_key(&PackId([0xaa; 16]))), KAT_PACK_KEY);
        assert_eq!(hex::encode(m.index_key()), KAT_INDEX_KEY);
        assert_eq!(hex::encode(m.subkey("token-hash")), KAT_SUBKEY);
        assert_eq!(m.fingerprint(), KAT_FINGERPRINT);
    }
    const KAT_ID_KEY: &str = "b84eed496dd7f221c37d01a5c04f56b19fd05548cd7117b1a702191ba0af6425";
    const KAT_PACK_KEY: &str = "79681d8bcbdac593d12145afa16432a49a36e1cdc5398aa6884244e48e14549c";
    const KAT_INDEX_KEY: &str = "cfadf0db7294d94fb9974fd6b9cb461e73372b69682bec299f7041839b86161e";
    const KAT_SUBKEY: &str = "10cc32357d4ff75377bdfe7fb7de89ec77905dccc10372e435f5e55c1da3ec28";
    const KAT_FINGERPRINT: &str = "5900250daee8ab45";

    #[test]
    fn derived_keys_are_distinct() {
        let m = test_master();
        let keys = [
            m.id_key(),
            m.index_key(),
            m.pack_key(&PackId([0; 16])),
            m.pack_key(&PackId([1; 16])),
            m.subkey("chunk-id"),
            m.subkey("index"),
            *m.as_bytes(),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let m = MasterKey::from_bytes([0x5a; 32]);
        let dbg = format!("{m:?}");
        assert!(!dbg.contains("5a") && !dbg.contains("90"), "{dbg}");
    }

    #[test]
    fn seal_known_answer_with_fixed_nonce() {
        // Pins the layout nonce ‖ ct ‖ tag and the AD encoding; expected bytes from
        // Python's `cryptography` AESGCM with the same key, nonce and AD.
        let key = [7u8; 32];
        let sealed = seal_with_nonce(&key, &[9u8; 12], &toc_ad(&PackId([1; 16])), b"hello");
        assert_eq!(&sealed[..12], &[9u8; 12]);
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(hex::encode(&sealed[12..]), KAT_SEALED_HELLO);
        assert_eq!(
            open(&key, &toc_ad(&PackId([1; 16])), &sealed).unwrap(),
            b"hello"
        );
    }
    const KAT_SEALED_HELLO: &str = "4fe0e8f8d1a696e6bdcbf1b735b64b6dec1e01e9ea";

    #[test]
    fn chunks_sealed_in_place_open_like_any_record_and_reseal_for_another_pack() {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let (p1, p2) = (PackId([1; 16]), PackId([2; 16]));
        let chunk = ChunkId([5; 32]);
        let text: Vec<u8> = (0..300_000u32)
            .flat_map(|i| format!("line {} of the log\n", i % 977).into_bytes())
            .take(1 << 20)
            .collect();
        let mut noise = vec![0u8; 200_000];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut noise);
        for plain in [&text[..], &noise[..], b"", b"x"] {
            let buf = encode_chunk_for_seal(plain, 1);
            // The same payload as the copying encoder makes.
            assert_eq!(buf.payload(), &encode_chunk_payload(plain, 1)[..]);
            let payload_len = buf.payload().len();
            let sealed = seal_chunk_in_place(&k1, &p1, &chunk, buf);
            assert_eq!(sealed.len(), payload_len + SEAL_OVERHEAD);
            assert_eq!(open_chunk(&k1, &p1, &chunk, &sealed).unwrap(), plain);

            let moved = reseal_chunk((&k1, &p1), (&k2, &p2), &chunk, sealed.clone()).unwrap();
            assert_eq!(moved.len(), sealed.len());
            assert_ne!(moved[..NONCE_LEN], sealed[..NONCE_LEN], "fresh nonce");
            assert_eq!(open_chunk(&k2, &p2, &chunk, &moved).unwrap(), plain);
            assert!(matches!(
                open_chunk(&k1, &p1, &chunk, &moved),
                Err(CryptoError::Auth)
            ));

            // A record that does not open where it is said to come from is
            // refused, not sealed anew.
            let mut bad = sealed.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(matches!(
                reseal_chunk((&k1, &p1), (&k2, &p2), &chunk, bad),
                Err(CryptoError::Auth)
            ));
            assert!(matches!(
                reseal_chunk((&k2, &p1), (&k2, &p2), &chunk, sealed),
                Err(CryptoError::Auth)
            ));
        }
        assert!(matches!(
            reseal_chunk((&k1, &p1), (&k2, &p2), &chunk, vec![0; 5]),
            Err(CryptoError::Truncated { len: 5 })
        ));
        // A delta payload copied into a seal buffer seals the same way.
        let d = encode_delta_payload(&text, &ChunkId([9; 32]), &text, 1);
        let buf = SealBuf::from_payload(&d);
        assert_eq!(
            payload_delta_base(buf.payload()).unwrap(),
            Some(ChunkId([9; 32]))
        );
        let sealed = seal_chunk_in_place(&k1, &p1, &chunk, buf);
        assert_eq!(open(&k1, &chunk_ad(&p1, &chunk), &sealed).unwrap(), d);
    }

    #[test]
    fn ad_layout() {
        let ad = index_ad(&PointId([3; 16]), 0x0102_0304);
        assert_eq!(ad[0], FORMAT_VERSION);
        assert_eq!(ad[1], ObjectType::Index.as_byte());
        assert_eq!(&ad[2..18], &[3u8; 16]);
        assert_eq!(&ad[18..], &[4, 3, 2, 1]);
        assert_eq!(
            manifest_ad(&PointId([3; 16]))[1],
            ObjectType::Manifest.as_byte()
        );
        assert_eq!(
            chunk_ad(&PackId([1; 16]), &ChunkId([2; 32])).len(),
            2 + 16 + 32
        );
    }

    #[test]
    fn every_flipped_byte_fails_to_open() {
        let key = [1u8; 32];
        let ad = toc_ad(&PackId([2; 16]));
        let sealed = seal(&key, &ad, b"some table of contents");
        for i in 0..sealed.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = sealed.clone();
                bad[i] ^= bit;
                assert_eq!(open(&key, &ad, &bad), Err(CryptoError::Auth), "byte {i}");
            }
        }
        for n in 0..SEAL_OVERHEAD {
            assert!(open(&key, &ad, &sealed[..n]).is_err());
        }
        assert!(open(&key, &ad, &sealed[..sealed.len() - 1]).is_err());
        assert!(open(&[2u8; 32], &ad, &sealed).is_err());
        assert!(open(&key, &toc_ad(&PackId([3; 16])), &sealed).is_err());
        assert!(open(&key, &manifest_ad(&PointId([2; 16])), &sealed).is_err());
    }

    #[test]
    fn chunk_round_trip_compressible_and_raw() {
        let m = test_master();
        let pack = PackId([4; 16]);
        let key = m.pack_key(&pack);
        let id_key = m.id_key();

        let zeros = vec![0u8; 1 << 20];
        let id = ChunkId::of_data(&id_key, &zeros);
        let sealed = seal_chunk(&key, &pack, &id, &zeros, 3);
        assert!(
            sealed.len() < 10_000,
            "zeros must compress: {}",
            sealed.len()
        );
        assert_eq!(
            open_chunk_verified(&key, &pack, &id, &sealed, &id_key).unwrap(),
            zeros
        );

        let mut noise = vec![0u8; 65_536];
        blake3::Hasher::new()
            .update(b"seed")
            .finalize_xof()
            .fill(&mut noise);
        let id = ChunkId::of_data(&id_key, &noise);
        let sealed = seal_chunk(&key, &pack, &id, &noise, 3);
        assert_eq!(
            sealed.len(),
            noise.len() + 1 + SEAL_OVERHEAD,
            "noise is stored raw"
        );
        assert_eq!(
            open_chunk_verified(&key, &pack, &id, &sealed, &id_key).unwrap(),
            noise
        );

        let empty_id = ChunkId::of_data(&id_key, b"");
        let sealed = seal_chunk(&key, &pack, &empty_id, b"", 3);
        assert_eq!(
            open_chunk_verified(&key, &pack, &empty_id, &sealed, &id_key).unwrap(),
            b""
        );
    }

    #[test]
    fn swapped_chunk_records_fail() {
        let m = test_master();
        let (p1, p2) = (PackId([1; 16]), PackId([2; 16]));
        let (a, b) = (ChunkId([0xa; 32]), ChunkId([0xb; 32]));
        let rec = seal_chunk(&m.pack_key(&p1), &p1, &a, b"data of a", 3);
        assert!(open_chunk(&m.pack_key(&p1), &p1, &a, &rec).is_ok());
        // Same pack, other chunk's slot.
        assert_eq!(
            open_chunk(&m.pack_key(&p1), &p1, &b, &rec),
            Err(CryptoError::Auth)
        );
        // Moved to another pack (with that pack's key, or with the right key but wrong AD).
        assert_eq!(
            open_chunk(&m.pack_key(&p2), &p2, &a, &rec),
            Err(CryptoError::Auth)
        );
        assert_eq!(
            open_chunk(&m.pack_key(&p1), &p2, &a, &rec),
            Err(CryptoError::Auth)
        );
    }

    #[test]
    fn verified_open_rejects_content_not_matching_id() {
        let m = test_master();
        let p = PackId([1; 16]);
        let claimed = ChunkId([0xc; 32]);
        // Sealed under the claimed id (e.g. by a buggy writer) but with other content.
        let rec = seal_chunk(&m.pack_key(&p), &p, &claimed, b"not the content", 3);
        assert!(matches!(
            open_chunk_verified(&m.pack_key(&p), &p, &claimed, &rec, &m.id_key()),
            Err(CryptoError::IdMismatch { .. })
        ));
    }

    #[test]
    fn hostile_payloads_are_bounded() {
        // A real zstd frame of MAX_CHUNK_SIZE + 1 zero bytes: declared too large.
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_CHUNK_SIZE + 1], 1).unwrap();
        let mut payload = vec![CHUNK_CODEC_ZSTD];
        payload.extend_from_slice(&bomb);
        assert!(matches!(
            decode_chunk_payload(&payload),
            Err(CryptoError::TooLarge { .. })
        ));

        // Same bomb with the content size hidden (streamed frame): output bound hits.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &vec![0u8; MAX_CHUNK_SIZE + 1]).unwrap();
        let streamed = enc.finish().unwrap();
        let mut payload = vec![CHUNK_CODEC_ZSTD];
        payload.extend_from_slice(&streamed);
        assert!(decode_chunk_payload(&payload).is_err());

        assert!(decode_chunk_payload(&[]).is_err());
        assert!(decode_chunk_payload(&[9, 1, 2]).is_err());
        assert!(decode_chunk_payload(&[CHUNK_CODEC_ZSTD, 1, 2, 3]).is_err());
        let big = vec![0u8; MAX_SEALED_CHUNK_LEN + 1];
        assert!(matches!(
            open_chunk(&[0; 32], &PackId([0; 16]), &ChunkId([0; 32]), &big),
            Err(CryptoError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(data in proptest::collection::vec(any::<u8>(), 0..4096),
                                ad in proptest::collection::vec(any::<u8>(), 0..64),
                                key in proptest::array::uniform32(any::<u8>())) {
            let sealed = seal(&key, &ad, &data);
            prop_assert_eq!(open(&key, &ad, &sealed).unwrap(), data);
        }

        #[test]
        fn chunk_payload_round_trip(data in proptest::collection::vec(0u8..4, 0..20_000), level in 1i32..6) {
            let p = encode_chunk_payload(&data, level);
            prop_assert!(p.len() <= data.len() + 1);
            prop_assert_eq!(decode_chunk_payload(&p).unwrap(), data);
        }

        #[test]
        fn decode_payload_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_chunk_payload(&data);
        }
    }
}
