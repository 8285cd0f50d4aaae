//! Backup sessions: the in-memory state of a backup between `begin` and
//! `commit`. Nothing of a session is visible in the catalog but its job row;
//! if the agent or the gateway dies, the session is simply gone and its
//! stored chunks are garbage for GC (DESIGN §6 rule 3).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tierback_format::ids::ChunkHash;
use tierback_format::wire::{StreamSpec, VmInfo};

/// One running backup.
pub struct Session {
    pub id: String,
    pub agent_id: String,
    pub job_id: String,
    pub vm: VmInfo,
    pub streams: Vec<StreamSpec>,
    pub full: bool,
    /// The point DELTA streams (`base_stream`) apply to.
    pub base_point: Option<tierback_format::ids::PointId>,
    pub chunk_size: u32,
    /// Index entries received per stream, in arrival order.
    pub indexes: HashMap<u32, Vec<(u64, ChunkHash)>>,
    pub stored_bytes: u64,
    pub stored_chunks: u64,
    pub last_activity: Instant,
    /// Registers the backup with GC until the session is dropped, so chunks
    /// it references are kept (DESIGN.md §6 rule 5).
    pub gc_writer: crate::chunk_store::WriterGuard,
}

/// The table of running sessions.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Session>>>>,
}

impl Sessions {
    pub fn insert(&self, s: Session) {
        let id = s.id.clone();
        self.lock().insert(id, Arc::new(tokio::sync::Mutex::new(s)));
    }

    /// The session if it exists and belongs to `agent_id`; another agent's
    /// session looks exactly like a missing one.
    pub async fn get(&self, id: &str, agent_id: &str) -> Option<Arc<tokio::sync::Mutex<Session>>> {
        let s = self.lock().get(id).cloned()?;
        let owner_matches = {
            let mut g = s.lock().await;
            g.last_activity = Instant::now();
            g.agent_id == agent_id
        };
        owner_matches.then_some(s)
    }

    pub fn remove(&self, id: &str) -> Option<Arc<tokio::sync::Mutex<Session>>> {
        self.lock().remove(id)
    }

    /// Removes sessions idle for longer than `idle`; returns their job ids.
    pub fn reap(&self, idle: Duration) -> Vec<String> {
        let mut out = Vec::new();
        self.lock().retain(|_, s| match s.try_lock() {
            Ok(g) if g.last_activity.elapsed() > idle => {
                out.push(g.job_id.clone());
                false
            }
            _ => true,
        });
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<Session>>>> {
        // A poisoned map only means a handler panicked mid-insert; the map
        // itself is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
