//! The local chunk store: the gateway's encrypted, deduplicated disk tier.
//!
//! It owns the files under the data dir (`packs/<2 hex>/<pack id>.pack`,
//! `indexes/<point id>/<stream_no>.idx`) and the `packs`/`chunks` rows of the
//! catalog. It receives verified plaintext chunks, seals them (zstd, then
//! AES-256-GCM under a per-pack key) into ONE open pack at a time, seals full
//! packs durably, and serves chunks and indexes back. It never commits
//! recovery points (the API does, after `flush` and `write_index`). Packs and
//! chunks are deleted only by GC (`gc.rs`), which never removes a chunk a
//! committed point or a running backup may reference.
//!
//! # Write ordering (DESIGN.md §6)
//!
//! * A pack file is written as `<id>.pack.<rand>.tmp`, fsynced, renamed, and
//!   its directory fsynced; only THEN are the pack and its chunks recorded in
//!   the catalog, in one transaction. A chunk is "durable" exactly when it has
//!   a catalog row ([`ChunkStore::missing`] answers from the catalog only).
//!   That transaction commits with `synchronous = NORMAL` (the catalog's
//!   chunk writer): a power loss may take the row back, but only together
//!   with every later commit, so never from under a committed point (whose
//!   `FULL` commit fsyncs the WAL up to itself); see `Catalog::open`.
//! * [`ChunkStore::flush`] returns only when every chunk put before it is
//!   durable and catalogued (rule 1); indexes are written the same way by
//!   [`ChunkStore::write_index`] before the point is committed (rule 2).
//! * A crash leaves at most `*.tmp` files (removed by [`ChunkStore::open`]) or
//!   a renamed but uncatalogued pack (invisible; garbage for GC). Its chunks
//!   are reported lacking again, so agents resend them.
//!
//! # Concurrency
//!
//! | operation | runs concurrently with | protected by |
//! |---|---|---|
//! | `put` hashing, zstd, AES-GCM | everything | nothing: blocking threads, outside locks |
//! | `put` dedup decision | other puts | `state` (claims: one put per chunk id at a time) |
//! | `put` append to the open pack | other puts | `state` (a short, non-async critical section) |
//! | sealing a pack (rotation or `flush`) | puts (into the next open pack), reads | `seal_lock` (one seal at a time, FIFO) |
//! | `get`, `read_index`, `verify` | everything | nothing: sealed packs and indexes are immutable; a read whose pack GC just replaced looks the chunk up again |
//! | dedup answers (`lacking`, `put` duplicate, `missing`, `write_index` check) | each other | `sweep` shared, plus a touch (see `gc.rs`) |
//! | a GC catalog transaction (drop / move a pack) | puts, reads | `sweep` exclusive; one GC at a time (`gc_running`) |
//!
//! A chunk is "pending" from its claim until its pack is catalogued: it sits
//! in `claims`, then in the open pack, then in the sealing pack. Pending
//! chunks count as present for `lacking` and `put` dedup, so a chunk lives in
//! exactly one local pack. A pack that fails to seal (e.g. disk full) stays in
//! the sealing slot in memory and is retried by the next seal; until it
//! succeeds, puts that would need a new seal fail with
//! [`StoreError::DiskFull`] and nothing already accepted is dropped.

mod files;
mod gc;
mod verify;

#[cfg(test)]
mod gc_tests;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tierback_format::crypto::{self, MasterKey};
use tierback_format::ids::{ChunkHash, ChunkId, PackId, PointId};
use tierback_format::index::{self as fmt_index, DiskIndex};
use tierback_format::magic::MAX_CHUNK_SIZE;
use tierback_format::pack::{PackWriter, TocEntry};

use crate::catalog::{now_secs, Catalog, CatalogError, ChunkLocation, NewPack};
use files::{Faults, HandleCache, Layout};

pub use gc::{GcOptions, GcPermit, GcReport, WriterGuard, DEFAULT_COMPACT_BELOW_PERCENT};
pub use verify::{DamagedChunk, VerifyReport};

/// Tunables of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// A pack is sealed once it reaches this many bytes (default 64 MiB).
    pub pack_target_size: u64,
    /// zstd level for chunk payloads (default 1).
    pub zstd_level: i32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            pack_target_size: 64 << 20,
            zstd_level: 1,
        }
    }
}

/// The keys the store needs, derived once from the master key.
#[derive(Clone)]
pub struct Keys {
    /// The master key (pack keys are derived per pack).
    pub master: MasterKey,
    /// Key of the keyed chunk-id hash.
    pub id_key: [u8; 32],
    /// Key sealing disk indexes.
    pub index_key: [u8; 32],
}

impl Keys {
    /// Derives the id and index keys from `master`.
    pub fn derive(master: &MasterKey) -> Keys {
        Keys {
            master: master.clone(),
            id_key: master.id_key(),
            index_key: master.index_key(),
        }
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys(fingerprint {})", self.master.fingerprint())
    }
}

/// What `put` did with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Appended to the open pack; `stored_bytes` is its sealed size on disk.
    Stored {
        /// Bytes of the sealed record.
        stored_bytes: u64,
    },
    /// Already stored or pending; nothing appended.
    Duplicate,
    /// A patch ([`ChunkStore::put_patch`]) not stored: its base is gone or
    /// the chunk it rebuilds does not match the hash. Send the chunk whole.
    Refused,
}

/// Errors of the chunk store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data does not hash to the hash it was sent with; nothing stored.
    #[error(
        "chunk data does not match its hash {expected} (it hashes to {actual}); nothing was stored"
    )]
    HashMismatch {
        /// Hash the sender claimed.
        expected: ChunkHash,
        /// Hash of the data received.
        actual: ChunkHash,
    },
    /// Larger than any chunk may be.
    #[error("chunk of {len} bytes exceeds the {max}-byte maximum")]
    TooLarge {
        /// Bytes received.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No durable chunk with this id.
    #[error("chunk {0} is not in the local store")]
    NotFound(ChunkId),
    /// A pack on disk does not hold what the catalog says (damage, tampering,
    /// truncation, missing file).
    #[error("pack {pack} is damaged at offset {offset}: {reason}")]
    Corrupt {
        /// The pack.
        pack: PackId,
        /// Offset of the damaged record.
        offset: u64,
        /// What failed.
        reason: String,
    },
    /// No index file for this stream of this point.
    #[error("recovery point {point} has no index for stream {stream_no}")]
    IndexNotFound {
        /// The point.
        point: PointId,
        /// The stream.
        stream_no: u32,
    },
    /// An index exists but does not open or decode.
    #[error("index of stream {stream_no} of recovery point {point} is damaged: {reason}")]
    BadIndex {
        /// The point.
        point: PointId,
        /// The stream.
        stream_no: u32,
        /// What failed.
        reason: String,
    },
    /// An index to write violates the index invariants (order, bounds).
    #[error("refusing to write an invalid index: {0}")]
    InvalidIndex(#[source] fmt_index::IndexError),
    /// `verify` was asked about a point that is not committed.
    #[error("no recovery point {0}")]
    PointNotFound(PointId),
    /// The local store's disk (or quota) is full. The write was undone; data
    /// accepted earlier stays pending in memory and is retried by the next
    /// seal or flush.
    #[error("local store disk is full while writing {what}: free space or add capacity; nothing was lost")]
    DiskFull {
        /// What was being written, e.g. `pack 0a1b…`.
        what: String,
    },
    /// Any other I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, as a verb phrase.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An index to write names chunks the store does not hold (never
    /// received, or removed by GC before the backup referenced them).
    #[error("{count} chunk(s) named by the index are not in the store (never received, or removed by GC); send them and commit again")]
    ChunksMissing {
        /// How many.
        count: usize,
    },
    /// Another GC (or prune) is running.
    #[error("GC already running")]
    GcRunning,
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A blocking task panicked or was cancelled.
    #[error("internal error in the chunk store: {0}")]
    Internal(String),
}

impl StoreError {
    /// True for errors that mean "this thing does not exist".
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::NotFound(_) | Self::IndexNotFound { .. } | Self::PointNotFound(_)
        )
    }

    /// True when the local disk is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::DiskFull { .. })
    }

    fn write(what: String, e: io::Error) -> Self {
        if files::is_disk_full(&e) {
            Self::DiskFull { what }
        } else {
            Self::Io {
                context: format!("writing {what}"),
                source: e,
            }
        }
    }
}

