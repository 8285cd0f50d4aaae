//! Acceptance (issue 3, item 5): short-term retention and local GC.
//!
//! Points spread over five simulated days (made now, then their
//! `created_at` moved back in the catalog with the sqlite3 tool): a prune
//! with two days of retention deletes the points of days 1–3, the packs on
//! disk shrink, `verify` is clean and the points of days 4–5 restore
//! byte-identical. A backup running while prune and GC run restores
//! byte-identical afterwards.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tierback_e2e::*;

const MIB: usize = 1 << 20;
const MIB64: u64 = 1 << 20;
const DAY: i64 = 86_400;

/// Deterministic incompressible bytes (xorshift64*), distinct per seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn disk_path(vm: &Path) -> PathBuf {
    vm.join("Virtual Hard Disks").join("disk.img")
}

/// A VM with one raw disk holding `content`.
fn raw_vm(t: &Path, host: &Path, name: &str, id: &str, content: &[u8]) -> PathBuf {
    let src = t.join(format!("{name}-initial.img"));
    std::fs::write(&src, content).expect("write disk");
    make_vm(host, name, id, &[(&src, "disk.img")])
}

/// Writes the disk in place (the VM folder's file may be a hard link).
fn set_disk(vm: &Path, content: &[u8]) {
    let p = disk_path(vm);
    let _ = std::fs::remove_file(&p);
    std::fs::write(&p, content).expect("write disk");
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// Bytes of the pack files under the data dir, as `du` counts them.
fn du_packs(gw: &Gateway) -> u64 {
    let out = ok(Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(gw.dir.join("packs")));
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("du output: {out}"))
}

/// Moves a point's creation time `secs` into the past (test-only: the
/// catalog is edited with the sqlite3 tool while the gateway runs).
fn age_point(gw: &Gateway, point: &str, secs: i64) {
    assert!(point.chars().all(|c| c.is_ascii_hexdigit()));
    ok(Command::new("sqlite3")
        .args(["-cmd", ".timeout 20000"])
        .arg(gw.dir.join("catalog.db"))
        .arg(format!(
            "UPDATE points SET created_at = created_at - {secs} WHERE id = '{point}';"
        )));
}

fn point_ids(gw: &Gateway, vm: &str) -> Vec<String> {
    let mut ids: Vec<String> = gw
        .points()
        .iter()
        .filter(|p| p["vm_name"] == vm)
        .map(|p| p["id"].as_str().expect("id").to_string())
        .collect();
    ids.sort();
    ids
}

