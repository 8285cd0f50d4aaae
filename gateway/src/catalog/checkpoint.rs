//! WAL checkpoints on a background task instead of inside commits.
//!
//! SQLite's default (`wal_autocheckpoint` = 1000 pages) makes the commit
//! that crosses the threshold copy the WAL back into the database file and
//! fsync it, on the committing thread. Chunk rows have random 32-byte keys,
//! so every row dirties its own leaf page, and that copy was about a fifth
//! of the insert path's time (docs/scale.md, "Chunk inserts"). Here every
//! connection has `wal_autocheckpoint = 0` and one task checkpoints instead,
//! on the other core, while the writer goes on:
//!
//! * shortly after a writer asked for it ([`Checkpointer::poke`]), and at
//!   least every [`IDLE_PERIOD`] for writes that did not ask;
//! * `PASSIVE` first (never blocks readers or the writer);
//! * `RESTART` when the WAL holds more than [`RESTART_FRAMES`] frames: a
//!   writer that keeps the checkpoint chasing it never finds the WAL fully
//!   copied, so it never starts it over, and the WAL would grow without
//!   bound (and every page read with it: the WAL index is searched segment
//!   by segment). The restart holds the chunk writer's lock, so the busy
//!   writer pauses for the few frames the passive round left, and the next
//!   commit starts the WAL from its beginning (`journal_size_limit` then
//!   trims the file).
//!
//! Durability does not depend on this task: commits are durable in the WAL
//! (`synchronous = FULL`; the chunk writer's NORMAL commits with the next
//! FULL commit, see `Catalog::open`), a checkpoint only moves pages into the
//! main file, and a crash before it leaves a WAL that the next open
//! replays. The task ends when the last [`Catalog`](super::Catalog) clone is
//! dropped or the pool is closed; closing the pool checkpoints the WAL one
//! last time.

use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnection, SqlitePool};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};

/// The chunk writer's connection, shared with `Catalog`.
pub(crate) type Writer = Arc<Mutex<Option<SqliteConnection>>>;

/// Pause after a poke before checkpointing, so one checkpoint covers the
/// commits of a burst rather than one each.
const POKE_DELAY: Duration = Duration::from_millis(50);
/// Checkpoint at least this often while anything may have been written.
const IDLE_PERIOD: Duration = Duration::from_secs(1);
/// WAL length (frames = pages) above which the task restarts the WAL:
/// 65,536 frames = 256 MiB at 4 KiB pages. Measured against 16,384 at
/// 18-19 M rows: fewer restarts, +10-40 % inserts/s at 1-16 packs per
/// transaction (docs/scale.md). After a restart `journal_size_limit` trims
/// the file to 64 MiB.
const RESTART_FRAMES: i64 = 65_536;

/// Extra passive rounds before a restart, and the tail (frames) below which
/// the restart goes ahead at once.
const TAIL_ROUNDS: usize = 3;
const SHORT_TAIL: i64 = 1024;

/// Handle to the checkpoint task; the task ends when this is dropped.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    wake: Arc<Notify>,
    _stop: DropGuard,
}

impl Checkpointer {
    /// Starts the task for `pool` on the current runtime.
    pub(crate) fn spawn(pool: SqlitePool, writer: Writer) -> Checkpointer {
        let (wake, stop) = (Arc::new(Notify::new()), CancellationToken::new());
        let (w, s) = (wake.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = s.cancelled() => break,
                    _ = w.notified() => tokio::time::sleep(POKE_DELAY).await,
                    _ = tokio::time::sleep(IDLE_PERIOD) => {}
                }
                if pool.is_closed() {
                    break;
                }
                if let Err(e) = checkpoint(&pool, &writer).await {
                    if pool.is_closed() {
                        break;
                    }
                    tracing::warn!(error = %e, "catalog WAL checkpoint failed; retrying");
                }
            }
        });
        Checkpointer {
            wake,
            _stop: stop.drop_guard(),
        }
    }

    /// Asks for a checkpoint soon (after a write of many pages).
    pub(crate) fn poke(&self) {
        self.wake.notify_one();
    }
}

