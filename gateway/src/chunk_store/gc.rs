//! Garbage collection of the local store: mark every chunk named by an index
//! of a committed point, then sweep — packs without a live chunk are deleted,
//! packs whose live bytes fall below a threshold are compacted (their live
//! records re-sealed into the open pack, no recompression), and pack files
//! the catalog does not know (crash leftovers) are removed. GC never deletes
//! a chunk that a running backup may reference (DESIGN.md §6 rule 5).
//!
//! # Protecting running backups
//!
//! A backup references chunks it stored (`put` → stored) and chunks the
//! store already had (`lacking` answered "present", `put` found a duplicate,
//! `missing`/`write_index` at commit). Every such reference is a *touch*,
//! recorded in memory in the [`TouchLog`] with the current epoch. Each running
//! backup holds a [`WriterGuard`] taken at `begin` (a new epoch); a GC run
//! takes the oldest epoch still held (or a new one) as its *floor* and keeps
//! every chunk touched at or after it — so the start-time cutoff is the start
//! of the oldest backup running when GC starts, never later than GC's own
//! start. Touches older than every holder are forgotten, so memory is bounded
//! by what the running backups touched. Sessions live in memory only, so a
//! gateway restart ends every backup and no touch needs to survive it.
//!
//! The race between "GC decides a chunk is dead" and "a backup is told the
//! chunk is present" is closed by the store's `sweep` lock: dedup answers
//! (catalog lookup + touch) hold it shared, and each GC catalog transaction
//! holds it exclusively after re-checking the touches. Either the answer came
//! first (the chunk is touched, GC keeps it) or the transaction did (the chunk
//! is gone from the catalog, the answer is "lacking" and the agent sends it).
//! Packs sealed after GC started and chunks pending in the open pack are
//! never candidates. `write_index` re-checks, under the same lock, that every
//! chunk of the index is still catalogued (commit then answers 409; the agent
//! re-offers its chunks and commits again).
//!
//! # Bounded memory (docs/scale.md)
//!
//! The mark is a Bloom filter of live ids ([`BlockedBloom`]), sized at
//! [`GC_MARK_BITS_PER_ENTRY`] bits per catalogued chunk and never larger
//! than [`GC_MARK_MAX_BYTES`], whatever the store's size (160 MB at 80 M
//! chunks). It has no false negatives, so a live chunk is always kept; a
//! false positive only keeps a dead chunk (and maybe its pack) until a later
//! run, whose filter has a fresh random seed. The plan reads the chunk table
//! once, sequentially, keeping a few counters per pack and one row per
//! candidate pack; a candidate's chunks are re-read when it is swept.
//!
//! # Crash ordering (docs/formats.md §10)
//!
//! Dead pack: catalog transaction (chunk rows + pack row) → delete file →
//! fsync dir. Compaction: re-sealed records → new pack durable and catalogued
//! (`flush`) → ONE transaction moves the chunk rows and drops the old pack →
//! delete the old file → fsync dir. At every point each live chunk has a
//! catalog row naming a durable pack that holds it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tierback_format::crypto;
use tierback_format::ids::{ChunkId, PackId, PointId};

use futures_util::{stream, StreamExt, TryStreamExt};

use super::{blocking, files, ChunkStore, StoreError};
use crate::catalog::{BlockedBloom, ChunkLocation, ChunkRange, PackRow};

/// Default compaction threshold: a pack whose live records fill less than
/// this percentage of it is compacted.
pub const DEFAULT_COMPACT_BELOW_PERCENT: u8 = 50;

