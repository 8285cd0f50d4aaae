//! In-memory membership filter of catalogued chunk ids, so that a dedup
//! lookup of a chunk the store has never seen ("new chunk", the common
//! answer of an incremental backup's first pass) never reaches SQLite.
//!
//! [`BlockedBloom`] is a split-block Bloom filter (the layout Parquet uses):
//! each id selects one 256-bit block and sets one bit in each of its eight
//! 32-bit lanes, so a probe touches one cache line. At 12 bits per entry the
//! false-positive rate is about 0.5 %; a false positive costs one SQL lookup,
//! never a wrong answer. It has no false negatives: every bit an id sets is
//! set before the transaction that catalogues the id commits.
//!
//! [`ChunkFilter`] keeps the catalog's filter in step with the `chunks`
//! table and must never let an answer become wrong:
//!
//! * Inserts (`insert_pack_with_chunks`) hold the `gate` shared from adding
//!   their ids to the filter until their transaction committed. A build
//!   registers its new filter under the gate held exclusively, then streams
//!   every id: a row committed before registration is streamed, a row
//!   inserted after it is added by its insert. The new filter replaces the
//!   active one under the gate as well, so no insert is split between them.
//! * Until the first build finished there is no active filter and lookups go
//!   to SQLite for every id (exact, only slower).
//! * Staged rows (`staging.rs`) are streamed after the table; a merge adds
//!   its ids under the gate like an insert.
//! * Deleted rows leave their bits set (stale positives cost a lookup). A
//!   filter that received more ids than it was sized for is rebuilt, twice as
//!   large, in the background; the old one keeps answering meanwhile.
//!
//! This module must never report an id absent that a committed row holds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt, TryStreamExt};
use sqlx::sqlite::SqlitePool;
use tierback_format::ids::ChunkId;

use super::data::{chunk_page, ChunkRange};
use super::staging::Staging;
use super::{CatalogError, Result};

/// Bits per expected entry of the catalog's filter (~0.5 % false positives).
pub const FILTER_BITS_PER_ENTRY: u64 = 12;
/// Smallest catalog filter (entries): 1 M entries, 1.5 MiB.
pub const FILTER_MIN_ENTRIES: u64 = 1 << 20;
/// Largest filter of any kind, in bytes (1 GiB = 700 M entries at 12 bits).
pub const FILTER_MAX_BYTES: u64 = 1 << 30;
/// Catalog files up to this size get their filter built inside
/// `Catalog::open` (well under a second); larger ones in the background.
pub const INLINE_BUILD_MAX_BYTES: u64 = 64 << 20;
/// Lower bound of catalog bytes per chunk row (the WITHOUT ROWID row plus
/// its `chunks_pack` entry; measured ~150, see docs/scale.md). Used to size
/// the filter from the file size before the rows are counted, so it errs
/// towards a larger filter.
const DB_BYTES_PER_CHUNK: u64 = 100;
/// Ids per keyset page while streaming the table (one short read
/// transaction each, so a build never pins the WAL for minutes).
const BUILD_PAGE: u32 = 50_000;
/// Id ranges streamed at once (queue depth for a cold file).
const BUILD_SHARDS: usize = 4;

const BLOCK_WORDS: usize = 4; // 256 bits as four u64 = eight u32 lanes
const SALT: [u32; 8] = [
    0x47b6_137b,
    0x4497_4d91,
    0x8824_ad5b,
    0xa2b7_289d,
    0x7054_95c7,
    0x2df1_424b,
    0x9efc_4947,
    0x5c6b_fb31,
];

fn mix(mut x: u64) -> u64 {
    // splitmix64's finaliser: chunk ids are keyed hashes already, but test
    // ids and other callers' keys need not be uniform.
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A split-block Bloom filter of chunk ids; lock-free (atomic words), so
/// inserts and probes may run from any number of threads.
pub struct BlockedBloom {
    words: Box<[AtomicU64]>,
    blocks: u64,
    seed: u64,
    capacity: u64,
    added: AtomicU64,
}

impl std::fmt::Debug for BlockedBloom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockedBloom")
            .field("bytes", &self.bytes())
            .field("capacity", &self.capacity)
            .field("added", &self.added())
            .finish()
    }
}

