//! File-level mechanics of the local store: where packs and indexes live,
//! durable writes (tmp, fsync, rename, fsync directory — DESIGN.md §6 rule 6),
//! crash-garbage removal, positioned reads through a small cache of open pack
//! handles (buffered, and unbuffered for bulk reads), and ENOSPC
//! classification. Blocking code: call it from `spawn_blocking`.
//!
//! Bulk reads (restore runs of records back to back in a pack) go around the
//! page cache (`O_DIRECT`): a restore streams gigabytes nobody reads again
//! soon, and through the page cache every byte costs a page allocation, a
//! kernel copy and later reclaim — CPU the restore's decryption needs. The
//! span is widened to 4 KiB bounds and read into an aligned buffer the
//! reading thread keeps; the records are used where they land, not copied.
//! The open pack is written around the page cache too ([`PackAppender`]).
//! A file system that refuses direct I/O (at open, or `EINVAL`/`EOPNOTSUPP`
//! on a read or a pack write) turns the store to buffered reads and writes
//! for good, logged once.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tierback_format::ids::{PackId, PointId};

/// Suffix of files being written; any found at open are crash garbage.
pub(crate) const TMP_SUFFIX: &str = ".tmp";

/// Directory layout under the data dir.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub packs: PathBuf,
    pub indexes: PathBuf,
}

impl Layout {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            packs: data_dir.join("packs"),
            indexes: data_dir.join("indexes"),
        }
    }

    /// `packs/<first 2 hex>/<pack id>.pack`
    pub fn pack_path(&self, id: &PackId) -> PathBuf {
        self.pack_dir(id.0[0]).join(format!("{id}.pack"))
    }

    /// `packs/<xx>`: the directory of the packs whose id starts with `first`.
    fn pack_dir(&self, first: u8) -> PathBuf {
        self.packs.join(format!("{first:02x}"))
    }

    /// `indexes/<point id>/<stream_no>.idx`
    pub fn index_path(&self, point: &PointId, stream_no: u32) -> PathBuf {
        self.indexes
            .join(point.to_string())
            .join(format!("{stream_no}.idx"))
    }

    /// Creates the top directories and the 256 pack directories (durably)
    /// and removes every `*.tmp` file below them. Returns how many were
    /// removed. With every pack directory made here, starting a pack never
    /// waits for a directory fsync while uploads wait on it.
    pub fn prepare(&self) -> io::Result<usize> {
        let mut removed = 0;
        for top in [&self.packs, &self.indexes] {
            ensure_dir(top)?;
        }
        let mut made = false;
        for b in 0..=255u8 {
            let dir = self.pack_dir(b);
            if !dir.is_dir() {
                fs::create_dir(&dir)?;
                made = true;
            }
        }
        if made {
            fsync_dir(&self.packs)?;
        }
        for top in [&self.packs, &self.indexes] {
            for sub in fs::read_dir(top)? {
                let sub = sub?;
                if sub.file_type()?.is_dir() {
                    for f in fs::read_dir(sub.path())? {
                        removed += remove_if_tmp(&f?.path())?;
                    }
                } else {
                    removed += remove_if_tmp(&sub.path())?;
                }
            }
        }
        Ok(removed)
    }
}

fn remove_if_tmp(path: &Path) -> io::Result<usize> {
    if path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(TMP_SUFFIX))
    {
        fs::remove_file(path)?;
        if let Some(dir) = path.parent() {
            fsync_dir(dir)?;
        }
        return Ok(1);
    }
    Ok(0)
}

