//! The gateway's HTTPS API (axum): routes, the one error type that maps to
//! status codes, and authentication of every request.
//!
//! Agents authenticate with the credential issued at enrolment, admins with an
//! API token; both as `Authorization: Bearer …`. Only the hash of a secret is
//! kept in the catalog. A caller without a valid credential gets 401 and a
//! body that says nothing about what exists; a valid caller on the other
//! side's routes gets 403.

pub mod admin;
pub mod agent;
pub mod consistency;
pub mod groups;
pub mod import;
pub mod jobs;
pub mod maintenance;
mod session;
mod stream_conn;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tierback_format::wire::ApiErrorBody;

use crate::catalog::{AgentRow, Catalog, CatalogError};
use crate::chunk_store::{ChunkStore, StoreError};
use crate::config::GatewayConfig;
pub use session::Sessions;

/// Everything a request handler may touch.
pub struct AppState {
    pub catalog: Catalog,
    pub store: Arc<ChunkStore>,
    pub cfg: GatewayConfig,
    pub sessions: Sessions,
    pub indexes: admin::IndexCache,
    pub chunk_streams: ChunkStreams,
}

/// The upgraded chunk streams being served (see `agent::chunk_stream`):
/// tracked, so that shutdown stops them between batches and waits for the
/// batches in flight before it flushes the store.
#[derive(Default)]
pub struct ChunkStreams {
    pub tasks: tokio_util::task::TaskTracker,
    pub stop: tokio_util::sync::CancellationToken,
}

pub type SharedState = Arc<AppState>;

/// The router of the whole API.
pub fn router(state: SharedState) -> Router {
    let agent = Router::new()
        .route("/v1/agent/inventory", post(agent::inventory))
        .route("/v1/agent/backups", post(agent::begin_backup))
        .route("/v1/agent/backups/{session}/lack", post(agent::lack))
        .route("/v1/agent/backups/{session}/chunks", post(agent::chunks))
        .route(
            "/v1/agent/backups/{session}/chunk-stream",
            post(agent::chunk_stream),
        )
        .route(
            "/v1/agent/backups/{session}/streams/{stream}/index",
            post(agent::stream_index),
        )
        .route("/v1/agent/backups/{session}/commit", post(agent::commit))
        .route("/v1/agent/backups/{session}/abort", post(agent::abort))
        .route("/v1/agent/vms/{vm}/last-point", get(agent::last_point))
        .route("/v1/agent/jobs/next", get(jobs::next).post(jobs::next))
        .route(
            "/v1/agent/backups/{session}/compare",
            post(consistency::compare),
        )
        .route("/v1/agent/jobs/{id}/fail", post(jobs::fail))
        .layer(DefaultBodyLimit::max(agent::MAX_UPLOAD_BODY));
    let admin = Router::new()
        .route("/v1/admin/vms", get(admin::vms))
        .route("/v1/admin/points", get(admin::points))
        .route("/v1/admin/points/{point}", get(admin::point))
        .route(
            "/v1/admin/points/{point}/streams/{stream}/extents",
            get(admin::extents),
        )
        .route(
            "/v1/admin/points/{point}/streams/{stream}/data",
            get(admin::data),
        )
        .route("/v1/admin/enroll-tokens", post(admin::enroll_token))
        .route("/v1/admin/verify", post(admin::verify))
        .route("/v1/admin/jobs", get(admin::jobs))
        .route("/v1/admin/prune", post(maintenance::prune))
        .route("/v1/admin/gc", post(maintenance::gc))
        .route("/v1/admin/groups", get(groups::list).post(groups::create))
        .route(
            "/v1/admin/groups/{name}",
            get(groups::show).delete(groups::delete),
        )
        .route("/v1/admin/groups/{name}/members", post(groups::add_member))
        .route(
            "/v1/admin/groups/{name}/members/{vm}",
            axum::routing::delete(groups::remove_member),
        )
        .route("/v1/admin/space", get(groups::space))
        .route("/v1/admin/consistency-checks", post(consistency::enqueue))
        .layer(DefaultBodyLimit::max(1 << 20));
    Router::new()
        .route("/v1/enroll", post(agent::enroll))
        .route("/v1/health", get(|| async { "ok" }))
        .merge(agent)
        .merge(admin)
        .merge(import::routes())
        .fallback(|| async { ApiError::NotFound("no such API route".into()) })
        .with_state(state)
}

/// Every error a handler returns; `status()` is the only place that maps
/// errors to HTTP status codes.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid credential")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Insufficient(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Insufficient(_) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
    /// The status and body this error answers with (a server error is
    /// logged): for a response, or an answer on a chunk stream.
    fn answer(&self) -> (StatusCode, ApiErrorBody) {
        let (status, kind) = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = ApiErrorBody {
            error: kind.into(),
            message: self.to_string(),
        };
        (status, body)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.answer();
        (status, Json(body)).into_response()
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::HashMismatch { .. } => ApiError::BadRequest(e.to_string()),
            StoreError::NotFound(_) => ApiError::NotFound(e.to_string()),
            StoreError::DiskFull { .. } => ApiError::Insufficient(e.to_string()),
            StoreError::ChunksMissing { .. } | StoreError::GcRunning => {
                ApiError::Conflict(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// Hash under which a bearer secret is stored (secrets are 256-bit random, so
/// an unkeyed hash cannot be inverted).
pub fn secret_hash(secret: &str) -> [u8; 32] {
    *blake3::hash(secret.as_bytes()).as_bytes()
}

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Agent credentials look like `tba1.<agent id>.<secret>`.
pub const AGENT_CREDENTIAL_PREFIX: &str = "tba1.";
/// Admin tokens look like `tbadm1.<secret>`.
pub const ADMIN_TOKEN_PREFIX: &str = "tbadm1.";

/// An authenticated agent.
pub struct AgentAuth(pub AgentRow);

impl FromRequestParts<SharedState> for AgentAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let cred = bearer(parts).ok_or(ApiError::Unauthorized)?;
        if cred.starts_with(ADMIN_TOKEN_PREFIX) {
            if state.catalog.admin_token_exists(&secret_hash(cred)).await? {
                return Err(ApiError::Forbidden(
                    "admin tokens cannot use agent routes".into(),
                ));
            }
            return Err(ApiError::Unauthorized);
        }
        let rest = cred
            .strip_prefix(AGENT_CREDENTIAL_PREFIX)
            .ok_or(ApiError::Unauthorized)?;
        let (id, _secret) = rest.split_once('.').ok_or(ApiError::Unauthorized)?;
        let agent = state
            .catalog
            .agent(id)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        if !constant_time_eq(&agent.secret_hash, &secret_hash(cred)) {
            return Err(ApiError::Unauthorized);
        }
        Ok(AgentAuth(agent))
    }
}

/// An authenticated admin.
pub struct AdminAuth;

impl FromRequestParts<SharedState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let cred = bearer(parts).ok_or(ApiError::Unauthorized)?;
        if state.catalog.admin_token_exists(&secret_hash(cred)).await? {
            return Ok(AdminAuth);
        }
        if cred.starts_with(AGENT_CREDENTIAL_PREFIX) {
            // A valid agent credential on an admin route is refused as such.
            if AgentAuth::from_request_parts(parts, state).await.is_ok() {
                return Err(ApiError::Forbidden(
                    "agent credentials cannot use admin routes".into(),
                ));
            }
        }
        Err(ApiError::Unauthorized)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// RFC 3339 text of a Unix time.
pub fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A random secret as hex.
pub fn random_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}
