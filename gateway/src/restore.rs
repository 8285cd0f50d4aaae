//! Restores on the admin side: a stream of a recovery point to a raw image, a
//! VHDX file or a plain file, and a whole VM to a new VM folder (HOST.md
//! layout: config files byte-identical, every disk as a dynamic VHDX).
//!
//! Output is written beside its destination as `*.partial`, fsynced and
//! renamed only when complete, so a failed restore never leaves a file that
//! looks whole.
//!
//! A stream is restored by a bounded pipeline (docs/protocol.md, Restore
//! data): the async side fetches runs of up to `RUN_BYTES` of consecutive
//! chunks as payload frames (decrypted at the gateway, still compressed),
//! `IN_FLIGHT` requests at a time, into reused buffers; a queue of
//! `QUEUED` runs feeds 3–4 blocking workers, each of which decompresses a
//! run into one aligned buffer and writes it with one positioned write
//! (direct I/O where the file system allows it). For VHDX the writer only
//! places payload (allocates blocks) under a lock; the workers write it, and
//! the writer adds BAT, metadata and headers at the end. Peak memory is about
//! `(IN_FLIGHT + QUEUED + 2 × workers) × RUN_BYTES`.

use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use tierback_format::magic::{CHUNK_CODEC_RAW, CHUNK_CODEC_ZSTD};
use tierback_format::vhdx::{VhdxOptions, VhdxWriter};
use tierback_format::wire::{
    parse_payload_frames, PayloadFrame, PointDetail, StreamExtents, StreamKind, StreamSummary,
    DATA_FORMAT_FRAMES, MAX_PAYLOAD_FRAME_ERROR, PAYLOAD_FRAME_HEADER,
};

use crate::client::AdminClient;

/// Output container of a disk restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Vhdx,
}

/// Figures of one restore.
#[derive(Debug, Default, Serialize)]
pub struct RestoreStats {
    pub bytes: u64,
    pub data_bytes: u64,
    pub chunks: u64,
    pub seconds: f64,
}

/// Bytes fetched per request (whole chunks, at least one).
const RUN_BYTES: u64 = 16 << 20;
/// Requests in flight (including fetched runs waiting for queue space).
const IN_FLIGHT: usize = 4;
/// Fetched runs waiting for a worker.
const QUEUED: usize = 1;
/// Alignment of direct-I/O offsets, lengths and buffers.
const DIRECT_ALIGN: u64 = 4096;

/// The file a restore writes: a raw image or a VHDX (whose payload is placed
/// by the writer and written here). Payload goes through an `O_DIRECT` handle
/// where the file system allows it: a restore streams gigabytes nobody reads
/// back soon, and copying them into the page cache costs more CPU than
/// decompressing them. Everything else (VHDX structures, unaligned tails,
/// file systems without direct I/O) goes through the ordinary handle.
/// Shared by the decode workers (`&self` methods).
struct Output {
    file: std::fs::File,
    direct: Option<std::fs::File>,
    direct_ok: AtomicBool,
    vhdx: Option<Mutex<VhdxWriter<std::fs::File>>>,
}

impl Output {
    fn create(path: &Path, s: &StreamSummary, format: DiskFormat) -> anyhow::Result<Output> {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let vhdx = if format == DiskFormat::Vhdx && s.kind == StreamKind::Disk {
            let opts = VhdxOptions {
                virtual_size: s.size,
                block_size: 32 << 20,
                logical_sector_size: s.logical_sector_size,
                physical_sector_size: s.physical_sector_size.max(s.logical_sector_size),
                parent: None,
            };
            let w = VhdxWriter::create(file.try_clone()?, opts)
                .map_err(|e| anyhow::anyhow!("creating VHDX: {e}"))?;
            Some(Mutex::new(w))
        } else {
            file.set_len(s.size).context("sizing the output file")?;
            None
        };
        // Refused by some file systems (tmpfs): then everything is buffered.
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(Output {
            file,
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            vhdx,
        })
    }

