//! Fixed-layout MS-VHDX structures: file type identifier, headers, region
//! table, metadata table and known metadata items (including the parent
//! locator), BAT entries and the BAT geometry (chunk ratio, interleaving).
//!
//! Every `parse` takes the caller's bytes and validates what the structure
//! itself can validate (signature, CRC-32C, counts that must fit); checks that
//! need the file size or other structures are the reader's job. Nothing here
//! panics on any input.

use super::guid::Guid;
use super::StructError;

/// 1 MiB, the VHDX allocation unit.
pub const MIB: u64 = 1 << 20;
/// 1 KiB.
pub const KIB: u64 = 1 << 10;

/// The header section: file identifier, two headers, two region tables.
pub const HEADER_SECTION_SIZE: u64 = MIB;
/// File type identifier offset (64 KiB structure).
pub const FILE_ID_OFFSET: u64 = 0;
/// First header copy.
pub const HEADER1_OFFSET: u64 = 64 * KIB;
/// Second header copy.
pub const HEADER2_OFFSET: u64 = 128 * KIB;
/// First region table copy.
pub const REGION_TABLE1_OFFSET: u64 = 192 * KIB;
/// Second region table copy.
pub const REGION_TABLE2_OFFSET: u64 = 256 * KIB;
/// Size of each region table copy (the CRC covers all of it).
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// Size of the header structure the CRC covers.
pub const HEADER_SIZE: usize = 4096;
/// Size of the metadata table at the start of the metadata region.
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// Size of a sector bitmap block.
pub const SECTOR_BITMAP_BLOCK_SIZE: u64 = MIB;
/// Sectors described by one sector bitmap block (2^23).
pub const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;
/// Largest virtual disk the spec allows (64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Smallest payload block size (1 MiB).
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// Largest payload block size (256 MiB).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Most entries a region or metadata table may hold.
pub const MAX_TABLE_ENTRIES: usize = 2047;
/// Largest metadata item (1 MiB).
pub const MAX_METADATA_ITEM: u32 = 1 << 20;

/// `"vhdxfile"`: first 8 bytes of every VHDX.
pub const FILE_SIGNATURE: [u8; 8] = *b"vhdxfile";
/// `"head"`.
pub const HEADER_SIGNATURE: [u8; 4] = *b"head";
/// `"regi"`.
pub const REGION_SIGNATURE: [u8; 4] = *b"regi";
/// `"metadata"`.
pub const METADATA_SIGNATURE: [u8; 8] = *b"metadata";

/// Region table entry of the BAT.
pub const BAT_REGION: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// Region table entry of the metadata region.
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// Metadata item: file parameters.
pub const FILE_PARAMETERS_ITEM: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Metadata item: virtual disk size.
pub const VIRTUAL_DISK_SIZE_ITEM: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Metadata item: virtual disk id (SCSI page 83 data).
pub const PAGE83_ITEM: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_SIZE_ITEM: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_SIZE_ITEM: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Metadata item: parent locator.
pub const PARENT_LOCATOR_ITEM: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// Parent locator type of a VHDX parent.
pub const VHDX_PARENT_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// CRC-32C (Castagnoli) of `buf` with the 4 bytes at `field` taken as zero,
/// which is how every VHDX checksum is defined.
pub fn crc32c_with_zeroed_field(buf: &[u8], field: usize) -> u32 {
    if field.checked_add(4).is_none_or(|end| end > buf.len()) {
        return crc32c::crc32c(buf);
    }
    let crc = crc32c::crc32c(&buf[..field]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &buf[field + 4..])
}

/// True if `x` is a multiple of `align`, which must be a power of two.
pub fn is_aligned(x: u64, align: u64) -> bool {
    debug_assert!(align.is_power_of_two());
    x & align.wrapping_sub(1) == 0
}

/// Computes the checksum of `buf` (field at `field` zeroed) and stores it there.
pub fn store_crc32c(buf: &mut [u8], field: usize) {
    buf[field..field + 4].fill(0);
    let crc = crc32c::crc32c(buf);
    buf[field..field + 4].copy_from_slice(&crc.to_le_bytes());
}

pub(crate) fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Guid::from_bytes(a)
}

fn need(what: &'static str, buf: &[u8], len: usize) -> Result<(), StructError> {
    if buf.len() < len {
        return Err(StructError::TooShort {
            what,
            need: len,
            got: buf.len(),
        });
    }
    Ok(())
}

