//! Staged chunk rows and the middle tier: new rows are appended to
//! `chunks_recent` and held here, merged into `chunks_mid` in id order, and
//! `chunks_mid` is merged into `chunks` once it is large
//! (`migrations/0007_staging.sql`, `0008_chunks_mid.sql`; docs/scale.md §4).
//!
//! Why: a chunk id is a random keyed hash, so a row inserted into `chunks`
//! dirties its own leaf (and the WAL and the checkpoint copy it) — at 80 M
//! rows the single writer managed 16–27 k rows/s. An append dirties the last
//! page of `chunks_recent` only. A merge of the staged rows into the small
//! `chunks_mid` (cached) writes several rows per leaf, and a merge of a
//! large `chunks_mid` into `chunks` puts ~8 rows in each leaf it rewrites
//! where merging the staged rows straight into `chunks` put ~1.9.
//!
//! What keeps answers exact:
//!
//! * A staged row enters [`Staging`] only after its transaction committed,
//!   under the chunk writer's lock; it leaves only after a merge committed
//!   it into `chunks_mid` and deleted it from `chunks_recent`. A reader asks
//!   [`Staging`] first and SQL second, so a row moving between the two is
//!   seen in one or both, never in neither.
//! * A row moves from `chunks_mid` to `chunks` in one transaction, and every
//!   SQL reader asks both tables in one statement (one snapshot).
//! * An id already catalogued (in either table or staged) is not staged
//!   again: a chunk keeps its first location, as `INSERT OR IGNORE` did.
//! * Merges of staged rows add their ids to a filter being built, under its
//!   insert guard like inserts, so a build running meanwhile misses none; a
//!   build also streams the staged ids. The active filter has them already.
//!   A move from `chunks_mid` to `chunks` adds nothing: a build reads both
//!   tables in one statement per page.
//! * Anything that changes or deletes rows of a pack (GC) first merges the
//!   pack's staged rows (`Catalog::merge_staged`), and then works on the
//!   two tables.
//!
//! Memory: bounded by configuration, not by the store's size. Merges start
//! at [`MERGE_AT`] rows and inserts wait for a merge at 7/4 of that; the
//! in-memory table then has at most 4 Mi slots of ~73 bytes (~300 MiB), and
//! a merge's sorted id list takes 32 bytes a row (~100 MiB). `chunks_mid`
//! is on disk ([`MID_MAX`] rows, ~1.3 GB, mostly in the OS page cache).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::RwLock;

use futures_util::{stream, StreamExt, TryStreamExt};

use tierback_format::ids::{ChunkId, PackId};

use super::data::{ChunkLocation, LOOKUP_BATCH, LOOKUP_PARALLELISM};
use super::{Catalog, CatalogError, Result};

/// Staged rows that start a background merge. At 80 M rows in `chunks`
/// (~1.5 M leaves) a merge of this many rows puts ~1.9 rows in each leaf it
/// writes (docs/scale.md §4).
pub const MERGE_AT: usize = 2 << 20;
/// Staged rows at which inserts wait for a merge: 7/4 of the merge
/// threshold (3.5 Mi rows by default, which the in-memory table holds
/// without growing past 4 Mi slots).
fn stage_max(merge_at: usize) -> usize {
    merge_at + merge_at * 3 / 4
}

/// Rows per merge transaction: consecutive ids, so each leaf's rows go in
/// one transaction, and short, so appends and commits wait well under a
/// second for the chunk writer.
const MERGE_TXN_ROWS: usize = 8192;

/// Rows of `chunks_mid` that start its merge into `chunks`. At 80 M rows in
/// `chunks` (~2 M leaves) such a merge puts ~8 rows in each leaf it writes
/// (docs/scale.md §4); the table takes ~1.3 GB on disk.
pub const MID_MAX: usize = 16 << 20;

/// Rows per transaction of a merge of `chunks_mid` into `chunks`: at
/// [`MID_MAX`] rows they span ~1/1000 of the ids, ~2,000 leaves of `chunks`.
/// (Tests use a few, so that a test's merge takes several transactions.)
const MID_TXN_ROWS: usize = if cfg!(test) { 50 } else { 16384 };

/// One staged row.
#[derive(Debug, Clone, Copy)]
struct Row {
    seq: i64,
    loc: ChunkLocation,
}

/// [`Staging::partition`]: (staged tags with locations, the rest).
pub(crate) type Split<T> = (Vec<(T, ChunkLocation)>, Vec<(T, ChunkId)>);

/// A row to stage or merge, with its delta base.
pub(crate) type StagedRow = (ChunkId, ChunkLocation, Option<ChunkId>);

