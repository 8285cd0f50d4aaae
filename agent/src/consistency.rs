//! Consistency check of one VM (MABS semantics): make sure the gateway's
//! newest recovery point matches the source, and repair it if not.
//!
//! Every allocated chunk of every disk is read and hashed; the hashes go to
//! the gateway (`POST …/{session}/compare`), which answers which chunk
//! numbers differ from the NEWEST point's index — never the agent's own hash
//! lists, which may be what is wrong. The differing chunks (and chunks that
//! now read as zero) become a delta against that point; chunks the gateway
//! lacks are sent; a `consistency-check` point is committed. Then the
//! agent's hash lists are rewritten from what was read and every disk's
//! change-tracking health is back to `tracking`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use tierback_format::ids::ChunkHash;
use tierback_format::wire::*;

use crate::backup::{open_sources, vm_info_with, Source};
use crate::changes::compare::hash_chunk;
use crate::changes::rct::RctSource;
use crate::changes::{chunks_of_ranges, guid_text, DiskRecord, TrackingStore, VmRecord, ZERO_HASH};
use crate::client::{is_conflict, GatewayClient};
use crate::host::HostVm;

/// Options of a check.
pub struct CheckOptions {
    pub state_dir: PathBuf,
    pub lack_batch: usize,
    pub upload_batch_bytes: usize,
}

/// What a check reports.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub vm_id: String,
    pub vm_name: String,
    /// The point compared with (the VM's newest).
    pub base_point: String,
    /// The point committed by the check.
    pub point: String,
    /// Differing chunks over all disks.
    pub chunks_differing: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub seconds: f64,
    pub disks: Vec<DiskCheckFigures>,
}

/// What checking one stream yields.
struct StreamCheck {
    figures: DiskCheckFigures,
    /// Hash of every chunk (zero hash for zero chunks); disks only.
    hashes: Vec<ChunkHash>,
    index: Vec<(u64, ChunkHash)>,
    bytes_read: u64,
}

/// Checks (and repairs) one VM against its newest point.
pub async fn check_vm(
    client: &GatewayClient,
    vm: &HostVm,
    opts: &CheckOptions,
) -> anyhow::Result<CheckReport> {
    let start = Instant::now();
    let (mut specs, sources, disks) = open_sources(vm)?;
    let mut info = vm_info_with(vm, disks.clone());
    let last = client.last_point(&info.id).await?.with_context(|| {
        format!(
            "VM {} has no recovery point at the gateway to check: run a backup first",
            info.name
        )
    })?;
    let rct = RctSource::for_vm(&vm.folder);
    for (i, d) in disks.iter().enumerate() {
        let Source::Disk(vd) = &sources[i] else {
            continue;
        };
        specs[i].tracking = Some(DiskTrackingIds {
            change_id: rct.current_id(&d.path),
            data_write_guid: vd.data_write_guid().map(guid_text),
        });
        let base_disks = || last.streams.iter().filter(|s| s.kind == StreamKind::Disk);
        specs[i].base_stream = base_disks()
            .find(|s| {
                s.controller.as_deref() == Some(d.controller.as_str())
                    && s.location.as_deref() == Some(d.location.as_str())
            })
            .or_else(|| base_disks().find(|s| s.path == d.path))
            .map(|s| s.stream_no);
    }
    let req = BeginBackupRequest {
        vm: info.clone(),
        streams: specs.clone(),
        full: false,
        base_point: Some(last.point.clone()),
    };
    let begin = client.begin_check(&req).await.map_err(|e| {
        if is_conflict(&e) {
            e.context("the gateway cannot compare with the newest point (gone, or cut with another chunk size): run a full backup instead")
        } else {
            e
        }
    })?;
    let sid = begin.session_id.clone();
    let sources = Arc::new(sources);
    let r = run_check(client, &sid, begin.chunk_size, &specs, sources, opts).await;
    let checks = match r {
        Ok(c) => c,
        Err(e) => {
            client.abort(&sid).await;
            return Err(e);
        }
    };
    let figures: Vec<DiskCheckFigures> = checks
        .iter()
        .take(disks.len())
        .map(|c| c.figures.clone())
        .collect();
    let bytes_read: u64 = checks.iter().map(|c| c.bytes_read).sum();
    let bytes_sent: u64 = checks.iter().map(|c| c.figures.bytes_sent).sum();
    for (i, c) in checks.iter().enumerate() {
        if let Err(e) = client.stream_index(&sid, i as u32, &c.index).await {
            client.abort(&sid).await;
            return Err(e);
        }
    }
    let commit = CheckCommitRequest {
        commit: CommitRequest {
            bytes_read,
            bytes_sent,
            alerts: Vec::new(),
        },
        consistency: Some(figures.clone()),
    };
    let c = match client.commit_check(&sid, &commit).await {
        Ok(c) => c,
        Err(e) => {
            client.abort(&sid).await;
            return Err(e);
        }
    };
    // The replica now matches what was read: refresh the hash lists and
    // reset every disk's health to `tracking`.
    let health = TrackingHealth {
        state: "tracking".into(),
        method: "compare".into(),
        reason: Some("consistency check".into()),
        alerts: Vec::new(),
    };
    let records: Vec<DiskRecord> = (0..disks.len())
        .map(|i| {
            let spec = &specs[i];
            let ids = spec.tracking.clone().unwrap_or_default();
            DiskRecord {
                controller: spec.controller.clone().unwrap_or_default(),
                location: spec.location.clone().unwrap_or_default(),
                path: spec.path.clone(),
                stream_no: i as u32,
                size: spec.size,
                chunk_size: begin.chunk_size,
                data_write_guid: ids.data_write_guid,
                change_id: ids.change_id,
                hashes_file: format!("{}-{i}.hashes", c.point),
                health: Some(health.clone()),
            }
        })
        .collect();
    let record = VmRecord {
        point: c.point.clone(),
        disks: records,
    };
    let pairs: Vec<(&DiskRecord, &[ChunkHash])> = record
        .disks
        .iter()
        .zip(&checks)
        .map(|(d, c)| (d, c.hashes.as_slice()))
        .collect();
    if let Err(e) = TrackingStore::new(&opts.state_dir).save(&info.id, &record, &pairs) {
        tracing::warn!(error = %format!("{e:#}"), "saving the change-tracking state failed: the next backup reads every disk in full");
    }
    for d in &mut info.disks {
        d.tracking = Some(health.clone());
    }
    let (vm_id, vm_name) = (info.id.clone(), info.name.clone());
    if let Err(e) = client.inventory(vec![info]).await {
        tracing::warn!(error = %format!("{e:#}"), "could not report change-tracking health");
    }
    Ok(CheckReport {
        vm_id,
        vm_name,
        base_point: last.point,
        point: c.point,
        chunks_differing: figures.iter().map(|f| f.chunks_differing).sum(),
        bytes_read,
        bytes_sent,
        seconds: start.elapsed().as_secs_f64(),
        disks: figures,
    })
}

