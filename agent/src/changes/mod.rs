//! Change detection: which chunks of a disk may differ from the VM's previous
//! recovery point, so an incremental reads and sends only those.
//!
//! Three sources sit behind one contract ([`ChangeSource`]), tried in order
//! by [`plan_disk`]:
//!
//! 1. `rct` — ranges the host's change tracking reports since the id stored
//!    with the last point (the folder host's `rct.json`);
//! 2. `checkpoint` — when the leaf is an AVHDX child of exactly the file the
//!    last backup read, the child's own sectors;
//! 3. `compare` — the fallback: read every allocated chunk, hash, compare
//!    with the plaintext hashes of the previous point kept in the agent's
//!    state dir ([`store`]).
//!
//! Before any source, a DataWriteGuid unchanged since the last backup means
//! the disk is unchanged (nothing is read). After an `rct`/`checkpoint`
//! answer, a random sample of chunks it calls unchanged is re-read and
//! compared with the stored hashes; a difference raises an alert and the
//! disk falls back to full read + compare in the same backup.
//!
//! Contract of a source: it may over-report (name unchanged bytes) but must
//! never under-report; when it cannot answer for the last point it says
//! [`Changes::Lost`] with a one-line reason (the disk then falls back to
//! compare and reports why), when it does not apply to the disk it says
//! [`Changes::NotApplicable`] and the next source is asked.
//!
//! MUST NOT: write to a source disk, or to the state dir before a point is
//! committed (the caller saves hashes only after the gateway's commit).

pub mod checkpoint;
pub mod compare;
pub mod rct;
pub mod store;

use std::sync::Arc;

use serde::Serialize;
use tierback_format::ids::ChunkHash;
use tierback_format::wire::DELTA_ZERO_HASH;

use crate::disk::VirtualDisk;
pub use compare::hash_chunk;
pub use store::{DiskRecord, TrackingStore, VmRecord};

/// The hash recorded for an all-zero or unallocated chunk.
pub const ZERO_HASH: ChunkHash = DELTA_ZERO_HASH;

/// Most chunks one sample check re-reads.
pub const MAX_SAMPLE: usize = 256;

/// Chunk numbers that touch any of the (sorted) ranges, ascending, unique;
/// ranges beyond `size` are clipped, `offset + len` saturates.
pub fn chunks_of_ranges(ranges: &[(u64, u64)], chunk_size: u64, size: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &(off, len) in ranges {
        if len == 0 || off >= size {
            continue;
        }
        let end = off.saturating_add(len).min(size);
        let first = off / chunk_size;
        let last = (end - 1) / chunk_size;
        let from = match out.last() {
            Some(&l) if l >= first => l + 1,
            _ => first,
        };
        if from <= last {
            out.extend(from..=last);
        }
    }
    out
}

/// Chunk numbers more than half covered by `ranges` (in any order, maybe
/// overlapping), ascending; ranges beyond `size` are clipped.
pub fn rewritten_chunks(ranges: &[(u64, u64)], chunk_size: u64, size: u64) -> Vec<u64> {
    // (chunk, bytes covered), from the ranges merged first so that
    // overlapping reports do not count twice.
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for (off, len) in crate::disk::merge_ranges(ranges.to_vec()) {
        let end = off.saturating_add(len).min(size);
        let mut at = off;
        while at < end {
            let n = at / chunk_size;
            let upto = ((n + 1) * chunk_size).min(end);
            match covered.last_mut() {
                Some(c) if c.0 == n => c.1 += upto - at,
                _ => covered.push((n, upto - at)),
            }
            at = upto;
        }
    }
    covered
        .into_iter()
        .filter(|&(n, bytes)| bytes * 2 > chunk_size.min(size - n * chunk_size))
        .map(|(n, _)| n)
        .collect()
}

/// Hex text of a DataWriteGuid as recorded.
pub fn guid_text(g: [u8; 16]) -> String {
    hex::encode(g)
}

/// What a source is asked about.
pub struct DiskContext<'a> {
    pub disk: &'a dyn VirtualDisk,
    /// The disk's path in vm.json.
    pub path: &'a str,
    /// What the last backup recorded about this disk.
    pub prev: &'a DiskRecord,
}

/// A source's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Byte ranges that may have changed (empty: nothing changed).
    Ranges(Vec<(u64, u64)>),
    /// The source cannot tell what changed since the last point.
    Lost { reason: String, reset: bool },
    /// The source does not apply to this disk.
    NotApplicable,
}