#[derive(Debug, Default)]
struct Inner {
    rows: HashMap<ChunkId, Row>,
    /// Bases of the staged delta rows.
    bases: HashMap<ChunkId, ChunkId>,
    /// Staged rows per pack.
    packs: HashMap<PackId, u32>,
    /// Next `chunks_recent.seq`.
    next_seq: i64,
    /// Rows of the running merge already committed into `chunks` (they are
    /// counted once by [`Staging::unmerged`]).
    merged: usize,
}

/// The staged rows in memory (see the module doc).
#[derive(Debug)]
pub(crate) struct Staging {
    inner: RwLock<Inner>,
    /// One merge at a time.
    merging: tokio::sync::Mutex<()>,
    /// Rows that start a merge (tests lower it).
    merge_at: AtomicUsize,
    /// Rows in `chunks_mid`.
    mid_rows: AtomicI64,
    /// Rows of `chunks_mid` that start its merge into `chunks`.
    mid_max: AtomicUsize,
}

impl Default for Staging {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            merging: tokio::sync::Mutex::new(()),
            merge_at: AtomicUsize::new(MERGE_AT),
            mid_rows: AtomicI64::new(0),
            mid_max: AtomicUsize::new(MID_MAX),
        }
    }
}

impl Staging {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Location of a staged chunk.
    pub(crate) fn get(&self, id: &ChunkId) -> Option<ChunkLocation> {
        self.read().rows.get(id).map(|r| r.loc)
    }

    /// Location and delta base of a staged chunk.
    pub(crate) fn get_with_base(&self, id: &ChunkId) -> Option<(ChunkLocation, Option<ChunkId>)> {
        let inner = self.read();
        inner
            .rows
            .get(id)
            .map(|r| (r.loc, inner.bases.get(id).copied()))
    }

    /// Splits tagged `ids` (e.g. by their position in the caller's list)
    /// into (the staged ones' tags with their locations, the rest for SQL).
    pub(crate) fn partition<T>(&self, ids: impl IntoIterator<Item = (T, ChunkId)>) -> Split<T> {
        let inner = self.read();
        let (mut hit, mut rest) = (Vec::new(), Vec::new());
        for (i, id) in ids {
            match inner.rows.get(&id) {
                Some(r) => hit.push((i, r.loc)),
                None => rest.push((i, id)),
            }
        }
        (hit, rest)
    }

    /// Staged rows not yet committed into `chunks`.
    pub(crate) fn unmerged(&self) -> usize {
        let inner = self.read();
        inner.rows.len().saturating_sub(inner.merged)
    }

    /// Whether any row of `pack` is staged.
    pub(crate) fn has_pack(&self, pack: &PackId) -> bool {
        self.read().packs.contains_key(pack)
    }

    /// Every staged id (the chunk filter's build).
    pub(crate) fn ids(&self) -> Vec<ChunkId> {
        self.read().rows.keys().copied().collect()
    }

    /// Distinct bases of staged delta rows above `after`, ascending.
    pub(crate) fn bases_after(&self, after: Option<&ChunkId>) -> BTreeSet<ChunkId> {
        self.read()
            .bases
            .values()
            .filter(|b| after.is_none_or(|a| *b > a))
            .copied()
            .collect()
    }

    /// Reserves `n` sequence numbers (call under the chunk writer's lock).
    pub(crate) fn take_seqs(&self, n: usize) -> i64 {
        let mut inner = self.write();
        let first = inner.next_seq;
        inner.next_seq += n as i64;
        first
    }

    /// Adds committed rows (call under the chunk writer's lock), numbered
    /// from `first_seq`.
    pub(crate) fn add(&self, first_seq: i64, rows: &[StagedRow]) {
        let mut inner = self.write();
        for (k, (id, loc, base)) in rows.iter().enumerate() {
            let seq = first_seq + k as i64;
            inner.next_seq = inner.next_seq.max(seq + 1);
            inner.rows.insert(*id, Row { seq, loc: *loc });
            if let Some(b) = base {
                inner.bases.insert(*id, *b);
            }
            *inner.packs.entry(loc.pack_id).or_default() += 1;
        }
    }

    /// The staged rows with their sequence numbers up to the highest one,
    /// sorted by id (call under the chunk writer's lock).
    fn snapshot(&self) -> (i64, Vec<ChunkId>) {
        let mut inner = self.write();
        inner.merged = 0;
        let upto = inner.rows.values().map(|r| r.seq).max().unwrap_or(0);
        // Ids only (32 bytes a row): the rows are read per transaction.
        let mut ids: Vec<ChunkId> = inner.rows.keys().copied().collect();
        ids.sort_unstable();
        (upto, ids)
    }

