//! The gateway owns the schedules: every [`TICK`] it runs
//! `policy::schedule::plan` for each protection-group member and enqueues the
//! due backup as a `queued` job (agents take them with
//! `POST /v1/agent/jobs/next`). Missed windows are logged and written into the
//! job's message, never silently dropped. Due consistency checks (daily
//! window, or a member found inconsistent: `policy::consistency`) are
//! queued as `consistency-check` jobs the same way.
//!
//! It never runs a backup itself and never touches the chunk store; all its
//! state is in the catalog (the members' last-run times and the jobs), so a
//! restart loses nothing and a queued job survives it.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::rfc3339;
use crate::catalog::{now_secs, Catalog, NewQueuedJob, Result, Settled};
use crate::policy::consistency::{self, CheckTrigger};
use crate::policy::schedule::{self, LastRuns, RunKind};
use crate::policy::GroupPolicy;
use tierback_format::wire::{TrackingHealth, VmInfo};

/// How often the scheduler looks at the schedules.
pub const TICK: Duration = Duration::from_secs(30);
/// A job an agent took but did not begin within this long is failed.
pub const DISPATCH_TIMEOUT_SECS: i64 = 3600;

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Ids of the jobs enqueued.
    pub enqueued: Vec<String>,
    /// Due backups not enqueued because the VM had a job in progress.
    pub busy: u64,
    /// Missed windows found (all members, all kinds).
    pub missed: u64,
    /// Consistency checks that fell due (daily window, or a member found
    /// inconsistent under `only-when-inconsistent`).
    pub consistency_checks_due: u64,
    /// Ids of the consistency-check jobs enqueued.
    pub checks_enqueued: Vec<String>,
}

/// One pass at `now` (unix seconds, UTC).
pub async fn tick(catalog: &Catalog, now: i64) -> Result<TickReport> {
    let mut policies: HashMap<String, GroupPolicy> = HashMap::new();
    for g in catalog.list_groups().await? {
        match g.policy() {
            Ok(p) => {
                policies.insert(g.name.clone(), p);
            }
            Err(e) => tracing::error!(group = %g.name, error = %e, "group skipped"),
        }
    }
    let mut report = TickReport::default();
    // Change-tracking health of each VM's disks as its agent last reported it.
    let health: HashMap<String, Vec<(String, Option<TrackingHealth>)>> = catalog
        .list_vms()
        .await?
        .into_iter()
        .filter_map(|v| {
            let info: VmInfo = serde_json::from_str(&v.descriptor).ok()?;
            let disks = info
                .disks
                .into_iter()
                .map(|d| (format!("disk {} ({})", d.index, d.path), d.tracking))
                .collect();
            Some((v.id, disks))
        })
        .collect();
    for m in catalog.member_schedules().await? {
        let Some(policy) = policies.get(&m.group_name) else {
            continue;
        };
        let last = LastRuns {
            sync: m.last_sync,
            recovery_point: m.last_recovery_point,
            consistency_check: m.last_consistency_check,
        };
        let plan = schedule::plan(policy, m.added_at, &last, now);
        let inconsistent = health
            .get(&m.vm_id)
            .and_then(|d| consistency::inconsistency(d));
        let trigger = consistency::check_due(
            policy.consistency_check,
            plan.due_consistency_check,
            inconsistent.as_deref(),
            m.last_consistency_check,
            now,
        );
        if plan.due_backup.is_none() && plan.due_consistency_check.is_none() && trigger.is_none() {
            continue;
        }
        let settled = Settled {
            sync: plan.due_backup.is_some(),
            recovery_point: plan
                .due_backup
                .is_some_and(|d| d.kind == RunKind::RecoveryPoint),
            consistency_check: plan.due_consistency_check.is_some(),
        };
        let missed_note = (plan.missed_total > 0).then(|| {
            format!(
                "; {} earlier window(s) missed{}",
                plan.missed_total,
                plan.missed
                    .first()
                    .map(|w| format!(" (oldest listed: {} {})", w.kind.as_str(), rfc3339(w.at)))
                    .unwrap_or_default()
            )
        });
        if plan.missed_total > 0 {
            report.missed += plan.missed_total;
            tracing::warn!(
                group = %m.group_name,
                vm = %m.vm_name,
                missed = plan.missed_total,
                windows = ?plan.missed.iter().map(|w| (w.kind.as_str(), rfc3339(w.at))).collect::<Vec<_>>(),
                "schedule windows were missed (the gateway was down or the VM busy)"
            );
        }
        let job = plan.due_backup.map(|d| NewQueuedJob {
            id: format!("job-{}", &crate::api::random_secret()[..16]),
            vm_id: m.vm_id.clone(),
            vm_name: m.vm_name.clone(),
            agent_id: m.agent_id.clone(),
            group_name: m.group_name.clone(),
            full: d.full,
            window_at: d.window,
            message: Some(format!(
                "scheduled {} ({}) for the {} window{}",
                d.kind.as_str(),
                if d.full {
                    "express full"
                } else {
                    "incremental"
                },
                rfc3339(d.window),
                missed_note.clone().unwrap_or_default()
            )),
        });
        let enqueued = catalog
            .settle_and_enqueue(&m.vm_id, settled, job.as_ref(), now)
            .await?;
        match (job, enqueued) {
            (Some(j), true) => {
                tracing::info!(group = %m.group_name, vm = %m.vm_name, job = %j.id, full = j.full, "backup queued");
                report.enqueued.push(j.id);
            }
            (Some(_), false) => {
                report.busy += 1;
                tracing::warn!(group = %m.group_name, vm = %m.vm_name, "backup window due while a job of the VM is still queued or running: window missed");
            }
            (None, _) => {}
        }
        if let Some(t) = trigger {
            report.consistency_checks_due += 1;
            let (window_at, message) = match &t {
                CheckTrigger::Scheduled(w) => (
                    *w,
                    format!("scheduled consistency check for the {} window", rfc3339(*w)),
                ),
                CheckTrigger::Inconsistent(why) => (
                    now,
                    format!("consistency check: the replica may be inconsistent: {why}"),
                ),
            };
            let job = NewQueuedJob {
                id: format!("job-{}", &crate::api::random_secret()[..16]),
                vm_id: m.vm_id.clone(),
                vm_name: m.vm_name.clone(),
                agent_id: m.agent_id.clone(),
                group_name: m.group_name.clone(),
                full: false,
                window_at,
                message: Some(message),
            };
            if catalog.enqueue_check(&job, now).await?.is_none() {
                tracing::info!(group = %m.group_name, vm = %m.vm_name, job = %job.id, trigger = ?t, "consistency check queued");
                report.checks_enqueued.push(job.id);
            }
        }
    }
    let stale = catalog
        .fail_stale_dispatched(now - DISPATCH_TIMEOUT_SECS, now)
        .await?;
    if stale > 0 {
        tracing::warn!(jobs = stale, "dispatched jobs never began: failed");
    }
    Ok(report)
}