/// A source of changed ranges.
pub trait ChangeSource {
    /// The method name reported (`rct`, `checkpoint`).
    fn method(&self) -> Method;
    /// What changed since the last backup.
    fn changes(&self, ctx: &DiskContext<'_>) -> Changes;
}

/// How a disk's changes were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every allocated chunk, complete index (first backup, `--full`, no local hashes).
    Full,
    /// DataWriteGuid unchanged: nothing read.
    Unchanged,
    Rct,
    Checkpoint,
    /// Full read + compare with the previous hashes.
    Compare,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Unchanged => "unchanged",
            Method::Rct => "rct",
            Method::Checkpoint => "checkpoint",
            Method::Compare => "compare",
        }
    }
}

/// Change-tracking health (`tracking | fallback(reason) | reset(reason)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Tracking,
    Fallback,
    Reset,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Tracking => "tracking",
            Health::Fallback => "fallback",
            Health::Reset => "reset",
        }
    }
}

/// What to do with one disk in this backup.
#[derive(Debug, Clone)]
pub struct DiskPlan {
    pub method: Method,
    pub health: Health,
    pub reason: Option<String>,
    /// Chunk numbers to read, ascending.
    pub read: Vec<u64>,
    /// The previous point's hashes (by chunk number): the stream is uploaded
    /// as a delta against `base_stream`. `None`: complete index.
    pub prev: Option<Arc<Vec<ChunkHash>>>,
    /// Chunks the change source reports more than half rewritten, ascending:
    /// uploaded without a base hint, since a delta against their old content
    /// would not be smaller and the gateway would read and decode that base
    /// for nothing.
    pub rewritten: Vec<u64>,
    /// The byte ranges the change source reports written since the base
    /// point, merged and ascending (tracking plans only): chunks they cover
    /// in part are uploaded as patches of their base (the written 4 KiB
    /// blocks only, `CHUNK_RECORD_PATCH_FLAG`).
    pub dirty: Option<Arc<Vec<(u64, u64)>>>,
    pub base_stream: Option<u32>,
    pub alerts: Vec<String>,
    pub sample_chunks: u64,
    pub sample_bytes: u64,
}

/// The previous backup of a disk, usable as a delta base.
pub struct Prev<'a> {
    pub record: &'a DiskRecord,
    pub hashes: Arc<Vec<ChunkHash>>,
}

/// Everything [`plan_disk`] needs.
pub struct PlanInput<'a> {
    /// "disk N (path)" for messages.
    pub label: String,
    pub disk: &'a dyn VirtualDisk,
    pub path: &'a str,
    pub chunk_size: u64,
    pub prev: Option<Prev<'a>>,
    /// Why there is no `prev` (None for a first backup or a new disk);
    /// `true` when tracking state was lost (health `reset`).
    pub no_prev: Option<(String, bool)>,
    pub full: bool,
    pub sample_min: usize,
}

