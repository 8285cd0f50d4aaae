//! `tierback-agent`: the Hyper-V host side of Tierback.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tierback_agent::backup::{self, BackupOptions};
use tierback_agent::client::GatewayClient;
use tierback_agent::host::{FolderHost, HostProvider};
use tierback_agent::state::{AgentConfig, AgentState};
use tierback_format::wire::EnrollRequest;

#[derive(Parser)]
#[command(
    name = "tierback-agent",
    version,
    about = "Tierback agent: backs up the Hyper-V VMs of this host to a Tierback gateway, block by block.",
    long_about = "Tierback agent: backs up the Hyper-V VMs of this host to a Tierback gateway, block by block.\n\n\
Enrol once with a token from `tierback-gateway enroll-token` and the gateway's certificate fingerprint,\n\
then `backup --vm NAME`. Source disks are opened read-only and never written."
)]
struct Cli {
    /// Log filter (also RUST_LOG).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enrol this host with a gateway.
    Enroll {
        #[arg(long, env = "TIERBACK_AGENT_STATE")]
        state_dir: PathBuf,
        /// Gateway URL, https://HOST:PORT.
        #[arg(long)]
        gateway: String,
        /// One-time enrolment token (or TIERBACK_ENROLL_TOKEN).
        #[arg(long, env = "TIERBACK_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// SHA-256 fingerprint of the gateway certificate (printed by `tierback-gateway init`).
        #[arg(long)]
        fingerprint: String,
        /// Folder with one sub-folder per VM (see docs/host.md).
        #[arg(long)]
        host_root: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List this host's VMs and report them to the gateway.
    Vms {
        #[arg(long, env = "TIERBACK_AGENT_STATE")]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make one recovery point of a VM now (incremental when a previous one exists, unless --full).
    Backup {
        #[arg(long, env = "TIERBACK_AGENT_STATE")]
        state_dir: PathBuf,
        /// VM name or id.
        #[arg(long)]
        vm: String,
        /// Read every allocated block even if change tracking is available.
        #[arg(long)]
        full: bool,
        #[arg(long)]
        json: bool,
    },
    /// Export the first full of VMs to a folder (removable media) as an
    /// encrypted offline seed, for `tierback-gateway import`. Prints the seed
    /// key once; it is never written to the media.
    Export {
        #[arg(long, env = "TIERBACK_AGENT_STATE")]
        state_dir: PathBuf,
        /// VM name or id (repeat for several VMs; each gets `<to>/<vm id>/`).
        #[arg(long, required_unless_present = "group")]
        vm: Vec<String>,
        /// Every VM of this protection group on this host (asked of the gateway).
        #[arg(long)]
        group: Option<String>,
        /// Folder to write the seed(s) into.
        #[arg(long)]
        to: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Long-running: take the backups the gateway scheduled for this host's VMs
    /// until SIGINT/SIGTERM (then finish the running ones).
    Run {
        #[arg(long, env = "TIERBACK_AGENT_STATE")]
        state_dir: PathBuf,
        /// Most backups at once on this host (1–16).
        #[arg(long, default_value = "2")]
        concurrency: String,
        /// Seconds between polls when there is nothing to do (1–3600).
        #[arg(long, default_value = "15")]
        poll_secs: String,
    },
    /// Consistency check: read every disk in full, compare with the gateway's
    /// newest point, send what differs and commit a repaired point.
    ConsistencyCheck {
        #[arg(long, env = "TIERBACK_AGENT_STATE")]
        state_dir: PathBuf,
        /// VM name or id.
        #[arg(long)]
        vm: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tierback_format::malloc::tune();
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn human(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Enroll {
            state_dir,
            gateway,
            token,
            fingerprint,
            host_root,
            json,
        } => {
            if AgentState::config_path(&state_dir).exists() {
                anyhow::bail!(
                    "{} is already enrolled; use another --state-dir or remove it first",
                    state_dir.display()
                );
            }
            let host_root = std::fs::canonicalize(&host_root)
                .with_context(|| format!("host root {} does not exist", host_root.display()))?;
            let host = FolderHost::new(&host_root);
            let vms = host.list_vms()?;
            let client = GatewayClient::new(&gateway, &fingerprint, None)?;
            let host_name = hostname();
            let r = client
                .enroll(&EnrollRequest {
                    token: token.trim().to_string(),
                    host_name: host_name.clone(),
                })
                .await?;
            let cfg = AgentConfig {
                gateway: gateway.trim_end_matches('/').to_string(),
                fingerprint,
                host_root,
                agent_id: r.agent_id.clone(),
                lack_batch: tierback_agent::state::default_lack_batch(),
                upload_batch_bytes: tierback_agent::state::default_upload_batch(),
                sample_min: 8,
            };
            AgentState::save_new(&state_dir, &cfg, &r.credential)?;
            let client = GatewayClient::new(&cfg.gateway, &cfg.fingerprint, Some(r.credential))?;
            let infos: Vec<_> = vms.iter().filter_map(|v| backup::vm_info(v).ok()).collect();
            let reported = infos.len();
            client.inventory(infos).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "agent_id": r.agent_id, "host_name": host_name, "vms": reported })
                );
            } else {
                println!(
                    "enrolled as {} ({}); {} VM(s) reported",
                    r.agent_id, host_name, reported
                );
            }
        }
        Cmd::Vms { state_dir, json } => {
            let st = AgentState::load(&state_dir)?;
            let vms = FolderHost::new(&st.cfg.host_root).list_vms()?;
            let mut infos = Vec::new();
            for v in &vms {
                infos.push(
                    backup::vm_info_with_health(v, &state_dir)
                        .with_context(|| format!("VM {}", v.descriptor.name))?,
                );
            }
            let client =
                GatewayClient::new(&st.cfg.gateway, &st.cfg.fingerprint, Some(st.credential))?;
            client.inventory(infos.clone()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&infos)?);
            } else {
                for v in infos {
                    println!("{} {} ({}, gen {})", v.id, v.name, v.state, v.generation);
                    for d in v.disks {
                        println!(
                            "    disk {}: {} {} — {}",
                            d.index,
                            d.path,
                            human(d.virtual_size),
                            d.format
                        );
                        if let Some(t) = &d.tracking {
                            println!(
                                "        change tracking: {} ({}){}",
                                t.state,
                                t.method,
                                t.reason
                                    .as_deref()
                                    .map(|r| format!(" — {r}"))
                                    .unwrap_or_default()
                            );
                            for a in &t.alerts {
                                println!("        ALERT: {a}");
                            }
                        }
                    }
                }
            }
        }
        Cmd::Run {
            state_dir,
            concurrency,
            poll_secs,
        } => run_jobs(state_dir, &concurrency, &poll_secs).await?,
        Cmd::ConsistencyCheck {
            state_dir,
            vm,
            json,
        } => tierback_agent::consistency::run_cli(&state_dir, &vm, json).await?,
        Cmd::Export {
            state_dir,
            vm,
            group,
            to,
            json,
        } => export(state_dir, vm, group, to, json).await?,
        Cmd::Backup {
            state_dir,
            vm,
            full,
            json,
        } => {
            let st = AgentState::load(&state_dir)?;
            let host = FolderHost::new(&st.cfg.host_root);
            let hv = host.find_vm(&vm)?;
            let client =
                GatewayClient::new(&st.cfg.gateway, &st.cfg.fingerprint, Some(st.credential))?;
            let opts = BackupOptions {
                full,
                progress: !json,
                lack_batch: st.cfg.lack_batch,
                upload_batch_bytes: st.cfg.upload_batch_bytes,
                state_dir: state_dir.clone(),
                sample_min: st.cfg.sample_min,
            };
            let r = backup::backup_vm(&client, &hv, &opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let mbs = r.bytes_read as f64 / 1e6 / r.seconds.max(1e-9);
                println!("recovery point {} of {}", r.point, r.vm_name);
                println!(
                    "read {} ({mbs:.0} MB/s), skipped {} unallocated, sent {} in {} chunk(s), {} already on the gateway, {} zero chunk(s)",
                    human(r.bytes_read),
                    human(r.bytes_skipped),
                    human(r.bytes_sent),
                    r.sent_chunks,
                    r.dedup_chunks,
                    r.zero_chunks
                );
                println!(
                    "stored {} new; the point covers {} of data; {:.1} s",
                    human(r.stored_bytes),
                    human(r.logical_bytes),
                    r.seconds
                );
                for d in &r.disks {
                    println!(
                        "disk {} ({}): {} [{}], read {}{}",
                        d.index,
                        d.path,
                        d.method,
                        d.state,
                        human(d.bytes_read),
                        d.reason
                            .as_deref()
                            .map(|x| format!(" — {x}"))
                            .unwrap_or_default()
                    );
                }
                for a in &r.alerts {
                    println!("ALERT: {a}");
                }
            }
        }
    }
    Ok(())
}

