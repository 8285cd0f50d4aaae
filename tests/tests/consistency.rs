//! Consistency checks: a source disk changed in a way no change tracking
//! reports (raw disk rewritten in place, mtime put back) is found by
//! `tierback-gateway consistency-check` — the agent reads every chunk and
//! the gateway compares with the newest point — and repaired as a new
//! point that restores byte-identical to the source; `--group` checks every
//! member; unknown names are one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use tierback_e2e::run as run_cmd;
use tierback_e2e::*;
use tierback_format::vhdx::testkit::pattern;

const MIB: usize = 1 << 20;
const VM1: &str = "6a1f0b3c-2d4e-4f50-8a61-7b8c9d0e1f21";
const VM2: &str = "6a1f0b3c-2d4e-4f50-8a61-7b8c9d0e1f22";

/// A 16 MiB raw disk: data in chunks 0..10, zeros beyond.
fn raw_disk(path: &Path, seed: u64) {
    let mut img = vec![0u8; 16 * MIB];
    for n in 0..10 {
        img[n * MIB..(n + 1) * MIB].copy_from_slice(&pattern(seed * 100 + n as u64, MIB));
    }
    std::fs::write(path, img).expect("disk");
}

/// `tierback-agent run`, stopped (SIGTERM) when dropped.
struct Run(Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn spawn_run(agent: &Agent) -> Run {
    Run(agent
        .cmd(&["run", "--poll-secs", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn run"))
}

fn setup(t: &Path, vms: &[(&str, &str, u64)]) -> (Gateway, Agent, Vec<PathBuf>) {
    let host = t.join("host");
    let disks_dir = t.join("src");
    std::fs::create_dir_all(&disks_dir).expect("mkdir");
    let gw = Gateway::start(&t.join("gw"));
    let mut folders = Vec::new();
    for (name, id, seed) in vms {
        let d = disks_dir.join(format!("{name}.raw"));
        raw_disk(&d, *seed);
        folders.push(make_vm(&host, name, id, &[(&d, "d0.raw")]));
    }
    let agent = Agent::enroll(&gw, &t.join("agent"), &host);
    for (name, _, _) in vms {
        agent.backup(name);
    }
    (gw, agent, folders)
}

/// `consistency-check --json` (waits): the finished jobs.
fn check(gw: &Gateway, args: &[&str]) -> Vec<Value> {
    let mut verb = vec!["consistency-check", "--json"];
    verb.extend_from_slice(args);
    serde_json::from_str(&ok(&mut gw.cmd(&verb))).expect("check json")
}

#[test]
fn check_finds_untracked_changes_and_repairs_the_replica() {
    let t = tempfile::tempdir().expect("tmp");
    let (gw, agent, folders) = setup(t.path(), &[("cc01", VM1, 1)]);
    let disk = folders[0].join("Virtual Hard Disks/d0.raw");
    let before = gw.points();
    assert_eq!(before.len(), 1);

    // Change chunks 2 and 5, zero chunk 7, write into the empty chunk 12 —
    // in place, mtime restored: nothing any change tracking would report.
    let mtime = std::fs::metadata(&disk)
        .expect("meta")
        .modified()
        .expect("mtime");
    let mut img = std::fs::read(&disk).expect("read");
    img[2 * MIB + 17] ^= 0x5a;
    img[5 * MIB..5 * MIB + 4096].copy_from_slice(&pattern(999, 4096));
    img[7 * MIB..8 * MIB].fill(0);
    img[12 * MIB + 100..12 * MIB + 200].fill(0xab);
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open");
        f.seek(std::io::SeekFrom::Start(0)).expect("seek");
        f.write_all(&img).expect("write");
        f.set_modified(mtime).expect("mtime");
    }

    let run = spawn_run(&agent);
    let jobs = check(&gw, &["--vm", "cc01"]);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let j = &jobs[0];
    assert_eq!(
        (j["kind"].as_str(), j["state"].as_str()),
        (Some("consistency-check"), Some("succeeded")),
        "{j}"
    );
    let msg = j["message"].as_str().expect("message");
    assert!(
        msg.contains("consistency check: 4 chunk(s) differed; disk 0 (Virtual Hard Disks/d0.raw): 16 chunk(s) compared, 4 differing (4194304 bytes)"),
        "{msg}"
    );
    let point = j["point"].as_str().expect("point").to_string();
    let pts = gw.points();
    assert_eq!(pts.len(), 2);
    let p = pts
        .iter()
        .find(|p| p["id"] == point.as_str())
        .expect("new point");
    assert_eq!(p["kind"], "incremental");

    // The new point restores byte-identical to the source as it is now.
    let out = t.path().join("restored.raw");
    gw.restore_disk(&point, 0, "raw", &out);
    assert_eq!(sha256_file(&out), sha256_file(&disk));

    // A second check (through the queue) and a direct one find nothing.
    let again = check(&gw, &["--vm", VM1]);
    let msg = again[0]["message"].as_str().expect("message");
    assert!(
        msg.starts_with("consistency check: 0 chunk(s) differed"),
        "{msg}"
    );
    drop(run);
    let direct: Value = serde_json::from_str(&ok(&mut agent.cmd(&[
        "consistency-check",
        "--json",
        "--vm",
        "cc01",
    ])))
    .expect("json");
    assert_eq!(direct["chunks_differing"], 0, "{direct}");
    assert_eq!(direct["disks"][0]["chunks_compared"], 16, "{direct}");
    assert_eq!(direct["bytes_sent"], 0, "{direct}");
    // The next backup tracks from the check's point: nothing changed.
    let b = agent.backup("cc01");
    assert_eq!(b["base_point"], direct["point"], "{b}");
    assert_eq!(b["sent_chunks"], 0, "{b}");
}

#[test]
fn group_check_runs_for_every_member_and_unknown_names_fail() {
    let t = tempfile::tempdir().expect("tmp");
    let (gw, agent, folders) = setup(t.path(), &[("gc01", VM1, 2), ("gc02", VM2, 3)]);
    let group = |args: &[&str]| {
        let mut c = Command::new(bin("tierback-gateway"));
        c.args(["group", args[0], "--data-dir"])
            .arg(&gw.dir)
            .args(&args[1..]);
        ok(&mut c)
    };
    group(&["create", "g1"]);
    group(&["add", "g1", "--vm", "gc01"]);
    group(&["add", "g1", "--vm", "gc02"]);
    // One changed chunk on the second VM only.
    let disk = folders[1].join("Virtual Hard Disks/d0.raw");
    let mut img = std::fs::read(&disk).expect("read");
    img[3 * MIB] ^= 1;
    std::fs::write(&disk, &img).expect("write");

    // --no-wait: the job ids, one per member.
    let queued: Value = serde_json::from_str(&ok(&mut gw.cmd(&[
        "consistency-check",
        "--json",
        "--no-wait",
        "--group",
        "g1",
    ])))
    .expect("json");
    assert_eq!(queued["jobs"].as_array().map(Vec::len), Some(2), "{queued}");

    let run = spawn_run(&agent);
    // Waiting again picks up the same queued jobs (one check per VM at a time).
    let mut jobs = check(&gw, &["--group", "g1"]);
    drop(run);
    jobs.sort_by_key(|j| j["vm_name"].as_str().map(String::from));
    let got: Vec<(&str, &str)> = jobs
        .iter()
        .map(|j| {
            (
                j["vm_name"].as_str().unwrap_or(""),
                j["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        got,
        [("gc01", "succeeded"), ("gc02", "succeeded")],
        "{jobs:?}"
    );
    let msg = |i: usize| jobs[i]["message"].as_str().unwrap_or("").to_string();
    assert!(
        msg(0).starts_with("consistency check: 0 chunk(s) differed"),
        "{}",
        msg(0)
    );
    assert!(
        msg(1).starts_with("consistency check: 1 chunk(s) differed"),
        "{}",
        msg(1)
    );

    // A VM without a recovery point: the job fails with the reason.
    let lone = tempfile::tempdir().expect("tmp");
    let d = lone.path().join("n.raw");
    raw_disk(&d, 4);
    make_vm(
        folders[0].parent().expect("host"),
        "nopoint",
        "6a1f0b3c-2d4e-4f50-8a61-7b8c9d0e1f23",
        &[(&d, "d0.raw")],
    );
    ok(&mut agent.cmd(&["vms"]));
    let run = spawn_run(&agent);
    let o = run_cmd(&mut gw.cmd(&["consistency-check", "--json", "--vm", "nopoint"]));
    drop(run);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("has no recovery point"), "{out}");

    // Unknown VM or group: one line.
    let e = fails(&mut gw.cmd(&["consistency-check", "--vm", "ghost"]));
    assert!(e.contains("ghost"), "{e}");
    let e = fails(&mut gw.cmd(&["consistency-check", "--group", "nosuch"]));
    assert!(e.contains("nosuch"), "{e}");
    let e = fails(&mut agent.cmd(&["consistency-check", "--vm", "ghost"]));
    assert!(e.contains("ghost"), "{e}");
}
