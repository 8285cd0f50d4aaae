//! One backup of one VM: open its disks read-only, cut every stream (disks,
//! then config files) into fixed-size chunks of the virtual disk, skip
//! unallocated and all-zero chunks before any work, hash the rest with
//! BLAKE3, ask the gateway which it lacks, send only those, then the stream
//! indexes, then commit.
//!
//! Reading and hashing run on a blocking thread that feeds the uploader
//! through a bounded channel, so memory stays at a few batches of chunks
//! whatever the disk size. If anything fails the session is aborted; chunks
//! already stored stay in the gateway and the next backup does not send them
//! again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use tierback_format::ids::ChunkHash;
use tierback_format::wire::*;

use crate::client::GatewayClient;
use crate::disk::{self, VirtualDisk};
use crate::host::HostVm;

/// What a backup reports.
#[derive(Debug, Default, Serialize)]
pub struct BackupReport {
    pub point: String,
    pub vm_id: String,
    pub vm_name: String,
    /// Bytes read from source disks and files.
    pub bytes_read: u64,
    /// Chunk bytes sent to the gateway.
    pub bytes_sent: u64,
    /// Bytes skipped without reading (unallocated in the container).
    pub bytes_skipped: u64,
    /// Non-zero chunks found.
    pub chunks: u64,
    /// Chunks read that were all zeros (never sent).
    pub zero_chunks: u64,
    /// Chunks the gateway already had.
    pub dedup_chunks: u64,
    /// Chunks sent.
    pub sent_chunks: u64,
    /// Non-zero bytes the point covers.
    pub logical_bytes: u64,
    /// Bytes newly stored by the gateway.
    pub stored_bytes: u64,
    pub seconds: f64,
}

/// Options of a backup.
pub struct BackupOptions {
    pub full: bool,
    pub progress: bool,
    pub lack_batch: usize,
    pub upload_batch_bytes: usize,
}

/// Something that can be read like a virtual disk.
enum Source {
    Disk(Box<dyn VirtualDisk>),
    File {
        path: PathBuf,
        file: std::fs::File,
        size: u64,
    },
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Disk(d) => d.virtual_size(),
            Source::File { size, .. } => *size,
        }
    }

    fn ranges(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        match self {
            Source::Disk(d) => Ok(d.allocated_ranges()?),
            Source::File { size, .. } => Ok(if *size == 0 { vec![] } else { vec![(0, *size)] }),
        }
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        match self {
            Source::Disk(d) => Ok(d.read_at(off, buf)?),
            Source::File { path, file, .. } => {
                use std::os::unix::fs::FileExt;
                file.read_exact_at(buf, off)
                    .with_context(|| format!("reading {}", path.display()))
            }
        }
    }
}

/// Chunk numbers that touch any of the (sorted) ranges, ascending, unique.
pub fn chunks_of_ranges(ranges: &[(u64, u64)], chunk_size: u64, size: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &(off, len) in ranges {
        if len == 0 || off >= size {
            continue;
        }
        let end = (off + len).min(size);
        let first = off / chunk_size;
        let last = (end - 1) / chunk_size;
        let from = match out.last() {
            Some(&l) if l >= first => l + 1,
            _ => first,
        };
        out.extend(from..=last);
    }
    out
}

fn open_sources(vm: &HostVm) -> anyhow::Result<(Vec<StreamSpec>, Vec<Source>, Vec<DiskInfo>)> {
    let mut specs = Vec::new();
    let mut sources = Vec::new();
    let mut disks = Vec::new();
    for (i, d) in vm.descriptor.disks.iter().enumerate() {
        let path = vm.resolve(&d.path);
        let vd = disk::open_disk(&path, &vm.folder)
            .with_context(|| format!("opening disk {i} ({})", d.path))?;
        disks.push(DiskInfo {
            index: i as u32,
            path: d.path.clone(),
            controller: d.controller.clone(),
            location: d.location.clone(),
            virtual_size: vd.virtual_size(),
            logical_sector_size: vd.logical_sector_size(),
            physical_sector_size: vd.physical_sector_size(),
            format: vd.describe(),
        });
        specs.push(StreamSpec {
            stream_no: i as u32,
            kind: StreamKind::Disk,
            path: d.path.clone(),
            controller: Some(d.controller.clone()),
            location: Some(d.location.clone()),
            size: vd.virtual_size(),
            logical_sector_size: vd.logical_sector_size(),
            physical_sector_size: vd.physical_sector_size(),
        });
        sources.push(Source::Disk(vd));
    }
    let mut files = vec!["vm.json".to_string()];
    files.extend(vm.descriptor.config_files.iter().cloned());
    for rel in files {
        let path = vm.resolve(&rel);
        let file = std::fs::File::open(&path)
            .with_context(|| format!("opening config file {}", path.display()))?;
        let size = file.metadata()?.len();
        specs.push(StreamSpec {
            stream_no: specs.len() as u32,
            kind: StreamKind::Config,
            path: rel,
            controller: None,
            location: None,
            size,
            logical_sector_size: 512,
            physical_sector_size: 512,
        });
        sources.push(Source::File { path, file, size });
    }
    Ok((specs, sources, disks))
}