/// How [`Shared::decode_payload`] treats a delta payload.
#[derive(Clone, Copy)]
enum DeltaBase<'a> {
    /// Refused: a base is never itself a delta.
    Refuse,
    /// Decoded against its base, read through the catalog.
    Read,
    /// Decoded only against this base (id, plaintext), already read.
    Known(&'a ChunkId, &'a [u8]),
}

/// The pack currently accepting appends. Its records go to a `*.tmp` file
/// beside its final path as they come (memory holds the TOC entries and the
/// records not written yet: see [`files::PackAppender`]), whatever the pack
/// size.
struct OpenPack {
    builder: PackFile,
    key: [u8; 32],
    ids: HashSet<ChunkId>,
    /// Chunks of this pack stored as deltas, with their bases.
    bases: HashMap<ChunkId, ChunkId>,
}

/// A pack taken out of `open` to be sealed: its `*.tmp` file holds header and
/// records up to `held.0`, the rest of its records are `held.1`; kept until
/// the file is sealed, renamed and catalogued (and across failed attempts,
/// which rewrite the tail).
struct SealingPack {
    id: PackId,
    key: [u8; 32],
    tmp: PathBuf,
    held: (u64, Arc<Vec<u8>>),
    entries: Arc<Vec<TocEntry>>,
    bases: Arc<HashMap<ChunkId, ChunkId>>,
    ids: HashSet<ChunkId>,
}

/// The file of the open pack, created at the first append.
struct PackFile {
    id: PackId,
    tmp: PathBuf,
    w: Option<PackWriter<files::PackAppender>>,
    shared: Arc<Shared>,
}

impl PackFile {
    fn new(shared: &Arc<Shared>, id: PackId) -> PackFile {
        let path = shared.layout.pack_path(&id);
        let tmp = path.with_extension(format!(
            "pack.{:016x}{}",
            rand::random::<u64>(),
            files::TMP_SUFFIX
        ));
        PackFile {
            id,
            tmp,
            w: None,
            shared: shared.clone(),
        }
    }

    fn id(&self) -> &PackId {
        &self.id
    }

    fn len(&self) -> u64 {
        self.w.as_ref().map_or(0, |w| w.len())
    }

    fn is_empty(&self) -> bool {
        self.w.as_ref().is_none_or(|w| w.is_empty())
    }

    /// Appends a sealed record (see [`PackWriter::append`]). Records before
    /// it are written out first; a failed write (disk full) fails this
    /// append and keeps the pack a valid prefix.
    fn append(&mut self, chunk_id: ChunkId, sealed: &[u8], raw_len: u32) -> io::Result<(u64, u32)> {
        if self.w.is_none() {
            if let Some(dir) = self.tmp.parent() {
                files::ensure_dir(dir)?;
            }
            let f = files::PackAppender::create(&self.tmp, self.shared.handles.direct_ok())?;
            self.w = Some(PackWriter::new(f, self.id)?);
        }
        let w = self
            .w
            .as_mut()
            .ok_or_else(|| io::Error::other("pack file not open"))?;
        w.get_mut().write_out()?;
        let end = w.len();
        let r = match self.shared.faults.mid_write() {
            // Test-only: a write that stops halfway, as on a full disk.
            Err(e) => {
                use std::io::Write;
                w.get_mut()
                    .write_all(&sealed[..sealed.len() / 2])
                    .and(Err(e))
            }
            Ok(()) => w.append(chunk_id, sealed, raw_len),
        };
        if r.is_err() {
            w.get_mut().cut_back(end)?;
        }
        r
    }
}

#[derive(Default)]
struct State {
    open: Option<OpenPack>,
    sealing: Option<SealingPack>,
    claims: HashSet<ChunkId>,
    /// While GC runs: packs catalogued since it started (never candidates).
    gc_new_packs: Option<HashSet<PackId>>,
}

/// What sealing one pack needs, cloned out of [`SealingPack`].
struct SealJob {
    id: PackId,
    key: [u8; 32],
    tmp: PathBuf,
    held: (u64, Arc<Vec<u8>>),
    entries: Arc<Vec<TocEntry>>,
    bases: Arc<HashMap<ChunkId, ChunkId>>,
}

impl SealingPack {
    fn job(&self) -> SealJob {
        SealJob {
            id: self.id,
            key: self.key,
            tmp: self.tmp.clone(),
            held: self.held.clone(),
            entries: self.entries.clone(),
            bases: self.bases.clone(),
        }
    }
}

impl State {
    fn is_pending(&self, id: &ChunkId) -> bool {
        self.claims.contains(id)
            || self.open.as_ref().is_some_and(|o| o.ids.contains(id))
            || self.sealing.as_ref().is_some_and(|s| s.ids.contains(id))
    }
}

/// Everything blocking tasks need, shared by `Arc`.
struct Shared {
    layout: Layout,
    keys: Keys,
    handles: HandleCache,
    faults: Faults,
    /// For the base of a delta chunk, looked up from blocking threads.
    catalog: Catalog,
}

/// The local chunk store. `Send + Sync`: share it by `Arc` between sessions.
pub struct ChunkStore {
    shared: Arc<Shared>,
    catalog: Catalog,
    cfg: StoreConfig,
    state: Mutex<State>,
    seal_lock: tokio::sync::Mutex<()>,
    /// Chunk references of running backups, for GC.
    touches: Arc<gc::TouchLog>,
    /// Shared by dedup answers, exclusive for GC's catalog transactions.
    sweep: tokio::sync::RwLock<()>,
    /// Held by the one running GC.
    gc_running: Arc<tokio::sync::Mutex<()>>,
    /// Permits for CPU-bound work of `put` (hash check, zstd, AES-GCM): see
    /// [`cpu_permits`].
    cpu: tokio::sync::Semaphore,
}

/// Permits for the CPU-bound steps of `put`: one more than the cores, so a
/// core finishing a chunk finds the next one already waiting on a thread
/// instead of idling while a task is woken to take the permit; uploads
/// still queue instead of thrashing. With one per core a full backup kept
/// 1.63–1.64 of the 2 cores here busy, with one more 1.78–1.84
/// (docs/benchmarks.md).
fn cpu_permits() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) + 1
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChunkStore>();
};

