//! Byte ranges `(offset, len)` of a virtual disk: merging, intersecting.

/// Sorts `ranges`, drops empty ones and merges overlapping or adjacent ones.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (off, len) in ranges {
        let end = off.saturating_add(len);
        if let Some(last) = out.last_mut() {
            let last_end = last.0 + last.1;
            if off <= last_end {
                if end > last_end {
                    last.1 = end - last.0;
                }
                continue;
            }
        }
        out.push((off, end - off));
    }
    out
}

/// Intersection of two sorted, merged range lists.
pub(crate) fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let (a0, a1) = (a[i].0, a[i].0 + a[i].1);
        let (b0, b1) = (b[j].0, b[j].0 + b[j].1);
        let (s, e) = (a0.max(b0), a1.min(b1));
        if s < e {
            out.push((s, e - s));
        }
        if a1 < b1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Appends `(off, len)` to a sorted list being built, merging with the last range.
pub(crate) fn push_range(out: &mut Vec<(u64, u64)>, off: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.0 + last.1 == off {
            last.1 += len;
            return;
        }
    }
    out.push((off, len));
}

/// Runs of equal bits in an LSB-first (`lsb_first`) or MSB-first bitmap over
/// `count` entries starting at entry `first`: yields (start entry, length, bit).
pub(crate) fn bit_runs(
    bitmap: &[u8],
    first: u64,
    count: u64,
    lsb_first: bool,
) -> Vec<(u64, u64, bool)> {
    let bit = |i: u64| {
        let byte = bitmap[(i / 8) as usize];
        let shift = if lsb_first { i % 8 } else { 7 - i % 8 };
        (byte >> shift) & 1 == 1
    };
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut i = first;
    let end = first + count;
    while i < end {
        // Whole bytes of equal bits in one step.
        if i & 7 == 0 && end - i >= 8 {
            let byte = bitmap[(i / 8) as usize];
            if byte == 0 || byte == 0xff {
                let b = byte == 0xff;
                match runs.last_mut() {
                    Some(r) if r.2 == b && r.0 + r.1 == i => r.1 += 8,
                    _ => runs.push((i, 8, b)),
                }
                i += 8;
                continue;
            }
        }
        let b = bit(i);
        match runs.last_mut() {
            Some(r) if r.2 == b && r.0 + r.1 == i => r.1 += 1,
            _ => runs.push((i, 1, b)),
        }
        i += 1;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_and_intersect() {
        let m = merge_ranges(vec![(10, 5), (0, 3), (15, 5), (2, 2), (30, 0), (40, 1)]);
        assert_eq!(m, vec![(0, 4), (10, 10), (40, 1)]);
        let i = intersect(&m, &[(3, 10), (19, 30)]);
        assert_eq!(i, vec![(3, 1), (10, 3), (19, 1), (40, 1)]);
    }

    #[test]
    fn runs_lsb_and_msb() {
        let bm = [0b0000_0110u8, 0xff, 0x00, 0x01];
        let r = bit_runs(&bm, 0, 32, true);
        assert_eq!(
            r,
            vec![
                (0, 1, false),
                (1, 2, true),
                (3, 5, false),
                (8, 8, true),
                (16, 8, false),
                (24, 1, true),
                (25, 7, false)
            ]
        );
        let r = bit_runs(&bm, 0, 8, false);
        assert_eq!(r, vec![(0, 5, false), (5, 2, true), (7, 1, false)]);
        let r = bit_runs(&bm, 2, 9, true);
        assert_eq!(r, vec![(2, 1, true), (3, 5, false), (8, 3, true)]);
    }
}