    /// The staged rows of `ids` (all staged until their merge ends).
    fn rows_of(&self, ids: &[ChunkId]) -> Vec<StagedRow> {
        let inner = self.read();
        ids.iter()
            .filter_map(|id| {
                let r = inner.rows.get(id)?;
                Some((*id, r.loc, inner.bases.get(id).copied()))
            })
            .collect()
    }

    fn note_merged(&self, n: usize) {
        self.write().merged += n;
    }

    /// Drops the rows numbered up to `upto` (merged and deleted from
    /// `chunks_recent`).
    fn remove_upto(&self, upto: i64) {
        let mut inner = self.write();
        let gone: Vec<(ChunkId, PackId)> = inner
            .rows
            .iter()
            .filter(|(_, r)| r.seq <= upto)
            .map(|(id, r)| (*id, r.loc.pack_id))
            .collect();
        for (id, pack) in gone {
            inner.rows.remove(&id);
            inner.bases.remove(&id);
            if let Some(n) = inner.packs.get_mut(&pack) {
                *n -= 1;
                if *n == 0 {
                    inner.packs.remove(&pack);
                }
            }
        }
        inner.merged = 0;
        let keep = inner.rows.len() * 2;
        inner.rows.shrink_to(keep);
    }

    /// `n` rows left `chunks_mid` (moved into `chunks`, or deleted by GC).
    pub(crate) fn note_mid_deleted(&self, n: u64) {
        self.mid_rows.fetch_sub(n as i64, Ordering::Relaxed);
    }

    pub(crate) fn set_merge_at(&self, rows: usize) {
        self.merge_at.store(rows.max(1), Ordering::Relaxed);
    }

    pub(crate) fn merge_at(&self) -> usize {
        self.merge_at.load(Ordering::Relaxed)
    }
}

type RecentRow = (i64, Vec<u8>, Vec<u8>, i64, i64, i64, Option<Vec<u8>>);

impl Catalog {
    /// Loads the rows of `chunks_recent` into memory and counts
    /// `chunks_mid` (at open).
    pub(crate) async fn load_staged(&self) -> Result<()> {
        let next: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM chunks_recent")
            .fetch_one(&self.pool)
            .await?;
        self.staged.write().next_seq = next;
        let mid: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chunks_mid")
            .fetch_one(&self.pool)
            .await?;
        self.staged.mid_rows.store(mid, Ordering::Relaxed);
        let bad = |e: tierback_format::ids::IdError| CatalogError::Invalid(e.to_string());
        // Streamed: up to 3.5 Mi rows, not gathered first.
        let mut rows = sqlx::query_as::<_, RecentRow>(
            "SELECT seq, id, pack_id, \"offset\", len, raw_len, base FROM chunks_recent ORDER BY seq",
        )
        .fetch(&self.pool);
        while let Some((seq, id, pack, offset, len, raw_len, base)) = rows.try_next().await? {
            let (_, loc) = super::data::decode_location((id.clone(), pack, offset, len, raw_len))?;
            let id = ChunkId::from_slice(&id).map_err(bad)?;
            let base = base
                .map(|b| ChunkId::from_slice(&b).map_err(bad))
                .transpose()?;
            self.staged.add(seq, &[(id, loc, base)]);
        }
        Ok(())
    }

    /// Rows staged and not yet merged into `chunks_mid`.
    pub fn staged_chunks(&self) -> usize {
        self.staged.unmerged()
    }

    /// Rows in `chunks_mid`, the middle tier (counted at open, then kept).
    pub fn mid_chunks(&self) -> u64 {
        self.staged.mid_rows.load(Ordering::Relaxed).max(0) as u64
    }

    /// Staged rows that start a background merge (default [`MERGE_AT`];
    /// tests and benchmarks change it).
    pub fn set_merge_at(&self, rows: usize) {
        self.staged.set_merge_at(rows);
    }

    /// Rows of `chunks_mid` that start its merge into `chunks` (default
    /// [`MID_MAX`]; tests and benchmarks change it).
    pub fn set_mid_max(&self, rows: usize) {
        self.staged.mid_max.store(rows.max(1), Ordering::Relaxed);
    }

    /// Merges every staged row into `chunks_mid` (id order,
    /// [`MERGE_TXN_ROWS`] per transaction) and then deletes them from
    /// `chunks_recent`. Waits for a merge already running, then merges what
    /// is left. Returns the rows merged. Idempotent after a crash: the rows
    /// stay staged until the final delete, and merging a row twice is
    /// ignored.
    pub async fn merge_staged(&self) -> Result<u64> {
        let _merging = self.staged.merging.lock().await;
        self.merge_staged_locked().await
    }

