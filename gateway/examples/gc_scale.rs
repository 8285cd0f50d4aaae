//! One whole `ChunkStore::gc` (mark, plan, sweep, compaction) at a stated
//! reduced scale, end to end on a real store (issue 4; results in
//! docs/scale.md). `scale.rs` times GC's parts at the reference size; this
//! runs the real thing on real packs and indexes and checks what it left:
//!
//! * `--vms` VMs, each a disk of `--disk-chunks` chunk slots, backed up on
//!   `--days` days: day 0 stores every slot, each later day rewrites
//!   `--change-percent` of the slots, 80 % of those in a hot region of
//!   `--hot-percent` of the disk (logs, databases, page files) and 20 %
//!   anywhere. VMs take turns within a day, so a pack holds one VM-day's
//!   chunks, as a gateway's open pack does while one backup streams in
//!   (sealed at the commit, as a commit seals the open pack).
//! * Chunks are `--chunk-bytes` bytes of distinct noise, packs sealed at
//!   `--pack-chunks` records (the reference's 64 MiB packs hold ~64-140
//!   1 MiB chunks), every point with its sealed disk index (written through
//!   `write_index`, its presence check included) and catalog row.
//! * Retention keeps the newest `--keep` points of every VM: the older ones
//!   are deleted (`delete_points`), then GC runs once as a dry run (mark and
//!   plan only) and once for real, both timed; peak RSS (VmHWM) after.
//! * Checks: no chunk of a kept point is missing, at least the live set is
//!   left, a second (dry) run finds at most 0.1 % of the packs (at least
//!   one) to remove or compact (the mark filter's false positives differ
//!   per run, so a pack at the threshold may tip), a
//!   sample of kept chunks reads back to its id, and `verify` of the whole
//!   store is clean.
//!   A failed check exits non-zero.
//!
//! ```text
//! cargo run --release -p tierback-gateway --example gc_scale -- --vms 40
//! ```
//!
//! Flags (defaults in brackets): --dir D [/tmp/tierback-gc-scale] (removed
//! and rebuilt when a previous run made it; any other non-empty directory
//! is refused), --vms [40], --disk-chunks [12800], --days [30], --keep
//! [20], --change-percent [3], --hot-percent [10], --chunk-bytes [256],
//! --pack-chunks [64], --sample [20000] (chunks read back), --no-verify.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use futures_util::{stream, StreamExt, TryStreamExt};
use rand::{Rng, SeedableRng};
use tierback_format::crypto::MasterKey;
use tierback_format::ids::{ChunkHash, ChunkId, PointId};
use tierback_format::index::DiskIndex;
use tierback_gateway::catalog::{Catalog, NewPoint, NewStream};
use tierback_gateway::chunk_store::{ChunkStore, GcOptions, GcReport, Keys, StoreConfig};

/// File that marks a directory as this example's (see `main`).
const MARKER: &str = ".tierback-gc-scale";

struct Args {
    dir: PathBuf,
    vms: u32,
    disk_chunks: u32,
    days: u32,
    keep: u32,
    change_percent: f64,
    hot_percent: f64,
    chunk_bytes: usize,
    pack_chunks: u64,
    sample: usize,
    verify: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        dir: PathBuf::from("/tmp/tierback-gc-scale"),
        vms: 40,
        disk_chunks: 12_800,
        days: 30,
        keep: 20,
        change_percent: 3.0,
        hot_percent: 10.0,
        chunk_bytes: 256,
        pack_chunks: 64,
        sample: 20_000,
        verify: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-verify" {
            a.verify = false;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            println!("gc_scale: one whole GC at a reduced scale; flags and defaults in the header of gateway/examples/gc_scale.rs");
            std::process::exit(0);
        }
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        let bad = || format!("{flag} {v}: not a number");
        let n = || -> Result<u64> { v.replace('_', "").parse().with_context(bad) };
        let f = || -> Result<f64> { v.parse().with_context(bad) };
        match flag.as_str() {
            "--dir" => a.dir = PathBuf::from(&v),
            "--vms" => a.vms = u32::try_from(n()?)?.max(1),
            "--disk-chunks" => a.disk_chunks = u32::try_from(n()?)?.max(1),
            "--days" => a.days = u32::try_from(n()?)?.max(1),
            "--keep" => a.keep = u32::try_from(n()?)?.max(1),
            "--change-percent" => a.change_percent = f()?.clamp(0.0, 100.0),
            "--hot-percent" => a.hot_percent = f()?.clamp(0.1, 100.0),
            "--chunk-bytes" => a.chunk_bytes = usize::try_from(n()?)?.clamp(32, 1 << 20),
            "--pack-chunks" => a.pack_chunks = n()?.max(1),
            "--sample" => a.sample = usize::try_from(n()?)?,
            _ => bail!("unknown flag {flag} (see the header of gateway/examples/gc_scale.rs)"),
        }
    }
    ensure!(
        a.keep <= a.days,
        "--keep {} exceeds --days {}",
        a.keep,
        a.days
    );
    Ok(a)
}

