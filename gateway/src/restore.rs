//! Restores on the admin side: a stream of a recovery point to a raw image, a
//! VHDX file or a plain file, and a whole VM to a new VM folder (HOST.md
//! layout: config files byte-identical, every disk as a dynamic VHDX).
//!
//! Output is written beside its destination as `*.partial`, fsynced and
//! renamed only when complete, so a failed restore never leaves a file that
//! looks whole.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use futures_util::StreamExt;
use serde::Serialize;
use tierback_format::vhdx::{VhdxOptions, VhdxWriter};
use tierback_format::wire::{PointDetail, StreamExtents, StreamKind, StreamSummary};

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

/// Chunks fetched per request.
const RUN: u64 = 16;
/// Requests in flight.
const IN_FLIGHT: usize = 4;

enum Sink {
    Raw(std::fs::File),
    Vhdx(Box<VhdxWriter<std::fs::File>>),
}

impl Sink {
    fn write_at(&mut self, off: u64, data: &[u8]) -> anyhow::Result<()> {
        match self {
            Sink::Raw(f) => f.write_all_at(data, off).context("writing restored data"),
            Sink::Vhdx(w) => w
                .write_at(off, data)
                .map_err(|e| anyhow::anyhow!("writing VHDX: {e}")),
        }
    }

    fn finish(self) -> anyhow::Result<std::fs::File> {
        let mut f = match self {
            Sink::Raw(f) => f,
            Sink::Vhdx(w) => w
                .finish()
                .map_err(|e| anyhow::anyhow!("finishing VHDX: {e}"))?,
        };
        f.flush()?;
        f.sync_all().context("fsync of the restored file")?;
        Ok(f)
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
    let partial = partial_path(out);
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut sink = if format == DiskFormat::Vhdx && s.kind == StreamKind::Disk {
        let opts = VhdxOptions {
            virtual_size: s.size,
            block_size: 32 << 20,
            logical_sector_size: s.logical_sector_size,
            physical_sector_size: s.physical_sector_size.max(s.logical_sector_size),
            parent: None,
        };
        Sink::Vhdx(Box::new(
            VhdxWriter::create(file, opts).map_err(|e| anyhow::anyhow!("creating VHDX: {e}"))?,
        ))
    } else {
        file.set_len(s.size).context("sizing the output file")?;
        Sink::Raw(file)
    };
    let bar = progress_bar(
        progress,
        ext.chunks.len() as u64 * ext.chunk_size as u64,
        &s.path,
    );
    let cs = ext.chunk_size as u64;
    let runs = runs(&ext.chunks, RUN);
    let mut stats = RestoreStats {
        bytes: s.size,
        ..Default::default()
    };
    let mut fetches = futures_util::stream::iter(runs)
        .map(|(first, count)| async move {
            let r = client
                .get_stream(&format!(
                    "/v1/admin/points/{point}/streams/{}/data?first={first}&count={count}",
                    s.stream_no
                ))
                .await?;
            let body = r.bytes().await.context("reading restore data")?;
            Ok::<_, anyhow::Error>((first, count, body))
        })
        .buffered(IN_FLIGHT);
    let result: anyhow::Result<()> = async {
        while let Some(r) = fetches.next().await {
            let (first, count, body) = r?;
            let expect: u64 = (first..first + count)
                .map(|n| cs.min(s.size - n * cs))
                .sum();
            if body.len() as u64 != expect {
                anyhow::bail!(
                    "the gateway sent {} bytes for chunks {first}+{count}, expected {expect}",
                    body.len()
                );
            }
            sink.write_at(first * cs, &body)?;
            stats.data_bytes += body.len() as u64;
            stats.chunks += count;
            if let Some(b) = &bar {
                b.inc(body.len() as u64);
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        drop(sink);
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    sink.finish()?;
    std::fs::rename(&partial, out).with_context(|| format!("renaming into {}", out.display()))?;
    fsync_dir(out)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    stats.seconds = start.elapsed().as_secs_f64();
    Ok(stats)
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