async fn run_check(
    client: &GatewayClient,
    sid: &str,
    chunk_size: u32,
    specs: &[StreamSpec],
    sources: Arc<Vec<Source>>,
    opts: &CheckOptions,
) -> anyhow::Result<Vec<StreamCheck>> {
    let cs = u64::from(chunk_size);
    let batch = opts.lack_batch.clamp(1, MAX_LACK_BATCH);
    let mut out = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let src_for_alloc = sources.clone();
        let size = sources[i].size();
        let slots = size.div_ceil(cs);
        // Chunk numbers that may hold data (a disk's allocated ranges, a file whole).
        let allocated = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u64>> {
            Ok(match &src_for_alloc[i] {
                Source::Disk(d) => chunks_of_ranges(&d.allocated_ranges()?, cs, size),
                Source::File { .. } => (0..slots).collect(),
            })
        })
        .await
        .context("the disk reader thread failed")??;
        let is_disk = matches!(sources[i], Source::Disk(_));
        let mut hashes = vec![ZERO_HASH; if is_disk { slots as usize } else { 0 }];
        let mut st = StreamCheck {
            figures: DiskCheckFigures {
                index: i as u32,
                path: spec.path.clone(),
                chunks_compared: slots,
                ..DiskCheckFigures::default()
            },
            hashes: Vec::new(),
            index: Vec::new(),
            bytes_read: 0,
        };
        let delta = spec.base_stream.is_some();
        let parts: Vec<&[u64]> = if allocated.is_empty() {
            vec![&[]]
        } else {
            allocated.chunks(batch).collect()
        };
        let mut first = 0u64;
        for (k, part) in parts.iter().enumerate() {
            let nums = part.to_vec();
            let srcs = sources.clone();
            let read = tokio::task::spawn_blocking(
                move || -> anyhow::Result<Vec<(u64, Option<ChunkHash>, u64)>> {
                    let src = &srcs[i];
                    let mut v = Vec::with_capacity(nums.len());
                    let mut buf = vec![0u8; cs as usize];
                    for n in nums {
                        let len = cs.min(src.size() - n * cs) as usize;
                        src.read_at(n * cs, &mut buf[..len])?;
                        v.push((n, hash_chunk(&buf[..len]), len as u64));
                    }
                    Ok(v)
                },
            )
            .await
            .context("the disk reader thread failed")??;
            st.bytes_read += read.iter().map(|r| r.2).sum::<u64>();
            let mut chunks = Vec::new();
            for (n, h, _) in &read {
                if let Some(h) = h {
                    if let Some(slot) = hashes.get_mut(*n as usize) {
                        *slot = *h;
                    }
                    chunks.push(CompareEntry {
                        chunk_no: *n,
                        hash: *h,
                    });
                }
            }
            let end = if k + 1 == parts.len() {
                u64::MAX
            } else {
                part.last().map_or(first, |l| l + 1)
            };
            let differing = client
                .compare(
                    sid,
                    &CompareRequest {
                        stream: i as u32,
                        first,
                        end,
                        chunks,
                    },
                )
                .await?;
            first = end;
            let mut send = Vec::new();
            for n in differing {
                st.figures.chunks_differing += 1;
                if n >= slots {
                    continue; // beyond a shrunk disk: the gateway drops it
                }
                st.figures.bytes_differing += cs.min(size - n * cs);
                let now = if is_disk {
                    hashes[n as usize]
                } else {
                    read.iter()
                        .find(|r| r.0 == n)
                        .and_then(|r| r.1)
                        .unwrap_or(ZERO_HASH)
                };
                if now == ZERO_HASH {
                    if delta {
                        st.index.push((n, DELTA_ZERO_HASH));
                    }
                } else {
                    st.index.push((n, now));
                    send.push((n, now));
                }
            }
            st.figures.bytes_sent += repair(client, sid, &sources, i, cs, &send, opts).await?;
        }
        if !is_disk {
            // Config files are not compared figures-wise: only disks are reported.
            st.figures.chunks_compared = 0;
        }
        st.index.sort_unstable_by_key(|e| e.0);
        st.hashes = hashes;
        out.push(st);
    }
    Ok(out)
}

