//! Offline seeding, agent side: `export` reads a VM like a full backup (the
//! chunk size the gateway will use for it, all-zero chunks skipped) and
//! writes a self-describing, encrypted seed to a folder on removable media
//! (format: `tierback_format::seed`, docs/formats.md §11), to be imported on
//! the gateway with `tierback-gateway import`.
//!
//! The point id is chosen here and carried in the manifest; once the seed is
//! durable, the agent's change-tracking state is written as if that point had
//! been committed, so the first backup after the import is an incremental of
//! it. Until the import, the gateway's last point differs from the state
//! (or there is none) and a backup reads in full, exactly as without state.
//!
//! MUST: every file is written as `*.tmp`, fsynced, renamed, and the folder
//! fsynced; the manifest last, so a seed without a manifest is incomplete.
//! MUST NOT: write the seed key anywhere (it is returned once to the caller).

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use tierback_format::ids::{ChunkHash, PointId};
use tierback_format::seed::{self as fmt_seed, SeedFile, SeedKey, SeedManifest};
use tierback_format::wire::{DiskTrackingIds, StreamSpec, TrackingHealth};

use crate::backup::{open_sources, vm_info_with, Source};
use crate::changes::compare::hash_chunk;
use crate::changes::rct::RctSource;
use crate::changes::{chunks_of_ranges, guid_text, DiskRecord, TrackingStore, VmRecord, ZERO_HASH};
use crate::client::GatewayClient;
use crate::host::HostVm;

/// Options of an export.
pub struct ExportOptions {
    /// Folder on the media; the seed of a VM goes to `<to>/<vm id>/`.
    pub to: PathBuf,
    pub state_dir: PathBuf,
    /// This agent's id (the imported point is recorded as made by it).
    pub agent_id: String,
    pub progress: bool,
    /// A data file is closed once it reaches this many bytes.
    pub file_target: u64,
}

/// What an export of one VM did.
#[derive(Debug, Default, Serialize)]
pub struct ExportReport {
    pub vm_id: String,
    pub vm_name: String,
    /// The point the import will commit.
    pub point: String,
    pub seed_id: String,
    /// The seed's folder.
    pub dir: String,
    pub chunk_size: u32,
    /// Bytes read from disks and files.
    pub bytes_read: u64,
    /// Distinct non-zero chunks written to the seed.
    pub chunks: u64,
    /// Their plaintext bytes.
    pub bytes: u64,
    /// Non-zero chunks that repeated one already in the seed.
    pub duplicate_chunks: u64,
    pub zero_chunks: u64,
    /// Bytes of the seed's files on the media.
    pub file_bytes: u64,
    pub files: u32,
    pub seconds: f64,
}

