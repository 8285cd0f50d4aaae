//! `tierback-gateway group …` and `space`: protection groups over the admin
//! API. Flags are plain strings checked by `tierback_gateway::policy`, so a
//! bad value is one `error:` line (the gateway checks again).

use std::process::ExitCode;

use clap::Subcommand;
use tierback_gateway::api::groups::{
    AddMemberRequest, CreateGroupRequest, GroupPolicySpec, GroupSummary, SpaceReport,
};
use tierback_gateway::policy;

use crate::{human_bytes, print_json, urlencode, Conn};

#[derive(Subcommand)]
pub enum GroupCmd {
    /// Create a protection group with its policy (times are UTC).
    Create {
        #[command(flatten)]
        conn: Conn,
        /// Group name: letters, digits, '-', '_', '.'.
        name: String,
        /// Synchronisation frequency: 15m … 24h in steps of 15 minutes, or
        /// express-full (an express full just before each recovery point).
        #[arg(long, default_value = "15m")]
        sync_frequency: String,
        /// Recovery-point times of every day, HH:MM UTC, comma-separated.
        #[arg(long, default_value = "20:00")]
        points_at: String,
        /// Short-term retention range on the local disk, 1–448 days.
        #[arg(long, default_value = "5")]
        retention_days: String,
        /// Chunk size of the group's backups: a power of two, 256KiB–8MiB.
        #[arg(long, default_value = "1MiB")]
        chunk_size: String,
        /// Consistency check: only-when-inconsistent, scheduled or manual.
        #[arg(long, default_value = "only-when-inconsistent")]
        consistency_check: String,
        /// Daily time (HH:MM UTC) of a scheduled consistency check.
        #[arg(long)]
        consistency_check_at: Option<String>,
    },
    /// Add a VM (name or id) to a group; a VM is in at most one group.
    Add {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[arg(long)]
        vm: String,
    },
    /// Take a VM out of a group (its recovery points stay).
    Remove {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[arg(long)]
        vm: String,
    },
    /// List groups with their policy and members.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one group with its policy, members and next scheduled times.
    Show {
        #[command(flatten)]
        conn: Conn,
        name: String,
    },
    /// Delete a group (its VMs leave it; their recovery points stay).
    Delete {
        #[command(flatten)]
        conn: Conn,
        name: String,
    },
}