/// True for "no space left" and "quota exceeded".
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` if missing and makes its directory entry durable.
pub(crate) fn ensure_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// Test-only fault injection for durable writes; a no-op otherwise.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Number of upcoming durable writes that fail with ENOSPC halfway.
    #[cfg(test)]
    pub enospc_writes: std::sync::atomic::AtomicU32,
    /// GC step after which a GC run stops as if the gateway died (0: never).
    #[cfg(test)]
    pub gc_stop_after: std::sync::atomic::AtomicU8,
}

impl Faults {
    /// True when a test asked GC to stop after `step`.
    pub fn gc_stop_at(&self, step: u8) -> bool {
        #[cfg(test)]
        {
            if self.gc_stop_after.load(std::sync::atomic::Ordering::SeqCst) == step {
                return true;
            }
        }
        let _ = step;
        false
    }

    pub(crate) fn mid_write(&self) -> io::Result<()> {
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering;
            if self
                .enospc_writes
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` durably: `<path>.<random>.tmp`, write, fsync,
/// rename over `path`, fsync the directory. On error the tmp file is removed
/// and `path` is untouched (or, if only the final directory fsync failed,
/// holds the complete new content).
pub(crate) fn write_durably(path: &Path, bytes: &[u8], faults: &Faults) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path without a directory"))?;
    ensure_dir(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("path without a name"))?;
    let tmp = dir.join(format!("{name}.{:016x}{TMP_SUFFIX}", rand::random::<u64>()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let (first, second) = bytes.split_at(bytes.len() / 2);
        f.write_all(first)?;
        faults.mid_write()?;
        f.write_all(second)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(dir)
}

/// Seals a pack whose header and records were streamed into `tmp` up to
/// `held_at`, the rest of its records (`held`, the appender's unwritten
/// bytes) still in memory: cuts the file back to `held_at` (dropping a tail
/// from a failed attempt), writes `held` and `tail` (sealed TOC and trailer),
/// fsyncs, renames to `path` and fsyncs the directory. On error `tmp` is
/// kept, so the caller can try again; a retry after only the directory fsync
/// failed finds `path` complete and redoes that.
pub(crate) fn seal_pack_file(
    tmp: &Path,
    path: &Path,
    (held_at, held): (u64, &[u8]),
    tail: &[u8],
    faults: &Faults,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path without a directory"))?;
    let records_end = held_at + held.len() as u64;
    if !tmp.exists() && fs::metadata(path).is_ok_and(|m| m.len() == records_end + tail.len() as u64)
    {
        return fsync_dir(dir);
    }
    let f = OpenOptions::new().write(true).open(tmp)?;
    f.set_len(held_at)?;
    f.write_all_at(held, held_at)?;
    let (first, second) = tail.split_at(tail.len() / 2);
    f.write_all_at(first, records_end)?;
    faults.mid_write()?;
    f.write_all_at(second, records_end + first.len() as u64)?;
    f.sync_all()?;
    drop(f);
    fs::rename(tmp, path)?;
    fsync_dir(dir)
}

/// Bytes the open pack's appender holds before it writes them out.
const APPEND_WRITE_AT: usize = 1 << 20;
/// Bytes past which an append waits for the write in flight.
const APPEND_HOLD_MAX: usize = 8 << 20;

/// The open pack's `*.tmp` file, written around the page cache
/// (`O_DIRECT`) on a thread of its own: a backup writes gigabytes of packs
/// nobody reads back soon, and through the page cache every byte cost a page
/// allocation and a kernel copy on the appending thread (5-20 % of the
/// gateway's CPU in a full backup, docs/benchmarks.md).
///
/// Appends fill an aligned buffer; [`Self::write_out`] hands its whole 4 KiB
/// blocks to the writer thread once it holds [`APPEND_WRITE_AT`] bytes and
/// goes on filling a second buffer. One write is in flight at a time; a
/// later `write_out` (or the seal, [`Self::into_held`]) collects its result.
/// A failed write is cut off the file and its bytes return to the buffer, so
/// nothing appended is lost and the write is tried again later; the append
/// that collects the failure fails with it (disk full). The file always
/// holds whole blocks; the seal writes the rest (see [`seal_pack_file`]). A
/// file system that refuses direct I/O gets buffered writes of the blocks
/// (the store's flag, as for reads).
/// Memory: two buffers of 2 MiB, growing twofold while a lagging disk lets
/// up to 8 MiB and one more record gather (16 MiB each at 1 MiB chunks).
pub(crate) struct PackAppender {
    buf: AlignedVec,
    /// File offset of `buf`'s first byte: a multiple of [`DIRECT_ALIGN`];
    /// everything before it is written or in flight.
    at: u64,
    /// The buffer back from the last write, for the next one.
    spare: Option<AlignedVec>,
    /// File offset of the write in flight.
    in_flight: Option<u64>,
    /// Test-only: upcoming writes of the writer thread that fail (ENOSPC).
    #[cfg(test)]
    fail_writes: Arc<std::sync::atomic::AtomicU32>,
    to_writer: std::sync::mpsc::Sender<(u64, AlignedVec)>,
    from_writer: std::sync::mpsc::Receiver<(AlignedVec, io::Result<()>)>,
}

impl PackAppender {
    /// Creates `path` (which must not exist) and its writer thread; writes
    /// it directly while `direct_ok` (the store's flag, [`HandleCache`])
    /// holds, and clears that on a refusal.
    pub(crate) fn create(path: &Path, direct_ok: Arc<AtomicBool>) -> io::Result<PackAppender> {
        let direct = direct_ok.load(Ordering::Relaxed);
        let file = match direct.then(|| create_direct(path)) {
            Some(Ok(f)) => f,
            Some(Err(e)) if !is_refusal(&e) => return Err(e),
            refusal => {
                if let Some(Err(e)) = refusal {
                    refused(&direct_ok, &e);
                }
                // (A refusing open may have made the file already.)
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)?
            }
        };
        let (to_writer, jobs) = std::sync::mpsc::channel::<(u64, AlignedVec)>();
        let (done, from_writer) = std::sync::mpsc::channel();
        let mut w = BlockWriter {
            path: path.to_path_buf(),
            file,
            direct: direct.then_some(direct_ok),
            #[cfg(test)]
            fail_writes: Arc::default(),
        };
        #[cfg(test)]
        let fail_writes = w.fail_writes.clone();
        std::thread::Builder::new()
            .name("pack-writer".into())
            .spawn(move || {
                for (at, blocks) in jobs {
                    let r = w.write(&blocks, at);
                    if done.send((blocks, r)).is_err() {
                        break;
                    }
                }
            })?;
        let mut buf = AlignedVec::default();
        buf.reserve(2 * APPEND_WRITE_AT);
        Ok(PackAppender {
            buf,
            at: 0,
            spare: None,
            in_flight: None,
            #[cfg(test)]
            fail_writes,
            to_writer,
            from_writer,
        })
    }

    /// Collects the write in flight once it is done, waiting for it only
    /// with `wait`; true when no write is in flight any more. On its
    /// failure its bytes go back in front of the buffer and the error is
    /// returned.
    fn settle(&mut self, wait: bool) -> io::Result<bool> {
        use std::sync::mpsc::TryRecvError;
        let Some(at) = self.in_flight else {
            return Ok(true);
        };
        let gone = || io::Error::other("the pack writer thread is gone");
        let (mut blocks, r) = if wait {
            self.from_writer.recv().map_err(|_| gone())?
        } else {
            match self.from_writer.try_recv() {
                Ok(done) => done,
                Err(TryRecvError::Empty) => return Ok(false),
                Err(TryRecvError::Disconnected) => return Err(gone()),
            }
        };
        self.in_flight = None;
        match r {
            Ok(()) => {
                self.spare = Some(blocks);
                Ok(true)
            }
            Err(e) => {
                blocks.extend(self.buf.bytes());
                self.buf = blocks;
                self.at = at;
                Err(e)
            }
        }
    }

    /// Collects the last write if it is done and, once [`APPEND_WRITE_AT`]
    /// bytes are held, starts writing their whole blocks. While the last
    /// write is still going, the appends gather (the appending thread waits
    /// for it only past [`APPEND_HOLD_MAX`] bytes): a busy disk gets larger
    /// writes, not a stalled caller. An error is the last write's: nothing
    /// held was dropped, and the next call tries it again.
    pub(crate) fn write_out(&mut self) -> io::Result<()> {
        if !self.settle(self.buf.len() >= APPEND_HOLD_MAX)? {
            return Ok(());
        }
        let held = self.buf.len();
        if held < APPEND_WRITE_AT {
            return Ok(());
        }
        let n = held - held % DIRECT_ALIGN;
        let mut next = self.spare.take().unwrap_or_default();
        next.clear();
        next.reserve(2 * APPEND_WRITE_AT);
        next.extend(&self.buf.bytes()[n..]);
        let mut blocks = std::mem::replace(&mut self.buf, next);
        blocks.truncate(n);
        self.to_writer
            .send((self.at, blocks))
            .map_err(|_| io::Error::other("the pack writer thread is gone"))?;
        self.in_flight = Some(self.at);
        self.at += n as u64;
        Ok(())
    }

    /// Drops the held bytes from file offset `end` on (a record that could
    /// not be appended whole).
    pub(crate) fn cut_back(&mut self, end: u64) -> io::Result<()> {
        let keep = end
            .checked_sub(self.at)
            .and_then(|k| usize::try_from(k).ok())
            .filter(|k| *k <= self.buf.len())
            .ok_or_else(|| io::Error::other(format!("cannot cut a pack back to {end}")))?;
        self.buf.truncate(keep);
        Ok(())
    }

    /// Waits for the write in flight; returns the bytes not written and the
    /// file offset they belong at (a failed last write's bytes included).
    pub(crate) fn into_held(mut self) -> (u64, Vec<u8>) {
        if let Err(e) = self.settle(true) {
            tracing::debug!(error = %e, "pack write failed; the seal writes its bytes again");
        }
        (self.at, self.buf.bytes().to_vec())
    }
}