    /// Writes restored bytes at virtual offset `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        let Some(vhdx) = &self.vhdx else {
            return self.pwrite(offset, data);
        };
        let pieces = vhdx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .place(offset, data.len() as u64)
            .map_err(|e| anyhow::anyhow!("writing VHDX: {e}"))?;
        for (at, range) in pieces {
            self.pwrite(at, &data[range])?;
        }
        Ok(())
    }

    /// A positioned write of file bytes: the aligned part direct, the rest
    /// (and all of it once direct I/O was refused) buffered.
    fn pwrite(&self, at: u64, data: &[u8]) -> anyhow::Result<()> {
        let mut done = 0usize;
        if let Some(d) = &self.direct {
            let aligned = at.is_multiple_of(DIRECT_ALIGN)
                && (data.as_ptr() as u64).is_multiple_of(DIRECT_ALIGN)
                && self.direct_ok.load(Ordering::Relaxed);
            let n = (data.len() as u64 / DIRECT_ALIGN * DIRECT_ALIGN) as usize;
            if aligned && n > 0 {
                match d.write_all_at(&data[..n], at) {
                    Ok(()) => done = n,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct_ok.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e).context("writing restored data"),
                }
            }
        }
        if done < data.len() {
            self.file
                .write_all_at(&data[done..], at + done as u64)
                .context("writing restored data")?;
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<()> {
        drop(self.direct);
        let mut f = match self.vhdx {
            Some(w) => w
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .finish()
                .map_err(|e| anyhow::anyhow!("finishing VHDX: {e}"))?,
            None => self.file,
        };
        f.flush()?;
        f.sync_all().context("fsync of the restored file")?;
        Ok(())
    }
}

/// A heap buffer whose usable part starts at a [`DIRECT_ALIGN`] boundary.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + DIRECT_ALIGN as usize];
        let a = DIRECT_ALIGN as usize;
        let start = (a - raw.as_ptr() as usize % a) % a;
        AlignedBuf { raw, start }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len]
    }
}

/// One fetched run: payload frames of chunks `first .. first+count`.
struct Run {
    first: u64,
    count: u64,
    body: Vec<u8>,
}

/// Body buffers, reused so that every run does not fault in fresh memory.
/// At most `IN_FLIGHT + QUEUED + workers` exist.
#[derive(Clone, Default)]
struct BodyPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BodyPool {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }

    fn give(&self, mut b: Vec<u8>) {
        b.clear();
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(b);
    }
}

/// What the decode workers share.
#[derive(Clone)]
struct Decode {
    what: Arc<str>,
    chunk_size: u64,
    size: u64,
    out: Arc<Output>,
    stop: Arc<AtomicBool>,
    bar: Option<indicatif::ProgressBar>,
    bodies: BodyPool,
}

impl Decode {
    /// Takes runs off the queue, decodes each into one aligned buffer and
    /// writes it; returns (bytes, chunks) written. On error it raises `stop`.
    fn work(&self, queue: &Mutex<tokio::sync::mpsc::Receiver<Run>>) -> anyhow::Result<(u64, u64)> {
        let r = self.work_inner(queue);
        if r.is_err() {
            self.stop.store(true, Ordering::Relaxed);
        }
        r
    }

    fn work_inner(
        &self,
        queue: &Mutex<tokio::sync::mpsc::Receiver<Run>>,
    ) -> anyhow::Result<(u64, u64)> {
        let run_chunks = (RUN_BYTES / self.chunk_size).clamp(1, 1024);
        let mut buf = AlignedBuf::new((run_chunks * self.chunk_size) as usize);
        let mut zstd = zstd::bulk::Decompressor::new().context("starting zstd")?;
        let (mut bytes, mut chunks) = (0u64, 0u64);
        loop {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let next = queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .blocking_recv();
            let Some(run) = next else { break };
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let len = self.decode(&run, &mut buf, &mut zstd)?;
            self.bodies.give(run.body);
            self.out
                .write_at(run.first * self.chunk_size, &buf.get(len)[..])?;
            bytes += len as u64;
            chunks += run.count;
            if let Some(b) = &self.bar {
                b.inc(len as u64);
            }
        }
        Ok((bytes, chunks))
    }

