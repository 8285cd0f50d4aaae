//! Full read + compare and its helpers: chunk hashing as recorded (an
//! all-zero chunk is [`ZERO_HASH`]), the new point's hash list, the chunks a
//! delta must mark zero, and the sample check of chunks a change source
//! called unchanged.

use rand::seq::index::sample;
use tierback_format::ids::ChunkHash;

use super::{MAX_SAMPLE, ZERO_HASH};
use crate::disk::VirtualDisk;

/// BLAKE3 of a chunk, or `None` when it is all zeros.
pub fn hash_chunk(buf: &[u8]) -> Option<ChunkHash> {
    if is_zero(buf) {
        None
    } else {
        Some(ChunkHash(*blake3::hash(buf).as_bytes()))
    }
}

/// True when every byte is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let body_zero = words
        .by_ref()
        .all(|c| c.try_into().map(u128::from_ne_bytes).is_ok_and(|w| w == 0));
    body_zero && words.remainder().iter().all(|&b| b == 0)
}

/// The hash list the new point starts from before this backup's reads:
/// with only changed chunks read, the previous one cut or extended to the
/// new slot count; with every allocated chunk read, all zero.
pub fn initial_hashes(prev: Option<&[ChunkHash]>, carry: bool, slots: u64) -> Vec<ChunkHash> {
    let mut v = match (prev, carry) {
        (Some(p), true) => p.iter().take(slots as usize).copied().collect(),
        _ => Vec::new(),
    };
    v.resize(slots as usize, ZERO_HASH);
    v
}

/// Chunk numbers a delta must mark zero: non-zero before, zero now.
pub fn zeroed(prev: &[ChunkHash], new: &[ChunkHash]) -> Vec<u64> {
    prev.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (p, n))| **p != ZERO_HASH && **n == ZERO_HASH)
        .map(|(i, _)| i as u64)
        .collect()
}

/// Result of a sample check.
#[derive(Debug, Default)]
pub struct Sample {
    pub chunks: u64,
    pub bytes: u64,
    /// Chunk numbers whose content differs from the stored hash.
    pub differing: Vec<u64>,
}

/// Re-reads a random sample of allocated chunks not in `read` (max of
/// `min` and 0.1 % of the disk's chunks, at most [`MAX_SAMPLE`]) whose
/// length is the same as at the last backup (below `common_size`), and
/// compares them with `prev`.
pub fn sample_check(
    disk: &dyn VirtualDisk,
    allocated: &[u64],
    read: &[u64],
    prev: &[ChunkHash],
    cs: u64,
    common_size: u64,
    min: usize,
) -> anyhow::Result<Sample> {
    let full_chunks = common_size / cs;
    let candidates: Vec<u64> = allocated
        .iter()
        .copied()
        .filter(|n| {
            *n < full_chunks && (*n as usize) < prev.len() && read.binary_search(n).is_err()
        })
        .collect();
    let slots = disk.virtual_size().div_ceil(cs) as usize;
    let want = min.max(slots / 1000).min(MAX_SAMPLE).min(candidates.len());
    let mut out = Sample::default();
    let mut picks: Vec<u64> = sample(&mut rand::thread_rng(), candidates.len(), want)
        .into_iter()
        .map(|i| candidates[i])
        .collect();
    picks.sort_unstable();
    let mut buf = vec![0u8; cs as usize];
    for n in picks {
        disk.read_at(n * cs, &mut buf)?;
        out.chunks += 1;
        out.bytes += cs;
        let h = hash_chunk(&buf).unwrap_or(ZERO_HASH);
        if prev.get(n as usize) != Some(&h) {
            out.differing.push(n);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4099]));
        let mut b = vec![0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
        assert_eq!(hash_chunk(&[0u8; 512]), None);
    }

    #[test]
    fn hash_lists_carry_cut_and_mark_zeroed_chunks() {
        let h = |b: u8| ChunkHash([b; 32]);
        let prev = vec![h(1), ZERO_HASH, h(3), h(4)];
        assert_eq!(initial_hashes(Some(&prev), true, 2), vec![h(1), ZERO_HASH]);
        assert_eq!(
            initial_hashes(Some(&prev), true, 5),
            vec![h(1), ZERO_HASH, h(3), h(4), ZERO_HASH]
        );
        assert_eq!(initial_hashes(Some(&prev), false, 2), vec![ZERO_HASH; 2]);
        let new = vec![ZERO_HASH, h(2), h(3)];
        assert_eq!(zeroed(&prev, &new), vec![0]);
    }
}
