//! `tierback-gateway prune` and `gc`: short-term retention and garbage
//! collection of the local store, run by the gateway over the admin API.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tierback_gateway::api::maintenance::{GcRequest, PruneRequest, PruneResponse};
use tierback_gateway::chunk_store::GcReport;

use crate::{human_bytes, print_json, Conn};

#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    conn: Conn,
    /// Only this VM (name or id).
    #[arg(long)]
    vm: Option<String>,
    /// Keep this many days of points for every selected VM, overriding the
    /// protection group's short-term retention. Without it, VMs in no group
    /// are left alone. The newest point of a VM is always kept.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    keep_days: Option<u32>,
    /// Apply retention as if it were this time (RFC 3339, e.g.
    /// 2026-05-01T00:00:00Z), to see or test what a later prune does.
    #[arg(long)]
    now: Option<String>,
    /// List what would be deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Compact packs whose live data fills less than this percentage.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    compact_below: Option<u8>,
}

#[derive(Args)]
pub struct GcArgs {
    #[command(flatten)]
    conn: Conn,
    /// Compact packs whose live data fills less than this percentage.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    compact_below: Option<u8>,
    /// Report what would be reclaimed; change nothing.
    #[arg(long)]
    dry_run: bool,
}

fn parse_now(text: &str) -> anyhow::Result<i64> {
    let t = humantime::parse_rfc3339_weak(text).with_context(|| {
        format!("--now {text:?} is not an RFC 3339 time such as 2026-05-01T00:00:00Z")
    })?;
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .context("--now must be after 1970")?
        .as_secs();
    i64::try_from(secs).context("--now is too far in the future")
}

pub async fn run_prune(a: PruneArgs) -> anyhow::Result<ExitCode> {
    let now = a.now.as_deref().map(parse_now).transpose()?;
    let r: PruneResponse = a
        .conn
        .client()?
        .post_json(
            "/v1/admin/prune",
            &PruneRequest {
                vm: a.vm,
                keep_days: a.keep_days,
                now,
                dry_run: a.dry_run,
                compact_below_percent: a.compact_below,
            },
        )
        .await?;
    if a.conn.json {
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    println!(
        "retention at {}: {verb} {} point(s), kept {}",
        r.now,
        r.points_deleted.len(),
        r.points_kept
    );
    for p in &r.points_deleted {
        println!(
            "  {} {:<16} {} (older than {} day(s))",
            p.id, p.vm_name, p.time, p.retention_days
        );
    }
    if !r.vms_without_retention.is_empty() {
        println!(
            "left alone (in no protection group; pass --keep-days): {}",
            r.vms_without_retention.join(", ")
        );
    }
    print_gc(&r.gc);
    Ok(ExitCode::SUCCESS)
}

pub async fn run_gc(a: GcArgs) -> anyhow::Result<ExitCode> {
    let r: GcReport = a
        .conn
        .client()?
        .post_json(
            "/v1/admin/gc",
            &GcRequest {
                compact_below_percent: a.compact_below,
                dry_run: a.dry_run,
            },
        )
        .await?;
    if a.conn.json {
        print_json(&r)?;
    } else {
        print_gc(&r);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_gc(r: &GcReport) {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    println!(
        "GC: {verb} {} chunk(s); {} pack(s) deleted, {} compacted ({} chunk(s) moved), {} leftover file(s) removed, {} skipped",
        r.chunks_removed,
        r.packs_removed,
        r.packs_compacted,
        r.chunks_moved,
        r.orphan_files_removed,
        r.packs_skipped
    );
    println!(
        "store: {} in {} pack(s) before, {} in {} pack(s) after; {} reclaimed in {:.1} s",
        human_bytes(r.bytes_before),
        r.packs_before,
        human_bytes(r.bytes_after),
        r.packs_after,
        human_bytes(r.bytes_reclaimed),
        r.seconds
    );
}