/// `export`: one seed key for every VM of the run, printed once at the end.
async fn export(
    state_dir: PathBuf,
    mut vms: Vec<String>,
    group: Option<String>,
    to: PathBuf,
    json: bool,
) -> anyhow::Result<()> {
    use tierback_agent::seed::{export_vm, ExportOptions};
    let st = AgentState::load(&state_dir)?;
    let host = FolderHost::new(&st.cfg.host_root);
    let client = GatewayClient::new(&st.cfg.gateway, &st.cfg.fingerprint, Some(st.credential))?;
    if let Some(g) = &group {
        let ids = client.seed_members(g).await?;
        if ids.is_empty() {
            anyhow::bail!("protection group {g:?} has no VM on this host");
        }
        vms.extend(ids);
    }
    let mut found = vms
        .iter()
        .map(|v| host.find_vm(v))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::HashSet::new();
    found.retain(|v| seen.insert(v.descriptor.id.to_ascii_lowercase()));
    std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
    let opts = ExportOptions {
        to,
        state_dir: state_dir.clone(),
        agent_id: st.cfg.agent_id.clone(),
        progress: !json,
        file_target: 1 << 30,
    };
    let key = tierback_format::seed::SeedKey::generate();
    let mut reports = Vec::new();
    for hv in &found {
        let r = export_vm(&client, hv, &opts, &key)
            .await
            .with_context(|| format!("exporting VM {}", hv.descriptor.name))?;
        if !json {
            println!(
                "exported {} to {}: {} chunk(s), {} of data, {} on the media ({} duplicate, {} zero chunk(s)); point {} in {:.1} s",
                r.vm_name,
                r.dir,
                r.chunks,
                human(r.bytes),
                human(r.file_bytes),
                r.duplicate_chunks,
                r.zero_chunks,
                r.point,
                r.seconds
            );
        }
        reports.push(r);
    }
    let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    let chunks: u64 = reports.iter().map(|r| r.chunks).sum();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "seed_key": key.to_string(),
                "bytes": bytes,
                "chunks": chunks,
                "vms": reports,
            }))?
        );
    } else {
        println!();
        println!("SEED KEY (shown once, never stored on the media; keep it apart from the media and give it to `tierback-gateway import --seed-key`):");
        println!("  {key}");
    }
    Ok(())
}

/// `run`: polls the gateway's job queue until SIGINT/SIGTERM.
async fn run_jobs(state_dir: PathBuf, concurrency: &str, poll_secs: &str) -> anyhow::Result<()> {
    let concurrency: usize = concurrency
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=16).contains(n))
        .ok_or_else(|| anyhow::anyhow!("--concurrency {concurrency:?} must be 1–16"))?;
    let poll: u64 = poll_secs
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=3600).contains(n))
        .ok_or_else(|| anyhow::anyhow!("--poll-secs {poll_secs:?} must be 1–3600"))?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
        });
    }
    let opts = tierback_agent::run::RunOptions {
        state_dir,
        concurrency,
        poll: std::time::Duration::from_secs(poll),
    };
    let s = tierback_agent::run::run(opts, shutdown).await?;
    eprintln!(
        "stopped: {} job(s) succeeded, {} failed",
        s.succeeded, s.failed
    );
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "hyperv-host".into())
}
