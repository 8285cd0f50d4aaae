//! Fixture generators for VHDX files qemu-img cannot make: differencing
//! chains (AVHDX), 4 KiB-logical-sector disks and files with a dirty log.
//!
//! Every generator returns, next to the files, the expected raw bytes of the
//! virtual disk computed *without* any VHDX reader: the raw image it was fed,
//! overlaid with the writes it made. Tests compare a reader against that.
//! Everything here is deterministic for a given seed and works in memory
//! (`Vec<u8>`); callers write the bytes wherever they like.

use std::io::{Cursor, Read, Seek, Write};

use super::guid::Guid;
use super::layout::*;
use super::log::{encode_entry, LogOp, LOG_SECTOR};
use super::writer::{ParentInfo, VhdxOptions, VhdxWriter};
use super::VhdxError;

/// Deterministic pseudo-random bytes (xorshift64*), never all zero.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    if x == 0 {
        x = 1;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `raw` as the content of a new VHDX on `w` (all-zero blocks stay
/// unallocated). `raw` may be shorter than `opts.virtual_size` (the rest is
/// zeros) and must be a multiple of the logical sector size. Returns `w` and
/// the DataWriteGuid written.
pub fn vhdx_from_raw<W: Write + Seek>(
    w: W,
    raw: &[u8],
    opts: VhdxOptions,
) -> Result<(W, Guid), VhdxError> {
    let piece = opts.block_size.max(1) as usize;
    let mut writer = VhdxWriter::create(w, opts)?;
    let guid = writer.data_write_guid();
    for (i, chunk) in raw.chunks(piece).enumerate() {
        writer.write_at((i * piece) as u64, chunk)?;
    }
    Ok((writer.finish()?, guid))
}

/// Like [`vhdx_from_raw`], streaming the raw image from `r` (e.g. a raw file
/// too large to hold in memory); reads until EOF.
pub fn vhdx_from_reader<R: Read, W: Write + Seek>(
    w: W,
    mut r: R,
    opts: VhdxOptions,
) -> Result<(W, Guid), VhdxError> {
    let piece = opts.block_size.max(1 << 20) as usize;
    let mut writer = VhdxWriter::create(w, opts)?;
    let guid = writer.data_write_guid();
    let mut buf = vec![0u8; piece];
    let mut off = 0u64;
    loop {
        let mut n = 0;
        while n < piece {
            match r.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        writer.write_at(off, &buf[..n])?;
        off += n as u64;
        if n < piece {
            break;
        }
    }
    Ok((writer.finish()?, guid))
}

/// In-memory [`vhdx_from_raw`].
pub fn vhdx_bytes_from_raw(raw: &[u8], opts: VhdxOptions) -> Result<(Vec<u8>, Guid), VhdxError> {
    let (c, g) = vhdx_from_raw(Cursor::new(Vec::new()), raw, opts)?;
    Ok((c.into_inner(), g))
}

/// Writes a differencing VHDX holding `writes` (virtual offset, bytes), in order.
/// `opts.parent` must be set.
pub fn differencing_vhdx<W: Write + Seek>(
    w: W,
    opts: VhdxOptions,
    writes: &[(u64, Vec<u8>)],
) -> Result<(W, Guid), VhdxError> {
    if opts.parent.is_none() {
        return Err(VhdxError::InvalidOptions(
            "differencing_vhdx needs opts.parent".into(),
        ));
    }
    let mut writer = VhdxWriter::create(w, opts)?;
    let guid = writer.data_write_guid();
    for (off, data) in writes {
        writer.write_at(*off, data)?;
    }
    Ok((writer.finish()?, guid))
}

/// Ground truth for a child: applies `writes` in order onto `image`.
pub fn apply_writes(image: &mut [u8], writes: &[(u64, Vec<u8>)]) {
    for (off, data) in writes {
        let off = *off as usize;
        image[off..off + data.len()].copy_from_slice(data);
    }
}

/// A deterministic mix of writes for a differencing child: single sectors,
/// runs crossing block boundaries, a whole block, partial and whole-block
/// zero writes (which must hide the parent's data), overlapping rewrites and
/// seeded random small writes. All inside `virtual_size`, sector aligned.
pub fn partial_block_writes(
    seed: u64,
    virtual_size: u64,
    block_size: u32,
    sector: u32,
) -> Vec<(u64, Vec<u8>)> {
    let s = u64::from(sector);
    let bs = u64::from(block_size);
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut n = 0u64;
    let mut push = |out: &mut Vec<(u64, Vec<u8>)>, off: u64, len: u64, zero: bool| {
        if len == 0 || off + len > virtual_size {
            return;
        }
        n += 1;
        let data = if zero {
            vec![0u8; len as usize]
        } else {
            pattern(seed.wrapping_mul(1000).wrapping_add(n), len as usize)
        };
        out.push((off, data));
    };
    push(&mut out, 0, s, false); // first sector of block 0
    push(&mut out, 5 * s, 3 * s, false); // a few sectors inside block 0
    push(&mut out, 6 * s, s, true); // zero a sector written just above
    push(&mut out, 2 * bs - 3 * s, 8 * s, false); // crosses the block 1/2 boundary
    push(&mut out, 3 * bs, bs, false); // block 3 whole
    push(&mut out, 4 * bs + 16 * s, 4 * s, true); // partial zero write: hides parent sectors
    push(&mut out, 5 * bs, bs, true); // whole-block zero write
    push(&mut out, 6 * bs + bs / 2, bs, false); // half of block 6 and half of block 7
    push(&mut out, 6 * bs + bs / 2 + s, 2 * s, false); // overlapping rewrite
    push(&mut out, virtual_size - 2 * s, 2 * s, false); // the very end of the disk
    let sectors = virtual_size / s;
    let x = pattern(seed ^ 0xABCD, 16 * 8);
    for k in 0..16usize {
        let r = u64::from_le_bytes([
            x[8 * k],
            x[8 * k + 1],
            x[8 * k + 2],
            x[8 * k + 3],
            x[8 * k + 4],
            x[8 * k + 5],
            x[8 * k + 6],
            x[8 * k + 7],
        ]);
        let len = 1 + r % 9;
        let start = (r >> 8) % sectors.saturating_sub(len).max(1);
        push(&mut out, start * s, len * s, r & 7 == 0);
    }
    out
}

/// One level of a [`ChainFixture`].
#[derive(Debug, Clone)]
pub struct ChainLevel {
    /// File name (all levels live in one folder).
    pub name: String,
    /// The file's bytes.
    pub file: Vec<u8>,
    /// Its DataWriteGuid.
    pub data_write_guid: Guid,
    /// Writes made into this level (empty for the base, whose content is the raw).
    pub writes: Vec<(u64, Vec<u8>)>,
    /// Expected virtual disk content when this level is opened as the leaf.
    pub expected: Vec<u8>,
}

/// A base VHDX and differencing children, each the parent of the next.
#[derive(Debug, Clone)]
pub struct ChainFixture {
    /// Base first, leaf last.
    pub levels: Vec<ChainLevel>,
}

/// Builds a chain in one folder: `names[0]` is a dynamic VHDX of `raw`, each
/// further name a differencing VHDX whose parent locator names the previous
/// file (`relative_path` = the bare file name; `absolute_win32_path` =
/// `\\?\D:\Hyper-V\Virtual Hard Disks\<name>`), filled with
/// [`partial_block_writes`] (seeded per level).
pub fn avhdx_chain(
    raw: &[u8],
    names: &[&str],
    block_size: u32,
    logical_sector_size: u32,
    seed: u64,
) -> Result<ChainFixture, VhdxError> {
    let Some((base_name, children)) = names.split_first() else {
        return Err(VhdxError::InvalidOptions(
            "avhdx_chain needs at least one name".into(),
        ));
    };
    let mut opts = VhdxOptions::new(raw.len() as u64);
    opts.block_size = block_size;
    opts.logical_sector_size = logical_sector_size;
    let (file, dwg) = vhdx_bytes_from_raw(raw, opts.clone())?;
    let mut levels = vec![ChainLevel {
        name: (*base_name).to_string(),
        file,
        data_write_guid: dwg,
        writes: vec![],
        expected: raw.to_vec(),
    }];
    for (i, name) in children.iter().enumerate() {
        let parent = &levels[levels.len() - 1];
        let writes = partial_block_writes(
            seed.wrapping_add(i as u64 + 1),
            raw.len() as u64,
            block_size,
            logical_sector_size,
        );
        let mut expected = parent.expected.clone();
        apply_writes(&mut expected, &writes);
        let mut o = opts.clone();
        o.parent = Some(ParentInfo {
            parent_linkage: parent.data_write_guid,
            relative_path: parent.name.clone(),
            absolute_win32_path: Some(format!(
                r"\\?\D:\Hyper-V\Virtual Hard Disks\{}",
                parent.name
            )),
            volume_path: None,
        });
        let (c, g) = differencing_vhdx(Cursor::new(Vec::new()), o, &writes)?;
        levels.push(ChainLevel {
            name: (*name).to_string(),
            file: c.into_inner(),
            data_write_guid: g,
            writes,
            expected,
        });
    }
    Ok(ChainFixture { levels })
}

/// Reads the current header, the BAT location and the geometry of a VHDX in memory.
fn inspect(file: &[u8]) -> Result<(Header, u64, Geometry), VhdxError> {
    let h1 = Header::parse(file.get(HEADER1_OFFSET as usize..).unwrap_or(&[]));
    let h2 = Header::parse(file.get(HEADER2_OFFSET as usize..).unwrap_or(&[]));
    let header = match (h1, h2) {
        (Ok(a), Ok(b)) => {
            if a.sequence_number >= b.sequence_number {
                a
            } else {
                b
            }
        }
        (Ok(a), Err(_)) => a,
        (Err(_), Ok(b)) => b,
        (Err(e), Err(_)) => return Err(e.into()),
    };
    let rt = RegionTable::parse(file.get(REGION_TABLE1_OFFSET as usize..).unwrap_or(&[]))?;
    let find = |g: Guid| {
        rt.entries
            .iter()
            .find(|e| e.guid == g)
            .map(|e| e.file_offset)
            .ok_or(VhdxError::InvalidOptions("region missing".into()))
    };
    let bat_off = find(BAT_REGION)?;
    let meta_off = find(METADATA_REGION)? as usize;
    let mt = MetadataTable::parse(file.get(meta_off..).unwrap_or(&[]))?;
    let item = |g: Guid| -> Result<&[u8], VhdxError> {
        let e = mt
            .entries
            .iter()
            .find(|e| e.item_id == g)
            .ok_or(VhdxError::InvalidOptions("metadata item missing".into()))?;
        let s = meta_off + e.offset as usize;
        file.get(s..s + e.length as usize)
            .ok_or(VhdxError::InvalidOptions(
                "metadata item out of file".into(),
            ))
    };
    let fp = FileParameters::parse(item(FILE_PARAMETERS_ITEM)?)?;
    let vs = le_u64(item(VIRTUAL_DISK_SIZE_ITEM)?, 0);
    let lss = le_u32(item(LOGICAL_SECTOR_SIZE_ITEM)?, 0);
    let geo = Geometry::new(vs, fp.block_size, lss, fp.has_parent)?;
    Ok((header, bat_off, geo))
}

/// Simulates a crash after metadata updates reached the log but not their
/// final place: writes `entries` (one `Vec<LogOp>` per log entry, consecutive
/// sequence numbers from `first_sequence`) into the log of the VHDX in `file`
/// starting `at` bytes into the log, each with `Tail` = `at`, sets a fresh
/// LogGuid in both headers, and applies nothing. Returns the LogGuid.
///
/// `flushed_file_offset` is the file size known stable when the log was
/// written; LastFileOffset is the current size rounded up to 1 MiB.
pub fn crash_with_log(
    file: &mut [u8],
    entries: &[Vec<LogOp>],
    first_sequence: u64,
    at: u32,
    flushed_file_offset: u64,
) -> Result<Guid, VhdxError> {
    let (header, _, _) = inspect(file)?;
    let log_guid = Guid::random();
    let last = (file.len() as u64).div_ceil(MIB) * MIB;
    let mut pos = at as usize;
    for (i, ops) in entries.iter().enumerate() {
        let e = encode_entry(
            first_sequence + i as u64,
            at,
            log_guid,
            flushed_file_offset,
            last,
            ops,
        )?;
        if pos + e.len() > header.log_length as usize {
            return Err(VhdxError::InvalidOptions(
                "log entries do not fit the log".into(),
            ));
        }
        let s = header.log_offset as usize + pos;
        file[s..s + e.len()].copy_from_slice(&e);
        pos += e.len();
    }
    write_headers(file, &header, log_guid);
    Ok(log_guid)
}

/// Rewrites both headers as an open-for-write would (new FileWriteGuid,
/// sequence numbers +1 and +2) with `log_guid`.
fn write_headers(file: &mut [u8], current: &Header, log_guid: Guid) {
    let mut h = current.clone();
    h.file_write_guid = Guid::random();
    h.log_guid = log_guid;
    for (k, off) in [(1u64, HEADER1_OFFSET), (2, HEADER2_OFFSET)] {
        h.sequence_number = current.sequence_number + k;
        let b = h.encode();
        file[off as usize..off as usize + b.len()].copy_from_slice(&b);
    }
}

/// A VHDX left dirty by a simulated host crash, and what it must read as.
#[derive(Debug, Clone)]
pub struct DirtyLogFixture {
    /// The file's bytes (LogGuid set, updates only in the log).
    pub file: Vec<u8>,
    /// The virtual disk after the log is replayed.
    pub expected_raw: Vec<u8>,
    /// The header's LogGuid.
    pub log_guid: Guid,
    /// Entries in the active sequence.
    pub entries: usize,
    /// Whether a zero descriptor (which needs a BAT of at least two 4 KiB
    /// pages, i.e. more than 512 blocks) is among them.
    pub has_zero_descriptor: bool,
}

/// Builds a dynamic VHDX of `raw` (block size `block_size`, 512 B sectors),
/// then simulates a Hyper-V crash in the middle of metadata updates:
///
/// - new payload blocks already written at the end of the file (payload never
///   goes through the log), one of them only half filled;
/// - a FULLY_PRESENT block moved to a new place with changed content;
/// - a block trimmed back to NOT_PRESENT;
/// - if the BAT spans two or more 4 KiB pages, one whole page zeroed by a zero
///   descriptor (its blocks read as zeros afterwards);
///
/// where every BAT change exists only in log entries (several consecutive,
/// cumulative entries, so replay order matters), and an older entry with a
/// foreign LogGuid sits at the start of the log and must be ignored.
///
/// `raw` needs at least two allocated (non-zero) blocks and two all-zero blocks.
pub fn dirty_log_vhdx(
    raw: &[u8],
    block_size: u32,
    seed: u64,
) -> Result<DirtyLogFixture, VhdxError> {
    let mut opts = VhdxOptions::new(raw.len() as u64);
    opts.block_size = block_size;
    opts.logical_sector_size = 512;
    let (mut file, _) = vhdx_bytes_from_raw(raw, opts)?;
    let (header, bat_off, geo) = inspect(&file)?;
    let bs = u64::from(block_size);
    let read_bat = |f: &[u8], b: u64| {
        let at = (bat_off + 8 * geo.payload_bat_index(b)) as usize;
        BatEntry(le_u64(f, at))
    };
    let mut bat: Vec<u8> = file[bat_off as usize..(bat_off + geo.bat_bytes()) as usize].to_vec();
    let set = |bat: &mut Vec<u8>, b: u64, e: BatEntry| {
        let at = (8 * geo.payload_bat_index(b)) as usize;
        bat[at..at + 8].copy_from_slice(&e.0.to_le_bytes());
    };
    let present: Vec<u64> = (0..geo.data_blocks)
        .filter(|&b| read_bat(&file, b).state() == PAYLOAD_BLOCK_FULLY_PRESENT)
        .collect();
    let absent: Vec<u64> = (0..geo.data_blocks)
        .filter(|&b| read_bat(&file, b).state() == PAYLOAD_BLOCK_NOT_PRESENT)
        .collect();
    if present.len() < 2 || absent.len() < 2 {
        return Err(VhdxError::InvalidOptions(
            "dirty_log_vhdx needs at least two allocated and two empty blocks".into(),
        ));
    }
    let pick = |v: &[u64], k: u64| v[((seed.wrapping_add(k)) % v.len() as u64) as usize];
    let moved = pick(&present, 0);
    let trimmed = present
        .iter()
        .copied()
        .find(|&b| b != moved)
        .unwrap_or(moved);
    let new1 = pick(&absent, 1);
    let new2 = absent.iter().copied().find(|&b| b != new1).unwrap_or(new1);

    let mut expected = raw.to_vec();
    let flushed = file.len() as u64;
    let append_block = |file: &mut Vec<u8>, data: &[u8]| {
        let at = (file.len() as u64).div_ceil(MIB) * MIB;
        file.resize((at + bs) as usize, 0);
        file[at as usize..at as usize + data.len()].copy_from_slice(data);
        at
    };
    let range = |b: u64| (b * bs) as usize..((b * bs + geo.block_len(b)) as usize);

    // Entry 1: move a block (new place, changed first sector) and trim another.
    let mut moved_data = raw[range(moved)].to_vec();
    moved_data[..512].copy_from_slice(&pattern(seed ^ 1, 512));
    let moved_at = append_block(&mut file, &moved_data);
    expected[range(moved)].copy_from_slice(&moved_data);
    set(
        &mut bat,
        moved,
        BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, moved_at),
    );
    expected[range(trimmed)].fill(0);
    set(
        &mut bat,
        trimmed,
        BatEntry::new(PAYLOAD_BLOCK_NOT_PRESENT, 0),
    );
    let mut entries = vec![bat_page_ops(&bat, &file, bat_off)];

    // Entry 2: two new blocks, the second only half written.
    let d1 = pattern(seed ^ 2, geo.block_len(new1) as usize);
    let at1 = append_block(&mut file, &d1);
    expected[range(new1)].copy_from_slice(&d1);
    set(
        &mut bat,
        new1,
        BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, at1),
    );
    let half = (geo.block_len(new2) / 2) as usize;
    let d2 = pattern(seed ^ 3, half);
    let at2 = append_block(&mut file, &d2);
    let r2 = range(new2);
    expected[r2.start..r2.start + half].copy_from_slice(&d2);
    set(
        &mut bat,
        new2,
        BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, at2),
    );
    entries.push(bat_page_ops(&bat, &file, bat_off));

    // Entry 3 (big BATs only): zero a whole BAT page holding allocated blocks.
    let pages = geo.bat_bytes().div_ceil(LOG_SECTOR as u64);
    let mut has_zero = false;
    if pages >= 2 {
        let page = (1..pages).find(|&p| {
            (p * 512..((p + 1) * 512).min(geo.bat_entries)).any(|i| {
                !geo.is_bitmap_index(i)
                    && BatEntry(le_u64(&bat, 8 * i as usize)).state() == PAYLOAD_BLOCK_FULLY_PRESENT
            })
        });
        if let Some(p) = page {
            for i in p * 512..((p + 1) * 512).min(geo.bat_entries) {
                if !geo.is_bitmap_index(i) {
                    let b = geo.block_of_bat_index(i);
                    if b < geo.data_blocks {
                        expected[range(b)].fill(0);
                    }
                }
            }
            let s = (p * 512 * 8) as usize;
            let e = (s + LOG_SECTOR).min(bat.len());
            bat[s..e].fill(0);
            entries.push(vec![LogOp::Zero {
                file_offset: bat_off + p * LOG_SECTOR as u64,
                length: LOG_SECTOR as u64,
            }]);
            has_zero = true;
        }
    }

    // A stale entry from an earlier session (other LogGuid) at the log start:
    // it would wipe BAT page 0 if anyone replayed it.
    let stale = encode_entry(
        7,
        0,
        Guid::random(),
        flushed,
        flushed,
        &[LogOp::Zero {
            file_offset: bat_off,
            length: LOG_SECTOR as u64,
        }],
    )?;
    let log_start = header.log_offset as usize;
    file[log_start..log_start + stale.len()].copy_from_slice(&stale);

    let first_seq = 0x1_0000_0000u64 + (seed % 1000) * 3 + 1;
    let n = entries.len();
    let at = (2 * LOG_SECTOR) as u32;
    let log_guid = crash_with_log(&mut file, &entries, first_seq, at, flushed)?;
    Ok(DirtyLogFixture {
        file,
        expected_raw: expected,
        log_guid,
        entries: n,
        has_zero_descriptor: has_zero,
    })
}

