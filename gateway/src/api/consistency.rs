//! Consistency checks (MABS semantics: make sure the replica matches the
//! source).
//!
//! - Admin: `POST /v1/admin/consistency-checks` `{"vm"|"group"}` queues one
//!   `consistency-check` job per VM for the agent that owns it; the agent
//!   takes it with `POST /v1/agent/jobs/next` like a scheduled backup.
//! - Agent: a consistency check is a backup session begun with
//!   `?purpose=consistency-check` against the VM's newest point; the agent
//!   reads every chunk of every disk, and `POST …/{session}/compare` answers
//!   which chunk numbers differ from the base point's index (keyed id of the
//!   source's hash ≠ the index's id, or present on one side only). The agent
//!   then sends the differing chunks as a delta and commits a
//!   `consistency-check` point; the figures become the job's message.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use tierback_format::ids::ChunkId;
use tierback_format::wire::{CompareRequest, CompareResponse, DiskCheckFigures, MAX_LACK_BATCH};

use super::{random_secret, AdminAuth, AgentAuth, ApiError, SharedState};
use crate::catalog::{now_secs, NewQueuedJob};

/// Job kind (and point kind) of a consistency check.
pub const KIND: &str = "consistency-check";

/// Chunk numbers in `first..end` whose content differs between the base
/// index (`base`, sorted by chunk number, ids) and the source (`source`:
/// keyed ids of the non-zero chunks read in that range; absent numbers are
/// zero). Ascending, unique.
pub fn differing_positions(
    base: &[(u64, ChunkId)],
    first: u64,
    end: u64,
    source: &[(u64, ChunkId)],
) -> Vec<u64> {
    let lo = base.partition_point(|(n, _)| *n < first);
    let hi = base.partition_point(|(n, _)| *n < end);
    let mut stored: BTreeMap<u64, ChunkId> = base[lo..hi].iter().copied().collect();
    let mut out = Vec::new();
    for (n, id) in source {
        match stored.remove(n) {
            Some(s) if s == *id => {}
            _ => out.push(*n),
        }
    }
    // What the point holds and the source now reads as zero.
    out.extend(stored.into_keys());
    out.sort_unstable();
    out.dedup();
    out
}

/// `POST /v1/agent/backups/{session}/compare`.
pub async fn compare(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    Path(sid): Path<String>,
    Json(req): Json<CompareRequest>,
) -> Result<Json<CompareResponse>, ApiError> {
    let sess = st.sessions.get(&sid, &agent.id).await.ok_or_else(|| {
        ApiError::NotFound("no such backup session (it may have expired): start a new check".into())
    })?;
    if req.chunks.len() > MAX_LACK_BATCH {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_LACK_BATCH} chunks per compare request"
        )));
    }
    if req.first > req.end
        || req
            .chunks
            .iter()
            .any(|c| c.chunk_no < req.first || c.chunk_no >= req.end)
    {
        return Err(ApiError::BadRequest(
            "every chunk number must lie in first..end".into(),
        ));
    }
    let (base, base_stream) = {
        let s = sess.lock().await;
        let spec = s.streams.get(req.stream as usize).ok_or_else(|| {
            ApiError::BadRequest(format!("stream {} was not announced", req.stream))
        })?;
        (s.base_point, spec.base_stream)
    };
    let source: Vec<(u64, ChunkId)> = req
        .chunks
        .iter()
        .map(|c| (c.chunk_no, st.store.chunk_id(&c.hash)))
        .collect();
    let differing = match (base, base_stream) {
        (Some(p), Some(b)) => {
            let idx = st.indexes.get(&st, p, b).await?;
            differing_positions(&idx.entries, req.first, req.end, &source)
        }
        // Nothing to compare with: every non-zero chunk is new.
        _ => differing_positions(&[], req.first, req.end, &source),
    };
    Ok(Json(CompareResponse { differing }))
}

/// The job message of a finished check.
pub fn check_message(point: &str, disks: &[DiskCheckFigures]) -> String {
    let total: u64 = disks.iter().map(|d| d.chunks_differing).sum();
    let per: Vec<String> = disks
        .iter()
        .map(|d| {
            format!(
                "disk {} ({}): {} chunk(s) compared, {} differing ({} bytes), {} bytes sent",
                d.index,
                d.path,
                d.chunks_compared,
                d.chunks_differing,
                d.bytes_differing,
                d.bytes_sent
            )
        })
        .collect();
    format!(
        "consistency check: {total} chunk(s) differed; {}; point {point}",
        per.join("; ")
    )
}

/// `POST /v1/admin/consistency-checks`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConsistencyCheckRequest {
    /// One VM (name or id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Every member of a protection group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// A queued check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedCheck {
    pub job: String,
    pub vm_id: String,
    pub vm_name: String,
}

