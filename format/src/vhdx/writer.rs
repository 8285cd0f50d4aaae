//! The VHDX writer: dynamic and differencing VHDX onto any `Write + Seek`.
//!
//! File layout written (all offsets 1 MiB aligned, as MS-VHDX requires):
//!
//! ```text
//! 0        file type identifier, header 1 (64 KiB), header 2 (128 KiB),
//!          region table 1 (192 KiB), region table 2 (256 KiB)
//! 1 MiB    log (1 MiB, empty: LogGuid is zero)
//! 2 MiB    metadata region (1 MiB): table, then the items
//! 3 MiB    BAT (rounded up to 1 MiB)
//! ...      payload and sector bitmap blocks, appended in allocation order
//! ```
//!
//! Payload is written straight to its final place as it arrives; the
//! structures that describe it (BAT, sector bitmaps, metadata, region tables,
//! headers) are written by [`VhdxWriter::finish`]. A file that was not
//! finished is not a valid VHDX (its header section is blank), which is the
//! safe failure for a restore target.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};

use super::guid::Guid;
use super::layout::*;
use super::VhdxError;

/// Creator string stored in the file type identifier.
pub const CREATOR: &str = concat!("Tierback ", env!("CARGO_PKG_VERSION"));

/// Where the writer puts the log.
pub const LOG_OFFSET: u64 = MIB;
/// Log size the writer reserves.
pub const LOG_LENGTH: u32 = MIB as u32;
/// Where the writer puts the metadata region.
pub const METADATA_OFFSET: u64 = 2 * MIB;
/// Metadata region size.
pub const METADATA_LENGTH: u32 = MIB as u32;
/// Where the writer puts the BAT.
pub const BAT_OFFSET: u64 = 3 * MIB;

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdxOptions {
    /// Virtual disk size in bytes; a multiple of the logical sector size, at most 64 TiB.
    pub virtual_size: u64,
    /// Payload block size: power of two, 1 MiB..=256 MiB (default 32 MiB).
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Makes a differencing VHDX (AVHDX) of this parent.
    pub parent: Option<ParentInfo>,
}

impl VhdxOptions {
    /// Defaults for a dynamic VHDX of `virtual_size` bytes: 32 MiB blocks, 512 B
    /// logical and 4 KiB physical sectors (what Hyper-V creates).
    pub fn new(virtual_size: u64) -> VhdxOptions {
        VhdxOptions {
            virtual_size,
            block_size: 32 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            parent: None,
        }
    }
}

impl Default for VhdxOptions {
    fn default() -> VhdxOptions {
        VhdxOptions::new(0)
    }
}

/// The parent of a differencing VHDX, as written into its parent locator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentInfo {
    /// The parent's DataWriteGuid (`parent_linkage`).
    pub parent_linkage: Guid,
    /// Path of the parent relative to the child's folder; `/` is written as `\`.
    pub relative_path: String,
    /// `\\?\d:\…` path of the parent, if known.
    pub absolute_win32_path: Option<String>,
    /// `\\?\Volume{…}\…` path of the parent, if known.
    pub volume_path: Option<String>,
}

/// Writes one VHDX. See the module docs for the layout.
pub struct VhdxWriter<W> {
    w: W,
    geo: Geometry,
    physical_sector_size: u32,
    parent: Option<ParentInfo>,
    bat: Vec<BatEntry>,
    /// Sector bitmaps of a differencing file, by chunk (1 MiB each), written at finish.
    bitmaps: BTreeMap<u64, Vec<u8>>,
    next_free: u64,
    file_write_guid: Guid,
    data_write_guid: Guid,
    virtual_disk_id: Guid,
}

fn bat_region_length(geo: &Geometry) -> u64 {
    geo.bat_bytes().div_ceil(MIB).max(1) * MIB
}