    /// Decodes the frames of `run` into `buf`; returns the bytes filled.
    fn decode(
        &self,
        run: &Run,
        buf: &mut AlignedBuf,
        zstd: &mut zstd::bulk::Decompressor<'_>,
    ) -> anyhow::Result<usize> {
        let cs = self.chunk_size;
        let total: u64 = (run.first..run.first + run.count)
            .map(|n| cs.min(self.size - n * cs))
            .sum();
        let out = buf.get(total as usize);
        let frames = parse_payload_frames(&run.body).map_err(|e| {
            anyhow::anyhow!(
                "the gateway sent damaged restore data for chunks {}+{} of {}: {e}",
                run.first,
                run.count,
                self.what
            )
        })?;
        let mut expect = run.first;
        let mut pos = 0usize;
        for f in frames {
            let (n, payload) = match f {
                PayloadFrame::Error { chunk_no, message } => anyhow::bail!(
                    "the gateway could not read chunk {chunk_no} of {}: {message}",
                    self.what
                ),
                PayloadFrame::Chunk { chunk_no, payload } => (chunk_no, payload),
            };
            if n != expect || n >= run.first + run.count {
                anyhow::bail!(
                    "the gateway sent chunk {n} of {} where chunk {expect} belongs",
                    self.what
                );
            }
            let len = cs.min(self.size - n * cs) as usize;
            let dst = &mut out[pos..pos + len];
            let bad =
                |why: String| anyhow::anyhow!("chunk {n} of {} does not decode: {why}", self.what);
            let got = match payload.split_first() {
                Some((&CHUNK_CODEC_RAW, raw)) if raw.len() == len => {
                    dst.copy_from_slice(raw);
                    len
                }
                Some((&CHUNK_CODEC_RAW, raw)) => raw.len(),
                Some((&CHUNK_CODEC_ZSTD, z)) => zstd
                    .decompress_to_buffer(z, dst)
                    .map_err(|e| bad(format!("zstd: {e}")))?,
                Some((c, _)) => return Err(bad(format!("unknown codec flag {c}"))),
                None => return Err(bad("empty payload".into())),
            };
            if got != len {
                return Err(bad(format!("{got} bytes, expected {len}")));
            }
            pos += len;
            expect += 1;
        }
        if expect != run.first + run.count {
            anyhow::bail!(
                "the gateway's answer for chunks {}+{} of {} ended after chunk {}",
                run.first,
                run.count,
                self.what,
                expect.saturating_sub(1)
            );
        }
        Ok(total as usize)
    }
}

/// Fetches a point's description.
pub async fn point_detail(client: &AdminClient, point: &str) -> anyhow::Result<PointDetail> {
    client.get_json(&format!("/v1/admin/points/{point}")).await
}

