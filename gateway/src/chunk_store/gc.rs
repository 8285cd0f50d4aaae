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

use super::{blocking, files, ChunkStore, StoreError};
use crate::catalog::{ChunkLocation, PackRow};

/// Default compaction threshold: a pack whose live records fill less than
/// this percentage of it is compacted.
pub const DEFAULT_COMPACT_BELOW_PERCENT: u8 = 50;

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
    /// Distinct chunks named by committed points (the mark).
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
        let mut r = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        (r.packs_before, r.bytes_before, r.chunks_before) = self.catalog.store_totals().await?;

        let mut marked = HashSet::new();
        let mut live = HashSet::new();
        self.mark_new_points(&mut marked, &mut live).await?;
        r.live_chunks = live.len() as u64;

        // Plan. Packs sealed since GC started hold only chunks stored by
        // running backups (or compaction): never candidates.
        let mut dead: Vec<(PackRow, PackChunks)> = Vec::new();
        let mut sparse: Vec<(PackRow, PackChunks)> = Vec::new();
        let packs = self.catalog.list_packs().await?;
        let new_packs = self.state().gc_new_packs.clone().unwrap_or_default();
        for p in packs {
            if new_packs.contains(&p.id) {
                continue;
            }
            let chunks = self.catalog.pack_chunks(&p.id).await?;
            let keep = self.keep_flags(floor, &live, &chunks);
            let live_bytes: u64 = chunks
                .iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|((_, l), _)| u64::from(l.len))
                .sum();
            if !keep.iter().any(|k| *k) {
                dead.push((p, chunks));
            } else if live_bytes * 100 < u64::from(opts.compact_below_percent) * p.size {
                sparse.push((p, chunks));
            }
        }

        if opts.dry_run {
            for (p, chunks) in &dead {
                r.packs_removed += 1;
                r.chunks_removed += chunks.len() as u64;
                r.bytes_reclaimed += p.size;
            }
            for (p, chunks) in &sparse {
                let keep = self.keep_flags(floor, &live, chunks);
                let moved: u64 = chunks
                    .iter()
                    .zip(&keep)
                    .filter(|(_, k)| **k)
                    .map(|((_, l), _)| u64::from(l.len))
                    .sum();
                r.packs_compacted += 1;
                r.chunks_moved += keep.iter().filter(|k| **k).count() as u64;
                r.chunks_removed += keep.iter().filter(|k| !**k).count() as u64;
                r.bytes_reclaimed += p.size.saturating_sub(moved);
            }
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
        self.mark_new_points(&mut marked, &mut live).await?;

        let mut reclaimed: u64 = 0;
        let mut rewritten: u64 = 0;

        // Sweep 1: dead packs.
        for (p, chunks) in dead {
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

        // Sweep 2: compaction. First every live record goes into the open
        // pack and is made durable, then each old pack is swapped out.
        let mut moved: Vec<(PackRow, PackChunks, PackChunks)> = Vec::new();
        for (p, chunks) in sparse {
            let keep = self.keep_flags(floor, &live, &chunks);
            let wanted: PackChunks = chunks
                .iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(c, _)| *c)
                .collect();
            match self.relocate(&p.id, &wanted).await {
                Ok(moves) => {
                    rewritten += moves.iter().map(|(_, l)| u64::from(l.len)).sum::<u64>();
                    moved.push((p, chunks, moves));
                }
                Err(e) => {
                    tracing::warn!(pack = %p.id, error = %e, "not compacting a pack whose live chunks do not read back; run verify");
                    r.packs_skipped += 1;
                }
            }
        }
        if !moved.is_empty() {
            self.flush().await?;
            self.stop_if(GcStep::NewPacksSealed)?;
        }
        for (p, chunks, moves) in moved {
            let moving: HashSet<ChunkId> = moves.iter().map(|(id, _)| *id).collect();
            let rest: PackChunks = chunks
                .into_iter()
                .filter(|(id, _)| !moving.contains(id))
                .collect();
            let guard = self.sweep.write().await;
            if self.keep_flags(floor, &live, &rest).iter().any(|k| *k) {
                // A chunk we took for dead was referenced meanwhile: keep the
                // pack; the copies just written are unreferenced records.
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

    /// Adds the chunks of committed points not yet in `marked` to `live`.
    /// An index that does not open stops GC: what is live is then unknown.
    async fn mark_new_points(
        &self,
        marked: &mut HashSet<PointId>,
        live: &mut HashSet<ChunkId>,
    ) -> Result<(), StoreError> {
        let mut new_points = HashSet::new();
        for (point, stream_no) in self.catalog.committed_streams().await? {
            if marked.contains(&point) {
                continue;
            }
            let idx = self.read_index(&point, stream_no).await.map_err(|e| {
                StoreError::Internal(format!(
                    "GC stopped, nothing deleted since: cannot read index {stream_no} of point {point} ({e}); run verify"
                ))
            })?;
            live.extend(idx.entries.iter().map(|(_, id)| *id));
            new_points.insert(point);
        }
        marked.extend(new_points);
        Ok(())
    }

    /// For each chunk: live (marked) or touched by a backup since `floor`.
    fn keep_flags(&self, floor: u64, live: &HashSet<ChunkId>, chunks: &PackChunks) -> Vec<bool> {
        self.touches
            .touched_since(floor, chunks.iter().map(|(id, _)| id))
            .into_iter()
            .zip(chunks)
            .map(|(t, (id, _))| t || live.contains(id))
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
