//! Unbuffered (`O_DIRECT`) reads of a source disk's payload.
//!
//! A full backup streams gigabytes that nobody reads again soon. Through the
//! page cache every byte costs a page allocation, a copy and later reclaim:
//! kernel CPU that, on a small host, competes with the gateway's compression.
//! A direct read moves the data from the device into the reader's buffer
//! without touching the page cache.
//!
//! MUST NOT: write. The handle is opened `O_RDONLY | O_DIRECT` and only read
//! with `pread`.
//!
//! Direct I/O needs the file offset, the length and the buffer address
//! aligned to the device's logical block size; [`ALIGN`] (4096) satisfies
//! every device. A request that is not aligned (a caller's `Vec`, a VHD block
//! at a 512-byte boundary, the file's tail) is widened to aligned bounds and
//! read into a per-thread aligned bounce buffer, then copied out: one
//! `memcpy`, the same copy a buffered read does, without the page cache.
//!
//! A file system that refuses direct I/O (at open, or with `EINVAL` or
//! `EOPNOTSUPP` on a read) turns the file to buffered reads for good, logged
//! once at debug level; the caller then reads through its ordinary handle.
//! Lack of direct I/O never fails a read.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Alignment of direct-read offsets, lengths and buffers.
pub(crate) const ALIGN: usize = 4096;

/// Most bytes one direct read moves through the bounce buffer (a multiple of
/// [`ALIGN`]); larger requests are read in pieces, so each reading thread
/// holds at most this much bounce memory.
const BOUNCE_MAX: usize = 4 << 20;

/// A positioned read; the seam tests use to make a file system refuse.
type PRead = fn(&File, &mut [u8], u64) -> io::Result<usize>;

fn pread(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    f.read_at(buf, offset)
}

/// A file opened `O_RDONLY | O_DIRECT`, for bulk reads. Shared by reading
/// threads (`&self`).
pub(crate) struct DirectFile {
    file: File,
    path: PathBuf,
    /// False once the file system refused a direct read.
    ok: AtomicBool,
    pread: PRead,
}

impl DirectFile {
    /// Opens `path` read-only for direct I/O; `None` when refused (logged).
    pub(crate) fn open(path: &Path) -> Option<DirectFile> {
        match open_direct(path) {
            Ok(file) => Some(DirectFile::with_pread(file, path, pread)),
            Err(e) => {
                tracing::debug!(path = %path.display(), "direct I/O refused at open ({e}); reading through the page cache");
                None
            }
        }
    }

    fn with_pread(file: File, path: &Path, pread: PRead) -> DirectFile {
        DirectFile {
            file,
            path: path.to_path_buf(),
            ok: AtomicBool::new(true),
            pread,
        }
    }

    /// True until the file system refused a direct read.
    pub(crate) fn is_active(&self) -> bool {
        self.ok.load(Ordering::Relaxed)
    }