/// Data descriptors for every BAT page of `bat` that differs from the file.
fn bat_page_ops(bat: &[u8], file: &[u8], bat_off: u64) -> Vec<LogOp> {
    let mut ops = Vec::new();
    for (p, page) in bat.chunks(LOG_SECTOR).enumerate() {
        let at = bat_off as usize + p * LOG_SECTOR;
        let mut data = file[at..at + LOG_SECTOR].to_vec();
        data[..page.len()].copy_from_slice(page);
        if data[..] != file[at..at + LOG_SECTOR] {
            ops.push(LogOp::Data {
                file_offset: at as u64,
                data,
            });
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic() {
        assert_eq!(pattern(1, 100), pattern(1, 100));
        assert_ne!(pattern(1, 100), pattern(2, 100));
        assert_eq!(pattern(0, 13).len(), 13);
    }

    #[test]
    fn writes_stay_inside_and_aligned() {
        for (vs, bs, s) in [(8u64 << 20, 1u32 << 20, 512u32), (16 << 20, 1 << 20, 4096)] {
            let w = partial_block_writes(3, vs, bs, s);
            assert!(w.len() > 10);
            for (o, d) in &w {
                assert_eq!(o % u64::from(s), 0);
                assert_eq!(d.len() as u64 % u64::from(s), 0);
                assert!(o + d.len() as u64 <= vs);
            }
        }
    }

    #[test]
    fn dirty_fixture_differs_from_stale() {
        let mut raw = vec![0u8; 8 << 20];
        raw[..3 << 20].copy_from_slice(&pattern(5, 3 << 20));
        let f = dirty_log_vhdx(&raw, 1 << 20, 9).expect("test value");
        assert_ne!(f.expected_raw, raw);
        assert_eq!(f.entries, 2);
        assert!(!f.has_zero_descriptor);
    }
}
