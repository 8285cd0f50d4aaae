//! Admin routes: inventory, recovery points, restore reads, enrolment tokens,
//! verify, jobs.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use tierback_format::ids::{ChunkId, PointId};
use tierback_format::index::DiskIndex;
use tierback_format::wire::*;

use super::{random_secret, rfc3339, secret_hash, AdminAuth, ApiError, SharedState};
use crate::catalog::{now_secs, ChunkLocation, PointRow, StreamRow};

/// Decoded stream indexes of recent restores (decrypting a large index per
/// data request would cost more than the data).
#[derive(Default)]
pub struct IndexCache {
    inner: Mutex<Vec<CachedIndex>>,
}

type CachedIndex = ((PointId, u32), Arc<DiskIndex>);

impl IndexCache {
    const CAPACITY: usize = 8;

    pub(crate) async fn get(
        &self,
        st: &SharedState,
        point: PointId,
        stream: u32,
    ) -> Result<Arc<DiskIndex>, ApiError> {
        if let Some(hit) = self
            .lock()
            .iter()
            .find(|(k, _)| *k == (point, stream))
            .map(|(_, v)| v.clone())
        {
            return Ok(hit);
        }
        let idx = Arc::new(st.store.read_index(&point, stream).await?);
        let mut g = self.lock();
        if g.len() >= Self::CAPACITY {
            g.remove(0);
        }
        g.push(((point, stream), idx.clone()));
        Ok(idx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<CachedIndex>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub async fn vms(
    State(st): State<SharedState>,
    _a: AdminAuth,
) -> Result<Json<Vec<VmSummary>>, ApiError> {
    let rows = st.catalog.list_vms().await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let info: Option<VmInfo> = serde_json::from_str(&r.descriptor).ok();
        out.push(VmSummary {
            id: r.id,
            name: r.name,
            agent_id: r.agent_id,
            host_name: r.host_name,
            state: r.state,
            disks: info.map(|i| i.disks).unwrap_or_default(),
            points: r.points as u64,
            last_point: r.last_point.map(rfc3339),
        });
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct PointsQuery {
    vm: Option<String>,
}

fn point_summary(p: &PointRow) -> PointSummary {
    PointSummary {
        id: p.id.clone(),
        vm_id: p.vm_id.clone(),
        vm_name: p.vm_name.clone(),
        time: rfc3339(p.created_at),
        kind: p.kind.clone(),
        tiers: vec!["local".into()],
        logical_bytes: p.logical_bytes as u64,
        stored_bytes: p.stored_bytes as u64,
        bytes_read: p.bytes_read as u64,
        bytes_sent: p.bytes_sent as u64,
        state: p.state.clone(),
    }
}

fn stream_summary(s: &StreamRow) -> StreamSummary {
    StreamSummary {
        stream_no: s.stream_no as u32,
        kind: if s.kind == "disk" {
            StreamKind::Disk
        } else {
            StreamKind::Config
        },
        path: s.path.clone(),
        controller: s.controller.clone(),
        location: s.location.clone(),
        size: s.size as u64,
        chunk_size: s.chunk_size as u32,
        logical_sector_size: s.logical_sector as u32,
        physical_sector_size: s.physical_sector as u32,
        chunk_count: s.chunk_count as u64,
    }
}

pub async fn points(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Query(q): Query<PointsQuery>,
) -> Result<Json<Vec<PointSummary>>, ApiError> {
    let rows = st.catalog.list_points(q.vm.as_deref()).await?;
    Ok(Json(rows.iter().map(point_summary).collect()))
}

fn parse_point(text: &str) -> Result<PointId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::NotFound(format!("no recovery point {text:?}")))
}

pub async fn point(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Path(point): Path<String>,
) -> Result<Json<PointDetail>, ApiError> {
    let id = parse_point(&point)?;
    let (p, streams) = st
        .catalog
        .get_point(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no recovery point {point}")))?;
    Ok(Json(PointDetail {
        point: point_summary(&p),
        streams: streams.iter().map(stream_summary).collect(),
    }))
}

async fn stream_index(
    st: &SharedState,
    point: &str,
    stream: u32,
) -> Result<Arc<DiskIndex>, ApiError> {
    let id = parse_point(point)?;
    let (_, streams) = st
        .catalog
        .get_point(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no recovery point {point}")))?;
    if !streams.iter().any(|s| s.stream_no as u32 == stream) {
        return Err(ApiError::NotFound(format!(
            "recovery point {point} has no stream {stream}"
        )));
    }
    st.indexes.get(st, id, stream).await
}

pub async fn extents(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Path((point, stream)): Path<(String, u32)>,
) -> Result<Json<StreamExtents>, ApiError> {
    let idx = stream_index(&st, &point, stream).await?;
    Ok(Json(StreamExtents {
        chunk_size: idx.chunk_size,
        size: idx.size,
        chunks: idx.entries.iter().map(|e| e.0).collect(),
    }))
}

#[derive(Deserialize)]
pub struct DataQuery {
    first: u64,
    count: u64,
    /// `frames` ([`DATA_FORMAT_FRAMES`]): payload frames instead of plaintext.
    format: Option<String>,
}

/// Chunk reads (blocking: pread and AES-GCM, plus zstd and BLAKE3 for
/// plaintext) a data request keeps running at once. Restore clients keep a
/// few requests in flight, so the gateway's cores all work.
const DATA_READ_AHEAD: usize = 4;

/// Chunks a payload-frames request reads per blocking task (records a
/// backup wrote back to back come in one pread); the request keeps
/// `DATA_READ_AHEAD / PAYLOAD_BATCH + 1` such tasks going.
const PAYLOAD_BATCH: usize = 4;

/// Chunks `first .. first+count` of a stream. By default their plaintext,
/// each a full chunk (the last one of the stream clipped to its size), absent
/// chunks as zeros, every chunk checked against its id. With
/// `format=frames`, one payload frame per present chunk, ascending: the
/// decrypted but still-compressed payload, for the client to decompress
/// (half the bytes on the wire, and the zstd work moves to the client); a
/// chunk that cannot be read ends the body with an error frame naming it.
pub async fn data(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Path((point, stream)): Path<(String, u32)>,
    Query(q): Query<DataQuery>,
) -> Result<Response, ApiError> {
    let frames = match q.format.as_deref() {
        None | Some("plain") => false,
        Some(DATA_FORMAT_FRAMES) => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unknown data format {other:?} (known: plain, {DATA_FORMAT_FRAMES})"
            )))
        }
    };
    let idx = stream_index(&st, &point, stream).await?;
    let cs = idx.chunk_size as u64;
    let nchunks = idx.size.div_ceil(cs);
    if q.count == 0 || q.count > 1024 || q.first >= nchunks || q.first + q.count > nchunks {
        return Err(ApiError::BadRequest(format!(
            "chunk range {}+{} is outside the stream's {nchunks} chunks (at most 1024 per request)",
            q.first, q.count
        )));
    }
    // Index entries are sorted by chunk number (an index invariant).
    let end = q.first + q.count;
    let lo = idx.entries.partition_point(|e| e.0 < q.first);
    let hi = idx.entries.partition_point(|e| e.0 < end);
    let present: Vec<(u64, ChunkId)> = idx.entries[lo..hi].iter().map(|e| (e.0, e.1)).collect();
    let ids: Vec<ChunkId> = present.iter().map(|p| p.1).collect();
    let locs = st.store.locate(&ids).await?;
    let mut located = Vec::with_capacity(present.len());
    for ((n, id), loc) in present.into_iter().zip(locs) {
        let loc = loc.ok_or_else(|| {
            ApiError::Internal(format!(
                "chunk {n} of stream {stream} of recovery point {point} ({id}) is not in the local store"
            ))
        })?;
        located.push((n, id, loc));
    }
    let store = st.store.clone();
    if frames {
        let batches: Vec<Vec<(u64, ChunkId, ChunkLocation)>> =
            located.chunks(PAYLOAD_BATCH).map(<[_]>::to_vec).collect();
        let body = futures_util::stream::iter(batches)
            .map(move |batch| {
                let store = store.clone();
                async move {
                    let nos: Vec<u64> = batch.iter().map(|c| c.0).collect();
                    let read = store
                        .get_payloads_at(batch.into_iter().map(|(_, id, loc)| (id, loc)).collect())
                        .await;
                    futures_util::stream::iter(nos.into_iter().zip(read))
                }
            })
            .buffered(DATA_READ_AHEAD / PAYLOAD_BATCH + 1)
            .flatten()
            .scan(false, |failed, (n, r)| {
                if *failed {
                    return std::future::ready(None);
                }
                let frame = match r {
                    Ok(payload) => {
                        let h = payload_frame_header(n, PAYLOAD_FRAME_CHUNK, payload.len() as u32);
                        [bytes::Bytes::copy_from_slice(&h), payload]
                    }
                    Err(e) => {
                        *failed = true;
                        tracing::error!(chunk = n, error = %e, "restore read failed");
                        let mut m = e.to_string().into_bytes();
                        m.truncate(MAX_PAYLOAD_FRAME_ERROR as usize);
                        let h = payload_frame_header(n, PAYLOAD_FRAME_ERROR, m.len() as u32);
                        [bytes::Bytes::copy_from_slice(&h), bytes::Bytes::from(m)]
                    }
                };
                std::future::ready(Some(frame))
            })
            .flat_map(|f| futures_util::stream::iter(f.map(Ok::<_, std::io::Error>)));
        return Response::builder()
            .header(axum::http::header::CONTENT_TYPE, "application/octet-stream")
            .body(Body::from_stream(body))
            .map_err(|e| ApiError::Internal(e.to_string()));
    }
    let mut located = located.into_iter().peekable();
    let size = idx.size;
    let body = futures_util::stream::iter(q.first..end)
        .map(move |n| {
            let store = store.clone();
            let at = located.next_if(|l| l.0 == n);
            let len = cs.min(size - n * cs) as usize;
            async move {
                match at {
                    Some((_, id, loc)) => {
                        let b = store
                            .get_at(&id, loc)
                            .await
                            .map_err(|e| std::io::Error::other(format!("chunk {n}: {e}")))?;
                        if b.len() != len {
                            return Err(std::io::Error::other(format!(
                                "chunk {n} holds {} bytes, expected {len}",
                                b.len()
                            )));
                        }
                        Ok::<_, std::io::Error>(b)
                    }
                    None => Ok(bytes::Bytes::from(vec![0u8; len])),
                }
            }
        })
        .buffered(DATA_READ_AHEAD);
    let total: u64 = (q.first..end).map(|n| cs.min(size - n * cs)).sum();
    Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/octet-stream")
        .header(axum::http::header::CONTENT_LENGTH, total)
        .body(Body::from_stream(body))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

pub async fn enroll_token(
    State(st): State<SharedState>,
    _a: AdminAuth,
) -> Result<Json<EnrollTokenResponse>, ApiError> {
    let token = format!("tbe1.{}", random_secret());
    let expires = now_secs() + st.cfg.enroll_token_ttl_secs as i64;
    st.catalog
        .add_enroll_token(&secret_hash(&token), expires)
        .await?;
    Ok(Json(EnrollTokenResponse {
        token,
        expires: rfc3339(expires),
    }))
}

pub async fn verify(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Json(req): Json<VerifyRequest>,
) -> Result<Json<VerifyResponse>, ApiError> {
    let sel = match &req.point {
        Some(p) => {
            let id = parse_point(p)?;
            if st.catalog.get_point(&id).await?.is_none() {
                return Err(ApiError::NotFound(format!("no recovery point {p}")));
            }
            Some(vec![id])
        }
        None => None,
    };
    let r = st.store.verify(sel.as_deref()).await?;
    Ok(Json(VerifyResponse {
        points_checked: r.points_checked,
        chunks_checked: r.chunks_checked,
        bytes_checked: r.bytes_checked,
        damaged: r
            .damaged
            .iter()
            .map(|d| DamagedChunkReport {
                chunk: d.chunk_id.to_string(),
                pack: d.pack_id.to_string(),
                offset: d.offset,
                reason: d.reason.clone(),
                points: d.points.iter().map(|p| p.to_string()).collect(),
            })
            .collect(),
        damaged_indexes: r
            .damaged_indexes
            .iter()
            .map(|(p, s, why)| (p.to_string(), *s, why.clone()))
            .collect(),
    }))
}

pub async fn jobs(
    State(st): State<SharedState>,
    _a: AdminAuth,
) -> Result<Json<Vec<JobSummary>>, ApiError> {
    let rows = st.catalog.list_jobs(500).await?;
    Ok(Json(
        rows.into_iter()
            .map(|j| JobSummary {
                id: j.id,
                kind: j.kind,
                vm_id: j.vm_id,
                vm_name: j.vm_name,
                state: j.state,
                started: rfc3339(j.started_at),
                finished: j.finished_at.map(rfc3339),
                message: j.message,
                point: j.point_id,
            })
            .collect(),
    ))
}
