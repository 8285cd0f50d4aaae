//! `tierback-gateway import`: reads an offline seed (written by
//! `tierback-agent export`) from a folder, opens and verifies every record
//! with the seed key (tag, decompression, BLAKE3 against the recorded hash),
//! and streams the chunks to the running gateway over the admin API
//! (`/v1/admin/import/…`), which stores them, writes the indexes and commits
//! the point like a backup. The running gateway stays the only writer.
//!
//! Nothing is committed unless every record of the seed verified: on any
//! damage the import session is aborted (chunks already sent are garbage for
//! GC) and the error names the file.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tierback_format::seed::{self as fmt_seed, SeedKey, SeedManifest};
use tierback_format::wire::*;
use tierback_gateway::client::AdminClient;

use crate::{human_bytes, print_json, Conn};

#[derive(Args)]
pub struct ImportArgs {
    #[command(flatten)]
    conn: Conn,
    /// A seed folder (holding manifest.tbs), or a folder of seed folders
    /// (every VM of one export).
    #[arg(long)]
    from: PathBuf,
    /// The seed key printed by `tierback-agent export` (or TIERBACK_SEED_KEY).
    #[arg(long, env = "TIERBACK_SEED_KEY", hide_env_values = true)]
    seed_key: String,
}

/// Body bytes per chunk upload.
const UPLOAD_BYTES: usize = 16 << 20;