/// Builds the 64 KiB file type identifier: signature plus a UTF-16LE creator string.
pub fn encode_file_identifier(creator: &str) -> Vec<u8> {
    let mut buf = vec![0u8; 64 * 1024];
    buf[..8].copy_from_slice(&FILE_SIGNATURE);
    for (i, unit) in creator.encode_utf16().take(255).enumerate() {
        buf[8 + 2 * i..10 + 2 * i].copy_from_slice(&unit.to_le_bytes());
    }
    buf
}

/// One of the two VHDX headers (MS-VHDX 2.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Higher wins when both copies are valid.
    pub sequence_number: u64,
    /// Changes on every open for write.
    pub file_write_guid: Guid,
    /// Changes before the first user-visible change in a session; a child's
    /// `parent_linkage` names its parent's value.
    pub data_write_guid: Guid,
    /// Non-zero when the log may hold entries to replay.
    pub log_guid: Guid,
    /// Must be 0.
    pub log_version: u16,
    /// Must be 1.
    pub version: u16,
    /// Log size in bytes (multiple of 1 MiB).
    pub log_length: u32,
    /// Log file offset (multiple of 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Parses and checks signature and CRC-32C of a 4 KiB header.
    pub fn parse(buf: &[u8]) -> Result<Header, StructError> {
        need("header", buf, HEADER_SIZE)?;
        let buf = &buf[..HEADER_SIZE];
        if buf[..4] != HEADER_SIGNATURE {
            return Err(StructError::BadSignature { expected: "head" });
        }
        let stored = le_u32(buf, 4);
        let computed = crc32c_with_zeroed_field(buf, 4);
        if stored != computed {
            return Err(StructError::BadChecksum { stored, computed });
        }
        Ok(Header {
            sequence_number: le_u64(buf, 8),
            file_write_guid: guid_at(buf, 16),
            data_write_guid: guid_at(buf, 32),
            log_guid: guid_at(buf, 48),
            log_version: le_u16(buf, 64),
            version: le_u16(buf, 66),
            log_length: le_u32(buf, 68),
            log_offset: le_u64(buf, 72),
        })
    }

    /// Encodes the 4 KiB header with its checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(&HEADER_SIGNATURE);
        b[8..16].copy_from_slice(&self.sequence_number.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid.to_bytes());
        b[32..48].copy_from_slice(&self.data_write_guid.to_bytes());
        b[48..64].copy_from_slice(&self.log_guid.to_bytes());
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        store_crc32c(&mut b, 4);
        b
    }
}

/// One region table entry (MS-VHDX 2.2.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionTableEntry {
    /// Which region ([`BAT_REGION`], [`METADATA_REGION`] or unknown).
    pub guid: Guid,
    /// File offset (multiple of 1 MiB, at least 1 MiB).
    pub file_offset: u64,
    /// Length (multiple of 1 MiB).
    pub length: u32,
    /// An implementation that does not know the region must refuse the file.
    pub required: bool,
}

/// The region table (MS-VHDX 2.2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    /// Entries in file order.
    pub entries: Vec<RegionTableEntry>,
}

impl RegionTable {
    /// Parses a 64 KiB region table copy, checking signature, CRC-32C and count.
    pub fn parse(buf: &[u8]) -> Result<RegionTable, StructError> {
        need("region table", buf, REGION_TABLE_SIZE)?;
        let buf = &buf[..REGION_TABLE_SIZE];
        if buf[..4] != REGION_SIGNATURE {
            return Err(StructError::BadSignature { expected: "regi" });
        }
        let stored = le_u32(buf, 4);
        let computed = crc32c_with_zeroed_field(buf, 4);
        if stored != computed {
            return Err(StructError::BadChecksum { stored, computed });
        }
        let count = le_u32(buf, 8) as usize;
        if count > MAX_TABLE_ENTRIES {
            return Err(StructError::Invalid(format!(
                "region table claims {count} entries (at most {MAX_TABLE_ENTRIES})"
            )));
        }
        let entries = (0..count)
            .map(|i| {
                let at = 16 + 32 * i;
                RegionTableEntry {
                    guid: guid_at(buf, at),
                    file_offset: le_u64(buf, at + 16),
                    length: le_u32(buf, at + 24),
                    required: le_u32(buf, at + 28) & 1 == 1,
                }
            })
            .collect();
        Ok(RegionTable { entries })
    }

