//! Raw images: the file is the disk.

use super::source::Image;
use super::{human_size, DiskError, VirtualDisk};

/// A raw image file.
pub(crate) struct RawDisk {
    pub(crate) img: Image,
}

impl VirtualDisk for RawDisk {
    fn virtual_size(&self) -> u64 {
        self.img.len()
    }
    fn logical_sector_size(&self) -> u32 {
        512
    }
    fn physical_sector_size(&self) -> u32 {
        512
    }
    fn allocated_ranges(&self) -> Result<Vec<(u64, u64)>, DiskError> {
        let n = self.img.len();
        Ok(if n > 0 { vec![(0, n)] } else { vec![] })
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let size = self.img.len();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > size)
        {
            return Err(DiskError::OutOfRange {
                path: self.img.path.clone(),
                offset,
                len: buf.len() as u64,
                virtual_size: size,
            });
        }
        self.img.read_payload(offset, buf)
    }
    fn data_write_guid(&self) -> Option<[u8; 16]> {
        None
    }
    fn describe(&self) -> String {
        format!("raw image, {}", human_size(self.img.len()))
    }
}