/// Removes a put's claim on a chunk id when the put ends, however it ends
/// (error, duplicate, or its future being dropped).
struct Claim<'a> {
    store: &'a ChunkStore,
    id: ChunkId,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.store.state().claims.remove(&self.id);
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))
}

impl ChunkStore {
    /// Opens the store under `data_dir`, creating `packs/` and `indexes/` if
    /// needed and removing crash garbage (`*.tmp`).
    pub async fn open(
        data_dir: &Path,
        keys: Keys,
        catalog: Catalog,
        cfg: StoreConfig,
    ) -> Result<Self, StoreError> {
        let layout = Layout::new(data_dir);
        let prep = layout.clone();
        let removed = blocking(move || prep.prepare())
            .await?
            .map_err(|e| StoreError::Io {
                context: format!("preparing the store in {}", data_dir.display()),
                source: e,
            })?;
        if removed > 0 {
            tracing::info!(
                files = removed,
                "removed unfinished files of an interrupted run"
            );
        }
        Ok(Self {
            shared: Arc::new(Shared {
                layout,
                keys,
                handles: HandleCache::default(),
                faults: Faults::default(),
                catalog: catalog.clone(),
            }),
            catalog,
            cfg,
            state: Mutex::new(State::default()),
            seal_lock: tokio::sync::Mutex::new(()),
            touches: Arc::default(),
            sweep: tokio::sync::RwLock::new(()),
            gc_running: Arc::default(),
            cpu: tokio::sync::Semaphore::new(cpu_permits()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is consistent at every unlock (no panics inside), so a
        // poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Path of a pack file (for tiering and tests).
    pub fn pack_path(&self, id: &PackId) -> PathBuf {
        self.shared.layout.pack_path(id)
    }

    /// Path of an index file.
    pub fn index_path(&self, point: &PointId, stream_no: u32) -> PathBuf {
        self.shared.layout.index_path(point, stream_no)
    }

    /// The stored id of a chunk with plaintext hash `hash`.
    pub fn chunk_id(&self, hash: &ChunkHash) -> ChunkId {
        ChunkId::derive(&self.shared.keys.id_key, hash)
    }

    /// For each hash: true if the store lacks it (neither catalogued nor
    /// pending), and only at its first position among `hashes`. Pending
    /// sets are consulted before the catalog, and a sealed
    /// pack leaves the pending sets only after its catalog commit, so a chunk
    /// is never reported lacking while it is on its way to durability.
    pub async fn lacking(&self, hashes: &[ChunkHash]) -> Result<Vec<bool>, StoreError> {
        let ids: Vec<ChunkId> = hashes.iter().map(|h| self.chunk_id(h)).collect();
        // A chunk asked about twice is lacking once, at its first position
        // (the catalog is asked once): a disk holding the same content at
        // several chunk offsets sends it once, and the gateway does not hash
        // and compress the copies.
        let mut seen = HashSet::with_capacity(ids.len());
        let mut lacking: Vec<bool> = {
            let st = self.state();
            ids.iter()
                .map(|id| seen.insert(*id) && !st.is_pending(id))
                .collect()
        };
        let (pos, ask): (Vec<usize>, Vec<ChunkId>) = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| lacking[*i])
            .map(|(i, id)| (i, *id))
            .unzip();
        // Lookup and touch under the sweep lock: GC either sees the touch or
        // has already removed the row (then the chunk is reported lacking).
        let _sweep = self.sweep.read().await;
        let found = self.catalog.contains_chunks(&ask).await?;
        for (i, present) in pos.into_iter().zip(found) {
            lacking[i] = !present;
        }
        self.touches.touch(
            ids.iter()
                .zip(&lacking)
                .filter(|(_, l)| !**l)
                .map(|(id, _)| id),
        );
        Ok(lacking)
    }

    /// Verifies `blake3(data) == hash` (else `HashMismatch`, nothing stored),
    /// compresses and seals on blocking threads, and appends to the open pack,
    /// sealing the previous one first if it reached the target size. A chunk
    /// already stored or pending is dropped (`Duplicate`).
    pub async fn put(&self, hash: ChunkHash, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.put_with_base(hash, data, None).await
    }

    /// [`Self::put`] with a base hint: the plaintext hash of the chunk the
    /// same place of the disk held in the previous point. If that chunk is
    /// stored (or, when it is a delta itself, its base), the new chunk is
    /// stored as a zstd delta against it (codec `0x02`, docs/formats.md),
    /// when that is smaller. The hint never changes what is stored, only
    /// how: an absent or unreadable base just means a plain chunk.
    pub async fn put_with_base(
        &self,
        hash: ChunkHash,
        data: Bytes,
        base: Option<ChunkHash>,
    ) -> Result<PutOutcome, StoreError> {
        if data.len() > MAX_CHUNK_SIZE {
            return Err(StoreError::TooLarge {
                len: data.len(),
                max: MAX_CHUNK_SIZE,
            });
        }
        if base.is_none() {
            return self.put_plain(hash, data).await;
        }
        let permit = self.cpu_permit().await?;
        let (actual, data) = blocking(move || (ChunkHash::of(&data), data)).await?;
        drop(permit);
        if actual != hash {
            return Err(StoreError::HashMismatch {
                expected: hash,
                actual,
            });
        }
        let id = self.chunk_id(&hash);
        let Some((_claim, base)) = self.claim_new(id, base.as_ref()).await? else {
            return Ok(PutOutcome::Duplicate);
        };
        // A base that cannot be read (moved by GC, damaged) just means a
        // plain chunk; verify reports damage. Read outside the CPU permit:
        // a cold read leaves the core to others.
        let base = match base {
            Some((bid, loc)) => {
                let shared = self.shared.clone();
                blocking(move || shared.read_base(&bid, Some(loc)))
                    .await?
                    .ok()
                    .map(|b| (bid, b))
            }
            None => None,
        };
        self.store_new(id, data, base).await
    }

    /// Stores chunk `hash` from a patch of the chunk `base` (the patch
    /// record's data, [`tierback_format::wire::apply_chunk_patch`]): the
    /// base's plaintext is read, the patch applied and the result checked
    /// against `hash`, then stored as a delta against the base like
    /// [`ChunkStore::put_with_base`]. [`PutOutcome::Refused`] when the base
    /// is not stored or unreadable, the patch does not apply or the result
    /// does not match: nothing is stored and the agent sends the chunk whole.
    pub async fn put_patch(
        &self,
        hash: ChunkHash,
        base: ChunkHash,
        patch: Bytes,
    ) -> Result<PutOutcome, StoreError> {
        let id = self.chunk_id(&hash);
        let Some((_claim, root)) = self.claim_new(id, Some(&base)).await? else {
            return Ok(PutOutcome::Duplicate);
        };
        let Some((rid, loc)) = root else {
            return Ok(PutOutcome::Refused);
        };
        // The patch is of the hinted chunk; when that is itself a delta, it
        // is decoded against the root, read once for both.
        let hinted = self.chunk_id(&base);
        let hinted_at = if rid == hinted {
            None
        } else {
            match self.catalog.chunk_location(&hinted).await? {
                Some(loc) => Some(loc),
                None => return Ok(PutOutcome::Refused),
            }
        };
        let shared = self.shared.clone();
        let read = blocking(move || -> Result<_, StoreError> {
            let root_plain = shared.read_base(&rid, Some(loc))?;
            let old = hinted_at
                .map(|hloc| shared.read_against(&hinted, &hloc, (&rid, &root_plain)))
                .transpose()?;
            Ok((old, root_plain))
        })
        .await?;
        let Ok((old, root_plain)) = read else {
            return Ok(PutOutcome::Refused);
        };
        let permit = self.cpu_permit().await?;
        let (rebuilt, root_plain) = blocking(move || {
            let old = old.as_deref().unwrap_or(&root_plain);
            let rebuilt = tierback_format::wire::apply_chunk_patch(old, &patch)
                .ok()
                .filter(|d| ChunkHash::of(d) == hash);
            (rebuilt, root_plain)
        })
        .await?;
        drop(permit);
        let Some(data) = rebuilt else {
            tracing::debug!(chunk = %id, "patch refused: it does not rebuild its chunk");
            return Ok(PutOutcome::Refused);
        };
        self.store_new(id, Bytes::from(data), Some((rid, root_plain)))
            .await
    }

    /// [`Self::put`] without a base hint, in one hop to a blocking thread:
    /// the hash check and, when it holds, zstd and AES-GCM for the open
    /// pack, while the chunk is still in that core's cache. The claim is
    /// taken after the check, as in [`Self::put_with_base`], so a chunk
    /// that does not match its hash never holds one; a chunk that turns out
    /// to be a duplicate only costs the compression done for nothing (the
    /// agent sends only what the gateway said it lacks, so that is rare).
    async fn put_plain(&self, hash: ChunkHash, data: Bytes) -> Result<PutOutcome, StoreError> {
        let level = self.cfg.zstd_level;
        let raw_len = data.len() as u32;
        let id = self.chunk_id(&hash);
        if self.open_is_full() {
            self.seal_pending(SealMode::IfFull).await?;
        }
        let (pack_id, key) = self.open_pack_id();
        let permit = self.cpu_permit().await?;
        let (actual, sealed) = blocking(move || {
            let actual = ChunkHash::of(&data);
            let sealed = (actual == hash).then(|| {
                let buf = crypto::encode_chunk_for_seal(&data, level);
                crypto::seal_chunk_in_place(&key, &pack_id, &id, buf)
            });
            (actual, sealed)
        })
        .await?;
        drop(permit);
        let Some(sealed) = sealed else {
            return Err(StoreError::HashMismatch {
                expected: hash,
                actual,
            });
        };
        let Some((_claim, _)) = self.claim_new(id, None).await? else {
            return Ok(PutOutcome::Duplicate);
        };
        self.append_sealed_or_reseal(id, (pack_id, key), sealed, raw_len, None)
            .await
    }

    /// Compresses, encrypts and appends a new chunk `id` (its claim held by
    /// the caller), as a delta against `base` when given (id, plaintext).
    async fn store_new(
        &self,
        id: ChunkId,
        data: Bytes,
        base: Option<(ChunkId, Vec<u8>)>,
    ) -> Result<PutOutcome, StoreError> {
        let level = self.cfg.zstd_level;
        let raw_len = data.len() as u32;
        if self.open_is_full() {
            self.seal_pending(SealMode::IfFull).await?;
        }
        let (pack_id, key) = self.open_pack_id();
        let permit = self.cpu_permit().await?;
        // Encode and seal for the open pack in one hop to a blocking thread,
        // in one buffer: zstd writes behind room for the nonce, AES-GCM
        // encrypts where the payload lies.
        let (delta_of, sealed) = blocking(move || {
            let buf = match base {
                Some((bid, b)) => crypto::SealBuf::from_payload(&crypto::encode_delta_payload(
                    &data, &bid, &b, level,
                )),
                None => crypto::encode_chunk_for_seal(&data, level),
            };
            let delta_of = crypto::payload_delta_base(buf.payload()).ok().flatten();
            (
                delta_of,
                crypto::seal_chunk_in_place(&key, &pack_id, &id, buf),
            )
        })
        .await?;
        drop(permit);
        self.append_sealed_or_reseal(id, (pack_id, key), sealed, raw_len, delta_of)
            .await
    }

    /// Appends chunk `id`'s record, sealed for the pack `sealed_for` (id,
    /// key), to the open pack; when that pack was rotated meanwhile, the
    /// record is sealed again for the new one first (opened and sealed in
    /// place; zstd is not redone).
    async fn append_sealed_or_reseal(
        &self,
        id: ChunkId,
        sealed_for: (PackId, [u8; 32]),
        mut sealed: Vec<u8>,
        raw_len: u32,
        delta_of: Option<ChunkId>,
    ) -> Result<PutOutcome, StoreError> {
        let (mut pack_id, mut key) = sealed_for;
        loop {
            if self.append_sealed(&pack_id, id, &sealed, raw_len, delta_of)? {
                self.touches.touch([&id]);
                // The chunk is pending through the open pack now; the claim
                // guard's removal is harmless.
                return Ok(PutOutcome::Stored {
                    stored_bytes: sealed.len() as u64,
                });
            }
            // The pack was sealed while we encrypted for it.
            if self.open_is_full() {
                self.seal_pending(SealMode::IfFull).await?;
            }
            let (from_pack, from_key) = (pack_id, key);
            (pack_id, key) = self.open_pack_id();
            sealed = blocking(move || {
                crypto::reseal_chunk((&from_key, &from_pack), (&key, &pack_id), &id, sealed)
            })
            .await?
            .map_err(|e| StoreError::Internal(format!("sealing chunk {id} again: {e}")))?;
        }
    }

    /// Appends a record sealed for `pack_id` if that is still the open
    /// pack (false: it was rotated meanwhile, seal again).
    fn append_sealed(
        &self,
        pack_id: &PackId,
        id: ChunkId,
        sealed: &[u8],
        raw_len: u32,
        delta_of: Option<ChunkId>,
    ) -> Result<bool, StoreError> {
        let mut st = self.state();
        let Some(open) = st.open.as_mut().filter(|o| o.builder.id() == pack_id) else {
            return Ok(false);
        };
        open.builder
            .append(id, sealed, raw_len)
            .map_err(|e| StoreError::write(format!("pack {pack_id}"), e))?;
        open.ids.insert(id);
        if let Some(b) = delta_of {
            open.bases.insert(id, b);
        }
        Ok(true)
    }

    /// The base a chunk `id` hinted at `hinted` would be stored against:
    /// `hinted` if it is a plain stored chunk, its own base if it is a delta
    /// (chains stay one deep), `None` if absent. Call under the sweep lock:
    /// the chosen base is touched, so a running GC keeps it.
    async fn delta_base(
        &self,
        hinted: &ChunkId,
        id: &ChunkId,
    ) -> Result<Option<(ChunkId, ChunkLocation)>, StoreError> {
        let chosen = match self.catalog.chunk_location_and_base(hinted).await? {
            None => None,
            Some((loc, None)) => Some((*hinted, loc)),
            Some((_, Some(b))) => self.catalog.chunk_location(&b).await?.map(|loc| (b, loc)),
        };
        let chosen = chosen.filter(|(b, _)| b != id);
        if let Some((b, _)) = &chosen {
            self.touches.touch([b]);
        }
        Ok(chosen)
    }

    /// Claims `id` for a new chunk and, under the sweep lock, picks the base
    /// a delta of it would be stored against (hinted at `hint`, see
    /// [`ChunkStore::delta_base`]). None when the chunk is already stored or
    /// pending (touched: a duplicate).
    async fn claim_new(
        &self,
        id: ChunkId,
        hint: Option<&ChunkHash>,
    ) -> Result<Option<(Claim<'_>, Option<(ChunkId, ChunkLocation)>)>, StoreError> {
        let Some(claim) = self.claim(id) else {
            self.touches.touch([&id]);
            return Ok(None);
        };
        let _sweep = self.sweep.read().await;
        if self.catalog.chunk_location(&id).await?.is_some() {
            self.touches.touch([&id]);
            return Ok(None);
        }
        let base = match hint {
            Some(b) => self.delta_base(&self.chunk_id(b), &id).await?,
            None => None,
        };
        Ok(Some((claim, base)))
    }

    async fn cpu_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
        self.cpu
            .acquire()
            .await
            .map_err(|e| StoreError::Internal(format!("CPU permits: {e}")))
    }

    fn claim(&self, id: ChunkId) -> Option<Claim<'_>> {
        let mut st = self.state();
        if st.is_pending(&id) {
            return None;
        }
        st.claims.insert(id);
        Some(Claim { store: self, id })
    }

    fn open_is_full(&self) -> bool {
        self.state()
            .open
            .as_ref()
            .is_some_and(|o| o.builder.len() >= self.cfg.pack_target_size)
    }

    fn open_pack_id(&self) -> (PackId, [u8; 32]) {
        let mut st = self.state();
        let open = st.open.get_or_insert_with(|| {
            let id = PackId::random();
            OpenPack {
                builder: PackFile::new(&self.shared, id),
                key: self.shared.keys.master.pack_key(&id),
                ids: HashSet::new(),
                bases: HashMap::new(),
            }
        });
        (*open.builder.id(), open.key)
    }

    /// Seals the open pack if it holds anything (and first any pack whose
    /// sealing failed earlier): write, fsync, rename, fsync the directory,
    /// then record pack and chunks in one catalog transaction. When it
    /// returns `Ok`, every chunk put before is durable and catalogued.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.seal_pending(SealMode::Always).await
    }