/// The pass interval: [`TICK`], or `TIERBACK_SCHEDULER_TICK_SECS` (1–3600;
/// tests use a short one).
pub fn tick_interval() -> Duration {
    std::env::var("TIERBACK_SCHEDULER_TICK_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| (1..=3600).contains(s))
        .map_or(TICK, Duration::from_secs)
}

/// Runs [`tick`] every [`tick_interval`] until `shutdown`.
pub async fn run(catalog: Catalog, shutdown: CancellationToken) {
    let every = tick_interval();
    loop {
        if let Err(e) = tick(&catalog, now_secs()).await {
            tracing::error!(error = %e, "scheduler pass failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::GroupRow;
    use crate::policy::DAY_SECS;

    /// 2026-01-01T00:00:00Z.
    const D0: i64 = 1_767_225_600;

    async fn setup() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Catalog::open(&dir.path().join("catalog.db"))
            .await
            .expect("open");
        c.add_enroll_token(b"t", now_secs() + 60)
            .await
            .expect("tok");
        c.enroll_agent(b"t", "a1", "hv", b"s").await.expect("enrol");
        c.upsert_vm("vm1", "web01", "a1", "Running", "{}")
            .await
            .expect("vm");
        let policy = GroupPolicy {
            sync: "1h".parse().expect("sync"),
            points_at: crate::policy::parse_points_at("20:00").expect("points"),
            consistency_check: crate::policy::ConsistencyCheck::Daily("02:00".parse().expect("t")),
            ..GroupPolicy::default()
        };
        c.create_group(&GroupRow::new("g", &policy, D0))
            .await
            .expect("group");
        c.add_group_member("g", "vm1", D0).await.expect("add");
        (dir, c)
    }

    #[tokio::test]
    async fn an_inconsistent_member_gets_one_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Catalog::open(&dir.path().join("catalog.db"))
            .await
            .expect("open");
        c.add_enroll_token(b"t", now_secs() + 60)
            .await
            .expect("tok");
        c.enroll_agent(b"t", "a1", "hv", b"s").await.expect("enrol");
        let vm = |state: &str| {
            serde_json::json!({"id": "vm1", "name": "web01", "generation": 2,
                "config_version": "9.0", "state": "Running", "folder": "/h/web01",
                "disks": [{"index": 0, "path": "a.vhdx", "controller": "SCSI", "location": "0:0",
                    "virtual_size": 1, "logical_sector_size": 512, "physical_sector_size": 4096,
                    "format": "vhdx", "tracking": {"state": state, "method": "compare"}}]})
            .to_string()
        };
        c.upsert_vm("vm1", "web01", "a1", "Running", &vm("tracking"))
            .await
            .expect("vm");
        // Only when inconsistent (the default), no backup window near.
        c.create_group(&GroupRow::new("g", &GroupPolicy::default(), D0))
            .await
            .expect("group");
        c.add_group_member("g", "vm1", D0).await.expect("add");
        let t = D0 + 60;
        assert!(tick(&c, t).await.expect("tick").checks_enqueued.is_empty());
        c.upsert_vm("vm1", "web01", "a1", "Running", &vm("fallback"))
            .await
            .expect("vm");
        let r = tick(&c, t + 1).await.expect("tick");
        assert_eq!((r.checks_enqueued.len(), r.consistency_checks_due), (1, 1));
        // Not again while it is queued, nor within the re-trigger time.
        assert!(tick(&c, t + 2)
            .await
            .expect("tick")
            .checks_enqueued
            .is_empty());
        let j = c
            .take_next_job("a1", t + 3)
            .await
            .expect("take")
            .expect("job");
        assert_eq!(j.kind, "consistency-check");
        c.adopt_dispatched_job("vm1", "a1", t + 4)
            .await
            .expect("adopt");
        c.finish_job(&j.id, "failed", "x", None)
            .await
            .expect("finish");
        assert!(tick(&c, t + 5)
            .await
            .expect("tick")
            .checks_enqueued
            .is_empty());
        let later = t + 1 + crate::policy::consistency::RETRIGGER_SECS;
        assert_eq!(
            tick(&c, later).await.expect("tick").checks_enqueued.len(),
            1
        );
    }

    #[tokio::test]
    async fn ticks_enqueue_due_backups_once_and_report_missed_windows() {
        let (_d, c) = setup().await;
        // 00:30: nothing due yet.
        assert_eq!(
            tick(&c, D0 + 1800).await.expect("tick"),
            TickReport::default()
        );
        // 01:00:10: the 01:00 sync is due.
        let r = tick(&c, D0 + 3610).await.expect("tick");
        assert_eq!((r.enqueued.len(), r.missed, r.busy), (1, 0, 0));
        let j = c
            .take_next_job("a1", D0 + 3620)
            .await
            .expect("take")
            .expect("job");
        assert!(!j.full);
        assert_eq!(j.window_at, Some(D0 + 3600));
        // Same window again: nothing new.
        assert_eq!(tick(&c, D0 + 3640).await.expect("tick").enqueued.len(), 0);
        // 02:00 while the 01:00 job is still out: busy, window settled.
        let r = tick(&c, D0 + 7200).await.expect("tick");
        assert_eq!(
            (r.enqueued.len(), r.busy, r.consistency_checks_due),
            (0, 1, 1)
        );
        // The daily check is queued beside the backup job but not handed
        // out while the VM's backup is out.
        assert_eq!(r.checks_enqueued.len(), 1);
        assert!(c
            .take_next_job("a1", D0 + 7250)
            .await
            .expect("take")
            .is_none());
        c.adopt_dispatched_job("vm1", "a1", D0 + 7300)
            .await
            .expect("adopt");
        c.finish_job(&j.id, "succeeded", "ok", None)
            .await
            .expect("finish");
        let cc = c
            .take_next_job("a1", D0 + 7400)
            .await
            .expect("take")
            .expect("check job");
        assert_eq!(
            (cc.id.as_str(), cc.kind.as_str()),
            (r.checks_enqueued[0].as_str(), "consistency-check")
        );
        c.adopt_dispatched_job("vm1", "a1", D0 + 7401)
            .await
            .expect("adopt");
        c.finish_job(&cc.id, "succeeded", "ok", None)
            .await
            .expect("finish");
        // Down from 02:00 to 20:30: the 20:00 express full is due, the
        // syncs 03:00…20:00 are covered or missed (17 missed: 03:00…19:00).
        let r = tick(&c, D0 + 20 * 3600 + 1800).await.expect("tick");
        assert_eq!((r.enqueued.len(), r.missed), (1, 17));
        let j = c
            .take_next_job("a1", D0 + 20 * 3600 + 1801)
            .await
            .expect("take")
            .expect("job");
        assert!(j.full);
        assert_eq!(j.window_at, Some(D0 + 20 * 3600));
        let jobs = c.list_jobs(10).await.expect("jobs");
        let msg = jobs
            .iter()
            .find(|x| x.id == j.id)
            .and_then(|x| x.message.clone())
            .expect("message");
        assert!(msg.contains("17 earlier window(s) missed"), "{msg}");
        // Never taken in time: failed by a later pass.
        let r = tick(&c, D0 + DAY_SECS + 3 * 3600).await.expect("tick");
        assert_eq!(r.enqueued.len(), 0, "the dispatched job is still active");
        let jobs = c.list_jobs(10).await.expect("jobs");
        assert_eq!(
            jobs.iter().find(|x| x.id == j.id).map(|x| x.state.as_str()),
            Some("failed")
        );
    }
}