/// Restores one stream to `out` (raw/VHDX for disks; plain bytes for config
/// files, where `format` is ignored).
pub async fn restore_stream(
    client: &AdminClient,
    point: &str,
    s: &StreamSummary,
    format: DiskFormat,
    out: &Path,
    progress: bool,
) -> anyhow::Result<RestoreStats> {
    let start = std::time::Instant::now();
    let ext: StreamExtents = client
        .get_json(&format!(
            "/v1/admin/points/{point}/streams/{}/extents",
            s.stream_no
        ))
        .await?;
    if ext.chunk_size == 0 || ext.size != s.size {
        anyhow::bail!(
            "the gateway describes stream {} as {} bytes in chunks of {}; the point says {} bytes",
            s.stream_no,
            ext.size,
            ext.chunk_size,
            s.size
        );
    }
    let partial = partial_path(out);
    let output = match Output::create(&partial, s, format) {
        Ok(o) => Arc::new(o),
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    let bar = progress_bar(
        progress,
        ext.chunks.len() as u64 * ext.chunk_size as u64,
        &s.path,
    );
    let result = fetch_and_write(client, point, s, &ext, &output, bar.as_ref()).await;
    // Every worker has ended (and dropped its handle) by now.
    let result = result.and_then(|(data_bytes, chunks)| {
        Arc::into_inner(output)
            .context("restore workers still hold the output")?
            .finish()?;
        Ok((data_bytes, chunks))
    });
    let (data_bytes, chunks) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).with_context(|| format!("renaming into {}", out.display()))?;
    fsync_dir(out)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(RestoreStats {
        bytes: s.size,
        data_bytes,
        chunks,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The pipeline of one stream: runs of consecutive chunks fetched as payload
/// frames, [`IN_FLIGHT`] requests at a time, handed through a short queue to
/// blocking workers that decompress each run into one buffer and write it.
/// Returns (bytes, chunks) written.
async fn fetch_and_write(
    client: &AdminClient,
    point: &str,
    s: &StreamSummary,
    ext: &StreamExtents,
    output: &Arc<Output>,
    bar: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<(u64, u64)> {
    let cs = ext.chunk_size as u64;
    let runs = runs(&ext.chunks, (RUN_BYTES / cs).clamp(1, 1024));
    if let Some(n) = ext.chunks.iter().find(|&&n| n >= s.size.div_ceil(cs)) {
        anyhow::bail!(
            "the gateway lists chunk {n} of stream {}, beyond its {} bytes",
            s.stream_no,
            s.size
        );
    }
    let workers = std::thread::available_parallelism()
        .map(|n| n.get() + 1)
        .unwrap_or(3)
        .clamp(3, 4);
    let (tx, rx) = tokio::sync::mpsc::channel::<Run>(QUEUED);
    let queue = Arc::new(Mutex::new(rx));
    let decode = Decode {
        what: Arc::from(s.path.as_str()),
        chunk_size: cs,
        size: s.size,
        out: output.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        bar: bar.cloned(),
        bodies: BodyPool::default(),
    };
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (d, q) = (decode.clone(), queue.clone());
        handles.push(tokio::task::spawn_blocking(move || d.work(&q)));
    }
    drop(queue);
    let bodies = &decode.bodies;
    // Each fetch queues its own run, so a fetch waiting for queue space never
    // stops the others from reading their bodies; runs may reach the workers
    // out of order (every run is written at its own offset).
    let fetched = futures_util::stream::iter(runs)
        .map(|(first, count)| {
            let tx = tx.clone();
            async move {
                let mut r = client
                    .get_stream(&format!(
                        "/v1/admin/points/{point}/streams/{}/data?first={first}&count={count}&format={DATA_FORMAT_FRAMES}",
                        s.stream_no
                    ))
                    .await?;
                // Frames of `count` chunks, each at most a raw chunk, or an
                // error frame: anything longer is not an answer.
                let max = count * (cs + 1 + PAYLOAD_FRAME_HEADER as u64)
                    + u64::from(MAX_PAYLOAD_FRAME_ERROR)
                    + PAYLOAD_FRAME_HEADER as u64;
                let mut body = bodies.take();
                while let Some(piece) = r.chunk().await.context("reading restore data")? {
                    if (body.len() + piece.len()) as u64 > max {
                        anyhow::bail!(
                            "the gateway sent more than {max} bytes for chunks {first}+{count} of {}",
                            s.path
                        );
                    }
                    body.extend_from_slice(&piece);
                }
                tx.send(Run { first, count, body })
                    .await
                    .map_err(|_| anyhow::anyhow!("the restore workers stopped"))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|()| std::future::ready(Ok(())))
        .await;
    if fetched.is_err() {
        decode.stop.store(true, Ordering::Relaxed);
    }
    drop(tx);
    let mut total = (0u64, 0u64);
    let mut failed: Option<anyhow::Error> = None;
    for h in handles {
        match h.await {
            Ok(Ok((b, c))) => {
                total.0 += b;
                total.1 += c;
            }
            Ok(Err(e)) => {
                failed.get_or_insert(e);
            }
            Err(e) => {
                failed.get_or_insert(anyhow::anyhow!("a restore worker failed: {e}"));
            }
        }
    }
    // A worker's error is the cause; the fetches then only saw it stop.
    if let Some(e) = failed {
        return Err(e);
    }
    fetched?;
    Ok(total)
}

/// `restore-disk`.
pub async fn restore_disk(
    client: &AdminClient,
    point: &str,
    disk: u32,
    format: DiskFormat,
    out: &Path,
    progress: bool,
) -> anyhow::Result<RestoreStats> {
    let detail = point_detail(client, point).await?;
    let disks: Vec<_> = detail
        .streams
        .iter()
        .filter(|s| s.kind == StreamKind::Disk)
        .collect();
    let s = disks.get(disk as usize).with_context(|| {
        format!(
            "recovery point {point} has {} disk(s), numbered from 0; there is no disk {disk}",
            disks.len()
        )
    })?;
    restore_stream(client, point, s, format, out, progress).await
}

/// `restore-vm --to DIR`: a new VM folder.
pub async fn restore_vm(
    client: &AdminClient,
    point: &str,
    to: &Path,
    progress: bool,
) -> anyhow::Result<RestoreStats> {
    let detail = point_detail(client, point).await?;
    if to.exists()
        && std::fs::read_dir(to)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        anyhow::bail!(
            "{} exists and is not empty; restore-vm writes a new VM folder",
            to.display()
        );
    }
    let staging = partial_path(to);
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing stale {}", staging.display()))?;
    }
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let mut total = RestoreStats::default();
    let mut new_disk_paths = Vec::new();
    let mut vm_json: Option<PathBuf> = None;
    for s in &detail.streams {
        let rel = match s.kind {
            StreamKind::Disk => vhdx_name(&s.path),
            StreamKind::Config => s.path.clone(),
        };
        let dest = safe_join(&staging, &rel)?;
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let st = restore_stream(client, point, s, DiskFormat::Vhdx, &dest, progress).await?;
        total.bytes += st.bytes;
        total.data_bytes += st.data_bytes;
        total.chunks += st.chunks;
        total.seconds += st.seconds;
        match s.kind {
            StreamKind::Disk => new_disk_paths.push(rel),
            StreamKind::Config if s.path == "vm.json" => vm_json = Some(dest),
            StreamKind::Config => {}
        }
    }
    if let Some(p) = vm_json {
        rewrite_disk_paths(&p, &new_disk_paths)?;
    }
    if to.exists() {
        std::fs::remove_dir(to).with_context(|| format!("replacing empty {}", to.display()))?;
    }
    std::fs::rename(&staging, to)
        .with_context(|| format!("moving the restored VM into {}", to.display()))?;
    fsync_dir(to)?;
    Ok(total)
}

/// vm.json of the restored VM names the restored VHDX files.
fn rewrite_disk_paths(vm_json: &Path, paths: &[String]) -> anyhow::Result<()> {
    let text = std::fs::read(vm_json)?;
    let mut v: serde_json::Value =
        serde_json::from_slice(&text).context("the backed-up vm.json is not JSON")?;
    if let Some(disks) = v.get_mut("disks").and_then(|d| d.as_array_mut()) {
        for (d, p) in disks.iter_mut().zip(paths) {
            if let Some(obj) = d.as_object_mut() {
                obj.insert("path".into(), serde_json::Value::String(p.clone()));
            }
        }
    }
    let out = serde_json::to_vec_pretty(&v)?;
    crate::config::write_file_durably(vm_json, &out, false).context("writing vm.json")?;
    Ok(())
}

/// `Virtual Hard Disks/x_ABC.avhdx` → `Virtual Hard Disks/x_ABC.vhdx`.
fn vhdx_name(path: &str) -> String {
    let p = Path::new(path);
    p.with_extension("vhdx")
        .to_string_lossy()
        .replace('\\', "/")
}

/// Joins a stored relative path under `root`, refusing anything that would
/// escape it (a hostile or corrupt catalog must not write outside the target).
fn safe_join(root: &Path, rel: &str) -> anyhow::Result<PathBuf> {
    let mut out = root.to_path_buf();
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => anyhow::bail!("refusing stored path {rel:?}: it leaves the VM folder"),
            c if c.contains('\\') || c.contains('\0') => {
                anyhow::bail!("refusing stored path {rel:?}")
            }
            c => out.push(c),
        }
    }
    if out == root {
        anyhow::bail!("refusing empty stored path");
    }
    Ok(out)
}

/// Consecutive chunk numbers grouped into (first, count) runs of at most `max`.
fn runs(chunks: &[u64], max: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &n in chunks {
        match out.last_mut() {
            Some((first, count)) if *first + *count == n && *count < max => *count += 1,
            _ => out.push((n, 1)),
        }
    }
    out
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

fn fsync_dir(path: &Path) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn progress_bar(enabled: bool, total: u64, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_message(what.to_string());
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_consecutive_chunks() {
        assert_eq!(
            runs(&[0, 1, 2, 5, 6, 9], 2),
            vec![(0, 2), (2, 1), (5, 2), (9, 1)]
        );
        assert!(runs(&[], 4).is_empty());
    }

    #[test]
    fn stored_paths_cannot_escape() {
        let r = Path::new("/x");
        assert_eq!(
            safe_join(r, "Virtual Hard Disks/a.vhdx").expect("ok"),
            Path::new("/x/Virtual Hard Disks/a.vhdx")
        );
        assert!(safe_join(r, "../etc/passwd").is_err());
        assert!(safe_join(r, "a/../../b").is_err());
        assert!(safe_join(r, "").is_err());
        assert_eq!(
            vhdx_name("Virtual Hard Disks/a_1.avhdx"),
            "Virtual Hard Disks/a_1.vhdx"
        );
    }
}