impl BlockedBloom {
    /// A filter of `bytes` (rounded to whole 32-byte blocks, at least one,
    /// at most [`FILTER_MAX_BYTES`]) planned for `capacity` entries.
    pub fn with_bytes(bytes: u64, capacity: u64, seed: u64) -> Self {
        let blocks = (bytes.min(FILTER_MAX_BYTES) / 32).max(1);
        let words = (0..blocks as usize * BLOCK_WORDS)
            .map(|_| AtomicU64::new(0))
            .collect();
        Self {
            words,
            blocks,
            seed,
            capacity,
            added: AtomicU64::new(0),
        }
    }

    /// A filter for `entries` ids at `bits_per_entry`.
    pub fn for_entries(entries: u64, bits_per_entry: u64, seed: u64) -> Self {
        let bytes = entries.saturating_mul(bits_per_entry) / 8;
        let f = Self::with_bytes(bytes, entries, seed);
        let capacity = (f.bytes() * 8 / bits_per_entry.max(1)).max(1);
        Self { capacity, ..f }
    }

    /// Bytes of the bit array.
    pub fn bytes(&self) -> u64 {
        self.blocks * 32
    }

    /// Entries it was sized for.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Inserts so far (repeated ids counted each time).
    pub fn added(&self) -> u64 {
        self.added.load(Ordering::Relaxed)
    }

    fn locate(&self, id: &ChunkId) -> (usize, [u64; BLOCK_WORDS]) {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&id.0[..8]);
        b.copy_from_slice(&id.0[8..16]);
        let h = mix(u64::from_le_bytes(a) ^ mix(u64::from_le_bytes(b) ^ self.seed));
        // Block from the high bits (multiply-shift range reduction), lanes
        // from the low 32.
        let block = ((u128::from(h) * u128::from(self.blocks)) >> 64) as usize;
        let key = h as u32;
        let mut masks = [0u64; BLOCK_WORDS];
        for (i, salt) in SALT.iter().enumerate() {
            let bit = key.wrapping_mul(*salt) >> 27;
            masks[i / 2] |= 1u64 << ((i % 2) * 32 + bit as usize);
        }
        (block * BLOCK_WORDS, masks)
    }

    /// Adds `id`.
    pub fn insert(&self, id: &ChunkId) {
        let (at, masks) = self.locate(id);
        for (w, m) in self.words[at..at + BLOCK_WORDS].iter().zip(masks) {
            // Skip the locked RMW when the bits are there already (dedup
            // hits re-insert often).
            if w.load(Ordering::Relaxed) & m != m {
                w.fetch_or(m, Ordering::Release);
            }
        }
        self.added.fetch_add(1, Ordering::Relaxed);
    }

    /// False only if `id` was never inserted.
    pub fn may_contain(&self, id: &ChunkId) -> bool {
        let (at, masks) = self.locate(id);
        self.words[at..at + BLOCK_WORDS]
            .iter()
            .zip(masks)
            .all(|(w, m)| w.load(Ordering::Acquire) & m == m)
    }
}

/// What the catalog's filter looks like now (for the benchmark and logs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChunkFilterStatus {
    /// Lookups use the filter (false until the first build finished).
    pub ready: bool,
    /// A build or rebuild is running.
    pub building: bool,
    /// Bytes of the active filter.
    pub bytes: u64,
    /// Entries the active filter was sized for.
    pub capacity: u64,
    /// Ids added to the active filter (streamed plus inserted since).
    pub added: u64,
    /// Rows streamed by the last finished build, and how long it took.
    pub last_build_rows: u64,
    pub last_build: Option<Duration>,
    /// Why the last build failed, if it did.
    pub last_error: Option<String>,
}

/// The catalog's filter and its build state (see the module docs).
#[derive(Default)]
pub(crate) struct ChunkFilter {
    active: RwLock<Option<Arc<BlockedBloom>>>,
    building: Mutex<Option<Arc<BlockedBloom>>>,
    /// Shared by inserts from filter update to commit; exclusive to swap
    /// filters.
    gate: tokio::sync::RwLock<()>,
    running: AtomicBool,
    last: Mutex<(u64, Option<Duration>, Option<String>)>,
    /// When the last build failed: no automatic retry for [`RETRY_AFTER`].
    failed_at: Mutex<Option<Instant>>,
}

/// Pause between a failed background build and the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(300);

impl std::fmt::Debug for ChunkFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkFilter({:?})", self.status())
    }
}

/// Held by an insert from adding its ids until its transaction ended.
pub(crate) struct InsertGuard<'a> {
    filter: &'a ChunkFilter,
    _gate: tokio::sync::RwLockReadGuard<'a, ()>,
}