/// Exports one VM to `<opts.to>/<vm id>/`, sealed under `key`.
pub async fn export_vm(
    client: &GatewayClient,
    vm: &HostVm,
    opts: &ExportOptions,
    key: &SeedKey,
) -> anyhow::Result<ExportReport> {
    let start = Instant::now();
    let (mut specs, sources, disks) = open_sources(vm)?;
    let info = vm_info_with(vm, disks.clone());
    if let Some(last) = client.last_point(&info.id).await? {
        anyhow::bail!(
            "VM {} already has recovery point {} at the gateway: a seed is only for the first full; back it up over the network instead",
            info.name,
            last.point
        );
    }
    let chunk_size = client.seed_params(&info.id).await?.chunk_size;
    let rct = RctSource::for_vm(&vm.folder);
    for (i, d) in disks.iter().enumerate() {
        if let Some(Source::Disk(vd)) = sources.get(i) {
            specs[i].tracking = Some(DiskTrackingIds {
                change_id: rct.current_id(&d.path),
                data_write_guid: vd.data_write_guid().map(guid_text),
            });
        }
    }
    let dir = opts.to.join(&info.id);
    if dir.join(fmt_seed::MANIFEST_NAME).exists() {
        anyhow::bail!(
            "{} already holds a seed; choose another --to or remove it",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let point = PointId::random();
    let seed_id: [u8; 16] = rand::random();
    let job = Job {
        dir: dir.clone(),
        seed: seed_id,
        key: key.data_key(),
        chunk_size,
        ndisks: disks.len(),
        file_target: opts.file_target,
        progress: opts.progress,
    };
    let (out, sources) = tokio::task::spawn_blocking(move || {
        let r = job.run(&sources);
        (r, sources)
    })
    .await
    .context("the export thread failed")?;
    drop(sources);
    let out = out?;
    let manifest = SeedManifest {
        seed_id: hex::encode(seed_id),
        created_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
        agent_id: opts.agent_id.clone(),
        point: point.to_string(),
        vm: info.clone(),
        chunk_size,
        streams: specs.clone(),
        indexes: out.indexes,
        files: out.files.clone(),
        bytes: out.rep.bytes,
    };
    let m = fmt_seed::encode_manifest(&key.data_key(), &seed_id, &manifest);
    write_new(&dir.join(fmt_seed::MANIFEST_NAME), &m)?;
    save_tracking(
        &opts.state_dir,
        &info.id,
        &point,
        &specs,
        chunk_size,
        out.hashes,
    )?;
    let mut rep = out.rep;
    rep.vm_id = info.id;
    rep.vm_name = info.name;
    rep.point = point.to_string();
    rep.seed_id = hex::encode(seed_id);
    rep.dir = dir.display().to_string();
    rep.chunk_size = chunk_size;
    rep.file_bytes += m.len() as u64;
    rep.files = out.files.len() as u32 + 1;
    rep.seconds = start.elapsed().as_secs_f64();
    Ok(rep)
}

/// The agent's change-tracking state for the seed's point, as a backup
/// would have saved it after committing the same full.
fn save_tracking(
    state_dir: &Path,
    vm_id: &str,
    point: &PointId,
    specs: &[StreamSpec],
    chunk_size: u32,
    hashes: Vec<Vec<ChunkHash>>,
) -> anyhow::Result<()> {
    let mut records = Vec::new();
    for (i, spec) in specs.iter().enumerate().take(hashes.len()) {
        records.push(DiskRecord::for_point(
            &point.to_string(),
            i as u32,
            spec,
            chunk_size,
            TrackingHealth {
                state: "tracking".into(),
                method: "full".into(),
                reason: Some("exported to an offline seed".into()),
                alerts: Vec::new(),
            },
        ));
    }
    let record = VmRecord {
        point: point.to_string(),
        disks: records,
    };
    let pairs: Vec<(&DiskRecord, &[ChunkHash])> = record
        .disks
        .iter()
        .zip(&hashes)
        .map(|(d, h)| (d, h.as_slice()))
        .collect();
    TrackingStore::new(state_dir)
        .save(vm_id, &record, &pairs)
        .context("saving the change-tracking state for the seed's point")
}

/// The blocking part of an export.
struct Job {
    dir: PathBuf,
    seed: [u8; 16],
    key: [u8; 32],
    chunk_size: u32,
    ndisks: usize,
    file_target: u64,
    progress: bool,
}

struct JobOutput {
    rep: ExportReport,
    indexes: Vec<Vec<(u64, ChunkHash)>>,
    /// Per disk, the hash of every chunk (zero hash for zero chunks).
    hashes: Vec<Vec<ChunkHash>>,
    files: Vec<SeedFile>,
}

impl Job {
    fn run(&self, sources: &[Source]) -> anyhow::Result<JobOutput> {
        let cs = u64::from(self.chunk_size);
        let mut plans = Vec::new();
        for src in sources {
            let size = src.size();
            let ranges = match src {
                Source::Disk(d) => d
                    .allocated_ranges()
                    .context("reading the disk's allocation")?,
                Source::File { .. } => vec![(0, size)],
            };
            plans.push(chunks_of_ranges(&ranges, cs, size));
        }
        let total: u64 = plans
            .iter()
            .zip(sources)
            .map(|(p, s)| p.iter().map(|n| cs.min(s.size() - n * cs)).sum::<u64>())
            .sum();
        let bar = crate::backup::progress_bar(self.progress, total, "export");
        let mut w = Writer::new(self)?;
        let mut rep = ExportReport::default();
        let mut seen: HashSet<ChunkHash> = HashSet::new();
        let mut indexes = Vec::new();
        let mut hashes = Vec::new();
        for (stream, (src, plan)) in sources.iter().zip(&plans).enumerate() {
            let size = src.size();
            let mut idx = Vec::new();
            let mut all = if stream < self.ndisks {
                vec![ZERO_HASH; size.div_ceil(cs) as usize]
            } else {
                Vec::new()
            };
            for &n in plan {
                let len = cs.min(size - n * cs) as usize;
                let mut buf = vec![0u8; len];
                src.read_at(n * cs, &mut buf)
                    .with_context(|| format!("reading stream {stream} chunk {n}"))?;
                rep.bytes_read += len as u64;
                if let Some(b) = &bar {
                    b.inc(len as u64);
                }
                let Some(h) = hash_chunk(&buf) else {
                    rep.zero_chunks += 1;
                    continue;
                };
                if let Some(slot) = all.get_mut(n as usize) {
                    *slot = h;
                }
                idx.push((n, h));
                if seen.insert(h) {
                    w.append(&h, &buf)?;
                    rep.chunks += 1;
                    rep.bytes += len as u64;
                } else {
                    rep.duplicate_chunks += 1;
                }
            }
            indexes.push(idx);
            if stream < self.ndisks {
                hashes.push(all);
            }
        }
        let files = w.finish()?;
        rep.file_bytes = files.iter().map(|f| f.len).sum();
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok(JobOutput {
            rep,
            indexes,
            hashes,
            files,
        })
    }
}

/// Appends records to data files, rotating at the target size.
struct Writer<'a> {
    job: &'a Job,
    file_no: u32,
    cur: Option<(File, PathBuf)>,
    pos: u64,
    records: u64,
    files: Vec<SeedFile>,
}

impl<'a> Writer<'a> {
    fn new(job: &'a Job) -> anyhow::Result<Self> {
        let mut w = Writer {
            job,
            file_no: 0,
            cur: None,
            pos: 0,
            records: 0,
            files: Vec::new(),
        };
        w.open()?;
        Ok(w)
    }

    fn final_path(&self) -> PathBuf {
        self.job.dir.join(fmt_seed::data_file_name(self.file_no))
    }

    fn open(&mut self) -> anyhow::Result<()> {
        let tmp = self.final_path().with_extension("tbs.tmp");
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let h = fmt_seed::encode_data_header(&self.job.seed, self.file_no);
        f.write_all(&h)
            .with_context(|| format!("writing {}", tmp.display()))?;
        self.pos = h.len() as u64;
        self.records = 0;
        self.cur = Some((f, tmp));
        Ok(())
    }

    fn append(&mut self, hash: &ChunkHash, data: &[u8]) -> anyhow::Result<()> {
        if self.pos >= self.job.file_target {
            self.close()?;
            self.file_no += 1;
            self.open()?;
        }
        let rec = fmt_seed::encode_record(
            &self.job.key,
            &self.job.seed,
            self.file_no,
            self.pos,
            hash,
            data,
            3,
        );
        let (f, tmp) = self.cur.as_mut().context("no open data file")?;
        f.write_all(&rec)
            .with_context(|| format!("writing {}", tmp.display()))?;
        self.pos += rec.len() as u64;
        self.records += 1;
        Ok(())
    }

    fn close(&mut self) -> anyhow::Result<()> {
        let Some((f, tmp)) = self.cur.take() else {
            return Ok(());
        };
        f.sync_all()
            .with_context(|| format!("flushing {}", tmp.display()))?;
        drop(f);
        let dst = self.final_path();
        std::fs::rename(&tmp, &dst).with_context(|| format!("renaming to {}", dst.display()))?;
        File::open(&self.job.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("flushing {}", self.job.dir.display()))?;
        self.files.push(SeedFile {
            file_no: self.file_no,
            len: self.pos,
            records: self.records,
        });
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<Vec<SeedFile>> {
        self.close()?;
        Ok(self.files)
    }
}

/// Writes a new file durably: tmp, fsync, rename, fsync the folder.
fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tbs.tmp");
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Some(d) = path.parent() {
        File::open(d)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("flushing {}", d.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_rotates_files_and_they_decode() {
        let t = tempfile::tempdir().expect("tmp");
        let key = SeedKey::generate();
        let job = Job {
            dir: t.path().to_path_buf(),
            seed: [4; 16],
            key: key.data_key(),
            chunk_size: 1 << 20,
            ndisks: 0,
            file_target: 300,
            progress: false,
        };
        let chunks: Vec<Vec<u8>> = (0..5u8)
            .map(|i| {
                (0..8000u32)
                    .map(|j| (j as u8) ^ i.wrapping_mul(37))
                    .collect()
            })
            .collect();
        let mut w = Writer::new(&job).expect("writer");
        for c in &chunks {
            w.append(&ChunkHash::of(c), c).expect("append");
        }
        let files = w.finish().expect("finish");
        assert!(files.len() > 1, "rotated: {files:?}");
        let mut back = Vec::new();
        for f in &files {
            let p = t.path().join(fmt_seed::data_file_name(f.file_no));
            let b = std::fs::read(&p).expect("read");
            assert_eq!(b.len() as u64, f.len);
            let recs =
                fmt_seed::decode_data_file(&job.key, &job.seed, f.file_no, &b).expect("decode");
            assert_eq!(recs.len() as u64, f.records);
            back.extend(recs.into_iter().map(|r| r.1));
        }
        assert_eq!(back, chunks);
        assert!(std::fs::read_dir(t.path())
            .expect("ls")
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".tmp")));
    }
}
