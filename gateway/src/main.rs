//! `tierback-gateway`: the branch appliance's server and admin commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tierback_format::wire::*;
use tierback_gateway::client::AdminClient;
use tierback_gateway::restore::{self, DiskFormat};

mod cc_cli;
mod gc_cli;
mod group_cli;
mod import_cli;

#[derive(Parser)]
#[command(
    name = "tierback-gateway",
    version,
    about = "Tierback gateway: keeps Hyper-V recovery points on an encrypted, deduplicated local disk tier and restores them.",
    long_about = "Tierback gateway: keeps Hyper-V recovery points on an encrypted, deduplicated local disk tier and restores them.\n\n\
Start with `init --data-dir D`, run `serve --data-dir D`, then enrol agents with a token from `enroll-token`.\n\
Admin commands reach the running gateway: with --data-dir they read its address and admin token from D;\n\
with --url/--token/--fingerprint they reach a gateway on another machine."
)]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. "info" or "tierback_gateway=debug".
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Conn {
    /// The gateway's data dir (address, admin token and certificate are read from it).
    #[arg(long, env = "TIERBACK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// URL of a remote gateway, e.g. https://gw01:8443 (with --token and --fingerprint).
    #[arg(long, requires_all = ["token", "fingerprint"], conflicts_with = "data_dir")]
    url: Option<String>,
    /// Admin API token for --url (or TIERBACK_TOKEN).
    #[arg(long, env = "TIERBACK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// SHA-256 fingerprint of the gateway's certificate for --url.
    #[arg(long)]
    fingerprint: Option<String>,
    /// Machine-readable output on stdout.
    #[arg(long)]
    json: bool,
}

