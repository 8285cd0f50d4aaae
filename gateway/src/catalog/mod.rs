//! The gateway's catalog: every fact about agents, VMs, recovery points, packs
//! and chunks, in SQL through sqlx (SQLite by default: one file, WAL,
//! `synchronous=FULL`).
//!
//! All SQL of the gateway lives under this module and nowhere else. A recovery
//! point becomes visible in exactly one transaction (DESIGN.md §6 rule 3).
//! `control.rs` holds agents, tokens, VMs and jobs; `data.rs` holds packs,
//! chunks and recovery points; `groups.rs` holds protection groups;
//! `queue.rs` the scheduled-job queue; `filter.rs` the in-memory Bloom filter
//! that answers "not catalogued" for most new chunks without SQL;
//! `checkpoint.rs` the task that checkpoints the WAL outside commits;
//! `staging.rs` the recent chunk rows, appended first and merged in id
//! order into `chunks_mid`, and that middle tier merged into `chunks`.

mod checkpoint;
mod control;
mod data;
mod filter;
mod groups;
mod queue;
mod staging;
mod tracking;

pub use control::*;
pub use data::*;
pub use filter::{BlockedBloom, ChunkFilterStatus};
pub use groups::*;
pub use queue::*;
pub use staging::{MERGE_AT, MID_MAX};

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};

/// Errors of the catalog layer.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("catalog migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// Handle to the catalog database; cheap to clone (clones share the pool
/// and the chunk filter).
#[derive(Clone, Debug)]
pub struct Catalog {
    pub(crate) pool: SqlitePool,
    /// Membership filter in front of chunk lookups (`filter.rs`).
    pub(crate) chunk_filter: Arc<filter::ChunkFilter>,
    /// The WAL checkpoint task (`checkpoint.rs`); it ends with the last clone.
    pub(crate) checkpointer: Arc<checkpoint::Checkpointer>,
    /// The one connection that records sealed packs and their chunk rows,
    /// with `synchronous = NORMAL` (see [`Catalog::open`]); `None` once
    /// closed.
    pub(crate) chunk_writer: checkpoint::Writer,
    /// Chunk rows appended to `chunks_recent` and not yet merged into
    /// `chunks` (`staging.rs`).
    pub(crate) staged: Arc<staging::Staging>,
}

impl Catalog {
    /// Opens (creating if needed) the SQLite catalog at `path`, brings its
    /// schema up to date and builds the chunk filter: inline for a small
    /// catalog, on a background task for a large one (lookups are exact but
    /// go to SQLite for every id until it is ready; see `filter.rs`).
    ///
    /// Every connection commits with `synchronous = FULL` (the WAL is
    /// fsynced at each commit) except the chunk writer, which records
    /// sealed packs and their chunk rows with `NORMAL`: its commits reach
    /// the WAL in order but are fsynced by the next FULL commit or
    /// checkpoint. That keeps DESIGN §6: the WAL is replayed as a prefix
    /// of its commits (checksums are chained), so a point that commits
    /// (FULL) makes every chunk row written before it durable with it. A
    /// power loss can lose only rows no committed point names yet; their
    /// pack files are then uncatalogued garbage for GC, and agents send the
    /// chunks again, as after a crash between seal and catalog. GC, points
    /// and everything else stay FULL. With the background checkpoints:
    /// 16-23 k -> 22-35 k inserts/s (docs/scale.md, third insert pass).
    pub async fn open(path: &Path) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(30))
            // The WAL file keeps its high-water size otherwise: bulk loads
            // next to long scans left 1.4 GB of WAL at 20 M chunks.
            .pragma("journal_size_limit", (64u64 << 20).to_string())
            // 32 MiB of page cache per connection (SQLite's default is 2):
            // holds most interior pages of the chunk table's B-tree, so a
            // lookup reads about one leaf page (docs/scale.md). Each
            // connection has its own cache, not one shared behind a global
            // mutex: see `.cargo/config.toml` and the test below.
            .pragma("cache_size", "-32768")
            // No commit checkpoints: `checkpoint.rs` does it on its own task
            // (docs/scale.md, third insert pass).
            .pragma("wal_autocheckpoint", "0");
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts.clone())
            .await?;
        sqlx::migrate!("../migrations").run(&pool).await?;
        let chunk_writer = opts
            .synchronous(SqliteSynchronous::Normal)
            .connect()
            .await?;
        let chunk_writer = Arc::new(tokio::sync::Mutex::new(Some(chunk_writer)));
        let checkpointer = Arc::new(checkpoint::Checkpointer::spawn(
            pool.clone(),
            chunk_writer.clone(),
        ));
        let c = Self {
            pool,
            chunk_filter: Arc::new(filter::ChunkFilter::default()),
            checkpointer,
            chunk_writer,
            staged: Arc::new(staging::Staging::default()),
        };
        c.load_staged().await?;
        if filter::db_bytes(&c.pool).await? <= filter::INLINE_BUILD_MAX_BYTES {
            c.chunk_filter.build(&c.pool, &c.staged, None).await?;
        } else {
            c.chunk_filter.maybe_rebuild(&c.pool, &c.staged);
        }
        Ok(c)
    }

    /// State of the chunk filter.
    pub fn chunk_filter_status(&self) -> ChunkFilterStatus {
        self.chunk_filter.status()
    }

    /// Waits until the chunk filter is built (or its build failed, or
    /// `timeout` passed); returns whether it is ready.
    pub async fn wait_chunk_filter(&self, timeout: std::time::Duration) -> bool {
        let until = std::time::Instant::now() + timeout;
        loop {
            let s = self.chunk_filter.status();
            if s.ready || (!s.building && s.last_error.is_some()) {
                return s.ready;
            }
            if std::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Closes every connection (checkpointing the WAL).
    pub async fn close(&self) {
        if let Some(w) = self.chunk_writer.lock().await.take() {
            if let Err(e) = w.close().await {
                tracing::warn!(error = %e, "closing the catalog's chunk writer");
            }
        }
        self.pool.close().await;
    }
}

/// A fresh catalog in a temporary directory (kept alive by the returned
/// guard), for the catalog's unit tests.
#[cfg(test)]
pub(crate) async fn test_catalog() -> (tempfile::TempDir, Catalog) {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Catalog::open(&dir.path().join("catalog.db"))
        .await
        .expect("open catalog");
    (dir, c)
}

#[cfg(test)]
mod tests {
    /// The bundled SQLite is built with `.cargo/config.toml`'s
    /// `LIBSQLITE3_FLAGS`: no shared page cache behind one global mutex and
    /// no malloc statistics behind another. With them, 8 pool connections
    /// doing lookups spent ~45 % of their time waiting on those locks
    /// (docs/scale.md); a build that lost the flags fails here.
    #[tokio::test]
    async fn sqlite_is_built_without_global_cache_and_malloc_locks() {
        let (_dir, c) = super::test_catalog().await;
        let opts: Vec<String> = sqlx::query_scalar("PRAGMA compile_options")
            .fetch_all(&c.pool)
            .await
            .expect("compile options");
        assert!(
            opts.iter().any(|o| o == "THREADSAFE=1"),
            "serialized SQLite expected: {opts:?}"
        );
        assert!(
            !opts.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "one page cache shared by all connections: {opts:?}"
        );
        assert!(
            opts.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "malloc statistics on: {opts:?}"
        );
    }
}