fn assert_verify_clean(gw: &Gateway) -> serde_json::Value {
    let v = json(&ok(&mut gw.cmd(&["verify", "--json"])));
    assert_eq!(v["damaged"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(
        v["damaged_indexes"].as_array().map(Vec::len),
        Some(0),
        "{v}"
    );
    v
}

fn assert_restores(gw: &Gateway, t: &Path, point: &str, expected: &[u8]) {
    let out = t.join(format!("restored-{point}.raw"));
    gw.restore_disk(point, 0, "raw", &out);
    let got = std::fs::read(&out).expect("read restore");
    assert!(
        got == expected,
        "point {point}: restored disk differs from the source"
    );
    std::fs::remove_file(&out).expect("rm restore");
}

#[test]
fn prune_keeps_two_days_deletes_older_points_and_shrinks_the_store() {
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    // 32 MiB disk: 8 MiB that never change, 24 MiB rewritten every day.
    let day_disk = |day: u64| {
        let mut d = noise(1, 8 * MIB);
        d.extend(noise(100 + day, 24 * MIB));
        d
    };
    let vm = raw_vm(
        t.path(),
        &host,
        "vm-r",
        "cccccccc-0000-0000-0000-000000000003",
        &day_disk(1),
    );
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);

    // Day k's point is made now and then aged (5 - k) days and 12 hours.
    let mut points = Vec::new();
    for day in 1..=5u64 {
        set_disk(&vm, &day_disk(day));
        let p = agent.backup("vm-r")["point"]
            .as_str()
            .expect("point")
            .to_string();
        points.push(p);
    }
    for (i, p) in points.iter().enumerate() {
        age_point(&gw, p, (4 - i as i64) * DAY + DAY / 2);
    }
    let before = du_packs(&gw);
    assert!(before > 5 * 24 * MIB64, "five days stored: {before} B");

    // Dry run: names days 1–3, changes nothing. --now moves the clock.
    let dry = json(&ok(&mut gw.cmd(&[
        "prune",
        "--keep-days",
        "2",
        "--dry-run",
        "--json",
    ])));
    let mut would: Vec<String> = dry["points_deleted"]
        .as_array()
        .expect("list")
        .iter()
        .map(|p| p["id"].as_str().expect("id").to_string())
        .collect();
    would.sort();
    let mut old = points[..3].to_vec();
    old.sort();
    assert_eq!(would, old, "{dry}");
    assert_eq!(point_ids(&gw, "vm-r").len(), 5);
    let tomorrow = json(&ok(&mut gw.cmd(&[
        "prune",
        "--keep-days",
        "2",
        "--dry-run",
        "--json",
        "--now",
        &rfc3339_in(DAY),
    ])));
    assert_eq!(
        tomorrow["points_deleted"].as_array().map(Vec::len),
        Some(4),
        "a day later day 4 expires too: {tomorrow}"
    );
    // A VM in no group, without --keep-days, is left alone.
    let alone = json(&ok(&mut gw.cmd(&["prune", "--vm", "vm-r", "--json"])));
    assert_eq!(alone["points_deleted"].as_array().map(Vec::len), Some(0));
    assert_eq!(alone["vms_without_retention"], serde_json::json!(["vm-r"]));

    // In a protection group with two days of short-term retention, prune
    // applies the group's range.
    for verb in [
        &["group", "create", "g-two-days", "--retention-days", "2"][..],
        &["group", "add", "g-two-days", "--vm", "vm-r"][..],
    ] {
        ok(Command::new(bin("tierback-gateway"))
            .args(verb)
            .arg("--data-dir")
            .arg(&gw.dir));
    }
    let r = json(&ok(&mut gw.cmd(&["prune", "--vm", "vm-r", "--json"])));
    println!("prune: {r}");
    assert_eq!(r["points_deleted"].as_array().map(Vec::len), Some(3), "{r}");
    let gc = &r["gc"];
    assert!(
        u(gc, "packs_removed") + u(gc, "packs_compacted") > 0,
        "{gc}"
    );
    assert!(u(gc, "bytes_reclaimed") > 3 * 16 * MIB64, "{gc}");
    assert!(u(gc, "bytes_after") < u(gc, "bytes_before"), "{gc}");

    let mut left = points[3..].to_vec();
    left.sort();
    assert_eq!(point_ids(&gw, "vm-r"), left, "older points gone");
    let after = du_packs(&gw);
    println!("packs on disk: {before} B before, {after} B after");
    assert!(
        after + 3 * 16 * MIB64 < before,
        "store must shrink: {before} → {after}"
    );
    let v = assert_verify_clean(&gw);
    assert_eq!(u(&v, "points_checked"), 2);
    assert_restores(&gw, t.path(), &points[3], &day_disk(4));
    assert_restores(&gw, t.path(), &points[4], &day_disk(5));

    // The jobs keep their history; a second GC has nothing left to do.
    let jobs = json(&ok(&mut gw.cmd(&["jobs", "--json"])));
    assert!(jobs
        .as_array()
        .expect("jobs")
        .iter()
        .any(|j| j["point"] == points[0].as_str()));
    let again = json(&ok(&mut gw.cmd(&["gc", "--json"])));
    assert_eq!(
        (u(&again, "packs_removed"), u(&again, "chunks_removed")),
        (0, 0),
        "{again}"
    );
    // Human output.
    let text = ok(&mut gw.cmd(&["gc"]));
    assert!(
        text.contains("GC: removed 0 chunk(s)") && text.contains("store:"),
        "{text}"
    );
}

/// RFC 3339 text of now + `offset` seconds.
fn rfc3339_in(offset: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let t = std::time::UNIX_EPOCH + Duration::from_secs((now + offset) as u64);
    // Format by hand: the e2e crate has no date library.
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(DAY), secs.rem_euclid(DAY));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[test]
fn backup_running_during_prune_and_gc_restores_exactly() {
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    // An old VM whose first point expires; the big VM being backed up shares
    // that point's data, so it dedups against chunks prune makes garbage.
    let shared = noise(7, 32 * MIB);
    let old_vm = raw_vm(
        t.path(),
        &host,
        "vm-old",
        "dddddddd-0000-0000-0000-000000000004",
        &shared,
    );
    let mut big = shared.clone();
    big.extend(noise(8, 128 * MIB));
    raw_vm(
        t.path(),
        &host,
        "vm-big",
        "eeeeeeee-0000-0000-0000-000000000005",
        &big,
    );
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    let first = agent.backup("vm-old")["point"]
        .as_str()
        .expect("point")
        .to_string();
    set_disk(&old_vm, &noise(9, 16 * MIB));
    let second = agent.backup("vm-old")["point"]
        .as_str()
        .expect("point")
        .to_string();
    age_point(&gw, &first, 3 * DAY);

    let mut child = agent
        .cmd(&["backup", "--json", "--vm", "vm-big"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup");
    let start = Instant::now();
    let mut during = 0;
    let mut pruned = false;
    loop {
        let verb: &[&str] = if pruned {
            &["gc", "--json"]
        } else {
            &["prune", "--keep-days", "1", "--json"]
        };
        let o = run(&mut gw.cmd(verb));
        let running = child.try_wait().expect("wait").is_none();
        if o.status.success() {
            pruned = true;
            if running {
                during += 1;
            }
        } else {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("GC already running"), "{verb:?}: {err}");
        }
        if !running {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "backup takes too long"
        );
    }
    let out = child.wait_with_output().expect("backup output");
    assert!(
        out.status.success(),
        "backup during GC failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        during >= 1,
        "no prune/GC finished while the backup ran; make the VM larger"
    );
    println!("{during} prune/GC run(s) completed while the backup ran");
    let rep = json(&String::from_utf8_lossy(&out.stdout));
    let point = rep["point"].as_str().expect("point").to_string();

    assert_eq!(point_ids(&gw, "vm-old"), vec![second.clone()]);
    let r = json(&ok(&mut gw.cmd(&["gc", "--json"])));
    println!("gc after the backup: {r}");
    assert_verify_clean(&gw);
    assert_restores(&gw, t.path(), &point, &big);
    assert_restores(&gw, t.path(), &second, &noise(9, 16 * MIB));
}
