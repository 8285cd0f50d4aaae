//! Offline seeding: the agent asks which chunk size an export must use
//! (`GET /v1/agent/vms/{vm}/seed-params`) and which VMs of a group are its
//! (`GET /v1/agent/groups/{name}/seed-members`), and the admin CLI streams a
//! decrypted, verified seed into the running gateway through an import
//! session that mirrors the backup protocol:
//!
//! `POST /v1/admin/import/begin` → `…/{session}/chunks` (records
//! `hash | len | data`, re-hashed by the store) → `…/{session}/streams/{n}/index`
//! → `…/{session}/commit` (or `…/abort`).
//!
//! The commit goes through the same store calls as a backup's (`flush`,
//! `missing`, `write_index`, then `commit_point` in one transaction), so
//! DESIGN.md §6 write ordering holds; the point id is the one chosen at
//! export (the agent's change-tracking state already names it). Until the
//! commit nothing is visible; an abandoned import leaves only garbage for GC.

use std::collections::HashMap;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use tierback_format::ids::{ChunkHash, PointId};
use tierback_format::index::DiskIndex;
use tierback_format::wire::*;

use super::session::Session;
use super::{random_secret, AdminAuth, AgentAuth, ApiError, SharedState};
use crate::catalog::NewPoint;

/// Owner of import sessions in the session table: no agent id looks like it,
/// so agents never reach an import session.
const IMPORT_OWNER: &str = "admin:import";

/// The routes of this module (chunk bodies up to the backup limit).
pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/v1/agent/vms/{vm}/seed-params", get(seed_params))
        .route("/v1/agent/groups/{name}/seed-members", get(seed_members))
        .route("/v1/admin/import/begin", post(begin))
        .route("/v1/admin/import/{session}/chunks", post(chunks))
        .route(
            "/v1/admin/import/{session}/streams/{stream}/index",
            post(stream_index),
        )
        .route("/v1/admin/import/{session}/commit", post(commit))
        .route("/v1/admin/import/{session}/abort", post(abort))
        .layer(DefaultBodyLimit::max(super::agent::MAX_UPLOAD_BODY))
}

/// `GET /v1/agent/vms/{vm}/seed-params`: the chunk size an export of the VM
/// must cut its streams into.
pub async fn seed_params(
    State(st): State<SharedState>,
    AgentAuth(_agent): AgentAuth,
    Path(vm): Path<String>,
) -> Result<Json<SeedParamsResponse>, ApiError> {
    let vm = vm.to_ascii_lowercase();
    let chunk_size = super::groups::chunk_size_for_vm(&st, &vm).await?;
    Ok(Json(SeedParamsResponse { chunk_size }))
}

/// `GET /v1/agent/groups/{name}/seed-members`: the group's VMs on the
/// caller's host (by the last inventory), for `export --group`.
pub async fn seed_members(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    Path(name): Path<String>,
) -> Result<Json<SeedMembersResponse>, ApiError> {
    if st.catalog.get_group(&name).await?.is_none() {
        return Err(ApiError::NotFound(format!("no protection group {name:?}")));
    }
    let vm_ids = st
        .catalog
        .group_members(Some(&name))
        .await?
        .into_iter()
        .filter(|m| m.agent_id == agent.id)
        .map(|m| m.vm_id)
        .collect();
    Ok(Json(SeedMembersResponse { vm_ids }))
}

fn bad(msg: String) -> ApiError {
    ApiError::BadRequest(msg)
}