    /// Reads exactly `buf.len()` bytes at `offset` around the page cache.
    /// `Ok(false)`: the file system refuses direct I/O (now and from now on)
    /// and `buf` holds nothing useful; read it buffered instead.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if !self.is_active() {
            return Ok(false);
        }
        match self.read_direct(buf, offset) {
            Ok(()) => Ok(true),
            Err(e) if is_refusal(&e) => {
                if self.ok.swap(false, Ordering::Relaxed) {
                    tracing::debug!(path = %self.path.display(), "direct read refused ({e}); reading through the page cache from now on");
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf.as_ptr() as usize)
            && is_aligned(buf.len())
            && offset.is_multiple_of(ALIGN as u64)
        {
            let n = self.read_full(buf, offset)?;
            return if n == buf.len() { Ok(()) } else { Err(eof()) };
        }
        BOUNCE.with(|b| {
            let mut bounce = b.borrow_mut();
            let mut done = 0usize;
            while done < buf.len() {
                let pos = offset + done as u64;
                let skip = (pos % ALIGN as u64) as usize;
                let start = pos - skip as u64;
                let want = (buf.len() - done).min(BOUNCE_MAX - skip);
                let span = (skip + want).next_multiple_of(ALIGN);
                let b = bounce.get(span);
                // Short only at the end of the file, which may lie inside the span.
                if self.read_full(b, start)? < skip + want {
                    return Err(eof());
                }
                buf[done..done + want].copy_from_slice(&b[skip..skip + want]);
                done += want;
            }
            Ok(())
        })
    }

    /// Reads until `buf` is full or the file ends; returns the bytes read.
    fn read_full(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0usize;
        while done < buf.len() {
            match (self.pread)(&self.file, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // read(true) alone: O_RDONLY.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_: &Path) -> io::Result<File> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// How a file system says "no direct I/O here (for this request)".
fn is_refusal(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

fn is_aligned(n: usize) -> bool {
    n.is_multiple_of(ALIGN)
}

fn eof() -> io::Error {
    io::Error::from(io::ErrorKind::UnexpectedEof)
}

/// A heap buffer handing out slices that start at an [`ALIGN`] boundary.
#[derive(Default)]
struct Bounce {
    raw: Vec<u8>,
}

impl Bounce {
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.raw.len() < len + ALIGN {
            self.raw = vec![0u8; len + ALIGN];
        }
        let start = (ALIGN - self.raw.as_ptr() as usize % ALIGN) % ALIGN;
        &mut self.raw[start..start + len]
    }
}

thread_local! {
    /// Reused by every direct read of this thread; at most `BOUNCE_MAX + ALIGN` bytes.
    static BOUNCE: RefCell<Bounce> = RefCell::new(Bounce::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect()
    }

    /// Offsets and lengths around every alignment edge, the file's tail
    /// included, against the bytes written.
    fn check_reads(d: &DirectFile, want: &[u8]) {
        let len = want.len();
        let cases = [
            (0usize, len),
            (0, 4096),
            (4096, 1 << 20),
            (512, 1 << 20),
            (1, 3),
            (4095, 2),
            (777, 100_000),
            (len - 1, 1),
            (len - 5000, 5000),
            (
                len - (BOUNCE_MAX + 3 * ALIGN + 1),
                BOUNCE_MAX + 3 * ALIGN + 1,
            ),
        ];
        for (off, n) in cases {
            let mut b = vec![0u8; n + 1];
            // A heap buffer (aligned or not) and one surely shifted by a byte.
            for shift in [0, 1] {
                let buf = &mut b[shift..shift + n];
                buf.fill(0xEE);
                let direct = d.read_exact_at(buf, off as u64).expect("read");
                assert!(direct || !d.is_active(), "at {off}+{n}");
                if direct {
                    assert!(buf == &want[off..off + n], "bytes at {off}+{n}");
                }
            }
        }
        let mut past = vec![0u8; 2];
        let err = d.read_exact_at(&mut past, len as u64 - 1);
        assert!(
            matches!(err, Ok(false)) || err.is_err(),
            "a read past the end must not succeed"
        );
    }

    #[test]
    fn reads_just_written_bytes_at_any_alignment() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("disk.raw");
        // An odd length: the last block is partial. Not synced: the data may
        // still be dirty in the page cache, which direct reads must see.
        let want = pattern((6 << 20) + 12345);
        std::fs::write(&path, &want).expect("write");
        let d = DirectFile::open(&path).expect("the temp dir's file system allows O_DIRECT");
        check_reads(&d, &want);
        // Aligned offset, length and buffer: read straight into the caller's buffer.
        let mut raw = vec![0u8; (1 << 20) + ALIGN];
        let start = (ALIGN - raw.as_ptr() as usize % ALIGN) % ALIGN;
        let buf = &mut raw[start..start + (1 << 20)];
        assert!(d.read_exact_at(buf, 1 << 20).expect("read"));
        assert!(buf == &want[1 << 20..2 << 20]);
        assert!(
            d.is_active(),
            "no read may have been refused on this file system"
        );
    }

    #[test]
    fn a_refused_read_turns_the_file_buffered_for_good() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("disk.raw");
        std::fs::write(&path, pattern(1 << 20)).expect("write");
        let file = File::open(&path).expect("open");
        let refuse: PRead = |_, _, _| Err(io::Error::from_raw_os_error(libc::EINVAL));
        let d = DirectFile::with_pread(file, &path, refuse);
        let mut buf = vec![0u8; 8192];
        assert!(!d
            .read_exact_at(&mut buf, 0)
            .expect("refusal is not an error"));
        assert!(!d.is_active());
        assert!(!d.read_exact_at(&mut buf, 0).expect("still refused"));
        // Other errors are errors.
        let fail: PRead = |_, _, _| Err(io::Error::from_raw_os_error(libc::EIO));
        let d = DirectFile::with_pread(File::open(&path).expect("open"), &path, fail);
        assert!(d.read_exact_at(&mut buf, 0).is_err());
        assert!(d.is_active());
    }

    #[test]
    fn short_reads_are_continued() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("disk.raw");
        let want = pattern(3 << 20);
        std::fs::write(&path, &want).expect("write");
        // At most 64 KiB per call, as some file systems do.
        let short: PRead = |f, b, o| {
            let n = b.len().min(64 << 10);
            f.read_at(&mut b[..n], o)
        };
        let d = DirectFile::with_pread(File::open(&path).expect("open"), &path, short);
        let mut buf = vec![0u8; (2 << 20) + 7];
        assert!(d.read_exact_at(&mut buf, 333).expect("read"));
        assert!(buf == want[333..333 + buf.len()]);
    }

    #[test]
    fn bounce_slices_are_aligned() {
        let mut b = Bounce::default();
        for len in [1, 4096, 1 << 20, 12345] {
            let s = b.get(len);
            assert_eq!(s.len(), len);
            assert!(is_aligned(s.as_ptr() as usize));
        }
    }
}