impl<W: Write + Seek> VhdxWriter<W> {
    /// Starts a new VHDX on `w`, which should be empty. `w` must read back
    /// zeros where it was never written (as files and `Cursor<Vec<u8>>` do when
    /// written past their end): unwritten parts of allocated blocks rely on it.
    pub fn create(w: W, opts: VhdxOptions) -> Result<Self, VhdxError> {
        let geo = Geometry::new(
            opts.virtual_size,
            opts.block_size,
            opts.logical_sector_size,
            opts.parent.is_some(),
        )
        .map_err(|e| VhdxError::InvalidOptions(e.to_string()))?;
        if opts.physical_sector_size != 512 && opts.physical_sector_size != 4096 {
            return Err(VhdxError::InvalidOptions(format!(
                "physical sector size {} is neither 512 nor 4096",
                opts.physical_sector_size
            )));
        }
        if let Some(p) = &opts.parent {
            if p.relative_path.is_empty() {
                return Err(VhdxError::InvalidOptions(
                    "parent relative_path is empty".into(),
                ));
            }
        }
        let bat_len = bat_region_length(&geo);
        if bat_len > u64::from(u32::MAX) {
            return Err(VhdxError::InvalidOptions(
                "BAT would exceed 4 GiB; use a larger block size".into(),
            ));
        }
        let entries = usize::try_from(geo.bat_entries)
            .map_err(|_| VhdxError::InvalidOptions("BAT too large".into()))?;
        Ok(VhdxWriter {
            w,
            geo,
            physical_sector_size: opts.physical_sector_size,
            parent: opts.parent,
            bat: vec![BatEntry::default(); entries],
            bitmaps: BTreeMap::new(),
            next_free: BAT_OFFSET + bat_len,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            virtual_disk_id: Guid::random(),
        })
    }

    /// The geometry being written.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The DataWriteGuid the headers will carry (a child's `parent_linkage`).
    pub fn data_write_guid(&self) -> Guid {
        self.data_write_guid
    }

    /// Overrides the random DataWriteGuid.
    pub fn set_data_write_guid(&mut self, g: Guid) {
        self.data_write_guid = g;
    }

    /// Overrides the random FileWriteGuid.
    pub fn set_file_write_guid(&mut self, g: Guid) {
        self.file_write_guid = g;
    }

    /// Overrides the random virtual disk id (page 83 data); a child of a
    /// checkpoint normally carries its parent's.
    pub fn set_virtual_disk_id(&mut self, g: Guid) {
        self.virtual_disk_id = g;
    }

