//! Agent routes: enrolment, inventory, and the backup session protocol
//! (begin → lack/chunks/index … → commit), see docs/protocol.md.

use std::collections::HashMap;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::Json;
use futures_util::StreamExt;
use tierback_format::ids::{ChunkHash, PointId};
use tierback_format::index::DiskIndex;
use tierback_format::wire::*;

use super::session::Session;
use super::stream_conn::StreamConn;
use super::{
    random_secret, secret_hash, AgentAuth, ApiError, SharedState, AGENT_CREDENTIAL_PREFIX,
};
use crate::catalog::{NewPoint, NewStream};
use crate::chunk_store::PutOutcome;

pub async fn enroll(
    State(st): State<SharedState>,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    if req.host_name.is_empty() || req.host_name.len() > 255 {
        return Err(ApiError::BadRequest(
            "host_name must be 1–255 characters".into(),
        ));
    }
    let agent_id = format!("agent-{}", &random_secret()[..16]);
    let credential = format!("{AGENT_CREDENTIAL_PREFIX}{agent_id}.{}", random_secret());
    let ok = st
        .catalog
        .enroll_agent(
            &secret_hash(req.token.trim()),
            &agent_id,
            &req.host_name,
            &secret_hash(&credential),
        )
        .await?;
    if !ok {
        return Err(ApiError::Unauthorized);
    }
    tracing::info!(agent = %agent_id, host = %req.host_name, "agent enrolled");
    Ok(Json(EnrollResponse {
        agent_id,
        credential,
    }))
}

pub async fn inventory(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    Json(req): Json<InventoryRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    for vm in &req.vms {
        record_vm(&st, &agent.id, vm).await?;
    }
    Ok(Json(serde_json::json!({ "vms": req.vms.len() })))
}

async fn record_vm(st: &SharedState, agent_id: &str, vm: &VmInfo) -> Result<(), ApiError> {
    validate_vm(vm)?;
    let descriptor = serde_json::to_string(vm).map_err(|e| ApiError::Internal(e.to_string()))?;
    st.catalog
        .upsert_vm(&vm.id, &vm.name, agent_id, &vm.state, &descriptor)
        .await?;
    Ok(())
}

fn validate_vm(vm: &VmInfo) -> Result<(), ApiError> {
    if vm.id.is_empty()
        || vm.id.len() > 64
        || !vm.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ApiError::BadRequest(format!(
            "VM id {:?} is not a GUID-like id",
            vm.id
        )));
    }
    if vm.name.is_empty() || vm.name.len() > 255 {
        return Err(ApiError::BadRequest(
            "VM name must be 1–255 characters".into(),
        ));
    }
    Ok(())
}

/// Query of `POST /v1/agent/backups`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct BeginQuery {
    /// `consistency-check`: the session is a consistency check.
    #[serde(default)]
    purpose: Option<String>,
}

pub async fn begin_backup(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    axum::extract::Query(q): axum::extract::Query<BeginQuery>,
    Json(req): Json<BeginBackupRequest>,
) -> Result<Json<BeginBackupResponse>, ApiError> {
    let kind = match q.purpose.as_deref() {
        None | Some("backup") => "backup",
        Some(PURPOSE_CONSISTENCY_CHECK) => PURPOSE_CONSISTENCY_CHECK,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unknown backup purpose {other:?}"
            )))
        }
    };
    record_vm(&st, &agent.id, &req.vm).await?;
    for (i, s) in req.streams.iter().enumerate() {
        if s.stream_no as usize != i {
            return Err(ApiError::BadRequest(
                "streams must be numbered 0, 1, 2, … in order".into(),
            ));
        }
        if s.path.is_empty() || s.path.starts_with('/') || s.path.split('/').any(|c| c == "..") {
            return Err(ApiError::BadRequest(format!(
                "stream path {:?} must be relative inside the VM folder",
                s.path
            )));
        }
        if ![512, 4096].contains(&s.logical_sector_size) {
            return Err(ApiError::BadRequest(format!(
                "stream {i}: logical sector size must be 512 or 4096"
            )));
        }
    }
    let base_point = check_base(&st, &req).await?;
    let session_id = random_secret()[..32].to_string();
    let job_id = super::jobs::job_for_backup(&st, &req.vm, &agent.id, kind).await?;
    // A protection group's chunk size wins over the gateway's default.
    let chunk_size = super::groups::chunk_size_for_vm(&st, &req.vm.id).await?;
    // The first point of a VM is a full whatever the agent asked.
    let first = st.catalog.list_points(Some(&req.vm.id)).await?.is_empty();
    st.sessions.insert(Session {
        id: session_id.clone(),
        agent_id: agent.id.clone(),
        job_id,
        vm: req.vm,
        streams: req.streams,
        full: req.full || first,
        base_point,
        chunk_size,
        indexes: HashMap::new(),
        stored_bytes: 0,
        stored_chunks: 0,
        last_activity: Instant::now(),
        gc_writer: st.store.begin_writer(),
    });
    Ok(Json(BeginBackupResponse {
        session_id,
        chunk_size,
        accepts_patches: true,
    }))
}

