//! The VHDX metadata log (MS-VHDX 2.3): entry header, zero and data
//! descriptors, data sectors; decoding one entry with every check the spec
//! names, and encoding entries (used by the test kit to make dirty files).
//!
//! Finding the active sequence in a log and replaying it is the reader's job
//! (it needs the file); this module only turns one entry's bytes into
//! operations and back.

use super::guid::Guid;
use super::layout::{guid_at, is_aligned, le_u32, le_u64, store_crc32c};
use super::StructError;

/// Log sector size: entries, descriptors and data sectors are in 4 KiB units.
pub const LOG_SECTOR: usize = 4096;
/// Size of the entry header at the start of an entry.
pub const ENTRY_HEADER_SIZE: usize = 64;
/// Size of one descriptor.
pub const DESCRIPTOR_SIZE: usize = 32;
/// `"loge"`.
pub const ENTRY_SIGNATURE: [u8; 4] = *b"loge";
/// `"zero"`.
pub const ZERO_SIGNATURE: [u8; 4] = *b"zero";
/// `"desc"`.
pub const DATA_DESC_SIGNATURE: [u8; 4] = *b"desc";
/// `"data"`.
pub const DATA_SECTOR_SIGNATURE: [u8; 4] = *b"data";

/// A log entry header (MS-VHDX 2.3.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntryHeader {
    /// CRC-32C over the whole entry with this field zeroed.
    pub checksum: u32,
    /// Entry length in bytes (multiple of 4 KiB).
    pub entry_length: u32,
    /// Log offset of the oldest entry of the sequence ending with this entry.
    pub tail: u32,
    /// Increments by one per entry; never zero.
    pub sequence_number: u64,
    /// Descriptors in this entry.
    pub descriptor_count: u32,
    /// Must be 0.
    pub reserved: u32,
    /// Must equal the header's LogGuid.
    pub log_guid: Guid,
    /// The file was at least this large when the entry was written.
    pub flushed_file_offset: u64,
    /// Every structure fits below this file size.
    pub last_file_offset: u64,
}

impl LogEntryHeader {
    /// Parses the 64-byte header (signature only; see [`decode_entry`] for the rest).
    pub fn parse(buf: &[u8]) -> Result<LogEntryHeader, StructError> {
        if buf.len() < ENTRY_HEADER_SIZE {
            return Err(StructError::TooShort {
                what: "log entry header",
                need: ENTRY_HEADER_SIZE,
                got: buf.len(),
            });
        }
        if buf[..4] != ENTRY_SIGNATURE {
            return Err(StructError::BadSignature { expected: "loge" });
        }
        Ok(LogEntryHeader {
            checksum: le_u32(buf, 4),
            entry_length: le_u32(buf, 8),
            tail: le_u32(buf, 12),
            sequence_number: le_u64(buf, 16),
            descriptor_count: le_u32(buf, 24),
            reserved: le_u32(buf, 28),
            log_guid: guid_at(buf, 32),
            flushed_file_offset: le_u64(buf, 48),
            last_file_offset: le_u64(buf, 56),
        })
    }

    fn encode_into(&self, b: &mut [u8]) {
        b[..4].copy_from_slice(&ENTRY_SIGNATURE);
        b[4..8].copy_from_slice(&self.checksum.to_le_bytes());
        b[8..12].copy_from_slice(&self.entry_length.to_le_bytes());
        b[12..16].copy_from_slice(&self.tail.to_le_bytes());
        b[16..24].copy_from_slice(&self.sequence_number.to_le_bytes());
        b[24..28].copy_from_slice(&self.descriptor_count.to_le_bytes());
        b[28..32].copy_from_slice(&self.reserved.to_le_bytes());
        b[32..48].copy_from_slice(&self.log_guid.to_bytes());
        b[48..56].copy_from_slice(&self.flushed_file_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.last_file_offset.to_le_bytes());
    }
}

/// Sectors holding the header and `count` descriptors: 126 fit in the first, 128 in each next.
pub fn descriptor_sectors(count: u32) -> u64 {
    (u64::from(count) + 2).div_ceil(128)
}

/// One operation of a log entry, as it is replayed onto the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    /// Zero descriptor: write `length` zero bytes at `file_offset` (both 4 KiB multiples).
    Zero {
        /// Target file offset.
        file_offset: u64,
        /// Bytes to zero.
        length: u64,
    },
    /// Data descriptor + data sector: write these 4096 bytes at `file_offset`.
    Data {
        /// Target file offset (4 KiB multiple).
        file_offset: u64,
        /// Exactly [`LOG_SECTOR`] bytes, leading/trailing bytes restored.
        data: Vec<u8>,
    },
}

/// A decoded, validated log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Its header.
    pub header: LogEntryHeader,
    /// Descriptors in order, data sectors joined to their descriptors.
    pub ops: Vec<LogOp>,
}

