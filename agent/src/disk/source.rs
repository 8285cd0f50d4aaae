//! Read-only access to an image file: positioned reads on a `File` opened
//! with `File::open`, or on bytes in memory, plus the overlay a replayed VHDX
//! log leaves behind. Nothing here can write to a file.
//!
//! Two kinds of reads: structure reads (headers, log, region table,
//! metadata, BAT, bitmaps) are small and re-read, and go through the page
//! cache; payload reads (the guest's data, streamed once per backup) go
//! around it with `O_DIRECT` where the file system allows (`direct`).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::direct::DirectFile;
use super::{DiskError, ReadMode};

/// Bytes that can be read at any offset from many threads.
pub(crate) trait Backing: Send + Sync {
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`, inside `len()`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// [`read_exact_at`](Self::read_exact_at) for guest data, read once in
    /// bulk: may bypass the page cache.
    fn read_payload_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

/// Payload reads shorter than this stay buffered: a scattered small read
/// (sector-bitmap runs of a differencing disk, pieces between log-overlay
/// pages) is served better by the page cache and its readahead than by a
/// synchronous device read.
const DIRECT_MIN: usize = 64 << 10;

/// A file opened read-only; its length is taken once at open. Structure
/// reads use the buffered handle, payload reads the direct one while the
/// file system accepts direct I/O.
pub(crate) struct FileBacking {
    file: File,
    direct: Option<DirectFile>,
    len: u64,
}

impl FileBacking {
    /// Opens `path` with `File::open` (read-only) and, for
    /// [`ReadMode::Direct`], a second read-only `O_DIRECT` handle if the
    /// file system allows one.
    pub(crate) fn open(path: &Path, mode: ReadMode) -> Result<FileBacking, DiskError> {
        let file = File::open(path).map_err(|e| DiskError::io(path, e))?;
        let len = file.metadata().map_err(|e| DiskError::io(path, e))?.len();
        let direct = match mode {
            ReadMode::Direct => DirectFile::open(path),
            ReadMode::Buffered => None,
        };
        Ok(FileBacking { file, direct, len })
    }

    /// True while payload reads bypass the page cache.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.direct.as_ref().is_some_and(DirectFile::is_active)
    }
}

impl Backing for FileBacking {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn read_payload_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if let Some(d) = self.direct.as_ref().filter(|_| buf.len() >= DIRECT_MIN) {
            if d.read_exact_at(buf, offset)? {
                return Ok(());
            }
        }
        self.file.read_exact_at(buf, offset)
    }
}

/// Bytes in memory (fuzzing, tests).
pub(crate) struct MemBacking(pub(crate) Vec<u8>);

impl Backing for MemBacking {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let eof = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.0.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Page size of the log overlay (the log's sector size).
pub(crate) const PAGE: u64 = 4096;

/// The file as a replayed log left it: 4 KiB pages of new data and zeroed
/// ranges, applied in log order over the real file.
#[derive(Default)]
pub(crate) struct Overlay {
    pages: BTreeMap<u64, Box<[u8]>>,
    /// Disjoint zeroed ranges, start → end.
    zeros: BTreeMap<u64, u64>,
    /// One past the highest byte any descriptor touched.
    pub(crate) extent: u64,
}

impl Overlay {
    /// Zero descriptor: `[start, start+len)` reads as zeros (both 4 KiB aligned).
    pub(crate) fn zero(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        self.extent = self.extent.max(end);
        let doomed: Vec<u64> = self.pages.range(start..end).map(|(k, _)| *k).collect();
        for k in doomed {
            self.pages.remove(&k);
        }
        let (mut s, mut e) = (start, end);
        // Merge with every interval touching [s, e).
        let touching: Vec<(u64, u64)> = self
            .zeros
            .range(..=e)
            .rev()
            .take_while(|(_, &ie)| ie >= s)
            .map(|(&is, &ie)| (is, ie))
            .collect();
        for (is, ie) in touching {
            self.zeros.remove(&is);
            s = s.min(is);
            e = e.max(ie);
        }
        self.zeros.insert(s, e);
    }

    /// Data descriptor: the 4 KiB page at `start` (4 KiB aligned) holds `data`.
    pub(crate) fn data(&mut self, start: u64, data: Vec<u8>) {
        let end = start.saturating_add(PAGE);
        self.extent = self.extent.max(end);
        // Cut [start, end) out of the zero ranges.
        let overlapping: Vec<(u64, u64)> = self
            .zeros
            .range(..end)
            .rev()
            .take_while(|(_, &ie)| ie > start)
            .map(|(&is, &ie)| (is, ie))
            .collect();
        for (is, ie) in overlapping {
            self.zeros.remove(&is);
            if is < start {
                self.zeros.insert(is, start);
            }
            if ie > end {
                self.zeros.insert(end, ie);
            }
        }
        self.pages.insert(start, data.into_boxed_slice());
    }

    /// True if no descriptor was applied.
    pub(crate) fn is_empty(&self) -> bool {
        self.pages.is_empty() && self.zeros.is_empty()
    }

    /// What covers `pos`: `Some(Ok(page))` data page, `Some(Err(end))` zeros up
    /// to `end`, or `None` with the next overlay boundary after `pos`.
    fn at(&self, pos: u64) -> Result<Result<&[u8], u64>, u64> {
        let page = pos - pos % PAGE;
        if let Some(p) = self.pages.get(&page) {
            return Ok(Ok(p));
        }
        if let Some((_, &ze)) = self.zeros.range(..=pos).next_back() {
            if ze > pos {
                return Ok(Err(ze));
            }
        }
        let next_page = self
            .pages
            .range(page.saturating_add(PAGE)..)
            .next()
            .map(|(k, _)| *k);
        let next_zero = self.zeros.range(pos..).next().map(|(k, _)| *k);
        Err(next_page
            .unwrap_or(u64::MAX)
            .min(next_zero.unwrap_or(u64::MAX)))
    }
}

/// One image file: its backing bytes, its name for errors, and (after a log
/// replay) the overlay every read except the header reads goes through.
pub(crate) struct Image {
    pub(crate) path: PathBuf,
    base: Box<dyn Backing>,
    overlay: Overlay,
    /// Logical file length: the real one, or larger after a replay extended it.
    len: u64,
}

impl Image {
    pub(crate) fn new(path: &Path, base: Box<dyn Backing>) -> Image {
        let len = base.len();
        Image {
            path: path.to_path_buf(),
            base,
            overlay: Overlay::default(),
            len,
        }
    }

    /// Length of the file (after any replay).
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Length of the file on disk.
    pub(crate) fn real_len(&self) -> u64 {
        self.base.len()
    }

    /// Installs a replayed log's overlay; the file is at least `min_len` long from now on.
    pub(crate) fn set_overlay(&mut self, overlay: Overlay, min_len: u64) {
        self.len = self.len.max(overlay.extent).max(min_len);
        self.overlay = overlay;
    }

    /// Reads the file as it is on disk, bypassing the overlay (headers, the log).
    pub(crate) fn read_raw(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.base.len()) {
            return Err(DiskError::truncated(
                &self.path,
                self.base.len(),
                format!("a read of {} bytes at {offset} needs more", buf.len()),
            ));
        }
        self.base
            .read_exact_at(buf, offset)
            .map_err(|e| DiskError::io(&self.path, e))
    }

    /// Reads file structures through the overlay; bytes between the real
    /// end of the file and [`len`](Self::len) read as zeros.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.read_through(offset, buf, false)
    }

    /// [`read`](Self::read) for guest data (payload blocks, a raw or fixed
    /// image's bytes): read once in bulk, so it may bypass the page cache.
    pub(crate) fn read_payload(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.read_through(offset, buf, true)
    }

    fn read_through(&self, offset: u64, buf: &mut [u8], payload: bool) -> Result<(), DiskError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(DiskError::truncated(
                &self.path,
                self.len,
                format!("a read of {} bytes at {offset} needs more", buf.len()),
            ));
        }
        if self.overlay.is_empty() {
            return self.read_base(offset, buf, payload);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let left = buf.len() - done;
            match self.overlay.at(pos) {
                Ok(Ok(page)) => {
                    let in_page = (pos % PAGE) as usize;
                    let n = left.min(page.len() - in_page);
                    buf[done..done + n].copy_from_slice(&page[in_page..in_page + n]);
                    done += n;
                }
                Ok(Err(zero_end)) => {
                    let n = left.min((zero_end - pos) as usize);
                    buf[done..done + n].fill(0);
                    done += n;
                }
                Err(next) => {
                    let n = left.min(next.saturating_sub(pos).try_into().unwrap_or(usize::MAX));
                    self.read_base(pos, &mut buf[done..done + n], payload)?;
                    done += n;
                }
            }
        }
        Ok(())
    }

    fn read_base(&self, offset: u64, buf: &mut [u8], payload: bool) -> Result<(), DiskError> {
        let real = self.base.len();
        let in_file = real.saturating_sub(offset).min(buf.len() as u64) as usize;
        if in_file > 0 {
            let b = &mut buf[..in_file];
            if payload {
                self.base.read_payload_at(b, offset)
            } else {
                self.base.read_exact_at(b, offset)
            }
            .map_err(|e| DiskError::io(&self.path, e))?;
        }
        buf[in_file..].fill(0);
        Ok(())
    }

    /// Reads `len` bytes into a new buffer; `len` must already be validated.
    pub(crate) fn read_vec(&self, offset: u64, len: u64) -> Result<Vec<u8>, DiskError> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(DiskError::truncated(
                &self.path,
                self.len,
                format!("{len} bytes at {offset} are needed"),
            ));
        }
        let mut v = vec![0u8; len as usize];
        self.read(offset, &mut v)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(bytes: Vec<u8>) -> Image {
        Image::new(Path::new("t.vhdx"), Box::new(MemBacking(bytes)))
    }

    #[test]
    fn overlay_orders_zero_and_data() {
        let base: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut ov = Overlay::default();
        ov.zero(4096, 4 * 4096); // [4K, 20K) zero
        ov.data(8192, vec![7u8; 4096]); // [8K, 12K) sevens
        ov.data(40960, vec![9u8; 4096]);
        ov.zero(40960, 4096); // data then zero: zero wins
        ov.zero(69632, 4096); // beyond the file: extends it
        let mut im = img(base.clone());
        im.set_overlay(ov, 0);
        assert_eq!(im.len(), 73728);
        let mut all = vec![0u8; 73728];
        im.read(0, &mut all).expect("test value");
        let mut want = base.clone();
        want.resize(73728, 0);
        want[4096..20480].fill(0);
        want[8192..12288].fill(7);
        want[40960..45056].fill(0);
        assert_eq!(all, want);
        // Unaligned reads agree with the whole.
        for (o, l) in [
            (4000u64, 200usize),
            (8191, 2),
            (12287, 4098),
            (40959, 3),
            (65530, 8000),
        ] {
            let mut b = vec![0u8; l];
            im.read(o, &mut b).expect("test value");
            assert_eq!(b, &want[o as usize..o as usize + l], "at {o}+{l}");
        }
        assert!(im.read(73727, &mut [0u8; 2]).is_err());
        // Raw reads bypass the overlay.
        let mut raw = vec![0u8; 16];
        im.read_raw(8192, &mut raw).expect("test value");
        assert_eq!(raw, &base[8192..8208]);
    }

    #[test]
    fn payload_reads_direct_or_buffered_agree_with_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("disk.raw");
        let want: Vec<u8> = (0..(3u32 << 20) + 1000)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        // Read back at once, possibly still dirty in the page cache.
        std::fs::write(&path, &want).expect("write");
        for mode in [ReadMode::Direct, ReadMode::Buffered] {
            let fb = FileBacking::open(&path, mode).expect("open");
            assert_eq!(fb.len(), want.len() as u64);
            let mut im = Image::new(&path, Box::new(fb));
            let mut ov = Overlay::default();
            ov.data(1 << 20, vec![0xAB; PAGE as usize]);
            let mut with_ov = want.clone();
            with_ov[1 << 20..(1 << 20) + PAGE as usize].fill(0xAB);
            for (o, l) in [
                (0usize, want.len()),
                (4096, 1 << 20),
                (512, 1 << 20),
                (want.len() - 70_000, 70_000),
                (10, 100),
            ] {
                let mut b = vec![0u8; l];
                im.read_payload(o as u64, &mut b).expect("read");
                assert!(b == want[o..o + l], "{mode:?} at {o}+{l}");
            }
            im.set_overlay(ov, 0);
            let mut all = vec![0u8; want.len()];
            im.read_payload(0, &mut all).expect("read");
            assert!(all == with_ov, "{mode:?} through the overlay");
        }
        // The temp dir's file system takes direct reads; the forced mode never uses them.
        let direct = FileBacking::open(&path, ReadMode::Direct).expect("open");
        let mut b = vec![0u8; 1 << 20];
        direct.read_payload_at(&mut b, 0).expect("read");
        assert!(
            direct.is_direct(),
            "set TMPDIR to a file system with O_DIRECT"
        );
        let buffered = FileBacking::open(&path, ReadMode::Buffered).expect("open");
        assert!(!buffered.is_direct());
    }

    #[test]
    fn overlapping_zero_ranges_merge() {
        let mut ov = Overlay::default();
        ov.zero(0, 8192);
        ov.zero(16384, 8192);
        ov.zero(4096, 16384);
        assert_eq!(ov.zeros.len(), 1);
        assert_eq!(ov.zeros.get(&0), Some(&24576));
        ov.data(8192, vec![1; 4096]);
        assert_eq!(ov.zeros.len(), 2);
    }
}