/// Checks a delta backup's base: the point exists, is the same VM's, and
/// every `base_stream` names one of its disk streams cut with today's chunk size.
async fn check_base(
    st: &SharedState,
    req: &BeginBackupRequest,
) -> Result<Option<PointId>, ApiError> {
    let Some(base) = &req.base_point else {
        if req.streams.iter().any(|s| s.base_stream.is_some()) {
            return Err(ApiError::BadRequest(
                "a stream names a base_stream but the backup has no base_point".into(),
            ));
        }
        return Ok(None);
    };
    let id: PointId = base
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("base_point {base:?} is not a point id")))?;
    let Some((row, streams)) = st.catalog.get_point(&id).await? else {
        return Err(ApiError::Conflict(format!(
            "base point {id} does not exist (any more): back up without a base"
        )));
    };
    if row.vm_id != req.vm.id {
        return Err(ApiError::BadRequest(format!(
            "base point {id} belongs to another VM"
        )));
    }
    for s in &req.streams {
        let Some(b) = s.base_stream else { continue };
        let Some(bs) = streams.iter().find(|x| x.stream_no == i64::from(b)) else {
            return Err(ApiError::BadRequest(format!(
                "stream {}: base point {id} has no stream {b}",
                s.stream_no
            )));
        };
        if s.kind != StreamKind::Disk || bs.kind != "disk" {
            return Err(ApiError::BadRequest(format!(
                "stream {}: only disk streams may be deltas",
                s.stream_no
            )));
        }
        let chunk_size = super::groups::chunk_size_for_vm(st, &req.vm.id).await?;
        if bs.chunk_size != i64::from(chunk_size) {
            return Err(ApiError::Conflict(format!(
                "stream {}: base stream {b} was cut into {}-byte chunks, this VM now uses {}: back up without a base",
                s.stream_no, bs.chunk_size, chunk_size
            )));
        }
    }
    Ok(Some(id))
}

/// `GET /v1/agent/vms/{vm}/last-point`: the VM's newest point, whichever
/// host or agent made it, with the tracking ids recorded for its disks.
pub async fn last_point(
    State(st): State<SharedState>,
    AgentAuth(_agent): AgentAuth,
    Path(vm): Path<String>,
) -> Result<Json<LastPointResponse>, ApiError> {
    let vm = vm.to_ascii_lowercase();
    let none = || ApiError::NotFound(format!("VM {vm} has no recovery point"));
    let id = st.catalog.last_point_of_vm(&vm).await?.ok_or_else(none)?;
    let pid: PointId = id
        .parse()
        .map_err(|_| ApiError::Internal(format!("catalog holds a bad point id {id:?}")))?;
    let (row, streams) = st.catalog.get_point(&pid).await?.ok_or_else(none)?;
    let tracking: HashMap<u32, DiskTrackingIds> =
        st.catalog.point_tracking(&id).await?.into_iter().collect();
    let streams = streams
        .into_iter()
        .map(|s| {
            let n = u32::try_from(s.stream_no).unwrap_or(u32::MAX);
            LastPointStream {
                stream_no: n,
                kind: if s.kind == "disk" {
                    StreamKind::Disk
                } else {
                    StreamKind::Config
                },
                path: s.path,
                controller: s.controller,
                location: s.location,
                size: u64::try_from(s.size).unwrap_or(0),
                chunk_size: u32::try_from(s.chunk_size).unwrap_or(0),
                tracking: tracking.get(&n).cloned(),
            }
        })
        .collect();
    Ok(Json(LastPointResponse {
        point: id,
        time: super::rfc3339(row.created_at),
        streams,
    }))
}

