//! `tierback-gateway consistency-check`: queues a consistency check per VM
//! for the agent that owns it and (unless `--no-wait`) waits for the
//! outcome, printing what differed.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use tierback_format::wire::JobSummary;
use tierback_gateway::api::consistency::{ConsistencyCheckRequest, ConsistencyCheckResponse};

use crate::{print_json, Conn};

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    conn: Conn,
    /// One VM (name or id).
    #[arg(long, conflicts_with = "group", required_unless_present = "group")]
    vm: Option<String>,
    /// Every member of a protection group.
    #[arg(long)]
    group: Option<String>,
    /// Print the queued job ids and return at once.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting after this many seconds (the checks go on).
    #[arg(long, default_value_t = 3600)]
    timeout_secs: u64,
}

fn finished(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "abandoned")
}

pub async fn run_check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let client = a.conn.client()?;
    let r: ConsistencyCheckResponse = client
        .post_json(
            "/v1/admin/consistency-checks",
            &ConsistencyCheckRequest {
                vm: a.vm.clone(),
                group: a.group.clone(),
            },
        )
        .await?;
    if a.no_wait {
        if a.conn.json {
            print_json(&r)?;
        } else {
            for j in &r.jobs {
                println!("{} queued: consistency check of {}", j.job, j.vm_name);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !a.conn.json {
        eprintln!(
            "waiting for {} consistency check(s) (the VMs' agents must be running `tierback-agent run`)…",
            r.jobs.len()
        );
    }
    let start = Instant::now();
    let ids: Vec<&str> = r.jobs.iter().map(|j| j.job.as_str()).collect();
    let done: Vec<JobSummary> = loop {
        let jobs: Vec<JobSummary> = client.get_json("/v1/admin/jobs").await?;
        let mine: Vec<JobSummary> = jobs
            .into_iter()
            .filter(|j| ids.contains(&j.id.as_str()))
            .collect();
        if mine.len() == ids.len() && mine.iter().all(|j| finished(&j.state)) {
            break mine;
        }
        if start.elapsed() > Duration::from_secs(a.timeout_secs) {
            anyhow::bail!(
                "the consistency check(s) did not finish within {} s (they go on; see `tierback-gateway jobs`): {}",
                a.timeout_secs,
                ids.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let failed = done.iter().filter(|j| j.state != "succeeded").count();
    if a.conn.json {
        print_json(&done)?;
    } else {
        for j in &done {
            println!(
                "{} {} {}: {}",
                j.vm_name.as_deref().unwrap_or("-"),
                j.id,
                j.state,
                j.message.as_deref().unwrap_or_default()
            );
        }
    }
    if failed > 0 {
        eprintln!("error: {failed} consistency check(s) failed; see the messages above");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
