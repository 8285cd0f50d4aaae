//! Acceptance (issue 3): protection groups. A group is created with a policy,
//! VMs join it by name and by id, `group list/show --json` have a stable
//! shape, a VM cannot join a second group, bad policy values are refused with
//! one line, a member's backups use the group's chunk size (a VM outside any
//! group keeps the gateway's default), and `space --json` agrees with
//! `points --json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tierback_e2e::*;
use tierback_format::vhdx::testkit;
use tierback_format::vhdx::VhdxOptions;

const DISK: usize = 8 << 20;
const WEB: &str = "9a7e0000-0000-4000-8000-00000000aa01";
const SQL: &str = "9a7e0000-0000-4000-8000-00000000aa02";
const FILE: &str = "9a7e0000-0000-4000-8000-00000000aa03";

/// `tierback-gateway group VERB --data-dir D ARGS…`.
fn group(gw: &Gateway, verb: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin("tierback-gateway"));
    c.args(["group", verb, "--data-dir"])
        .arg(&gw.dir)
        .args(args);
    c
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// A VM with one 8 MiB VHDX full of non-zero data (seeded).
fn vm_with_disk(t: &Path, host: &Path, name: &str, id: &str, seed: u64) -> PathBuf {
    let src = t.join(format!("{name}-src.vhdx"));
    write_disk(&src, seed);
    make_vm(host, name, id, &[(&src, "disk0.vhdx")])
}

fn write_disk(path: &Path, seed: u64) {
    let raw = testkit::pattern(seed, DISK);
    let mut opts = VhdxOptions::new(DISK as u64);
    opts.block_size = 1 << 20;
    let (bytes, _) = testkit::vhdx_bytes_from_raw(&raw, opts).expect("vhdx");
    // Replace rather than write in place: make_vm may have hard-linked it.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write disk");
    std::fs::rename(&tmp, path).expect("rename disk");
}

/// Chunks a full backup of the VM offers at `chunk_size`: every stream is
/// non-zero data cut into `chunk_size` slices.
fn expected_chunks(vm: &Path, chunk_size: u64) -> u64 {
    let mut sizes = vec![DISK as u64];
    sizes.push(
        std::fs::metadata(vm.join("vm.json"))
            .expect("vm.json")
            .len(),
    );
    for e in std::fs::read_dir(vm.join("Virtual Machines")).expect("dir") {
        sizes.push(e.expect("entry").metadata().expect("meta").len());
    }
    sizes.iter().map(|s| s.div_ceil(chunk_size)).sum()
}