/// Bits of the mark filter per catalogued chunk (~0.1 % of dead chunks are
/// kept for one more run).
pub const GC_MARK_BITS_PER_ENTRY: u64 = 16;
/// Upper bound of the mark filter's memory, whatever the store's size
/// (16 bits per entry up to 134 M chunks, fewer beyond: more dead chunks
/// survive a run, no live one is ever lost).
pub const GC_MARK_MAX_BYTES: u64 = 256 << 20;
/// Sparse packs per compaction batch (see the sweep in `gc_with`): the
/// bound of compaction's memory, one chunk list per pack of a batch.
pub(super) const COMPACT_BATCH_PACKS: usize = 256;
/// A compaction batch also ends once it has re-written this many pack
/// targets' worth of records (each batch ends with one flush, which seals
/// a last, partly filled pack).
pub(super) const COMPACT_BATCH_TARGETS: u64 = 16;
/// Indexes read and decrypted at once while marking.
const MARK_PARALLELISM: usize = 4;
/// Chunk rows per page of the plan's pass over the chunk table.
const PLAN_PAGE: u32 = 50_000;
/// Id ranges the plan reads at once (queue depth for a cold catalog).
const PLAN_SHARDS: usize = 4;

/// What the plan learns about one pack from its chunk rows.
#[derive(Default)]
struct PackUse {
    rows: u64,
    /// Rows named by committed points (the mark).
    marked: u64,
    /// Rows marked or touched since the floor, and their sealed bytes.
    kept: u64,
    kept_bytes: u64,
}

/// The chunks named by committed points, as a Bloom filter (see the module
/// docs), and the points already read into it.
struct Mark {
    live: Arc<BlockedBloom>,
    points: HashSet<PointId>,
}

/// In-memory record of chunk references by running backups (see the module
/// docs). Cheap: one hash-map insert per reference, no catalog write.
#[derive(Default)]
pub(super) struct TouchLog {
    inner: Mutex<TouchInner>,
}

#[derive(Default)]
struct TouchInner {
    epoch: u64,
    next_holder: u64,
    /// Holder id → the oldest epoch it needs kept.
    holders: HashMap<u64, u64>,
    /// Chunk → epoch of its latest touch.
    touched: HashMap<ChunkId, u64>,
}

impl TouchLog {
    fn lock(&self) -> MutexGuard<'_, TouchInner> {
        // No panics inside the critical sections; a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records references to `ids` (nothing to do when no backup or GC runs).
    pub(super) fn touch<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) {
        let mut g = self.lock();
        if g.holders.is_empty() {
            return;
        }
        let e = g.epoch;
        for id in ids {
            g.touched.insert(*id, e);
        }
    }

    /// A new holder. A GC holder's floor is the oldest epoch still held.
    fn register(self: &Arc<Self>, gc: bool) -> Holder {
        let mut g = self.lock();
        g.epoch += 1;
        let mut floor = g.epoch;
        if gc {
            if let Some(m) = g.holders.values().min() {
                floor = floor.min(*m);
            }
        }
        let id = g.next_holder;
        g.next_holder += 1;
        g.holders.insert(id, floor);
        Holder {
            log: self.clone(),
            id,
            floor,
        }
    }

    fn release(&self, id: u64) {
        let mut g = self.lock();
        g.holders.remove(&id);
        match g.holders.values().min().copied() {
            None => g.touched = HashMap::new(),
            Some(m) => g.touched.retain(|_, e| *e >= m),
        }
    }

    /// For each id: touched at or after `floor`.
    fn touched_since<'a>(
        &self,
        floor: u64,
        ids: impl IntoIterator<Item = &'a ChunkId>,
    ) -> Vec<bool> {
        let g = self.lock();
        ids.into_iter()
            .map(|id| g.touched.get(id).is_some_and(|e| *e >= floor))
            .collect()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().touched.len()
    }
}

struct Holder {
    log: Arc<TouchLog>,
    id: u64,
    floor: u64,
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.log.release(self.id);
    }
}

/// Held by a running backup from `begin` until its session ends: every
/// chunk it touches is kept by GC runs that start meanwhile.
pub struct WriterGuard {
    _holder: Holder,
}

impl std::fmt::Debug for WriterGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WriterGuard({})", self._holder.id)
    }
}

/// The right to run GC; only one exists at a time per store.
pub struct GcPermit {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

/// How a GC run behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcOptions {
    /// Compact packs whose live records fill less than this percentage.
    pub compact_below_percent: u8,
    /// Only report what would be done.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            compact_below_percent: DEFAULT_COMPACT_BELOW_PERCENT,
            dry_run: false,
        }
    }
}