async fn session(
    st: &SharedState,
    id: &str,
    agent_id: &str,
) -> Result<std::sync::Arc<tokio::sync::Mutex<Session>>, ApiError> {
    st.sessions.get(id, agent_id).await.ok_or_else(|| {
        ApiError::NotFound(
            "no such backup session (it may have expired): start a new backup".into(),
        )
    })
}

pub async fn lack(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    Path(sid): Path<String>,
    Json(req): Json<LackRequest>,
) -> Result<Json<LackResponse>, ApiError> {
    session(&st, &sid, &agent.id).await?;
    if req.hashes.len() > MAX_LACK_BATCH {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_LACK_BATCH} hashes per request"
        )));
    }
    let lacking = st.store.lacking(&req.hashes).await?;
    let missing = lacking
        .iter()
        .enumerate()
        .filter(|(_, l)| **l)
        .map(|(i, _)| i as u32)
        .collect();
    Ok(Json(LackResponse { missing }))
}

pub async fn chunks(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    Path(sid): Path<String>,
    body: Body,
) -> Result<Json<ChunksResponse>, ApiError> {
    let sess = session(&st, &sid, &agent.id).await?;
    let resp = store_chunk_records(&st, body).await?;
    let mut s = sess.lock().await;
    s.stored_bytes += resp.stored_bytes;
    s.stored_chunks += resp.stored as u64;
    Ok(Json(resp))
}

/// Chunks of one upload request in flight at once (each holds its bytes and
/// its compressed copy).
const MAX_PUTS_PER_REQUEST: usize = 16;

/// Largest chunk upload body: the records' data plus their heads.
pub(crate) const MAX_UPLOAD_BODY: usize = tierback_format::wire::MAX_CHUNK_BATCH_BYTES + (1 << 20);

/// Stores every chunk record of an upload body (each re-hashed by the
/// store) as the body arrives: a chunk goes to the store as soon as its last
/// byte is in, while the rest of the body is still on the wire. Chunks of
/// one request are stored concurrently (the store bounds the CPU work to one
/// chunk per core and serialises only the append to the open pack). A body
/// that breaks off or is malformed fails the request; chunks stored before
/// that stay (content-addressed, unreferenced until a commit names them).
pub(crate) async fn store_chunk_records(
    st: &SharedState,
    body: Body,
) -> Result<ChunksResponse, ApiError> {
    let mut split = ChunkRecordSplitter::new(MAX_UPLOAD_BODY);
    let mut body = body.into_data_stream();
    let mut records = Vec::new();
    let mut sink = RecordSink::default();
    while let Some(piece) = body.next().await {
        let piece =
            piece.map_err(|e| ApiError::BadRequest(format!("reading the upload body: {e}")))?;
        split
            .push(piece, &mut records)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        for r in records.drain(..) {
            sink.put(st, r).await?;
        }
    }
    split
        .finish()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    sink.finish().await
}

/// The chunk records of one upload (a request body or a batch of a chunk
/// stream) being stored, at most [`MAX_PUTS_PER_REQUEST`] at once, and
/// what became of those done.
#[derive(Default)]
struct RecordSink {
    set: tokio::task::JoinSet<PutResult>,
    resp: ChunksResponse,
}

impl RecordSink {
    /// Starts storing `r`, after waiting for a put to end if too many run.
    async fn put(&mut self, st: &SharedState, r: ChunkRecord) -> Result<(), ApiError> {
        let store = st.store.clone();
        self.set.spawn(async move {
            let out = match (r.patch, r.base) {
                (true, Some(base)) => store.put_patch(r.hash, base, r.data).await,
                _ => store.put_with_base(r.hash, r.data, r.base).await,
            };
            (r.hash, out)
        });
        while self.set.len() >= MAX_PUTS_PER_REQUEST {
            if let Some(r) = self.set.join_next().await {
                tally(&mut self.resp, r)?;
            }
        }
        Ok(())
    }