    async fn seal_pending(&self, mode: SealMode) -> Result<(), StoreError> {
        let _seal = self.seal_lock.lock().await;
        // A pack whose sealing failed (or whose sealer was cancelled) first.
        let retry = self.state().sealing.as_ref().map(SealingPack::job);
        if let Some(job) = retry {
            self.write_pack(job).await?;
            self.state().sealing = None;
        }
        let taken = {
            let mut st = self.state();
            let ready = st.open.as_ref().is_some_and(|o| {
                !o.builder.is_empty()
                    && (mode == SealMode::Always || o.builder.len() >= self.cfg.pack_target_size)
            });
            match st.open.take() {
                Some(open) if ready => {
                    let PackFile { id, tmp, w, .. } = open.builder;
                    let (held, entries) = match w {
                        Some(w) => {
                            let (appender, _end, entries) = w.into_parts();
                            let (at, bytes) = appender.into_held();
                            ((at, Arc::new(bytes)), entries)
                        }
                        None => ((0, Arc::default()), Vec::new()),
                    };
                    let sealing = SealingPack {
                        id,
                        key: open.key,
                        tmp,
                        held,
                        entries: Arc::new(entries),
                        bases: Arc::new(open.bases),
                        ids: open.ids,
                    };
                    let job = sealing.job();
                    st.sealing = Some(sealing);
                    Some(job)
                }
                other => {
                    st.open = other;
                    None
                }
            }
        };
        if let Some(job) = taken {
            self.write_pack(job).await?;
            self.state().sealing = None;
        }
        Ok(())
    }