/// The content of the chunk VM `vm` writes at slot `slot` on day `day`:
/// distinct noise (incompressible, so a record's size is known).
fn chunk_data(vm: u32, slot: u32, day: u32, len: usize) -> Bytes {
    let mut seed = [0u8; 12];
    seed[..4].copy_from_slice(&vm.to_le_bytes());
    seed[4..8].copy_from_slice(&slot.to_le_bytes());
    seed[8..].copy_from_slice(&day.to_le_bytes());
    let mut v = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed)
        .finalize_xof()
        .fill(&mut v);
    Bytes::from(v)
}

fn point_id(vm: u32, day: u32) -> PointId {
    let mut p = [0x9cu8; 16];
    p[..4].copy_from_slice(&vm.to_le_bytes());
    p[4..8].copy_from_slice(&day.to_le_bytes());
    PointId(p)
}

/// Slots VM `vm` rewrites on `day` (every slot on day 0), ascending.
fn changed_slots(a: &Args, rng: &mut rand::rngs::StdRng, day: u32) -> Vec<u32> {
    if day == 0 {
        return (0..a.disk_chunks).collect();
    }
    let n = (f64::from(a.disk_chunks) * a.change_percent / 100.0).round() as usize;
    let hot = ((f64::from(a.disk_chunks) * a.hot_percent / 100.0) as u32).max(1);
    let mut set = HashSet::with_capacity(n);
    for i in 0..n {
        let slot = if i % 5 == 4 {
            rng.gen_range(0..a.disk_chunks)
        } else {
            rng.gen_range(0..hot.min(a.disk_chunks))
        };
        set.insert(slot);
    }
    let mut v: Vec<u32> = set.into_iter().collect();
    v.sort_unstable();
    v
}

fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Mark and plan only: what a GC would do now.
async fn dry_run(store: &ChunkStore) -> Result<GcReport> {
    let opts = GcOptions {
        dry_run: true,
        ..GcOptions::default()
    };
    Ok(store.gc(opts).await?)
}

fn print_report(what: &str, r: &GcReport) {
    println!(
        "  {what:<9} {:>8.2} s  packs {} -> {} (removed {}, compacted {}, skipped {}), chunks {} -> {} (removed {}, moved {}), live {}, reclaimed {:.1} MiB",
        r.seconds,
        r.packs_before,
        r.packs_after,
        r.packs_removed,
        r.packs_compacted,
        r.packs_skipped,
        r.chunks_before,
        r.chunks_after,
        r.chunks_removed,
        r.chunks_moved,
        r.live_chunks,
        r.bytes_reclaimed as f64 / f64::from(1 << 20),
    );
}

fn main() -> Result<()> {
    tierback_gateway::runtime()?.block_on(run())
}

