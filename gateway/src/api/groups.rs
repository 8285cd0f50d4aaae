//! Admin routes of protection groups (`/v1/admin/groups…`) and the disk-space
//! review (`/v1/admin/space`), with their DTOs; plus the one lookup the
//! backup path needs: which chunk size a VM's backups use.
//!
//! Policy values are validated by `crate::policy` (one-line messages, 400);
//! a VM already in another group is refused with 409.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{rfc3339, AdminAuth, ApiError, SharedState};
use crate::catalog::{now_secs, AddMember, GroupMemberRow, GroupRow};
use crate::policy::schedule::{self, LastRuns};
use crate::policy::space::{self, PointSize};
use crate::policy::{
    self, retention::RetentionPolicy, ConsistencyCheck, GroupPolicy, SyncFrequency,
};

/// A group's policy as JSON. Every field has the default of
/// [`GroupPolicy::default`] when omitted from a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupPolicySpec {
    /// `15m` … `24h` (multiples of 15 minutes), or `express-full`.
    pub sync_frequency: String,
    /// Recovery-point times of every day, `HH:MM` UTC.
    pub points_at: Vec<String>,
    /// Short-term retention range on the local tier, 1–448 days.
    pub short_term_days: u32,
    /// Bytes; a power of two from 256 KiB to 8 MiB.
    pub chunk_size: u32,
    /// `only-when-inconsistent`, `scheduled` or `manual`.
    pub consistency_check: String,
    /// `HH:MM` UTC of a scheduled consistency check.
    pub consistency_check_at: Option<String>,
}

impl Default for GroupPolicySpec {
    fn default() -> Self {
        Self::from_policy(&GroupPolicy::default())
    }
}

impl GroupPolicySpec {
    /// The JSON form of a policy.
    pub fn from_policy(p: &GroupPolicy) -> Self {
        Self {
            sync_frequency: p.sync.as_text(),
            points_at: p.points_at.iter().map(ToString::to_string).collect(),
            short_term_days: p.retention.short_term_days,
            chunk_size: p.chunk_size,
            consistency_check: p.consistency_check.mode().into(),
            consistency_check_at: p.consistency_check.at().map(|t| t.to_string()),
        }
    }

    /// Parses and validates; the first problem as one line.
    pub fn to_policy(&self) -> Result<GroupPolicy, String> {
        let p = GroupPolicy {
            sync: self.sync_frequency.parse::<SyncFrequency>()?,
            points_at: policy::parse_points_at(&self.points_at.join(","))?,
            retention: RetentionPolicy {
                short_term_days: self.short_term_days,
            },
            chunk_size: self.chunk_size,
            consistency_check: ConsistencyCheck::parse(
                &self.consistency_check,
                self.consistency_check_at.as_deref(),
            )?,
        };
        p.validate()?;
        Ok(p)
    }
}

/// `POST /v1/admin/groups`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateGroupRequest {
    pub name: String,
    #[serde(flatten)]
    pub policy: GroupPolicySpec,
}

/// `POST /v1/admin/groups/{name}/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddMemberRequest {
    /// VM name or id.
    pub vm: String,
}

/// A member VM of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    pub vm_id: String,
    pub vm_name: String,
    pub agent_id: String,
    /// When it joined, RFC 3339.
    pub added: String,
}

/// A group as listed and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    pub name: String,
    #[serde(flatten)]
    pub policy: GroupPolicySpec,
    pub members: Vec<GroupMember>,
    /// RFC 3339.
    pub created: String,
    /// Next synchronisation window (RFC 3339, UTC).
    pub next_sync: String,
    /// Next recovery-point window (RFC 3339, UTC).
    pub next_recovery_point: String,
    /// Next scheduled consistency check (RFC 3339, UTC), if scheduled.
    pub next_consistency_check: Option<String>,
}

/// One group's line of `GET /v1/admin/space` (see `crate::policy::space`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpace {
    pub name: String,
    /// Member VM names.
    pub members: Vec<String>,
    pub short_term_days: u32,
    /// Committed points of the members.
    pub points: u64,
    /// Logical bytes of each member's newest point, summed.
    pub data_bytes: u64,
    /// Bytes the members' points added to the store, summed.
    pub stored_bytes: u64,
    /// Estimated change per day, from the last 7 days' points.
    pub daily_change_bytes: u64,
    /// `data_bytes + daily_change_bytes × short_term_days`.
    pub projected_bytes: u64,
}

/// `GET /v1/admin/space`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceReport {
    /// RFC 3339.
    pub generated: String,
    pub groups: Vec<GroupSpace>,
}