impl Write for PackAppender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer thread's end of a [`PackAppender`].
struct BlockWriter {
    path: PathBuf,
    file: File,
    /// The store's flag while `file` is open for direct writes.
    direct: Option<Arc<AtomicBool>>,
    #[cfg(test)]
    fail_writes: Arc<std::sync::atomic::AtomicU32>,
}

impl BlockWriter {
    /// Writes `blocks` at `at`; on error cuts the file back to `at`.
    fn write(&mut self, blocks: &AlignedVec, at: u64) -> io::Result<()> {
        #[cfg(test)]
        if self
            .fail_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            // Half the blocks land first, as on a disk that fills up.
            let half = blocks.len() / 2 / DIRECT_ALIGN * DIRECT_ALIGN;
            let _ = self.file.write_all_at(&blocks.bytes()[..half], at);
            let _ = self.file.set_len(at);
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let r = match self.file.write_all_at(blocks.bytes(), at) {
            Err(e) if self.direct.is_some() && is_refusal(&e) => {
                if let Some(flag) = self.direct.take() {
                    refused(&flag, &e);
                }
                OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .and_then(|f| {
                        self.file = f;
                        self.file.write_all_at(blocks.bytes(), at)
                    })
            }
            r => r,
        };
        if r.is_err() {
            let _ = self.file.set_len(at);
        }
        r
    }
}

