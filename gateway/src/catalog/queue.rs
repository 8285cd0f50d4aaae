//! The scheduled-job queue (in `jobs`, columns added by
//! `migrations/0003_groups.sql`) and the per-member scheduling state.
//!
//! States: `queued` (by the scheduler) → `dispatched` (an agent took it with
//! `POST /v1/agent/jobs/next`) → `running` (the agent's backup session began
//! and adopted it) → `succeeded` | `failed`. A VM has at most one job in
//! `queued`/`dispatched`/`running` at a time; the check and the insert are one
//! transaction. Queued jobs are rows, so they survive a gateway restart.

use super::{Catalog, Result};

/// A group member with its group's policy row and scheduling state.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MemberScheduleRow {
    pub group_name: String,
    pub vm_id: String,
    pub vm_name: String,
    pub agent_id: String,
    /// When the VM joined the group (unix seconds).
    pub added_at: i64,
    pub last_sync: Option<i64>,
    pub last_recovery_point: Option<i64>,
    pub last_consistency_check: Option<i64>,
}

/// A job to put in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewQueuedJob {
    pub id: String,
    pub vm_id: String,
    pub vm_name: String,
    pub agent_id: String,
    pub group_name: String,
    pub full: bool,
    /// The schedule window it serves (unix seconds).
    pub window_at: i64,
    /// Shown in `jobs` (e.g. the missed windows it catches up on).
    pub message: Option<String>,
}

/// A job handed to an agent.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DispatchedJobRow {
    pub id: String,
    pub kind: String,
    pub vm_id: String,
    pub vm_name: String,
    pub full: bool,
    pub window_at: Option<i64>,
}

/// Which kinds of run a scheduler pass settled for a member (set to `now`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    pub sync: bool,
    pub recovery_point: bool,
    pub consistency_check: bool,
}