/// What a GC run did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Recorded packs, their bytes and chunks when GC started.
    pub packs_before: u64,
    pub bytes_before: u64,
    pub chunks_before: u64,
    /// Catalogued chunks (in packs older than the run) that the mark keeps:
    /// every chunk named by a committed point, plus the mark filter's rare
    /// false positives.
    pub live_chunks: u64,
    /// Chunk rows removed (dead chunks).
    pub chunks_removed: u64,
    /// Packs deleted because no chunk in them was live.
    pub packs_removed: u64,
    /// Sparse packs rewritten (live chunks moved, old pack deleted).
    pub packs_compacted: u64,
    /// Live chunks moved by compaction.
    pub chunks_moved: u64,
    /// Pack files on disk the catalog did not know (crash leftovers), removed.
    pub orphan_files_removed: u64,
    /// Index directories of no committed point, older than an hour, removed.
    pub orphan_indexes_removed: u64,
    /// Candidates left alone because a backup referenced them meanwhile or a
    /// live chunk in them does not open.
    pub packs_skipped: u64,
    /// Bytes of pack files deleted minus bytes of records re-written.
    pub bytes_reclaimed: u64,
    /// Recorded packs, bytes and chunks when GC ended.
    pub packs_after: u64,
    pub bytes_after: u64,
    pub chunks_after: u64,
    pub seconds: f64,
}

/// Points where a test can stop a GC run as if the gateway died there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum GcStep {
    /// A dead pack's catalog transaction committed; its file not yet deleted.
    DeadPackDropped = 1,
    /// Compacted records are durable in new packs; chunk rows not yet moved.
    NewPacksSealed = 2,
    /// Chunk rows moved and the old pack dropped; its file not yet deleted.
    ChunksMoved = 3,
}

type PackChunks = Vec<(ChunkId, ChunkLocation)>;

impl ChunkStore {
    /// Registers a running backup (see [`WriterGuard`]).
    pub fn begin_writer(&self) -> WriterGuard {
        WriterGuard {
            _holder: self.touches.register(false),
        }
    }

    /// The GC permit, or [`StoreError::GcRunning`] if a GC is running.
    pub fn gc_permit(&self) -> Result<GcPermit, StoreError> {
        self.gc_running
            .clone()
            .try_lock_owned()
            .map(|g| GcPermit { _guard: g })
            .map_err(|_| StoreError::GcRunning)
    }

    /// Takes the permit and runs GC.
    pub async fn gc(&self, opts: GcOptions) -> Result<GcReport, StoreError> {
        let permit = self.gc_permit()?;
        self.gc_with(&permit, opts).await
    }