    /// Seals a pack file (tail written, fsynced, renamed, directory
    /// fsynced), then records it and its chunks in one catalog transaction.
    async fn write_pack(&self, job: SealJob) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        let SealJob {
            id,
            key,
            tmp,
            held,
            entries,
            bases,
        } = job;
        let records_end = held.0 + held.1.len() as u64;
        let tail = tierback_format::pack::pack_tail(&key, &id, &entries, records_end);
        let size = records_end + tail.len() as u64;
        blocking(move || {
            files::seal_pack_file(
                &tmp,
                &shared.layout.pack_path(&id),
                (held.0, &held.1),
                &tail,
                &shared.faults,
            )
        })
        .await?
        .map_err(|e| StoreError::write(format!("pack {id}"), e))?;
        self.catalog
            .insert_pack_with_bases(
                &NewPack {
                    id,
                    size,
                    created_at: now_secs(),
                },
                &entries,
                &bases,
            )
            .await?;
        if let Some(new) = self.state().gc_new_packs.as_mut() {
            new.insert(id);
        }
        tracing::debug!(pack = %id, bytes = size, chunks = entries.len(), "pack sealed");
        Ok(())
    }

    /// Which of `ids` are NOT durably catalogued (pending chunks count as
    /// missing). Used at commit to refuse an index naming absent chunks.
    /// Present ones count as referenced by a running backup (touched).
    pub async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let mut missing = Vec::new();
        // Batches, each looked up and touched under the sweep lock, so a
        // large index never holds GC (and, behind it, other backups) back.
        for batch in ids.chunks(TOUCH_BATCH) {
            let _sweep = self.sweep.read().await;
            let found = self.catalog.contains_chunks(batch).await?;
            let (present, absent): (Vec<_>, Vec<_>) =
                batch.iter().zip(found).partition(|(_, p)| *p);
            self.touches.touch(present.into_iter().map(|(id, _)| id));
            missing.extend(absent.into_iter().map(|(id, _)| *id));
        }
        Ok(missing)
    }

    /// Plaintext of one durable chunk: read from its pack, tag checked,
    /// decompressed and verified against its id.
    pub async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        let loc = self
            .catalog
            .chunk_location(id)
            .await?
            .ok_or(StoreError::NotFound(*id))?;
        self.get_at(id, loc).await
    }

    /// Where each of `ids` lives (`None`: not durably stored), looked up in
    /// batches: the first half of [`Self::get`] for many chunks at once.
    pub async fn locate(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkLocation>>, StoreError> {
        Ok(self.catalog.lookup_chunks(ids).await?)
    }

    /// [`Self::get`] of a chunk [`Self::locate`] found at `loc`: the read,
    /// tag check, decompression and id check run on a blocking thread, so
    /// callers get parallelism by awaiting several of these at once.
    pub async fn get_at(&self, id: &ChunkId, loc: ChunkLocation) -> Result<Bytes, StoreError> {
        self.read_at_with_retry(id, loc, Shared::read_chunk).await
    }

    /// The opened but still-encoded payload of a chunk [`Self::locate`] found
    /// at `loc` (codec flag, then raw or zstd data; see `docs/formats.md`):
    /// read and tag-checked on a blocking thread, not decompressed and so not
    /// checked against its id (a restore client decodes it; the tag already
    /// binds it to the pack and the chunk id). Looks the chunk up again once,
    /// like [`Self::get_at`], if GC moved it.
    pub async fn get_payload_at(
        &self,
        id: &ChunkId,
        loc: ChunkLocation,
    ) -> Result<Bytes, StoreError> {
        self.read_at_with_retry(id, loc, Shared::read_payload).await
    }

    /// Runs `read` for the chunk at `loc` on a blocking thread; if it fails,
    /// GC may have moved the chunk and deleted the pack between the lookup
    /// and the read, so the chunk is looked up again once.
    async fn read_at_with_retry(
        &self,
        id: &ChunkId,
        mut loc: ChunkLocation,
        read: fn(&Shared, &ChunkId, &ChunkLocation) -> Result<Vec<u8>, StoreError>,
    ) -> Result<Bytes, StoreError> {
        let mut retried = false;
        loop {
            let shared = self.shared.clone();
            let cid = *id;
            match blocking(move || read(&shared, &cid, &loc)).await? {
                Ok(bytes) => return Ok(Bytes::from(bytes)),
                Err(e) if !retried => {
                    retried = true;
                    match self.catalog.chunk_location(id).await? {
                        Some(now) if now == loc => return Err(e),
                        Some(now) => loc = now,
                        None => return Err(StoreError::NotFound(*id)),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`Self::get_payload_at`] for several chunks, in order, on ONE blocking
    /// thread; records lying close together in one pack (as a backup writes
    /// them) are read with one pread. A chunk that fails is tried again alone
    /// through `get_payload_at` (GC may have moved it), so each result is
    /// what `get_payload_at` would give.
    pub async fn get_payloads_at(
        &self,
        chunks: Vec<(ChunkId, ChunkLocation)>,
    ) -> Vec<Result<Bytes, StoreError>> {
        let shared = self.shared.clone();
        let list = chunks.clone();
        let read = match blocking(move || shared.read_payloads(&list)).await {
            Ok(r) => r,
            Err(e) => {
                return chunks
                    .iter()
                    .map(|_| Err(StoreError::Internal(e.to_string())))
                    .collect()
            }
        };
        let mut out = Vec::with_capacity(chunks.len());
        for ((id, loc), r) in chunks.iter().zip(read) {
            out.push(match r {
                Ok(payload) => Ok(Bytes::from(payload)),
                Err(_) => self.get_payload_at(id, *loc).await,
            });
        }
        out
    }

    /// Seals and writes a stream index durably (tmp, fsync, rename, fsync
    /// dir). Call before committing the point that names it (rule 2).
    /// Refuses ([`StoreError::ChunksMissing`]) an index naming a chunk that
    /// is not durably stored, e.g. one GC removed while the backup ran; the
    /// check touches every chunk, so GC keeps them until the backup ends.
    pub async fn write_index(
        &self,
        point: &PointId,
        stream_no: u32,
        index: &DiskIndex,
    ) -> Result<(), StoreError> {
        let ids: Vec<ChunkId> = index.entries.iter().map(|(_, id)| *id).collect();
        let count = self.missing(&ids).await?.len();
        if count > 0 {
            return Err(StoreError::ChunksMissing { count });
        }
        self.write_index_unchecked(point, stream_no, index).await
    }

    /// [`Self::write_index`] without the presence check.
    pub(crate) async fn write_index_unchecked(
        &self,
        point: &PointId,
        stream_no: u32,
        index: &DiskIndex,
    ) -> Result<(), StoreError> {
        let sealed = {
            let key = self.shared.keys.index_key;
            let (point, index) = (*point, index.clone());
            blocking(move || fmt_index::seal_index(&key, &point, stream_no, &index)).await?
        }
        .map_err(StoreError::InvalidIndex)?;
        let shared = self.shared.clone();
        let path = self.index_path(point, stream_no);
        blocking(move || files::write_durably(&path, &sealed, &shared.faults))
            .await?
            .map_err(|e| StoreError::write(format!("index {stream_no} of point {point}"), e))
    }

    /// Reads, opens and decodes a stream index.
    pub async fn read_index(
        &self,
        point: &PointId,
        stream_no: u32,
    ) -> Result<DiskIndex, StoreError> {
        let shared = self.shared.clone();
        let point = *point;
        blocking(move || shared.read_index(&point, stream_no)).await?
    }

    /// Re-reads and checks every chunk referenced by `points` (all committed
    /// points if `None`) and every index of them. See [`VerifyReport`].
    pub async fn verify(&self, points: Option<&[PointId]>) -> Result<VerifyReport, StoreError> {
        verify::run(self, points).await
    }
}

/// Longest span [`Shared::read_payloads`] reads at once, and so the most a
/// blocking thread keeps (blocking threads end when idle): four sealed 1 MiB
/// chunks.
const MAX_READ_SPAN: u64 = 5 << 20;

/// Bytes between two records of one pack that a span reads through rather
/// than read apart: a quarter of a sealed 1 MiB chunk.
const READ_GAP: u64 = 256 << 10;

/// Records of one pack read with one pread: `chunks[k]` for each `k` in
/// `members`, which lie in `[start, end)` of `pack`.
struct ReadGroup {
    pack: PackId,
    start: u64,
    end: u64,
    members: Vec<usize>,
}

/// The records of `chunks` in pack and offset order, cut into groups read
/// as one span: same pack, each record starting at most [`READ_GAP`] past
/// the span so far, the span at most [`MAX_READ_SPAN`] (a longer record is
/// a group of its own). Duplicates and overlapping records share a span.
fn read_groups(chunks: &[(ChunkId, ChunkLocation)]) -> Vec<ReadGroup> {
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_unstable_by_key(|&k| (chunks[k].1.pack_id, chunks[k].1.offset));
    let mut groups: Vec<ReadGroup> = Vec::new();
    for k in order {
        let loc = chunks[k].1;
        let end = loc.offset + u64::from(loc.len);
        if let Some(g) = groups.last_mut().filter(|g| {
            g.pack == loc.pack_id
                && loc.offset <= g.end + READ_GAP
                && g.end.max(end) - g.start <= MAX_READ_SPAN
        }) {
            g.end = g.end.max(end);
            g.members.push(k);
        } else {
            groups.push(ReadGroup {
                pack: loc.pack_id,
                start: loc.offset,
                end,
                members: vec![k],
            });
        }
    }
    groups
}

/// Checks a decoded chunk's length against the catalog's.
fn check_len(id: &ChunkId, loc: &ChunkLocation, plain: &[u8]) -> Result<(), StoreError> {
    if plain.len() == loc.raw_len as usize {
        return Ok(());
    }
    Err(StoreError::Corrupt {
        pack: loc.pack_id,
        offset: loc.offset,
        reason: format!(
            "chunk {id} holds {} bytes, the catalog says {}",
            plain.len(),
            loc.raw_len
        ),
    })
}

/// A pack that cannot be opened: missing is damage, anything else is I/O.
fn pack_open_error(loc: &ChunkLocation, e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::NotFound {
        StoreError::Corrupt {
            pack: loc.pack_id,
            offset: loc.offset,
            reason: "pack file is missing".into(),
        }
    } else {
        StoreError::Io {
            context: format!("opening pack {}", loc.pack_id),
            source: e,
        }
    }
}

/// Ids looked up and touched per hold of the sweep lock.
const TOUCH_BATCH: usize = 16 * crate::catalog::LOOKUP_BATCH;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SealMode {
    /// Seal the open pack if it holds anything.
    Always,
    /// Seal it only if it reached the target size (another put may have
    /// rotated it already).
    IfFull,
}

impl Shared {
    /// Blocking: reads and opens one chunk at `loc`, through the handle cache.
    fn read_chunk(&self, id: &ChunkId, loc: &ChunkLocation) -> Result<Vec<u8>, StoreError> {
        let file = match self.handles.get(&self.layout, &loc.pack_id) {
            Ok(f) => f,
            Err(e) => return Err(pack_open_error(loc, e)),
        };
        self.read_record(&file, id, loc)
    }

    /// Blocking: reads the record of `id` at `loc` from the open pack `file`,
    /// checks its tag, decompresses and checks it against its id and length.
    fn read_record(
        &self,
        file: &std::fs::File,
        id: &ChunkId,
        loc: &ChunkLocation,
    ) -> Result<Vec<u8>, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            pack: loc.pack_id,
            offset: loc.offset,
            reason,
        };
        let sealed = match files::read_exact_at(file, loc.offset, loc.len as usize) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(corrupt("pack file is truncated".into()));
            }
            Err(e) => {
                return Err(StoreError::Io {
                    context: format!("reading pack {}", loc.pack_id),
                    source: e,
                })
            }
        };
        if sealed.len() > crypto::MAX_SEALED_CHUNK_LEN {
            return Err(corrupt(format!(
                "chunk {id}: its record is {} bytes, more than any chunk",
                sealed.len()
            )));
        }
        let payload = self.open_payload(id, loc, &sealed)?;
        let plain = self.decode_payload(id, loc, &payload, DeltaBase::Read)?;
        self.check_plain(id, loc, &plain)?;
        Ok(plain)
    }

    /// Decodes an opened payload; a delta payload is decoded against its
    /// base as `deltas` says.
    fn decode_payload(
        &self,
        id: &ChunkId,
        loc: &ChunkLocation,
        payload: &[u8],
        deltas: DeltaBase<'_>,
    ) -> Result<Vec<u8>, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            pack: loc.pack_id,
            offset: loc.offset,
            reason,
        };
        let base =
            crypto::payload_delta_base(payload).map_err(|e| corrupt(format!("chunk {id}: {e}")))?;
        let Some(base) = base else {
            return crypto::decode_chunk_payload(payload)
                .map_err(|e| corrupt(format!("chunk {id}: {e}")));
        };
        let base_plain = match deltas {
            DeltaBase::Refuse => {
                return Err(corrupt(format!(
                    "chunk {id} is a delta but serves as the base of another delta"
                )))
            }
            DeltaBase::Read => {
                std::borrow::Cow::Owned(self.read_base(&base, None).map_err(|e| {
                    corrupt(format!(
                        "chunk {id} is a delta against chunk {base}, which cannot be read: {e}"
                    ))
                })?)
            }
            DeltaBase::Known(root, plain) if *root == base => std::borrow::Cow::Borrowed(plain),
            DeltaBase::Known(root, _) => {
                return Err(corrupt(format!(
                    "chunk {id} is a delta against chunk {base}, not {root}"
                )))
            }
        };
        crypto::decode_delta_payload(payload, &base_plain)
            .map_err(|e| corrupt(format!("chunk {id}: {e}")))
    }

    /// Blocking: the plaintext of the base chunk `base` of a delta, read at
    /// `at` or where the catalog says (again once if GC moved it meanwhile);
    /// never itself a delta. Only its tag and length are checked, not its
    /// id: whoever decodes a delta checks the delta's own plaintext against
    /// the delta's id, which covers the base bytes it used.
    fn read_base(&self, base: &ChunkId, at: Option<ChunkLocation>) -> Result<Vec<u8>, StoreError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| {
            StoreError::Internal(format!("no runtime to look up a delta base: {e}"))
        })?;
        let mut last = None;
        let mut at = at;
        for _ in 0..2 {
            let loc = match at.take() {
                Some(loc) => loc,
                None => rt
                    .block_on(self.catalog.chunk_location(base))?
                    .ok_or(StoreError::NotFound(*base))?,
            };
            if last == Some(loc) {
                break;
            }
            last = Some(loc);
            if loc.len as usize > crypto::MAX_SEALED_CHUNK_LEN {
                continue;
            }
            let Some(payload) = self.read_record_payload(base, &loc) else {
                continue;
            };
            let payload = payload?;
            let plain = self.decode_payload(base, &loc, &payload, DeltaBase::Refuse)?;
            check_len(base, &loc, &plain)?;
            return Ok(plain);
        }
        Err(StoreError::Io {
            context: format!("reading the delta base {base}"),
            source: io::Error::other("its pack could not be read"),
        })
    }

    /// Blocking: the decrypted payload of the record of `id` at `loc`, read
    /// around the page cache like restore reads (its own buffer: a
    /// restore's span buffer is borrowed while it decodes deltas). None
    /// when the pack cannot be read there.
    fn read_record_payload(
        &self,
        id: &ChunkId,
        loc: &ChunkLocation,
    ) -> Option<Result<Vec<u8>, StoreError>> {
        thread_local! {
            static BASE: std::cell::RefCell<files::AlignedBuf> = std::cell::RefCell::default();
        }
        BASE.with(|buf| {
            let mut buf = buf.borrow_mut();
            self.read_span(&mut buf, &loc.pack_id, loc.offset, loc.len as usize)
                .map(|sealed| self.open_payload(id, loc, sealed))
        })
    }

    /// Blocking: the plaintext of chunk `id` at `loc`, a delta against the
    /// chunk `root` whose plaintext is given (or a plain chunk), without
    /// reading `root` again. Not checked against `id`: the caller checks
    /// what it builds from it.
    fn read_against(
        &self,
        id: &ChunkId,
        loc: &ChunkLocation,
        (root, root_plain): (&ChunkId, &[u8]),
    ) -> Result<Vec<u8>, StoreError> {
        let payload = self
            .read_record_payload(id, loc)
            .ok_or_else(|| StoreError::Corrupt {
                pack: loc.pack_id,
                offset: loc.offset,
                reason: format!("chunk {id}: its pack could not be read"),
            })??;
        self.decode_payload(id, loc, &payload, DeltaBase::Known(root, root_plain))
    }

    /// Checks a decoded chunk against its id and its catalogued length.
    fn check_plain(
        &self,
        id: &ChunkId,
        loc: &ChunkLocation,
        plain: &[u8],
    ) -> Result<(), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            pack: loc.pack_id,
            offset: loc.offset,
            reason,
        };
        let actual = ChunkId::derive(&self.keys.id_key, &ChunkHash::of(plain));
        if actual != *id {
            return Err(corrupt(format!(
                "chunk {id}: content does not match its id (content gives {actual})"
            )));
        }
        check_len(id, loc, plain)
    }

    /// A delta payload as the raw payload of its plaintext: restore clients
    /// decode payloads alone. Others unchanged. Like every payload on this
    /// path it is checked by its tag (and its base by the base's tag), not
    /// re-hashed against its id (`verify` does that).
    fn undelta_payload(
        &self,
        id: &ChunkId,
        loc: &ChunkLocation,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        if payload.first() != Some(&tierback_format::magic::CHUNK_CODEC_DELTA) {
            return Ok(payload);
        }
        let plain = self.decode_payload(id, loc, &payload, DeltaBase::Read)?;
        check_len(id, loc, &plain)?;
        let mut raw = Vec::with_capacity(1 + plain.len());
        raw.push(tierback_format::magic::CHUNK_CODEC_RAW);
        raw.extend_from_slice(&plain);
        Ok(raw)
    }

    /// Blocking: reads the record of `id` at `loc` and checks its tag, but
    /// leaves the payload encoded (codec flag, then the data).
    fn read_payload(&self, id: &ChunkId, loc: &ChunkLocation) -> Result<Vec<u8>, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            pack: loc.pack_id,
            offset: loc.offset,
            reason,
        };
        let file = match self.handles.get(&self.layout, &loc.pack_id) {
            Ok(f) => f,
            Err(e) => return Err(pack_open_error(loc, e)),
        };
        if loc.len as usize > crypto::MAX_SEALED_CHUNK_LEN {
            return Err(corrupt(format!(
                "chunk {id}: the catalog gives its record {} bytes, more than any chunk",
                loc.len
            )));
        }
        let sealed = match files::read_exact_at(&file, loc.offset, loc.len as usize) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(corrupt("pack file is truncated".into()));
            }
            Err(e) => {
                return Err(StoreError::Io {
                    context: format!("reading pack {}", loc.pack_id),
                    source: e,
                })
            }
        };
        let payload = self.open_payload(id, loc, &sealed)?;
        self.undelta_payload(id, loc, payload)
    }

    /// Checks the tag of a sealed record and returns its payload.
    fn open_payload(
        &self,
        id: &ChunkId,
        loc: &ChunkLocation,
        sealed: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let key = self.keys.master.pack_key(&loc.pack_id);
        crypto::open(&key, &crypto::chunk_ad(&loc.pack_id, id), sealed).map_err(|e| {
            StoreError::Corrupt {
                pack: loc.pack_id,
                offset: loc.offset,
                reason: format!("chunk {id}: {e}"),
            }
        })
    }

    /// Blocking: [`Self::read_payload`] of each chunk, results in the order
    /// asked. The records are read in pack and offset order, and records of
    /// one pack at most [`READ_GAP`] apart are read with one pread around
    /// the page cache (into a buffer the thread keeps): a backup stores a
    /// run's chunks in the order they arrive from its readers, so the
    /// records of consecutive places lie close together, not always back to
    /// back. A span whose read fails is read again record by record, so
    /// errors are those of `read_payload`.
    fn read_payloads(
        &self,
        chunks: &[(ChunkId, ChunkLocation)],
    ) -> Vec<Result<Vec<u8>, StoreError>> {
        thread_local! {
            static SPAN: std::cell::RefCell<files::AlignedBuf> = std::cell::RefCell::default();
        }
        let mut out: Vec<Option<Result<Vec<u8>, StoreError>>> =
            std::iter::repeat_with(|| None).take(chunks.len()).collect();
        for g in read_groups(chunks) {
            let span_len = (g.end - g.start) as usize;
            let read = g.end - g.start <= MAX_READ_SPAN
                && SPAN.with(|span| {
                    let mut span = span.borrow_mut();
                    let Some(bytes) = self.read_span(&mut span, &g.pack, g.start, span_len) else {
                        return false;
                    };
                    for &k in &g.members {
                        let (id, loc) = &chunks[k];
                        let at = (loc.offset - g.start) as usize;
                        out[k] = Some(
                            self.open_payload(id, loc, &bytes[at..at + loc.len as usize])
                                .and_then(|p| self.undelta_payload(id, loc, p)),
                        );
                    }
                    true
                });
            if !read {
                for &k in &g.members {
                    let (id, loc) = &chunks[k];
                    out[k] = Some(self.read_payload(id, loc));
                }
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Internal("a chunk was not read".into()))))
            .collect()
    }

    /// Blocking: `len` bytes at `offset` of pack `id`, read around the page
    /// cache where the file system allows (else buffered) into `buf`.
    /// `None` if the read failed (the caller reads record by record, which
    /// names the error).
    fn read_span<'a>(
        &self,
        buf: &'a mut files::AlignedBuf,
        id: &PackId,
        offset: u64,
        len: usize,
    ) -> Option<&'a [u8]> {
        let at = match self.handles.read_direct(&self.layout, id, offset, len, buf) {
            Ok(Some(at)) => at,
            Ok(None) => {
                let file = self.handles.get(&self.layout, id).ok()?;
                buf.read_buffered(&file, offset, len).ok()?
            }
            Err(_) => return None,
        };
        Some(buf.bytes(at, len))
    }

    /// Blocking: reads and opens one index.
    fn read_index(&self, point: &PointId, stream_no: u32) -> Result<DiskIndex, StoreError> {
        let path = self.layout.index_path(point, stream_no);
        let sealed = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::IndexNotFound {
                    point: *point,
                    stream_no,
                });
            }
            Err(e) => {
                return Err(StoreError::Io {
                    context: format!("reading {}", path.display()),
                    source: e,
                })
            }
        };
        fmt_index::open_index(&self.keys.index_key, point, stream_no, &sealed).map_err(|e| {
            StoreError::BadIndex {
                point: *point,
                stream_no,
                reason: e.to_string(),
            }
        })
    }
}