/// Decides how to back up one disk. Reads only the sample chunks.
pub fn plan_disk(inp: PlanInput<'_>, sources: &[&dyn ChangeSource]) -> anyhow::Result<DiskPlan> {
    let disk = inp.disk;
    let size = disk.virtual_size();
    let cs = inp.chunk_size;
    let allocated = chunks_of_ranges(&disk.allocated_ranges()?, cs, size);
    let full = |health, reason: Option<String>| DiskPlan {
        method: Method::Full,
        health,
        reason,
        read: allocated.clone(),
        prev: None,
        rewritten: Vec::new(),
        dirty: None,
        base_stream: None,
        alerts: Vec::new(),
        sample_chunks: 0,
        sample_bytes: 0,
    };
    if inp.full {
        return Ok(full(Health::Tracking, Some("full backup requested".into())));
    }
    let Some(prev) = inp.prev else {
        return Ok(match inp.no_prev {
            Some((reason, true)) => full(Health::Reset, Some(reason)),
            Some((reason, false)) => full(Health::Fallback, Some(reason)),
            None => full(
                Health::Tracking,
                Some("first backup of this disk: full read".into()),
            ),
        });
    };
    let rec = prev.record;
    let compare = |health, reason: String, alerts: Vec<String>, sample: (u64, u64)| DiskPlan {
        method: Method::Compare,
        health,
        reason: Some(reason),
        read: allocated.clone(),
        prev: Some(prev.hashes.clone()),
        rewritten: Vec::new(),
        dirty: None,
        base_stream: Some(rec.stream_no),
        alerts,
        sample_chunks: sample.0,
        sample_bytes: sample.1,
    };
    let dwg = disk.data_write_guid().map(guid_text);
    if dwg.is_some() && dwg == rec.data_write_guid && size == rec.size {
        return Ok(DiskPlan {
            method: Method::Unchanged,
            health: Health::Tracking,
            reason: None,
            read: Vec::new(),
            prev: Some(prev.hashes.clone()),
            rewritten: Vec::new(),
            dirty: None,
            base_stream: Some(rec.stream_no),
            alerts: Vec::new(),
            sample_chunks: 0,
            sample_bytes: 0,
        });
    }
    let ctx = DiskContext {
        disk,
        path: inp.path,
        prev: rec,
    };
    for src in sources {
        match src.changes(&ctx) {
            Changes::NotApplicable => continue,
            Changes::Lost { reason, reset } => {
                let h = if reset {
                    Health::Reset
                } else {
                    Health::Fallback
                };
                return Ok(compare(h, reason, Vec::new(), (0, 0)));
            }
            Changes::Ranges(ranges) => {
                let mut read = chunks_of_ranges(&ranges, cs, size);
                let slots = size.div_ceil(cs);
                if size != rec.size {
                    // A resized disk's old and new last chunks change length.
                    let old_last = rec.size.div_ceil(cs).saturating_sub(1);
                    for n in [old_last, slots.saturating_sub(1)] {
                        if n < slots {
                            read.push(n);
                        }
                    }
                    read.sort_unstable();
                    read.dedup();
                }
                let method = src.method();
                let s = compare::sample_check(
                    disk,
                    &allocated,
                    &read,
                    &prev.hashes,
                    cs,
                    size.min(rec.size),
                    inp.sample_min,
                )?;
                if !s.differing.is_empty() {
                    let shown: Vec<String> =
                        s.differing.iter().take(8).map(u64::to_string).collect();
                    let alert = format!(
                        "{}: {} of {} sampled chunk(s) that {} reported unchanged differ from the last backup (chunk {}): change tracking missed writes; fell back to full read + compare",
                        inp.label,
                        s.differing.len(),
                        s.chunks,
                        method.as_str(),
                        shown.join(", ")
                    );
                    return Ok(compare(
                        Health::Fallback,
                        format!(
                            "sample check caught changes {} did not report: full read + compare (repair)",
                            method.as_str()
                        ),
                        vec![alert],
                        (s.chunks, s.bytes),
                    ));
                }
                return Ok(DiskPlan {
                    method,
                    health: Health::Tracking,
                    reason: None,
                    rewritten: rewritten_chunks(&ranges, cs, size),
                    dirty: Some(Arc::new(crate::disk::merge_ranges(ranges))),
                    read,
                    prev: Some(prev.hashes.clone()),
                    base_stream: Some(rec.stream_no),
                    alerts: Vec::new(),
                    sample_chunks: s.chunks,
                    sample_bytes: s.bytes,
                });
            }
        }
    }
    Ok(compare(
        Health::Fallback,
        "the host reports no change tracking for this disk and it has no checkpoint since the last backup: full read + compare".into(),
        Vec::new(),
        (0, 0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 64 << 10;

    struct Fixed(Changes);
    impl ChangeSource for Fixed {
        fn method(&self) -> Method {
            Method::Rct
        }
        fn changes(&self, _ctx: &DiskContext<'_>) -> Changes {
            self.0.clone()
        }
    }

    fn image(chunks: u64, seed: u8) -> Vec<u8> {
        (0..chunks * CS).map(|i| (i / CS) as u8 ^ seed).collect()
    }

    fn hashes(img: &[u8]) -> Vec<ChunkHash> {
        img.chunks(CS as usize)
            .map(|c| hash_chunk(c).unwrap_or(ZERO_HASH))
            .collect()
    }

    fn record(size: u64) -> DiskRecord {
        DiskRecord {
            controller: "SCSI".into(),
            location: "0:0".into(),
            path: "d.raw".into(),
            stream_no: 3,
            size,
            chunk_size: CS as u32,
            data_write_guid: None,
            change_id: Some("rct-1".into()),
            hashes_file: "x".into(),
            health: None,
        }
    }

    fn plan(img: Vec<u8>, prev: Option<(&DiskRecord, Vec<ChunkHash>)>, src: Changes) -> DiskPlan {
        let disk = crate::disk::open_image_bytes("d.raw", img).expect("raw");
        let src = Fixed(src);
        plan_disk(
            PlanInput {
                label: "disk 0 (d.raw)".into(),
                disk: disk.as_ref(),
                path: "d.raw",
                chunk_size: CS,
                prev: prev.map(|(record, h)| Prev {
                    record,
                    hashes: Arc::new(h),
                }),
                no_prev: None,
                full: false,
                sample_min: 8,
            },
            &[&src],
        )
        .expect("plan")
    }

    #[test]
    fn rewritten_chunks_are_those_more_than_half_covered() {
        const M: u64 = 1 << 20;
        let size = 4 * M + M / 4; // a short last chunk (4) of 256 KiB
        let ranges = [
            // chunk 0: 600 KiB in two overlapping reports (counted once: 600 KiB).
            (0, 400 << 10),
            (200 << 10, 400 << 10),
            // chunk 1: exactly half is not "more than half".
            (M, M / 2),
            // chunks 2 and 3: one run over the boundary, 3/4 of 2 and 1/4 of 3.
            (2 * M + M / 4, M),
            // chunk 4: 200 of its 256 KiB, the report running past the end.
            (4 * M + (56 << 10), 10 * M),
            // beyond the end: ignored.
            (9 * M, M),
        ];
        assert_eq!(rewritten_chunks(&ranges, M, size), vec![0, 2, 4]);
        // Order of the reports does not matter.
        let mut rev = ranges.to_vec();
        rev.reverse();
        assert_eq!(rewritten_chunks(&rev, M, size), vec![0, 2, 4]);
        assert!(rewritten_chunks(&[], M, size).is_empty());
        assert_eq!(
            rewritten_chunks(&[(0, u64::MAX)], M, size),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn plans_follow_the_source_and_repair_what_it_missed() {
        let old = image(16, 0);
        let rec = record(old.len() as u64);
        // No previous point: everything, complete index.
        let p = plan(old.clone(), None, Changes::NotApplicable);
        assert_eq!(
            (p.method, p.health, p.read.len()),
            (Method::Full, Health::Tracking, 16)
        );
        assert!(p.base_stream.is_none() && p.prev.is_none());
        // Ranges: only those chunks, a delta against stream 3; the sample
        // (all 15 others, min 8 → 8) finds nothing.
        let mut new = old.clone();
        new[5 * CS as usize] ^= 0xff;
        let p = plan(
            new.clone(),
            Some((&rec, hashes(&old))),
            Changes::Ranges(vec![(5 * CS, 1)]),
        );
        assert_eq!((p.method, p.health), (Method::Rct, Health::Tracking));
        assert_eq!((p.read.clone(), p.base_stream), (vec![5], Some(3)));
        assert_eq!(p.sample_chunks, 8);
        assert!(p.alerts.is_empty());
        // Lost: compare with the reason, reset told apart.
        let p = plan(
            new.clone(),
            Some((&rec, hashes(&old))),
            Changes::Lost {
                reason: "gone".into(),
                reset: true,
            },
        );
        assert_eq!((p.method, p.health), (Method::Compare, Health::Reset));
        assert_eq!((p.read.len(), p.reason.as_deref()), (16, Some("gone")));
        // A write the source did not report: every other chunk differs, so
        // any sample catches it; alert + compare in the same backup.
        let other = image(16, 1);
        let p = plan(
            other,
            Some((&rec, hashes(&old))),
            Changes::Ranges(vec![(0, 1)]),
        );
        assert_eq!((p.method, p.health), (Method::Compare, Health::Fallback));
        assert_eq!(p.alerts.len(), 1, "{:?}", p.alerts);
        assert!(
            p.alerts[0].contains("rct reported unchanged"),
            "{:?}",
            p.alerts
        );
        assert_eq!(p.read.len(), 16);
        // Resized: the old and the new last chunk are read as well.
        let grown = image(20, 0);
        let p = plan(grown, Some((&rec, hashes(&old))), Changes::Ranges(vec![]));
        assert_eq!(p.read, vec![15, 19]);
    }

    #[test]
    fn chunk_plan_covers_ranges_once() {
        let cs = 1 << 20;
        assert_eq!(chunks_of_ranges(&[(0, 1)], cs, 10 << 20), vec![0]);
        assert_eq!(chunks_of_ranges(&[(cs - 1, 2)], cs, 10 << 20), vec![0, 1]);
        assert_eq!(
            chunks_of_ranges(&[(0, cs), (cs / 2, cs)], cs, 10 << 20),
            vec![0, 1]
        );
        assert_eq!(
            chunks_of_ranges(&[(5 * cs, 100 * cs)], cs, 7 * cs),
            vec![5, 6]
        );
        assert!(chunks_of_ranges(&[(0, 0)], cs, cs).is_empty());
        // Beyond the disk, saturating, and a range inside a chunk already taken.
        assert!(chunks_of_ranges(&[(8 * cs, 1)], cs, 7 * cs).is_empty());
        assert_eq!(chunks_of_ranges(&[(cs, u64::MAX)], cs, 3 * cs), vec![1, 2]);
        assert_eq!(
            chunks_of_ranges(&[(0, cs + 1), (cs + 5, 1)], cs, 3 * cs),
            vec![0, 1]
        );
        // A partial last chunk.
        assert_eq!(chunks_of_ranges(&[(2 * cs, 10)], cs, 2 * cs + 512), vec![2]);
    }
}