    /// Runs GC (mark, then sweep) under a permit taken earlier (prune takes
    /// it before deleting points, so a concurrent GC is refused up front).
    pub async fn gc_with(
        &self,
        _permit: &GcPermit,
        opts: GcOptions,
    ) -> Result<GcReport, StoreError> {
        let started = Instant::now();
        // Register before marking: a backup committing after the mark's
        // snapshot was running at registration or starts later, so its
        // touches are at or after the floor.
        let holder = self.touches.register(true);
        let floor = holder.floor;
        // Packs sealed from now on are never candidates (exact start-time
        // cutoff: recorded by `write_pack`, not by clock).
        self.state().gc_new_packs = Some(HashSet::new());
        // Every pack recorded before this point has its rows in `chunks` or
        // `chunks_mid` from here on (the plan reads those tables, not the
        // staged rows in memory); later packs are in
        // `gc_new_packs` (`write_pack` adds them after their insert).
        self.catalog.merge_staged().await?;
        let mut r = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        (r.packs_before, r.bytes_before, r.chunks_before) = self.catalog.store_totals().await?;

        let bytes = r
            .chunks_before
            .saturating_mul(GC_MARK_BITS_PER_ENTRY)
            .div_ceil(8)
            .clamp(4096, GC_MARK_MAX_BYTES);
        let mut mark = Mark {
            live: Arc::new(BlockedBloom::with_bytes(
                bytes,
                r.chunks_before,
                rand::random(),
            )),
            points: HashSet::new(),
        };
        self.mark_new_points(&mut mark).await?;
        let live = mark.live.clone();

        // Plan. Packs sealed since GC started hold only chunks stored by
        // running backups (or compaction): never candidates. One pass over
        // the chunk table in keyset pages, PLAN_SHARDS id ranges at once,
        // totals each pack in memory (O(packs), no per-chunk random read);
        // only the candidate pack rows are kept, and a dry run counts as it
        // goes.
        let packs = self.catalog.list_packs().await?;
        let new_packs = self.state().gc_new_packs.clone().unwrap_or_default();
        let usage: Arc<Mutex<HashMap<PackId, PackUse>>> =
            Arc::new(Mutex::new(HashMap::with_capacity(packs.len())));
        let scans = ChunkRange::split(PLAN_SHARDS).into_iter().map(|range| {
            let (catalog, live, touches, usage) = (
                self.catalog.clone(),
                live.clone(),
                self.touches.clone(),
                usage.clone(),
            );
            async move {
                let mut after: Option<ChunkId> = None;
                loop {
                    let page = catalog.chunk_page(range, after.as_ref(), PLAN_PAGE).await?;
                    let touched = touches.touched_since(floor, page.iter().map(|(id, _, _)| id));
                    let mut usage = usage.lock().unwrap_or_else(|p| p.into_inner());
                    for ((id, pack, len), t) in page.iter().zip(touched) {
                        let marked = live.may_contain(id);
                        let u = usage.entry(*pack).or_default();
                        u.rows += 1;
                        if marked {
                            u.marked += 1;
                        }
                        if marked || t {
                            u.kept += 1;
                            u.kept_bytes += u64::from(*len);
                        }
                    }
                    drop(usage);
                    if page.len() < PLAN_PAGE as usize {
                        return Ok::<(), StoreError>(());
                    }
                    after = page.last().map(|(id, _, _)| *id);
                }
            }
        });
        stream::iter(scans)
            .buffer_unordered(PLAN_SHARDS)
            .try_collect::<Vec<()>>()
            .await?;
        let mut usage = std::mem::take(&mut *usage.lock().unwrap_or_else(|p| p.into_inner()));
        let mut dead: Vec<PackRow> = Vec::new();
        let mut sparse: Vec<PackRow> = Vec::new();
        for p in packs {
            if new_packs.contains(&p.id) {
                continue;
            }
            let u = usage.remove(&p.id).unwrap_or_default();
            r.live_chunks += u.marked;
            if u.kept == 0 {
                if opts.dry_run {
                    r.packs_removed += 1;
                    r.chunks_removed += u.rows;
                    r.bytes_reclaimed += p.size;
                }
                dead.push(p);
            } else if u.kept_bytes * 100 < u64::from(opts.compact_below_percent) * p.size {
                if opts.dry_run {
                    r.packs_compacted += 1;
                    r.chunks_moved += u.kept;
                    r.chunks_removed += u.rows - u.kept;
                    r.bytes_reclaimed += p.size.saturating_sub(u.kept_bytes);
                }
                sparse.push(p);
            }
        }
        drop(usage);

        if opts.dry_run {
            (r.packs_after, r.bytes_after, r.chunks_after) = (
                r.packs_before
                    .saturating_sub(r.packs_removed + r.packs_compacted),
                r.bytes_before.saturating_sub(r.bytes_reclaimed),
                r.chunks_before.saturating_sub(r.chunks_removed),
            );
            r.seconds = started.elapsed().as_secs_f64();
            self.state().gc_new_packs = None;
            return Ok(r);
        }

        // Points committed while we planned: a second fence (their chunks
        // are touched by `write_index` as well).
        self.mark_new_points(&mut mark).await?;

        let mut reclaimed: u64 = 0;
        let mut rewritten: u64 = 0;

        // Sweep 1: dead packs.
        for p in dead {
            let chunks = self.catalog.pack_chunks(&p.id).await?;
            let guard = self.sweep.write().await;
            if self.keep_flags(floor, &live, &chunks).iter().any(|k| *k) {
                r.packs_skipped += 1;
                continue;
            }
            r.chunks_removed += self.catalog.delete_pack(&p.id).await?;
            drop(guard);
            self.stop_if(GcStep::DeadPackDropped)?;
            reclaimed += self.remove_pack_file(p.id).await?;
            r.packs_removed += 1;
        }

        // Sweep 2: compaction, in batches of at most COMPACT_BATCH_PACKS
        // packs (and about COMPACT_BATCH_TARGETS packs' worth of records):
        // first every live record of the batch goes into the open pack and
        // is made durable, then each old pack of the batch is swapped out.
        // Memory holds one batch's chunk lists, whatever the store's size.
        let batch_bytes = COMPACT_BATCH_TARGETS.saturating_mul(self.cfg.pack_target_size);
        let mut sparse = sparse.into_iter().peekable();
        while sparse.peek().is_some() {
            let mut moved: Vec<(PackRow, PackChunks, PackChunks)> = Vec::new();
            let mut bytes = 0u64;
            while moved.len() < COMPACT_BATCH_PACKS && bytes < batch_bytes {
                let Some(p) = sparse.next() else { break };
                let chunks = self.catalog.pack_chunks(&p.id).await?;
                let keep = self.keep_flags(floor, &live, &chunks);
                let wanted: PackChunks = chunks
                    .iter()
                    .zip(&keep)
                    .filter(|(_, k)| **k)
                    .map(|(c, _)| *c)
                    .collect();
                match self.relocate(&p.id, &wanted).await {
                    Ok(moves) => {
                        let n = moves.iter().map(|(_, l)| u64::from(l.len)).sum::<u64>();
                        bytes += n;
                        rewritten += n;
                        moved.push((p, chunks, moves));
                    }
                    Err(e) => {
                        tracing::warn!(pack = %p.id, error = %e, "not compacting a pack whose live chunks do not read back; run verify");
                        r.packs_skipped += 1;
                    }
                }
            }
            if moved.is_empty() {
                continue;
            }
            self.flush().await?;
            self.stop_if(GcStep::NewPacksSealed)?;
            reclaimed += self.swap_compacted(floor, &live, moved, &mut r).await?;
        }

        // Sweep 3: pack files the catalog does not know (a crash between a
        // pack's rename and its transaction, or between a GC transaction and
        // the file's removal). Under the seal lock no pack is between its
        // rename and its catalog transaction.
        {
            let _seal = self.seal_lock.lock().await;
            let sealing = self.state().sealing.as_ref().map(|s| s.id);
            let known: HashSet<PackId> = self
                .catalog
                .list_packs()
                .await?
                .into_iter()
                .map(|p| p.id)
                .collect();
            let layout = self.shared.layout.clone();
            let on_disk =
                blocking(move || layout.pack_files())
                    .await?
                    .map_err(|e| StoreError::Io {
                        context: "listing pack files".into(),
                        source: e,
                    })?;
            for (id, _) in on_disk {
                if !known.contains(&id) && Some(id) != sealing {
                    tracing::info!(pack = %id, "removing a pack file the catalog does not know");
                    reclaimed += self.remove_pack_file(id).await?;
                    r.orphan_files_removed += 1;
                }
            }
        }

        // Index directories of no committed point (a crash between a
        // commit's indexes and its point, or between deleting points and
        // their files). A commit writes its indexes seconds before its
        // point, so only directories untouched for an hour are removed.
        let committed: HashSet<PointId> = self.catalog.all_point_ids().await?.into_iter().collect();
        let layout = self.shared.layout.clone();
        r.orphan_indexes_removed = blocking(move || {
            layout.remove_orphan_indexes(&committed, std::time::Duration::from_secs(3600))
        })
        .await?
        .map_err(|e| StoreError::Io {
            context: "removing index files of no recovery point".into(),
            source: e,
        })?;

        r.bytes_reclaimed = reclaimed.saturating_sub(rewritten);
        (r.packs_after, r.bytes_after, r.chunks_after) = self.catalog.store_totals().await?;
        r.seconds = started.elapsed().as_secs_f64();
        self.state().gc_new_packs = None;
        drop(holder);
        tracing::info!(
            packs_removed = r.packs_removed,
            packs_compacted = r.packs_compacted,
            chunks_removed = r.chunks_removed,
            bytes_reclaimed = r.bytes_reclaimed,
            "GC finished"
        );
        Ok(r)
    }

