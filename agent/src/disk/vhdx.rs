//! One VHDX/AVHDX file: headers, (in-memory) log replay, region table,
//! metadata, BAT, and block reads. Parents are the chain module's business:
//! reads that fall through to the parent get it passed in.

use tierback_format::vhdx::layout::*;
use tierback_format::vhdx::{Guid, StructError};

use super::log;
use super::ranges::{bit_runs, push_range};
use super::source::Image;
use super::{human_size, DiskError, VirtualDisk};

/// A parsed VHDX file.
pub(crate) struct VhdxFile {
    pub(crate) img: Image,
    pub(crate) header: Header,
    pub(crate) geo: Geometry,
    pub(crate) params: FileParameters,
    pub(crate) physical_sector_size: u32,
    pub(crate) parent_locator: Option<ParentLocator>,
    bat: Vec<u64>,
    /// Tolerated damage, for `describe`.
    pub(crate) notes: Vec<String>,
    /// Log entries replayed in memory at open.
    pub(crate) replayed_entries: usize,
}

/// A named byte range of the file, for overlap checks.
struct Area {
    start: u64,
    end: u64,
    name: String,
}

fn overlap(a: &Area, start: u64, end: u64) -> bool {
    start < a.end && a.start < end
}

impl VhdxFile {
    /// Parses everything but the parent. `img` must start with "vhdxfile".
    pub(crate) fn open(mut img: Image) -> Result<VhdxFile, DiskError> {
        let path = img.path.clone();
        let p = path.as_path();
        let real_len = img.real_len();
        if real_len < 8 {
            return Err(DiskError::truncated(
                p,
                real_len,
                "the file identifier needs 8 bytes",
            ));
        }
        let mut sig = [0u8; 8];
        img.read_raw(0, &mut sig)?;
        if sig != FILE_SIGNATURE {
            return Err(DiskError::corrupt(
                p,
                "no \"vhdxfile\" signature at offset 0",
            ));
        }
        if real_len < HEADER_SECTION_SIZE {
            return Err(DiskError::truncated(
                p,
                real_len,
                "the VHDX header section (identifier, headers, region tables) needs 1 MiB",
            ));
        }

        // Headers: never read through the log.
        let mut notes = Vec::new();
        let mut parsed = Vec::new();
        for (n, off) in [(1, HEADER1_OFFSET), (2, HEADER2_OFFSET)] {
            let mut b = vec![0u8; HEADER_SIZE];
            img.read_raw(off, &mut b)?;
            parsed.push(Header::parse(&b).map_err(|e| format!("header {n} {e}")));
        }
        let h2 = parsed.pop().unwrap_or(Err(String::new()));
        let h1 = parsed.pop().unwrap_or(Err(String::new()));
        let header = match (h1, h2) {
            (Ok(a), Ok(b)) => {
                if a.sequence_number > b.sequence_number {
                    a
                } else if b.sequence_number > a.sequence_number {
                    b
                } else if a == b {
                    a
                } else {
                    return Err(DiskError::corrupt(
                        p,
                        format!(
                            "headers 1 and 2 differ but have the same sequence number {}",
                            a.sequence_number
                        ),
                    ));
                }
            }
            (Ok(a), Err(e)) | (Err(e), Ok(a)) => {
                notes.push(format!("{e}; using the other header"));
                a
            }
            (Err(e1), Err(e2)) => {
                return Err(DiskError::corrupt(
                    p,
                    format!("no valid header: {e1}; {e2}"),
                ));
            }
        };
        if header.version != 1 {
            return Err(DiskError::unsupported(
                p,
                format!("VHDX version {}", header.version),
            ));
        }

        // Log: replay in memory when dirty.
        let mut areas = vec![Area {
            start: 0,
            end: HEADER_SECTION_SIZE,
            name: "the header section".into(),
        }];
        let mut replayed_entries = 0;
        let mut backed_len = real_len;
        if !header.log_guid.is_zero() {
            if header.log_version != 0 {
                return Err(DiskError::unsupported(
                    p,
                    format!("log version {}", header.log_version),
                ));
            }
            let r = log::replay(&img, &header)?;
            replayed_entries = r.entries;
            backed_len = backed_len.max(r.data_extent);
            img.set_overlay(r.overlay, r.last_file_offset);
        }
        if header.log_length > 0 {
            let (lo, ll) = (header.log_offset, u64::from(header.log_length));
            if lo < HEADER_SECTION_SIZE || !is_aligned(lo, MIB) || !is_aligned(ll, MIB) {
                return Err(DiskError::corrupt(
                    p,
                    format!(
                        "log at {lo} of {ll} bytes is not 1 MiB aligned after the header section"
                    ),
                ));
            }
            areas.push(Area {
                start: lo,
                end: lo.saturating_add(ll),
                name: "the log".into(),
            });
        }
        let len = img.len();

        // Region table: two copies, read through the log overlay.
        let mut rt_errors = Vec::new();
        let mut rt = None;
        for (n, off) in [(1, REGION_TABLE1_OFFSET), (2, REGION_TABLE2_OFFSET)] {
            let b = img.read_vec(off, REGION_TABLE_SIZE as u64)?;
            match RegionTable::parse(&b) {
                Ok(t) => {
                    rt = Some(t);
                    break;
                }
                Err(e) => rt_errors.push(format!("region table {n} {e}")),
            }
        }
        let rt = match rt {
            Some(t) => {
                if let Some(e) = rt_errors.first() {
                    notes.push(format!("{e}; using region table 2"));
                }
                t
            }
            None => {
                let what = if rt_errors.iter().all(|e| e.contains("CRC-32C")) {
                    "region table CRC-32C mismatch (both copies)".to_string()
                } else {
                    format!("no valid region table: {}", rt_errors.join("; "))
                };
                return Err(DiskError::corrupt(p, what));
            }
        };
        let mut bat_region = None;
        let mut meta_region = None;
        for e in &rt.entries {
            let name = if e.guid == BAT_REGION {
                "BAT region"
            } else if e.guid == METADATA_REGION {
                "metadata region"
            } else if e.required {
                return Err(DiskError::unsupported(
                    p,
                    format!("required region {} is unknown", e.guid),
                ));
            } else {
                "unknown region"
            };
            let (start, rlen) = (e.file_offset, u64::from(e.length));
            if start < HEADER_SECTION_SIZE
                || !is_aligned(start, MIB)
                || rlen == 0
                || !is_aligned(rlen, MIB)
            {
                return Err(DiskError::corrupt(
                    p,
                    format!("{name} at {start} of {rlen} bytes is not 1 MiB aligned after the header section"),
                ));
            }
            let end = start.saturating_add(rlen);
            if name != "unknown region" && end > backed_len {
                return Err(DiskError::truncated(
                    p,
                    backed_len,
                    format!("the {name} needs {end}"),
                ));
            }
            if let Some(a) = areas.iter().find(|a| overlap(a, start, end)) {
                return Err(DiskError::corrupt(p, format!("{name} overlaps {}", a.name)));
            }
            areas.push(Area {
                start,
                end,
                name: format!("the {name}"),
            });
            let slot = if e.guid == BAT_REGION {
                &mut bat_region
            } else if e.guid == METADATA_REGION {
                &mut meta_region
            } else {
                continue;
            };
            if slot.is_some() {
                return Err(DiskError::corrupt(
                    p,
                    format!("region table lists the {name} twice"),
                ));
            }
            *slot = Some((start, rlen));
        }
        let (Some((bat_off, bat_len)), Some((meta_off, meta_len))) = (bat_region, meta_region)
        else {
            return Err(DiskError::corrupt(
                p,
                "region table lacks the BAT or the metadata region",
            ));
        };

        // Metadata table and items.
        if meta_len < METADATA_TABLE_SIZE as u64 {
            return Err(DiskError::corrupt(
                p,
                "metadata region is smaller than its 64 KiB table",
            ));
        }
        let table = img.read_vec(meta_off, METADATA_TABLE_SIZE as u64)?;
        let mt = MetadataTable::parse(&table)
            .map_err(|e| DiskError::corrupt(p, format!("metadata table {e}")))?;
        let known = [
            (FILE_PARAMETERS_ITEM, "file parameters", 8u32),
            (VIRTUAL_DISK_SIZE_ITEM, "virtual disk size", 8),
            (PAGE83_ITEM, "virtual disk id", 16),
            (LOGICAL_SECTOR_SIZE_ITEM, "logical sector size", 4),
            (PHYSICAL_SECTOR_SIZE_ITEM, "physical sector size", 4),
            (PARENT_LOCATOR_ITEM, "parent locator", 20),
        ];
        let mut items: Vec<(u64, u64)> = Vec::new();
        let mut found: [Option<Vec<u8>>; 6] = Default::default();
        for (i, e) in mt.entries.iter().enumerate() {
            if mt.entries[..i]
                .iter()
                .any(|o| o.item_id == e.item_id && o.is_user == e.is_user)
            {
                return Err(DiskError::corrupt(
                    p,
                    format!("metadata item {} appears twice", e.item_id),
                ));
            }
            let (off, ilen) = (u64::from(e.offset), u64::from(e.length));
            if ilen == 0 {
                if off != 0 {
                    return Err(DiskError::corrupt(
                        p,
                        format!("metadata item {} is empty but has offset {off}", e.item_id),
                    ));
                }
            } else if off < METADATA_TABLE_SIZE as u64
                || ilen > u64::from(MAX_METADATA_ITEM)
                || off + ilen > meta_len
            {
                return Err(DiskError::corrupt(
                    p,
                    format!("metadata item {} at {off} of {ilen} bytes lies outside the metadata region", e.item_id),
                ));
            } else {
                if items.iter().any(|&(s, l)| off < s + l && s < off + ilen) {
                    return Err(DiskError::corrupt(
                        p,
                        format!("metadata item {} overlaps another item", e.item_id),
                    ));
                }
                items.push((off, ilen));
            }
            let k = known
                .iter()
                .position(|(g, _, _)| *g == e.item_id && !e.is_user);
            match k {
                Some(k) => {
                    let (_, name, min) = known[k];
                    if ilen < u64::from(min) {
                        return Err(DiskError::corrupt(
                            p,
                            format!("metadata item {name} is {ilen} bytes, needs {min}"),
                        ));
                    }
                    found[k] = Some(img.read_vec(meta_off + off, ilen)?);
                }
                None if e.is_required => {
                    return Err(DiskError::unsupported(
                        p,
                        format!("required metadata item {} is unknown", e.item_id),
                    ));
                }
                None => {}
            }
        }
        let item = |k: usize| -> Result<&Vec<u8>, DiskError> {
            found[k].as_ref().ok_or_else(|| {
                DiskError::corrupt(p, format!("metadata item {} is missing", known[k].1))
            })
        };
        let params = FileParameters::parse(item(0)?)
            .map_err(|e| DiskError::corrupt(p, format!("file parameters {e}")))?;
        let virtual_size = le(item(1)?, 8);
        item(2)?; // virtual disk id: required, not used for reading
        let lss = le(item(3)?, 4) as u32;
        let pss = le(item(4)?, 4) as u32;
        let geo = Geometry::new(virtual_size, params.block_size, lss, params.has_parent)
            .map_err(|e| DiskError::corrupt(p, e.to_string()))?;
        if pss != 512 && pss != 4096 {
            return Err(DiskError::corrupt(
                p,
                format!("physical sector size {pss} is neither 512 nor 4096"),
            ));
        }
        let parent_locator = match (&found[5], params.has_parent) {
            (Some(b), true) => {
                let pl = ParentLocator::parse(b).map_err(|e: StructError| {
                    DiskError::corrupt(p, format!("parent locator {e}"))
                })?;
                if pl.locator_type != VHDX_PARENT_LOCATOR_TYPE {
                    return Err(DiskError::unsupported(
                        p,
                        format!("parent locator type {}", pl.locator_type),
                    ));
                }
                Some(pl)
            }
            (None, true) => {
                return Err(DiskError::corrupt(
                    p,
                    "differencing disk without a parent locator",
                ))
            }
            (_, false) => None,
        };

        // BAT.
        let bat_bytes = geo.bat_bytes();
        if bat_bytes > bat_len {
            return Err(DiskError::corrupt(
                p,
                format!(
                    "BAT region of {bat_len} bytes is too small for {} entries",
                    geo.bat_entries
                ),
            ));
        }
        let raw_bat = img.read_vec(bat_off, bat_bytes)?;
        let bat: Vec<u64> = raw_bat
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        drop(raw_bat);
        let mut blocks: Vec<(u64, u64, u64)> = Vec::new();
        for (i, &v) in bat.iter().enumerate() {
            let i = i as u64;
            let e = BatEntry(v);
            let (len_needed, what) = if geo.is_bitmap_index(i) {
                if !geo.has_parent {
                    continue; // never read in a non-differencing file
                }
                match e.state() {
                    SB_BLOCK_NOT_PRESENT => continue,
                    SB_BLOCK_PRESENT => (SECTOR_BITMAP_BLOCK_SIZE, "sector bitmap"),
                    s => {
                        return Err(DiskError::corrupt(
                            p,
                            format!("BAT entry {i} has invalid sector bitmap state {s}"),
                        ))
                    }
                }
            } else {
                let block = geo.block_of_bat_index(i);
                if block >= geo.data_blocks {
                    continue; // padding of the last chunk in a differencing file
                }
                match e.state() {
                    PAYLOAD_BLOCK_NOT_PRESENT
                    | PAYLOAD_BLOCK_UNDEFINED
                    | PAYLOAD_BLOCK_ZERO
                    | PAYLOAD_BLOCK_UNMAPPED => continue,
                    PAYLOAD_BLOCK_FULLY_PRESENT => (geo.block_len(block), "payload block"),
                    PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                        if !geo.has_parent {
                            return Err(DiskError::corrupt(
                                p,
                                format!(
                                    "BAT entry {i} is PARTIALLY_PRESENT in a disk without parent"
                                ),
                            ));
                        }
                        let sb = BatEntry(
                            bat.get(geo.bitmap_bat_index(block / geo.chunk_ratio) as usize)
                                .copied()
                                .unwrap_or(0),
                        );
                        if sb.state() != SB_BLOCK_PRESENT {
                            return Err(DiskError::corrupt(
                                p,
                                format!("BAT entry {i} is PARTIALLY_PRESENT but its sector bitmap block is not present"),
                            ));
                        }
                        (geo.block_len(block), "payload block")
                    }
                    s => {
                        return Err(DiskError::corrupt(
                            p,
                            format!("BAT entry {i} has reserved state {s}"),
                        ))
                    }
                }
            };
            let start = e.file_offset();
            let end = start.saturating_add(len_needed);
            if start < HEADER_SECTION_SIZE {
                return Err(DiskError::corrupt(
                    p,
                    format!("BAT entry {i} points into the header section"),
                ));
            }
            if end > len || end == u64::MAX {
                return Err(DiskError::corrupt(p, format!("BAT entry {i} points beyond end of file ({what} at {start}, file is {len} bytes)")));
            }
            if let Some(a) = areas.iter().find(|a| overlap(a, start, end)) {
                return Err(DiskError::corrupt(
                    p,
                    format!("BAT entry {i} ({what} at {start}) overlaps {}", a.name),
                ));
            }
            blocks.push((start, end, i));
        }
        blocks.sort_unstable();
        for w in blocks.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(DiskError::corrupt(
                    p,
                    format!("BAT entries {} and {} overlap", w[0].2, w[1].2),
                ));
            }
        }
        Ok(VhdxFile {
            img,
            header,
            geo,
            params,
            physical_sector_size: pss,
            parent_locator,
            bat,
            notes,
            replayed_entries,
        })
    }

    fn entry(&self, block: u64) -> BatEntry {
        BatEntry(self.bat[self.geo.payload_bat_index(block) as usize])
    }

    /// "fixed", "dynamic" or "differencing".
    pub(crate) fn kind(&self) -> &'static str {
        if self.params.has_parent {
            "differencing"
        } else if self.params.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }

    /// "dynamic VHDX, 32 MiB blocks, 512 B sectors" (+ notes about the file).
    pub(crate) fn describe(&self) -> String {
        let mut s = format!(
            "{} VHDX, {} blocks, {} B sectors",
            self.kind(),
            human_size(u64::from(self.geo.block_size)),
            self.geo.logical_sector_size
        );
        if self.replayed_entries > 0 {
            s += &format!(
                ", dirty log replayed in memory ({} entries)",
                self.replayed_entries
            );
        }
        for n in &self.notes {
            s += &format!(" ({n})");
        }
        s
    }

    /// Sector-bitmap bits for `count` sectors from sector `first` of `block`:
    /// returns the bytes and the bit index of `first` in them.
    fn bitmap(&self, block: u64, first: u64, count: u64) -> Result<(Vec<u8>, u64), DiskError> {
        let sb =
            BatEntry(self.bat[self.geo.bitmap_bat_index(block / self.geo.chunk_ratio) as usize]);
        let bit0 = (block % self.geo.chunk_ratio) * self.geo.sectors_per_block() + first;
        let (b0, b1) = (bit0 / 8, (bit0 + count).div_ceil(8));
        let bytes = self.img.read_vec(sb.file_offset() + b0, b1 - b0)?;
        Ok((bytes, bit0 % 8))
    }

    /// Reads virtual bytes; `parent` serves what this file passes through.
    pub(crate) fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        parent: Option<&dyn VirtualDisk>,
    ) -> Result<(), DiskError> {
        let bs = u64::from(self.geo.block_size);
        let lss = u64::from(self.geo.logical_sector_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let ib = pos % bs;
            let n = (bs - ib).min((buf.len() - done) as u64) as usize;
            let out = &mut buf[done..done + n];
            let e = self.entry(block);
            match e.state() {
                PAYLOAD_BLOCK_FULLY_PRESENT => self.img.read_payload(e.file_offset() + ib, out)?,
                PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                    let first = ib / lss;
                    let count = (ib + n as u64).div_ceil(lss) - first;
                    let (bits, bit0) = self.bitmap(block, first, count)?;
                    for (s, l, present) in bit_runs(&bits, bit0, count, true) {
                        // Sector run [first + s - bit0, +l) clipped to [ib, ib + n).
                        let rs = ((first + s - bit0) * lss).max(ib);
                        let re = ((first + s - bit0 + l) * lss).min(ib + n as u64);
                        let o = &mut out[(rs - ib) as usize..(re - ib) as usize];
                        if present {
                            self.img.read_payload(e.file_offset() + rs, o)?;
                        } else {
                            read_parent(parent, block * bs + rs, o)?;
                        }
                    }
                }
                PAYLOAD_BLOCK_NOT_PRESENT if self.geo.has_parent => read_parent(parent, pos, out)?,
                // ZERO; UNDEFINED and UNMAPPED may read as zeros per spec; NOT_PRESENT without parent.
                _ => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// (present, pass-through, hidden) byte ranges of this file alone:
    /// present = data held here; pass-through = read from the parent;
    /// hidden = zero/undefined/unmapped blocks of a differencing file.
    pub(crate) fn ranges(&self) -> Result<[Vec<(u64, u64)>; 3], DiskError> {
        let bs = u64::from(self.geo.block_size);
        let lss = u64::from(self.geo.logical_sector_size);
        let (mut present, mut pass, mut hidden) = (Vec::new(), Vec::new(), Vec::new());
        for block in 0..self.geo.data_blocks {
            let start = block * bs;
            let blen = self.geo.block_len(block);
            match self.entry(block).state() {
                PAYLOAD_BLOCK_FULLY_PRESENT => push_range(&mut present, start, blen),
                PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                    let count = blen.div_ceil(lss);
                    let (bits, bit0) = self.bitmap(block, 0, count)?;
                    for (s, l, here) in bit_runs(&bits, bit0, count, true) {
                        let rs = start + (s - bit0) * lss;
                        let rl = (l * lss).min(start + blen - rs);
                        push_range(if here { &mut present } else { &mut pass }, rs, rl);
                    }
                }
                PAYLOAD_BLOCK_NOT_PRESENT if self.geo.has_parent => {
                    push_range(&mut pass, start, blen)
                }
                PAYLOAD_BLOCK_NOT_PRESENT => {}
                _ if self.geo.has_parent => push_range(&mut hidden, start, blen),
                _ => {}
            }
        }
        Ok([present, pass, hidden])
    }

    /// The current header's DataWriteGuid.
    pub(crate) fn data_write_guid(&self) -> Guid {
        self.header.data_write_guid
    }
}

fn le(b: &[u8], n: usize) -> u64 {
    let mut a = [0u8; 8];
    a[..n].copy_from_slice(&b[..n]);
    u64::from_le_bytes(a)
}

/// Reads from the parent; bytes beyond the parent's size (or with no parent) read as zeros.
pub(crate) fn read_parent(
    parent: Option<&dyn VirtualDisk>,
    pos: u64,
    out: &mut [u8],
) -> Result<(), DiskError> {
    let Some(parent) = parent else {
        out.fill(0);
        return Ok(());
    };
    let ps = parent.virtual_size();
    let avail = ps.saturating_sub(pos).min(out.len() as u64) as usize;
    if avail > 0 {
        parent.read_at(pos, &mut out[..avail])?;
    }
    out[avail..].fill(0);
    Ok(())
}