/// The VM as reported to the gateway (disks opened to learn their sizes).
pub fn vm_info(vm: &HostVm) -> anyhow::Result<VmInfo> {
    let (_, _, disks) = open_sources(vm)?;
    Ok(vm_info_with(vm, disks))
}

fn vm_info_with(vm: &HostVm, disks: Vec<DiskInfo>) -> VmInfo {
    let d = &vm.descriptor;
    VmInfo {
        id: d.id.to_ascii_lowercase(),
        name: d.name.clone(),
        generation: d.generation,
        config_version: d.config_version.clone(),
        state: d.state.clone(),
        folder: vm.folder.display().to_string(),
        disks,
    }
}

/// A batch of read chunks on its way to the uploader.
struct Batch {
    stream: u32,
    chunks: Vec<(u64, ChunkHash, Vec<u8>)>,
    bytes_read: u64,
    zero_chunks: u64,
}

/// Backs up one VM; returns the committed point's report.
pub async fn backup_vm(
    client: &GatewayClient,
    vm: &HostVm,
    opts: &BackupOptions,
) -> anyhow::Result<BackupReport> {
    let start = Instant::now();
    let (specs, sources, disks) = open_sources(vm)?;
    let info = vm_info_with(vm, disks);
    let begin = client
        .begin(&BeginBackupRequest {
            vm: info.clone(),
            streams: specs.clone(),
            full: opts.full,
        })
        .await?;
    let sid = begin.session_id.clone();
    let r = run_session(client, &sid, begin.chunk_size, specs, sources, opts).await;
    match r {
        Ok(mut rep) => {
            rep.vm_id = info.id;
            rep.vm_name = info.name;
            rep.seconds = start.elapsed().as_secs_f64();
            Ok(rep)
        }
        Err(e) => {
            client.abort(&sid).await;
            Err(e)
        }
    }
}

async fn run_session(
    client: &GatewayClient,
    sid: &str,
    chunk_size: u32,
    specs: Vec<StreamSpec>,
    sources: Vec<Source>,
    opts: &BackupOptions,
) -> anyhow::Result<BackupReport> {
    let cs = chunk_size as u64;
    let mut plans = Vec::new();
    let mut total_allocated = 0u64;
    let mut rep = BackupReport::default();
    for (spec, src) in specs.iter().zip(&sources) {
        let ranges = src
            .ranges()
            .with_context(|| format!("reading the allocation map of {}", spec.path))?;
        let chunks = chunks_of_ranges(&ranges, cs, src.size());
        let touched: u64 = chunks.iter().map(|n| cs.min(src.size() - n * cs)).sum();
        rep.bytes_skipped += src.size() - touched;
        total_allocated += touched;
        plans.push(chunks);
    }
    let bar = progress_bar(opts.progress, total_allocated);
    let lack_batch = opts.lack_batch.clamp(1, MAX_LACK_BATCH);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Batch>>(2);
    let sources = Arc::new(sources);
    let reader = {
        let sources = sources.clone();
        tokio::task::spawn_blocking(move || read_all(&sources, &plans, cs, lack_batch, &tx))
    };
    let mut indexes: Vec<Vec<(u64, ChunkHash)>> = vec![Vec::new(); specs.len()];
    let upload: anyhow::Result<()> = async {
        while let Some(batch) = rx.recv().await {
            let batch = batch?;
            rep.bytes_read += batch.bytes_read;
            rep.zero_chunks += batch.zero_chunks;
            if let Some(b) = &bar {
                b.inc(batch.bytes_read);
            }
            if batch.chunks.is_empty() {
                continue;
            }
            let hashes: Vec<ChunkHash> = batch.chunks.iter().map(|c| c.1).collect();
            let missing = client.lack(sid, hashes).await?;
            let mut body = Vec::new();
            for &m in &missing {
                let (_, h, data) = batch
                    .chunks
                    .get(m as usize)
                    .context("the gateway named a chunk that was not asked about")?;
                if !body.is_empty() && body.len() + data.len() > opts.upload_batch_bytes {
                    send(client, sid, &mut body, &mut rep).await?;
                }
                put_chunk_record(&mut body, h, data);
                rep.bytes_sent += data.len() as u64;
                rep.sent_chunks += 1;
            }
            if !body.is_empty() {
                send(client, sid, &mut body, &mut rep).await?;
            }
            rep.chunks += batch.chunks.len() as u64;
            rep.dedup_chunks += (batch.chunks.len() - missing.len()) as u64;
            let idx = indexes
                .get_mut(batch.stream as usize)
                .context("bad stream number")?;
            idx.extend(batch.chunks.iter().map(|(n, h, _)| (*n, *h)));
        }
        Ok(())
    }
    .await;
    if upload.is_err() {
        rx.close();
    }
    let read_result = reader.await.context("the disk reader thread failed")?;
    upload?;
    read_result?;
    for (stream, entries) in indexes.iter().enumerate() {
        client.stream_index(sid, stream as u32, entries).await?;
    }
    let c = client
        .commit(
            sid,
            &CommitRequest {
                bytes_read: rep.bytes_read,
                bytes_sent: rep.bytes_sent,
            },
        )
        .await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    rep.point = c.point;
    rep.logical_bytes = c.logical_bytes;
    rep.stored_bytes = c.stored_bytes;
    Ok(rep)
}