    /// Adds the chunks of committed points not yet marked to the mark,
    /// reading [`MARK_PARALLELISM`] indexes at once (each decrypted and
    /// inserted on a blocking thread; only the filter outlives it). An
    /// index that does not open stops GC: what is live is then unknown.
    async fn mark_new_points(&self, mark: &mut Mark) -> Result<(), StoreError> {
        let todo: Vec<(PointId, u32)> = self
            .catalog
            .committed_streams()
            .await?
            .into_iter()
            .filter(|(p, _)| !mark.points.contains(p))
            .collect();
        let (shared, live) = (self.shared.clone(), mark.live.clone());
        let mut reads = stream::iter(todo)
            .map(move |(point, stream_no)| {
                let (shared, live) = (shared.clone(), live.clone());
                async move {
                    let read = blocking(move || {
                        shared.read_index(&point, stream_no).map(|idx| {
                            idx.entries.iter().for_each(|(_, id)| live.insert(id));
                        })
                    })
                    .await;
                    (point, stream_no, read)
                }
            })
            .buffer_unordered(MARK_PARALLELISM);
        let mut new_points = HashSet::new();
        while let Some((point, stream_no, read)) = reads.next().await {
            read.and_then(|r| r).map_err(|e| {
                StoreError::Internal(format!(
                    "GC stopped, nothing deleted since: cannot read index {stream_no} of point {point} ({e}); run verify"
                ))
            })?;
            new_points.insert(point);
        }
        // Only after every stream of a point was read is the point marked.
        mark.points.extend(new_points);
        self.mark_delta_bases(&mark.live).await
    }