impl Conn {
    fn client(&self) -> anyhow::Result<AdminClient> {
        match (&self.data_dir, &self.url) {
            (Some(d), _) => AdminClient::from_data_dir(d),
            (None, Some(u)) => AdminClient::remote(
                u,
                self.token.as_deref().unwrap_or_default(),
                self.fingerprint.as_deref().unwrap_or_default(),
            ),
            (None, None) => anyhow::bail!(
                "say which gateway: --data-dir D, or --url URL --token T --fingerprint FP"
            ),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Raw,
    Vhdx,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum TierArg {
    Local,
    Cloud,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a gateway data dir: config, catalog, TLS identity, keys. Prints the certificate fingerprint and the recovery key once.
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        /// File holding the passphrase that protects the master key. Without it a random passphrase is generated into D/passphrase (mode 0600).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Address for the HTTPS API.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        #[arg(long)]
        json: bool,
    },
    /// Run the HTTPS API until SIGINT/SIGTERM.
    Serve {
        #[arg(long, env = "TIERBACK_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Issue a one-time agent enrolment token.
    EnrollToken {
        #[command(flatten)]
        conn: Conn,
    },
    /// List protected VMs.
    Vms {
        #[command(flatten)]
        conn: Conn,
    },
    /// List recovery points, newest first.
    Points {
        #[command(flatten)]
        conn: Conn,
        /// Only this VM (name or id).
        #[arg(long)]
        vm: Option<String>,
    },
    /// Restore one disk of a recovery point to a raw image or a VHDX file.
    RestoreDisk {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        point: String,
        /// Disk number, from 0 in vm.json order.
        #[arg(long)]
        disk: u32,
        #[arg(long, value_enum, default_value = "vhdx")]
        format: FormatArg,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "local")]
        from: TierArg,
    },
    /// Restore a whole VM as a new VM folder (config files byte-identical, disks as VHDX).
    RestoreVm {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        point: String,
        #[arg(long)]
        to: PathBuf,
        #[arg(long, value_enum, default_value = "local")]
        from: TierArg,
    },
    /// Re-read stored data and check every tag and hash; exit 1 if anything is damaged.
    Verify {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        point: Option<String>,
        #[arg(long, value_enum, default_value = "local")]
        tier: TierArg,
    },
    /// Running and past jobs.
    Jobs {
        #[command(flatten)]
        conn: Conn,
    },
    /// Protection groups: named sets of VMs sharing one policy (MABS semantics).
    Group {
        #[command(subcommand)]
        cmd: group_cli::GroupCmd,
    },
    /// Disk-space review per protection group: data, stored and projected bytes.
    Space {
        #[command(flatten)]
        conn: Conn,
    },
    /// Apply short-term retention (the group's, or --keep-days): delete expired recovery points, then run GC.
    Prune(gc_cli::PruneArgs),
    /// Garbage-collect the local store: delete packs no recovery point needs, compact sparse ones.
    Gc(gc_cli::GcArgs),
    /// Import an offline seed (from `tierback-agent export`) into the running gateway as the VM's first full.
    Import(import_cli::ImportArgs),
    /// Consistency check: the VM's agent reads every disk in full, compares with the newest point and repairs it; waits and reports what differed.
    ConsistencyCheck(cc_cli::CheckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    // Sets the allocator first: no thread has started yet.
    let rt = match tierback_gateway::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn no_cloud(tier: TierArg) -> anyhow::Result<()> {
    if tier == TierArg::Cloud {
        anyhow::bail!("the cloud tier is not configured on this gateway (run `tierback-gateway cloud set` first)");
    }
    Ok(())
}

async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Init {
            data_dir,
            passphrase_file,
            listen,
            json,
        } => {
            let r = tierback_gateway::setup::init(&data_dir, passphrase_file.as_deref(), &listen)
                .await?;
            if json {
                print_json(&r)?;
            } else {
                println!("Initialised gateway data dir {}", r.data_dir);
                println!("Listen address:        {}", r.listen);
                println!("Certificate SHA-256:   {}", r.fingerprint);
                println!("Admin token file:      {}", r.admin_token_file);
                if r.generated_passphrase {
                    println!(
                        "Passphrase:            generated into {} (mode 0600)",
                        r.passphrase_file
                    );
                } else {
                    println!("Passphrase file:       {}", r.passphrase_file);
                }
                println!();
                println!("RECOVERY KEY (shown once; store it offline — with it the data can be recovered if the passphrase is lost):");
                println!("  {}", r.recovery_key);
                println!();
                println!("Next: tierback-gateway serve --data-dir {}", r.data_dir);
            }
        }
        Cmd::Serve { data_dir } => tierback_gateway::server::serve(&data_dir).await?,
        Cmd::EnrollToken { conn } => {
            let r: EnrollTokenResponse = conn
                .client()?
                .post_json("/v1/admin/enroll-tokens", &serde_json::json!({}))
                .await?;
            if conn.json {
                print_json(&r)?;
            } else {
                println!("{}", r.token);
                eprintln!("(one-time token, valid until {})", r.expires);
            }
        }
        Cmd::Vms { conn } => {
            let vms: Vec<VmSummary> = conn.client()?.get_json("/v1/admin/vms").await?;
            if conn.json {
                print_json(&vms)?;
            } else if vms.is_empty() {
                println!("no VMs yet: enrol an agent and run a backup");
            } else {
                println!(
                    "{:<38} {:<20} {:<16} {:<8} {:>6}  last point",
                    "ID", "NAME", "HOST", "STATE", "POINTS"
                );
                for v in vms {
                    println!(
                        "{:<38} {:<20} {:<16} {:<8} {:>6}  {}",
                        v.id,
                        v.name,
                        v.host_name,
                        v.state,
                        v.points,
                        v.last_point.unwrap_or_else(|| "-".into())
                    );
                    for d in v.disks {
                        println!(
                            "    disk {}: {} ({}, {})",
                            d.index,
                            d.path,
                            human_bytes(d.virtual_size),
                            d.format
                        );
                    }
                }
            }
        }
        Cmd::Points { conn, vm } => {
            let path = match &vm {
                Some(v) => format!("/v1/admin/points?vm={}", urlencode(v)),
                None => "/v1/admin/points".into(),
            };
            let pts: Vec<PointSummary> = conn.client()?.get_json(&path).await?;
            if conn.json {
                print_json(&pts)?;
            } else if pts.is_empty() {
                println!("no recovery points");
            } else {
                println!(
                    "{:<32} {:<16} {:<20} {:<11} {:<6} {:>10} {:>10}",
                    "ID", "VM", "TIME", "KIND", "TIERS", "LOGICAL", "STORED"
                );
                for p in pts {
                    println!(
                        "{:<32} {:<16} {:<20} {:<11} {:<6} {:>10} {:>10}",
                        p.id,
                        p.vm_name,
                        p.time,
                        p.kind,
                        p.tiers.join(","),
                        human_bytes(p.logical_bytes),
                        human_bytes(p.stored_bytes)
                    );
                }
            }
        }
        Cmd::RestoreDisk {
            conn,
            point,
            disk,
            format,
            out,
            from,
        } => {
            no_cloud(from)?;
            let fmt = match format {
                FormatArg::Raw => DiskFormat::Raw,
                FormatArg::Vhdx => DiskFormat::Vhdx,
            };
            check_out_file(&out)?;
            let st = restore::restore_disk(&conn.client()?, &point, disk, fmt, &out, true).await?;
            report_restore(&conn, &st, &out)?;
        }
        Cmd::RestoreVm {
            conn,
            point,
            to,
            from,
        } => {
            no_cloud(from)?;
            let st = restore::restore_vm(&conn.client()?, &point, &to, true).await?;
            report_restore(&conn, &st, &to)?;
        }
        Cmd::Verify { conn, point, tier } => {
            no_cloud(tier)?;
            let r: VerifyResponse = conn
                .client()?
                .post_json("/v1/admin/verify", &VerifyRequest { point })
                .await?;
            let bad = !r.damaged.is_empty() || !r.damaged_indexes.is_empty();
            if conn.json {
                print_json(&r)?;
            } else {
                println!(
                    "checked {} point(s), {} chunk(s), {}",
                    r.points_checked,
                    r.chunks_checked,
                    human_bytes(r.bytes_checked)
                );
                for d in &r.damaged {
                    println!(
                        "DAMAGED chunk {} in pack {} at offset {}: {}; affects point(s) {}",
                        d.chunk,
                        d.pack,
                        d.offset,
                        d.reason,
                        d.points.join(", ")
                    );
                }
                for (p, s, why) in &r.damaged_indexes {
                    println!("DAMAGED index of point {p} stream {s}: {why}");
                }
                if !bad {
                    println!("OK: no damage found");
                }
            }
            if bad {
                eprintln!(
                    "error: verify found {} damaged chunk(s) and {} damaged index(es)",
                    r.damaged.len(),
                    r.damaged_indexes.len()
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Group { cmd } => return group_cli::run_group(cmd).await,
        Cmd::Space { conn } => return group_cli::run_space(conn).await,
        Cmd::Prune(args) => return gc_cli::run_prune(args).await,
        Cmd::Gc(args) => return gc_cli::run_gc(args).await,
        Cmd::Import(args) => return import_cli::run_import(args).await,
        Cmd::ConsistencyCheck(args) => return cc_cli::run_check(args).await,
        Cmd::Jobs { conn } => {
            let jobs: Vec<JobSummary> = conn.client()?.get_json("/v1/admin/jobs").await?;
            if conn.json {
                print_json(&jobs)?;
            } else {
                println!(
                    "{:<22} {:<8} {:<16} {:<10} {:<20} message",
                    "ID", "KIND", "VM", "STATE", "STARTED"
                );
                for j in jobs {
                    println!(
                        "{:<22} {:<8} {:<16} {:<10} {:<20} {}",
                        j.id,
                        j.kind,
                        j.vm_name.unwrap_or_default(),
                        j.state,
                        j.started,
                        j.message.unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check_out_file(out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        anyhow::bail!(
            "{} already exists; choose another --out (restores never overwrite)",
            out.display()
        );
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        anyhow::bail!("the folder {} does not exist", parent.display());
    }
    Ok(())
}

fn report_restore(conn: &Conn, st: &restore::RestoreStats, out: &Path) -> anyhow::Result<()> {
    if conn.json {
        print_json(&serde_json::json!({
            "out": out.display().to_string(),
            "bytes": st.bytes,
            "data_bytes": st.data_bytes,
            "chunks": st.chunks,
            "seconds": st.seconds,
        }))
        .context("printing")?;
    } else {
        let mbs = st.data_bytes as f64 / 1e6 / st.seconds.max(1e-9);
        println!(
            "restored {} ({} of data) to {} in {:.1} s ({mbs:.0} MB/s)",
            human_bytes(st.bytes),
            human_bytes(st.data_bytes),
            out.display(),
            st.seconds
        );
    }
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
