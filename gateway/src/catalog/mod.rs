//! The gateway's catalog: every fact about agents, VMs, recovery points, packs
//! and chunks, in SQL through sqlx (SQLite by default: one file, WAL,
//! `synchronous=FULL`).
//!
//! All SQL of the gateway lives under this module and nowhere else. A recovery
//! point becomes visible in exactly one transaction (DESIGN.md §6 rule 3).
//! `control.rs` holds agents, tokens, VMs and jobs; `data.rs` holds packs,
//! chunks and recovery points; `groups.rs` holds protection groups;
//! `queue.rs` the scheduled-job queue.

mod control;
mod data;
mod groups;
mod queue;
mod tracking;

pub use control::*;
pub use data::*;
pub use groups::*;
pub use queue::*;

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

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

/// Handle to the catalog database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Catalog {
    pub(crate) pool: SqlitePool,
}

impl Catalog {
    /// Opens (creating if needed) the SQLite catalog at `path` and brings its
    /// schema up to date.
    pub async fn open(path: &Path) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("../migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Closes every connection (checkpointing the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
