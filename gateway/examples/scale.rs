//! Scale check of the gateway's chunk catalog (issue 4; results in
//! docs/scale.md). Builds a catalog through the real `Catalog::open` and
//! measures what the reference scale needs:
//!
//! * inserts/s of chunk rows in pack-sized transactions,
//! * the chunk filter's build time at open,
//! * batched dedup lookups/s (hits and misses apart), warm and after the
//!   catalog file's page cache was dropped (`posix_fadvise(DONTNEED)` after
//!   `sync`, through python: no unsafe code here); as the protocol asks
//!   them (presence, `Catalog::contains_chunks_with`) and, in one row each,
//!   with locations (`lookup_chunks_with`, what restores and verify ask),
//! * `list_points` of one VM,
//! * GC: the mark over real sealed indexes (read, decrypt, insert into the
//!   mark filter, 4 at once, files evicted first) and the plan's per-pack
//!   catalog reads, each per unit so it extrapolates linearly,
//! * peak RSS (VmHWM).
//!
//! ```text
//! cargo run --release -p tierback-gateway --example scale -- --entries 20000000
//! ```
//!
//! Flags (defaults in brackets): --entries N [1000000], --dir D
//! [/tmp/tierback-scale], --reuse (keep and reuse an existing catalog of D),
//! --pack-chunks [64], --fill-packs [64] (packs per bulk transaction),
//! --measure-packs [2000] (last packs inserted one per transaction),
//! --vms [800], --points [30], --lookups [200000],
//! --gc-indexes [48], --index-entries [51200], --ref-entries [80000000],
//! --ref-indexes [24000], --fast-fill (bench-only bulk load, see
//! `fast_fill`), --pack-ids random|ordered [random] (the fill's pack-id
//! scheme, see `pack_id`), --sweep-packs [512] (packs per insert-sweep
//! variant: pack-id scheme x packs per transaction; 0 = none),
//! --sustain-rows [MID_MAX] (rows of the sustained-insert run: one pack per
//! transaction, every merge included, down to `chunks`),
//! --merge-at [MERGE_AT] (staged rows that start a merge),
//! --mid-max [MID_MAX] (rows of `chunks_mid` that start its merge),
//! --insert-only (stop after the insert sweep and the sustained run),
//! --cold-inserts (drop the catalog's page cache before the sustained run).
//!
//! Quick insert check without hours of API fill (docs/scale.md):
//! `--fast-fill --measure-packs 0 --insert-only`, then `--reuse` runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{stream, StreamExt};
use rand::{Rng, SeedableRng};
use tierback_format::crypto::MasterKey;
use tierback_format::ids::{ChunkId, PackId, PointId};
use tierback_format::index::DiskIndex;
use tierback_format::pack::TocEntry;
use tierback_gateway::catalog::{BlockedBloom, Catalog, ChunkRange, NewPack, NewPoint, NewStream};
use tierback_gateway::chunk_store::{ChunkStore, Keys, StoreConfig};

