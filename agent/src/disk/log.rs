//! Replaying a dirty VHDX log IN MEMORY (MS-VHDX 2.3.3): find the active
//! sequence, apply its descriptors to an [`Overlay`], never to the file.
//!
//! An entry is valid when `format::vhdx::log::decode_entry` accepts it:
//! signature, length, LogGuid equal to the header's, sequence number,
//! descriptors and data sectors, CRC-32C over the whole entry. The active
//! sequence is searched exactly as the spec's procedure describes, and its
//! entries are replayed from the tail entry named by the head entry.

use tierback_format::vhdx::layout::{is_aligned, Header, MIB};
use tierback_format::vhdx::log::{decode_entry, LogEntry, LogEntryHeader, LogOp, LOG_SECTOR};

use super::source::{Image, Overlay};
use super::{human_size, DiskError};

/// Largest log this reader replays (Hyper-V makes 1 MiB logs).
const MAX_LOG: u64 = 256 * MIB;

/// What a replay produced.
pub(crate) struct Replay {
    /// Pages and zeroed ranges to read through.
    pub(crate) overlay: Overlay,
    /// The head entry's LastFileOffset: the file counts as at least this long.
    pub(crate) last_file_offset: u64,
    /// One past the last byte written by a data descriptor (backed by log data).
    pub(crate) data_extent: u64,
    /// Entries replayed.
    pub(crate) entries: usize,
}

/// Finds and replays the active log sequence of `img` whose current header is `h`.
pub(crate) fn replay(img: &Image, h: &Header) -> Result<Replay, DiskError> {
    let path = &img.path;
    let (off, len) = (h.log_offset, u64::from(h.log_length));
    if len == 0 {
        return Err(DiskError::corrupt(
            path,
            format!("log is dirty (LogGuid {}) but LogLength is 0", h.log_guid),
        ));
    }
    if off < MIB || !is_aligned(off, MIB) || !is_aligned(len, MIB) {
        return Err(DiskError::corrupt(
            path,
            format!("log at {off} of {len} bytes is not 1 MiB aligned after the header section"),
        ));
    }
    if len > MAX_LOG {
        return Err(DiskError::unsupported(
            path,
            format!(
                "a {} log (this reader replays up to {})",
                human_size(len),
                human_size(MAX_LOG)
            ),
        ));
    }
    if off.checked_add(len).is_none_or(|e| e > img.real_len()) {
        return Err(DiskError::truncated(
            path,
            img.real_len(),
            format!("the log needs {}", off.saturating_add(len)),
        ));
    }
    let mut log = vec![0u8; len as usize];
    img.read_raw(off, &mut log)?;

    let active = find_active(&log, h).ok_or_else(|| {
        DiskError::corrupt(
            path,
            format!(
                "log is dirty (LogGuid {}) but holds no valid entry sequence",
                h.log_guid
            ),
        )
    })?;
    let head = &active[active.len() - 1].header;
    if head.flushed_file_offset > img.real_len() {
        return Err(DiskError::truncated(
            path,
            img.real_len(),
            format!(
                "its log says it was at least {} bytes (FlushedFileOffset)",
                head.flushed_file_offset
            ),
        ));
    }
    let mut overlay = Overlay::default();
    let mut data_extent = 0u64;
    for entry in &active {
        for op in &entry.ops {
            match op {
                LogOp::Zero {
                    file_offset,
                    length,
                } => overlay.zero(*file_offset, *length),
                LogOp::Data { file_offset, data } => {
                    data_extent = data_extent.max(file_offset.saturating_add(LOG_SECTOR as u64));
                    overlay.data(*file_offset, data.clone());
                }
            }
        }
    }
    Ok(Replay {
        overlay,
        last_file_offset: head.last_file_offset,
        data_extent,
        entries: active.len(),
    })
}

/// The entry at log offset `pos`, if valid. Entries may wrap around the end of the log.
fn entry_at(log: &[u8], pos: usize, h: &Header) -> Option<LogEntry> {
    let eh = LogEntryHeader::parse(log.get(pos..)?).ok()?;
    let elen = eh.entry_length as usize;
    if elen == 0 || !is_aligned(elen as u64, LOG_SECTOR as u64) || elen > log.len() {
        return None;
    }
    let bytes: std::borrow::Cow<[u8]> = if pos + elen <= log.len() {
        std::borrow::Cow::Borrowed(&log[pos..pos + elen])
    } else {
        let mut v = Vec::with_capacity(elen);
        v.extend_from_slice(&log[pos..]);
        v.extend_from_slice(&log[..elen - (log.len() - pos)]);
        std::borrow::Cow::Owned(v)
    };
    decode_entry(&bytes, h.log_guid).ok()
}

