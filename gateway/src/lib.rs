//! Tierback gateway: the branch-office appliance. It serves the HTTPS API for
//! agents and admins, keeps recovery points on an encrypted, deduplicated
//! local disk tier, catalogues them in SQL and restores them.
//!
//! # Concurrency
//!
//! | operation | may run with | protected by |
//! |---|---|---|
//! | backup sessions (many agents) | each other, restores, verify | a session's own mutex; the store's open-pack lock for appends |
//! | chunk `put` | other puts | CPU work outside the lock; only the append to the open pack is serialised |
//! | `flush` (seal pack) | puts (they wait for the new open pack) | the open-pack lock |
//! | commit of a point | other commits | one SQL transaction each |
//! | restore reads, verify | everything | sealed packs are immutable (a read whose pack GC replaced looks again) |
//! | GC / prune (one at a time) | backups, commits, restores, verify | touch log + the store's `sweep` lock (see `chunk_store/gc.rs`) |
//!
//! Write ordering follows DESIGN.md §6 (see docs/formats.md): pack durable →
//! index durable → point committed in one transaction.

pub mod api;
pub mod catalog;
pub mod chunk_store;
pub mod client;
pub mod config;
pub mod policy;
pub mod restore;
pub mod scheduler;
pub mod server;
pub mod setup;
pub mod tls;

/// The runtime every gateway program runs on, after setting the allocator
/// as the gateway binary does (`tierback_format::malloc`): call it first
/// thing in `main`, before any thread starts, so the examples that measure
/// the gateway measure what ships.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tierback_format::malloc::tune();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}