async fn run() -> Result<()> {
    let a = parse()?;
    // Only a directory this example made (its marker inside) is removed.
    let marker = a.dir.join(MARKER);
    if marker.exists() {
        std::fs::remove_dir_all(&a.dir)
            .with_context(|| format!("removing the previous run's {}", a.dir.display()))?;
    } else if a.dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{} is not empty and not a previous gc_scale run: choose another --dir",
            a.dir.display()
        );
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    std::fs::write(&marker, b"gc_scale run; removed by the next one\n")
        .with_context(|| format!("writing {}", marker.display()))?;
    let catalog = Catalog::open(&a.dir.join("catalog.db")).await?;
    // A record: nonce + codec byte + the (incompressible, so raw) chunk + tag.
    let record = (a.chunk_bytes + 29) as u64;
    let cfg = StoreConfig {
        pack_target_size: a.pack_chunks * record,
        ..StoreConfig::default()
    };
    let keys = Keys::derive(&MasterKey::generate());
    let store = Arc::new(ChunkStore::open(&a.dir, keys, catalog.clone(), cfg).await?);
    println!(
        "gc_scale: {} VMs x {} chunk slots, {} days ({} kept), {}% changed per day ({}% of the disk hot), {}-byte chunks, {} per pack",
        a.vms, a.disk_chunks, a.days, a.keep, a.change_percent, a.hot_percent, a.chunk_bytes, a.pack_chunks
    );

    // Fill: day by day, VM by VM.
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut disks: Vec<Vec<ChunkId>> = vec![Vec::new(); a.vms as usize];
    let mut stored: u64 = 0;
    let mut index_entries: u64 = 0;
    let t_fill = Instant::now();
    for day in 0..a.days {
        for vm in 0..a.vms {
            let slots = changed_slots(&a, &mut rng, day);
            let new: Vec<(u32, ChunkId)> = stream::iter(slots)
                .map(|slot| {
                    let store = store.clone();
                    let len = a.chunk_bytes;
                    async move {
                        let data = chunk_data(vm, slot, day, len);
                        let hash = ChunkHash::of(&data);
                        store.put(hash, data).await?;
                        Ok::<_, anyhow::Error>((slot, store.chunk_id(&hash)))
                    }
                })
                .buffer_unordered(32)
                .try_collect()
                .await?;
            stored += new.len() as u64;
            let disk = &mut disks[vm as usize];
            if day == 0 {
                disk.resize(a.disk_chunks as usize, ChunkId([0; 32]));
            }
            for (slot, id) in new {
                disk[slot as usize] = id;
            }
            let index = DiskIndex {
                size: u64::from(a.disk_chunks) << 20,
                chunk_size: 1 << 20,
                entries: disk
                    .iter()
                    .enumerate()
                    .map(|(i, id)| (i as u64, *id))
                    .collect(),
            };
            let point = point_id(vm, day);
            // As a commit does: the open pack is sealed before the index.
            store.flush().await?;
            store.write_index(&point, 0, &index).await?;
            index_entries += index.entries.len() as u64;
            catalog
                .commit_point(&NewPoint {
                    id: point,
                    vm_id: format!("vm{vm}"),
                    vm_name: format!("vm{vm}"),
                    created_at: i64::from(day) * 86_400,
                    kind: if day == 0 { "full" } else { "incremental" }.into(),
                    agent_id: "gc-scale".into(),
                    job_id: None,
                    logical_bytes: index.size,
                    stored_bytes: 0,
                    bytes_read: 0,
                    bytes_sent: 0,
                    streams: vec![NewStream {
                        stream_no: 0,
                        kind: "disk".into(),
                        path: "disk.vhdx".into(),
                        controller: None,
                        location: None,
                        size: index.size,
                        chunk_size: index.chunk_size,
                        logical_sector: 512,
                        physical_sector: 4096,
                        chunk_count: index.entries.len() as u64,
                    }],
                })
                .await?;
        }
        if day % 5 == 4 || day + 1 == a.days {
            println!(
                "  day {:>3}: {stored} chunks stored, {index_entries} index entries, {:.0} s",
                day + 1,
                t_fill.elapsed().as_secs_f64()
            );
        }
    }
    store.flush().await?;
    let fill_s = t_fill.elapsed().as_secs_f64();
    println!(
        "  fill: {stored} chunks ({:.0}/s incl. indexes), {index_entries} index entries, {fill_s:.0} s",
        stored as f64 / fill_s
    );

    // The live set: every chunk a kept point names (kept = the newest
    // `keep` days of every VM). Rebuilt from the kept points' indexes as
    // the store returns them.
    let first_kept = a.days - a.keep;
    let expired: Vec<PointId> = (0..a.vms)
        .flat_map(|vm| (0..first_kept).map(move |d| point_id(vm, d)))
        .collect();
    let t0 = Instant::now();
    let deleted = store.delete_points(&expired).await?;
    println!(
        "  retention: {deleted} points deleted in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    ensure!(
        deleted == expired.len() as u64,
        "deleted {deleted} of {} points",
        expired.len()
    );

    let dry = dry_run(&store).await?;
    print_report("dry run", &dry);
    let r = store.gc(GcOptions::default()).await?;
    print_report("gc", &r);
    // Before the checks, which hold the whole live set in memory.
    println!(
        "  peak RSS (VmHWM) after fill and GC: {:.0} MiB",
        vm_hwm_mib()
    );

    // Checks.
    // Each kept index read once: its chunks checked present and added to
    // the live set.
    let mut live: HashSet<ChunkId> = HashSet::new();
    let mut missing = 0usize;
    for vm in 0..a.vms {
        for day in first_kept..a.days {
            let idx = store.read_index(&point_id(vm, day), 0).await?;
            let ids: Vec<ChunkId> = idx.entries.iter().map(|(_, id)| *id).collect();
            missing += store.missing(&ids).await?.len();
            live.extend(ids);
        }
    }
    ensure!(
        missing == 0,
        "{missing} chunk(s) of kept points are gone after GC"
    );
    println!(
        "  check: no chunk of a kept point missing; live set {} chunks, {} left (dead ones stay in packs still over {}% live)",
        live.len(),
        r.chunks_after,
        tierback_gateway::chunk_store::DEFAULT_COMPACT_BELOW_PERCENT
    );
    ensure!(
        r.chunks_after >= live.len() as u64,
        "GC left {} chunks, fewer than the {} live ones",
        r.chunks_after,
        live.len()
    );
    // A second run finds (almost) nothing left: each run seeds its mark
    // filter afresh, so a pack right at the compaction threshold, or dead
    // but for one false positive, may tip the other way (a few in 10,000).
    let again = dry_run(&store).await?;
    print_report("again", &again);
    let tipped = again.packs_removed + again.packs_compacted;
    ensure!(
        tipped <= (r.packs_after / 1000).max(1),
        "a second GC would still remove {} and compact {} of {} pack(s)",
        again.packs_removed,
        again.packs_compacted,
        r.packs_after
    );
    let all: Vec<ChunkId> = live.into_iter().collect();
    let t0 = Instant::now();
    for _ in 0..a.sample.min(all.len()) {
        let id = all[rng.gen_range(0..all.len())];
        let data = store.get(&id).await?;
        ensure!(
            store.chunk_id(&ChunkHash::of(&data)) == id,
            "chunk {id} reads back as other bytes"
        );
    }
    println!(
        "  check: {} sampled live chunks read back ({:.1} s)",
        a.sample.min(all.len()),
        t0.elapsed().as_secs_f64()
    );
    if a.verify {
        let t0 = Instant::now();
        let v = store.verify(None).await?;
        ensure!(
            v.damaged.is_empty() && v.damaged_indexes.is_empty(),
            "verify after GC found damage: {} chunk(s), {} index(es)",
            v.damaged.len(),
            v.damaged_indexes.len()
        );
        println!(
            "  check: verify clean ({:.0} s)",
            t0.elapsed().as_secs_f64()
        );
    }

    // Per-unit figures for the extrapolation to the reference store.
    let mark_plan = dry.seconds;
    let sweep = (r.seconds - dry.seconds).max(0.0);
    let kept_entries = u64::from(a.vms) * u64::from(a.keep) * u64::from(a.disk_chunks);
    println!("  gc total {:.2} s: mark + plan {mark_plan:.2} s (dry run; {kept_entries} index entries, {} rows), sweep + compaction ~{sweep:.2} s ({} packs removed, {} compacted, {} chunks moved)",
        r.seconds, r.chunks_before, r.packs_removed, r.packs_compacted, r.chunks_moved);
    println!("GC SCALE OK");
    Ok(())
}