/// The chunk size for a backup of `vm_id`: its group's, else the gateway's
/// default (`chunk_size` in gateway.toml).
pub async fn chunk_size_for_vm(st: &SharedState, vm_id: &str) -> Result<u32, ApiError> {
    Ok(match st.catalog.group_of_vm(vm_id).await? {
        Some(g) => g.policy()?.chunk_size,
        None => st.cfg.chunk_size,
    })
}

fn member(m: GroupMemberRow) -> GroupMember {
    GroupMember {
        vm_id: m.vm_id,
        vm_name: m.vm_name,
        agent_id: m.agent_id,
        added: rfc3339(m.added_at),
    }
}

fn summary(g: &GroupRow, members: Vec<GroupMember>, now: i64) -> Result<GroupSummary, ApiError> {
    let p = g.policy()?;
    let plan = schedule::plan(&p, g.created_at, &LastRuns::default(), now);
    Ok(GroupSummary {
        name: g.name.clone(),
        policy: GroupPolicySpec::from_policy(&p),
        members,
        created: rfc3339(g.created_at),
        next_sync: rfc3339(plan.next_sync),
        next_recovery_point: rfc3339(plan.next_recovery_point),
        next_consistency_check: plan.next_consistency_check.map(rfc3339),
    })
}

async fn load(st: &SharedState, name: &str) -> Result<GroupSummary, ApiError> {
    let g = st
        .catalog
        .get_group(name)
        .await?
        .ok_or_else(|| no_group(name))?;
    let members = st.catalog.group_members(Some(name)).await?;
    summary(&g, members.into_iter().map(member).collect(), now_secs())
}

fn no_group(name: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no protection group {name:?} (see `tierback-gateway group list`)"
    ))
}

/// `GET /v1/admin/groups`.
pub async fn list(
    State(st): State<SharedState>,
    _a: AdminAuth,
) -> Result<Json<Vec<GroupSummary>>, ApiError> {
    let groups = st.catalog.list_groups().await?;
    let mut members = st.catalog.group_members(None).await?;
    let now = now_secs();
    let mut out = Vec::with_capacity(groups.len());
    for g in &groups {
        let (mine, rest): (Vec<_>, Vec<_>) =
            members.into_iter().partition(|m| m.group_name == g.name);
        members = rest;
        out.push(summary(g, mine.into_iter().map(member).collect(), now)?);
    }
    Ok(Json(out))
}

/// `GET /v1/admin/groups/{name}`.
pub async fn show(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Path(name): Path<String>,
) -> Result<Json<GroupSummary>, ApiError> {
    Ok(Json(load(&st, &name).await?))
}

/// `POST /v1/admin/groups`.
pub async fn create(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Json(req): Json<CreateGroupRequest>,
) -> Result<(StatusCode, Json<GroupSummary>), ApiError> {
    policy::validate_group_name(&req.name).map_err(ApiError::BadRequest)?;
    let p = req.policy.to_policy().map_err(ApiError::BadRequest)?;
    let row = GroupRow::new(&req.name, &p, now_secs());
    if !st.catalog.create_group(&row).await? {
        return Err(ApiError::Conflict(format!(
            "protection group {:?} already exists",
            req.name
        )));
    }
    tracing::info!(group = %req.name, "protection group created");
    Ok((StatusCode::CREATED, Json(load(&st, &req.name).await?)))
}

/// `DELETE /v1/admin/groups/{name}`: the group and its memberships go; the
/// VMs' recovery points stay.
pub async fn delete(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !st.catalog.delete_group(&name).await? {
        return Err(no_group(&name));
    }
    tracing::info!(group = %name, "protection group deleted");
    Ok(Json(serde_json::json!({ "deleted": name })))
}