async fn begin(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Json(req): Json<ImportBeginRequest>,
) -> Result<Json<BeginBackupResponse>, ApiError> {
    let point: PointId = req
        .point
        .parse()
        .map_err(|_| bad(format!("point {:?} is not a point id", req.point)))?;
    if st.catalog.get_point(&point).await?.is_some() {
        return Err(ApiError::Conflict(format!(
            "point {point} already exists: this seed was imported before"
        )));
    }
    if st.catalog.agent(&req.agent_id).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "the seed was exported by agent {}, which is not enrolled here",
            req.agent_id
        )));
    }
    if !st.catalog.list_points(Some(&req.vm.id)).await?.is_empty() {
        return Err(ApiError::Conflict(format!(
            "VM {} already has recovery points: a seed can only be its first",
            req.vm.name
        )));
    }
    let want = super::groups::chunk_size_for_vm(&st, &req.vm.id).await?;
    if req.chunk_size != want {
        return Err(ApiError::Conflict(format!(
            "the seed was cut into {}-byte chunks but VM {} now uses {want}: export it again",
            req.chunk_size, req.vm.name
        )));
    }
    for (i, s) in req.streams.iter().enumerate() {
        if s.stream_no as usize != i || s.base_stream.is_some() {
            return Err(bad(
                "streams must be numbered 0, 1, 2, … without base_stream".into(),
            ));
        }
        if s.path.is_empty() || s.path.starts_with('/') || s.path.split('/').any(|c| c == "..") {
            return Err(bad(format!(
                "stream path {:?} must be relative inside the VM folder",
                s.path
            )));
        }
    }
    if req.vm.id.is_empty()
        || req.vm.id.len() > 64
        || !req
            .vm
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(bad(format!("VM id {:?} is not a GUID-like id", req.vm.id)));
    }
    let descriptor =
        serde_json::to_string(&req.vm).map_err(|e| ApiError::Internal(e.to_string()))?;
    st.catalog
        .upsert_vm(
            &req.vm.id,
            &req.vm.name,
            &req.agent_id,
            &req.vm.state,
            &descriptor,
        )
        .await?;
    let job_id = format!("job-{}", &random_secret()[..16]);
    st.catalog
        .start_job(&job_id, "import", &req.vm.id, &req.vm.name, &req.agent_id)
        .await?;
    let session_id = random_secret()[..32].to_string();
    st.sessions.insert(Session {
        id: session_id.clone(),
        agent_id: IMPORT_OWNER.into(),
        job_id,
        vm: req.vm,
        streams: req.streams,
        full: true,
        base_point: None,
        chunk_size: req.chunk_size,
        indexes: HashMap::new(),
        stored_bytes: 0,
        stored_chunks: 0,
        last_activity: Instant::now(),
        gc_writer: st.store.begin_writer(),
    });
    tracing::info!(seed = %req.seed_id, point = %point, "import started");
    Ok(Json(BeginBackupResponse {
        session_id,
        chunk_size: req.chunk_size,
        accepts_patches: true,
    }))
}

async fn session(
    st: &SharedState,
    id: &str,
) -> Result<std::sync::Arc<tokio::sync::Mutex<Session>>, ApiError> {
    st.sessions
        .get(id, IMPORT_OWNER)
        .await
        .ok_or_else(|| ApiError::NotFound("no such import session (it may have expired)".into()))
}

async fn chunks(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Path(sid): Path<String>,
    body: Body,
) -> Result<Json<ChunksResponse>, ApiError> {
    let sess = session(&st, &sid).await?;
    let resp = super::agent::store_chunk_records(&st, body).await?;
    let mut s = sess.lock().await;
    s.stored_bytes += resp.stored_bytes;
    s.stored_chunks += u64::from(resp.stored);
    Ok(Json(resp))
}

async fn stream_index(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Path((sid, stream)): Path<(String, u32)>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sess = session(&st, &sid).await?;
    let entries = decode_stream_index(&body).map_err(|e| bad(e.to_string()))?;
    let mut s = sess.lock().await;
    if stream as usize >= s.streams.len() {
        return Err(bad(format!("stream {stream} was not announced")));
    }
    if entries.iter().any(|(_, h)| *h == DELTA_ZERO_HASH) {
        return Err(bad(format!(
            "stream {stream}: the zero marker is not valid in an import"
        )));
    }
    let v = s.indexes.entry(stream).or_default();
    v.extend(entries);
    let n = v.len();
    Ok(Json(serde_json::json!({ "entries": n })))
}

async fn abort(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Path(sid): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sess = session(&st, &sid).await?;
    st.sessions.remove(&sid);
    let job = sess.lock().await.job_id.clone();
    st.catalog
        .finish_job(
            &job,
            "failed",
            "import aborted: the seed did not verify",
            None,
        )
        .await?;
    Ok(Json(serde_json::json!({})))
}