async fn send(
    client: &GatewayClient,
    sid: &str,
    body: &mut Vec<u8>,
    rep: &mut BackupReport,
) -> anyhow::Result<()> {
    let r = client.chunks(sid, std::mem::take(body)).await?;
    rep.stored_bytes += r.stored_bytes;
    Ok(())
}

/// Reads every planned chunk, drops all-zero ones, hashes the rest, and sends
/// batches down the channel. Stops early if the receiver is gone.
fn read_all(
    sources: &[Source],
    plans: &[Vec<u64>],
    cs: u64,
    lack_batch: usize,
    tx: &tokio::sync::mpsc::Sender<anyhow::Result<Batch>>,
) -> anyhow::Result<()> {
    for (stream, (src, plan)) in sources.iter().zip(plans).enumerate() {
        let size = src.size();
        let mut batch = Batch {
            stream: stream as u32,
            chunks: Vec::new(),
            bytes_read: 0,
            zero_chunks: 0,
        };
        for &n in plan {
            let len = cs.min(size - n * cs) as usize;
            let mut buf = vec![0u8; len];
            if let Err(e) = src.read_at(n * cs, &mut buf) {
                let _ = tx.blocking_send(Err(e));
                anyhow::bail!("read failed");
            }
            batch.bytes_read += len as u64;
            if is_zero(&buf) {
                batch.zero_chunks += 1;
            } else {
                let h = ChunkHash(*blake3::hash(&buf).as_bytes());
                batch.chunks.push((n, h, buf));
            }
            if batch.chunks.len() >= lack_batch {
                let next = Batch {
                    stream: stream as u32,
                    chunks: Vec::new(),
                    bytes_read: 0,
                    zero_chunks: 0,
                };
                if tx
                    .blocking_send(Ok(std::mem::replace(&mut batch, next)))
                    .is_err()
                {
                    return Ok(());
                }
            }
        }
        if tx.blocking_send(Ok(batch)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let body_zero = words
        .by_ref()
        .all(|c| c.try_into().map(u128::from_ne_bytes).is_ok_and(|w| w == 0));
    body_zero && words.remainder().iter().all(|&b| b == 0)
}

fn progress_bar(enabled: bool, total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "backup {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_plan_covers_ranges_once() {
        let cs = 1 << 20;
        assert_eq!(chunks_of_ranges(&[(0, 1)], cs, 10 << 20), vec![0]);
        assert_eq!(chunks_of_ranges(&[(cs - 1, 2)], cs, 10 << 20), vec![0, 1]);
        assert_eq!(
            chunks_of_ranges(&[(0, cs), (cs / 2, cs)], cs, 10 << 20),
            vec![0, 1]
        );
        assert_eq!(
            chunks_of_ranges(&[(5 * cs, 100 * cs)], cs, 7 * cs),
            vec![5, 6]
        );
        assert!(chunks_of_ranges(&[(0, 0)], cs, cs).is_empty());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4099]));
        let mut b = vec![0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
    }
}