/// One round: passive, then, if the WAL is long, more passive rounds while
/// they shorten the uncopied tail, and a restart under the writer's lock.
/// Returns the frames the round left uncopied.
pub(crate) async fn checkpoint(pool: &SqlitePool, writer: &Writer) -> Result<i64, sqlx::Error> {
    let (mut log, mut done) = passive(pool).await?;
    if log <= RESTART_FRAMES {
        return Ok(log - done);
    }
    // Each passive round copies what the writer appended during the one
    // before; the locked restart then pauses the writer for a short tail
    // only (and its fsync).
    for _ in 0..TAIL_ROUNDS {
        if log - done <= SHORT_TAIL {
            break;
        }
        (log, done) = passive(pool).await?;
    }
    let _writer = writer.lock().await;
    let (_busy, log, done): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(RESTART)")
        .fetch_one(pool)
        .await?;
    Ok(log - done)
}

async fn passive(pool: &SqlitePool) -> Result<(i64, i64), sqlx::Error> {
    let (_busy, log, done): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(pool)
        .await?;
    Ok((log, done))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tierback_format::ids::{ChunkId, PackId};
    use tierback_format::pack::TocEntry;

    use super::*;
    use crate::catalog::{Catalog, NewPack};

    use crate::catalog::test_catalog as catalog;

    fn pack(no: u32) -> (NewPack, Vec<TocEntry>) {
        let toc = (0..500u32)
            .map(|i| TocEntry {
                chunk_id: ChunkId(*blake3::hash(&(no * 1000 + i).to_le_bytes()).as_bytes()),
                offset: 32 + u64::from(i) * 10,
                len: 10,
                raw_len: 20,
            })
            .collect();
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&no.to_le_bytes());
        let np = NewPack {
            id: PackId(id),
            size: 5032,
            created_at: 1,
        };
        (np, toc)
    }

    /// Commits never checkpoint (`wal_autocheckpoint = 0`), so the main
    /// file only grows when the task copies the WAL into it.
    #[tokio::test]
    async fn the_task_moves_committed_pages_into_the_database_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("catalog.db");
        let c = Catalog::open(&db).await.expect("open");
        checkpoint(&c.pool, &c.chunk_writer)
            .await
            .expect("checkpoint after migrations");
        let before = std::fs::metadata(&db).expect("db").len();
        for no in 0..8 {
            let (np, toc) = pack(no);
            c.insert_pack_with_chunks(&np, &toc).await.expect("insert");
        }
        let wal = db.with_extension("db-wal");
        assert!(
            std::fs::metadata(&wal).expect("wal").len() > 100 << 10,
            "the commits went to the WAL"
        );
        let until = Instant::now() + Duration::from_secs(20);
        let mut grown = 0;
        while Instant::now() < until {
            grown = std::fs::metadata(&db).expect("db").len() - before;
            if grown > 100 << 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            grown > 100 << 10,
            "database file grew by {grown} bytes only"
        );
        // Everything is still there, read through the pool.
        let (_, toc) = pack(7);
        let ids: Vec<ChunkId> = toc.iter().map(|e| e.chunk_id).collect();
        let found = c.lookup_chunks(&ids).await.expect("lookup");
        assert!(found.iter().all(Option::is_some));
    }

    /// Only the chunk writer commits with NORMAL; points, GC and the rest
    /// keep FULL, which is what makes chunk rows durable before a point
    /// naming them (formats.md §8).
    #[tokio::test]
    async fn only_the_chunk_writer_skips_the_commit_fsync() {
        let (_dir, c) = catalog().await;
        let mut pooled = Vec::new();
        for _ in 0..3 {
            let mut conn = c.pool.acquire().await.expect("acquire");
            let (sync,): (i64,) = sqlx::query_as("PRAGMA synchronous")
                .fetch_one(&mut *conn)
                .await
                .expect("pragma");
            assert_eq!(sync, 2, "pool connections commit with FULL");
            pooled.push(conn);
        }
        let mut w = c.chunk_writer.lock().await;
        let (sync,): (i64,) = sqlx::query_as("PRAGMA synchronous")
            .fetch_one(w.as_mut().expect("open writer"))
            .await
            .expect("pragma");
        assert_eq!(sync, 1, "the chunk writer commits with NORMAL");
        let (auto,): (i64,) = sqlx::query_as("PRAGMA wal_autocheckpoint")
            .fetch_one(w.as_mut().expect("open writer"))
            .await
            .expect("pragma");
        assert_eq!(auto, 0, "commits never checkpoint");
    }

    /// A round leaves no frame behind when nothing else runs.
    #[tokio::test]
    async fn a_round_backfills_the_whole_wal() {
        let (_dir, c) = catalog().await;
        let (np, toc) = pack(1);
        c.insert_pack_with_chunks(&np, &toc).await.expect("insert");
        assert_eq!(
            checkpoint(&c.pool, &c.chunk_writer)
                .await
                .expect("checkpoint"),
            0
        );
    }
}
