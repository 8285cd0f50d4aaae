//! The agent's HTTPS client for the gateway: certificate pinned, every request
//! carries the agent's credential, transient failures are retried here and
//! only here.

use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tierback_format::ids::ChunkHash;
use tierback_format::wire::*;

/// Longest a request, or a batch of a chunk stream, may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Attempts per request for transient failures (connection errors, 5xx but 507).
const ATTEMPTS: u32 = 4;

/// A request body: one buffer, or parts sent one after the other (shared, so
/// a retry resends them without copying).
#[derive(Clone)]
enum Payload {
    One(bytes::Bytes),
    Parts(std::sync::Arc<[bytes::Bytes]>),
}

/// Appends one chunk record (as `put_chunk_record_with_base` lays it out) to
/// `parts` without copying `data`. `base`: the hash the same place held in
/// the previous point, a hint the gateway may store a delta against.
pub fn chunk_record_parts(
    parts: &mut Vec<bytes::Bytes>,
    hash: &ChunkHash,
    base: Option<&ChunkHash>,
    data: impl Into<bytes::Bytes>,
) {
    let data = data.into();
    let head = tierback_format::wire::chunk_record_head(hash, base, data.len());
    parts.push(head.into());
    parts.push(data);
}

/// The error a gateway's non-success answer stands for.
fn refusal(status: reqwest::StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ApiErrorBody>(body)
        .map(|b| b.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return ClientError::Unauthorized(message);
    }
    ClientError::Status {
        status: status.as_u16(),
        message,
    }
}

/// Longest answer to a batch of a chunk stream.
const MAX_STREAM_ANSWER: usize = 16 << 20;

/// An upgraded connection carrying chunk records to one backup session
/// ([`GatewayClient::open_chunk_stream`]).
pub struct ChunkStream {
    io: reqwest::Upgraded,
}

impl ChunkStream {
    /// Sends one batch of chunk records (parts as [`chunk_record_parts`]
    /// lays them out) and waits for the gateway's answer, as long as a
    /// request may take. After an error the stream is unusable (the gateway
    /// closes it too).
    pub async fn send(&mut self, parts: &[bytes::Bytes]) -> anyhow::Result<ChunksResponse> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(parts))
            .await
            .map_err(|_| {
                anyhow::anyhow!("no answer on the chunk stream within {REQUEST_TIMEOUT:?}")
            })?
    }

    async fn exchange(&mut self, parts: &[bytes::Bytes]) -> anyhow::Result<ChunksResponse> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        anyhow::ensure!(len > 0, "an empty batch would end the chunk stream");
        // Gathered writes: TLS records filled across a record's head and
        // data instead of one small record per head.
        let len = len.to_le_bytes();
        let mut slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&len[..])
            .chain(parts.iter().map(|p| &p[..]))
            .map(std::io::IoSlice::new)
            .collect();
        let mut left = &mut slices[..];
        while !left.is_empty() {
            let n = self.io.write_vectored(left).await?;
            anyhow::ensure!(n > 0, "the gateway closed the chunk stream");
            std::io::IoSlice::advance_slices(&mut left, n);
        }
        self.io.flush().await?;
        let mut head = [0u8; 5];
        self.io.read_exact(&mut head).await?;
        let [status, l @ ..] = head;
        let n = u32::from_le_bytes(l) as usize;
        anyhow::ensure!(
            n <= MAX_STREAM_ANSWER,
            "the gateway's answer on the chunk stream claims {n} bytes"
        );
        let mut body = vec![0u8; n];
        self.io.read_exact(&mut body).await?;
        if status == 0 {
            return serde_json::from_slice(&body)
                .context("the gateway's answer on the chunk stream");
        }
        let e: ApiErrorBody =
            serde_json::from_slice(&body).context("the gateway's error on the chunk stream")?;
        anyhow::bail!("gateway refused the batch: {}", e.message)
    }
}

/// A connection to the gateway (cheap to clone: clones share the pool).
#[derive(Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    base: String,
    credential: Option<String>,
}

/// A failed request, classified.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the gateway at {base}: {cause}")]
    Transport {
        base: String,
        cause: String,
        retryable: bool,
    },
    #[error("the gateway refused this agent's credential ({0}); re-enrol the agent")]
    Unauthorized(String),
    #[error("gateway answered {status}: {message}")]
    Status { status: u16, message: String },
}

impl ClientError {
    fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport { retryable, .. } => *retryable,
            ClientError::Status { status, .. } => *status >= 500 && *status != 507,
            ClientError::Unauthorized(_) => false,
        }
    }
}

