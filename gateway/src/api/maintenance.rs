//! Admin maintenance routes: `POST /v1/admin/prune` (short-term retention,
//! then GC) and `POST /v1/admin/gc` (GC only). One GC at a time: a second
//! request answers 409 "GC already running". The work runs in its own task,
//! so a client that disconnects does not cut a GC short (that would be safe,
//! see `chunk_store/gc.rs`, only wasteful).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use tierback_format::ids::PointId;

use super::{rfc3339, AdminAuth, ApiError, SharedState};
use crate::catalog::{now_secs, PointRow};
use crate::chunk_store::{GcOptions, GcReport, DEFAULT_COMPACT_BELOW_PERCENT};
use crate::policy::retention::{expired, PointMeta, RetentionPolicy};

/// `POST /v1/admin/gc` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcRequest {
    /// Compact packs whose live records fill less than this (default 50).
    #[serde(default)]
    pub compact_below_percent: Option<u8>,
    /// Only report what would be done.
    #[serde(default)]
    pub dry_run: bool,
}

/// `POST /v1/admin/prune` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PruneRequest {
    /// Only this VM (id or name).
    #[serde(default)]
    pub vm: Option<String>,
    /// Keep this many days for every selected VM (overrides the group's).
    /// Without it a VM uses its protection group's short-term retention;
    /// a VM in no group is left alone.
    #[serde(default)]
    pub keep_days: Option<u32>,
    /// "Now" in unix seconds (default: the gateway's clock), to simulate time.
    #[serde(default)]
    pub now: Option<i64>,
    /// Only report what would be deleted (GC reports what it would reclaim
    /// without those deletions).
    #[serde(default)]
    pub dry_run: bool,
    /// See [`GcRequest::compact_below_percent`].
    #[serde(default)]
    pub compact_below_percent: Option<u8>,
}

/// One point prune deleted (or would delete).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrunedPoint {
    pub id: String,
    pub vm_id: String,
    pub vm_name: String,
    /// RFC 3339.
    pub time: String,
    /// The retention that expired it.
    pub retention_days: u32,
}

/// `POST /v1/admin/prune` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneResponse {
    /// The "now" retention was applied at (RFC 3339).
    pub now: String,
    pub dry_run: bool,
    pub points_deleted: Vec<PrunedPoint>,
    /// Points of the selected VMs that remain.
    pub points_kept: u64,
    /// Names of selected VMs with no retention (in no group, no `keep_days`).
    pub vms_without_retention: Vec<String>,
    pub gc: GcReport,
}

fn gc_options(compact_below_percent: Option<u8>, dry_run: bool) -> Result<GcOptions, ApiError> {
    let pct = compact_below_percent.unwrap_or(DEFAULT_COMPACT_BELOW_PERCENT);
    if pct > 100 {
        return Err(ApiError::BadRequest(format!(
            "compact_below_percent must be 0–100, not {pct}"
        )));
    }
    Ok(GcOptions {
        compact_below_percent: pct,
        dry_run,
    })
}

fn join_error(e: tokio::task::JoinError) -> ApiError {
    ApiError::Internal(format!("maintenance task failed: {e}"))
}

pub async fn gc(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Json(req): Json<GcRequest>,
) -> Result<Json<GcReport>, ApiError> {
    let opts = gc_options(req.compact_below_percent, req.dry_run)?;
    let permit = st.store.gc_permit()?;
    let report = tokio::spawn(async move { st.store.gc_with(&permit, opts).await })
        .await
        .map_err(join_error)??;
    Ok(Json(report))
}

pub async fn prune(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Json(req): Json<PruneRequest>,
) -> Result<Json<PruneResponse>, ApiError> {
    let opts = gc_options(req.compact_below_percent, req.dry_run)?;
    if req.keep_days == Some(0) {
        return Err(ApiError::BadRequest("keep_days must be at least 1".into()));
    }
    // Taken first: a prune while GC runs is refused before deleting anything.
    let permit = st.store.gc_permit()?;
    tokio::spawn(async move {
        let now = req.now.unwrap_or_else(now_secs);
        let rows = st.catalog.list_points(req.vm.as_deref()).await?;
        if let (Some(vm), true) = (&req.vm, rows.is_empty()) {
            return Err(ApiError::NotFound(format!(
                "VM {vm:?} has no recovery points"
            )));
        }
        let mut by_vm: BTreeMap<String, Vec<PointRow>> = BTreeMap::new();
        for r in rows {
            by_vm.entry(r.vm_id.clone()).or_default().push(r);
        }
        let mut deleted = Vec::new();
        let mut without = Vec::new();
        let mut kept = 0u64;
        for (vm_id, points) in by_vm {
            let days = match req.keep_days {
                Some(d) => Some(d),
                None => st
                    .catalog
                    .group_of_vm(&vm_id)
                    .await?
                    .and_then(|g| u32::try_from(g.short_term_days).ok()),
            };
            let Some(days) = days else {
                without.push(points[0].vm_name.clone());
                kept += points.len() as u64;
                continue;
            };
            let metas: Vec<PointMeta> = points
                .iter()
                .map(|p| PointMeta {
                    id: p.id.clone(),
                    vm_id: p.vm_id.clone(),
                    created_at: p.created_at,
                })
                .collect();
            let gone = expired(
                &metas,
                &RetentionPolicy {
                    short_term_days: days,
                },
                now,
            );
            kept += (points.len() - gone.len()) as u64;
            for p in points.iter().filter(|p| gone.contains(&p.id)) {
                deleted.push(PrunedPoint {
                    id: p.id.clone(),
                    vm_id: p.vm_id.clone(),
                    vm_name: p.vm_name.clone(),
                    time: rfc3339(p.created_at),
                    retention_days: days,
                });
            }
        }
        if !req.dry_run && !deleted.is_empty() {
            let ids = deleted
                .iter()
                .map(|p| {
                    p.id.parse::<PointId>().map_err(|_| {
                        ApiError::Internal(format!("catalog holds a bad point id {:?}", p.id))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            st.store.delete_points(&ids).await?;
            tracing::info!(points = ids.len(), "prune deleted expired recovery points");
        }
        let gc = st.store.gc_with(&permit, opts).await?;
        Ok(Json(PruneResponse {
            now: rfc3339(now),
            dry_run: req.dry_run,
            points_deleted: deleted,
            points_kept: kept,
            vms_without_retention: without,
            gc,
        }))
    })
    .await
    .map_err(join_error)?
}