pub async fn run_group(cmd: GroupCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        GroupCmd::Create {
            conn,
            name,
            sync_frequency,
            points_at,
            retention_days,
            chunk_size,
            consistency_check,
            consistency_check_at,
        } => {
            policy::validate_group_name(&name).map_err(anyhow::Error::msg)?;
            let short_term_days: u32 = retention_days.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "retention range {retention_days:?} must be a number of days between 1 and 448"
                )
            })?;
            let spec = GroupPolicySpec {
                sync_frequency,
                points_at: policy::parse_points_at(&points_at)
                    .map_err(anyhow::Error::msg)?
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                short_term_days,
                chunk_size: policy::parse_chunk_size(&chunk_size).map_err(anyhow::Error::msg)?,
                consistency_check,
                consistency_check_at,
            };
            spec.to_policy().map_err(anyhow::Error::msg)?;
            let g: GroupSummary = conn
                .client()?
                .post_json(
                    "/v1/admin/groups",
                    &CreateGroupRequest { name, policy: spec },
                )
                .await?;
            show(&conn, &g)?;
        }
        GroupCmd::Add { conn, name, vm } => {
            let g: GroupSummary = conn
                .client()?
                .post_json(
                    &format!("/v1/admin/groups/{}/members", urlencode(&name)),
                    &AddMemberRequest { vm },
                )
                .await?;
            show(&conn, &g)?;
        }
        GroupCmd::Remove { conn, name, vm } => {
            let g: GroupSummary = conn
                .client()?
                .delete_json(&format!(
                    "/v1/admin/groups/{}/members/{}",
                    urlencode(&name),
                    urlencode(&vm)
                ))
                .await?;
            show(&conn, &g)?;
        }
        GroupCmd::List { conn } => {
            let gs: Vec<GroupSummary> = conn.client()?.get_json("/v1/admin/groups").await?;
            if conn.json {
                print_json(&gs)?;
            } else if gs.is_empty() {
                println!("no protection groups: create one with `tierback-gateway group create`");
            } else {
                println!(
                    "{:<20} {:>7} {:<13} {:<24} {:>9} {:>10}  consistency check",
                    "NAME", "MEMBERS", "SYNC", "POINTS AT (UTC)", "RETENTION", "CHUNK"
                );
                for g in gs {
                    println!(
                        "{:<20} {:>7} {:<13} {:<24} {:>8}d {:>10}  {}",
                        g.name,
                        g.members.len(),
                        g.policy.sync_frequency,
                        g.policy.points_at.join(","),
                        g.policy.short_term_days,
                        human_bytes(u64::from(g.policy.chunk_size)),
                        consistency(&g.policy)
                    );
                }
            }
        }
        GroupCmd::Show { conn, name } => {
            let g: GroupSummary = conn
                .client()?
                .get_json(&format!("/v1/admin/groups/{}", urlencode(&name)))
                .await?;
            show(&conn, &g)?;
        }
        GroupCmd::Delete { conn, name } => {
            let v: serde_json::Value = conn
                .client()?
                .delete_json(&format!("/v1/admin/groups/{}", urlencode(&name)))
                .await?;
            if conn.json {
                print_json(&v)?;
            } else {
                println!("deleted protection group {name} (recovery points are kept)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn consistency(p: &GroupPolicySpec) -> String {
    match &p.consistency_check_at {
        Some(at) => format!("{} at {at} UTC", p.consistency_check),
        None => p.consistency_check.clone(),
    }
}

fn show(conn: &Conn, g: &GroupSummary) -> anyhow::Result<()> {
    if conn.json {
        return print_json(g);
    }
    let p = &g.policy;
    println!("Protection group {}", g.name);
    println!(
        "  synchronisation:    {}",
        if p.sync_frequency == "express-full" {
            "express full just before each recovery point".to_string()
        } else {
            format!("every {}", p.sync_frequency)
        }
    );
    println!("  recovery points at: {} UTC", p.points_at.join(", "));
    println!("  retention range:    {} days on disk", p.short_term_days);
    println!(
        "  chunk size:         {}",
        human_bytes(u64::from(p.chunk_size))
    );
    println!("  consistency check:  {}", consistency(p));
    println!("  next sync:          {}", g.next_sync);
    println!("  next recovery pt:   {}", g.next_recovery_point);
    if let Some(c) = &g.next_consistency_check {
        println!("  next check:         {c}");
    }
    if g.members.is_empty() {
        println!(
            "  members:            none (add with `group add {} --vm NAME|ID`)",
            g.name
        );
    } else {
        println!("  members:");
        for m in &g.members {
            println!("    {:<20} {}  (since {})", m.vm_name, m.vm_id, m.added);
        }
    }
    Ok(())
}

pub async fn run_space(conn: Conn) -> anyhow::Result<ExitCode> {
    let r: SpaceReport = conn.client()?.get_json("/v1/admin/space").await?;
    if conn.json {
        print_json(&r)?;
    } else if r.groups.is_empty() {
        println!("no protection groups: create one with `tierback-gateway group create`");
    } else {
        println!(
            "{:<20} {:>7} {:>6} {:>10} {:>10} {:>10} {:>5} {:>11}",
            "GROUP", "MEMBERS", "POINTS", "DATA", "STORED", "CHANGE/DAY", "DAYS", "PROJECTED"
        );
        for g in &r.groups {
            println!(
                "{:<20} {:>7} {:>6} {:>10} {:>10} {:>10} {:>5} {:>11}",
                g.name,
                g.members.len(),
                g.points,
                human_bytes(g.data_bytes),
                human_bytes(g.stored_bytes),
                human_bytes(g.daily_change_bytes),
                g.short_term_days,
                human_bytes(g.projected_bytes)
            );
        }
        println!();
        println!("DATA: logical bytes of each member's newest point; STORED: bytes its points added to the store;");
        println!("PROJECTED = DATA + CHANGE/DAY (last 7 days of points) × DAYS of retention.");
    }
    Ok(ExitCode::SUCCESS)
}