/// True when `e` is the gateway answering 409 Conflict.
pub fn is_conflict(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ClientError>()
        .is_some_and(|c| matches!(c, ClientError::Status { status: 409, .. }))
}

impl GatewayClient {
    pub fn new(base: &str, fingerprint: &str, credential: Option<String>) -> anyhow::Result<Self> {
        let tls = tierback_format::pin::pinned_client_config(fingerprint)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(10))
            .timeout(REQUEST_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTPS client")?;
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("https://") {
            anyhow::bail!("the gateway URL must start with https:// (got {base})");
        }
        Ok(Self {
            http,
            base,
            credential,
        })
    }

    async fn once(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&'static str, Payload)>,
    ) -> Result<bytes::Bytes, ClientError> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(c) = &self.credential {
            req = req.bearer_auth(c);
        }
        if let Some((ct, b)) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
            req = match b {
                Payload::One(b) => req.body(b),
                // Sent part by part (no copy into one buffer); the length is
                // known, so no chunked encoding.
                Payload::Parts(parts) => {
                    let len: usize = parts.iter().map(|p| p.len()).sum();
                    let stream = futures_util::stream::iter(
                        (0..parts.len()).map(move |i| Ok::<_, std::io::Error>(parts[i].clone())),
                    );
                    req.header(reqwest::header::CONTENT_LENGTH, len)
                        .body(reqwest::Body::wrap_stream(stream))
                }
            };
        }
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(refusal(status, &bytes))
    }

    /// Opens a chunk stream for backup session `session`: an upgraded
    /// connection that carries batches of chunk records without HTTP
    /// framing (docs/protocol.md, "Chunk streams"). A gateway without
    /// them answers with an error status ([`ClientError::Status`]).
    pub async fn open_chunk_stream(&self, session: &str) -> Result<ChunkStream, ClientError> {
        let mut req = self
            .http
            .post(format!(
                "{}/v1/agent/backups/{session}/chunk-stream",
                self.base
            ))
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, CHUNK_STREAM_PROTOCOL);
        if let Some(c) = &self.credential {
            req = req.bearer_auth(c);
        }
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        if status != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
            return Err(refusal(status, &bytes));
        }
        let io = resp.upgrade().await.map_err(|e| self.transport(e))?;
        Ok(ChunkStream { io })
    }

    fn transport(&self, e: reqwest::Error) -> ClientError {
        let retryable = !is_tls_rejection(&e);
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        ClientError::Transport {
            base: self.base.clone(),
            cause: cause.to_string(),
            retryable,
        }
    }

    /// One request with the retry policy.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&'static str, Payload)>,
    ) -> Result<bytes::Bytes, ClientError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.once(method.clone(), path, body.clone()).await {
                Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                    tracing::info!(error = %e, attempt, "request failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250 * 2u64.pow(attempt))).await;
                }
                r => return r,
            }
        }
    }

    async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let b = serde_json::to_vec(body)?;
        let out = self
            .call(
                reqwest::Method::POST,
                path,
                Some(("application/json", Payload::One(b.into()))),
            )
            .await?;
        serde_json::from_slice(&out)
            .with_context(|| format!("decoding the gateway's answer to {path}"))
    }

    pub async fn enroll(&self, req: &EnrollRequest) -> anyhow::Result<EnrollResponse> {
        self.post_json("/v1/enroll", req).await.map_err(|e| {
            if e.downcast_ref::<ClientError>().is_some_and(|c| matches!(c, ClientError::Unauthorized(_))) {
                anyhow::anyhow!("the gateway refused the enrolment token: it is unknown, expired or already used; get a new one with `tierback-gateway enroll-token`")
            } else {
                e
            }
        })
    }

    pub async fn inventory(&self, vms: Vec<VmInfo>) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .post_json("/v1/agent/inventory", &InventoryRequest { vms })
            .await?;
        Ok(())
    }

    pub async fn begin(&self, req: &BeginBackupRequest) -> anyhow::Result<BeginBackupResponse> {
        self.post_json("/v1/agent/backups", req).await
    }

    /// Begins a consistency-check session (`?purpose=consistency-check`).
    pub async fn begin_check(
        &self,
        req: &BeginBackupRequest,
    ) -> anyhow::Result<BeginBackupResponse> {
        self.post_json(
            &format!("/v1/agent/backups?purpose={PURPOSE_CONSISTENCY_CHECK}"),
            req,
        )
        .await
    }

    /// Chunk numbers of a range that differ from the session's base point.
    pub async fn compare(&self, session: &str, req: &CompareRequest) -> anyhow::Result<Vec<u64>> {
        let r: CompareResponse = self
            .post_json(&format!("/v1/agent/backups/{session}/compare"), req)
            .await?;
        Ok(r.differing)
    }

    /// Commits a consistency-check session with its figures.
    pub async fn commit_check(
        &self,
        session: &str,
        req: &CheckCommitRequest,
    ) -> anyhow::Result<CommitResponse> {
        self.post_json(&format!("/v1/agent/backups/{session}/commit"), req)
            .await
    }

    /// Gives up a job dispatched to this agent before any session began.
    pub async fn fail_job(&self, id: &str, message: &str) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .post_json(
                &format!("/v1/agent/jobs/{id}/fail"),
                &serde_json::json!({ "message": message }),
            )
            .await?;
        Ok(())
    }

    /// Positions of the hashes the gateway lacks.
    pub async fn lack(&self, session: &str, hashes: Vec<ChunkHash>) -> anyhow::Result<Vec<u32>> {
        let r: LackResponse = self
            .post_json(
                &format!("/v1/agent/backups/{session}/lack"),
                &LackRequest { hashes },
            )
            .await?;
        Ok(r.missing)
    }

    /// Uploads chunk records given as parts (see [`chunk_record_parts`]).
    pub async fn chunks(
        &self,
        session: &str,
        body: Vec<bytes::Bytes>,
    ) -> anyhow::Result<ChunksResponse> {
        let out = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/agent/backups/{session}/chunks"),
                Some(("application/octet-stream", Payload::Parts(body.into()))),
            )
            .await?;
        Ok(serde_json::from_slice(&out)?)
    }

    pub async fn stream_index(
        &self,
        session: &str,
        stream: u32,
        entries: &[(u64, ChunkHash)],
    ) -> anyhow::Result<()> {
        for part in entries.chunks(64 * 1024) {
            self.call(
                reqwest::Method::POST,
                &format!("/v1/agent/backups/{session}/streams/{stream}/index"),
                Some((
                    "application/octet-stream",
                    Payload::One(encode_stream_index(part).into()),
                )),
            )
            .await?;
        }
        Ok(())
    }

    pub async fn commit(
        &self,
        session: &str,
        req: &CommitRequest,
    ) -> anyhow::Result<CommitResponse> {
        self.post_json(&format!("/v1/agent/backups/{session}/commit"), req)
            .await
    }

    /// The VM's newest recovery point at the gateway (made by any agent),
    /// `None` if it has none.
    pub async fn last_point(&self, vm_id: &str) -> anyhow::Result<Option<LastPointResponse>> {
        let path = format!("/v1/agent/vms/{vm_id}/last-point");
        match self.call(reqwest::Method::GET, &path, None).await {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("decoding the gateway's answer to {path}")
            })?)),
            Err(ClientError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes the next job the gateway queued for a VM of this host.
    pub async fn next_job(&self) -> anyhow::Result<Option<AgentJob>> {
        let r: NextJobResponse = self
            .post_json("/v1/agent/jobs/next", &serde_json::json!({}))
            .await?;
        Ok(r.job)
    }

    /// What an offline export of the VM must use (its chunk size).
    pub async fn seed_params(&self, vm_id: &str) -> anyhow::Result<SeedParamsResponse> {
        let path = format!("/v1/agent/vms/{vm_id}/seed-params");
        let b = self.call(reqwest::Method::GET, &path, None).await?;
        serde_json::from_slice(&b)
            .with_context(|| format!("decoding the gateway's answer to {path}"))
    }

    /// Ids of the protection group's VMs on this host.
    pub async fn seed_members(&self, group: &str) -> anyhow::Result<Vec<String>> {
        let path = format!("/v1/agent/groups/{}/seed-members", path_segment(group));
        let b = self.call(reqwest::Method::GET, &path, None).await?;
        let r: SeedMembersResponse = serde_json::from_slice(&b)
            .with_context(|| format!("decoding the gateway's answer to {path}"))?;
        Ok(r.vm_ids)
    }

    pub async fn abort(&self, session: &str) {
        let _ = self
            .once(
                reqwest::Method::POST,
                &format!("/v1/agent/backups/{session}/abort"),
                None,
            )
            .await;
    }
}

/// A pin mismatch or TLS alert is not worth retrying.
fn is_tls_rejection(e: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        // io::Error hides its payload from source(); look inside.
        if let Some(inner) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if inner.downcast_ref::<rustls::Error>().is_some() {
                return true;
            }
        }
        // Certificate failures never heal by retrying, however they are wrapped.
        if c.to_string().contains("certificate") {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Percent-encodes one URL path segment.
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