    /// Waits for every put; the first failure is the answer.
    async fn finish(mut self) -> Result<ChunksResponse, ApiError> {
        while let Some(r) = self.set.join_next().await {
            tally(&mut self.resp, r)?;
        }
        Ok(self.resp)
    }
}

/// `POST /v1/agent/backups/{session}/chunk-stream` with `Upgrade:
/// tierback-chunks/1` ([`CHUNK_STREAM_PROTOCOL`]): the chunk records of
/// `chunks`, sent over the connection itself once it is upgraded, batch
/// after batch (docs/protocol.md, "Chunk streams"). Each record's data
/// lands in a buffer of its own, without HTTP body framing or the
/// gathering copy a request body needs; over TLS 1.3 the gateway protects
/// the records itself and decrypts them in that buffer
/// (`stream_conn::take_over`).
pub async fn chunk_stream(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    Path(sid): Path<String>,
    mut req: axum::extract::Request,
) -> Result<axum::response::Response, ApiError> {
    session(&st, &sid, &agent.id).await?;
    let asked = req
        .headers()
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if asked != Some(CHUNK_STREAM_PROTOCOL) {
        return Err(ApiError::BadRequest(format!(
            "this route upgrades the connection: send `Connection: upgrade` and `Upgrade: {CHUNK_STREAM_PROTOCOL}`"
        )));
    }
    let on = hyper::upgrade::on(&mut req);
    let agent_id = agent.id;
    let tasks = st.chunk_streams.tasks.clone();
    tasks.spawn(async move {
        use super::stream_conn::{take_over, Taken};
        let served = match on.await.map_err(std::io::Error::other).and_then(take_over) {
            Ok(Taken::Records(mut c)) => {
                tracing::debug!(session = %sid, "chunk stream: TLS 1.3 records protected by the gateway");
                serve_chunk_stream(&st, &sid, &agent_id, &mut *c).await
            }
            Ok(Taken::Rustls(mut c)) => {
                tracing::debug!(session = %sid, "chunk stream: through rustls");
                serve_chunk_stream(&st, &sid, &agent_id, &mut *c).await
            }
            Ok(Taken::Other(mut c)) => serve_chunk_stream(&st, &sid, &agent_id, &mut c).await,
            Err(e) => Err(e),
        };
        if let Err(e) = served {
            tracing::debug!(session = %sid, error = %e, "chunk stream ended");
        }
    });
    axum::response::Response::builder()
        .status(axum::http::StatusCode::SWITCHING_PROTOCOLS)
        .header(axum::http::header::CONNECTION, "upgrade")
        .header(axum::http::header::UPGRADE, CHUNK_STREAM_PROTOCOL)
        .body(Body::empty())
        .map_err(|e| ApiError::Internal(format!("upgrade response: {e}")))
}

