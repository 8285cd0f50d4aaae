//! Acceptance (issue 3, item 6): the gateway restarted while a job runs.
//! A job handed to `tierback-agent run` is interrupted by kill -9 of the
//! gateway: after the restart the job is reported (abandoned, not silently
//! dropped), nothing committed before is lost, the agent keeps polling, and
//! the same job kind queued again completes. (A job that is only *scheduled*
//! surviving a restart is covered in groups.rs.)

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tierback_e2e::*;

/// A 384 MiB raw disk of incompressible data from `seed`.
fn big_raw(path: &Path, seed: u64) {
    let mut data = vec![0u8; 384 << 20];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ seed;
    for w in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, &data).expect("raw");
}

struct Run(Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn job(gw: &Gateway, id: &str) -> Value {
    let jobs: Vec<Value> =
        serde_json::from_str(&ok(&mut gw.cmd(&["jobs", "--json"]))).expect("jobs");
    jobs.into_iter()
        .find(|j| j["id"] == id)
        .unwrap_or(Value::Null)
}

fn enqueue_check(gw: &Gateway) -> String {
    let out = ok(&mut gw.cmd(&["consistency-check", "--vm", "big", "--no-wait", "--json"]));
    let v: Value = serde_json::from_str(&out).expect("json");
    v["jobs"][0]["job"].as_str().expect("job id").to_string()
}

#[test]
fn a_job_interrupted_by_a_gateway_restart_is_reported_and_nothing_is_lost() {
    let t = tempfile::tempdir().expect("tmp");
    let raw = t.path().join("big.raw");
    big_raw(&raw, 1);
    let original = t.path().join("original.raw");
    std::fs::copy(&raw, &original).expect("copy");
    let host = t.path().join("host");
    make_vm(
        &host,
        "big",
        "7e570000-0000-0000-0000-000000000001",
        &[(&raw, "big.raw")],
    );
    let mut gw = Gateway::start(&t.path().join("gw"));
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    let first = agent.backup("big")["point"]
        .as_str()
        .expect("point")
        .to_string();

    // Every chunk of the source now differs from the point, behind the
    // change tracking's back: the check has to send it all, which takes
    // long enough to be interrupted.
    big_raw(&raw, 2);
    let src = host.join("big/Virtual Hard Disks/big.raw");
    assert_eq!(
        sha256_file(&src),
        sha256_file(&raw),
        "the VM's disk is the rewritten file"
    );
    assert_ne!(
        sha256_file(&src),
        sha256_file(&original),
        "the rewrite changed the disk"
    );
    let _run = Run(agent
        .cmd(&["run", "--poll-secs", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn run"));
    let id = enqueue_check(&gw);
    let start = Instant::now();
    while job(&gw, &id)["state"] != "running" {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the job never started: {}",
            job(&gw, &id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        job(&gw, &id)["state"],
        "running",
        "the job finished before the kill; make the disk larger: {}",
        job(&gw, &id)
    );
    gw.kill9();
    gw.serve();

    let j = job(&gw, &id);
    assert_eq!(
        j["state"], "abandoned",
        "the interrupted job must be reported: {j}"
    );
    assert!(
        j["message"]
            .as_str()
            .is_some_and(|m| m.contains("gateway stopped")),
        "{j}"
    );
    let pts = gw.points();
    assert_eq!(pts.len(), 1, "nothing half-made is visible: {pts:?}");
    assert_eq!(pts[0]["id"], first.as_str());
    let out = t.path().join("after-restart.raw");
    gw.restore_disk(&first, 0, "raw", &out);
    assert!(
        qemu_compare(&original, "raw", &out, "raw"),
        "the committed point was damaged"
    );
    std::fs::remove_file(&out).expect("rm");

    // The same agent (still running, it kept polling) completes a new check.
    let again = enqueue_check(&gw);
    let start = Instant::now();
    loop {
        let j = job(&gw, &again);
        if j["state"] == "succeeded" {
            break;
        }
        assert!(
            j["state"] != "failed" && j["state"] != "abandoned",
            "second check failed: {j}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "second check never finished: {j}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pts = gw.points();
    assert_eq!(pts.len(), 2, "the repaired point: {pts:?}");
    let repaired = pts[0]["id"].as_str().expect("id").to_string();
    gw.restore_disk(&repaired, 0, "raw", &out);
    assert!(
        qemu_compare(&raw, "raw", &out, "raw"),
        "the repaired point differs from the source"
    );
    ok(&mut gw.cmd(&["verify"]));
}
