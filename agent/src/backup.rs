//! One backup of one VM: open its disks read-only, decide per disk what
//! changed since the VM's previous recovery point (`changes`: DataWriteGuid,
//! RCT ranges, checkpoint delta, or full read + compare), cut what must be
//! read into fixed-size chunks of the virtual disk, skip all-zero chunks,
//! hash the rest with BLAKE3, ask the gateway which it lacks, send only
//! those, then the stream indexes, then commit.
//!
//! Every point is a synthetic full: a disk with a usable previous point is
//! uploaded as a DELTA index (changed chunks plus chunks that became zero)
//! against that point's stream, and the gateway writes the complete index.
//! A disk without one (first backup, new disk, `--full`, lost local state)
//! is read in full and uploaded as a complete index; dedup still applies.
//!
//! Reading and hashing run on a blocking thread that feeds the uploader
//! through a bounded channel, so memory stays at a few batches of chunks
//! whatever the disk size. If anything fails the session is aborted; chunks
//! already stored stay in the gateway and the next backup does not send them
//! again. The agent's change-tracking state (per-chunk hashes) is saved only
//! after the commit succeeded.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use tierback_format::ids::ChunkHash;
use tierback_format::wire::*;

use crate::changes::checkpoint::CheckpointSource;
use crate::changes::compare::{hash_chunk, initial_hashes, zeroed};
use crate::changes::rct::RctSource;
use crate::changes::{
    self, guid_text, ChangeSource, DiskPlan, DiskRecord, Method, PlanInput, Prev, TrackingStore,
    VmRecord, ZERO_HASH,
};
use crate::client::{chunk_record_parts, is_conflict, ChunkStream, ClientError, GatewayClient};
use crate::disk::{self, VirtualDisk};
use crate::host::HostVm;

pub use crate::changes::chunks_of_ranges;

/// What a backup reports.
#[derive(Debug, Default, Serialize)]
pub struct BackupReport {
    pub point: String,
    pub vm_id: String,
    pub vm_name: String,
    /// The point this one is an incremental of (None: first point).
    pub base_point: Option<String>,
    /// Bytes read from source disks and files (sample checks included).
    pub bytes_read: u64,
    /// Chunk bytes sent to the gateway.
    pub bytes_sent: u64,
    /// Bytes not read (unallocated, or unchanged according to change tracking).
    pub bytes_skipped: u64,
    /// Non-zero chunks read that were offered to the gateway.
    pub chunks: u64,
    /// Chunks read that were all zeros (never sent).
    pub zero_chunks: u64,
    /// Chunks read that were identical to the previous point (not offered).
    pub unchanged_chunks: u64,
    /// Chunks the gateway already had.
    pub dedup_chunks: u64,
    /// Chunks sent.
    pub sent_chunks: u64,
    /// Of those, chunks sent as patches of their base (only the 4 KiB blocks
    /// change tracking reports written) and rebuilt by the gateway.
    pub patched_chunks: u64,
    /// Chunks re-read by sample checks.
    pub sample_chunks: u64,
    /// Non-zero bytes the point covers.
    pub logical_bytes: u64,
    /// Bytes newly stored by the gateway.
    pub stored_bytes: u64,
    pub seconds: f64,
    /// Per disk: how changes were found and what was read.
    pub disks: Vec<DiskReport>,
    /// Alerts (change tracking caught missing writes, …).
    pub alerts: Vec<String>,
}

/// One disk of a [`BackupReport`].
#[derive(Debug, Default, Clone, Serialize)]
pub struct DiskReport {
    pub index: u32,
    pub path: String,
    /// full, unchanged, rct, checkpoint, compare.
    pub method: String,
    /// tracking, fallback, reset.
    pub state: String,
    pub reason: Option<String>,
    /// Stream of the base point the disk was a delta against.
    pub base_stream: Option<u32>,
    /// Bytes read from this disk (sample included).
    pub bytes_read: u64,
    /// Of which read by the sample check.
    pub sample_bytes_read: u64,
    /// Chunks offered to the gateway (non-zero, changed).
    pub changed_chunks: u64,
    /// Chunks that became zero since the base point.
    pub zeroed_chunks: u64,
}

/// Options of a backup.
pub struct BackupOptions {
    pub full: bool,
    pub progress: bool,
    pub lack_batch: usize,
    pub upload_batch_bytes: usize,
    /// The agent's state dir (change-tracking state lives under `tracking/`).
    pub state_dir: PathBuf,
    /// Least chunks a sample check re-reads.
    pub sample_min: usize,
}

/// Something that can be read like a virtual disk.
pub(crate) enum Source {
    Disk(Box<dyn VirtualDisk>),
    File {
        path: PathBuf,
        file: std::fs::File,
        size: u64,
    },
}

impl Source {
    pub(crate) fn size(&self) -> u64 {
        match self {
            Source::Disk(d) => d.virtual_size(),
            Source::File { size, .. } => *size,
        }
    }

