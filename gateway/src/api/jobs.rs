//! Agent routes of scheduled jobs: an agent takes the next job queued for a
//! VM of its host (`POST /v1/agent/jobs/next`, GET works too); the backup
//! session it then begins for that VM adopts the job (see
//! [`job_for_backup`]), so one job row follows the run from `queued` to
//! `succeeded`/`failed`.

use axum::extract::State;
use axum::Json;
use tierback_format::wire::{AgentJob, NextJobResponse, VmInfo};

use super::{random_secret, rfc3339, AgentAuth, ApiError, SharedState};
use crate::catalog::now_secs;

/// `POST /v1/agent/jobs/next`: the oldest queued job for a VM of the caller's
/// host, now `dispatched`; `{"job": null}` when there is none.
pub async fn next(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
) -> Result<Json<NextJobResponse>, ApiError> {
    let job = st.catalog.take_next_job(&agent.id, now_secs()).await?;
    if let Some(j) = &job {
        tracing::info!(agent = %agent.id, job = %j.id, vm = %j.vm_name, "job dispatched");
    }
    Ok(Json(NextJobResponse {
        job: job.map(|j| AgentJob {
            id: j.id,
            kind: j.kind,
            vm_id: j.vm_id,
            vm_name: j.vm_name,
            full: j.full,
            window: j.window_at.map(rfc3339),
        }),
    }))
}

/// The job of a backup session the agent begins: the scheduled job
/// dispatched to it for this VM if there is one (now `running`), else a new
/// `running` job.
pub async fn job_for_backup(
    st: &SharedState,
    vm: &VmInfo,
    agent_id: &str,
    kind: &str,
) -> Result<String, ApiError> {
    if let Some(id) = st
        .catalog
        .adopt_dispatched_job(&vm.id, agent_id, now_secs())
        .await?
    {
        return Ok(id);
    }
    let id = format!("job-{}", &random_secret()[..16]);
    st.catalog
        .start_job(&id, kind, &vm.id, &vm.name, agent_id)
        .await?;
    Ok(id)
}

/// `POST /v1/agent/jobs/{id}/fail` `{"message"}`: the agent gives up a job
/// dispatched to it before any session began (VM not on this host, nothing
/// to check …); the job ends `failed` with the message.
pub async fn fail(
    State(st): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    axum::extract::Path(id): axum::extract::Path<String>,
    Json(req): Json<serde_json::Value>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let message = req
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or("the agent gave the job up")
        .chars()
        .take(2000)
        .collect::<String>();
    let failed = st
        .catalog
        .fail_dispatched_job(&id, &agent.id, &message, now_secs())
        .await?;
    Ok(Json(serde_json::json!({ "failed": failed })))
}