impl InsertGuard<'_> {
    /// Adds `ids` to the active and the building filter.
    pub(crate) fn add<'b>(&self, ids: impl IntoIterator<Item = &'b ChunkId>) {
        let (a, b) = (self.filter.active(), self.filter.building());
        for id in ids {
            if let Some(f) = &a {
                f.insert(id);
            }
            if let Some(f) = &b {
                f.insert(id);
            }
        }
    }

    /// Adds the ids of rows a merge moves between tables to the building
    /// filter only: the active one has every catalogued id already (from
    /// its build or its insert), and adding them again would count them
    /// twice towards its capacity and rebuild it early.
    pub(crate) fn add_moved<'b>(&self, ids: impl IntoIterator<Item = &'b ChunkId>) {
        if let Some(f) = self.filter.building() {
            ids.into_iter().for_each(|id| f.insert(id));
        }
    }
}

impl ChunkFilter {
    /// The filter lookups may trust, if built.
    pub(crate) fn active(&self) -> Option<Arc<BlockedBloom>> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn building(&self) -> Option<Arc<BlockedBloom>> {
        self.building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Call before inserting rows, [`InsertGuard::add`] their ids, and keep
    /// the guard until the transaction has committed or rolled back.
    pub(crate) async fn insert_guard(&self) -> InsertGuard<'_> {
        InsertGuard {
            filter: self,
            _gate: self.gate.read().await,
        }
    }

    pub(crate) fn status(&self) -> ChunkFilterStatus {
        let a = self.active();
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ChunkFilterStatus {
            ready: a.is_some(),
            building: self.running.load(Ordering::Acquire),
            bytes: a.as_ref().map_or(0, |f| f.bytes()),
            capacity: a.as_ref().map_or(0, |f| f.capacity()),
            added: a.as_ref().map_or(0, |f| f.added()),
            last_build_rows: last.0,
            last_build: last.1,
            last_error: last.2,
        }
    }

    /// True when there is no filter yet or the active one is over capacity,
    /// and no build runs: the caller should start one.
    fn needs_build(&self) -> bool {
        let failed_recently = self
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < RETRY_AFTER);
        !failed_recently
            && !self.running.load(Ordering::Acquire)
            && self.active().is_none_or(|f| f.added() > f.capacity())
    }

    /// Starts a background (re)build if one is needed and none runs.
    pub(crate) fn maybe_rebuild(self: &Arc<Self>, pool: &SqlitePool, staged: &Arc<Staging>) {
        if !self.needs_build() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (me, pool, staged) = (self.clone(), pool.clone(), staged.clone());
        handle.spawn(async move {
            match me.build(&pool, &staged, None).await {
                // The catalog was closed during the build (shutdown).
                Err(_) if pool.is_closed() => {
                    tracing::debug!("chunk filter build stopped: the catalog was closed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "building the chunk filter failed; dedup lookups use SQL only");
                }
                Ok(()) => {}
            }
        });
    }

    /// Builds a filter from every row of `chunks` and `chunks_mid` and every
    /// staged row, and
    /// makes it active.
    /// `entries` sizes it (default: from the file size or twice the active
    /// filter's inserts, whichever is larger). Returns without doing
    /// anything if another build runs.
    pub(crate) async fn build(
        &self,
        pool: &SqlitePool,
        staged: &Staging,
        entries: Option<u64>,
    ) -> Result<()> {
        if self
            .running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(());
        }
        let r = self.build_running(pool, staged, entries).await;
        if let Err(e) = &r {
            *self.building.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.last.lock().unwrap_or_else(|p| p.into_inner()).2 = Some(e.to_string());
            *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        self.running.store(false, Ordering::Release);
        r
    }

    async fn build_running(
        &self,
        pool: &SqlitePool,
        staged: &Staging,
        entries: Option<u64>,
    ) -> Result<()> {
        let started = Instant::now();
        let entries = match entries {
            Some(n) => n,
            None => {
                let from_file = estimate_rows(pool).await?;
                let from_active = self.active().map_or(0, |f| f.added().saturating_mul(2));
                from_file.max(from_active).max(FILTER_MIN_ENTRIES)
            }
        };
        let new = Arc::new(BlockedBloom::for_entries(
            entries,
            FILTER_BITS_PER_ENTRY,
            rand::random(),
        ));
        {
            let _gate = self.gate.write().await;
            *self.building.lock().unwrap_or_else(|p| p.into_inner()) = Some(new.clone());
        }
        let shards = ChunkRange::split(BUILD_SHARDS);
        let rows: u64 = stream::iter(shards)
            .map(|range| {
                let (pool, new) = (pool.clone(), new.clone());
                async move {
                    let mut rows = 0u64;
                    let mut after: Option<ChunkId> = None;
                    loop {
                        let page = chunk_page(&pool, range, after.as_ref(), BUILD_PAGE).await?;
                        page.iter().for_each(|(id, _, _)| new.insert(id));
                        rows += page.len() as u64;
                        if page.len() < BUILD_PAGE as usize {
                            return Ok::<u64, CatalogError>(rows);
                        }
                        after = page.last().map(|(id, _, _)| *id);
                    }
                }
            })
            .buffer_unordered(BUILD_SHARDS)
            .try_fold(0, |sum, n| async move { Ok(sum + n) })
            .await?;
        // Staged rows after the table: a row merged meanwhile was added by
        // its merge (which holds the gate like an insert), so none is missed.
        let staged = staged.ids();
        staged.iter().for_each(|id| new.insert(id));
        let rows = rows + staged.len() as u64;
        {
            let _gate = self.gate.write().await;
            *self.active.write().unwrap_or_else(|p| p.into_inner()) = Some(new.clone());
            *self.building.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        let took = started.elapsed();
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = (rows, Some(took), None);
        tracing::info!(
            rows,
            bytes = new.bytes(),
            seconds = took.as_secs_f64(),
            "chunk filter built"
        );
        Ok(())
    }
}

/// Size of the catalog file in bytes (pages in use and free).
pub(crate) async fn db_bytes(pool: &SqlitePool) -> Result<u64> {
    let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(pool)
        .await?;
    let size: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(pages.saturating_mul(size)).unwrap_or(0))
}