fn invalid(msg: String) -> StructError {
    StructError::Invalid(msg)
}

/// Decodes one whole entry (`entry.len()` must equal its EntryLength; the
/// caller gathers it from the circular log) and validates it per MS-VHDX:
/// signature, length, sequence number > 0, LogGuid, descriptor signatures,
/// sequence numbers and 4 KiB alignment, data sector signatures and split
/// sequence numbers, and the CRC-32C over the entry.
pub fn decode_entry(entry: &[u8], log_guid: Guid) -> Result<LogEntry, StructError> {
    let h = LogEntryHeader::parse(entry)?;
    let len = h.entry_length as usize;
    if len == 0 || !is_aligned(len as u64, LOG_SECTOR as u64) {
        return Err(invalid(format!(
            "log entry length {} is not a positive multiple of 4 KiB",
            h.entry_length
        )));
    }
    if entry.len() != len {
        return Err(StructError::TooShort {
            what: "log entry",
            need: len,
            got: entry.len(),
        });
    }
    if h.sequence_number == 0 {
        return Err(invalid("log entry sequence number is 0".into()));
    }
    if h.log_guid != log_guid {
        return Err(invalid(format!(
            "log entry LogGuid {} is not the header's {}",
            h.log_guid, log_guid
        )));
    }
    if !is_aligned(u64::from(h.tail), LOG_SECTOR as u64) {
        return Err(invalid(format!(
            "log entry tail {} is not 4 KiB aligned",
            h.tail
        )));
    }
    let desc_sectors = descriptor_sectors(h.descriptor_count);
    let total_sectors = (len / LOG_SECTOR) as u64;
    if desc_sectors > total_sectors {
        return Err(invalid(format!(
            "log entry of {len} bytes cannot hold {} descriptors",
            h.descriptor_count
        )));
    }
    let stored = h.checksum;
    let computed = super::layout::crc32c_with_zeroed_field(entry, 4);
    if stored != computed {
        return Err(StructError::BadChecksum { stored, computed });
    }
    let mut ops = Vec::with_capacity(h.descriptor_count as usize);
    let mut next_data = desc_sectors;
    for i in 0..h.descriptor_count as usize {
        let at = ENTRY_HEADER_SIZE + DESCRIPTOR_SIZE * i;
        let d = &entry[at..at + DESCRIPTOR_SIZE];
        let file_offset = le_u64(d, 16);
        let seq = le_u64(d, 24);
        if seq != h.sequence_number {
            return Err(invalid(format!(
                "log descriptor {i} has sequence number {seq}, entry has {}",
                h.sequence_number
            )));
        }
        if !is_aligned(file_offset, LOG_SECTOR as u64)
            || file_offset.checked_add(LOG_SECTOR as u64).is_none()
        {
            return Err(invalid(format!(
                "log descriptor {i} file offset {file_offset} is not 4 KiB aligned or too large"
            )));
        }
        if d[..4] == ZERO_SIGNATURE {
            let length = le_u64(d, 8);
            if !is_aligned(length, LOG_SECTOR as u64) || file_offset.checked_add(length).is_none() {
                return Err(invalid(format!(
                    "log zero descriptor {i} length {length} is invalid"
                )));
            }
            ops.push(LogOp::Zero {
                file_offset,
                length,
            });
        } else if d[..4] == DATA_DESC_SIGNATURE {
            if next_data >= total_sectors {
                return Err(invalid(format!(
                    "log entry has more data descriptors than data sectors ({})",
                    total_sectors - desc_sectors
                )));
            }
            let s = next_data as usize * LOG_SECTOR;
            let sector = &entry[s..s + LOG_SECTOR];
            next_data += 1;
            if sector[..4] != DATA_SECTOR_SIGNATURE {
                return Err(invalid(format!(
                    "log data sector for descriptor {i} has no \"data\" signature"
                )));
            }
            let sseq = (u64::from(le_u32(sector, 4)) << 32) | u64::from(le_u32(sector, 4092));
            if sseq != h.sequence_number {
                return Err(invalid(format!(
                    "log data sector for descriptor {i} has sequence number {sseq}, entry has {}",
                    h.sequence_number
                )));
            }
            let mut data = Vec::with_capacity(LOG_SECTOR);
            data.extend_from_slice(&d[8..16]); // LeadingBytes
            data.extend_from_slice(&sector[8..4092]);
            data.extend_from_slice(&d[4..8]); // TrailingBytes
            ops.push(LogOp::Data { file_offset, data });
        } else {
            return Err(invalid(format!(
                "log descriptor {i} has unknown signature {:?}",
                String::from_utf8_lossy(&d[..4])
            )));
        }
    }
    Ok(LogEntry { header: h, ops })
}

