//! `tierback-agent run`: takes the jobs the gateway's scheduler queued for
//! this host's VMs (`POST /v1/agent/jobs/next`) and runs their backups
//! (and consistency checks, `consistency::check_vm`), at
//! most `concurrency` at a time, until shutdown. The gateway owns schedules;
//! this loop only polls and runs. On shutdown it takes no new job and waits
//! for the backups in progress.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backup::{self, BackupOptions};
use crate::client::GatewayClient;
use crate::consistency::{self, CheckOptions};
use crate::host::{FolderHost, HostProvider};
use crate::state::AgentState;

/// Options of `run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub state_dir: PathBuf,
    /// Most backups at once on this host.
    pub concurrency: usize,
    /// Pause between polls when there is nothing to do (or the gateway is
    /// unreachable).
    pub poll: Duration,
}

/// What a `run` did, for its final log line and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub succeeded: u64,
    pub failed: u64,
}

/// Polls and runs jobs until `shutdown`.
pub async fn run(opts: RunOptions, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
    let st = AgentState::load(&opts.state_dir)?;
    let client = Arc::new(GatewayClient::new(
        &st.cfg.gateway,
        &st.cfg.fingerprint,
        Some(st.credential.clone()),
    )?);
    let host = Arc::new(FolderHost::new(&st.cfg.host_root));
    let (lack_batch, upload_batch_bytes, sample_min) = (
        st.cfg.lack_batch,
        st.cfg.upload_batch_bytes,
        st.cfg.sample_min,
    );
    let backup_opts = Arc::new(move |full: bool, state_dir: PathBuf| BackupOptions {
        full,
        progress: false,
        lack_batch,
        upload_batch_bytes,
        state_dir,
        sample_min,
    });
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut tasks: JoinSet<bool> = JoinSet::new();
    let mut summary = RunSummary::default();
    loop {
        while let Some(done) = tasks.try_join_next() {
            count(&mut summary, done);
        }
        // Take a job only when it can start at once.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p?,
        };
        let job = tokio::select! {
            _ = shutdown.cancelled() => break,
            j = client.next_job() => j,
        };
        let job = match job {
            Ok(Some(j)) => j,
            Ok(None) => {
                drop(permit);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(opts.poll) => continue,
                }
            }
            Err(e) => {
                drop(permit);
                tracing::warn!(error = %format!("{e:#}"), "cannot take the next job; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(opts.poll) => continue,
                }
            }
        };
        let (client, host, backup_opts) = (client.clone(), host.clone(), backup_opts.clone());
        let state_dir = opts.state_dir.clone();
        tasks.spawn(async move {
            let _permit = permit;
            tracing::info!(job = %job.id, vm = %job.vm_name, full = job.full, "job started");
            let vm = match host.find_vm(&job.vm_id) {
                Ok(vm) => vm,
                Err(e) => {
                    tracing::error!(job = %job.id, vm = %job.vm_name, error = %e, "job failed: VM not on this host");
                    give_up(&client, &job.id, &format!("{e:#}")).await;
                    return false;
                }
            };
            let opts = backup_opts(job.full, state_dir);
            if job.kind == tierback_format::wire::PURPOSE_CONSISTENCY_CHECK {
                let copts = CheckOptions {
                    state_dir: opts.state_dir.clone(),
                    lack_batch: opts.lack_batch,
                    upload_batch_bytes: opts.upload_batch_bytes,
                };
                return match consistency::check_vm(&client, &vm, &copts).await {
                    Ok(r) => {
                        tracing::info!(job = %job.id, vm = %job.vm_name, point = %r.point, differing = r.chunks_differing, "consistency check succeeded");
                        true
                    }
                    Err(e) => {
                        tracing::error!(job = %job.id, vm = %job.vm_name, error = %format!("{e:#}"), "consistency check failed");
                        give_up(&client, &job.id, &format!("{e:#}")).await;
                        false
                    }
                };
            }
            match backup::backup_vm(&client, &vm, &opts).await {
                Ok(r) => {
                    tracing::info!(job = %job.id, vm = %job.vm_name, point = %r.point, "job succeeded");
                    true
                }
                Err(e) => {
                    tracing::error!(job = %job.id, vm = %job.vm_name, error = %format!("{e:#}"), "job failed");
                    give_up(&client, &job.id, &format!("{e:#}")).await;
                    false
                }
            }
        });
    }
    tracing::info!(
        running = tasks.len(),
        "stopping: no new jobs; waiting for running backups"
    );
    while let Some(done) = tasks.join_next().await {
        count(&mut summary, done);
    }
    Ok(summary)
}

/// Fails a job that failed before its session began (else it would stay
/// `dispatched` until the gateway's timeout); a job whose session began was
/// already ended by the session.
async fn give_up(client: &GatewayClient, id: &str, message: &str) {
    if let Err(e) = client.fail_job(id, message).await {
        tracing::warn!(job = %id, error = %format!("{e:#}"), "could not report the failed job");
    }
}

fn count(s: &mut RunSummary, done: Result<bool, tokio::task::JoinError>) {
    match done {
        Ok(true) => s.succeeded += 1,
        Ok(false) => s.failed += 1,
        Err(e) => {
            tracing::error!(error = %e, "a job task ended abnormally");
            s.failed += 1;
        }
    }
}