    /// Encodes a 64 KiB region table copy with its checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[..4].copy_from_slice(&REGION_SIGNATURE);
        b[8..12].copy_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (i, e) in self.entries.iter().take(MAX_TABLE_ENTRIES).enumerate() {
            let at = 16 + 32 * i;
            b[at..at + 16].copy_from_slice(&e.guid.to_bytes());
            b[at + 16..at + 24].copy_from_slice(&e.file_offset.to_le_bytes());
            b[at + 24..at + 28].copy_from_slice(&e.length.to_le_bytes());
            b[at + 28..at + 32].copy_from_slice(&u32::from(e.required).to_le_bytes());
        }
        store_crc32c(&mut b, 4);
        b
    }
}

/// One metadata table entry (MS-VHDX 2.6.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataEntry {
    /// Which item.
    pub item_id: Guid,
    /// Offset of the item from the start of the metadata region (≥ 64 KiB, or 0 if empty).
    pub offset: u32,
    /// Item length (≤ 1 MiB).
    pub length: u32,
    /// User (not system) metadata.
    pub is_user: bool,
    /// Virtual-disk (not file) metadata: copied when forking a child.
    pub is_virtual_disk: bool,
    /// An implementation that does not know the item must refuse the file.
    pub is_required: bool,
}

/// The metadata table at the start of the metadata region (MS-VHDX 2.6.1).
///
/// Note: unlike headers and region tables, the metadata region carries no checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataTable {
    /// Entries in table order.
    pub entries: Vec<MetadataEntry>,
}

impl MetadataTable {
    /// Parses the 64 KiB metadata table (signature and count).
    pub fn parse(buf: &[u8]) -> Result<MetadataTable, StructError> {
        need("metadata table", buf, METADATA_TABLE_SIZE)?;
        if buf[..8] != METADATA_SIGNATURE {
            return Err(StructError::BadSignature {
                expected: "metadata",
            });
        }
        let count = le_u16(buf, 10) as usize;
        if count > MAX_TABLE_ENTRIES {
            return Err(StructError::Invalid(format!(
                "metadata table claims {count} entries (at most {MAX_TABLE_ENTRIES})"
            )));
        }
        let entries = (0..count)
            .map(|i| {
                let at = 32 + 32 * i;
                let flags = le_u32(buf, at + 24);
                MetadataEntry {
                    item_id: guid_at(buf, at),
                    offset: le_u32(buf, at + 16),
                    length: le_u32(buf, at + 20),
                    is_user: flags & 1 != 0,
                    is_virtual_disk: flags & 2 != 0,
                    is_required: flags & 4 != 0,
                }
            })
            .collect();
        Ok(MetadataTable { entries })
    }

    /// Encodes the 64 KiB metadata table.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; METADATA_TABLE_SIZE];
        b[..8].copy_from_slice(&METADATA_SIGNATURE);
        b[10..12].copy_from_slice(&(self.entries.len() as u16).to_le_bytes());
        for (i, e) in self.entries.iter().take(MAX_TABLE_ENTRIES).enumerate() {
            let at = 32 + 32 * i;
            b[at..at + 16].copy_from_slice(&e.item_id.to_bytes());
            b[at + 16..at + 20].copy_from_slice(&e.offset.to_le_bytes());
            b[at + 20..at + 24].copy_from_slice(&e.length.to_le_bytes());
            let flags = u32::from(e.is_user)
                | (u32::from(e.is_virtual_disk) << 1)
                | (u32::from(e.is_required) << 2);
            b[at + 24..at + 28].copy_from_slice(&flags.to_le_bytes());
        }
        b
    }
}

/// The file parameters metadata item (MS-VHDX 2.6.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileParameters {
    /// Payload block size: power of two, 1 MiB..=256 MiB.
    pub block_size: u32,
    /// Fixed (fully provisioned) VHDX.
    pub leave_blocks_allocated: bool,
    /// Differencing VHDX.
    pub has_parent: bool,
}

impl FileParameters {
    /// Encoded length.
    pub const SIZE: usize = 8;

    /// Parses the 8-byte item (the block size is validated by [`Geometry::new`]).
    pub fn parse(buf: &[u8]) -> Result<FileParameters, StructError> {
        need("file parameters", buf, Self::SIZE)?;
        let flags = le_u32(buf, 4);
        Ok(FileParameters {
            block_size: le_u32(buf, 0),
            leave_blocks_allocated: flags & 1 != 0,
            has_parent: flags & 2 != 0,
        })
    }