    /// Merges the staged rows into `chunks_mid` and then every row of
    /// `chunks_mid` into `chunks`: (staged rows merged, rows moved).
    pub async fn merge_all(&self) -> Result<(u64, u64)> {
        let _merging = self.staged.merging.lock().await;
        let staged = self.merge_staged_locked().await?;
        let moved = self.merge_mid_locked().await?;
        Ok((staged, moved))
    }

    /// The background merge: staged rows, then `chunks_mid` once it holds
    /// [`MID_MAX`] rows.
    async fn merge_background(&self) -> Result<()> {
        let _merging = self.staged.merging.lock().await;
        self.merge_staged_locked().await?;
        if self.mid_chunks() >= self.staged.mid_max.load(Ordering::Relaxed) as u64 {
            self.merge_mid_locked().await?;
        }
        Ok(())
    }

    /// [`Self::merge_staged`] under the merge lock.
    async fn merge_staged_locked(&self) -> Result<u64> {
        let (upto, rows) = {
            let _writer = self.chunk_writer.lock().await;
            self.staged.snapshot()
        };
        if rows.is_empty() {
            return Ok(0);
        }
        let started = std::time::Instant::now();
        let parts: Vec<&[ChunkId]> = rows.chunks(MERGE_TXN_ROWS).collect();
        let mut prefetch = parts.first().map(|p| self.prefetch_ids(p));
        for (k, part) in parts.iter().enumerate() {
            // The leaves this part lands in were read by the prefetch (the
            // next part's is read while this one is written).
            if let Some(p) = prefetch.take() {
                let _ = p.await;
            }
            prefetch = parts.get(k + 1).map(|p| self.prefetch_ids(p));
            let part = self.staged.rows_of(part);
            let guard = self.chunk_filter.insert_guard().await;
            guard.add_moved(part.iter().map(|(id, _, _)| id));
            let mut writer = self.chunk_writer.lock().await;
            let conn = writer
                .as_mut()
                .ok_or_else(|| CatalogError::Invalid("the catalog is closed".into()))?;
            let mut tx = sqlx::Connection::begin(conn).await?;
            let written = super::data::write_chunk_rows(&mut tx, &part, None).await?;
            tx.commit().await?;
            self.staged.note_merged(part.len());
            self.staged
                .mid_rows
                .fetch_add(written as i64, Ordering::Relaxed);
            drop(writer);
            drop(guard);
            self.checkpointer.poke();
        }
        let mut writer = self.chunk_writer.lock().await;
        let conn = writer
            .as_mut()
            .ok_or_else(|| CatalogError::Invalid("the catalog is closed".into()))?;
        sqlx::query("DELETE FROM chunks_recent WHERE seq <= ?")
            .bind(upto)
            .execute(&mut *conn)
            .await?;
        self.staged.remove_upto(upto);
        drop(writer);
        self.checkpointer.poke();
        tracing::info!(
            rows = rows.len(),
            seconds = started.elapsed().as_secs_f64(),
            "merged staged chunk rows into chunks_mid"
        );
        Ok(rows.len() as u64)
    }

    /// Moves every row of `chunks_mid` into `chunks`, walking it in id
    /// order, [`MID_TXN_ROWS`] per transaction (each moves a range of ids:
    /// inserted into `chunks`, deleted from `chunks_mid`). Staged rows go on
    /// being merged between the transactions, so inserts do not wait for
    /// this walk; rows they put behind it stay for the next one. Returns the
    /// rows moved.
    async fn merge_mid_locked(&self) -> Result<u64> {
        let started = std::time::Instant::now();
        let mut moved = 0;
        let mut lo: Option<ChunkId> = None;
        let mut next = self.mid_ids_after(None).await?;
        let mut prefetch = (!next.is_empty()).then(|| self.prefetch_range(&next));
        while let Some(&hi) = next.last() {
            if self.staged.unmerged() >= self.staged.merge_at() {
                self.merge_staged_locked().await?;
            }
            let following = self.mid_ids_after(Some(&hi)).await?;
            if let Some(p) = prefetch.take() {
                let _ = p.await;
            }
            prefetch = (!following.is_empty()).then(|| self.prefetch_range(&following));
            moved += self.move_mid_range(lo.as_ref(), &hi).await?;
            lo = Some(hi);
            next = following;
        }
        if moved > 0 {
            tracing::info!(
                rows = moved,
                seconds = started.elapsed().as_secs_f64(),
                "merged chunks_mid into chunks"
            );
        }
        Ok(moved)
    }

