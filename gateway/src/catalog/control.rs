//! Control-plane tables: agents, enrolment and admin tokens, VMs, jobs.

use super::{Catalog, Result};

/// An enrolled agent.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AgentRow {
    pub id: String,
    pub host_name: String,
    pub secret_hash: Vec<u8>,
}

/// A VM as last reported, with its descriptor (wire::VmInfo JSON).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VmRow {
    pub id: String,
    pub name: String,
    pub agent_id: String,
    pub host_name: String,
    pub state: String,
    pub descriptor: String,
    pub points: i64,
    pub last_point: Option<i64>,
}

/// A job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub kind: String,
    pub vm_id: Option<String>,
    pub vm_name: Option<String>,
    pub agent_id: Option<String>,
    pub state: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub message: Option<String>,
    pub point_id: Option<String>,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Catalog {
    pub async fn add_admin_token(&self, hash: &[u8], name: &str) -> Result<()> {
        sqlx::query("INSERT INTO admin_tokens (token_hash, name, created_at) VALUES (?, ?, ?)")
            .bind(hash)
            .bind(name)
            .bind(now_secs())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn admin_token_exists(&self, hash: &[u8]) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM admin_tokens WHERE token_hash = ?")
            .bind(hash)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    pub async fn add_enroll_token(&self, hash: &[u8], expires_at: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO enroll_tokens (token_hash, created_at, expires_at) VALUES (?, ?, ?)",
        )
        .bind(hash)
        .bind(now_secs())
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks an unused, unexpired token used and enrols the agent, atomically.
    /// Returns false (and changes nothing) when the token is unknown, used or
    /// expired.
    pub async fn enroll_agent(
        &self,
        token_hash: &[u8],
        agent_id: &str,
        host_name: &str,
        secret_hash: &[u8],
    ) -> Result<bool> {
        let now = now_secs();
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE enroll_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?",
        )
        .bind(now)
        .bind(token_hash)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO agents (id, host_name, secret_hash, enrolled_at, last_seen) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(agent_id)
        .bind(host_name)
        .bind(secret_hash)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn agent(&self, id: &str) -> Result<Option<AgentRow>> {
        Ok(sqlx::query_as::<_, AgentRow>(
            "SELECT id, host_name, secret_hash FROM agents WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Records (or updates) a VM as reported by an agent.
    pub async fn upsert_vm(
        &self,
        id: &str,
        name: &str,
        agent_id: &str,
        state: &str,
        descriptor: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO vms (id, name, agent_id, state, descriptor, updated_at) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT(id) DO UPDATE SET name = excluded.name, agent_id = excluded.agent_id,
               state = excluded.state, descriptor = excluded.descriptor, updated_at = excluded.updated_at",
        )
        .bind(id)
        .bind(name)
        .bind(agent_id)
        .bind(state)
        .bind(descriptor)
        .bind(now_secs())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn list_vms(&self) -> Result<Vec<VmRow>> {
        Ok(sqlx::query_as::<_, VmRow>(
            "SELECT v.id, v.name, v.agent_id, a.host_name, v.state, v.descriptor,
                    (SELECT COUNT(*) FROM points p WHERE p.vm_id = v.id) AS points,
                    (SELECT MAX(created_at) FROM points p WHERE p.vm_id = v.id) AS last_point
             FROM vms v JOIN agents a ON a.id = v.agent_id ORDER BY v.name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn start_job(
        &self,
        id: &str,
        kind: &str,
        vm_id: &str,
        vm_name: &str,
        agent_id: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO jobs (id, kind, vm_id, vm_name, agent_id, state, started_at) VALUES (?, ?, ?, ?, ?, 'running', ?)",
        )
        .bind(id)
        .bind(kind)
        .bind(vm_id)
        .bind(vm_name)
        .bind(agent_id)
        .bind(now_secs())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn finish_job(
        &self,
        id: &str,
        state: &str,
        message: &str,
        point: Option<&str>,
    ) -> Result<()> {
        sqlx::query("UPDATE jobs SET state = ?, finished_at = ?, message = ?, point_id = ? WHERE id = ? AND state = 'running'")
            .bind(state)
            .bind(now_secs())
            .bind(message)
            .bind(point)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// At start-up: jobs still marked running belong to a previous process
    /// that died; they are abandoned (their data is garbage for GC).
    pub async fn abandon_running_jobs(&self) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'abandoned', finished_at = ?, message = 'gateway stopped while the job ran' WHERE state = 'running'",
        )
        .bind(now_secs())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    pub async fn list_jobs(&self, limit: i64) -> Result<Vec<JobRow>> {
        Ok(sqlx::query_as::<_, JobRow>(
            "SELECT id, kind, vm_id, vm_name, agent_id, state, started_at, finished_at, message, point_id
             FROM jobs ORDER BY started_at DESC, id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::catalog::test_catalog as catalog;

    #[tokio::test]
    async fn enrolment_token_is_single_use_and_expires() {
        let (_d, c) = catalog().await;
        c.add_enroll_token(b"t1", now_secs() + 60)
            .await
            .expect("add");
        c.add_enroll_token(b"t2", now_secs() - 1)
            .await
            .expect("add");
        assert!(c
            .enroll_agent(b"t1", "a1", "hv1", b"s")
            .await
            .expect("enrol"));
        assert!(!c
            .enroll_agent(b"t1", "a2", "hv1", b"s")
            .await
            .expect("reuse"));
        assert!(!c
            .enroll_agent(b"t2", "a3", "hv1", b"s")
            .await
            .expect("expired"));
        assert!(!c
            .enroll_agent(b"nope", "a4", "hv1", b"s")
            .await
            .expect("unknown"));
        assert_eq!(
            c.agent("a1").await.expect("q").map(|a| a.host_name),
            Some("hv1".into())
        );
        assert!(c.agent("a2").await.expect("q").is_none());
    }

    #[tokio::test]
    async fn admin_tokens_vms_and_jobs() {
        let (_d, c) = catalog().await;
        c.add_admin_token(b"h", "local").await.expect("add");
        assert!(c.admin_token_exists(b"h").await.expect("q"));
        assert!(!c.admin_token_exists(b"x").await.expect("q"));
        c.add_enroll_token(b"t", now_secs() + 60)
            .await
            .expect("tok");
        c.enroll_agent(b"t", "a1", "hv1", b"s")
            .await
            .expect("enrol");
        c.upsert_vm("vm1", "web01", "a1", "Running", "{}")
            .await
            .expect("vm");
        c.upsert_vm("vm1", "web01-renamed", "a1", "Off", "{}")
            .await
            .expect("vm");
        let vms = c.list_vms().await.expect("list");
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].name, "web01-renamed");
        assert_eq!(vms[0].points, 0);
        c.start_job("j1", "backup", "vm1", "web01", "a1")
            .await
            .expect("job");
        c.start_job("j2", "backup", "vm1", "web01", "a1")
            .await
            .expect("job");
        c.finish_job("j1", "succeeded", "ok", Some("p1"))
            .await
            .expect("finish");
        assert_eq!(c.abandon_running_jobs().await.expect("abandon"), 1);
        let jobs = c.list_jobs(10).await.expect("jobs");
        let j1 = jobs.iter().find(|j| j.id == "j1").expect("j1");
        let j2 = jobs.iter().find(|j| j.id == "j2").expect("j2");
        assert_eq!(
            (j1.state.as_str(), j1.point_id.as_deref()),
            ("succeeded", Some("p1"))
        );
        assert_eq!(j2.state, "abandoned");
    }
}