    /// Encodes the 8-byte item.
    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.block_size.to_le_bytes());
        let flags = u32::from(self.leave_blocks_allocated) | (u32::from(self.has_parent) << 1);
        b[4..].copy_from_slice(&flags.to_le_bytes());
        b
    }
}

/// The parent locator metadata item (MS-VHDX 2.6.2.6): a type and UTF-16LE key/value pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    /// [`VHDX_PARENT_LOCATOR_TYPE`] for a VHDX parent.
    pub locator_type: Guid,
    /// Key/value pairs in item order.
    pub entries: Vec<(String, String)>,
}

fn utf16le(buf: &[u8], what: &str) -> Result<String, StructError> {
    if buf.len() & 1 != 0 {
        return Err(StructError::Invalid(format!(
            "parent locator {what} has odd byte length {}",
            buf.len()
        )));
    }
    let units: Vec<u16> = buf
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let s = String::from_utf16(&units)
        .map_err(|_| StructError::Invalid(format!("parent locator {what} is not valid UTF-16")))?;
    if s.contains('\0') {
        return Err(StructError::Invalid(format!(
            "parent locator {what} contains a NUL character"
        )));
    }
    Ok(s)
}

impl ParentLocator {
    /// Well-known key: the parent's DataWriteGuid.
    pub const PARENT_LINKAGE: &'static str = "parent_linkage";
    /// Well-known key: an alternative accepted parent DataWriteGuid.
    pub const PARENT_LINKAGE2: &'static str = "parent_linkage2";
    /// Well-known key: path relative to the child's folder, `\`-separated.
    pub const RELATIVE_PATH: &'static str = "relative_path";
    /// Well-known key: `\\?\Volume{…}\…` path.
    pub const VOLUME_PATH: &'static str = "volume_path";
    /// Well-known key: `\\?\d:\…` path.
    pub const ABSOLUTE_WIN32_PATH: &'static str = "absolute_win32_path";

    /// Parses the item; every key/value must lie inside it and be valid UTF-16LE.
    pub fn parse(buf: &[u8]) -> Result<ParentLocator, StructError> {
        need("parent locator", buf, 20)?;
        let locator_type = guid_at(buf, 0);
        let count = le_u16(buf, 18) as usize;
        let table_end = 20 + 12 * count;
        if table_end > buf.len() {
            return Err(StructError::Invalid(format!(
                "parent locator claims {count} entries but is only {} bytes",
                buf.len()
            )));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let at = 20 + 12 * i;
            let ko = le_u32(buf, at) as usize;
            let vo = le_u32(buf, at + 4) as usize;
            let kl = le_u16(buf, at + 8) as usize;
            let vl = le_u16(buf, at + 10) as usize;
            if ko == 0 || vo == 0 || kl == 0 || vl == 0 {
                return Err(StructError::Invalid(format!(
                    "parent locator entry {i} has a zero offset or length"
                )));
            }
            let (Some(ke), Some(ve)) = (ko.checked_add(kl), vo.checked_add(vl)) else {
                return Err(StructError::Invalid(format!(
                    "parent locator entry {i} overflows"
                )));
            };
            if ke > buf.len() || ve > buf.len() {
                return Err(StructError::Invalid(format!(
                    "parent locator entry {i} points beyond the {}-byte item",
                    buf.len()
                )));
            }
            let key = utf16le(&buf[ko..ke], "key")?;
            let value = utf16le(&buf[vo..ve], "value")?;
            if entries.iter().any(|(k, _): &(String, String)| *k == key) {
                return Err(StructError::Invalid(format!(
                    "parent locator key {key:?} appears twice"
                )));
            }
            entries.push((key, value));
        }
        Ok(ParentLocator {
            locator_type,
            entries,
        })
    }

    /// Value of `key`, if present (keys are case sensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Encodes the item: header, entry table, then the UTF-16LE strings.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 20 + 12 * self.entries.len()];
        b[..16].copy_from_slice(&self.locator_type.to_bytes());
        b[18..20].copy_from_slice(&(self.entries.len() as u16).to_le_bytes());
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let mut put = |s: &str| {
                let off = b.len() as u32;
                for u in s.encode_utf16() {
                    b.extend_from_slice(&u.to_le_bytes());
                }
                (off, (b.len() as u32 - off) as u16)
            };
            let (ko, kl) = put(k);
            let (vo, vl) = put(v);
            let at = 20 + 12 * i;
            b[at..at + 4].copy_from_slice(&ko.to_le_bytes());
            b[at + 4..at + 8].copy_from_slice(&vo.to_le_bytes());
            b[at + 8..at + 10].copy_from_slice(&kl.to_le_bytes());
            b[at + 10..at + 12].copy_from_slice(&vl.to_le_bytes());
        }
        b
    }
}