    /// Writes `data` at virtual offset `offset`; both multiples of the logical
    /// sector size. Payload blocks are allocated on demand (appended, 1 MiB
    /// aligned). All-zero data aimed at an unallocated block is not stored
    /// (sparse); in a differencing file a whole-block zero write marks the block
    /// PAYLOAD_BLOCK_ZERO so it hides the parent, and a partial one is stored.
    /// Partial-block writes in a differencing file set sector bitmap bits
    /// (PARTIALLY_PRESENT).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), VhdxError> {
        self.check_range(offset, data.len() as u64)?;
        let mut done = 0usize;
        for (block, in_block, n) in self.pieces(offset, data.len() as u64) {
            let piece = &data[done..done + n as usize];
            done += n as usize;
            if let Some(at) = self.reserve(block, in_block, n, || is_zero(piece)) {
                self.w.seek(SeekFrom::Start(at))?;
                self.w.write_all(piece)?;
            }
        }
        Ok(())
    }

    /// Reserves room for `len` bytes of payload at virtual offset `offset`
    /// (both multiples of the logical sector size) WITHOUT writing them, and
    /// returns where they belong in the file: `(file offset, range of the
    /// caller's bytes)` pieces, one per payload block touched. The caller then
    /// writes them itself (positioned writes, from several threads, direct
    /// I/O) before [`Self::finish`]; the writer never reads them back.
    /// Allocation is that of [`Self::write_at`] for data that is not all
    /// zeros; in a differencing file the sectors count as present.
    pub fn place(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, std::ops::Range<usize>)>, VhdxError> {
        self.check_range(offset, len)?;
        let mut out = Vec::new();
        let mut done = 0usize;
        for (block, in_block, n) in self.pieces(offset, len) {
            let range = done..done + n as usize;
            done += n as usize;
            if let Some(at) = self.reserve(block, in_block, n, || false) {
                out.push((at, range));
            }
        }
        Ok(out)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VhdxError> {
        let lss = u64::from(self.geo.logical_sector_size);
        if !is_aligned(offset, lss) || !is_aligned(len, lss) {
            return Err(VhdxError::Unaligned {
                offset,
                len,
                sector: self.geo.logical_sector_size,
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.geo.virtual_size)
        {
            return Err(VhdxError::OutOfRange {
                offset,
                len,
                virtual_size: self.geo.virtual_size,
            });
        }
        Ok(())
    }

    /// `offset..offset+len` split at block boundaries: (block, offset in
    /// block, length).
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let bs = u64::from(self.geo.block_size);
        let mut out = Vec::new();
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let n = (bs - pos % bs).min(len - done);
            out.push((pos / bs, pos % bs, n));
            done += n;
        }
        out
    }

    /// Allocates what a write of `len` bytes at `in_block` of `block` needs
    /// and records its sectors; returns the file offset to write them at, or
    /// `None` when nothing is to be written (all-zero data, as `zero` tells
    /// when asked, that the BAT can describe).
    fn reserve(
        &mut self,
        block: u64,
        in_block: u64,
        len: u64,
        zero: impl FnOnce() -> bool,
    ) -> Option<u64> {
        let idx = self.geo.payload_bat_index(block) as usize;
        let entry = self.bat[idx];
        let diff = self.geo.has_parent;
        let whole = in_block == 0 && len == self.geo.block_len(block);
        match entry.state() {
            PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT => {}
            state => {
                if zero() {
                    if !diff || state == PAYLOAD_BLOCK_ZERO {
                        return None;
                    }
                    if whole {
                        self.bat[idx] = BatEntry::new(PAYLOAD_BLOCK_ZERO, 0);
                        return None;
                    }
                }
                let at = self.next_free;
                self.next_free += u64::from(self.geo.block_size);
                // Non-differencing blocks, and blocks that read as zeros so far,
                // are whole: their unwritten sectors are the zeros of the file.
                let new_state = if diff && state != PAYLOAD_BLOCK_ZERO {
                    PAYLOAD_BLOCK_PARTIALLY_PRESENT
                } else {
                    PAYLOAD_BLOCK_FULLY_PRESENT
                };
                self.bat[idx] = BatEntry::new(new_state, at);
            }
        }
        let entry = self.bat[idx];
        if entry.state() == PAYLOAD_BLOCK_PARTIALLY_PRESENT {
            self.set_bits(block, in_block, len);
        }
        Some(entry.file_offset() + in_block)
    }

    fn set_bits(&mut self, block: u64, in_block: u64, len: u64) {
        let lss = u64::from(self.geo.logical_sector_size);
        let (chunk, _) = self.geo.bitmap_position(block);
        let first = (block % self.geo.chunk_ratio) * self.geo.sectors_per_block() + in_block / lss;
        let bm = self
            .bitmaps
            .entry(chunk)
            .or_insert_with(|| vec![0u8; SECTOR_BITMAP_BLOCK_SIZE as usize]);
        for s in first..first + len / lss {
            bm[(s / 8) as usize] |= 1 << (s % 8);
        }
    }

    /// Writes BAT, sector bitmaps, metadata, both region tables and both
    /// headers (fresh random FileWriteGuid/DataWriteGuid unless set), flushes,
    /// and returns `w`.
    pub fn finish(mut self) -> Result<W, VhdxError> {
        // Sector bitmaps: blocks whose every sector got written become FULLY_PRESENT.
        let spb = self.geo.sectors_per_block();
        for block in 0..self.geo.data_blocks {
            let idx = self.geo.payload_bat_index(block) as usize;
            if self.bat[idx].state() != PAYLOAD_BLOCK_PARTIALLY_PRESENT {
                continue;
            }
            let (chunk, byte) = self.geo.bitmap_position(block);
            let sectors = self.geo.block_len(block) / u64::from(self.geo.logical_sector_size);
            let full = self.bitmaps.get(&chunk).is_some_and(|bm| {
                let bytes = &bm[byte as usize..(byte + spb / 8) as usize];
                (0..sectors).all(|s| bytes[(s / 8) as usize] & (1 << (s % 8)) != 0)
            });
            if full {
                self.bat[idx] =
                    BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, self.bat[idx].file_offset());
            }
        }
        let bitmaps = std::mem::take(&mut self.bitmaps);
        for (chunk, bm) in bitmaps {
            let needed = (0..self.geo.chunk_ratio).any(|k| {
                let block = chunk * self.geo.chunk_ratio + k;
                block < self.geo.data_blocks
                    && self.bat[self.geo.payload_bat_index(block) as usize].state()
                        == PAYLOAD_BLOCK_PARTIALLY_PRESENT
            });
            if !needed {
                continue;
            }
            let at = self.next_free;
            self.next_free += SECTOR_BITMAP_BLOCK_SIZE;
            self.w.seek(SeekFrom::Start(at))?;
            self.w.write_all(&bm)?;
            self.bat[self.geo.bitmap_bat_index(chunk) as usize] =
                BatEntry::new(SB_BLOCK_PRESENT, at);
        }

        // Every allocated block must lie inside the file.
        let end = self.w.seek(SeekFrom::End(0))?;
        if end < self.next_free {
            self.w.seek(SeekFrom::Start(self.next_free - 1))?;
            self.w.write_all(&[0])?;
        }

        // BAT.
        let bat_len = bat_region_length(&self.geo);
        let mut bat = Vec::with_capacity(bat_len as usize);
        for e in &self.bat {
            bat.extend_from_slice(&e.0.to_le_bytes());
        }
        bat.resize(bat_len as usize, 0);
        self.w.seek(SeekFrom::Start(BAT_OFFSET))?;
        self.w.write_all(&bat)?;

        // Metadata region.
        let meta = self.encode_metadata();
        self.w.seek(SeekFrom::Start(METADATA_OFFSET))?;
        self.w.write_all(&meta)?;

        // Log region: zeroed so no stale entry can ever look valid.
        self.w.seek(SeekFrom::Start(LOG_OFFSET))?;
        self.w.write_all(&vec![0u8; LOG_LENGTH as usize])?;

        // Region tables.
        let rt = RegionTable {
            entries: vec![
                RegionTableEntry {
                    guid: BAT_REGION,
                    file_offset: BAT_OFFSET,
                    length: bat_len as u32,
                    required: true,
                },
                RegionTableEntry {
                    guid: METADATA_REGION,
                    file_offset: METADATA_OFFSET,
                    length: METADATA_LENGTH,
                    required: true,
                },
            ],
        }
        .encode();
        self.w.seek(SeekFrom::Start(REGION_TABLE1_OFFSET))?;
        self.w.write_all(&rt)?;
        self.w.seek(SeekFrom::Start(REGION_TABLE2_OFFSET))?;
        self.w.write_all(&rt)?;

        // Headers last: both valid, header 2 current.
        let mut h = Header {
            sequence_number: 1,
            file_write_guid: self.file_write_guid,
            data_write_guid: self.data_write_guid,
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: LOG_LENGTH,
            log_offset: LOG_OFFSET,
        };
        self.w.seek(SeekFrom::Start(HEADER1_OFFSET))?;
        self.w.write_all(&h.encode())?;
        h.sequence_number = 2;
        self.w.seek(SeekFrom::Start(HEADER2_OFFSET))?;
        self.w.write_all(&h.encode())?;

        self.w.seek(SeekFrom::Start(FILE_ID_OFFSET))?;
        self.w.write_all(&encode_file_identifier(CREATOR))?;
        self.w.flush()?;
        Ok(self.w)
    }

    fn encode_metadata(&self) -> Vec<u8> {
        let mut items: Vec<(Guid, Vec<u8>, bool)> = vec![
            (
                FILE_PARAMETERS_ITEM,
                FileParameters {
                    block_size: self.geo.block_size,
                    leave_blocks_allocated: false,
                    has_parent: self.parent.is_some(),
                }
                .encode()
                .to_vec(),
                false,
            ),
            (
                VIRTUAL_DISK_SIZE_ITEM,
                self.geo.virtual_size.to_le_bytes().to_vec(),
                true,
            ),
            (PAGE83_ITEM, self.virtual_disk_id.to_bytes().to_vec(), true),
            (
                LOGICAL_SECTOR_SIZE_ITEM,
                self.geo.logical_sector_size.to_le_bytes().to_vec(),
                true,
            ),
            (
                PHYSICAL_SECTOR_SIZE_ITEM,
                self.physical_sector_size.to_le_bytes().to_vec(),
                true,
            ),
        ];
        if let Some(p) = &self.parent {
            let mut entries = vec![
                (
                    ParentLocator::PARENT_LINKAGE.to_string(),
                    p.parent_linkage.to_string(),
                ),
                (
                    ParentLocator::RELATIVE_PATH.to_string(),
                    p.relative_path.replace('/', "\\"),
                ),
            ];
            if let Some(v) = &p.volume_path {
                entries.push((ParentLocator::VOLUME_PATH.to_string(), v.clone()));
            }
            if let Some(a) = &p.absolute_win32_path {
                entries.push((ParentLocator::ABSOLUTE_WIN32_PATH.to_string(), a.clone()));
            }
            let pl = ParentLocator {
                locator_type: VHDX_PARENT_LOCATOR_TYPE,
                entries,
            };
            items.push((PARENT_LOCATOR_ITEM, pl.encode(), false));
        }
        let mut region = vec![0u8; METADATA_TABLE_SIZE];
        let mut table = MetadataTable { entries: vec![] };
        for (id, bytes, virtual_disk) in items {
            table.entries.push(MetadataEntry {
                item_id: id,
                offset: region.len() as u32,
                length: bytes.len() as u32,
                is_user: false,
                is_virtual_disk: virtual_disk,
                is_required: true,
            });
            region.extend_from_slice(&bytes);
        }
        region[..METADATA_TABLE_SIZE].copy_from_slice(&table.encode());
        region.resize(METADATA_LENGTH as usize, 0);
        region
    }
}