/// The one VM an admin means by `key` (id, or name when unambiguous).
pub(crate) async fn resolve_vm(
    st: &SharedState,
    key: &str,
) -> Result<crate::catalog::VmRef, ApiError> {
    let mut vms = st.catalog.find_vms(key).await?;
    match vms.len() {
        0 => Err(ApiError::NotFound(format!(
            "no VM named or with id {key:?} is known: run `tierback-agent vms` on its host first"
        ))),
        1 => Ok(vms.remove(0)),
        _ => Err(ApiError::BadRequest(format!(
            "VM name {key:?} is ambiguous ({}): give the id",
            vms.iter()
                .map(|v| v.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// `POST /v1/admin/groups/{name}/members`.
pub async fn add_member(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Path(name): Path<String>,
    Json(req): Json<AddMemberRequest>,
) -> Result<Json<GroupSummary>, ApiError> {
    if st.catalog.get_group(&name).await?.is_none() {
        return Err(no_group(&name));
    }
    let vm = resolve_vm(&st, &req.vm).await?;
    match st.catalog.add_group_member(&name, &vm.id, now_secs()).await? {
        AddMember::Added => {
            tracing::info!(group = %name, vm = %vm.id, "VM added to protection group");
        }
        AddMember::AlreadyMember => {}
        AddMember::InOtherGroup(other) => {
            return Err(ApiError::Conflict(format!(
                "VM {} ({}) is already in protection group {other:?}: a VM is in at most one group (remove it there first)",
                vm.name, vm.id
            )))
        }
        AddMember::NoGroup => return Err(no_group(&name)),
    }
    Ok(Json(load(&st, &name).await?))
}

/// `DELETE /v1/admin/groups/{name}/members/{vm}`.
pub async fn remove_member(
    State(st): State<SharedState>,
    _a: AdminAuth,
    Path((name, key)): Path<(String, String)>,
) -> Result<Json<GroupSummary>, ApiError> {
    if st.catalog.get_group(&name).await?.is_none() {
        return Err(no_group(&name));
    }
    let vm = resolve_vm(&st, &key).await?;
    if !st.catalog.remove_group_member(&name, &vm.id).await? {
        return Err(ApiError::NotFound(format!(
            "VM {} ({}) is not in protection group {name:?}",
            vm.name, vm.id
        )));
    }
    Ok(Json(load(&st, &name).await?))
}

/// `GET /v1/admin/space`.
pub async fn space(
    State(st): State<SharedState>,
    _a: AdminAuth,
) -> Result<Json<SpaceReport>, ApiError> {
    let now = now_secs();
    let groups = st.catalog.list_groups().await?;
    let members = st.catalog.group_members(None).await?;
    let points = st.catalog.group_points(None).await?;
    let mut out = Vec::with_capacity(groups.len());
    for g in &groups {
        let days = g.policy()?.retention.short_term_days;
        let sizes: Vec<PointSize> = points
            .iter()
            .filter(|p| p.group_name == g.name)
            .map(|p| PointSize {
                vm_id: p.vm_id.clone(),
                created_at: p.created_at,
                logical_bytes: u64::try_from(p.logical_bytes).unwrap_or(0),
                stored_bytes: u64::try_from(p.stored_bytes).unwrap_or(0),
            })
            .collect();
        let e = space::estimate_group(&sizes, days, now);
        out.push(GroupSpace {
            name: g.name.clone(),
            members: members
                .iter()
                .filter(|m| m.group_name == g.name)
                .map(|m| m.vm_name.clone())
                .collect(),
            short_term_days: days,
            points: e.points,
            data_bytes: e.data_bytes,
            stored_bytes: e.stored_bytes,
            daily_change_bytes: e.daily_change_bytes,
            projected_bytes: e.projected_bytes,
        });
    }
    Ok(Json(SpaceReport {
        generated: rfc3339(now),
        groups: out,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_spec_round_trips_and_defaults() {
        let spec: GroupPolicySpec = serde_json::from_str("{}").expect("defaults");
        assert_eq!(spec.to_policy(), Ok(GroupPolicy::default()));
        let req: CreateGroupRequest = serde_json::from_str(
            r#"{"name":"g","sync_frequency":"express-full","points_at":["20:00","08:00"],
                "short_term_days":30,"chunk_size":4194304,
                "consistency_check":"scheduled","consistency_check_at":"02:00"}"#,
        )
        .expect("request");
        let p = req.policy.to_policy().expect("valid");
        assert_eq!(p.sync, SyncFrequency::JustBeforeRecoveryPoint);
        let back = GroupPolicySpec::from_policy(&p);
        assert_eq!(back.points_at, ["08:00", "20:00"]);
        assert_eq!(back.to_policy(), Ok(p));
        for (field, bad) in [
            ("short_term_days", serde_json::json!(449)),
            ("chunk_size", serde_json::json!(1000)),
            ("sync_frequency", serde_json::json!("10m")),
            ("points_at", serde_json::json!([])),
            ("consistency_check", serde_json::json!("scheduled")),
        ] {
            let mut v = serde_json::to_value(GroupPolicySpec::default()).expect("json");
            v[field] = bad;
            let spec: GroupPolicySpec = serde_json::from_value(v).expect("spec");
            let err = spec.to_policy().expect_err(field);
            assert!(!err.contains('\n'), "{field}: {err}");
        }
    }
}