impl Catalog {
    /// Every group member with its scheduling state, by group and VM name.
    pub async fn member_schedules(&self) -> Result<Vec<MemberScheduleRow>> {
        Ok(sqlx::query_as::<_, MemberScheduleRow>(
            "SELECT m.group_name, m.vm_id, v.name AS vm_name, v.agent_id, m.added_at,
                    m.last_sync, m.last_recovery_point, m.last_consistency_check
             FROM group_members m JOIN vms v ON v.id = m.vm_id
             ORDER BY m.group_name, v.name, m.vm_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records that runs of the given kinds were settled at `now`, and
    /// enqueues `job` unless the VM already has a job queued, dispatched or
    /// running (then `false`: the windows are still settled, the caller
    /// reports them). One transaction.
    pub async fn settle_and_enqueue(
        &self,
        vm_id: &str,
        settled: Settled,
        job: Option<&NewQueuedJob>,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE group_members SET
               last_sync = CASE WHEN ? THEN ? ELSE last_sync END,
               last_recovery_point = CASE WHEN ? THEN ? ELSE last_recovery_point END,
               last_consistency_check = CASE WHEN ? THEN ? ELSE last_consistency_check END
             WHERE vm_id = ?",
        )
        .bind(settled.sync)
        .bind(now)
        .bind(settled.recovery_point)
        .bind(now)
        .bind(settled.consistency_check)
        .bind(now)
        .bind(vm_id)
        .execute(&mut *tx)
        .await?;
        let mut enqueued = false;
        if let Some(j) = job {
            let active: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM jobs WHERE vm_id = ?
                 AND state IN ('queued', 'dispatched', 'running')",
            )
            .bind(vm_id)
            .fetch_one(&mut *tx)
            .await?;
            if active == 0 {
                sqlx::query(
                    "INSERT INTO jobs (id, kind, vm_id, vm_name, agent_id, state, started_at,
                                       message, full, window_at, group_name)
                     VALUES (?, 'backup', ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                )
                .bind(&j.id)
                .bind(&j.vm_id)
                .bind(&j.vm_name)
                .bind(&j.agent_id)
                .bind(now)
                .bind(&j.message)
                .bind(j.full)
                .bind(j.window_at)
                .bind(&j.group_name)
                .execute(&mut *tx)
                .await?;
                enqueued = true;
            }
        }
        tx.commit().await?;
        Ok(enqueued)
    }

    /// Queues a consistency-check job (kind `consistency-check`) unless one
    /// for the VM is already queued, dispatched or running (then its id);
    /// a group member's last check is set to `now`. It may queue beside a
    /// backup: an agent gets one job of a VM at a time ([`Self::take_next_job`]).
    pub async fn enqueue_check(&self, j: &NewQueuedJob, now: i64) -> Result<Option<String>> {
        let mut tx = self.pool.begin().await?;
        let existing: Option<String> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE vm_id = ? AND kind = 'consistency-check'
             AND state IN ('queued', 'dispatched', 'running') LIMIT 1",
        )
        .bind(&j.vm_id)
        .fetch_optional(&mut *tx)
        .await?;
        if existing.is_none() {
            sqlx::query(
                "INSERT INTO jobs (id, kind, vm_id, vm_name, agent_id, state, started_at,
                                   message, full, window_at, group_name)
                 VALUES (?, 'consistency-check', ?, ?, ?, 'queued', ?, ?, 0, ?, ?)",
            )
            .bind(&j.id)
            .bind(&j.vm_id)
            .bind(&j.vm_name)
            .bind(&j.agent_id)
            .bind(now)
            .bind(&j.message)
            .bind(j.window_at)
            .bind((!j.group_name.is_empty()).then_some(&j.group_name))
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE group_members SET last_consistency_check = ? WHERE vm_id = ?")
                .bind(now)
                .bind(&j.vm_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(existing)
    }

    /// Hands the oldest queued job of a VM on this agent's host to the agent
    /// (`queued` → `dispatched`).
    pub async fn take_next_job(
        &self,
        agent_id: &str,
        now: i64,
    ) -> Result<Option<DispatchedJobRow>> {
        let mut tx = self.pool.begin().await?;
        let job = sqlx::query_as::<_, DispatchedJobRow>(
            "SELECT j.id, j.kind, j.vm_id, v.name AS vm_name, j.full, j.window_at
             FROM jobs j JOIN vms v ON v.id = j.vm_id
             WHERE j.state = 'queued' AND v.agent_id = ?
               AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.vm_id = j.vm_id
                               AND k.state IN ('dispatched', 'running'))
             ORDER BY j.started_at, j.id LIMIT 1",
        )
        .bind(agent_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(j) = &job {
            sqlx::query(
                "UPDATE jobs SET state = 'dispatched', agent_id = ?, started_at = ?
                 WHERE id = ? AND state = 'queued'",
            )
            .bind(agent_id)
            .bind(now)
            .bind(&j.id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(job)
    }

    /// When an agent begins a backup: the job dispatched to it for that VM
    /// becomes `running` and is the session's job; `None` if there is none.
    pub async fn adopt_dispatched_job(
        &self,
        vm_id: &str,
        agent_id: &str,
        now: i64,
    ) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "UPDATE jobs SET state = 'running', started_at = ?
             WHERE id = (SELECT id FROM jobs WHERE vm_id = ? AND agent_id = ?
                         AND state = 'dispatched' ORDER BY started_at, id LIMIT 1)
             RETURNING id",
        )
        .bind(now)
        .bind(vm_id)
        .bind(agent_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// An agent gives up a job dispatched to it before any session began
    /// (`dispatched` → `failed` with its message); `false` if it was not
    /// dispatched to that agent.
    pub async fn fail_dispatched_job(
        &self,
        id: &str,
        agent_id: &str,
        message: &str,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'failed', finished_at = ?, message = ?
             WHERE id = ? AND agent_id = ? AND state = 'dispatched'",
        )
        .bind(now)
        .bind(message)
        .bind(id)
        .bind(agent_id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Jobs dispatched before `before` whose backup never began are failed.
    pub async fn fail_stale_dispatched(&self, before: i64, now: i64) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'failed', finished_at = ?,
               message = 'the agent took the job but never began the backup'
             WHERE state = 'dispatched' AND started_at < ?",
        )
        .bind(now)
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{now_secs, GroupRow};
    use crate::policy::GroupPolicy;

    async fn catalog() -> (tempfile::TempDir, Catalog) {
        let (dir, c) = crate::catalog::test_catalog().await;
        for (tok, agent) in [(b"t1", "a1"), (b"t2", "a2")] {
            c.add_enroll_token(tok, now_secs() + 60).await.expect("tok");
            c.enroll_agent(tok, agent, "hv", b"s").await.expect("enrol");
        }
        c.upsert_vm("vm1", "web01", "a1", "Running", "{}")
            .await
            .expect("vm");
        c.upsert_vm("vm2", "sql01", "a2", "Running", "{}")
            .await
            .expect("vm");
        c.create_group(&GroupRow::new("g", &GroupPolicy::default(), 1))
            .await
            .expect("group");
        c.add_group_member("g", "vm1", 5).await.expect("add");
        c.add_group_member("g", "vm2", 6).await.expect("add");
        (dir, c)
    }

    fn job(id: &str, vm: &str, agent: &str) -> NewQueuedJob {
        NewQueuedJob {
            id: id.into(),
            vm_id: vm.into(),
            vm_name: "x".into(),
            agent_id: agent.into(),
            group_name: "g".into(),
            full: true,
            window_at: 1000,
            message: Some("catch-up".into()),
        }
    }

    #[tokio::test]
    async fn settle_enqueue_take_adopt() {
        let (_d, c) = catalog().await;
        let m = c.member_schedules().await.expect("members");
        assert_eq!(
            m.iter()
                .map(|r| (r.vm_name.as_str(), r.added_at, r.last_sync))
                .collect::<Vec<_>>(),
            [("sql01", 6, None), ("web01", 5, None)]
        );
        let both = Settled {
            sync: true,
            recovery_point: true,
            consistency_check: false,
        };
        assert!(c
            .settle_and_enqueue("vm1", both, Some(&job("j1", "vm1", "a1")), 100)
            .await
            .expect("enqueue"));
        // One active job per VM.
        assert!(!c
            .settle_and_enqueue("vm1", both, Some(&job("j2", "vm1", "a1")), 110)
            .await
            .expect("enqueue"));
        c.settle_and_enqueue(
            "vm2",
            Settled {
                consistency_check: true,
                ..Default::default()
            },
            None,
            120,
        )
        .await
        .expect("settle");
        let m = c.member_schedules().await.expect("members");
        let web = m.iter().find(|r| r.vm_id == "vm1").expect("vm1");
        assert_eq!(
            (
                web.last_sync,
                web.last_recovery_point,
                web.last_consistency_check
            ),
            (Some(110), Some(110), None)
        );
        let sql = m.iter().find(|r| r.vm_id == "vm2").expect("vm2");
        assert_eq!(
            (sql.last_sync, sql.last_consistency_check),
            (None, Some(120))
        );

        // Only the VM's own agent gets it; then it is no longer queued.
        assert!(c.take_next_job("a2", 130).await.expect("take").is_none());
        let got = c
            .take_next_job("a1", 130)
            .await
            .expect("take")
            .expect("job");
        assert_eq!(
            (
                got.id.as_str(),
                got.vm_name.as_str(),
                got.full,
                got.window_at
            ),
            ("j1", "web01", true, Some(1000))
        );
        assert!(c.take_next_job("a1", 131).await.expect("take").is_none());
        // Another agent's backup of the VM does not adopt it.
        assert!(c
            .adopt_dispatched_job("vm1", "a2", 140)
            .await
            .expect("adopt")
            .is_none());
        assert_eq!(
            c.adopt_dispatched_job("vm1", "a1", 140)
                .await
                .expect("adopt"),
            Some("j1".into())
        );
        assert!(c
            .adopt_dispatched_job("vm1", "a1", 141)
            .await
            .expect("adopt")
            .is_none());
        let jobs = c.list_jobs(10).await.expect("jobs");
        assert_eq!(
            jobs.iter()
                .map(|j| (j.id.as_str(), j.state.as_str()))
                .collect::<Vec<_>>(),
            [("j1", "running")]
        );
        c.finish_job("j1", "succeeded", "ok", Some("p"))
            .await
            .expect("finish");
        // Finished: the VM may be queued again.
        assert!(c
            .settle_and_enqueue("vm1", both, Some(&job("j3", "vm1", "a1")), 200)
            .await
            .expect("enqueue"));
    }

    #[tokio::test]
    async fn queued_jobs_survive_a_restart_and_stale_dispatches_fail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.db");
        let c = Catalog::open(&path).await.expect("open");
        c.add_enroll_token(b"t", now_secs() + 60)
            .await
            .expect("tok");
        c.enroll_agent(b"t", "a1", "hv", b"s").await.expect("enrol");
        c.upsert_vm("vm1", "web01", "a1", "Running", "{}")
            .await
            .expect("vm");
        c.create_group(&GroupRow::new("g", &GroupPolicy::default(), 1))
            .await
            .expect("group");
        c.add_group_member("g", "vm1", 5).await.expect("add");
        c.settle_and_enqueue(
            "vm1",
            Settled::default(),
            Some(&job("j1", "vm1", "a1")),
            100,
        )
        .await
        .expect("enqueue");
        c.close().await;
        let c = Catalog::open(&path).await.expect("reopen");
        // What `serve` does at start-up must not touch queued jobs.
        c.abandon_running_jobs().await.expect("abandon");
        let j = c
            .take_next_job("a1", 200)
            .await
            .expect("take")
            .expect("job");
        assert_eq!(j.id, "j1");
        assert!(!c
            .fail_dispatched_job("j1", "a2", "no", 200)
            .await
            .expect("fail"));
        assert_eq!(c.fail_stale_dispatched(150, 300).await.expect("stale"), 0);
        assert_eq!(c.fail_stale_dispatched(201, 300).await.expect("stale"), 1);
        assert_eq!(c.list_jobs(1).await.expect("jobs")[0].state, "failed");
    }
}