pub async fn run_import(a: ImportArgs) -> anyhow::Result<ExitCode> {
    let key: SeedKey = a
        .seed_key
        .parse()
        .map_err(|e| anyhow::anyhow!("--seed-key: {e}"))?;
    let seeds = find_seeds(&a.from)?;
    let client = a.conn.client()?;
    let mut out = Vec::new();
    for dir in seeds {
        let r = import_one(&client, &dir, &key, !a.conn.json).await?;
        if !a.conn.json {
            println!(
                "imported {} from {}: point {} (full), {} chunk(s), {} of data, {} newly stored, {:.1} s",
                r["vm_name"].as_str().unwrap_or_default(),
                dir.display(),
                r["point"].as_str().unwrap_or_default(),
                r["chunks"],
                human_bytes(r["bytes"].as_u64().unwrap_or(0)),
                human_bytes(r["stored_bytes"].as_u64().unwrap_or(0)),
                r["seconds"].as_f64().unwrap_or(0.0)
            );
        }
        out.push(r);
    }
    if a.conn.json {
        print_json(&out)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn find_seeds(from: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if from.join(fmt_seed::MANIFEST_NAME).is_file() {
        return Ok(vec![from.to_path_buf()]);
    }
    let rd = std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?;
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(fmt_seed::MANIFEST_NAME).is_file())
        .collect();
    v.sort();
    if v.is_empty() {
        anyhow::bail!(
            "no seed in {}: expected {} there or in its sub-folders",
            from.display(),
            fmt_seed::MANIFEST_NAME
        );
    }
    Ok(v)
}

/// Opens the manifest and checks every data file is there with its exact length.
fn open_seed(dir: &Path, key: &[u8; 32]) -> anyhow::Result<([u8; 16], SeedManifest)> {
    let mp = dir.join(fmt_seed::MANIFEST_NAME);
    let b = std::fs::read(&mp).with_context(|| format!("reading {}", mp.display()))?;
    let (seed, m) = fmt_seed::decode_manifest(key, &b)
        .map_err(|e| anyhow::anyhow!("{}: {e}; nothing was imported", mp.display()))?;
    for f in &m.files {
        let p = dir.join(fmt_seed::data_file_name(f.file_no));
        let len = std::fs::metadata(&p)
            .map_err(|e| anyhow::anyhow!("{}: {e}; nothing was imported", p.display()))?
            .len();
        if len < f.len {
            anyhow::bail!(
                "{} is truncated ({len} of {} bytes); nothing was imported",
                p.display(),
                f.len
            );
        }
        if len > f.len {
            anyhow::bail!(
                "{} has {len} bytes, the manifest says {}: damaged; nothing was imported",
                p.display(),
                f.len
            );
        }
    }
    Ok((seed, m))
}

async fn import_one(
    client: &AdminClient,
    dir: &Path,
    key: &SeedKey,
    progress: bool,
) -> anyhow::Result<serde_json::Value> {
    let start = Instant::now();
    let dkey = key.data_key();
    let (seed, m) = open_seed(dir, &dkey)?;
    let begin: BeginBackupResponse = client
        .post_json(
            "/v1/admin/import/begin",
            &ImportBeginRequest {
                seed_id: m.seed_id.clone(),
                agent_id: m.agent_id.clone(),
                point: m.point.clone(),
                vm: m.vm.clone(),
                chunk_size: m.chunk_size,
                streams: m.streams.clone(),
            },
        )
        .await?;
    let sid = begin.session_id;
    let r = send_seed(client, &sid, dir, seed, &dkey, &m, progress).await;
    let (chunks, stored_bytes) = match r {
        Ok(x) => x,
        Err(e) => {
            let _: Result<serde_json::Value, _> = client
                .post_json(
                    &format!("/v1/admin/import/{sid}/abort"),
                    &serde_json::json!({}),
                )
                .await;
            return Err(e);
        }
    };
    let c: CommitResponse = client
        .post_json(
            &format!("/v1/admin/import/{sid}/commit"),
            &ImportCommitRequest {
                point: m.point.clone(),
                seed_id: m.seed_id.clone(),
                agent_id: m.agent_id.clone(),
                bytes: m.bytes,
            },
        )
        .await?;
    Ok(serde_json::json!({
        "vm_id": m.vm.id,
        "vm_name": m.vm.name,
        "point": c.point,
        "seed_id": m.seed_id,
        "chunks": chunks,
        "bytes": m.bytes,
        "logical_bytes": c.logical_bytes,
        "stored_bytes": stored_bytes,
        "seconds": start.elapsed().as_secs_f64(),
    }))
}

/// Streams every record (verified on a blocking thread) and the indexes.
async fn send_seed(
    client: &AdminClient,
    sid: &str,
    dir: &Path,
    seed: [u8; 16],
    key: &[u8; 32],
    m: &SeedManifest,
    progress: bool,
) -> anyhow::Result<(u64, u64)> {
    let total: u64 = m.files.iter().map(|f| f.len).sum();
    let bar = progress_bar(progress, total);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<(Vec<u8>, u64)>>(2);
    let reader = {
        let (dir, key, files) = (dir.to_path_buf(), *key, m.files.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = read_records(&dir, seed, &key, &files, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        })
    };
    let mut chunks = 0u64;
    let mut stored = 0u64;
    let sent: anyhow::Result<()> = async {
        while let Some(batch) = rx.recv().await {
            let (body, file_bytes) = batch?;
            let r: ChunksResponse = client
                .post_bytes(&format!("/v1/admin/import/{sid}/chunks"), body)
                .await?;
            chunks += u64::from(r.stored + r.duplicate);
            stored += r.stored_bytes;
            if let Some(b) = &bar {
                b.inc(file_bytes);
            }
        }
        Ok(())
    }
    .await;
    rx.close();
    reader.await.context("the seed reader thread failed")?;
    sent?;
    for (n, idx) in m.indexes.iter().enumerate() {
        for part in idx.chunks(64 * 1024) {
            let _: serde_json::Value = client
                .post_bytes(
                    &format!("/v1/admin/import/{sid}/streams/{n}/index"),
                    encode_stream_index(part),
                )
                .await?;
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((chunks, stored))
}

/// Reads, opens and verifies every record of every data file, sending
/// upload bodies (`hash | len | data` records) down the channel.
fn read_records(
    dir: &Path,
    seed: [u8; 16],
    key: &[u8; 32],
    files: &[fmt_seed::SeedFile],
    tx: &tokio::sync::mpsc::Sender<anyhow::Result<(Vec<u8>, u64)>>,
) -> anyhow::Result<()> {
    let mut body = Vec::new();
    let mut body_file_bytes = 0u64;
    for f in files {
        let p = dir.join(fmt_seed::data_file_name(f.file_no));
        let damaged =
            |what: String| anyhow::anyhow!("{}: {what}; nothing was committed", p.display());
        let file = std::fs::File::open(&p).map_err(|e| damaged(e.to_string()))?;
        let mut r = BufReader::with_capacity(4 << 20, file);
        let mut head = [0u8; fmt_seed::DATA_HEADER_LEN];
        r.read_exact(&mut head)
            .map_err(|_| damaged("truncated in its header".into()))?;
        fmt_seed::check_data_header(&head, &seed, f.file_no).map_err(|e| damaged(e.to_string()))?;
        let mut pos = head.len() as u64;
        let mut records = 0u64;
        while pos < f.len {
            let mut prefix = [0u8; fmt_seed::RECORD_PREFIX_LEN];
            r.read_exact(&mut prefix)
                .map_err(|_| damaged(format!("truncated at offset {pos}")))?;
            let n = fmt_seed::record_len(prefix)
                .map_err(|e| damaged(format!("record at offset {pos}: {e}")))?;
            if pos + 4 + n as u64 > f.len {
                return Err(damaged(format!("record at offset {pos} runs past the end")));
            }
            let mut sealed = vec![0u8; n];
            r.read_exact(&mut sealed)
                .map_err(|_| damaged(format!("truncated at offset {pos}")))?;
            let (hash, data) = fmt_seed::open_record(key, &seed, f.file_no, pos, &sealed)
                .map_err(|e| damaged(format!("record at offset {pos} {e}")))?;
            if !body.is_empty() && body.len() + data.len() + 36 > UPLOAD_BYTES {
                let b = std::mem::take(&mut body);
                if tx
                    .blocking_send(Ok((b, std::mem::take(&mut body_file_bytes))))
                    .is_err()
                {
                    return Ok(());
                }
            }
            put_chunk_record(&mut body, &hash, &data);
            body_file_bytes += 4 + n as u64;
            pos += 4 + n as u64;
            records += 1;
        }
        if records != f.records {
            return Err(damaged(format!(
                "holds {records} records, the manifest says {}",
                f.records
            )));
        }
    }
    if !body.is_empty() {
        let _ = tx.blocking_send(Ok((body, body_file_bytes)));
    }
    Ok(())
}

fn progress_bar(enabled: bool, total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "import {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(b)
}