struct Args {
    entries: u64,
    dir: PathBuf,
    reuse: bool,
    pack_chunks: u64,
    vms: u64,
    points: u64,
    lookups: usize,
    gc_indexes: u64,
    index_entries: u64,
    fill_packs: u64,
    measure_packs: u64,
    ref_entries: u64,
    ref_indexes: u64,
    fast_fill: bool,
    ordered_ids: bool,
    sweep_packs: u64,
    sustain_rows: u64,
    merge_at: usize,
    mid_max: usize,
    insert_only: bool,
    cold_inserts: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        entries: 1_000_000,
        dir: PathBuf::from("/tmp/tierback-scale"),
        reuse: false,
        pack_chunks: 64,
        vms: 800,
        points: 30,
        lookups: 200_000,
        gc_indexes: 48,
        index_entries: 51_200,
        fill_packs: 64,
        measure_packs: 2000,
        ref_entries: 80_000_000,
        ref_indexes: 24_000,
        fast_fill: false,
        ordered_ids: false,
        sweep_packs: 512,
        sustain_rows: tierback_gateway::catalog::MID_MAX as u64,
        merge_at: tierback_gateway::catalog::MERGE_AT,
        mid_max: tierback_gateway::catalog::MID_MAX,
        insert_only: false,
        cold_inserts: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let switch = match flag.as_str() {
            "--reuse" => Some(&mut a.reuse),
            "--fast-fill" => Some(&mut a.fast_fill),
            "--insert-only" => Some(&mut a.insert_only),
            "--cold-inserts" => Some(&mut a.cold_inserts),
            _ => None,
        };
        if let Some(on) = switch {
            *on = true;
            continue;
        }
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        let n = || -> Result<u64> {
            v.replace('_', "")
                .parse()
                .with_context(|| format!("{flag} {v}: not a number"))
        };
        match flag.as_str() {
            "--entries" => a.entries = n()?,
            "--dir" => a.dir = PathBuf::from(&v),
            "--pack-chunks" => a.pack_chunks = n()?.max(1),
            "--vms" => a.vms = n()?.max(1),
            "--points" => a.points = n()?.max(1),
            "--lookups" => a.lookups = usize::try_from(n()?)?.max(1024),
            "--gc-indexes" => a.gc_indexes = n()?,
            "--index-entries" => a.index_entries = n()?.max(1),
            "--fill-packs" => a.fill_packs = n()?.max(1),
            "--measure-packs" => a.measure_packs = n()?,
            "--ref-entries" => a.ref_entries = n()?,
            "--ref-indexes" => a.ref_indexes = n()?,
            "--sweep-packs" => a.sweep_packs = n()?,
            "--sustain-rows" => a.sustain_rows = n()?,
            "--merge-at" => a.merge_at = usize::try_from(n()?)?,
            "--mid-max" => a.mid_max = usize::try_from(n()?)?,
            "--pack-ids" => {
                a.ordered_ids = match v.as_str() {
                    "random" => false,
                    "ordered" => true,
                    _ => bail!("--pack-ids random|ordered, not {v}"),
                }
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(a)
}

/// The i-th catalogued chunk id (misses use i >= 2^62).
fn id(i: u64) -> ChunkId {
    ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

/// The p-th pack's id: 16 pseudo-random bytes (`random`, as
/// `PackId::random`), or a time-ordered candidate layout (`ordered`: 1
/// random byte for the fan-out directory, 6 bytes of milliseconds, 9 random
/// bytes) as if pack p was sealed p seconds after a fixed start. Measured,
/// not adopted: see docs/scale.md.
fn pack_id(p: u64, ordered: bool) -> PackId {
    let h = blake3::hash(&[b"scalepck".as_slice(), &p.to_le_bytes()].concat());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.as_bytes()[..16]);
    if ordered {
        let ms = 1_700_000_000_000u64 + p * 1000;
        b[1..7].copy_from_slice(&ms.to_be_bytes()[2..]);
    }
    PackId(b)
}

/// A fresh pack id of either scheme (see `pack_id`).
fn fresh_pack_id(ordered: bool) -> PackId {
    let mut b: [u8; 16] = rand::random();
    if ordered {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        b[1..7].copy_from_slice(&ms.to_be_bytes()[2..]);
    }
    PackId(b)
}

/// Bench-only bulk load of packs `from..to` (the rows the catalog API would
/// insert), through one exclusive connection without journal or fsync and
/// with a page cache that holds the whole file: 5-8x faster than the API.
/// Rows go in in random id order, so leaf pages end up as full as a real
/// catalog's (~70 %), not packed as a sorted load would leave them. This is
/// the only SQL outside `catalog/`, and it never runs in the gateway.
async fn fast_fill(
    db: &Path,
    from: u64,
    to: u64,
    pack: impl Fn(u64) -> NewPack,
    toc_of: impl Fn(u64) -> Vec<TocEntry>,
) -> Result<()> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    use sqlx::{ConnectOptions, Connection};
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .journal_mode(SqliteJournalMode::Off)
        .synchronous(SqliteSynchronous::Off)
        .pragma("locking_mode", "EXCLUSIVE")
        .pragma("cache_size", "-6000000")
        .connect()
        .await?;
    let t0 = Instant::now();
    let mut last = Instant::now();
    let mut p = from;
    while p < to {
        let end = (p + 4096).min(to);
        let mut tx = conn.begin().await?;
        for q in p..end {
            let np = pack(q);
            sqlx::query(
                "INSERT INTO packs (id, size, created_at, state) VALUES (?, ?, ?, 'sealed')",
            )
            .bind(&np.id.0[..])
            .bind(np.size as i64)
            .bind(np.created_at)
            .execute(&mut *tx)
            .await?;
            let toc = toc_of(q);
            let sql = format!(
                "INSERT INTO chunks (id, pack_id, \"offset\", len, raw_len) VALUES {}",
                vec!["(?, ?, ?, ?, ?)"; toc.len()].join(", ")
            );
            let mut stmt = sqlx::query(&sql);
            for c in &toc {
                stmt = stmt
                    .bind(&c.chunk_id.0[..])
                    .bind(&np.id.0[..])
                    .bind(c.offset as i64)
                    .bind(i64::from(c.len))
                    .bind(i64::from(c.raw_len));
            }
            stmt.execute(&mut *tx).await?;
            let sql = format!(
                "INSERT INTO pack_members (pack_id, id) VALUES {}",
                vec!["(?, ?)"; toc.len()].join(", ")
            );
            let mut stmt = sqlx::query(&sql);
            for c in &toc {
                stmt = stmt.bind(&np.id.0[..]).bind(&c.chunk_id.0[..]);
            }
            stmt.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        p = end;
        if last.elapsed() > Duration::from_secs(30) {
            last = Instant::now();
            eprintln!(
                "  … fast fill: pack {p} of {to}, {:.0} rows/s",
                ((p - from) as f64 * toc_of(0).len() as f64) / t0.elapsed().as_secs_f64()
            );
        }
    }
    sqlx::query("PRAGMA journal_mode = WAL")
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

/// A new pack of `pack_chunks` new chunk ids, numbered on from `next`.
fn fresh_pack(next: &mut u64, pack_chunks: u64, ordered: bool) -> (NewPack, Vec<TocEntry>) {
    let toc = (0..pack_chunks)
        .map(|k| {
            *next += 1;
            TocEntry {
                chunk_id: id(*next),
                offset: 32 + k * 700_000,
                len: 700_000,
                raw_len: 1 << 20,
            }
        })
        .collect();
    let np = NewPack {
        id: fresh_pack_id(ordered),
        size: pack_chunks * 1_000_000,
        created_at: 1_800_000_000,
    };
    (np, toc)
}

/// Insert sweep: `packs` fresh packs of `pack_chunks` new rows per variant
/// (pack-id scheme x packs per transaction), interleaved and run twice so
/// a load change on the shared machine hits every variant alike.
async fn insert_sweep(c: &Catalog, t: &mut Table, packs: u64, pack_chunks: u64) -> Result<()> {
    let groups = [1u64, 2, 4, 16, 64];
    let mut results: HashMap<(bool, u64), (f64, u64)> = HashMap::new();
    let (_, _, mut next) = c.store_totals().await?;
    next += 1 << 40; // never an id of the fill
    for _rep in 0..2 {
        for &g in &groups {
            for ordered in [false, true] {
                let mut done = 0u64;
                let t0 = Instant::now();
                while done < packs {
                    let n = g.min(packs - done);
                    let group: Vec<(NewPack, Vec<TocEntry>)> = (0..n)
                        .map(|_| fresh_pack(&mut next, pack_chunks, ordered))
                        .collect();
                    let refs: Vec<(NewPack, &[TocEntry])> =
                        group.iter().map(|(n, t)| (*n, t.as_slice())).collect();
                    c.insert_packs_with_chunks(&refs).await?;
                    done += n;
                }
                let e = results.entry((ordered, g)).or_default();
                e.0 += t0.elapsed().as_secs_f64();
                e.1 += done * pack_chunks;
            }
        }
    }
    let appended: (f64, u64) = results
        .values()
        .fold((0.0, 0), |(s, r), (s2, r2)| (s + s2, r + r2));
    for &g in &groups {
        for ordered in [false, true] {
            let (secs, rows) = results[&(ordered, g)];
            t.row(
                format!(
                    "insert sweep: {} pack ids, {g} packs of {pack_chunks} per transaction",
                    if ordered { "ordered" } else { "random" }
                ),
                format!(
                    "{:.0} /s ({:.2} ms per transaction)",
                    rows as f64 / secs,
                    secs * 1000.0 * g as f64 / (rows / pack_chunks) as f64
                ),
            );
        }
    }
    // The sweep's rows are staged (appended): their merge into `chunks` is
    // part of what an insert costs.
    let merge = timed_merge(c, t, "merge of the sweep's staged rows").await?;
    t.row(
        "insert sweep incl. its merge (appends + merge, one after the other)",
        format!(
            "{:.0} /s ({} rows in {:.1} s)",
            appended.1 as f64 / (appended.0 + merge),
            appended.1,
            appended.0 + merge
        ),
    );
    Ok(())
}

/// Merges every staged row into `chunks_mid` and that into `chunks`; one
/// table row with the rate. Returns seconds.
async fn timed_merge(c: &Catalog, t: &mut Table, what: &str) -> Result<f64> {
    let t0 = Instant::now();
    let staged = c.merge_staged().await?;
    let first = t0.elapsed().as_secs_f64();
    let (_, moved) = c.merge_all().await?;
    let secs = t0.elapsed().as_secs_f64();
    if staged + moved > 0 {
        t.row(
            what,
            format!(
                "{:.0} rows/s ({staged} staged rows into chunks_mid in {first:.1} s, \
                 {moved} rows of chunks_mid into chunks in {:.1} s)",
                staged.max(moved) as f64 / secs,
                secs - first
            ),
        );
    }
    Ok(secs)
}

/// Sustained inserts as the chunk store makes them: one pack of
/// `pack_chunks` new rows per transaction, `rows` in all, background merges
/// starting at `MERGE_AT` staged rows (inserts wait at 7/4 of that) and at
/// `MID_MAX` rows in `chunks_mid`, then the rest merged: every row ends up
/// in `chunks` before the clock stops.
async fn sustained_inserts(c: &Catalog, t: &mut Table, rows: u64, pack_chunks: u64) -> Result<()> {
    let (_, _, mut next) = c.store_totals().await?;
    next += 1 << 41; // never an id of the fill or the sweep
    let t0 = Instant::now();
    let mid_before = c.mid_chunks();
    let (mut done, mut peak, mut peak_mid, mut last) = (0u64, 0usize, 0u64, Instant::now());
    while done < rows {
        let (np, toc) = fresh_pack(&mut next, pack_chunks, false);
        c.insert_pack_with_chunks(&np, &toc).await?;
        done += pack_chunks;
        peak = peak.max(c.staged_chunks());
        peak_mid = peak_mid.max(c.mid_chunks());
        if last.elapsed() > Duration::from_secs(30) {
            last = Instant::now();
            eprintln!(
                "  … sustained: {done} of {rows} rows, {:.0} /s, {} staged, {} in chunks_mid, RSS {:.0} MiB",
                done as f64 / t0.elapsed().as_secs_f64(),
                c.staged_chunks(),
                c.mid_chunks(),
                mib(status("VmRSS:"))
            );
        }
    }
    let appended = t0.elapsed().as_secs_f64();
    c.merge_all().await?;
    let total = t0.elapsed().as_secs_f64();
    t.row(
        format!("sustained inserts, one pack of {pack_chunks} per transaction, merges included"),
        format!(
            "{:.0} /s ({done} rows in {total:.1} s; inserts returned after {appended:.1} s; \
             at most {peak} rows staged; chunks_mid {mid_before} rows at the start, at most \
             {peak_mid}, 0 at the end; RSS {:.0} MiB)",
            done as f64 / total,
            mib(status("VmRSS:"))
        ),
    );
    Ok(())
}

fn status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// `sync`, then drops the page cache of `files` and reports how much of
/// them stayed resident (fincore), so the reader can trust "cold".
fn evict(files: &[PathBuf]) -> Result<()> {
    let paths: Vec<&Path> = files
        .iter()
        .map(PathBuf::as_path)
        .filter(|p| p.exists())
        .collect();
    let st = Command::new("sync").status().context("running sync")?;
    if !st.success() {
        bail!("sync failed");
    }
    let script = "import os,sys\nfor p in sys.argv[1:]:\n    fd=os.open(p,os.O_RDONLY)\n    os.fsync(fd)\n    os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED)\n    os.close(fd)\n";
    let st = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&paths)
        .status()
        .context("running python3 for posix_fadvise")?;
    if !st.success() {
        bail!("posix_fadvise failed");
    }
    Ok(())
}

fn resident(file: &Path) -> String {
    Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

fn wal_size(wal: &Path) -> String {
    std::fs::metadata(wal).map_or_else(|_| "none".into(), |m| format!("{:.0} MiB", mib(m.len())))
}

struct Table(Vec<(String, String)>);

impl Table {
    fn row(&mut self, what: impl Into<String>, value: impl Into<String>) {
        let (w, v) = (what.into(), value.into());
        println!("  {w:<58} {v}");
        self.0.push((w, v));
    }
}

/// `ids` looked up in requests of `batch`, one request at a time (an agent
/// session), each split `par` ways by `lookup_chunks_with`. Returns ids/s
/// and how many were found.
/// Dedup lookups as the protocol asks them (`lack` requests and the commit
/// check: presence only, `Catalog::contains_chunks_with`), `batch` ids per
/// request, `par` statements at once; returns (ids/s, ids found).
async fn lookups(c: &Catalog, ids: &[ChunkId], batch: usize, par: usize) -> Result<(f64, usize)> {
    timed_lookups(c, ids, batch, par, false).await
}

/// Hits of `ids` looked up with locations (`Catalog::lookup_chunks_with`:
/// restores, verify), every one found, as one table row.
async fn locations_row(
    t: &mut Table,
    c: &Catalog,
    ids: &[ChunkId],
    batch: usize,
    par: usize,
    cache: &str,
) -> Result<()> {
    let (rate, found) = timed_lookups(c, ids, batch, par, true).await?;
    if found != ids.len() {
        bail!("{found} of {} {cache} hits located", ids.len());
    }
    t.row(
        format!("{cache} hits with locations, {batch}/request, {par} at once"),
        format!("{rate:.0} /s"),
    );
    Ok(())
}

async fn timed_lookups(
    c: &Catalog,
    ids: &[ChunkId],
    batch: usize,
    par: usize,
    with_locations: bool,
) -> Result<(f64, usize)> {
    let t = Instant::now();
    let mut found = 0;
    for req in ids.chunks(batch) {
        found += if with_locations {
            let locs = c.lookup_chunks_with(req, par).await?;
            locs.iter().filter(|l| l.is_some()).count()
        } else {
            let present = c.contains_chunks_with(req, par).await?;
            present.iter().filter(|p| **p).count()
        };
    }
    Ok((ids.len() as f64 / t.elapsed().as_secs_f64(), found))
}

/// Same, with `clients` sessions asking at once.
async fn lookups_concurrent(
    c: &Catalog,
    ids: &[ChunkId],
    batch: usize,
    clients: usize,
) -> Result<f64> {
    let t = Instant::now();
    let per = ids.len().div_ceil(clients);
    let parts: Vec<Vec<ChunkId>> = ids.chunks(per).map(<[ChunkId]>::to_vec).collect();
    let results: Vec<Result<(f64, usize)>> = stream::iter(parts)
        .map(|p| {
            let c = c.clone();
            async move { lookups(&c, &p, batch, 1).await }
        })
        .buffer_unordered(clients)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(ids.len() as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    tierback_gateway::runtime()?.block_on(run())
}

async fn run() -> Result<()> {
    let a = parse()?;
    // The catalog logs its merges (RUST_LOG=warn to silence them).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        ))
        .with_writer(std::io::stderr)
        .init();
    let mut t = Table(Vec::new());
    let db = a.dir.join("catalog.db");
    let db_files = vec![
        db.clone(),
        a.dir.join("catalog.db-wal"),
        a.dir.join("catalog.db-shm"),
    ];
    if !a.reuse && a.dir.exists() {
        std::fs::remove_dir_all(&a.dir).context("clearing the bench dir")?;
    }
    std::fs::create_dir_all(&a.dir)?;
    println!(
        "scale check: {} entries in {} ({} cores)",
        a.entries,
        a.dir.display(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    // 1. Fill. The bulk goes in `--fill-packs` packs per transaction
    // (insert_packs_with_chunks); the last `--measure-packs` packs go in one
    // transaction each (insert_pack_with_chunks, what sealing a pack does),
    // measured on the full-size table.
    let c = Catalog::open(&db).await?;
    let (_, _, have) = c.store_totals().await?;
    let packs_total = a.entries.div_ceil(a.pack_chunks);
    let measured_from = packs_total.saturating_sub(a.measure_packs);
    let toc_of = |p: u64| -> Vec<TocEntry> {
        let lo = p * a.pack_chunks;
        let hi = (lo + a.pack_chunks).min(a.entries);
        (lo..hi)
            .enumerate()
            .map(|(k, i)| TocEntry {
                chunk_id: id(i),
                offset: 32 + k as u64 * 700_000,
                len: 700_000,
                raw_len: 1 << 20,
            })
            .collect()
    };
    let ordered = a.ordered_ids;
    let new_pack = |p: u64| NewPack {
        id: pack_id(p, ordered),
        size: a.pack_chunks * 1_000_000,
        created_at: 1_700_000_000 + p as i64,
    };
    let fast = a.fast_fill && have < a.entries && have / a.pack_chunks < measured_from;
    if fast {
        let first_pack = have / a.pack_chunks;
        c.close().await;
        let t0 = Instant::now();
        fast_fill(&db, first_pack, measured_from, new_pack, toc_of).await?;
        t.row(
            format!(
                "fast fill (bench-only: no journal, no fsync) of {} rows",
                (measured_from - first_pack) * a.pack_chunks
            ),
            format!("{:.0} s", t0.elapsed().as_secs_f64()),
        );
    }
    let c = if fast { Catalog::open(&db).await? } else { c };
    let (_, _, have) = c.store_totals().await?;
    if have < a.entries {
        let first_pack = have / a.pack_chunks;
        let t0 = Instant::now();
        let mut last = Instant::now();
        let mut p = first_pack;
        while p < measured_from {
            let group: Vec<(NewPack, Vec<TocEntry>)> = (p..(p + a.fill_packs).min(measured_from))
                .map(|q| (new_pack(q), toc_of(q)))
                .collect();
            let refs: Vec<(NewPack, &[TocEntry])> =
                group.iter().map(|(n, t)| (*n, t.as_slice())).collect();
            c.insert_packs_with_chunks(&refs).await?;
            p += group.len() as u64;
            if last.elapsed() > Duration::from_secs(30) {
                last = Instant::now();
                eprintln!(
                    "  … {} rows, {:.0} inserts/s, RSS {:.0} MiB",
                    p * a.pack_chunks,
                    ((p - first_pack) * a.pack_chunks) as f64 / t0.elapsed().as_secs_f64(),
                    mib(status("VmRSS:"))
                );
            }
        }
        if p > first_pack {
            t.row(
                format!(
                    "bulk inserts ({} packs x {} rows per transaction)",
                    a.fill_packs, a.pack_chunks
                ),
                format!(
                    "{:.0} /s",
                    ((p - first_pack) * a.pack_chunks) as f64 / t0.elapsed().as_secs_f64()
                ),
            );
        }
        let t0 = Instant::now();
        let mut rows = 0;
        for q in p.max(measured_from)..packs_total {
            let toc = toc_of(q);
            rows += toc.len();
            c.insert_pack_with_chunks(&new_pack(q), &toc).await?;
        }
        let took = t0.elapsed().as_secs_f64();
        let n = packs_total - p.max(measured_from);
        t.row(
            format!(
                "inserts, one transaction per pack of {} ({n} packs at {} rows)",
                a.pack_chunks, a.entries
            ),
            format!(
                "{:.0} /s ({:.2} ms per pack transaction)",
                rows as f64 / took,
                took * 1000.0 / n.max(1) as f64
            ),
        );
    } else {
        t.row("inserts", format!("reused catalog of {have} rows"));
    }
    timed_merge(&c, &mut t, "merge of the rows staged so far").await?;

    // 2. Points: VMs × points, one disk stream each.
    let points: i64 = sqlx_count(&c).await?;
    if points < (a.vms * a.points) as i64 {
        let t0 = Instant::now();
        for p in 0..a.points {
            for vm in 0..a.vms {
                let n = p * a.vms + vm;
                let mut pid = [0u8; 16];
                pid[..8].copy_from_slice(&n.to_le_bytes());
                c.commit_point(&NewPoint {
                    id: PointId(pid),
                    vm_id: format!("vm-{vm:04}"),
                    vm_name: format!("VM {vm}"),
                    created_at: 1_700_000_000 + (p * 86_400 + vm) as i64,
                    kind: if p == 0 { "full" } else { "incremental" }.into(),
                    agent_id: format!("agent-{}", vm / 20),
                    job_id: None,
                    logical_bytes: 50 << 30,
                    stored_bytes: 1 << 30,
                    bytes_read: 1 << 30,
                    bytes_sent: 1 << 30,
                    streams: vec![NewStream {
                        stream_no: 0,
                        kind: "disk".into(),
                        path: "Virtual Hard Disks/os.vhdx".into(),
                        controller: Some("scsi".into()),
                        location: Some("0:0".into()),
                        size: 50 << 30,
                        chunk_size: 1 << 20,
                        logical_sector: 512,
                        physical_sector: 4096,
                        chunk_count: a.index_entries,
                    }],
                })
                .await?;
            }
        }
        t.row(
            format!("commit_point ({} VMs x {} points)", a.vms, a.points),
            format!(
                "{:.0} /s",
                (a.vms * a.points) as f64 / t0.elapsed().as_secs_f64()
            ),
        );
    }
    let t0 = Instant::now();
    let mut listed = 0;
    let samples = 50u64;
    for k in 0..samples {
        listed += c
            .list_points(Some(&format!("vm-{:04}", (k * 37) % a.vms)))
            .await?
            .len();
    }
    t.row(
        format!(
            "list_points(one VM) ({} points each)",
            listed as u64 / samples
        ),
        format!(
            "{:.2} ms",
            t0.elapsed().as_secs_f64() * 1000.0 / samples as f64
        ),
    );
    let t0 = Instant::now();
    let all = c.list_points(None).await?.len();
    t.row(
        format!("list_points(all) ({all} points)"),
        format!("{:.0} ms", t0.elapsed().as_secs_f64() * 1000.0),
    );

    // 3. Reopen: the filter is built from the table (file size decides
    // inline or background; wait for it either way).
    c.close().await;
    let db_size = std::fs::metadata(&db)?.len();
    t.row(
        "catalog file",
        format!(
            "{:.0} MiB ({:.0} bytes/chunk)",
            mib(db_size),
            db_size as f64 / have.max(a.entries).max(1) as f64
        ),
    );
    let rss_before = status("VmRSS:");
    let t0 = Instant::now();
    let c = Catalog::open(&db).await?;
    c.set_merge_at(a.merge_at);
    c.set_mid_max(a.mid_max);
    let opened = t0.elapsed();
    if !c.wait_chunk_filter(Duration::from_secs(3600)).await {
        bail!("chunk filter not built: {:?}", c.chunk_filter_status());
    }
    let s = c.chunk_filter_status();
    t.row(
        "Catalog::open returned after",
        format!("{:.2} s", opened.as_secs_f64()),
    );
    t.row(
        format!("chunk filter build ({} rows streamed)", s.last_build_rows),
        format!(
            "{:.1} s ({:.0} rows/s)",
            s.last_build.map_or(0.0, |d| d.as_secs_f64()),
            s.last_build_rows as f64 / s.last_build.map_or(1.0, |d| d.as_secs_f64().max(1e-9))
        ),
    );
    t.row(
        "chunk filter memory",
        format!(
            "{:.1} MiB for capacity {} ({:.1} bits/row), RSS +{:.0} MiB",
            mib(s.bytes),
            s.capacity,
            s.bytes as f64 * 8.0 / a.entries.max(1) as f64,
            mib(status("VmRSS:").saturating_sub(rss_before))
        ),
    );

    // 3b. Insert sweep on the full-size table, filter ready (as in service).
    if a.sweep_packs > 0 {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        t.row(
            "load average before the insert sweep",
            load.trim().to_string(),
        );
        insert_sweep(&c, &mut t, a.sweep_packs, a.pack_chunks).await?;
    }
    if a.sustain_rows > 0 {
        if a.cold_inserts {
            evict(&db_files)?;
        }
        t.row(
            format!(
                "catalog resident before the sustained run{}",
                if a.cold_inserts {
                    " (page cache dropped)"
                } else {
                    ""
                }
            ),
            format!(
                "{} of {:.0} MiB",
                resident(&db),
                mib(std::fs::metadata(&db)?.len())
            ),
        );
        sustained_inserts(&c, &mut t, a.sustain_rows, a.pack_chunks).await?;
        // The merges leave GBs of dirty pages behind: written back before
        // the next measurement, not during it.
        Command::new("sync").status().context("running sync")?;
        t.row("WAL file after the sustained run", wal_size(&db_files[1]));
    }
    if a.insert_only {
        c.close().await;
        return print_table(&t);
    }

    // 4. Lookups. Hits: random catalogued ids; misses: never inserted.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut sample = |n: usize, hit: bool| -> Vec<ChunkId> {
        (0..n)
            .map(|_| {
                if hit {
                    id(rng.gen_range(0..a.entries.max(1)))
                } else {
                    id((1 << 62) + rng.gen_range(0..u64::MAX >> 3))
                }
            })
            .collect()
    };
    // While the WAL holds frames not yet checkpointed, every page read
    // searches its index segment by segment (4,096 frames each), so a long
    // WAL would slow every lookup; the file's size shows whether it grew.
    t.row("WAL file before the lookups", wal_size(&db_files[1]));
    let n = a.lookups;
    let misses = sample(n, false);
    // Warm: the file is in the page cache after the filter build read it.
    let hits = sample(n, true);
    lookups(&c, &hits, 512, 4).await?; // warm-up pass
    for (batch, par) in [(256, 1), (512, 1), (512, 4), (1024, 4), (1024, 8)] {
        let (rate, found) = lookups(&c, &hits, batch, par).await?;
        if found != hits.len() {
            bail!("{found} of {} hits found", hits.len());
        }
        t.row(
            format!("warm hits, {batch}/request, {par} statements at once"),
            format!("{rate:.0} /s"),
        );
    }
    locations_row(&mut t, &c, &hits, 1024, 8, "warm").await?;
    for batch in [256, 1024] {
        let (rate, found) = lookups(&c, &misses, batch, 4).await?;
        if found != 0 {
            bail!("{found} misses found");
        }
        t.row(
            format!("warm misses, {batch}/request (filter)"),
            format!("{rate:.0} /s"),
        );
    }
    let rate = lookups_concurrent(&c, &hits, 512, 4).await?;
    t.row(
        "warm hits, 512/request, 4 sessions at once",
        format!("{rate:.0} /s"),
    );

    // Cold: evict, then a fresh sample per run (so no run warms the next).
    let cold_n = (n / 4).max(1024);
    for (batch, par) in [(512, 1), (512, 4), (512, 8)] {
        let ids = sample(cold_n, true);
        evict(&db_files)?;
        let res = resident(&db);
        let (rate, found) = lookups(&c, &ids, batch, par).await?;
        if found != ids.len() {
            bail!("{found} of {} cold hits found", ids.len());
        }
        t.row(
            format!("cold hits, {batch}/request, {par} at once (resident before: {res})"),
            format!("{rate:.0} /s"),
        );
    }
    {
        let ids = sample(cold_n, true);
        evict(&db_files)?;
        locations_row(&mut t, &c, &ids, 512, 8, "cold").await?;
    }
    {
        let ids = sample(cold_n, true);
        evict(&db_files)?;
        let rate = lookups_concurrent(&c, &ids, 512, 4).await?;
        t.row(
            "cold hits, 512/request, 4 sessions at once",
            format!("{rate:.0} /s"),
        );
    }
    {
        let ids = sample(cold_n, false);
        evict(&db_files)?;
        let (rate, _) = lookups(&c, &ids, 512, 4).await?;
        t.row("cold misses, 512/request (filter)", format!("{rate:.0} /s"));
    }
    {
        // 50/50, as an incremental's request looks after its first pass.
        let mut ids = sample(cold_n / 2, true);
        ids.extend(sample(cold_n / 2, false));
        let mut r2 = rand::rngs::StdRng::seed_from_u64(7);
        for i in (1..ids.len()).rev() {
            ids.swap(i, r2.gen_range(0..=i));
        }
        evict(&db_files)?;
        let (rate, _) = lookups(&c, &ids, 512, 4).await?;
        t.row(
            "cold 50% hits, 512/request, 4 at once",
            format!("{rate:.0} /s"),
        );
    }

    // 5. GC. Mark: real sealed indexes of `index_entries` catalogued ids,
    // written by the store (its commit-time presence check included),
    // evicted, then read + decrypted + inserted 4 at once like gc.rs.
    if a.gc_indexes > 0 {
        let keys = Keys::derive(&MasterKey::generate());
        let store = ChunkStore::open(&a.dir, keys, c.clone(), StoreConfig::default()).await?;
        let mut streams = Vec::new();
        let t0 = Instant::now();
        for k in 0..a.gc_indexes {
            let mut pid = [0xeeu8; 16];
            pid[..8].copy_from_slice(&k.to_le_bytes());
            let point = PointId(pid);
            let start = rng.gen_range(0..a.entries.saturating_sub(a.index_entries).max(1));
            let index = DiskIndex {
                size: a.index_entries << 20,
                chunk_size: 1 << 20,
                entries: (0..a.index_entries)
                    .map(|e| (e, id((start + e * 7919) % a.entries.max(1))))
                    .collect(),
            };
            store.write_index(&point, 0, &index).await?;
            streams.push(point);
        }
        let written = (a.gc_indexes * a.index_entries) as f64;
        t.row(
            "write_index incl. commit presence check (ids/s)",
            format!("{:.0} /s", written / t0.elapsed().as_secs_f64()),
        );
        let files: Vec<PathBuf> = streams.iter().map(|p| store.index_path(p, 0)).collect();
        let index_bytes: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        evict(&files)?;
        let mark = Arc::new(BlockedBloom::with_bytes(
            (a.entries * 16 / 8).min(256 << 20),
            a.entries,
            1,
        ));
        let t0 = Instant::now();
        let store = Arc::new(store);
        let results: Vec<Result<usize>> = stream::iter(streams.clone())
            .map(|p| {
                let (store, mark) = (store.clone(), mark.clone());
                async move {
                    let idx = store.read_index(&p, 0).await?;
                    let m = mark.clone();
                    let n = tokio::task::spawn_blocking(move || {
                        idx.entries.iter().for_each(|(_, id)| m.insert(id));
                        idx.entries.len()
                    })
                    .await?;
                    Ok(n)
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;
        let mut marked = 0;
        for r in results {
            marked += r?;
        }
        let mark_s = t0.elapsed().as_secs_f64();
        let per_entry = mark_s / marked.max(1) as f64;
        let ref_index_entries = a.ref_indexes as f64 * a.index_entries as f64;
        t.row(
            format!(
                "GC mark ({} cold indexes, {marked} entries, {:.0} MiB)",
                a.gc_indexes,
                mib(index_bytes)
            ),
            format!(
                "{mark_s:.2} s = {:.0} entries/s, {:.0} MiB/s",
                marked as f64 / mark_s,
                mib(index_bytes) / mark_s
            ),
        );
        t.row(
            format!(
                "GC mark extrapolated ({} indexes x {} entries)",
                a.ref_indexes, a.index_entries
            ),
            format!("{:.0} s", per_entry * ref_index_entries),
        );
        t.row(
            "GC mark filter memory (16 bits/chunk, cap 256 MiB)",
            format!(
                "{:.0} MiB here, {:.0} MiB at {} chunks",
                mib(mark.bytes()),
                mib((a.ref_entries * 2).min(256 << 20)),
                a.ref_entries
            ),
        );

        // Plan: gc.rs reads the whole chunk table once in keyset pages
        // (chunk_page) and probes the mark per row; timed cold, in full.
        evict(&db_files)?;
        let t0 = Instant::now();
        let counts: Vec<Result<(u64, u64)>> = stream::iter(ChunkRange::split(4))
            .map(|range| {
                let (c, mark) = (c.clone(), mark.clone());
                async move {
                    let (mut rows, mut kept) = (0u64, 0u64);
                    let mut after: Option<ChunkId> = None;
                    loop {
                        let page = c.chunk_page(range, after.as_ref(), 50_000).await?;
                        rows += page.len() as u64;
                        kept += page
                            .iter()
                            .filter(|(id, _, _)| mark.may_contain(id))
                            .count() as u64;
                        if page.len() < 50_000 {
                            return Ok((rows, kept));
                        }
                        after = page.last().map(|(id, _, _)| *id);
                    }
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;
        let (mut rows, mut kept) = (0u64, 0u64);
        for r in counts {
            let (a, b) = r?;
            rows += a;
            kept += b;
        }
        let plan_s = t0.elapsed().as_secs_f64();
        let per_row = plan_s / rows.max(1) as f64;
        let ref_packs = a.ref_entries.div_ceil(a.pack_chunks);
        t.row(
            format!("GC plan: cold pass over the chunk table, 4 ranges at once ({rows} rows, {kept} marked)"),
            format!(
                "{plan_s:.1} s = {:.0} rows/s -> {:.0} s at {} rows",
                rows as f64 / plan_s,
                per_row * a.ref_entries as f64,
                a.ref_entries
            ),
        );
        // Sweep: dropping packs (one transaction each) on a sample.
        let drop_n = packs_total.min(200);
        let t0 = Instant::now();
        for k in 0..drop_n {
            c.delete_pack(&pack_id(packs_total - 1 - k, ordered))
                .await?;
        }
        let per_drop = t0.elapsed().as_secs_f64() / drop_n.max(1) as f64;
        t.row(
            format!("GC sweep, delete_pack ({drop_n} packs)"),
            format!(
                "{:.2} ms/pack -> {:.0} s if 1/30 of {ref_packs} packs die per run",
                per_drop * 1000.0,
                per_drop * ref_packs as f64 / 30.0
            ),
        );
        t.row(
            "GC mark+plan+sweep extrapolated to the reference store",
            format!(
                "{:.0} s",
                per_entry * ref_index_entries
                    + per_row * a.ref_entries as f64
                    + per_drop * ref_packs as f64 / 30.0
            ),
        );
        // Re-inserting the dropped packs keeps --reuse runs comparable.
        for k in 0..drop_n {
            let q = packs_total - 1 - k;
            c.insert_pack_with_chunks(&new_pack(q), &toc_of(q)).await?;
        }
        for p in &streams {
            let _ = std::fs::remove_dir_all(store.index_path(p, 0).parent().unwrap_or(&a.dir));
        }
    }

    t.row(
        "peak RSS (VmHWM)",
        format!("{:.0} MiB", mib(status("VmHWM:"))),
    );
    c.close().await;
    print_table(&t)
}

fn print_table(t: &Table) -> Result<()> {
    println!("\n| measurement | value |\n|---|---|");
    let mut seen = HashMap::new();
    for (w, v) in &t.0 {
        if seen.insert(w.clone(), ()).is_none() {
            println!("| {w} | {v} |");
        }
    }
    Ok(())
}

async fn sqlx_count(c: &Catalog) -> Result<i64> {
    Ok(c.all_point_ids().await?.len() as i64)
}
