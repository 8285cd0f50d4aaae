//! Acceptance: kill -9 of the gateway or of the agent in the middle of a
//! backup, then a new backup: no recovery point of the killed run is
//! visible, the new one restores byte-identical, verify is clean.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tierback_e2e::*;

/// A VM with a 512 MiB disk holding 320 MiB of incompressible data, so a
/// backup lasts long enough to be killed in the middle.
fn big_vm(dir: &Path, host: &Path) -> std::path::PathBuf {
    let raw = dir.join("big.raw");
    let mut data = vec![0u8; 512 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for (i, w) in data.chunks_exact_mut(8).enumerate() {
        // Leave a few zero regions so the disk is not uniform.
        if (i / 65536) % 8 == 7 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&raw, &data).expect("raw");
    let vhdx = dir.join("big.vhdx");
    ok(Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic",
        ])
        .arg(&raw)
        .arg(&vhdx));
    make_vm(
        host,
        "big",
        "b16b16b1-0000-0000-0000-000000000001",
        &[(&vhdx, "big.vhdx")],
    );
    raw
}

fn wait_for_running_job(gw: &Gateway) {
    let start = Instant::now();
    loop {
        let out = ok(&mut gw.cmd(&["jobs", "--json"]));
        let jobs: Vec<serde_json::Value> = serde_json::from_str(&out).expect("jobs");
        if jobs.iter().any(|j| j["state"] == "running") {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "backup never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_backup(agent: &Agent) -> std::process::Child {
    agent
        .cmd(&["backup", "--json", "--vm", "big"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn backup")
}

fn check_new_backup_restores(gw: &Gateway, agent: &Agent, raw: &Path, t: &Path, tag: &str) {
    let rep = agent.backup("big");
    let point = rep["point"].as_str().expect("point");
    let pts = gw.points();
    assert_eq!(
        pts.len(),
        1,
        "{tag}: only the new point is visible: {pts:?}"
    );
    assert_eq!(pts[0]["id"], point);
    let out = t.join(format!("{tag}.raw"));
    gw.restore_disk(point, 0, "raw", &out);
    assert!(
        qemu_compare(raw, "raw", &out, "raw"),
        "{tag}: restore differs"
    );
    ok(&mut gw.cmd(&["verify"]));
}

#[test]
fn gateway_killed_mid_backup_leaves_no_point_and_recovers() {
    let t = tempfile::tempdir().expect("tmp");
    let host = t.path().join("host");
    let raw = big_vm(t.path(), &host);
    let mut gw = Gateway::start(&t.path().join("gw"));
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    let mut backup = spawn_backup(&agent);
    wait_for_running_job(&gw);
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        backup.try_wait().expect("wait").is_none(),
        "backup finished before the kill; make the disk larger"
    );
    gw.kill9();
    let st = backup.wait().expect("agent");
    assert!(!st.success(), "the agent must report the lost gateway");
    gw.serve();
    assert!(
        gw.points().is_empty(),
        "a point of the killed run is visible"
    );
    let jobs: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&mut gw.cmd(&["jobs", "--json"]))).expect("jobs");
    assert_eq!(jobs[0]["state"], "abandoned", "{jobs:?}");
    check_new_backup_restores(&gw, &agent, &raw, t.path(), "after-gateway-kill");
}

#[test]
fn agent_killed_mid_backup_leaves_no_point_and_next_backup_resumes() {
    let t = tempfile::tempdir().expect("tmp");
    let host = t.path().join("host");
    let raw = big_vm(t.path(), &host);
    let gw = Gateway::start(&t.path().join("gw"));
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    let mut backup = spawn_backup(&agent);
    wait_for_running_job(&gw);
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        backup.try_wait().expect("wait").is_none(),
        "backup finished before the kill; make the disk larger"
    );
    let _ = backup.kill();
    let _ = backup.wait();
    assert!(
        gw.points().is_empty(),
        "a point of the killed run is visible"
    );
    check_new_backup_restores(&gw, &agent, &raw, t.path(), "after-agent-kill");
}