/// Encodes one entry. Zero lengths and data offsets must be 4 KiB multiples and
/// every `Data` exactly 4096 bytes; otherwise `StructError::Invalid`.
pub fn encode_entry(
    sequence_number: u64,
    tail: u32,
    log_guid: Guid,
    flushed_file_offset: u64,
    last_file_offset: u64,
    ops: &[LogOp],
) -> Result<Vec<u8>, StructError> {
    let count = u32::try_from(ops.len()).map_err(|_| invalid("too many log descriptors".into()))?;
    let data_count = ops
        .iter()
        .filter(|o| matches!(o, LogOp::Data { .. }))
        .count() as u64;
    let desc_sectors = descriptor_sectors(count);
    let len = (desc_sectors + data_count) * LOG_SECTOR as u64;
    let entry_length = u32::try_from(len).map_err(|_| invalid("log entry too long".into()))?;
    let mut b = vec![0u8; len as usize];
    let header = LogEntryHeader {
        checksum: 0,
        entry_length,
        tail,
        sequence_number,
        descriptor_count: count,
        reserved: 0,
        log_guid,
        flushed_file_offset,
        last_file_offset,
    };
    header.encode_into(&mut b);
    let mut next_data = desc_sectors as usize;
    for (i, op) in ops.iter().enumerate() {
        let at = ENTRY_HEADER_SIZE + DESCRIPTOR_SIZE * i;
        match op {
            LogOp::Zero {
                file_offset,
                length,
            } => {
                if !is_aligned(*file_offset, LOG_SECTOR as u64)
                    || !is_aligned(*length, LOG_SECTOR as u64)
                {
                    return Err(invalid("zero descriptor not 4 KiB aligned".into()));
                }
                b[at..at + 4].copy_from_slice(&ZERO_SIGNATURE);
                b[at + 8..at + 16].copy_from_slice(&length.to_le_bytes());
                b[at + 16..at + 24].copy_from_slice(&file_offset.to_le_bytes());
            }
            LogOp::Data { file_offset, data } => {
                if !is_aligned(*file_offset, LOG_SECTOR as u64) || data.len() != LOG_SECTOR {
                    return Err(invalid(
                        "data descriptor not one aligned 4 KiB sector".into(),
                    ));
                }
                b[at..at + 4].copy_from_slice(&DATA_DESC_SIGNATURE);
                b[at + 4..at + 8].copy_from_slice(&data[4092..4096]);
                b[at + 8..at + 16].copy_from_slice(&data[..8]);
                b[at + 16..at + 24].copy_from_slice(&file_offset.to_le_bytes());
                let s = next_data * LOG_SECTOR;
                next_data += 1;
                let sector = &mut b[s..s + LOG_SECTOR];
                sector[..4].copy_from_slice(&DATA_SECTOR_SIGNATURE);
                sector[4..8].copy_from_slice(&((sequence_number >> 32) as u32).to_le_bytes());
                sector[8..4092].copy_from_slice(&data[8..4092]);
                sector[4092..].copy_from_slice(&(sequence_number as u32).to_le_bytes());
            }
        }
        b[at + 24..at + 32].copy_from_slice(&sequence_number.to_le_bytes());
    }
    store_crc32c(&mut b, 4);
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_ops() -> Vec<LogOp> {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        vec![
            LogOp::Data {
                file_offset: 3 << 20,
                data,
            },
            LogOp::Zero {
                file_offset: 2 << 20,
                length: 8192,
            },
        ]
    }

    #[test]
    fn roundtrip() {
        let g = Guid::random();
        let b =
            encode_entry(0x1_0000_0005, 0, g, 8 << 20, 8 << 20, &sample_ops()).expect("test value");
        assert_eq!(b.len(), 2 * LOG_SECTOR);
        let e = decode_entry(&b, g).expect("test value");
        assert_eq!(e.ops, sample_ops());
        assert_eq!(e.header.sequence_number, 0x1_0000_0005);
    }

    #[test]
    fn descriptor_sector_count() {
        assert_eq!(descriptor_sectors(0), 1);
        assert_eq!(descriptor_sectors(126), 1);
        assert_eq!(descriptor_sectors(127), 2);
        assert_eq!(descriptor_sectors(254), 2);
        assert_eq!(descriptor_sectors(255), 3);
    }

    #[test]
    fn every_corruption_is_detected() {
        let g = Guid::random();
        let b = encode_entry(9, 0, g, 8 << 20, 8 << 20, &sample_ops()).expect("test value");
        assert!(decode_entry(&b, Guid::random()).is_err(), "foreign LogGuid");
        for i in (0..b.len()).step_by(97) {
            let mut c = b.clone();
            c[i] ^= 0x20;
            assert!(decode_entry(&c, g).is_err(), "flip at {i}");
        }
        assert!(decode_entry(&b[..4096], g).is_err());
    }
}