/// Re-reads the differing chunks (each must still hash as compared), offers
/// them, and sends what the gateway lacks; returns the bytes sent.
async fn repair(
    client: &GatewayClient,
    sid: &str,
    sources: &Arc<Vec<Source>>,
    stream: usize,
    cs: u64,
    chunks: &[(u64, ChunkHash)],
    opts: &CheckOptions,
) -> anyhow::Result<u64> {
    let per = ((opts.upload_batch_bytes as u64 / cs.max(1)) as usize).clamp(1, 256);
    let mut sent = 0u64;
    for part in chunks.chunks(per) {
        let part = part.to_vec();
        let srcs = sources.clone();
        let data =
            tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(ChunkHash, Vec<u8>)>> {
                let src = &srcs[stream];
                let mut v = Vec::new();
                for (n, h) in part {
                    let len = cs.min(src.size() - n * cs) as usize;
                    let mut buf = vec![0u8; len];
                    src.read_at(n * cs, &mut buf)?;
                    anyhow::ensure!(
                    hash_chunk(&buf) == Some(h),
                    "stream {stream} chunk {n} changed during the consistency check; run it again"
                );
                    v.push((h, buf));
                }
                Ok(v)
            })
            .await
            .context("the disk reader thread failed")??;
        let missing = client.lack(sid, data.iter().map(|d| d.0).collect()).await?;
        let mut data: Vec<Option<(ChunkHash, Vec<u8>)>> = data.into_iter().map(Some).collect();
        let mut body = Vec::new();
        for m in missing {
            let (h, d) = data
                .get_mut(m as usize)
                .and_then(Option::take)
                .context("the gateway named a chunk that was not asked about (or twice)")?;
            sent += d.len() as u64;
            crate::client::chunk_record_parts(&mut body, &h, None, d);
        }
        if !body.is_empty() {
            client.chunks(sid, body).await?;
        }
    }
    Ok(sent)
}

/// `tierback-agent consistency-check --state-dir S --vm NAME|ID [--json]`.
pub async fn run_cli(state_dir: &std::path::Path, vm: &str, json: bool) -> anyhow::Result<()> {
    use crate::host::HostProvider;
    let st = crate::state::AgentState::load(state_dir)?;
    let host = crate::host::FolderHost::new(&st.cfg.host_root);
    let hv = host.find_vm(vm)?;
    let client = GatewayClient::new(&st.cfg.gateway, &st.cfg.fingerprint, Some(st.credential))?;
    let opts = CheckOptions {
        state_dir: state_dir.to_path_buf(),
        lack_batch: st.cfg.lack_batch,
        upload_batch_bytes: st.cfg.upload_batch_bytes,
    };
    let r = check_vm(&client, &hv, &opts).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "consistency check of {} against point {}: {} chunk(s) differed; repaired as point {} ({:.1} s)",
            r.vm_name, r.base_point, r.chunks_differing, r.point, r.seconds
        );
        for d in &r.disks {
            println!(
                "disk {} ({}): {} chunk(s) compared, {} differing ({} bytes), {} bytes sent",
                d.index,
                d.path,
                d.chunks_compared,
                d.chunks_differing,
                d.bytes_differing,
                d.bytes_sent
            );
        }
    }
    Ok(())
}