/// Payload BAT entry state: block not present (dynamic: zeros; differencing: parent).
pub const PAYLOAD_BLOCK_NOT_PRESENT: u8 = 0;
/// Payload BAT entry state: contents undefined (read as zeros here).
pub const PAYLOAD_BLOCK_UNDEFINED: u8 = 1;
/// Payload BAT entry state: contents are zero.
pub const PAYLOAD_BLOCK_ZERO: u8 = 2;
/// Payload BAT entry state: unmapped by TRIM (read as zeros here).
pub const PAYLOAD_BLOCK_UNMAPPED: u8 = 3;
/// Payload BAT entry state: whole block in the file.
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u8 = 6;
/// Payload BAT entry state (differencing only): the sector bitmap says which sectors are here.
pub const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap BAT entry state: not allocated.
pub const SB_BLOCK_NOT_PRESENT: u8 = 0;
/// Sector bitmap BAT entry state: allocated.
pub const SB_BLOCK_PRESENT: u8 = 6;

/// A 64-bit BAT entry: state (bits 0..3), reserved, FileOffsetMB (bits 20..64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatEntry(pub u64);

impl BatEntry {
    /// Builds an entry; `file_offset` must be a multiple of 1 MiB.
    pub fn new(state: u8, file_offset: u64) -> BatEntry {
        BatEntry(((file_offset >> 20) << 20) | u64::from(state & 7))
    }
    /// The 3-bit state.
    pub fn state(self) -> u8 {
        (self.0 & 7) as u8
    }
    /// FileOffsetMB in bytes.
    pub fn file_offset(self) -> u64 {
        (self.0 >> 20) << 20
    }
    /// The 17 reserved bits (must be zero).
    pub fn reserved(self) -> u64 {
        (self.0 >> 3) & ((1 << 17) - 1)
    }
}

/// Derived geometry of a VHDX: block counts and the BAT interleaving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Payload block size in bytes.
    pub block_size: u32,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u32,
    /// Payload blocks per sector bitmap block: 2^23 × logical sector size / block size.
    pub chunk_ratio: u64,
    /// ceil(virtual size / block size).
    pub data_blocks: u64,
    /// ceil(data blocks / chunk ratio).
    pub sector_bitmap_blocks: u64,
    /// BAT entries the file must have.
    pub bat_entries: u64,
    /// Differencing file.
    pub has_parent: bool,
}