    /// Up to [`MID_TXN_ROWS`] ids of `chunks_mid` after `after`, ascending
    /// (where the walk goes next and what to prefetch; the move takes the
    /// whole id range, including rows merged into it since).
    async fn mid_ids_after(&self, after: Option<&ChunkId>) -> Result<Vec<ChunkId>> {
        let rows: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT id FROM chunks_mid WHERE id > ? ORDER BY id LIMIT ?")
                .bind(after.map_or_else(Vec::new, |a| a.0.to_vec()))
                .bind(MID_TXN_ROWS as i64)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|b| ChunkId::from_slice(b).map_err(|e| CatalogError::Invalid(e.to_string())))
            .collect()
    }

    /// Moves the rows of `chunks_mid` with ids in (`lo`, `hi`] into `chunks`
    /// in ONE transaction; returns how many left `chunks_mid`. A chunk
    /// keeps its first location (`INSERT OR IGNORE`). Nothing is added to
    /// the chunk filter: a build reads both tables in one statement per
    /// page (`chunk_page`), so a row moving between them is streamed once
    /// whenever it moves.
    async fn move_mid_range(&self, lo: Option<&ChunkId>, hi: &ChunkId) -> Result<u64> {
        const RANGE: &str = "FROM chunks_mid WHERE id > ?1 AND id <= ?2";
        let lo = lo.map_or_else(Vec::new, |l| l.0.to_vec());
        let mut writer = self.chunk_writer.lock().await;
        let conn = writer
            .as_mut()
            .ok_or_else(|| CatalogError::Invalid("the catalog is closed".into()))?;
        let mut tx = sqlx::Connection::begin(conn).await?;
        sqlx::query(&format!(
            "INSERT OR IGNORE INTO chunks (id, pack_id, \"offset\", len, raw_len, base) \
             SELECT id, pack_id, \"offset\", len, raw_len, base {RANGE} ORDER BY id"
        ))
        .bind(&lo)
        .bind(&hi.0[..])
        .execute(&mut *tx)
        .await?;
        let n = sqlx::query(&format!("DELETE {RANGE}"))
            .bind(&lo)
            .bind(&hi.0[..])
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        self.staged.note_mid_deleted(n);
        drop(writer);
        self.checkpointer.poke();
        Ok(n)
    }

    /// Looks the ids of the next merge transaction up in `chunks_mid` on
    /// the pool's readers, [`LOOKUP_PARALLELISM`] statements at once: they
    /// are not there, but each lookup reads the leaf its insert will dirty,
    /// so the merge's writer finds the leaves in the OS page cache instead
    /// of reading them one at a time. Only a hint: errors are ignored.
    fn prefetch_ids(&self, ids: &[ChunkId]) -> tokio::task::JoinHandle<()> {
        let ids = ids.to_vec();
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let batches: Vec<Vec<ChunkId>> =
                ids.chunks(LOOKUP_BATCH).map(<[ChunkId]>::to_vec).collect();
            stream::iter(batches)
                .map(|b| {
                    let pool = pool.clone();
                    async move {
                        let sql = format!(
                            "SELECT COUNT(*) FROM chunks_mid WHERE id IN ({})",
                            vec!["?"; b.len()].join(", ")
                        );
                        let mut q = sqlx::query_scalar::<_, i64>(&sql);
                        for id in &b {
                            q = q.bind(&id.0[..]);
                        }
                        q.fetch_one(&pool).await
                    }
                })
                .buffer_unordered(LOOKUP_PARALLELISM)
                .for_each(|_| async {})
                .await;
        })
    }

    /// Reads the leaves of `chunks` that the ids `ids` (ascending) land in:
    /// their span, cut into [`LOOKUP_PARALLELISM`] ranges counted at once
    /// (at 80 M rows the table outgrows the page cache; a move's writer
    /// would read them one at a time). Only a hint: errors are ignored.
    fn prefetch_range(&self, ids: &[ChunkId]) -> tokio::task::JoinHandle<()> {
        let step = ids.len().div_ceil(LOOKUP_PARALLELISM).max(1);
        let spans: Vec<(ChunkId, ChunkId)> = ids
            .chunks(step)
            .filter_map(|c| Some((*c.first()?, *c.last()?)))
            .collect();
        let pool = self.pool.clone();
        tokio::spawn(async move {
            stream::iter(spans)
                .map(|(a, b)| {
                    let pool = pool.clone();
                    async move {
                        sqlx::query_scalar::<_, i64>(
                            "SELECT COUNT(*) FROM chunks WHERE id >= ? AND id <= ?",
                        )
                        .bind(&a.0[..])
                        .bind(&b.0[..])
                        .fetch_one(&pool)
                        .await
                    }
                })
                .buffer_unordered(LOOKUP_PARALLELISM)
                .for_each(|_| async {})
                .await;
        })
    }

    /// After an insert: starts a background merge once [`MERGE_AT`] rows
    /// are staged; at [`stage_max`], waits until the background merge has
    /// taken them (it merges staged rows between the transactions of a long
    /// walk of `chunks_mid` too) or merges them here, so the staged rows
    /// stay bounded whatever the insert rate.
    pub(crate) async fn after_staging(&self) -> Result<()> {
        let at = self.staged.merge_at();
        let staged = self.staged.unmerged();
        if staged >= stage_max(at) {
            while self.staged.unmerged() >= stage_max(at) {
                if let Ok(_merging) = self.staged.merging.try_lock() {
                    self.merge_staged_locked().await?;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        } else if staged >= at && self.staged.merging.try_lock().is_ok() {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.merge_background().await {
                    tracing::warn!(error = %e, "merging chunk rows failed; they stay where they are and are retried");
                }
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{test_catalog, NewPack};
    use tierback_format::pack::TocEntry;

    fn id(i: u32) -> ChunkId {
        ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    fn toc(ids: &[ChunkId]) -> Vec<TocEntry> {
        ids.iter()
            .enumerate()
            .map(|(k, id)| TocEntry {
                chunk_id: *id,
                offset: 64 + 1000 * k as u64,
                len: 900,
                raw_len: 4096,
            })
            .collect()
    }

    async fn insert(c: &Catalog, pack: u8, ids: &[ChunkId]) {
        c.insert_pack_with_chunks(
            &NewPack {
                id: PackId([pack; 16]),
                size: 1 << 20,
                created_at: 1,
            },
            &toc(ids),
        )
        .await
        .expect("insert");
    }

    async fn count(c: &Catalog, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&c.pool)
            .await
            .expect("count")
    }

    /// (staged, middle tier, merged) rows in SQL.
    async fn rows(c: &Catalog) -> (i64, i64, i64) {
        (
            count(c, "chunks_recent").await,
            count(c, "chunks_mid").await,
            count(c, "chunks").await,
        )
    }

    /// Every way of asking finds the row where it is: staged, merged, or
    /// reloaded from `chunks_recent` after a reopen.
    async fn assert_found(c: &Catalog, ids: &[ChunkId], pack: u8) {
        let mut ask = ids.to_vec();
        ask.push(id(999_999));
        let locs = c.lookup_chunks(&ask).await.expect("lookup");
        let present = c.contains_chunks(&ask).await.expect("contains");
        for (k, want) in ids.iter().enumerate() {
            let loc = locs[k].expect("located");
            assert_eq!(loc.pack_id, PackId([pack; 16]), "chunk {k}");
            assert_eq!(loc.offset, 64 + 1000 * k as u64);
            assert!(present[k]);
            assert_eq!(c.chunk_location(want).await.expect("one"), Some(loc));
        }
        assert_eq!(locs[ids.len()], None);
        assert!(!present[ids.len()]);
    }

    #[tokio::test]
    async fn staged_rows_are_found_before_and_after_their_merge_and_a_reopen() {
        let (dir, c) = test_catalog().await;
        let ids: Vec<ChunkId> = (0..300).map(id).collect();
        insert(&c, 1, &ids).await;
        assert_eq!(c.staged_chunks(), 300);
        assert_eq!(rows(&c).await, (300, 0, 0));
        assert_found(&c, &ids, 1).await;
        assert_eq!(c.store_totals().await.expect("totals").2, 300);

        // Reopen: the staged rows come back from chunks_recent.
        c.close().await;
        let c = Catalog::open(&dir.path().join("catalog.db"))
            .await
            .expect("reopen");
        assert_eq!(c.staged_chunks(), 300);
        assert_found(&c, &ids, 1).await;

        assert_eq!(c.merge_staged().await.expect("merge"), 300);
        assert_eq!(c.staged_chunks(), 0);
        assert_eq!(rows(&c).await, (0, 300, 0));
        assert_eq!(c.mid_chunks(), 300);
        assert_found(&c, &ids, 1).await;
        assert_eq!(c.store_totals().await.expect("totals").2, 300);
        assert_eq!(c.merge_staged().await.expect("nothing left"), 0);

        // The middle tier, moved into `chunks` in several transactions.
        assert_eq!(c.merge_all().await.expect("merge all"), (0, 300));
        assert_eq!(rows(&c).await, (0, 0, 300));
        assert_eq!(c.mid_chunks(), 0);
        assert_found(&c, &ids, 1).await;
        assert_eq!(c.store_totals().await.expect("totals").2, 300);

        // A chunk keeps its first location, staged or merged.
        let more: Vec<ChunkId> = (300..310).map(id).collect();
        insert(&c, 2, &more).await;
        insert(&c, 3, &[ids[0], more[0], id(310)]).await;
        assert_eq!(c.staged_chunks(), 11);
        assert_found(&c, &ids, 1).await;
        assert_found(&c, &more, 2).await;
        c.merge_staged().await.expect("merge");
        assert_found(&c, &ids, 1).await;
        assert_found(&c, &more, 2).await;
        // ... and in the middle tier.
        insert(&c, 4, &[ids[1], more[1], id(311)]).await;
        c.merge_staged().await.expect("merge");
        assert_found(&c, &more, 2).await;
        assert_eq!(rows(&c).await, (0, 12, 300));
        // Pack 3 holds only its one new chunk, but lists all three members.
        let p3 = c.pack_chunks(&PackId([3; 16])).await.expect("pack 3");
        assert_eq!(p3.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [id(310)]);
        assert_eq!(count(&c, "pack_members").await, 316);
    }

    #[tokio::test]
    async fn a_merge_cut_short_by_a_crash_is_redone_at_the_next_open() {
        let (dir, c) = test_catalog().await;
        let ids: Vec<ChunkId> = (0..200).map(id).collect();
        insert(&c, 1, &ids).await;
        // A crash after the first half's merge transaction committed, before
        // the staged copies were deleted.
        sqlx::query(
            "INSERT INTO chunks_mid (id, pack_id, \"offset\", len, raw_len, base) \
             SELECT id, pack_id, \"offset\", len, raw_len, base FROM chunks_recent \
             ORDER BY id LIMIT 100",
        )
        .execute(&c.pool)
        .await
        .expect("half a merge");
        c.close().await;
        let c = Catalog::open(&dir.path().join("catalog.db"))
            .await
            .expect("reopen");
        assert_eq!(rows(&c).await, (200, 100, 0));
        assert_eq!(c.mid_chunks(), 100);
        assert_found(&c, &ids, 1).await;
        assert_eq!(c.merge_staged().await.expect("merge"), 200);
        assert_eq!(rows(&c).await, (0, 200, 0));
        assert_eq!(c.mid_chunks(), 200);
        assert_found(&c, &ids, 1).await;
        // New rows after the reopen are numbered after the reloaded ones.
        insert(&c, 2, &[id(500)]).await;
        let seq: i64 = sqlx::query_scalar("SELECT seq FROM chunks_recent")
            .fetch_one(&c.pool)
            .await
            .expect("seq");
        assert!(seq > 200, "{seq}");
    }

    #[tokio::test]
    async fn merges_start_by_themselves_and_bound_the_staged_rows() {
        let (_d, c) = test_catalog().await;
        c.set_merge_at(100);
        c.set_mid_max(300);
        let mut all = Vec::new();
        for p in 0..20u8 {
            let ids: Vec<ChunkId> = (0..64).map(|k| id(u32::from(p) * 64 + k)).collect();
            insert(&c, p, &ids).await;
            // Inserts wait for a merge at 7/4 of the threshold.
            assert!(c.staged_chunks() < stage_max(100), "{}", c.staged_chunks());
            all.push(ids);
        }
        c.merge_staged().await.expect("merge");
        let (recent, mid, merged) = rows(&c).await;
        assert_eq!((recent, mid + merged), (0, 20 * 64));
        // The middle tier was merged into `chunks` by itself too.
        assert!(merged > 0, "{mid} {merged}");
        assert_eq!(c.mid_chunks(), mid as u64);
        for (p, ids) in all.iter().enumerate() {
            assert_found(&c, ids, p as u8).await;
        }
    }

    /// GC sees `base` named, and `delta` says so.
    async fn assert_delta_named(c: &Catalog, delta: &ChunkId, base: &ChunkId) {
        assert_eq!(c.delta_bases_page(None, 10).await.expect("bases"), [*base]);
        assert_eq!(
            c.chunk_location_and_base(delta)
                .await
                .expect("delta")
                .map(|d| d.1),
            Some(Some(*base))
        );
    }

    #[tokio::test]
    async fn gc_queries_see_staged_rows_of_a_pack_and_their_bases() {
        let (_d, c) = test_catalog().await;
        let (base, delta) = (id(1), id(2));
        insert(&c, 1, &[base]).await;
        c.merge_all().await.expect("merge");
        c.insert_pack_with_bases(
            &NewPack {
                id: PackId([2; 16]),
                size: 1 << 20,
                created_at: 1,
            },
            &toc(&[delta, id(3)]),
            &HashMap::from([(delta, base)]),
        )
        .await
        .expect("insert delta");
        // Staged: the base is named, the pack's rows are listed (merging
        // them first), then the pack is dropped with its rows and members.
        assert_delta_named(&c, &delta, &base).await;
        let rows = c.pack_chunks(&PackId([2; 16])).await.expect("pack 2");
        assert_eq!(rows.len(), 2);
        assert_eq!(c.staged_chunks(), 0);
        // Now in the middle tier: the same answers.
        assert_delta_named(&c, &delta, &base).await;
        assert_eq!(c.mid_chunks(), 2);
        assert_eq!(c.delete_pack(&PackId([2; 16])).await.expect("drop"), 2);
        assert_eq!(c.mid_chunks(), 0);
        assert_eq!(
            c.lookup_chunks(&[delta, id(3), base])
                .await
                .expect("lookup")[..2],
            [None, None]
        );
        assert_eq!(count(&c, "pack_members").await, 1);
        assert!(c
            .delta_bases_page(None, 10)
            .await
            .expect("bases")
            .is_empty());

        // A staged pack dropped directly is merged first, then dropped.
        insert(&c, 4, &[id(4), id(5)]).await;
        assert_eq!(c.delete_pack(&PackId([4; 16])).await.expect("drop"), 2);
        assert_eq!(c.staged_chunks(), 0);
        assert_eq!(c.chunk_location(&id(4)).await.expect("gone"), None);
    }

    #[tokio::test]
    async fn a_filter_build_streams_staged_and_merged_rows() {
        let (_d, c) = test_catalog().await;
        let merged: Vec<ChunkId> = (0..500).map(id).collect();
        let mid: Vec<ChunkId> = (500..800).map(id).collect();
        let staged: Vec<ChunkId> = (800..1000).map(id).collect();
        insert(&c, 1, &merged).await;
        c.merge_all().await.expect("merge");
        insert(&c, 3, &mid).await;
        c.merge_staged().await.expect("merge");
        insert(&c, 2, &staged).await;
        assert_eq!(rows(&c).await, (200, 300, 500));
        c.chunk_filter
            .build(&c.pool, &c.staged, Some(4096))
            .await
            .expect("build");
        assert_eq!(c.chunk_filter_status().last_build_rows, 1000);
        let f = c.chunk_filter.active().expect("filter");
        assert!(merged
            .iter()
            .chain(&mid)
            .chain(&staged)
            .all(|i| f.may_contain(i)));
        assert_found(&c, &staged, 2).await;
    }

    /// Rows moving between the three places while lookups run: every
    /// lookup finds every row, with its first location.
    #[tokio::test]
    async fn lookups_during_merges_find_every_row() {
        let (_d, c) = test_catalog().await;
        let mut all = Vec::new();
        for p in 0..8u8 {
            let ids: Vec<ChunkId> = (0..100).map(|k| id(u32::from(p) * 100 + k)).collect();
            insert(&c, p, &ids).await;
            // Packs 0-2 in `chunks`, 3-5 in `chunks_mid`, 6-7 staged.
            match p {
                2 => drop(c.merge_all().await.expect("merge all")),
                5 => drop(c.merge_staged().await.expect("merge")),
                _ => {}
            }
            all.push(ids);
        }
        assert_eq!(rows(&c).await, (200, 300, 300));
        let merging = {
            let c = c.clone();
            tokio::spawn(async move { c.merge_all().await })
        };
        let mut rounds = 0;
        loop {
            let done = merging.is_finished();
            for (p, ids) in all.iter().enumerate() {
                let locs = c.lookup_chunks(ids).await.expect("lookup");
                let present = c.contains_chunks(ids).await.expect("contains");
                for (k, loc) in locs.iter().enumerate() {
                    assert_eq!(loc.map(|l| l.pack_id), Some(PackId([p as u8; 16])));
                    assert!(present[k], "pack {p} chunk {k} missing");
                }
            }
            rounds += 1;
            if done {
                break;
            }
        }
        let (staged, moved) = merging.await.expect("join").expect("merge all");
        assert_eq!((staged, moved), (200, 500));
        assert_eq!(rows(&c).await, (0, 0, 800));
        assert!(rounds >= 1);
    }

    /// Merges add nothing to the active filter (its ids are there since
    /// their insert), so moving rows does not count towards its capacity.
    #[tokio::test]
    async fn merges_do_not_count_towards_the_filter_capacity() {
        let (_d, c) = test_catalog().await;
        let ids: Vec<ChunkId> = (0..500).map(id).collect();
        insert(&c, 1, &ids).await;
        let added = c.chunk_filter_status().added;
        assert!(added >= 500, "{added}");
        c.merge_all().await.expect("merge all");
        assert_eq!(rows(&c).await, (0, 0, 500));
        assert_eq!(c.chunk_filter_status().added, added);
        assert_found(&c, &ids, 1).await;
    }
}