/// Serves one upgraded chunk stream: reads `len u64 LE | records` batches
/// until a batch of length 0 or the end of the connection, and answers each
/// with `status u8 | len u32 LE | JSON` (status 0: [`ChunksResponse`],
/// otherwise [`ApiErrorBody`]). A failed batch ends the stream (its unread
/// rest would be taken for the next batch); the agent sends it again on a
/// new one.
async fn serve_chunk_stream(
    st: &SharedState,
    sid: &str,
    agent_id: &str,
    io: &mut impl StreamConn,
) -> std::io::Result<()> {
    let idle = std::time::Duration::from_secs(st.cfg.session_idle_timeout_secs);
    let stop = st.chunk_streams.stop.clone();
    loop {
        let mut len = [0u8; 8];
        // Between batches a shutdown ends the stream (the agent sends the
        // next batch as a request, which a stopping gateway refuses).
        let next = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = tokio::time::timeout(idle, io.read_exact(&mut len)) => r,
        };
        match next {
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let len = u64::from_le_bytes(len);
        if len == 0 {
            return Ok(());
        }
        let result = match session(st, sid, agent_id).await {
            Ok(sess) => match stream_batch(st, io, len, idle).await {
                Ok(resp) => {
                    let mut s = sess.lock().await;
                    s.stored_bytes += resp.stored_bytes;
                    s.stored_chunks += resp.stored as u64;
                    Ok(resp)
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let (status, body) = match &result {
            Ok(resp) => (0u8, serde_json::to_vec(resp)),
            Err(e) => (1u8, serde_json::to_vec(&e.answer().1)),
        };
        let body = body.map_err(std::io::Error::other)?;
        let mut frame = Vec::with_capacity(5 + body.len());
        frame.push(status);
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        io.send(&frame).await?;
        if let Err(e) = result {
            return Err(std::io::Error::other(e.to_string()));
        }
    }
}

/// Reads one batch of `len` bytes of chunk records from a chunk stream,
/// each record's data into a buffer of its own, and stores them.
async fn stream_batch(
    st: &SharedState,
    io: &mut impl StreamConn,
    len: u64,
    idle: std::time::Duration,
) -> Result<ChunksResponse, ApiError> {
    if len > MAX_UPLOAD_BODY as u64 {
        return Err(ApiError::BadRequest(
            FrameError::BodyTooLarge(MAX_UPLOAD_BODY).to_string(),
        ));
    }
    let broken = |e: std::io::Error| ApiError::BadRequest(format!("reading the chunk stream: {e}"));
    let truncated = || ApiError::BadRequest(FrameError::Truncated("chunk").to_string());
    let mut left = len as usize;
    let mut sink = RecordSink::default();
    while left > 0 {
        let mut head = [0u8; RECORD_HEAD_LEN];
        if left < head.len() {
            return Err(truncated());
        }
        read_within(idle, io.read_exact(&mut head))
            .await
            .map_err(broken)?;
        left -= head.len();
        let w = parse_record_word(&head).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let base = if w.has_base {
            let mut b = [0u8; RECORD_BASE_LEN];
            if left < b.len() {
                return Err(truncated());
            }
            read_within(idle, io.read_exact(&mut b))
                .await
                .map_err(broken)?;
            left -= b.len();
            Some(ChunkHash(b))
        } else {
            None
        };
        if w.len > left {
            return Err(truncated());
        }
        let data = read_within(idle, io.read_bytes(w.len))
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => truncated(),
                _ => broken(e),
            })?;
        left -= w.len;
        sink.put(
            st,
            ChunkRecord {
                hash: w.hash,
                base,
                patch: w.patch,
                data,
            },
        )
        .await?;
    }
    sink.finish().await
}

/// A read of a chunk stream (a head, or one record's data) that must end
/// within `idle`.
async fn read_within<T>(
    idle: std::time::Duration,
    read: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(idle, read)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

type PutResult = (
    ChunkHash,
    Result<PutOutcome, crate::chunk_store::StoreError>,
);

fn tally(
    resp: &mut ChunksResponse,
    r: Result<PutResult, tokio::task::JoinError>,
) -> Result<(), ApiError> {
    let (hash, r) = r.map_err(|e| ApiError::Internal(format!("chunk task failed: {e}")))?;
    match r? {
        PutOutcome::Stored { stored_bytes } => {
            resp.stored += 1;
            resp.stored_bytes += stored_bytes;
        }
        PutOutcome::Duplicate => resp.duplicate += 1,
        PutOutcome::Refused => resp.refused.push(hash),
    }
    Ok(())
}

pub async fn stream_index(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    Path((sid, stream)): Path<(String, u32)>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sess = session(&st, &sid, &agent.id).await?;
    let entries = decode_stream_index(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let mut s = sess.lock().await;
    if stream as usize >= s.streams.len() {
        return Err(ApiError::BadRequest(format!(
            "stream {stream} was not announced"
        )));
    }
    let delta = s.streams[stream as usize].base_stream.is_some();
    if !delta && entries.iter().any(|(_, h)| *h == DELTA_ZERO_HASH) {
        return Err(ApiError::BadRequest(format!(
            "stream {stream}: the zero marker is only valid in a delta index (no base_stream)"
        )));
    }
    let v = s.indexes.entry(stream).or_default();
    v.extend(entries);
    let n = v.len();
    Ok(Json(serde_json::json!({ "entries": n })))
}

pub async fn abort(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    Path(sid): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sess = session(&st, &sid, &agent.id).await?;
    st.sessions.remove(&sid);
    let job = sess.lock().await.job_id.clone();
    st.catalog
        .finish_job(&job, "failed", "aborted by the agent", None)
        .await?;
    Ok(Json(serde_json::json!({})))
}

pub async fn commit(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    Path(sid): Path<String>,
    Json(full_req): Json<CheckCommitRequest>,
) -> Result<Json<CommitResponse>, ApiError> {
    let req = &full_req.commit;
    let sess = session(&st, &sid, &agent.id).await?;
    let mut s = sess.lock().await;
    let job_id = s.job_id.clone();
    let check = full_req.consistency.as_deref();
    match commit_locked(&st, &agent.id, &mut s, req, check.is_some()).await {
        Ok(resp) => {
            st.sessions.remove(&sid);
            let mut message = match check {
                Some(disks) => super::consistency::check_message(&resp.point, disks),
                None => format!("point {}", resp.point),
            };
            if !req.alerts.is_empty() {
                message += &format!("; ALERTS: {}", req.alerts.join("; "));
            }
            st.catalog
                .finish_job(&job_id, "succeeded", &message, Some(&resp.point))
                .await?;
            tracing::info!(vm = %s.vm.name, point = %resp.point, stored = resp.stored_bytes, "recovery point committed");
            Ok(Json(resp))
        }
        Err(e) => {
            // The session stays open: the agent may send what was missing and commit again.
            tracing::warn!(vm = %s.vm.name, error = %e, "commit refused");
            Err(e)
        }
    }
}

async fn commit_locked(
    st: &SharedState,
    agent_id: &str,
    s: &mut Session,
    req: &CommitRequest,
    consistency_check: bool,
) -> Result<CommitResponse, ApiError> {
    // Rule 1: every chunk durable before an index names it.
    st.store.flush().await?;
    let point = PointId::random();
    let cs = s.chunk_size as u64;
    let mut logical_bytes = 0u64;
    let mut streams = Vec::with_capacity(s.streams.len());
    for spec in &s.streams {
        let mut entries = s.indexes.remove(&spec.stream_no).unwrap_or_default();
        // A part re-sent after a lost answer repeats entries; identical
        // repeats are harmless, two hashes for one chunk are not.
        entries.sort_by(|a, b| a.0.cmp(&b.0).then(a.1 .0.cmp(&b.1 .0)));
        entries.dedup();
        if entries.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(ApiError::BadRequest(format!(
                "stream {}: a chunk number has two different hashes",
                spec.stream_no
            )));
        }
        let nchunks = spec.size.div_ceil(cs);
        if let Some(last) = entries.last() {
            if last.0 >= nchunks {
                return Err(ApiError::BadRequest(format!(
                    "stream {}: chunk {} lies beyond the stream's {} bytes",
                    spec.stream_no, last.0, spec.size
                )));
            }
        }
        let ids: Vec<_> = entries
            .iter()
            .filter(|(_, h)| *h != DELTA_ZERO_HASH)
            .map(|(_, h): &(u64, ChunkHash)| st.store.chunk_id(h))
            .collect();
        let index = match (spec.base_stream, &s.base_point) {
            (Some(b), Some(base)) => {
                apply_delta(st, base, b, spec.size, s.chunk_size, &entries, &ids).await?
            }
            _ => DiskIndex {
                size: spec.size,
                chunk_size: s.chunk_size,
                entries: entries
                    .iter()
                    .zip(&ids)
                    .map(|((n, _), id)| (*n, *id))
                    .collect(),
            },
        };
        // For a delta this checks (and touches, against a concurrent GC)
        // the base point's chunks too, not just the ones sent now.
        let all: Vec<_> = index.entries.iter().map(|(_, id)| *id).collect();
        let missing = st.store.missing(&all).await?;
        if !missing.is_empty() {
            // Put the entries back so a retry after re-sending can commit.
            s.indexes.insert(spec.stream_no, entries);
            return Err(ApiError::Conflict(format!(
                "stream {}: {} chunk(s) named by the index were never received; send them and commit again",
                spec.stream_no,
                missing.len()
            )));
        }
        let (stream, bytes) = store_stream_index(st, &point, spec, s.chunk_size, &index).await?;
        logical_bytes += bytes;
        streams.push(stream);
    }
    // Tracking rows first: if the commit below fails they name no visible point.
    let tracking: Vec<(u32, DiskTrackingIds)> = s
        .streams
        .iter()
        .filter_map(|x| Some((x.stream_no, x.tracking.clone()?)))
        .collect();
    let base = s.base_point.map(|b| b.to_string());
    if !tracking.is_empty() || base.is_some() {
        st.catalog
            .put_point_tracking(&point.to_string(), base.as_deref(), &tracking)
            .await?;
    }
    // Rule 3: one transaction makes the point visible.
    st.catalog
        .commit_point(&NewPoint {
            id: point,
            vm_id: s.vm.id.clone(),
            vm_name: s.vm.name.clone(),
            created_at: crate::catalog::now_secs(),
            // A consistency check's point is an incremental (the points
            // table allows full | incremental); its job says what it was.
            kind: if s.full && !consistency_check {
                "full".into()
            } else {
                "incremental".into()
            },
            agent_id: agent_id.to_string(),
            job_id: Some(s.job_id.clone()),
            logical_bytes,
            stored_bytes: s.stored_bytes,
            bytes_read: req.bytes_read,
            bytes_sent: req.bytes_sent,
            streams,
        })
        .await?;
    Ok(CommitResponse {
        point: point.to_string(),
        logical_bytes,
        stored_bytes: s.stored_bytes,
    })
}

/// The complete index of a DELTA stream: the base point's index for stream
/// `base_stream`, cut to the new size (a shrunk disk drops what lies beyond),
/// with the delta's entries applied (`DELTA_ZERO_HASH` removes a chunk).
/// `ids` are the keyed ids of the delta's non-zero entries, in order.
async fn apply_delta(
    st: &SharedState,
    base: &PointId,
    base_stream: u32,
    size: u64,
    chunk_size: u32,
    delta: &[(u64, ChunkHash)],
    ids: &[tierback_format::ids::ChunkId],
) -> Result<DiskIndex, ApiError> {
    let old = st.store.read_index(base, base_stream).await?;
    if old.chunk_size != chunk_size {
        return Err(ApiError::Conflict(format!(
            "base stream {base_stream} of point {base} uses {}-byte chunks, not {chunk_size}",
            old.chunk_size
        )));
    }
    let slots = size.div_ceil(u64::from(chunk_size));
    let mut map: std::collections::BTreeMap<u64, _> = old
        .entries
        .into_iter()
        .filter(|(n, _)| *n < slots)
        .collect();
    let mut ids = ids.iter();
    for (n, h) in delta {
        if *h == DELTA_ZERO_HASH {
            map.remove(n);
        } else {
            let id = ids
                .next()
                .ok_or_else(|| ApiError::Internal("delta ids out of step".into()))?;
            map.insert(*n, *id);
        }
    }
    Ok(DiskIndex {
        size,
        chunk_size,
        entries: map.into_iter().collect(),
    })
}

/// Writes a stream's complete index durably for a point about to be
/// committed (DESIGN §6 rule 2: before the point names it) and describes the
/// stream for the catalog; returns it with the non-zero bytes it covers.
/// Callers have already checked that every chunk it names is stored.
pub(crate) async fn store_stream_index(
    st: &SharedState,
    point: &PointId,
    spec: &StreamSpec,
    chunk_size: u32,
    index: &DiskIndex,
) -> Result<(NewStream, u64), ApiError> {
    let cs = u64::from(chunk_size);
    let logical_bytes = index
        .entries
        .iter()
        .map(|(n, _)| cs.min(spec.size - n * cs))
        .sum();
    st.store.write_index(point, spec.stream_no, index).await?;
    let stream = NewStream {
        stream_no: spec.stream_no,
        kind: match spec.kind {
            StreamKind::Disk => "disk".into(),
            StreamKind::Config => "config".into(),
        },
        path: spec.path.clone(),
        controller: spec.controller.clone(),
        location: spec.location.clone(),
        size: spec.size,
        chunk_size,
        logical_sector: spec.logical_sector_size,
        physical_sector: spec.physical_sector_size,
        chunk_count: index.entries.len() as u64,
    };
    Ok((stream, logical_bytes))
}