/// Answer: the jobs queued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsistencyCheckResponse {
    pub jobs: Vec<QueuedCheck>,
}

/// Queues a check of each VM named (202-like: the agent runs it).
pub async fn enqueue(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Json(req): Json<ConsistencyCheckRequest>,
) -> Result<Json<ConsistencyCheckResponse>, ApiError> {
    let targets: Vec<(String, String, String, Option<String>)> = match (&req.vm, &req.group) {
        (Some(vm), None) => {
            let v = super::groups::resolve_vm(&st, vm).await?;
            let agent = st
                .catalog
                .list_vms()
                .await?
                .into_iter()
                .find(|r| r.id == v.id)
                .map(|r| r.agent_id)
                .ok_or_else(|| ApiError::NotFound(format!("no VM {vm:?}")))?;
            let group = st.catalog.group_of_vm(&v.id).await?.map(|g| g.name);
            vec![(v.id, v.name, agent, group)]
        }
        (None, Some(g)) => {
            if st.catalog.get_group(g).await?.is_none() {
                return Err(ApiError::NotFound(format!(
                    "no protection group {g:?}: see `tierback-gateway group list`"
                )));
            }
            let members = st.catalog.group_members(Some(g)).await?;
            if members.is_empty() {
                return Err(ApiError::BadRequest(format!(
                    "protection group {g:?} has no members: add VMs with `group add`"
                )));
            }
            members
                .into_iter()
                .map(|m| (m.vm_id, m.vm_name, m.agent_id, Some(m.group_name)))
                .collect()
        }
        _ => {
            return Err(ApiError::BadRequest(
                "name exactly one of vm or group".into(),
            ))
        }
    };
    let now = now_secs();
    let mut jobs = Vec::new();
    for (vm_id, vm_name, agent_id, group) in targets {
        let job = NewQueuedJob {
            id: format!("job-{}", &random_secret()[..16]),
            vm_id: vm_id.clone(),
            vm_name: vm_name.clone(),
            agent_id,
            group_name: group.unwrap_or_default(),
            full: false,
            window_at: now,
            message: Some("consistency check requested by an admin".into()),
        };
        match st.catalog.enqueue_check(&job, now).await? {
            None => jobs.push(QueuedCheck {
                job: job.id,
                vm_id,
                vm_name,
            }),
            Some(existing) => jobs.push(QueuedCheck {
                job: existing,
                vm_id,
                vm_name,
            }),
        }
    }
    tracing::info!(jobs = jobs.len(), "consistency checks queued");
    Ok(Json(ConsistencyCheckResponse { jobs }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> ChunkId {
        ChunkId::derive(&[7; 32], &tierback_format::ids::ChunkHash([b; 32]))
    }

    #[test]
    fn differing_positions_cover_changed_new_and_zeroed_chunks() {
        let base = vec![(0, id(0)), (1, id(1)), (2, id(2)), (5, id(5)), (9, id(9))];
        // Same content: nothing differs.
        assert!(differing_positions(&base, 0, 10, &base).is_empty());
        // 1 changed, 3 appeared, 5 now reads zero (absent from the source).
        let src = vec![(0, id(0)), (1, id(11)), (2, id(2)), (3, id(3)), (9, id(9))];
        assert_eq!(differing_positions(&base, 0, 10, &src), vec![1, 3, 5]);
        // Only the range is looked at: 0..2 knows nothing of 5 or 9.
        assert_eq!(
            differing_positions(&base, 0, 2, &[(0, id(0)), (1, id(1))]),
            Vec::<u64>::new()
        );
        // An empty range part reading zero where the point has data.
        assert_eq!(differing_positions(&base, 3, 10, &[]), vec![5, 9]);
        // Beyond the source's end (last batch up to u64::MAX).
        assert_eq!(
            differing_positions(&base, 6, u64::MAX, &[(6, id(6))]),
            vec![6, 9]
        );
        // No base: every non-zero chunk differs.
        assert_eq!(
            differing_positions(&[], 0, 4, &[(0, id(0)), (2, id(2))]),
            vec![0, 2]
        );
    }

    #[test]
    fn message_names_each_disk() {
        let m = check_message(
            "p1",
            &[DiskCheckFigures {
                index: 0,
                path: "a.vhdx".into(),
                chunks_compared: 16,
                chunks_differing: 3,
                bytes_differing: 3 << 20,
                bytes_sent: 1 << 20,
            }],
        );
        assert!(m.starts_with("consistency check: 3 chunk(s) differed; disk 0 (a.vhdx): 16 chunk(s) compared, 3 differing"), "{m}");
        assert!(m.ends_with("point p1"), "{m}");
    }
}