/// An upper estimate of the rows of `chunks` without scanning it.
async fn estimate_rows(pool: &SqlitePool) -> Result<u64> {
    Ok(db_bytes(pool).await? / DB_BYTES_PER_CHUNK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(seed: u32, n: u32) -> Vec<ChunkId> {
        (0..n)
            .map(|i| {
                let mut k = seed.to_le_bytes().to_vec();
                k.extend_from_slice(&i.to_le_bytes());
                ChunkId(*blake3::hash(&k).as_bytes())
            })
            .collect()
    }

    #[test]
    fn no_false_negatives() {
        let f = BlockedBloom::for_entries(200_000, 12, 7);
        let inserted = ids(1, 200_000);
        for id in &inserted {
            f.insert(id);
        }
        assert!(inserted.iter().all(|id| f.may_contain(id)));
        assert_eq!(f.added(), 200_000);
        // Non-uniform ids (tests use [b; 32]) are mixed, not trusted.
        let g = BlockedBloom::for_entries(1000, 12, 0);
        for b in 0..=255u8 {
            g.insert(&ChunkId([b; 32]));
        }
        assert!((0..=255u8).all(|b| g.may_contain(&ChunkId([b; 32]))));
    }

    #[test]
    fn false_positive_rate_is_within_bounds() {
        for (bits, max) in [(10u64, 0.016), (12, 0.0075), (16, 0.002)] {
            let n = 100_000;
            let f = BlockedBloom::for_entries(n, bits, 99);
            for id in ids(2, n as u32) {
                f.insert(&id);
            }
            let probes = ids(3, 200_000);
            let fp = probes.iter().filter(|id| f.may_contain(id)).count();
            let rate = fp as f64 / probes.len() as f64;
            assert!(rate < max, "{bits} bits/entry: {rate}");
            assert!(rate > 0.0, "{bits} bits/entry: suspiciously perfect");
        }
    }

    #[test]
    fn sizes_are_bounded() {
        let f = BlockedBloom::for_entries(0, 12, 0);
        assert_eq!(f.bytes(), 32);
        assert!(!f.may_contain(&ChunkId([1; 32])));
        let f = BlockedBloom::for_entries(1 << 20, 12, 0);
        assert_eq!(f.bytes(), (1 << 20) * 12 / 8);
        assert_eq!(f.capacity(), 1 << 20);
    }

    #[test]
    fn concurrent_inserts_are_all_seen() {
        let f = Arc::new(BlockedBloom::for_entries(50_000, 12, 5));
        let sets: Vec<Vec<ChunkId>> = (0..4).map(|s| ids(10 + s, 10_000)).collect();
        std::thread::scope(|s| {
            for set in &sets {
                let f = f.clone();
                s.spawn(move || set.iter().for_each(|id| f.insert(id)));
            }
        });
        assert!(sets.iter().flatten().all(|id| f.may_contain(id)));
    }
}