/// The spec's search for the active sequence; returns its entries from the
/// tail entry to the head entry.
fn find_active(log: &[u8], h: &Header) -> Option<Vec<LogEntry>> {
    let n = log.len();
    let mut candidate: Option<(u64, Vec<LogEntry>)> = None;
    let mut cur_tail = 0usize;
    let mut old_tail = 0usize;
    loop {
        // Grow the current sequence from cur_tail.
        let mut seq: Vec<(usize, LogEntry)> = Vec::new();
        let mut head = cur_tail;
        let mut covered = 0usize;
        while covered < n {
            let Some(e) = entry_at(log, head, h) else {
                break;
            };
            if let Some((_, last)) = seq.last() {
                if e.header.sequence_number != last.header.sequence_number.wrapping_add(1) {
                    break;
                }
            }
            let elen = e.header.entry_length as usize;
            covered += elen;
            if covered > n {
                break;
            }
            seq.push((head, e));
            head = (head + elen) % n;
        }
        // Valid if the head entry's tail is the start of one of its entries.
        let tail_idx = seq.last().and_then(|(_, last)| {
            seq.iter()
                .position(|(p, _)| *p == last.header.tail as usize)
        });
        match tail_idx {
            Some(t) => {
                let head_seq = seq[seq.len() - 1].1.header.sequence_number;
                if candidate.as_ref().is_none_or(|(s, _)| head_seq > *s) {
                    let entries = seq.into_iter().skip(t).map(|(_, e)| e).collect();
                    candidate = Some((head_seq, entries));
                }
                cur_tail = head;
            }
            None => {
                cur_tail += LOG_SECTOR;
                if cur_tail >= n {
                    cur_tail = 0;
                }
            }
        }
        // Wrapped around (or back at the start): the whole log was scanned.
        if cur_tail <= old_tail {
            break;
        }
        old_tail = cur_tail;
    }
    candidate.map(|(_, e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tierback_format::vhdx::log::encode_entry;
    use tierback_format::vhdx::Guid;

    fn header(log_guid: Guid) -> Header {
        Header {
            sequence_number: 1,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    fn data_op(at: u64, fill: u8) -> LogOp {
        LogOp::Data {
            file_offset: at,
            data: vec![fill; LOG_SECTOR],
        }
    }

    fn put(log: &mut [u8], pos: usize, e: &[u8]) {
        for (i, b) in e.iter().enumerate() {
            let n = log.len();
            log[(pos + i) % n] = *b;
        }
    }

    fn fills(entries: &[LogEntry]) -> Vec<(u64, u8)> {
        entries
            .iter()
            .flat_map(|e| e.ops.iter())
            .map(|o| match o {
                LogOp::Data { file_offset, data } => (*file_offset, data[100]),
                LogOp::Zero { file_offset, .. } => (*file_offset, 0),
            })
            .collect()
    }

    #[test]
    fn picks_newest_sequence_and_starts_at_tail() {
        let g = Guid::random();
        let h = header(g);
        let mut log = vec![0u8; MIB as usize];
        // Old sequence at 0: seq 10, 11 (tail 0).
        let a = encode_entry(10, 0, g, 0, 0, &[data_op(3 << 20, 1)]).expect("test value");
        let b = encode_entry(11, 0, g, 0, 0, &[data_op(3 << 20, 2)]).expect("test value");
        put(&mut log, 0, &a);
        put(&mut log, a.len(), &b);
        // Newer sequence at 64K: seq 20 (already flushed), 21, 22 with tail at 21.
        let base = 64 * 1024;
        let c = encode_entry(20, base as u32, g, 0, 0, &[data_op(3 << 20, 3)]).expect("test value");
        let t = base + c.len();
        let d = encode_entry(21, t as u32, g, 0, 0, &[data_op(3 << 20, 4)]).expect("test value");
        let e = encode_entry(22, t as u32, g, 0, 0, &[data_op((3 << 20) + 4096, 5)])
            .expect("test value");
        put(&mut log, base, &c);
        put(&mut log, t, &d);
        put(&mut log, t + d.len(), &e);
        let act = find_active(&log, &h).expect("test value");
        assert_eq!(fills(&act), vec![(3 << 20, 4), ((3 << 20) + 4096, 5)]);
    }

    #[test]
    fn sequence_wrapping_the_log_end() {
        let g = Guid::random();
        let h = header(g);
        let mut log = vec![0u8; MIB as usize];
        let start = MIB as usize - LOG_SECTOR; // entry of 2 sectors wraps
        let a = encode_entry(5, start as u32, g, 0, 0, &[data_op(3 << 20, 7)]).expect("test value");
        put(&mut log, start, &a);
        let next = (start + a.len()) % log.len();
        let b = encode_entry(6, start as u32, g, 0, 0, &[data_op(4 << 20, 8)]).expect("test value");
        put(&mut log, next, &b);
        let act = find_active(&log, &h).expect("test value");
        assert_eq!(fills(&act), vec![(3 << 20, 7), (4 << 20, 8)]);
    }

    #[test]
    fn broken_links_and_foreign_guids_are_not_replayed() {
        let g = Guid::random();
        let h = header(g);
        let mut log = vec![0u8; MIB as usize];
        let a = encode_entry(5, 0, g, 0, 0, &[data_op(3 << 20, 1)]).expect("test value");
        // Gap in sequence numbers: 7 does not extend 5.
        let b = encode_entry(7, 0, g, 0, 0, &[data_op(3 << 20, 2)]).expect("test value");
        put(&mut log, 0, &a);
        put(&mut log, a.len(), &b);
        // A newer entry with another LogGuid.
        let c = encode_entry(99, 16384, Guid::random(), 0, 0, &[data_op(3 << 20, 3)])
            .expect("test value");
        put(&mut log, 16384, &c);
        // Entry 7 alone has tail 0, which is not inside its own sequence.
        let act = find_active(&log, &h).expect("test value");
        assert_eq!(fills(&act), vec![(3 << 20, 1)]);
        // A corrupted CRC leaves nothing valid.
        log[100] ^= 1;
        assert!(find_active(&log, &h).is_none());
        assert!(find_active(&vec![0u8; MIB as usize], &h).is_none());
    }

    #[test]
    fn tail_outside_sequence_is_invalid() {
        let g = Guid::random();
        let h = header(g);
        let mut log = vec![0u8; MIB as usize];
        let a = encode_entry(5, 8192 * 4, g, 0, 0, &[data_op(3 << 20, 1)]).expect("test value");
        put(&mut log, 0, &a);
        assert!(find_active(&log, &h).is_none());
    }
}