#[cfg(test)]
mod read_group_tests {
    use super::*;

    fn at(pack: u8, offset: u64, len: u32) -> (ChunkId, ChunkLocation) {
        let loc = ChunkLocation {
            pack_id: PackId([pack; 16]),
            offset,
            len,
            raw_len: len,
        };
        (ChunkId([offset as u8; 32]), loc)
    }

    fn groups(chunks: &[(ChunkId, ChunkLocation)]) -> Vec<Vec<usize>> {
        read_groups(chunks).into_iter().map(|g| g.members).collect()
    }

    #[test]
    fn near_records_of_one_pack_share_a_read() {
        let mib = 1 << 20;
        let chunks = [
            at(1, 3 * mib, 1000),                 // 0: far past the others
            at(1, 0, 1000),                       // 1
            at(2, 1000, 1000),                    // 2: another pack
            at(1, 1000, 1000),                    // 3: back to back with 1
            at(1, 1000, 1000),                    // 4: a duplicate of 3
            at(1, 2000 + READ_GAP, 1000),         // 5: READ_GAP past 3
            at(1, 3000 + 2 * READ_GAP + 1, 1000), // 6: one byte too far
        ];
        assert_eq!(
            groups(&chunks),
            vec![vec![1, 3, 4, 5], vec![6], vec![0], vec![2]]
        );
    }

    #[test]
    fn a_span_stops_at_its_limit() {
        let len = 1 << 20;
        // Back to back 1 MiB records: five fill the 5 MiB limit.
        let chunks: Vec<_> = (0..7).map(|k| at(1, k * u64::from(len), len)).collect();
        assert_eq!(groups(&chunks), vec![vec![0, 1, 2, 3, 4], vec![5, 6]]);
        // A record longer than the limit is read alone.
        let big = [
            at(1, 0, 100),
            at(1, 100, (MAX_READ_SPAN + 1) as u32),
            at(1, 10 << 20, 100),
        ];
        assert_eq!(groups(&big), vec![vec![0], vec![1], vec![2]]);
    }
}