impl Geometry {
    /// Validates the parameters and derives the BAT geometry (MS-VHDX 2.5).
    pub fn new(
        virtual_size: u64,
        block_size: u32,
        logical_sector_size: u32,
        has_parent: bool,
    ) -> Result<Geometry, StructError> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(StructError::Invalid(format!(
                "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
            )));
        }
        if logical_sector_size != 512 && logical_sector_size != 4096 {
            return Err(StructError::Invalid(format!(
                "logical sector size {logical_sector_size} is neither 512 nor 4096"
            )));
        }
        if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE {
            return Err(StructError::Invalid(format!(
                "virtual disk size {virtual_size} is outside 1 B..64 TiB"
            )));
        }
        if !is_aligned(virtual_size, u64::from(logical_sector_size)) {
            return Err(StructError::Invalid(format!(
                "virtual disk size {virtual_size} is not a multiple of the {logical_sector_size}-byte logical sector"
            )));
        }
        let chunk_ratio =
            SECTORS_PER_BITMAP_BLOCK * u64::from(logical_sector_size) / u64::from(block_size);
        let data_blocks = virtual_size.div_ceil(u64::from(block_size));
        let sector_bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let bat_entries = if has_parent {
            sector_bitmap_blocks * (chunk_ratio + 1)
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        Ok(Geometry {
            virtual_size,
            block_size,
            logical_sector_size,
            chunk_ratio,
            data_blocks,
            sector_bitmap_blocks,
            bat_entries,
            has_parent,
        })
    }

    /// BAT index of payload block `block`.
    pub fn payload_bat_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap block of chunk `chunk`.
    pub fn bitmap_bat_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// True if BAT index `i` holds a sector bitmap entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        i % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// Payload block number of BAT index `i` (which must not be a bitmap index).
    pub fn block_of_bat_index(&self, i: u64) -> u64 {
        i - i / (self.chunk_ratio + 1)
    }

    /// Logical sectors per payload block.
    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size / self.logical_sector_size)
    }

    /// Bytes of the virtual disk in block `block` (the last block may be short).
    pub fn block_len(&self, block: u64) -> u64 {
        let start = block * u64::from(self.block_size);
        u64::from(self.block_size).min(self.virtual_size.saturating_sub(start))
    }

    /// Byte offset inside the chunk's sector bitmap block of the bit for the
    /// first sector of `block`, plus the chunk number.
    pub fn bitmap_position(&self, block: u64) -> (u64, u64) {
        let chunk = block / self.chunk_ratio;
        let first_sector = (block % self.chunk_ratio) * self.sectors_per_block();
        (chunk, first_sector / 8)
    }

    /// Bytes the BAT needs.
    pub fn bat_bytes(&self) -> u64 {
        self.bat_entries * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_spec_formulas() {
        // 512 B sectors, 32 MiB blocks: chunk ratio 2^23*512/2^25 = 128.
        let g = Geometry::new(10 << 30, 32 << 20, 512, false).expect("test value");
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.data_blocks, 320);
        assert_eq!(g.bat_entries, 320 + 319 / 128);
        assert_eq!(g.payload_bat_index(127), 127);
        assert_eq!(g.payload_bat_index(128), 129);
        assert!(g.is_bitmap_index(128));
        assert_eq!(g.bitmap_bat_index(0), 128);
        assert_eq!(g.block_of_bat_index(129), 128);
        let d = Geometry::new(10 << 30, 32 << 20, 512, true).expect("test value");
        assert_eq!(d.sector_bitmap_blocks, 3);
        assert_eq!(d.bat_entries, 3 * 129);
        // 4 KiB sectors, 1 MiB blocks: 2^23*4096/2^20 = 32768.
        let g4 = Geometry::new(1 << 30, 1 << 20, 4096, false).expect("test value");
        assert_eq!(g4.chunk_ratio, 32768);
        assert!(Geometry::new(1 << 20, 3 << 20, 512, false).is_err());
        assert!(Geometry::new(1000, 1 << 20, 512, false).is_err());
        assert!(Geometry::new(0, 1 << 20, 512, false).is_err());
        assert!(Geometry::new(4096, 1 << 20, 1024, false).is_err());
    }

    #[test]
    fn header_roundtrip_and_crc() {
        let h = Header {
            sequence_number: 7,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        };
        let mut b = h.encode();
        assert_eq!(Header::parse(&b).expect("test value"), h);
        b[100] ^= 1;
        assert!(matches!(
            Header::parse(&b),
            Err(StructError::BadChecksum { .. })
        ));
        assert!(matches!(
            Header::parse(&b[..100]),
            Err(StructError::TooShort { .. })
        ));
    }

    #[test]
    fn crc32c_known_answer() {
        // RFC 3720 test vector: 32 bytes of zeros -> 0x8A9136AA.
        assert_eq!(crc32c_with_zeroed_field(&[0u8; 32], 4), 0x8A91_36AA);
        let mut b = [0xffu8; 32];
        b[4..8].fill(0);
        assert_eq!(
            crc32c_with_zeroed_field(&[0xffu8; 32], 4),
            crc32c::crc32c(&b)
        );
    }

    #[test]
    fn parent_locator_roundtrip_and_bounds() {
        let pl = ParentLocator {
            locator_type: VHDX_PARENT_LOCATOR_TYPE,
            entries: vec![
                ("parent_linkage".into(), Guid::random().to_string()),
                ("relative_path".into(), r".\base.vhdx".into()),
            ],
        };
        let b = pl.encode();
        assert_eq!(ParentLocator::parse(&b).expect("test value"), pl);
        assert_eq!(pl.get("relative_path"), Some(r".\base.vhdx"));
        for cut in 0..b.len() {
            assert!(ParentLocator::parse(&b[..cut]).is_err());
        }
    }

    #[test]
    fn bat_entry_bits() {
        let e = BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, 5 << 20);
        assert_eq!(e.state(), 6);
        assert_eq!(e.file_offset(), 5 << 20);
        assert_eq!(e.reserved(), 0);
        assert_eq!(e.0, (5 << 20) | 6);
    }
}