    /// Marks every chunk that a chunk row names as its delta base, live or
    /// not: a delta kept for any reason (marked, or touched by a backup
    /// after this) can still be read. A base outlives its last delta by
    /// one GC run. Deltas stored later touch their base themselves.
    async fn mark_delta_bases(&self, live: &BlockedBloom) -> Result<(), StoreError> {
        let mut after: Option<ChunkId> = None;
        loop {
            let page = self
                .catalog
                .delta_bases_page(after.as_ref(), PLAN_PAGE)
                .await?;
            page.iter().for_each(|b| live.insert(b));
            if page.len() < PLAN_PAGE as usize {
                return Ok(());
            }
            after = page.last().copied();
        }
    }

    /// The second half of a compaction batch: each old pack whose moved
    /// records are durable in new packs gets its chunk rows pointed at the
    /// copies and is dropped, unless a chunk left behind was referenced
    /// meanwhile (then the pack stays; the copies are unreferenced
    /// records). Returns the bytes of pack files deleted.
    async fn swap_compacted(
        &self,
        floor: u64,
        live: &BlockedBloom,
        moved: Vec<(PackRow, PackChunks, PackChunks)>,
        r: &mut GcReport,
    ) -> Result<u64, StoreError> {
        let mut reclaimed = 0;
        for (p, chunks, moves) in moved {
            let moving: HashSet<ChunkId> = moves.iter().map(|(id, _)| *id).collect();
            let rest: PackChunks = chunks
                .into_iter()
                .filter(|(id, _)| !moving.contains(id))
                .collect();
            let guard = self.sweep.write().await;
            if self.keep_flags(floor, live, &rest).iter().any(|k| *k) {
                r.packs_skipped += 1;
                continue;
            }
            r.chunks_removed += self
                .catalog
                .move_chunks_and_drop_pack(&p.id, &moves)
                .await?;
            drop(guard);
            self.stop_if(GcStep::ChunksMoved)?;
            reclaimed += self.remove_pack_file(p.id).await?;
            r.packs_compacted += 1;
            r.chunks_moved += moves.len() as u64;
        }
        Ok(reclaimed)
    }

    /// For each chunk: live (marked) or touched by a backup since `floor`.
    fn keep_flags(&self, floor: u64, live: &BlockedBloom, chunks: &PackChunks) -> Vec<bool> {
        self.touches
            .touched_since(floor, chunks.iter().map(|(id, _)| id))
            .into_iter()
            .zip(chunks)
            .map(|(t, (id, _))| t || live.may_contain(id))
            .collect()
    }