/// A byte buffer whose first byte sits on a [`DIRECT_ALIGN`] boundary.
#[derive(Default)]
struct AlignedVec {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedVec {
    fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Room for `extra` more bytes (growing at least twofold, so appends
    /// that gather while a write is in flight copy each byte O(1) times).
    fn reserve(&mut self, extra: usize) {
        let need = (self.len + extra).next_multiple_of(DIRECT_ALIGN);
        if self.raw.len() >= self.start + need {
            return;
        }
        let need = need.max(2 * self.raw.len().saturating_sub(DIRECT_ALIGN));
        let (mut raw, start) = aligned_zeroed(need);
        raw[start..start + self.len].copy_from_slice(self.bytes());
        (self.raw, self.start) = (raw, start);
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        let end = self.start + self.len;
        self.raw[end..end + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

/// Reads exactly `len` bytes at `offset` of `file`.
pub(crate) fn read_exact_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Open pack files, most recently used last.
type Handles = Mutex<Vec<(PackId, Arc<File>)>>;

/// A small most-recently-used cache of open pack files (sealed packs are
/// immutable, so a handle never goes stale until GC deletes the pack): one
/// buffered handle per pack, and one opened `O_DIRECT` for bulk reads.
#[derive(Debug)]
pub(crate) struct HandleCache {
    entries: Handles,
    direct: Handles,
    /// False once the file system refused direct I/O (reads or pack
    /// writes; see [`refused`]).
    direct_ok: Arc<AtomicBool>,
}

impl Default for HandleCache {
    fn default() -> Self {
        HandleCache {
            entries: Mutex::default(),
            direct: Mutex::default(),
            direct_ok: Arc::new(AtomicBool::new(cfg!(target_os = "linux"))),
        }
    }
}

impl HandleCache {
    const CAPACITY: usize = 64;

    /// Forgets the handles of a deleted pack, so its disk space is freed.
    pub fn evict(&self, id: &PackId) {
        for cache in [&self.entries, &self.direct] {
            let mut g = cache.lock().unwrap_or_else(|p| p.into_inner());
            g.retain(|(p, _)| p != id);
        }
    }

    /// The store's "direct I/O allowed" flag, for pack writes.
    pub fn direct_ok(&self) -> Arc<AtomicBool> {
        self.direct_ok.clone()
    }

    pub fn get(&self, layout: &Layout, id: &PackId) -> io::Result<Arc<File>> {
        cached(&self.entries, id, || File::open(layout.pack_path(id)))
    }

    /// Blocking: reads `len` bytes at `offset` of pack `id` around the page
    /// cache into `buf`, returning where in `buf` they start
    /// ([`AlignedBuf::bytes`]). `Ok(None)`: this file system refuses direct
    /// I/O (now and from now on); read buffered instead.
    pub fn read_direct(
        &self,
        layout: &Layout,
        id: &PackId,
        offset: u64,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> io::Result<Option<usize>> {
        if !self.direct_ok.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let file = cached(&self.direct, id, || open_direct(&layout.pack_path(id)));
        match file.and_then(|f| read_span(&f, offset, len, buf)) {
            Ok(at) => Ok(Some(at)),
            Err(e) if is_refusal(&e) => {
                refused(&self.direct_ok, &e);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// The handle of `id` in `cache`, opened with `open` if it is not there.
fn cached(
    cache: &Handles,
    id: &PackId,
    open: impl FnOnce() -> io::Result<File>,
) -> io::Result<Arc<File>> {
    {
        let mut g = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = g.iter().position(|(p, _)| p == id) {
            let e = g.remove(pos);
            let f = e.1.clone();
            g.push(e);
            return Ok(f);
        }
    }
    let f = Arc::new(open()?);
    let mut g = cache.lock().unwrap_or_else(|p| p.into_inner());
    if g.len() >= HandleCache::CAPACITY {
        g.remove(0);
    }
    g.push((*id, f.clone()));
    Ok(f)
}

/// Alignment of direct-read offsets, lengths and buffer addresses; it
/// satisfies every device.
const DIRECT_ALIGN: usize = 4096;

/// A heap buffer for direct reads, kept by a reading thread.
#[derive(Debug, Default)]
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
}

impl AlignedBuf {
    /// The `len` bytes a read placed at `at`.
    pub fn bytes(&self, at: usize, len: usize) -> &[u8] {
        &self.raw[at..at + len]
    }

    /// Blocking: reads exactly `len` bytes at `offset` of `file` through the
    /// page cache; returns where in the buffer they start.
    pub fn read_buffered(&mut self, file: &File, offset: u64, len: usize) -> io::Result<usize> {
        let (start, _) = self.reserve(0, len);
        file.read_exact_at(&mut self.raw[start..start + len], offset)?;
        Ok(start)
    }

    /// Capacity for a span of `len` bytes whose first byte lies `skip` bytes
    /// past an aligned offset; returns where the aligned part starts in `raw`
    /// and its (aligned) length.
    fn reserve(&mut self, skip: usize, len: usize) -> (usize, usize) {
        let span = (skip + len).next_multiple_of(DIRECT_ALIGN);
        if self.raw.len() < span + DIRECT_ALIGN {
            self.raw = aligned_zeroed(span).0;
        }
        let start = self.raw.as_ptr().align_offset(DIRECT_ALIGN);
        (start.min(DIRECT_ALIGN), span)
    }
}

/// A zeroed buffer with room for `len` bytes from an aligned offset, and
/// that offset.
fn aligned_zeroed(len: usize) -> (Vec<u8>, usize) {
    let raw = vec![0u8; len + DIRECT_ALIGN];
    let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    (raw, start)
}

/// Reads `[offset, offset + len)` of `file` (opened `O_DIRECT`) widened to
/// aligned bounds into `buf`; returns where in `buf` byte `offset` landed.
fn read_span(file: &File, offset: u64, len: usize, buf: &mut AlignedBuf) -> io::Result<usize> {
    let skip = (offset % DIRECT_ALIGN as u64) as usize;
    let (start, span) = buf.reserve(skip, len);
    let from = offset - skip as u64;
    let dst = &mut buf.raw[start..start + span];
    let mut done = 0usize;
    // Short only at the end of the file, which may lie inside the span.
    while done < skip + len {
        match file.read_at(&mut dst[done..], from + done as u64) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(start + skip)
}

fn open_direct(path: &Path) -> io::Result<File> {
    with_direct(OpenOptions::new().read(true), path)
}

fn create_direct(path: &Path) -> io::Result<File> {
    with_direct(OpenOptions::new().write(true).create_new(true), path)
}

#[cfg(target_os = "linux")]
fn with_direct(opts: &mut OpenOptions, path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    opts.custom_flags(libc::O_DIRECT).open(path)
}

#[cfg(not(target_os = "linux"))]
fn with_direct(_: &mut OpenOptions, _: &Path) -> io::Result<File> {
    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

/// Turns the store to page-cache reads and writes for good after a refusal
/// of direct I/O (logged once).
fn refused(direct_ok: &AtomicBool, e: &io::Error) {
    if direct_ok.swap(false, Ordering::Relaxed) {
        tracing::debug!("direct I/O on packs refused ({e}); reading and writing them through the page cache from now on");
    }
}

/// How a file system says "no direct I/O here".
fn is_refusal(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

/// Removes `path` (a missing file is fine) and fsyncs its directory, so the
/// removal is durable. Returns the bytes the file held.
pub(crate) fn remove_durably(path: &Path) -> io::Result<u64> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        fsync_dir(dir)?;
    }
    Ok(len)
}

impl Layout {
    /// Every `packs/<xx>/<id>.pack` file on disk, with its pack id (files
    /// with other names are ignored).
    pub fn pack_files(&self) -> io::Result<Vec<(PackId, PathBuf)>> {
        let mut out = Vec::new();
        for sub in fs::read_dir(&self.packs)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(sub.path())? {
                let path = f?.path();
                let id = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".pack"))
                    .and_then(|h| h.parse::<PackId>().ok());
                if let Some(id) = id {
                    out.push((id, path));
                }
            }
        }
        Ok(out)
    }

    /// Removes the index directories of points not in `committed` whose
    /// directory was last modified more than `age` ago; returns how many.
    pub fn remove_orphan_indexes(
        &self,
        committed: &std::collections::HashSet<PointId>,
        age: std::time::Duration,
    ) -> io::Result<u64> {
        let mut removed = 0;
        for e in fs::read_dir(&self.indexes)? {
            let e = e?;
            let Some(point) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<PointId>().ok())
            else {
                continue;
            };
            let meta = e.metadata()?;
            let old = meta
                .modified()?
                .elapsed()
                .is_ok_and(|elapsed| elapsed > age);
            if meta.is_dir() && old && !committed.contains(&point) {
                self.remove_point_indexes(&point)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes the index directory of `point` (its files, then the
    /// directory) and fsyncs `indexes/`. A missing directory is fine.
    pub fn remove_point_indexes(&self, point: &PointId) -> io::Result<()> {
        let dir = self.indexes.join(point.to_string());
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    fs::remove_file(e?.path())?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        fs::remove_dir(&dir)?;
        fsync_dir(&self.indexes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_write_and_tmp_cleanup() {
        let d = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(d.path());
        assert_eq!(layout.prepare().expect("prepare"), 0);
        let p = layout.pack_path(&PackId([0xab; 16]));
        assert!(p.ends_with(format!("ab/{}.pack", "ab".repeat(16))));
        // Every pack's directory is there before its first pack.
        for b in [0x00u8, 0x7f, 0xab, 0xff] {
            let dir = layout.pack_path(&PackId([b; 16]));
            assert!(dir.parent().expect("dir").is_dir(), "{}", dir.display());
        }
        assert_eq!(fs::read_dir(&layout.packs).expect("ls").count(), 256);
        write_durably(&p, b"hello", &Faults::default()).expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"hello");

        let faults = Faults::default();
        faults
            .enospc_writes
            .store(1, std::sync::atomic::Ordering::SeqCst);
        let e = write_durably(&p, b"other content", &faults).expect_err("enospc");
        assert!(is_disk_full(&e));
        assert_eq!(
            fs::read(&p).expect("read"),
            b"hello",
            "old content untouched"
        );
        assert_eq!(
            fs::read_dir(p.parent().expect("dir")).expect("ls").count(),
            1,
            "tmp removed"
        );

        fs::write(p.with_extension("pack.1234.tmp"), b"garbage").expect("garbage");
        let idx = layout.index_path(&PointId([1; 16]), 3);
        write_durably(&idx, b"i", &Faults::default()).expect("write idx");
        fs::write(idx.with_extension("idx.tmp"), b"garbage").expect("garbage");
        fs::write(layout.indexes.join("stray.tmp"), b"garbage").expect("garbage");
        assert_eq!(layout.prepare().expect("prepare"), 3);
        assert!(p.exists() && idx.exists());
        assert!(!is_disk_full(&io::Error::from(io::ErrorKind::NotFound)));
    }

    #[test]
    fn handle_cache_reads() {
        let d = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(d.path());
        let cache = HandleCache::default();
        let id = PackId([1; 16]);
        assert!(cache.get(&layout, &id).is_err());
        write_durably(&layout.pack_path(&id), b"0123456789", &Faults::default()).expect("write");
        let f = cache.get(&layout, &id).expect("open");
        assert_eq!(read_exact_at(&f, 2, 3).expect("read"), b"234");
        assert!(read_exact_at(&f, 8, 3).is_err(), "short read is an error");
        for i in 0..HandleCache::CAPACITY + 2 {
            let id = PackId([i as u8 + 10; 16]);
            write_durably(&layout.pack_path(&id), b"x", &Faults::default()).expect("write");
            cache.get(&layout, &id).expect("open");
        }
        assert_eq!(
            cache.entries.lock().expect("lock").len(),
            HandleCache::CAPACITY
        );
    }

    /// Appends `records` (sizes) of a known byte pattern, writing out
    /// between them; returns the bytes appended.
    fn append_records(a: &mut PackAppender, sizes: &[usize], seed: u64) -> Vec<u8> {
        let mut all = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let rec: Vec<u8> = (0..n as u64)
                .map(|j| {
                    ((j + seed * 7919 + i as u64 * 104_729).wrapping_mul(2_654_435_761) >> 11) as u8
                })
                .collect();
            a.write_out().expect("write out");
            a.write_all(&rec).expect("append");
            all.extend_from_slice(&rec);
        }
        all
    }

    /// The file a sealed appender leaves, with its held bytes written where
    /// the seal writes them.
    fn sealed_bytes(path: &Path, a: PackAppender) -> Vec<u8> {
        let (at, held) = a.into_held();
        let on_disk = fs::metadata(path).expect("stat").len();
        assert_eq!(
            on_disk % DIRECT_ALIGN as u64,
            0,
            "only whole blocks written"
        );
        assert_eq!(on_disk, at, "everything before the held bytes is written");
        let f = OpenOptions::new().write(true).open(path).expect("open");
        f.write_all_at(&held, at).expect("write held");
        fs::read(path).expect("read")
    }

    #[test]
    fn pack_appender_writes_every_byte_once_in_order() {
        let d = tempfile::tempdir().expect("tempdir");
        let sizes = [
            13,
            4096,
            1,
            700_000,
            500_000,
            1 << 20,
            4095,
            3 << 20,
            12_345,
            2,
            900_001,
        ];
        // Direct writes, and buffered ones once the store's flag is off.
        for direct in [true, false] {
            let p = d.path().join(format!("{direct}.pack.tmp"));
            let flag = Arc::new(AtomicBool::new(direct));
            let mut a = PackAppender::create(&p, flag.clone()).expect("create");
            let want = append_records(&mut a, &sizes, 1);
            assert!(a.at > 0, "some blocks were written before the seal");
            assert!(sealed_bytes(&p, a) == want);
            assert_eq!(
                flag.load(Ordering::Relaxed),
                direct,
                "this file system allows O_DIRECT"
            );
        }
    }

    #[test]
    fn pack_appender_keeps_the_bytes_of_a_failed_write_and_writes_them_again() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("b.pack.tmp");
        let mut a = PackAppender::create(&p, Arc::new(AtomicBool::new(true))).expect("create");
        let mut want = append_records(&mut a, &[1_500_000, 77], 2);
        a.settle(true).expect("first write");
        let written = a.at;
        assert_eq!(written, 1_500_000 - 1_500_000 % DIRECT_ALIGN as u64);
        want.extend(append_records(&mut a, &[1_200_000], 3));
        a.fail_writes.store(1, Ordering::SeqCst);
        // This write-out starts the failing write; the next one collects
        // its failure: the bytes are held again, not lost, and the file is
        // cut back to what was written before.
        a.write_out().expect("starting a write");
        let e = a.settle(true).expect_err("the failed write is reported");
        assert!(is_disk_full(&e), "{e}");
        assert_eq!(a.at, written, "the failed write's bytes are held again");
        assert_eq!(fs::metadata(&p).expect("stat").len(), written, "cut back");
        a.write_out().expect("written again once there is space");
        want.extend(append_records(&mut a, &[2_000_000, 5], 4));
        a.settle(true).expect("written");
        // A failure the seal collects: its bytes come back with the held ones.
        want.extend(append_records(&mut a, &[1_100_000], 5));
        a.settle(true).expect("written");
        assert!(a.buf.len() >= APPEND_WRITE_AT, "a write to start");
        a.fail_writes.store(1, Ordering::SeqCst);
        a.write_out().expect("starting a write");
        assert!(sealed_bytes(&p, a) == want);
    }

    #[test]
    fn direct_reads_match_the_bytes_written_at_any_alignment() {
        let d = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(d.path());
        layout.prepare().expect("prepare");
        let id = PackId([7; 16]);
        // An odd length (a partial last block), written without a sync: the
        // data may still be dirty in the page cache, which direct reads see.
        let want: Vec<u8> = (0..(5u64 << 20) + 12345)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let p = layout.pack_path(&id);
        fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        fs::write(&p, &want).expect("write");
        let cache = HandleCache::default();
        let mut buf = AlignedBuf::default();
        let len = want.len();
        for (off, n) in [
            (0usize, len),
            (0, 4096),
            (4096, 1 << 20),
            (1, 3),
            (4095, 2),
            (777, 100_000),
            (len - 1, 1),
            (len - 5000, 5000),
        ] {
            let got = cache
                .read_direct(&layout, &id, off as u64, n, &mut buf)
                .expect("read");
            let at = got.expect("the temp dir's file system allows O_DIRECT");
            assert!(
                buf.bytes(at, n) == &want[off..off + n],
                "bytes at {off}+{n}"
            );
            let f = cache.get(&layout, &id).expect("open");
            let at = buf.read_buffered(&f, off as u64, n).expect("buffered");
            assert!(
                buf.bytes(at, n) == &want[off..off + n],
                "buffered at {off}+{n}"
            );
        }
        let past = cache.read_direct(&layout, &id, len as u64 - 1, 2, &mut buf);
        assert!(
            matches!(past, Err(ref e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "a read past the end is an error: {past:?}"
        );
        assert!(cache.direct.lock().expect("lock").len() == 1);
        cache.evict(&id);
        assert!(cache.direct.lock().expect("lock").is_empty(), "evicted");
        let missing = cache.read_direct(&layout, &PackId([8; 16]), 0, 1, &mut buf);
        assert!(matches!(missing, Err(ref e) if e.kind() == io::ErrorKind::NotFound));
    }

    #[test]
    fn a_refused_direct_read_turns_the_cache_buffered_for_good() {
        let d = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(d.path());
        let cache = HandleCache::default();
        cache.direct_ok.store(false, Ordering::Relaxed);
        let mut buf = AlignedBuf::default();
        let got = cache.read_direct(&layout, &PackId([1; 16]), 0, 1, &mut buf);
        assert!(matches!(got, Ok(None)), "refused, not an error: {got:?}");
        assert!(is_refusal(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(!is_refusal(&io::Error::from_raw_os_error(libc::EIO)));
    }
}