async fn commit(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Path(sid): Path<String>,
    Json(body): Json<ImportCommitRequest>,
) -> Result<Json<CommitResponse>, ApiError> {
    let sess = session(&st, &sid).await?;
    let point: PointId = body
        .point
        .parse()
        .map_err(|_| bad(format!("point {:?} is not a point id", body.point)))?;
    let mut s = sess.lock().await;
    let job_id = s.job_id.clone();
    if st.catalog.agent(&body.agent_id).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "agent {} is not enrolled here",
            body.agent_id
        )));
    }
    let resp = commit_locked(&st, &mut s, point, &body).await?;
    st.sessions.remove(&sid);
    let message = format!(
        "point {}; imported from offline seed {}",
        resp.point, body.seed_id
    );
    st.catalog
        .finish_job(&job_id, "succeeded", &message, Some(&resp.point))
        .await?;
    tracing::info!(vm = %s.vm.name, point = %resp.point, seed = %body.seed_id, "offline seed imported");
    Ok(Json(resp))
}

async fn commit_locked(
    st: &SharedState,
    s: &mut Session,
    point: PointId,
    req: &ImportCommitRequest,
) -> Result<CommitResponse, ApiError> {
    if st.catalog.get_point(&point).await?.is_some() {
        return Err(ApiError::Conflict(format!("point {point} already exists")));
    }
    // Rule 1: every chunk durable before an index names it.
    st.store.flush().await?;
    let cs = u64::from(s.chunk_size);
    let mut logical_bytes = 0u64;
    let mut streams = Vec::with_capacity(s.streams.len());
    for spec in &s.streams {
        let mut entries: Vec<(u64, ChunkHash)> =
            s.indexes.get(&spec.stream_no).cloned().unwrap_or_default();
        entries.sort_by(|a, b| a.0.cmp(&b.0).then(a.1 .0.cmp(&b.1 .0)));
        entries.dedup();
        if entries.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(bad(format!(
                "stream {}: a chunk number has two different hashes",
                spec.stream_no
            )));
        }
        if entries
            .last()
            .is_some_and(|l| l.0 >= spec.size.div_ceil(cs))
        {
            return Err(bad(format!(
                "stream {}: an index entry lies beyond the stream's {} bytes",
                spec.stream_no, spec.size
            )));
        }
        let index = DiskIndex {
            size: spec.size,
            chunk_size: s.chunk_size,
            entries: entries
                .iter()
                .map(|(n, h)| (*n, st.store.chunk_id(h)))
                .collect(),
        };
        let all: Vec<_> = index.entries.iter().map(|(_, id)| *id).collect();
        let missing = st.store.missing(&all).await?;
        if !missing.is_empty() {
            return Err(ApiError::Conflict(format!(
                "stream {}: {} chunk(s) named by the seed's index were not imported",
                spec.stream_no,
                missing.len()
            )));
        }
        let (stream, bytes) =
            super::agent::store_stream_index(st, &point, spec, s.chunk_size, &index).await?;
        logical_bytes += bytes;
        streams.push(stream);
    }
    let tracking: Vec<(u32, DiskTrackingIds)> = s
        .streams
        .iter()
        .filter_map(|x| Some((x.stream_no, x.tracking.clone()?)))
        .collect();
    if !tracking.is_empty() {
        st.catalog
            .put_point_tracking(&point.to_string(), None, &tracking)
            .await?;
    }
    // Rule 3: one transaction makes the point visible.
    st.catalog
        .commit_point(&NewPoint {
            id: point,
            vm_id: s.vm.id.clone(),
            vm_name: s.vm.name.clone(),
            created_at: crate::catalog::now_secs(),
            kind: "full".into(),
            agent_id: req.agent_id.clone(),
            job_id: Some(s.job_id.clone()),
            logical_bytes,
            stored_bytes: s.stored_bytes,
            bytes_read: req.bytes,
            bytes_sent: req.bytes,
            streams,
        })
        .await?;
    Ok(CommitResponse {
        point: point.to_string(),
        logical_bytes,
        stored_bytes: s.stored_bytes,
    })
}