    /// Re-seals the records of `chunks` (all in `pack`) into the open pack,
    /// without recompressing; returns where each will live. They become
    /// durable and catalogued with the next seal (their rows keep pointing at
    /// `pack` until the caller moves them).
    async fn relocate(&self, pack: &PackId, chunks: &PackChunks) -> Result<PackChunks, StoreError> {
        let shared = self.shared.clone();
        let (pack, list) = (*pack, chunks.clone());
        let payloads = blocking(move || -> Result<Vec<Vec<u8>>, StoreError> {
            let file = std::fs::File::open(shared.layout.pack_path(&pack)).map_err(|e| {
                StoreError::Io {
                    context: format!("opening pack {pack}"),
                    source: e,
                }
            })?;
            let key = shared.keys.master.pack_key(&pack);
            list.iter()
                .map(|(id, loc)| {
                    let sealed = files::read_exact_at(&file, loc.offset, loc.len as usize)
                        .map_err(|e| StoreError::Io {
                            context: format!("reading pack {pack}"),
                            source: e,
                        })?;
                    crypto::open(&key, &crypto::chunk_ad(&pack, id), &sealed).map_err(|e| {
                        StoreError::Corrupt {
                            pack,
                            offset: loc.offset,
                            reason: format!("chunk {id}: {e}"),
                        }
                    })
                })
                .collect()
        })
        .await??;
        let mut moves = Vec::with_capacity(chunks.len());
        for ((id, loc), payload) in chunks.iter().zip(payloads) {
            let payload = Arc::new(payload);
            loop {
                if self.open_is_full() {
                    self.seal_pending(super::SealMode::IfFull).await?;
                }
                let (new_pack, key) = self.open_pack_id();
                let (p, cid) = (payload.clone(), *id);
                let sealed =
                    blocking(move || crypto::seal_chunk_payload(&key, &new_pack, &cid, &p)).await?;
                let mut st = self.state();
                if let Some(open) = st.open.as_mut().filter(|o| *o.builder.id() == new_pack) {
                    let (offset, len) =
                        open.builder
                            .append(*id, &sealed, loc.raw_len)
                            .map_err(|e| {
                                StoreError::Internal(format!("appending to the open pack: {e}"))
                            })?;
                    moves.push((
                        *id,
                        ChunkLocation {
                            pack_id: new_pack,
                            offset,
                            len,
                            raw_len: loc.raw_len,
                        },
                    ));
                    break;
                }
                // Sealed while we encrypted for it: seal again for the next.
            }
        }
        Ok(moves)
    }

    /// Deletes a pack file durably and forgets its cached handle.
    async fn remove_pack_file(&self, id: PackId) -> Result<u64, StoreError> {
        self.shared.handles.evict(&id);
        let path = self.shared.layout.pack_path(&id);
        blocking(move || files::remove_durably(&path))
            .await?
            .map_err(|e| StoreError::Io {
                context: format!("deleting pack {id}"),
                source: e,
            })
    }

    /// Deletes recovery points: their catalog rows in ONE transaction, then
    /// their index files (directory fsynced). A crash in between leaves index
    /// files of no visible point, which nothing reads. Returns how many
    /// points existed. Their chunks become garbage for the next GC.
    pub async fn delete_points(&self, points: &[PointId]) -> Result<u64, StoreError> {
        let n = self.catalog.delete_points(points).await?;
        let layout = self.shared.layout.clone();
        let list = points.to_vec();
        blocking(move || list.iter().try_for_each(|p| layout.remove_point_indexes(p)))
            .await?
            .map_err(|e| StoreError::Io {
                context: "removing index files of deleted points".into(),
                source: e,
            })?;
        Ok(n)
    }

    fn stop_if(&self, step: GcStep) -> Result<(), StoreError> {
        if self.shared.faults.gc_stop_at(step as u8) {
            return Err(StoreError::Internal(format!(
                "simulated crash after GC step {step:?}"
            )));
        }
        Ok(())
    }
}
