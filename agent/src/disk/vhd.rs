//! Legacy VHD (Virtual Hard Disk Image Format Specification, big-endian):
//! fixed disks (data + 512-byte footer) and dynamic disks (footer copy,
//! dynamic header, BAT of u32 sector numbers, blocks each led by a sector
//! bitmap, MSB first). The bitmap is honoured: a sector whose bit is clear
//! reads as zeros. Differencing VHDs are not supported.

use std::path::Path;

use super::ranges::{bit_runs, push_range};
use super::source::Image;
use super::{human_size, DiskError, VirtualDisk};

const COOKIE: &[u8; 8] = b"conectix";
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const FOOTER: u64 = 512;
const DYN_HEADER: u64 = 1024;
const UNALLOCATED: u32 = 0xFFFF_FFFF;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// One's complement of the byte sum, checksum field (4 bytes at `field`) excluded.
fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

/// True if `b` (at least 8 bytes) starts with the VHD footer cookie.
pub(crate) fn has_cookie(b: &[u8]) -> bool {
    b.len() >= 8 && &b[..8] == COOKIE
}

struct Footer {
    data_offset: u64,
    current_size: u64,
    disk_type: u32,
}

fn parse_footer(b: &[u8]) -> Result<Footer, String> {
    if !has_cookie(b) {
        return Err("no \"conectix\" cookie".into());
    }
    let stored = be32(b, 64);
    let computed = checksum(&b[..FOOTER as usize], 64);
    if stored != computed {
        return Err(format!(
            "footer checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    Ok(Footer {
        data_offset: be64(b, 16),
        current_size: be64(b, 48),
        disk_type: be32(b, 60),
    })
}

enum Kind {
    Fixed,
    Dynamic {
        block_size: u64,
        /// Bitmap bytes before each block's data (whole 512-byte sectors).
        bitmap_len: u64,
        bat: Vec<u32>,
    },
}

/// A fixed or dynamic VHD.
pub(crate) struct VhdDisk {
    img: Image,
    size: u64,
    kind: Kind,
    note: Option<String>,
}

impl VhdDisk {
    pub(crate) fn open(img: Image) -> Result<VhdDisk, DiskError> {
        let path = img.path.clone();
        let p: &Path = &path;
        let len = img.real_len();
        if len < FOOTER {
            return Err(DiskError::truncated(p, len, "a VHD footer needs 512 bytes"));
        }
        let mut end = vec![0u8; FOOTER as usize];
        img.read_raw(len - FOOTER, &mut end)?;
        let mut start = vec![0u8; FOOTER as usize];
        img.read_raw(0, &mut start)?;
        let mut note = None;
        let (footer, data_end) = match parse_footer(&end) {
            Ok(f) => (f, len - FOOTER),
            Err(e_end) => match parse_footer(&start) {
                Ok(f) if f.disk_type != 2 => {
                    note = Some(format!(
                        "footer at end: {e_end}; using the copy at offset 0"
                    ));
                    (f, len)
                }
                Ok(_) | Err(_) => return Err(DiskError::corrupt(p, format!("VHD {e_end}"))),
            },
        };
        let size = footer.current_size;
        if size & 511 != 0 {
            return Err(DiskError::corrupt(
                p,
                format!("VHD size {size} is not a multiple of 512"),
            ));
        }
        let kind = match footer.disk_type {
            2 => {
                if size > data_end {
                    return Err(DiskError::truncated(
                        p,
                        len,
                        format!(
                            "a fixed VHD of {size} bytes needs {}",
                            size.saturating_add(FOOTER)
                        ),
                    ));
                }
                Kind::Fixed
            }
            3 => {
                let doff = footer.data_offset;
                if doff < FOOTER || doff.checked_add(DYN_HEADER).is_none_or(|e| e > len) {
                    return Err(DiskError::truncated(
                        p,
                        len,
                        format!("the dynamic header at {doff} needs 1024 bytes"),
                    ));
                }
                let mut h = vec![0u8; DYN_HEADER as usize];
                img.read_raw(doff, &mut h)?;
                if &h[..8] != DYN_COOKIE {
                    return Err(DiskError::corrupt(
                        p,
                        "dynamic header has no \"cxsparse\" cookie",
                    ));
                }
                let (stored, computed) = (be32(&h, 36), checksum(&h, 36));
                if stored != computed {
                    return Err(DiskError::corrupt(
                        p,
                        format!("dynamic header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"),
                    ));
                }
                let table = be64(&h, 16);
                let entries = u64::from(be32(&h, 28));
                let block_size = u64::from(be32(&h, 32));
                if !block_size.is_power_of_two() || !(512..=(256 << 20)).contains(&block_size) {
                    return Err(DiskError::corrupt(
                        p,
                        format!("VHD block size {block_size} is invalid"),
                    ));
                }
                let blocks = size.div_ceil(block_size);
                if entries < blocks {
                    return Err(DiskError::corrupt(
                        p,
                        format!("VHD BAT has {entries} entries, {blocks} blocks need one each"),
                    ));
                }
                if table.checked_add(blocks * 4).is_none_or(|e| e > len) {
                    return Err(DiskError::truncated(
                        p,
                        len,
                        format!("the BAT at {table} needs {} bytes", blocks * 4),
                    ));
                }
                let mut raw = vec![0u8; (blocks * 4) as usize];
                img.read_raw(table, &mut raw)?;
                let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
                let bitmap_len = (block_size / 512).div_ceil(8).div_ceil(512) * 512;
                for (i, &s) in bat.iter().enumerate() {
                    if s == UNALLOCATED {
                        continue;
                    }
                    let blen = block_size.min(size - i as u64 * block_size);
                    let start = u64::from(s) * 512;
                    if start < doff + DYN_HEADER || start + bitmap_len + blen > data_end {
                        return Err(DiskError::corrupt(
                            p,
                            format!("BAT entry {i} points beyond end of file or into the headers (sector {s})"),
                        ));
                    }
                }
                Kind::Dynamic {
                    block_size,
                    bitmap_len,
                    bat,
                }
            }
            4 => return Err(DiskError::unsupported(p, "differencing VHD")),
            t => {
                return Err(DiskError::corrupt(
                    p,
                    format!("VHD disk type {t} is invalid"),
                ))
            }
        };
        Ok(VhdDisk {
            img,
            size,
            kind,
            note,
        })
    }
}

impl VirtualDisk for VhdDisk {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        512
    }
    fn physical_sector_size(&self) -> u32 {
        512
    }

    fn allocated_ranges(&self) -> Result<Vec<(u64, u64)>, DiskError> {
        match &self.kind {
            Kind::Fixed => Ok(if self.size > 0 {
                vec![(0, self.size)]
            } else {
                vec![]
            }),
            Kind::Dynamic {
                block_size,
                bitmap_len,
                bat,
            } => {
                let mut out = Vec::new();
                for (i, &s) in bat.iter().enumerate() {
                    if s == UNALLOCATED {
                        continue;
                    }
                    let start = i as u64 * block_size;
                    let sectors = (*block_size).min(self.size - start) / 512;
                    let bm = self.img.read_vec(u64::from(s) * 512, *bitmap_len)?;
                    for (f, l, set) in bit_runs(&bm, 0, sectors, false) {
                        if set {
                            push_range(&mut out, start + f * 512, l * 512);
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(DiskError::OutOfRange {
                path: self.img.path.clone(),
                offset,
                len: buf.len() as u64,
                virtual_size: self.size,
            });
        }
        let (block_size, bitmap_len, bat) = match &self.kind {
            Kind::Fixed => return self.img.read_payload(offset, buf),
            Kind::Dynamic {
                block_size,
                bitmap_len,
                bat,
            } => (*block_size, *bitmap_len, bat),
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / block_size;
            let ib = pos % block_size;
            let n = (block_size - ib).min((buf.len() - done) as u64) as usize;
            let out = &mut buf[done..done + n];
            let s = bat[block as usize];
            if s == UNALLOCATED {
                out.fill(0);
            } else {
                let base = u64::from(s) * 512;
                let first = ib / 512;
                let count = (ib + n as u64).div_ceil(512) - first;
                let bm = self
                    .img
                    .read_vec(base + first / 8, (first + count).div_ceil(8) - first / 8)?;
                for (f, l, set) in bit_runs(&bm, first % 8, count, false) {
                    let rs = ((first + f - first % 8) * 512).max(ib);
                    let re = ((first + f - first % 8 + l) * 512).min(ib + n as u64);
                    let o = &mut out[(rs - ib) as usize..(re - ib) as usize];
                    if set {
                        self.img.read_payload(base + bitmap_len + rs, o)?;
                    } else {
                        o.fill(0);
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    fn data_write_guid(&self) -> Option<[u8; 16]> {
        None
    }

    fn describe(&self) -> String {
        let mut s = match &self.kind {
            Kind::Fixed => "fixed VHD, 512 B sectors".to_string(),
            Kind::Dynamic { block_size, .. } => {
                format!(
                    "dynamic VHD, {} blocks, 512 B sectors",
                    human_size(*block_size)
                )
            }
        };
        if let Some(n) = &self.note {
            s += &format!(" ({n})");
        }
        s
    }
}