fn is_zero(b: &[u8]) -> bool {
    // Slice equality on bytes is a memcmp: fast even in unoptimised test builds.
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    b.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }

    /// Known answer for the differencing layout, straight from MS-VHDX 2.4/2.5:
    /// the sector bitmap entry follows chunk_ratio payload entries, and bit 0 of
    /// byte 0 of the bitmap is the chunk's first sector (LSB first).
    #[test]
    fn differencing_layout_known_answer() {
        let mut o = VhdxOptions::new(8 << 20);
        o.block_size = 1 << 20;
        o.parent = Some(ParentInfo {
            parent_linkage: Guid::random(),
            relative_path: "p.vhdx".into(),
            absolute_win32_path: None,
            volume_path: None,
        });
        let mut w = VhdxWriter::create(Cursor::new(Vec::new()), o).expect("writer");
        w.write_at((1 << 20) + 9 * 512, &[0xAB; 512])
            .expect("write");
        let f = w.finish().expect("finish").into_inner();
        let bat = BAT_OFFSET as usize;
        // chunk ratio 2^23 * 512 / 2^20 = 4096: payload 0..4095, bitmap at 4096.
        assert_eq!(le64(&f, bat), 0, "block 0 untouched");
        let b1 = BatEntry(le64(&f, bat + 8));
        assert_eq!(b1.state(), PAYLOAD_BLOCK_PARTIALLY_PRESENT);
        let sb = BatEntry(le64(&f, bat + 8 * 4096));
        assert_eq!(sb.state(), SB_BLOCK_PRESENT);
        let bm = &f[sb.file_offset() as usize..][..1 << 20];
        // Block 1 starts at sector 2048 of the chunk; sector 9 of it is bit 2057:
        // byte 257, bit 1.
        assert_eq!(bm[257], 0b10);
        assert_eq!(bm.iter().filter(|&&b| b != 0).count(), 1);
        assert_eq!(
            &f[b1.file_offset() as usize + 9 * 512..][..512],
            &[0xAB; 512][..]
        );
        assert_eq!(f[b1.file_offset() as usize + 8 * 512], 0);
        assert!(f.len() as u64 >= sb.file_offset() + (1 << 20));
    }

    /// `place` + the caller's own positioned writes make the same file as
    /// `write_at`, block boundaries and differencing bitmaps included.
    #[test]
    fn placed_writes_match_write_at() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("tempdir");
        for diff in [false, true] {
            let mut o = VhdxOptions::new(8 << 20);
            o.block_size = 1 << 20;
            if diff {
                o.parent = Some(ParentInfo {
                    parent_linkage: Guid::ZERO,
                    relative_path: "p.vhdx".into(),
                    absolute_win32_path: None,
                    volume_path: None,
                });
            }
            // Straddles blocks 0/1, a partial block, and the last block.
            let writes: Vec<(u64, Vec<u8>)> = vec![
                ((1 << 20) - 4096, vec![7u8; 8192]),
                (3 << 20, vec![9u8; 512]),
                ((8 << 20) - 1024, vec![5u8; 1024]),
                (5 << 20, (0..(1u32 << 20)).map(|i| i as u8).collect()),
            ];
            let make = |name: &str, placed: bool| {
                let path = dir.path().join(format!("{name}-{diff}.vhdx"));
                let f = std::fs::File::create(&path).expect("create");
                let mut w =
                    VhdxWriter::create(f.try_clone().expect("clone"), o.clone()).expect("writer");
                w.set_file_write_guid(Guid::ZERO);
                w.set_data_write_guid(Guid::ZERO);
                w.set_virtual_disk_id(Guid::ZERO);
                for (off, data) in &writes {
                    if placed {
                        for (at, r) in w.place(*off, data.len() as u64).expect("place") {
                            f.write_all_at(&data[r], at).expect("pwrite");
                        }
                    } else {
                        w.write_at(*off, data).expect("write");
                    }
                }
                w.finish().expect("finish");
                std::fs::read(&path).expect("read")
            };
            assert!(make("a", false) == make("b", true), "diff={diff}");
        }
        let mut w =
            VhdxWriter::create(Cursor::new(Vec::new()), VhdxOptions::new(4 << 20)).expect("writer");
        assert!(matches!(
            w.place(100, 512),
            Err(VhdxError::Unaligned { .. })
        ));
        assert!(matches!(
            w.place(4 << 20, 512),
            Err(VhdxError::OutOfRange { .. })
        ));
    }

    #[test]
    fn whole_block_zero_write_in_child_marks_block_zero() {
        let mut o = VhdxOptions::new(4 << 20);
        o.block_size = 1 << 20;
        o.parent = Some(ParentInfo {
            parent_linkage: Guid::random(),
            relative_path: "p.vhdx".into(),
            absolute_win32_path: None,
            volume_path: None,
        });
        let mut w = VhdxWriter::create(Cursor::new(Vec::new()), o).expect("writer");
        w.write_at(2 << 20, &vec![0u8; 1 << 20])
            .expect("zero block");
        w.write_at(0, &vec![1u8; 1 << 20]).expect("full block");
        let f = w.finish().expect("finish").into_inner();
        let bat = BAT_OFFSET as usize;
        assert_eq!(BatEntry(le64(&f, bat + 16)).state(), PAYLOAD_BLOCK_ZERO);
        assert_eq!(BatEntry(le64(&f, bat)).state(), PAYLOAD_BLOCK_FULLY_PRESENT);
        assert_eq!(
            BatEntry(le64(&f, bat + 8 * 4096)).state(),
            SB_BLOCK_NOT_PRESENT
        );
    }
}