#[test]
fn groups_policy_membership_chunk_size_and_space() {
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    let web = vm_with_disk(t.path(), &host, "web01", WEB, 1);
    vm_with_disk(t.path(), &host, "sql01", SQL, 2);
    let file = vm_with_disk(t.path(), &host, "file01", FILE, 3);
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    // The gateway learns the host's VMs.
    ok(&mut agent.cmd(&["vms"]));

    // Create: the policy comes back as given, plus the next windows.
    let prod = json(&ok(&mut group(
        &gw,
        "create",
        &[
            "prod",
            "--json",
            "--sync-frequency",
            "30m",
            "--points-at",
            "20:00,08:00",
            "--retention-days",
            "14",
            "--chunk-size",
            "4MiB",
            "--consistency-check",
            "scheduled",
            "--consistency-check-at",
            "02:00",
        ],
    )));
    assert_eq!(prod["name"], "prod");
    assert_eq!(prod["sync_frequency"], "30m");
    assert_eq!(prod["points_at"], serde_json::json!(["08:00", "20:00"]));
    assert_eq!(prod["short_term_days"], 14);
    assert_eq!(prod["chunk_size"], 4 << 20);
    assert_eq!(prod["consistency_check"], "scheduled");
    assert_eq!(prod["consistency_check_at"], "02:00");
    assert_eq!(prod["members"], serde_json::json!([]));
    for k in [
        "created",
        "next_sync",
        "next_recovery_point",
        "next_consistency_check",
    ] {
        assert!(
            prod[k].as_str().is_some_and(|s| s.ends_with('Z')),
            "{k}: {prod}"
        );
    }
    let dev = json(&ok(&mut group(
        &gw,
        "create",
        &["dev", "--json", "--sync-frequency", "express-full"],
    )));
    assert_eq!(dev["sync_frequency"], "express-full");
    assert_eq!(dev["next_sync"], dev["next_recovery_point"]);
    assert_eq!(dev["consistency_check_at"], Value::Null);

    // Add by name and by id; adding again to the same group is a no-op.
    ok(&mut group(&gw, "add", &["prod", "--vm", "web01"]));
    ok(&mut group(&gw, "add", &["prod", "--vm", SQL]));
    let shown = json(&ok(&mut group(
        &gw,
        "add",
        &["prod", "--vm", "web01", "--json"],
    )));
    let members: Vec<(&str, &str)> = shown["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            assert!(m["agent_id"].is_string() && m["added"].is_string(), "{m}");
            (
                m["vm_name"].as_str().expect("name"),
                m["vm_id"].as_str().expect("id"),
            )
        })
        .collect();
    assert_eq!(members, [("sql01", SQL), ("web01", WEB)]);

    // A VM is in at most one group.
    let err = fails(&mut group(&gw, "add", &["dev", "--vm", "web01"]));
    assert!(
        err.contains("already in protection group \"prod\""),
        "{err}"
    );
    let err = fails(&mut group(&gw, "add", &["dev", "--vm", WEB]));
    assert!(err.contains("at most one group"), "{err}");

    // Bad values: one line each, nothing created.
    let bad: &[(&[&str], &str)] = &[
        (&["x", "--retention-days", "0"], "between 1 and 448"),
        (&["x", "--retention-days", "449"], "between 1 and 448"),
        (&["x", "--retention-days", "five"], "number of days"),
        (&["x", "--chunk-size", "3MiB"], "power of two"),
        (&["x", "--chunk-size", "16MiB"], "power of two"),
        (&["x", "--chunk-size", "128KiB"], "power of two"),
        (&["x", "--sync-frequency", "10m"], "multiple of 15 min"),
        (&["x", "--sync-frequency", "25h"], "multiple of 15 min"),
        (&["x", "--sync-frequency", "often"], "not like 15m"),
        (&["x", "--points-at", "25:00"], "HH:MM"),
        (&["x", "--points-at", ","], "at least one"),
        (&["x", "--points-at", "08:00,08:00"], "given twice"),
        (
            &["x", "--consistency-check", "scheduled"],
            "--consistency-check-at",
        ),
        (
            &["x", "--consistency-check", "weekly"],
            "only-when-inconsistent, scheduled or manual",
        ),
        (
            &["x", "--consistency-check-at", "02:00"],
            "only goes with --consistency-check scheduled",
        ),
        (&["bad name"], "group name"),
        (&["prod"], "already exists"),
    ];
    for (args, want) in bad {
        let err = fails(&mut group(&gw, "create", args));
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let err = fails(&mut group(&gw, "add", &["nosuch", "--vm", "web01"]));
    assert!(err.contains("no protection group"), "{err}");
    let err = fails(&mut group(&gw, "add", &["dev", "--vm", "ghost"]));
    assert!(err.contains("no VM named or with id"), "{err}");
    let err = fails(&mut group(&gw, "show", &["nosuch"]));
    assert!(err.contains("no protection group"), "{err}");

    let list = json(&ok(&mut group(&gw, "list", &["--json"])));
    let names: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|g| g["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        ["dev", "prod"],
        "bad creates must leave nothing behind"
    );
    assert_eq!(list[1]["members"].as_array().map(Vec::len), Some(2));
    // `list` rows and `show` have one shape (the next windows may move on).
    let stable = |mut v: Value| {
        for k in ["next_sync", "next_recovery_point", "next_consistency_check"] {
            v.as_object_mut().expect("object").remove(k);
        }
        v
    };
    let shown = json(&ok(&mut group(&gw, "show", &["prod", "--json"])));
    assert_eq!(stable(list[1].clone()), stable(shown));

    // A member's backup is cut at the group's 4 MiB; a VM outside any group
    // keeps the gateway's 1 MiB default.
    let r = agent.backup("web01");
    assert_eq!(
        r["chunks"].as_u64(),
        Some(expected_chunks(&web, 4 << 20)),
        "web01 (prod, 4 MiB): {r}"
    );
    let r = agent.backup("file01");
    assert_eq!(
        r["chunks"].as_u64(),
        Some(expected_chunks(&file, 1 << 20)),
        "file01 (no group, 1 MiB): {r}"
    );
    // The group's chunk size restores byte-identical.
    let point = r["point"].as_str().expect("point").to_string();
    let web_point = agent.backup("web01")["point"]
        .as_str()
        .expect("p")
        .to_string();
    let out = t.path().join("web01.raw");
    gw.restore_disk(&web_point, 0, "raw", &out);
    assert!(
        std::fs::read(&out).expect("read") == testkit::pattern(1, DISK),
        "web01 restore differs"
    );
    assert_ne!(point, web_point);

    // A change, then another backup: the change rate is what it stored.
    write_disk(&web.join("Virtual Hard Disks/disk0.vhdx"), 11);
    agent.backup("web01");
    agent.backup("sql01");

    // space --json agrees with points --json.
    let space = json(&ok(&mut gw.cmd(&["space", "--json"])));
    let g = space["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["name"] == "prod")
        .expect("prod in space")
        .clone();
    let points = gw.points();
    let prod_points: Vec<&Value> = points
        .iter()
        .filter(|p| p["vm_id"] == WEB || p["vm_id"] == SQL)
        .collect();
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"));
    assert_eq!(n(&g, "points"), prod_points.len() as u64);
    assert_eq!(
        n(&g, "stored_bytes"),
        prod_points
            .iter()
            .map(|p| n(p, "stored_bytes"))
            .sum::<u64>()
    );
    // Newest first in `points`: the first row of each VM is its newest.
    let newest = |id: &str| {
        prod_points
            .iter()
            .find(|p| p["vm_id"] == id)
            .map(|p| n(p, "logical_bytes"))
            .expect("a point")
    };
    assert_eq!(n(&g, "data_bytes"), newest(WEB) + newest(SQL));
    // All points are minutes old: the rate is each VM's stored bytes after
    // its first point, over one day.
    let rate = |id: &str| -> u64 {
        let mine: Vec<u64> = prod_points
            .iter()
            .filter(|p| p["vm_id"] == id)
            .map(|p| n(p, "stored_bytes"))
            .collect();
        mine[..mine.len() - 1].iter().sum()
    };
    let daily = rate(WEB) + rate(SQL);
    assert!(daily > 0, "the changed disk must show a change rate: {g}");
    assert_eq!(n(&g, "daily_change_bytes"), daily);
    assert_eq!(n(&g, "short_term_days"), 14);
    assert_eq!(n(&g, "projected_bytes"), n(&g, "data_bytes") + daily * 14);
    let mut members: Vec<&str> = g["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    members.sort();
    assert_eq!(members, ["sql01", "web01"]);
    let human = ok(&mut gw.cmd(&["space"]));
    assert!(
        human.contains("prod") && human.contains("PROJECTED"),
        "{human}"
    );

    // Remove and delete: memberships go, points stay.
    ok(&mut group(&gw, "remove", &["prod", "--vm", "sql01"]));
    ok(&mut group(&gw, "add", &["dev", "--vm", "sql01"]));
    ok(&mut group(&gw, "delete", &["prod"]));
    ok(&mut group(&gw, "add", &["dev", "--vm", "web01"]));
    assert_eq!(gw.points().len(), points.len());

    // A VM backed up at 1 MiB joins a 512 KiB group: its next backup cannot
    // be a delta of the 1 MiB point, reads in full and is cut at 512 KiB.
    ok(&mut group(
        &gw,
        "create",
        &["small", "--chunk-size", "512KiB"],
    ));
    ok(&mut group(&gw, "add", &["small", "--vm", "file01"]));
    let r = agent.backup("file01");
    assert_eq!(
        r["chunks"].as_u64(),
        Some(expected_chunks(&file, 512 << 10)),
        "file01 (small, 512 KiB): {r}"
    );
    let out = t.path().join("file01.raw");
    gw.restore_disk(r["point"].as_str().expect("point"), 0, "raw", &out);
    assert!(
        std::fs::read(&out).expect("read") == testkit::pattern(3, DISK),
        "file01 restore differs"
    );
    let human = ok(&mut group(&gw, "list", &[]));
    assert!(human.contains("dev") && !human.contains("prod"), "{human}");
}

/// Seconds since the epoch.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn jobs(gw: &Gateway) -> Vec<Value> {
    serde_json::from_str(&ok(&mut gw.cmd(&["jobs", "--json"]))).expect("jobs json")
}

/// Polls `f` every 250 ms until it returns `Some` or `secs` pass.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed().as_secs() < secs,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

#[test]
fn the_gateway_schedules_a_backup_that_survives_a_restart_and_agent_run_takes_it() {
    // A one-second scheduler pass instead of 30 s (inherited by `serve`).
    std::env::set_var("TIERBACK_SCHEDULER_TICK_SECS", "1");
    let t = tempfile::tempdir().expect("tmp");
    let mut gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    vm_with_disk(t.path(), &host, "web01", WEB, 7);
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    ok(&mut agent.cmd(&["vms"]));

    // A recovery point at the next whole minute (UTC) that is ≥ 5 s away.
    let at = (now() + 5).div_ceil(60) * 60;
    let hhmm = format!("{:02}:{:02}", at % 86_400 / 3600, at % 3600 / 60);
    ok(&mut group(
        &gw,
        "create",
        &[
            "nightly",
            "--sync-frequency",
            "express-full",
            "--points-at",
            &hhmm,
        ],
    ));
    ok(&mut group(&gw, "add", &["nightly", "--vm", "web01"]));

    // The window passes: one express-full job is queued for web01.
    let queued = wait_for(90, "a queued job", || {
        jobs(&gw)
            .into_iter()
            .find(|j| j["state"] == "queued" && j["vm_id"] == WEB)
    });
    assert!(
        queued["message"]
            .as_str()
            .is_some_and(|m| m.contains("express full")),
        "{queued}"
    );
    let id = queued["id"].as_str().expect("id").to_string();

    // It survives a restart of the gateway.
    gw.stop();
    gw.serve();
    let after = jobs(&gw);
    let same: Vec<&Value> = after.iter().filter(|j| j["id"] == id.as_str()).collect();
    assert_eq!(same.len(), 1, "{after:?}");
    assert_eq!(same[0]["state"], "queued");
    assert_eq!(
        after.len(),
        1,
        "no second job for the same window: {after:?}"
    );

    // `tierback-agent run` takes it, backs up, and stops cleanly on SIGTERM.
    let run = agent
        .cmd(&["run", "--poll-secs", "1", "--concurrency", "2"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn run");
    let done = wait_for(120, "the job to finish", || {
        jobs(&gw).into_iter().find(|j| {
            j["id"] == id.as_str()
                && j["state"] != "queued"
                && j["state"] != "dispatched"
                && j["state"] != "running"
        })
    });
    ok(Command::new("kill").args(["-TERM", &run.id().to_string()]));
    let out = run.wait_with_output().expect("wait run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "run exited with {}: {err}",
        out.status
    );
    assert!(err.contains("1 job(s) succeeded"), "{err}");
    assert_eq!(done["state"], "succeeded", "{done}");
    let point = done["point"].as_str().expect("point").to_string();
    let pts = gw.points();
    assert_eq!(pts.len(), 1);
    assert_eq!(pts[0]["id"], point.as_str());
    assert_eq!(pts[0]["kind"], "full");
    // One job row followed the run from queued to succeeded.
    assert_eq!(jobs(&gw).len(), 1);
}