    pub(crate) fn read_at(&self, off: u64, buf: &mut [u8]) -> anyhow::Result<()> {
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

pub(crate) fn open_sources(
    vm: &HostVm,
) -> anyhow::Result<(Vec<StreamSpec>, Vec<Source>, Vec<DiskInfo>)> {
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
            tracking: None,
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
            base_stream: None,
            tracking: None,
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
            base_stream: None,
            tracking: None,
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

/// [`vm_info`] with each disk's change-tracking health from the agent's
/// state dir (as its last backup found it).
pub fn vm_info_with_health(vm: &HostVm, state_dir: &std::path::Path) -> anyhow::Result<VmInfo> {
    let mut info = vm_info(vm)?;
    if let Ok(Some(rec)) = TrackingStore::new(state_dir).load(&info.id) {
        for d in &mut info.disks {
            d.tracking = rec
                .disk(&d.controller, &d.location, &d.path)
                .and_then(|r| r.health.clone());
        }
    }
    Ok(info)
}

pub(crate) fn vm_info_with(vm: &HostVm, disks: Vec<DiskInfo>) -> VmInfo {
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

/// The previous backup of each disk, if usable as a delta base.
struct Bases {
    base_point: Option<String>,
    prev: Vec<Option<(DiskRecord, Arc<Vec<ChunkHash>>)>>,
    /// Why a disk has no base although the VM has a previous point.
    no_prev: Vec<Option<(String, bool)>>,
}

fn find_bases(
    store: &TrackingStore,
    vm_id: &str,
    last: Option<&LastPointResponse>,
    disks: &[DiskInfo],
) -> Bases {
    let n = disks.len();
    let mut b = Bases {
        base_point: last.map(|l| l.point.clone()),
        prev: vec![None; n],
        no_prev: vec![None; n],
    };
    let Some(last) = last else { return b };
    let local = match store.load(vm_id) {
        Ok(Some(r)) if r.point == last.point => r,
        Ok(Some(r)) => {
            let why = format!(
                "this agent's change-tracking state is for point {}, but the VM's last point is {} (backed up by another agent?): full read + compare",
                r.point, last.point
            );
            b.no_prev = vec![Some((why, true)); n];
            return b;
        }
        Ok(None) => {
            let why = format!(
                "this agent holds no change-tracking state for the VM's last point {} (VM moved from another agent?): full read + compare",
                last.point
            );
            b.no_prev = vec![Some((why, true)); n];
            return b;
        }
        Err(e) => {
            let why = format!(
                "the agent's change-tracking state is unreadable ({e:#}): full read + compare"
            );
            b.no_prev = vec![Some((why, true)); n];
            return b;
        }
    };
    for (i, d) in disks.iter().enumerate() {
        let Some(rec) = local.disk(&d.controller, &d.location, &d.path) else {
            continue; // a disk added since the last point: first backup of it
        };
        let in_point = last
            .streams
            .iter()
            .any(|s| s.stream_no == rec.stream_no && s.kind == StreamKind::Disk);
        if !in_point {
            b.no_prev[i] = Some((
                format!(
                    "the last point has no disk stream {}: full read",
                    rec.stream_no
                ),
                true,
            ));
            continue;
        }
        match store.load_hashes(vm_id, rec) {
            Ok(h) => b.prev[i] = Some((rec.clone(), Arc::new(h))),
            Err(e) => {
                b.no_prev[i] = Some((
                    format!("the stored chunk hashes are unusable ({e:#}): full read + compare"),
                    true,
                ))
            }
        }
    }
    b
}

/// Backs up one VM; returns the committed point's report.
pub async fn backup_vm(
    client: &GatewayClient,
    vm: &HostVm,
    opts: &BackupOptions,
) -> anyhow::Result<BackupReport> {
    let start = Instant::now();
    let (mut specs, sources, disks) = open_sources(vm)?;
    let info = vm_info_with(vm, disks.clone());
    let store = TrackingStore::new(&opts.state_dir);
    let last = client.last_point(&info.id).await?;
    let rct = RctSource::for_vm(&vm.folder);
    // Identity of each disk now, recorded with the point.
    for (i, d) in disks.iter().enumerate() {
        let Source::Disk(vd) = &sources[i] else {
            continue;
        };
        specs[i].tracking = Some(DiskTrackingIds {
            change_id: rct.current_id(&d.path),
            data_write_guid: vd.data_write_guid().map(guid_text),
        });
    }
    let mut bases = find_bases(&store, &info.id, last.as_ref(), &disks);
    let with_base = |specs: &mut [StreamSpec], bases: &Bases| {
        for (i, s) in specs.iter_mut().enumerate().take(disks.len()) {
            s.base_stream = if opts.full {
                None
            } else {
                bases.prev[i].as_ref().map(|p| p.0.stream_no)
            };
        }
    };
    with_base(&mut specs, &bases);
    let req = BeginBackupRequest {
        vm: info.clone(),
        streams: specs.clone(),
        full: opts.full,
        base_point: bases.base_point.clone(),
    };
    tracing::debug!(
        seconds = start.elapsed().as_secs_f64(),
        "backup: sources opened, base found"
    );
    let begin = match client.begin(&req).await {
        Err(e) if is_conflict(&e) && req.base_point.is_some() => {
            // The base cannot be used (gone, other chunk size): read in full.
            tracing::warn!(error = %format!("{e:#}"), "the gateway refused the base point; reading every disk in full");
            let why = format!("the gateway refused the base point ({e:#}): full read");
            bases.prev = vec![None; disks.len()];
            bases.no_prev = vec![Some((why, true)); disks.len()];
            bases.base_point = None;
            with_base(&mut specs, &bases);
            client
                .begin(&BeginBackupRequest {
                    streams: specs.clone(),
                    base_point: None,
                    ..req
                })
                .await?
        }
        r => r?,
    };
    let sid = begin.session_id.clone();
    tracing::debug!(
        seconds = start.elapsed().as_secs_f64(),
        "backup: session begun"
    );
    let r = run_session(
        client,
        &sid,
        begin.chunk_size,
        begin.accepts_patches,
        specs,
        sources,
        bases,
        rct,
        opts,
    )
    .await;
    match r {
        Ok((mut rep, record, hashes)) => {
            rep.vm_id = info.id.clone();
            rep.vm_name = info.name.clone();
            rep.seconds = start.elapsed().as_secs_f64();
            tracing::debug!(seconds = rep.seconds, "backup: point committed");
            let record = VmRecord {
                point: rep.point.clone(),
                disks: record,
            };
            let pairs: Vec<(&DiskRecord, &[ChunkHash])> = record
                .disks
                .iter()
                .zip(&hashes)
                .map(|(d, h)| (d, h.as_slice()))
                .collect();
            if let Err(e) = store.save(&info.id, &record, &pairs) {
                // The point is committed; only the next backup's efficiency suffers.
                let msg = format!(
                    "saving the change-tracking state failed ({e:#}): the next backup of this VM reads every disk in full"
                );
                tracing::warn!("{msg}");
                rep.alerts.push(msg);
            }
            // Report the health found to the gateway's inventory.
            let mut info = info;
            for (d, r) in info.disks.iter_mut().zip(&record.disks) {
                d.tracking = r.health.clone();
            }
            if let Err(e) = client.inventory(vec![info]).await {
                tracing::warn!(error = %format!("{e:#}"), "could not report change-tracking health");
            }
            Ok(rep)
        }
        Err(e) => {
            client.abort(&sid).await;
            Err(e)
        }
    }
}

/// What the reader does with one stream.
struct StreamPlan {
    read: Vec<u64>,
    /// Previous hashes: delta upload, unchanged chunks are not offered.
    prev: Option<Arc<Vec<ChunkHash>>>,
    /// Chunks not read keep their previous hash (only changed ones are read).
    carry: bool,
    /// Base hints for uploads: what each place held in the previous point,
    /// with no hint (the zero marker) where a chunk was mostly rewritten.
    hints: Option<Arc<Vec<ChunkHash>>>,
    /// Ranges change tracking reports written (see `DiskPlan::dirty`).
    dirty: Option<Arc<Ranges>>,
}

/// Byte ranges `(offset, len)` of a disk.
type Ranges = Vec<(u64, u64)>;

/// A batch of read chunks on its way to the uploader.
struct Batch {
    stream: u32,
    chunks: Vec<(u64, ChunkHash, bytes::Bytes)>,
    bytes_read: u64,
    zero_chunks: u64,
    unchanged_chunks: u64,
    /// Last batch of a stream: its new hash list and the chunks that became zero.
    done: Option<(Vec<ChunkHash>, Vec<u64>)>,
}

impl Batch {
    fn new(stream: u32) -> Batch {
        Batch {
            stream,
            chunks: Vec::new(),
            bytes_read: 0,
            zero_chunks: 0,
            unchanged_chunks: 0,
            done: None,
        }
    }
}

type SessionOutput = (BackupReport, Vec<DiskRecord>, Vec<Vec<ChunkHash>>);

#[allow(clippy::too_many_arguments)]
async fn run_session(
    client: &GatewayClient,
    sid: &str,
    chunk_size: u32,
    accepts_patches: bool,
    specs: Vec<StreamSpec>,
    sources: Vec<Source>,
    bases: Bases,
    rct: RctSource,
    opts: &BackupOptions,
) -> anyhow::Result<SessionOutput> {
    let cs = chunk_size as u64;
    let t0 = Instant::now();
    let ndisks = bases.prev.len();
    for (i, p) in bases.prev.iter().enumerate() {
        if let Some((rec, _)) = p {
            anyhow::ensure!(
                rec.chunk_size == chunk_size || opts.full,
                "disk {i}: the base point was cut into {}-byte chunks but the gateway now uses {chunk_size}",
                rec.chunk_size
            );
        }
    }
    let sources = Arc::new(sources);
    // Plan every disk (reads only sample chunks) on a blocking thread.
    let disk_plans: Vec<DiskPlan> = {
        let sources = sources.clone();
        let specs = specs.clone();
        let full = opts.full;
        let sample_min = opts.sample_min;
        let prev = bases.prev.clone();
        let no_prev = bases.no_prev.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<DiskPlan>> {
            let ck = CheckpointSource;
            let mut out = Vec::new();
            for i in 0..ndisks {
                let Source::Disk(d) = &sources[i] else {
                    anyhow::bail!("stream {i} is not a disk");
                };
                let srcs: [&dyn ChangeSource; 2] = [&rct, &ck];
                let input = PlanInput {
                    label: format!("disk {i} ({})", specs[i].path),
                    disk: d.as_ref(),
                    path: &specs[i].path,
                    chunk_size: cs,
                    prev: prev[i].as_ref().map(|(r, h)| Prev {
                        record: r,
                        hashes: h.clone(),
                    }),
                    no_prev: no_prev[i].clone(),
                    full,
                    sample_min,
                };
                out.push(
                    changes::plan_disk(input, &srcs)
                        .with_context(|| format!("planning disk {i} ({})", specs[i].path))?,
                );
            }
            Ok(out)
        })
        .await
        .context("the planning thread failed")??
    };
    tracing::debug!(
        seconds = t0.elapsed().as_secs_f64(),
        "session: disks planned"
    );
    let mut rep = BackupReport {
        base_point: bases.base_point.clone(),
        ..BackupReport::default()
    };
    let mut plans = Vec::new();
    let mut total_read = 0u64;
    for (i, (spec, src)) in specs.iter().zip(sources.iter()).enumerate() {
        let plan = match disk_plans.get(i) {
            Some(p) => {
                rep.bytes_read += p.sample_bytes;
                rep.sample_chunks += p.sample_chunks;
                rep.alerts.extend(p.alerts.iter().cloned());
                rep.disks.push(DiskReport {
                    index: i as u32,
                    path: spec.path.clone(),
                    method: p.method.as_str().into(),
                    state: p.health.as_str().into(),
                    reason: p.reason.clone(),
                    base_stream: p.base_stream,
                    bytes_read: p.sample_bytes,
                    sample_bytes_read: p.sample_bytes,
                    ..DiskReport::default()
                });
                StreamPlan {
                    read: p.read.clone(),
                    prev: p.prev.clone(),
                    carry: !matches!(p.method, Method::Full | Method::Compare),
                    hints: base_hints(p.prev.as_ref(), &p.rewritten),
                    // Patches only to a gateway that takes them.
                    dirty: p.dirty.clone().filter(|_| accepts_patches),
                }
            }
            None => StreamPlan {
                read: chunks_of_ranges(&[(0, src.size())], cs, src.size()),
                prev: None,
                carry: false,
                hints: None,
                dirty: None,
            },
        };
        let touched: u64 = plan.read.iter().map(|n| cs.min(src.size() - n * cs)).sum();
        rep.bytes_skipped += src.size() - touched;
        total_read += touched;
        plans.push(plan);
    }
    let bar = progress_bar(opts.progress, total_read, "backup");
    // Memory: one batch being read, one queued, one being offered, plus the
    // upload bodies in flight (see `Uploader`).
    let lack_batch = lack_batch(opts, cs);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Batch>>(1);
    let hints: Vec<Option<Arc<Vec<ChunkHash>>>> = plans.iter().map(|p| p.hints.clone()).collect();
    let dirty: Vec<Option<Arc<Ranges>>> = plans.iter().map(|p| p.dirty.clone()).collect();
    let reader = {
        let sources = sources.clone();
        tokio::task::spawn_blocking(move || read_all(&sources, &plans, cs, lack_batch, &tx))
    };
    let mut up = Uploader::new(client, sid, opts);
    let mut indexes: Vec<Vec<(u64, ChunkHash)>> = vec![Vec::new(); specs.len()];
    let mut new_hashes: Vec<Vec<ChunkHash>> = vec![Vec::new(); ndisks];
    let upload: anyhow::Result<()> = async {
        while let Some(batch) = rx.recv().await {
            let batch = batch?;
            let stream = batch.stream as usize;
            rep.bytes_read += batch.bytes_read;
            rep.zero_chunks += batch.zero_chunks;
            rep.unchanged_chunks += batch.unchanged_chunks;
            if let Some(b) = &bar {
                b.inc(batch.bytes_read);
            }
            let idx = indexes.get_mut(stream).context("bad stream number")?;
            if let Some(d) = rep.disks.get_mut(stream) {
                d.bytes_read += batch.bytes_read;
                d.changed_chunks += batch.chunks.len() as u64;
            }
            if let Some((hashes, zeros)) = batch.done {
                if let Some(d) = rep.disks.get_mut(stream) {
                    d.zeroed_chunks += zeros.len() as u64;
                }
                idx.extend(zeros.iter().map(|n| (*n, DELTA_ZERO_HASH)));
                if let Some(h) = new_hashes.get_mut(stream) {
                    *h = hashes;
                }
            }
            if batch.chunks.is_empty() {
                continue;
            }
            rep.chunks += batch.chunks.len() as u64;
            idx.extend(batch.chunks.iter().map(|(n, h, _)| (*n, *h)));
            let hints = Hints {
                base: hints
                    .get(stream)
                    .and_then(|p| p.as_deref())
                    .map(Vec::as_slice),
                dirty: dirty
                    .get(stream)
                    .and_then(|p| p.as_deref())
                    .map(Vec::as_slice),
                chunk_size: cs,
            };
            offer(&mut up, batch.chunks, &hints, &mut rep).await?;
        }
        up.finish(&mut rep).await
    }
    .await;
    if upload.is_err() {
        rx.close();
    }
    let read_result = reader.await.context("the disk reader thread failed")?;
    upload?;
    read_result?;
    tracing::debug!(
        seconds = t0.elapsed().as_secs_f64(),
        "session: chunks read and uploaded"
    );
    for (stream, entries) in indexes.iter_mut().enumerate() {
        entries.sort_unstable_by_key(|e| e.0);
        client.stream_index(sid, stream as u32, entries).await?;
    }
    tracing::debug!(
        seconds = t0.elapsed().as_secs_f64(),
        "session: indexes sent"
    );
    let commit = CommitRequest {
        bytes_read: rep.bytes_read,
        bytes_sent: rep.bytes_sent,
        alerts: rep.alerts.clone(),
    };
    let c = match client.commit(sid, &commit).await {
        Err(e) if is_conflict(&e) => {
            // The gateway lacks chunks the indexes name (e.g. collected
            // between `lack` and commit): re-offer every chunk this backup
            // named, once, then commit again.
            tracing::warn!(error = %format!("{e:#}"), "commit refused; re-offering this backup's chunks");
            rep.alerts.push(format!(
                "commit refused ({e:#}); this backup's chunks were offered again"
            ));
            reoffer(&mut up, &sources, &indexes, cs, opts, &mut rep).await?;
            client
                .commit(
                    sid,
                    &CommitRequest {
                        bytes_read: rep.bytes_read,
                        bytes_sent: rep.bytes_sent,
                        alerts: rep.alerts.clone(),
                    },
                )
                .await?
        }
        r => r?,
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    rep.point = c.point;
    rep.logical_bytes = c.logical_bytes;
    rep.stored_bytes = c.stored_bytes;
    let mut records = Vec::new();
    for (i, p) in disk_plans.iter().enumerate() {
        records.push(DiskRecord::for_point(
            &rep.point,
            i as u32,
            &specs[i],
            chunk_size,
            TrackingHealth {
                state: p.health.as_str().into(),
                method: p.method.as_str().into(),
                reason: p.reason.clone(),
                alerts: p.alerts.clone(),
            },
        ));
    }
    Ok((rep, records, new_hashes))
}

/// Bytes of chunk data read ahead per "which do you lack?" batch.
const BATCH_BYTES: u64 = 16 << 20;

/// Chunks per "which do you lack?" batch: the configured count, at most
/// [`BATCH_BYTES`] of chunk data.
fn lack_batch(opts: &BackupOptions, chunk_size: u64) -> usize {
    opts.lack_batch
        .clamp(1, MAX_LACK_BATCH)
        .min((BATCH_BYTES / chunk_size.max(1)).max(1) as usize)
}
/// Bytes of chunk records per upload request, at most.
const MAX_UPLOAD_BODY: usize = 4 << 20;
/// Upload requests in flight at once.
const UPLOADS_IN_FLIGHT: usize = 4;

/// Chunk uploads of one session, sent as spawned requests so reading,
/// asking and uploading overlap; at most [`UPLOADS_IN_FLIGHT`] bodies of at
/// most [`MAX_UPLOAD_BODY`] bytes are held at once.
struct Uploader {
    client: GatewayClient,
    sid: String,
    body_limit: usize,
    set: tokio::task::JoinSet<anyhow::Result<Uploaded>>,
    streams: StreamPool,
}

/// The session's chunk streams not carrying a batch right now, for the
/// next ones; `None` once the gateway has turned one down (it has none:
/// batches go as requests from then on).
type StreamPool = Arc<std::sync::Mutex<Option<Vec<ChunkStream>>>>;

/// What one upload task did.
struct Uploaded {
    resp: ChunksResponse,
    /// Chunks sent as patches and rebuilt by the gateway.
    patched: u64,
    /// Patches the gateway refused, sent again whole, and their bytes.
    refused: u64,
    resent_bytes: u64,
}

/// A chunk sent as a patch, kept whole until the gateway has answered (it
/// sends it again whole if the gateway refuses the patch): hash, base, data.
type Patched = (ChunkHash, ChunkHash, bytes::Bytes);

impl Uploader {
    fn new(client: &GatewayClient, sid: &str, opts: &BackupOptions) -> Uploader {
        Uploader {
            client: client.clone(),
            sid: sid.to_string(),
            body_limit: opts.upload_batch_bytes.clamp(1, MAX_UPLOAD_BODY),
            set: tokio::task::JoinSet::new(),
            streams: Arc::new(std::sync::Mutex::new(Some(Vec::new()))),
        }
    }

    async fn send(
        &mut self,
        body: Vec<bytes::Bytes>,
        patched: Vec<Patched>,
        rep: &mut BackupReport,
    ) -> anyhow::Result<()> {
        while self.set.len() >= UPLOADS_IN_FLIGHT {
            self.join_one(rep).await?;
        }
        let (client, sid, pool) = (self.client.clone(), self.sid.clone(), self.streams.clone());
        self.set
            .spawn(async move { upload(&client, &sid, &pool, body, patched).await });
        Ok(())
    }

    async fn join_one(&mut self, rep: &mut BackupReport) -> anyhow::Result<()> {
        if let Some(r) = self.set.join_next().await {
            let r = r.context("an upload task failed")??;
            rep.stored_bytes += r.resp.stored_bytes;
            rep.patched_chunks += r.patched;
            rep.bytes_sent += r.resent_bytes;
            if r.refused > 0 {
                rep.alerts.push(format!(
                    "{} chunk(s) sent as patches of their base did not rebuild on the gateway (change tracking under-reported writes in them, or the base was collected): sent whole",
                    r.refused
                ));
            }
        }
        Ok(())
    }

    /// Waits for every upload; the first failure fails the backup (the
    /// others are cancelled when the uploader is dropped).
    async fn finish(&mut self, rep: &mut BackupReport) -> anyhow::Result<()> {
        while !self.set.is_empty() {
            self.join_one(rep).await?;
        }
        Ok(())
    }
}

/// Sends one upload body; the chunks of patches the gateway refuses are
/// sent again whole (with their base hint).
async fn upload(
    client: &GatewayClient,
    sid: &str,
    pool: &StreamPool,
    body: Vec<bytes::Bytes>,
    patched: Vec<Patched>,
) -> anyhow::Result<Uploaded> {
    let mut resp = send_batch(client, sid, pool, body).await?;
    let refused: std::collections::HashSet<ChunkHash> = resp.refused.drain(..).collect();
    let mut out = Uploaded {
        resp,
        patched: 0,
        refused: refused.len() as u64,
        resent_bytes: 0,
    };
    // Each refused hash is sent whole once (two places may hold the same
    // new chunk).
    let mut again = Vec::new();
    let mut resent = std::collections::HashSet::new();
    for (h, b, data) in patched {
        if !refused.contains(&h) {
            out.patched += 1;
        } else if resent.insert(h) {
            out.resent_bytes += data.len() as u64;
            chunk_record_parts(&mut again, &h, Some(&b), data);
        }
    }
    anyhow::ensure!(
        resent.len() == refused.len(),
        "the gateway refused chunks that were not sent as patches"
    );
    if again.is_empty() {
        return Ok(out);
    }
    let whole = client.chunks(sid, again).await?;
    anyhow::ensure!(
        whole.refused.is_empty(),
        "the gateway refused whole chunks as patches"
    );
    out.resp.stored += whole.stored;
    out.resp.duplicate += whole.duplicate;
    out.resp.stored_bytes += whole.stored_bytes;
    Ok(out)
}

/// The pool's idle streams (a poisoned lock is still usable: the list is
/// whole at every unlock).
fn free(pool: &StreamPool) -> std::sync::MutexGuard<'_, Option<Vec<ChunkStream>>> {
    pool.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends one batch of chunk records over a chunk stream of `pool` (opened
/// when none is free), or as a request when the gateway has no chunk
/// streams or the stream breaks: the request path retries, and records are
/// content-addressed, so a batch that arrives twice is stored once.
async fn send_batch(
    client: &GatewayClient,
    sid: &str,
    pool: &StreamPool,
    body: Vec<bytes::Bytes>,
) -> anyhow::Result<ChunksResponse> {
    let taken = free(pool).as_mut().map(Vec::pop);
    let stream = match taken {
        None => None,
        Some(Some(s)) => Some(s),
        Some(None) => match client.open_chunk_stream(sid).await {
            Ok(s) => Some(s),
            Err(ClientError::Status { status, message }) => {
                tracing::info!(status, %message, "the gateway takes no chunk streams; uploading by request");
                *free(pool) = None;
                None
            }
            Err(e) => {
                tracing::info!(error = %e, "opening a chunk stream failed; uploading by request");
                None
            }
        },
    };
    if let Some(mut s) = stream {
        match s.send(&body).await {
            Ok(r) => {
                if let Some(idle) = free(pool).as_mut() {
                    idle.push(s);
                }
                return Ok(r);
            }
            Err(e) => {
                tracing::info!(error = %e, "the chunk stream broke; sending its batch as a request")
            }
        }
    }
    client.chunks(sid, body).await
}

/// What the uploader knows of a stream's previous point.
#[derive(Default)]
struct Hints<'a> {
    /// What each place held in the previous point (the zero marker: no
    /// hint), by chunk number.
    base: Option<&'a [ChunkHash]>,
    /// Ranges change tracking reports written since then, merged, ascending.
    dirty: Option<&'a [(u64, u64)]>,
    chunk_size: u64,
}

/// The patch of chunk `n` (`len` bytes) that the `dirty` ranges call for:
/// the bitmap of the 4 KiB blocks they touch and those blocks as byte runs
/// within the chunk. None when they touch none or more than half of the
/// chunk (then it goes whole).
fn patch_of(dirty: &[(u64, u64)], cs: u64, n: u64, len: usize) -> Option<Patch> {
    let (c0, c1) = (
        n.checked_mul(cs)?,
        n.checked_mul(cs)?.checked_add(len as u64)?,
    );
    let block = PATCH_BLOCK as u64;
    let blocks = len.div_ceil(PATCH_BLOCK);
    let mut bitmap = vec![0u8; blocks.div_ceil(8)];
    let first = dirty.partition_point(|r| r.0.saturating_add(r.1) <= c0);
    for &(off, l) in &dirty[first..] {
        if off >= c1 {
            break;
        }
        let (s, e) = (off.max(c0) - c0, off.saturating_add(l).min(c1) - c0);
        for b in s / block..e.div_ceil(block) {
            bitmap[b as usize / 8] |= 1 << (b % 8);
        }
    }
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for b in 0..blocks {
        if (bitmap[b / 8] >> (b % 8)) & 1 == 1 {
            let (s, e) = (b * PATCH_BLOCK, ((b + 1) * PATCH_BLOCK).min(len));
            match runs.last_mut() {
                Some(r) if r.1 == s => r.1 = e,
                _ => runs.push((s, e)),
            }
        }
    }
    let bytes: usize = runs.iter().map(|r| r.1 - r.0).sum();
    (bytes > 0 && bytes * 2 <= len).then_some(Patch {
        bitmap,
        runs,
        bytes,
    })
}

/// The blocks of a chunk to send as a patch: the record's bitmap, the byte
/// runs `(start, end)` of the chunk they cover and their total length.
#[derive(Debug)]
struct Patch {
    bitmap: Vec<u8>,
    runs: Vec<(usize, usize)>,
    bytes: usize,
}

/// The previous hashes as base hints, without those of `rewritten` chunks.
fn base_hints(
    prev: Option<&Arc<Vec<ChunkHash>>>,
    rewritten: &[u64],
) -> Option<Arc<Vec<ChunkHash>>> {
    let prev = prev?;
    if rewritten.is_empty() {
        return Some(prev.clone());
    }
    let mut hints = prev.as_ref().clone();
    for &n in rewritten {
        if let Some(h) = usize::try_from(n).ok().and_then(|n| hints.get_mut(n)) {
            *h = DELTA_ZERO_HASH;
        }
    }
    Some(Arc::new(hints))
}

/// Asks the gateway which of `chunks` it lacks and queues those for upload;
/// the buffers of the others are freed at once. `hints`: the stream's
/// hashes in the previous point, by chunk number (the zero marker: none); an
/// upload names the one its place held as a base hint (the gateway may store
/// a delta against it).
async fn offer(
    up: &mut Uploader,
    chunks: Vec<(u64, ChunkHash, bytes::Bytes)>,
    hints: &Hints<'_>,
    rep: &mut BackupReport,
) -> anyhow::Result<()> {
    let hashes: Vec<ChunkHash> = chunks.iter().map(|c| c.1).collect();
    let missing = up.client.lack(&up.sid, hashes).await?;
    let asked = chunks.len();
    let mut chunks: Vec<Option<(u64, ChunkHash, bytes::Bytes)>> =
        chunks.into_iter().map(Some).collect();
    let mut body = Vec::new();
    let mut patched = Vec::new();
    let mut body_len = 0usize;
    for &m in &missing {
        let (n, h, data) = chunks
            .get_mut(m as usize)
            .and_then(Option::take)
            .context("the gateway named a chunk that was not asked about (or twice)")?;
        if !body.is_empty() && body_len + data.len() > up.body_limit {
            up.send(std::mem::take(&mut body), std::mem::take(&mut patched), rep)
                .await?;
            body_len = 0;
        }
        rep.sent_chunks += 1;
        let base = hints
            .base
            .and_then(|p| p.get(usize::try_from(n).ok()?))
            .filter(|b| **b != DELTA_ZERO_HASH && **b != h);
        let patch = base.zip(hints.dirty).and_then(|(b, dirty)| {
            patch_of(dirty, hints.chunk_size, n, data.len()).map(|p| (b, p))
        });
        match patch {
            Some((
                b,
                Patch {
                    bitmap,
                    runs,
                    bytes,
                },
            )) => {
                let head = chunk_patch_head(&h, b, data.len(), &bitmap, bytes);
                // Counted whole: the chunk is held until the gateway has
                // answered (to send it whole if refused), and the gateway
                // rebuilds it whole, so a body of patches holds as many
                // chunks in memory at both ends as a body of whole ones.
                body_len += head.len() + data.len();
                rep.bytes_sent += bytes as u64;
                body.push(head.into());
                body.extend(runs.iter().map(|&(s, e)| data.slice(s..e)));
                patched.push((h, *b, data));
            }
            None => {
                body_len += data.len() + 36 + base.map_or(0, |_| 32);
                rep.bytes_sent += data.len() as u64;
                chunk_record_parts(&mut body, &h, base, data);
            }
        }
    }
    drop(chunks);
    if !body.is_empty() {
        up.send(body, patched, rep).await?;
    }
    rep.dedup_chunks += (asked - missing.len()) as u64;
    Ok(())
}

/// Re-reads every non-zero chunk the indexes of this backup name and offers
/// it again; a chunk whose content changed meanwhile fails the backup.
async fn reoffer(
    up: &mut Uploader,
    sources: &Arc<Vec<Source>>,
    indexes: &[Vec<(u64, ChunkHash)>],
    cs: u64,
    opts: &BackupOptions,
    rep: &mut BackupReport,
) -> anyhow::Result<()> {
    let lack_batch = lack_batch(opts, cs);
    for (stream, entries) in indexes.iter().enumerate() {
        let named: Vec<(u64, ChunkHash)> = entries
            .iter()
            .copied()
            .filter(|(_, h)| *h != DELTA_ZERO_HASH)
            .collect();
        for part in named.chunks(lack_batch) {
            let part = part.to_vec();
            let sources = sources.clone();
            let chunks = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let src = sources.get(stream).context("bad stream")?;
                let pool = Arc::new(ChunkBufs::default());
                let mut out = Vec::new();
                for (n, h) in part {
                    let len = cs.min(src.size() - n * cs) as usize;
                    let buf = read_chunk(src, n * cs, len, &pool)?;
                    anyhow::ensure!(
                        hash_chunk(&buf) == Some(h),
                        "stream {stream} chunk {n} changed during the backup; run the backup again"
                    );
                    out.push((n, h, buf));
                }
                Ok(out)
            })
            .await
            .context("the disk reader thread failed")??;
            rep.bytes_read += chunks.iter().map(|c| c.2.len() as u64).sum::<u64>();
            offer(up, chunks, &Hints::default(), rep).await?;
        }
    }
    up.finish(rep).await
}

/// Chunk buffers kept for reuse by [`ChunkBufs`], at most: about as many
/// as one backup holds at once (batches of 16 chunks being read, queued and
/// offered, and the upload bodies in flight), so in steady state nearly
/// every read lands in a recycled buffer.
const SPARE_BUFS: usize = 64;

/// Recycles chunk buffers: a fresh one must be zeroed (calloc clears the
/// memory malloc hands back), 8 % of the agent's CPU on a full backup; a
/// recycled one is overwritten in full by the read (every reader fills the
/// whole slice it is given, zeros included: [`crate::disk::VirtualDisk::read_at`]).
#[derive(Default)]
struct ChunkBufs {
    spare: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// A chunk's bytes in a buffer from [`ChunkBufs`], handed back when the last
/// `Bytes` pointing into it is dropped (after upload or when the gateway had
/// the chunk).
struct PooledChunk {
    buf: Vec<u8>,
    at: usize,
    len: usize,
    pool: Arc<ChunkBufs>,
}

impl AsRef<[u8]> for PooledChunk {
    fn as_ref(&self) -> &[u8] {
        self.buf
            .get(self.at..self.at + self.len)
            .unwrap_or_default()
    }
}

impl Drop for PooledChunk {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if let Ok(mut spare) = self.pool.spare.lock() {
            if spare.len() < SPARE_BUFS {
                spare.push(buf);
            }
        }
    }
}

/// Reads `len` bytes at `off` into a buffer whose data starts on a 4 KiB
/// boundary, so an unbuffered (O_DIRECT) read lands in it without a bounce
/// copy, and hands it on without copying. The buffer comes from `pool` when
/// it has one large enough.
fn read_chunk(
    src: &Source,
    off: u64,
    len: usize,
    pool: &Arc<ChunkBufs>,
) -> anyhow::Result<bytes::Bytes> {
    const ALIGN: usize = 4096;
    let spare = pool
        .spare
        .lock()
        .ok()
        .and_then(|mut s| s.pop())
        .filter(|b| b.len() >= len + ALIGN);
    let mut buf = spare.unwrap_or_else(|| vec![0u8; len + ALIGN]);
    let at = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
    src.read_at(off, &mut buf[at..at + len])?;
    Ok(bytes::Bytes::from_owner(PooledChunk {
        buf,
        at,
        len,
        pool: pool.clone(),
    }))
}

/// Threads reading and hashing chunks at once: several reads in flight keep
/// a cold disk busy (scattered changed chunks, VHDX blocks) and hashing uses
/// more than one core.
const READERS: usize = 4;

/// Reads every planned chunk (on [`READERS`] threads), drops all-zero ones
/// and (for a delta stream) ones equal to the previous point, hashes the
/// rest, and sends batches down the channel; the last batch of each stream
/// carries its new hash list and the chunks that became zero. Chunks arrive
/// in any order (the index is sorted at the end). Stops early if the
/// receiver is gone.
fn read_all(
    sources: &[Source],
    plans: &[StreamPlan],
    cs: u64,
    lack_batch: usize,
    tx: &tokio::sync::mpsc::Sender<anyhow::Result<Batch>>,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    type Read = anyhow::Result<(u64, Option<ChunkHash>, bytes::Bytes)>;
    let pool = Arc::new(ChunkBufs::default());
    for (stream, (src, plan)) in sources.iter().zip(plans).enumerate() {
        let size = src.size();
        let disk = matches!(src, Source::Disk(_));
        let mut hashes = if disk {
            initial_hashes(
                plan.prev.as_deref().map(|v| v.as_slice()),
                plan.carry,
                size.div_ceil(cs),
            )
        } else {
            Vec::new()
        };
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let (rtx, rrx) = std::sync::mpsc::sync_channel::<Read>(READERS);
        let done = std::thread::scope(|scope| -> anyhow::Result<bool> {
            for _ in 0..READERS.min(plan.read.len()) {
                let rtx = rtx.clone();
                let (next, stop, pool) = (&next, &stop, &pool);
                scope.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(&n) = plan.read.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            break;
                        };
                        let len = cs.min(size - n * cs) as usize;
                        let item = read_chunk(src, n * cs, len, pool)
                            .map(|buf| (n, hash_chunk(&buf), buf));
                        if rtx.send(item).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(rtx);
            let mut batch = Batch::new(stream as u32);
            let collected = (|| -> anyhow::Result<bool> {
                for item in rrx.iter() {
                    let (n, h, buf) = match item {
                        Ok(x) => x,
                        Err(e) => {
                            let msg = format!("{e:#}");
                            let _ = tx.blocking_send(Err(e));
                            anyhow::bail!("read failed: {msg}");
                        }
                    };
                    batch.bytes_read += buf.len() as u64;
                    let recorded = h.unwrap_or(ZERO_HASH);
                    if let Some(slot) = hashes.get_mut(n as usize) {
                        *slot = recorded;
                    }
                    let same = plan
                        .prev
                        .as_ref()
                        .is_some_and(|p| p.get(n as usize) == Some(&recorded));
                    match h {
                        None => batch.zero_chunks += 1,
                        Some(_) if same => batch.unchanged_chunks += 1,
                        Some(h) => batch.chunks.push((n, h, buf)),
                    }
                    if batch.chunks.len() >= lack_batch
                        && tx
                            .blocking_send(Ok(std::mem::replace(
                                &mut batch,
                                Batch::new(stream as u32),
                            )))
                            .is_err()
                    {
                        return Ok(false);
                    }
                }
                Ok(true)
            })();
            // Readers stop at their next chunk (and at once if blocked on
            // the channel, which `rrx` is dropped with).
            stop.store(true, Ordering::Relaxed);
            drop(rrx);
            let more = collected?;
            if more {
                let zeros = match &plan.prev {
                    Some(p) => zeroed(p, &hashes),
                    None => Vec::new(),
                };
                batch.done = Some((std::mem::take(&mut hashes), zeros));
                return Ok(tx.blocking_send(Ok(batch)).is_ok());
            }
            Ok(false)
        })?;
        if !done {
            return Ok(());
        }
    }
    Ok(())
}

/// A byte progress bar labelled `what`, only when enabled and stderr is a
/// terminal.
pub(crate) fn progress_bar(
    enabled: bool,
    total: u64,
    what: &str,
) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_patch_names_the_blocks_the_tracked_ranges_touch() {
        const M: u64 = 1 << 20;
        let b = PATCH_BLOCK as u64;
        // Chunk 2: a range from chunk 1 through its blocks 0..=9, 512 bytes
        // inside its block 1; a range of chunk 3 does not count.
        let dirty = [
            (M + 100, M + 10 * b - 100),
            (2 * M + b + 8, 512),
            (3 * M, 9),
        ];
        let dirty = crate::disk::merge_ranges(dirty.to_vec());
        let Patch { bitmap, runs, .. } = patch_of(&dirty, M, 2, M as usize).expect("a patch");
        let set: Vec<usize> = (0..256)
            .filter(|i| (bitmap[i / 8] >> (i % 8)) & 1 == 1)
            .collect();
        assert_eq!(set, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(runs, vec![(0, 10 * PATCH_BLOCK)]);
        // A short last chunk: its last block is short too.
        let p = patch_of(&[(3 * M + 5000, 10)], M, 3, 6000).expect("a patch");
        assert_eq!(p.runs, vec![(4096, 6000)]);
        // Nothing touched, or more than half: the chunk goes whole.
        assert!(patch_of(&[(5 * M, 10)], M, 2, M as usize).is_none());
        assert!(patch_of(&[(2 * M, M / 2 + 1)], M, 2, M as usize).is_none());
        assert!(patch_of(&[(2 * M, M / 2)], M, 2, M as usize).is_some());
    }

    /// A dynamic VHDX written by qemu-img (1 MiB blocks): block 0 full of
    /// 0xAB, block 1 never written (unallocated, reads as zeros), block 2
    /// full of 0xCD.
    fn qemu_vhdx(dir: &Path) -> PathBuf {
        let raw = dir.join("disk.raw");
        let mut data = vec![0xABu8; 1 << 20];
        data.extend(std::iter::repeat_n(0u8, 1 << 20));
        data.extend(std::iter::repeat_n(0xCDu8, 1 << 20));
        std::fs::write(&raw, &data).expect("write raw");
        let vhdx = dir.join("disk.vhdx");
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vhdx", "-o"])
            .arg("subformat=dynamic,block_size=1M")
            .arg(&raw)
            .arg(&vhdx)
            .output()
            .expect("qemu-img is missing: install the Debian package qemu-utils");
        assert!(out.status.success(), "qemu-img: {out:?}");
        vhdx
    }

    #[test]
    fn recycled_chunk_buffers_hold_exactly_the_chunk_read_into_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = crate::disk::open_disk(&qemu_vhdx(dir.path()), dir.path()).expect("open");
        let src = Source::Disk(disk);
        let pool = Arc::new(ChunkBufs::default());
        let mb = 1usize << 20;

        let first = read_chunk(&src, 0, mb, &pool).expect("read block 0");
        assert!(first.iter().all(|b| *b == 0xAB));
        let first_at = first.as_ptr();
        drop(first);
        assert_eq!(pool.spare.lock().expect("pool").len(), 1, "buffer returned");

        // The unallocated block lands in the buffer that held 0xAB bytes.
        let hole = read_chunk(&src, mb as u64, mb, &pool).expect("read block 1");
        assert_eq!(hole.as_ptr(), first_at, "the buffer was reused");
        assert!(
            hole.iter().all(|b| *b == 0),
            "stale bytes leaked into a hole"
        );
        assert!(hash_chunk(&hole).is_none(), "a zero chunk is not hashed");

        // A slice of the chunk keeps the buffer out of the pool.
        let part = hole.slice(10..20);
        drop(hole);
        assert_eq!(pool.spare.lock().expect("pool").len(), 0);
        drop(part);
        assert_eq!(pool.spare.lock().expect("pool").len(), 1);

        // A shorter last chunk fits a recycled buffer; a longer one gets a
        // fresh buffer.
        let tail = read_chunk(&src, 2 * mb as u64 + 4096, mb - 4096, &pool).expect("tail");
        assert_eq!(tail.len(), mb - 4096);
        assert!(tail.iter().all(|b| *b == 0xCD));
        let other = read_chunk(&src, 0, 2 * mb, &pool).expect("two blocks");
        assert!(other[..mb].iter().all(|b| *b == 0xAB));
        assert!(other[mb..].iter().all(|b| *b == 0));
    }
}
