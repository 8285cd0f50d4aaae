//! Acceptance of issue 3 (incremental forever): change detection from RCT
//! ranges, checkpoint deltas and full read + compare; the failure cases of
//! change tracking (unknown id, reset, over-reporting, a write it missed);
//! 30 incrementals restored without a chain; resized, added and removed
//! disks; a VM moved to another folder and to another agent.
//!
//! Disks are generated in memory as sparse page maps (1 MiB pages, the
//! gateway's default chunk size) and written as dynamic VHDX with 1 MiB
//! blocks, so a 4 GiB disk holds only what the test wrote. Ground truth is
//! the page map itself, never a reader under test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tierback_e2e::*;
use tierback_format::vhdx::testkit::{differencing_vhdx, pattern};
use tierback_format::vhdx::{Guid, ParentInfo, VhdxOptions, VhdxWriter};

const MIB: u64 = 1 << 20;

/// A sparse virtual disk: 1 MiB pages, zeros elsewhere.
#[derive(Clone)]
struct Image {
    size: u64,
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Image {
    fn new(size: u64) -> Image {
        Image {
            size,
            pages: BTreeMap::new(),
        }
    }

    /// Fills whole pages with pseudo-random bytes.
    fn fill(&mut self, seed: u64, pages: impl IntoIterator<Item = u64>) -> Vec<(u64, Vec<u8>)> {
        let mut writes = Vec::new();
        for n in pages {
            let data = pattern(seed.wrapping_mul(1_000_003).wrapping_add(n), MIB as usize);
            writes.push((n * MIB, data));
        }
        for (off, d) in &writes {
            self.write(*off, d);
        }
        writes
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        assert!(off + data.len() as u64 <= self.size);
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let (n, within) = (pos / MIB, (pos % MIB) as usize);
            let take = (MIB as usize - within).min(data.len() - done);
            let page = self
                .pages
                .entry(n)
                .or_insert_with(|| vec![0u8; MIB as usize]);
            page[within..within + take].copy_from_slice(&data[done..done + take]);
            done += take;
        }
    }

    fn resize(&mut self, size: u64) {
        assert_eq!(size % MIB, 0);
        self.size = size;
        self.pages.retain(|n, _| *n < size / MIB);
    }

    fn nonzero_pages(&self) -> u64 {
        self.pages
            .values()
            .filter(|p| p.iter().any(|&b| b != 0))
            .count() as u64
    }

    fn opts(&self) -> VhdxOptions {
        let mut o = VhdxOptions::new(self.size);
        o.block_size = MIB as u32;
        o
    }

    /// Writes the image as a new dynamic VHDX (a new DataWriteGuid).
    fn write_vhdx(&self, path: &Path) -> Guid {
        let f = std::fs::File::create(path).expect("create vhdx");
        let mut w = VhdxWriter::create(f, self.opts()).expect("writer");
        let g = w.data_write_guid();
        for (n, p) in &self.pages {
            w.write_at(n * MIB, p).expect("write");
        }
        w.finish().expect("finish").sync_all().expect("sync");
        g
    }

    /// Checks a restored raw file byte for byte.
    fn assert_restored(&self, path: &Path, what: &str) {
        use std::io::Read;
        let mut f = std::fs::File::open(path).expect("open restore");
        let len = f.metadata().expect("meta").len();
        assert_eq!(len, self.size, "{what}: restored size");
        let zeros = vec![0u8; MIB as usize];
        let mut buf = vec![0u8; MIB as usize];
        for n in 0..self.size / MIB {
            f.read_exact(&mut buf).expect("read restore");
            let want = self.pages.get(&n).map(Vec::as_slice).unwrap_or(&zeros);
            assert!(buf == want, "{what}: chunk {n} differs from the source");
        }
    }
}

/// Writes a differencing child of `parent_name` (DataWriteGuid `parent`).
fn write_child(
    img: &Image,
    path: &Path,
    parent: Guid,
    parent_name: &str,
    writes: &[(u64, Vec<u8>)],
) {
    let mut o = img.opts();
    o.parent = Some(ParentInfo {
        parent_linkage: parent,
        relative_path: parent_name.to_string(),
        absolute_win32_path: None,
        volume_path: None,
    });
    let f = std::fs::File::create(path).expect("create avhdx");
    let (f, _) = differencing_vhdx(f, o, writes).expect("child");
    f.sync_all().expect("sync");
}

struct Env {
    t: tempfile::TempDir,
    gw: Gateway,
    host: PathBuf,
    agent: Agent,
}

fn env() -> Env {
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    std::fs::create_dir_all(&host).expect("host");
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    Env { t, gw, host, agent }
}

/// A VM folder whose disks are `(file name, location)` under "Virtual Hard Disks".
fn new_vm(host: &Path, name: &str, id: &str) -> PathBuf {
    make_vm(host, name, id, &[])
}

fn disk_path(vm: &Path, file: &str) -> PathBuf {
    vm.join("Virtual Hard Disks").join(file)
}

fn set_disks(vm: &Path, disks: &[(&str, &str)]) {
    let p = vm.join("vm.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
    v["disks"] = disks
        .iter()
        .map(|(file, loc)| json!({"controller": "SCSI", "location": loc, "path": format!("Virtual Hard Disks/{file}")}))
        .collect();
    std::fs::write(&p, serde_json::to_vec_pretty(&v).expect("json")).expect("write");
}

fn write_rct(vm: &Path, file: &str, current: &str, since: Value) {
    let v = json!({ format!("Virtual Hard Disks/{file}"): { "current": current, "since": since } });
    std::fs::write(vm.join("rct.json"), v.to_string()).expect("rct.json");
}

fn ranges(writes: &[(u64, Vec<u8>)]) -> Value {
    writes
        .iter()
        .map(|(o, d)| json!([o, d.len()]))
        .collect::<Vec<_>>()
        .into()
}

fn restore(gw: &Gateway, point: &str, disk: u32, out: &Path) -> Value {
    let o = ok(gw
        .cmd(&[
            "restore-disk",
            "--json",
            "--point",
            point,
            "--disk",
            &disk.to_string(),
            "--format",
            "raw",
            "--out",
        ])
        .arg(out));
    serde_json::from_str(&o).expect("restore json")
}

fn kind_of(gw: &Gateway, point: &str) -> String {
    gw.points()
        .iter()
        .find(|p| p["id"] == point)
        .and_then(|p| p["kind"].as_str())
        .unwrap_or("missing")
        .to_string()
}

fn tracking_of(gw: &Gateway, vm_id: &str, disk: usize) -> Value {
    let out = ok(&mut gw.cmd(&["vms", "--json"]));
    let vms: Vec<Value> = serde_json::from_str(&out).expect("vms json");
    let vm = vms
        .iter()
        .find(|v| v["id"] == vm_id)
        .unwrap_or_else(|| panic!("VM {vm_id} not in {out}"));
    vm["disks"][disk]["tracking"].clone()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Chunk bytes sent: `want` of disk data, plus at most a changed vm.json.
fn assert_sent(r: &Value, want: u64) {
    let sent = u(&r["bytes_sent"]);
    assert!(
        sent >= want && sent < want + (64 << 10),
        "expected {want} bytes sent (+ vm.json): {r}"
    );
}

fn within_10pct(got: u64, want: u64, what: &str) {
    let lo = want as f64 * 0.9;
    let hi = want as f64 * 1.1;
    assert!(
        (got as f64) >= lo && (got as f64) <= hi,
        "{what}: {got} not within 10% of {want}"
    );
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Rct,
    Checkpoint,
    Compare,
}

/// A 4 GiB disk with 160 MiB of data; ~3 % of it (123 chunks) changes:
/// 40 overwritten pages, an 80 MiB run, three single-sector writes.
fn three_percent(mode: Mode) {
    let e = env();
    let id = "3c000000-0000-0000-0000-00000000000a";
    let vm = new_vm(&e.host, "big", id);
    let mut img = Image::new(4 << 30);
    img.fill(1, (0..160).map(|i| i * 25));
    let base = img.write_vhdx(&disk_path(&vm, "big.vhdx"));
    set_disks(&vm, &[("big.vhdx", "0:0")]);
    if matches!(mode, Mode::Rct) {
        write_rct(&vm, "big.vhdx", "rct-0001", json!({}));
    }
    let r1 = e.agent.backup("big");
    assert_eq!(r1["disks"][0]["method"], "full", "{r1}");

    let mut writes = img.fill(2, (0..40).map(|i| i * 25));
    writes.extend(img.fill(3, 3000..3080));
    for (k, off) in [
        (0u64, 1001 * MIB + 4096),
        (1, 2002 * MIB),
        (2, 50 * MIB + 512),
    ] {
        let d = pattern(100 + k, 512);
        img.write(off, &d);
        writes.push((off, d));
    }
    // Small writes into pages that hold data and are otherwise unchanged:
    // the gateway stores these chunks as deltas against day 1's.
    for (k, off, len) in [
        (0u64, 1025 * MIB + 8192, 4096),
        (1, 1050 * MIB + 307_200, 65_536),
    ] {
        let d = pattern(200 + k, len);
        img.write(off, &d);
        writes.push((off, d));
    }
    let mut changed: Vec<u64> = writes
        .iter()
        .flat_map(|(o, d)| (o / MIB)..=((o + d.len() as u64 - 1) / MIB))
        .collect();
    changed.sort_unstable();
    changed.dedup();
    let changed_bytes = changed.len() as u64 * MIB;
    match mode {
        Mode::Rct => {
            img.write_vhdx(&disk_path(&vm, "big.vhdx"));
            write_rct(
                &vm,
                "big.vhdx",
                "rct-0002",
                json!({ "rct-0001": ranges(&writes) }),
            );
        }
        Mode::Checkpoint => {
            write_child(
                &img,
                &disk_path(&vm, "big_6A1D.avhdx"),
                base,
                "big.vhdx",
                &writes,
            );
            set_disks(&vm, &[("big_6A1D.avhdx", "0:0")]);
        }
        Mode::Compare => {
            img.write_vhdx(&disk_path(&vm, "big.vhdx"));
        }
    }
    let r2 = e.agent.backup("big");
    let d = &r2["disks"][0];
    println!(
        "{mode:?}: changed {} MiB; read {} B from the disk ({} B total), sent {} B ({} chunks as patches), {:.1} s",
        changed_bytes / MIB,
        d["bytes_read"],
        r2["bytes_read"],
        r2["bytes_sent"],
        r2["patched_chunks"],
        r2["seconds"].as_f64().unwrap_or(0.0)
    );
    let want_method = match mode {
        Mode::Rct => "rct",
        Mode::Checkpoint => "checkpoint",
        Mode::Compare => "compare",
    };
    assert_eq!(d["method"], want_method, "{r2}");
    within_10pct(u(&r2["bytes_sent"]), changed_bytes, "bytes sent");
    if matches!(mode, Mode::Compare) {
        assert_eq!(d["state"], "fallback", "{r2}");
        // Every allocated chunk is read: the old 160 pages plus the new ones.
        assert!(u(&d["bytes_read"]) >= 160 * MIB, "{r2}");
    } else {
        assert_eq!(d["state"], "tracking", "{r2}");
        // The two chunks with small writes go as patches of day 1's: only
        // the 4 KiB blocks tracking reports written.
        assert_eq!(u(&r2["patched_chunks"]), 2, "{r2}");
        within_10pct(
            u(&d["bytes_read"]),
            changed_bytes,
            "bytes read from the disk",
        );
        // The rest read is the config files (vmgs etc.), a few MiB.
        assert!(
            u(&r2["bytes_read"]) <= u(&d["bytes_read"]) + 5 * MIB,
            "{r2}"
        );
        assert!(u(&d["sample_bytes_read"]) >= 8 * MIB, "{r2}");
    }
    // 120 pages of new random data (~1 MiB each, incompressible) plus small
    // deltas and nearly empty chunks: the two rewritten pages would add
    // 2 MiB if stored whole.
    let stored = u(&r2["stored_bytes"]);
    assert!(
        (120 * MIB..120 * MIB + 512 * 1024).contains(&stored),
        "stored {stored} B: {r2}"
    );
    let point = r2["point"].as_str().expect("point");
    assert_eq!(kind_of(&e.gw, point), "incremental");
    assert_eq!(r2["base_point"], r1["point"]);
    let out = e.t.path().join("restored.raw");
    restore(&e.gw, point, 0, &out);
    img.assert_restored(&out, &format!("{mode:?} incremental"));
}

#[test]
fn rct_incremental_reads_and_sends_only_the_changed_ranges() {
    three_percent(Mode::Rct);
}

#[test]
fn checkpoint_incremental_reads_and_sends_only_the_child() {
    three_percent(Mode::Checkpoint);
}

#[test]
fn compare_incremental_sends_only_changed_chunks() {
    three_percent(Mode::Compare);
}

/// One small VM per failure case of change tracking.
/// Tracking that reports only part of a write inside a chunk: the patch
/// the agent sends does not rebuild the chunk, the gateway refuses it, the
/// agent sends the chunk whole and says so; the restore is exact.
#[test]
fn a_patch_from_under_reported_ranges_is_refused_and_the_chunk_sent_whole() {
    let e = env();
    let vm = new_vm(&e.host, "under", "3e100000-0000-0000-0000-000000000001");
    let mut img = Image::new(64 * MIB);
    img.fill(30, [0u64, 2, 4]);
    img.write_vhdx(&disk_path(&vm, "d.vhdx"));
    set_disks(&vm, &[("d.vhdx", "0:0")]);
    write_rct(&vm, "d.vhdx", "rct-0001", json!({}));
    let r1 = e.agent.backup("under");
    assert_eq!(r1["disks"][0]["method"], "full");

    // Two writes of 8 KiB: the first reported in full, the second only its
    // first 4 KiB.
    img.write(2 * MIB + 65_536, &pattern(31, 8192));
    img.write(4 * MIB + 65_536, &pattern(32, 8192));
    img.write_vhdx(&disk_path(&vm, "d.vhdx"));
    write_rct(
        &vm,
        "d.vhdx",
        "rct-0002",
        json!({ "rct-0001": [[2 * MIB + 65_536, 8192], [4 * MIB + 65_536, 4096]] }),
    );
    let r2 = e.agent.backup("under");
    assert_eq!(r2["disks"][0]["method"], "rct", "{r2}");
    assert_eq!(u(&r2["sent_chunks"]), 2, "{r2}");
    assert_eq!(u(&r2["patched_chunks"]), 1, "{r2}");
    // 8 KiB + 4 KiB as patches, then the refused chunk whole.
    assert_eq!(u(&r2["bytes_sent"]), 8192 + 4096 + MIB, "{r2}");
    let alerts = r2["alerts"].as_array().expect("alerts");
    assert!(
        alerts
            .iter()
            .any(|a| a.as_str().unwrap_or("").contains("did not rebuild")),
        "{r2}"
    );
    let out = e.t.path().join("under.raw");
    restore(&e.gw, r2["point"].as_str().expect("point"), 0, &out);
    img.assert_restored(&out, "under-reported incremental");
}

#[test]
fn tracking_failures_fall_back_and_say_so() {
    let e = env();
    let pages = [0u64, 5, 10, 20, 30, 40];
    let cases = ["unknown", "reset", "over", "missed"];
    for (k, case) in cases.iter().enumerate() {
        let id = format!("3e000000-0000-0000-0000-00000000000{k}");
        let vm = new_vm(&e.host, case, &id);
        let mut img = Image::new(64 * MIB);
        img.fill(10 + k as u64, pages);
        img.write_vhdx(&disk_path(&vm, "d.vhdx"));
        set_disks(&vm, &[("d.vhdx", "0:0")]);
        write_rct(&vm, "d.vhdx", "rct-0001", json!({}));
        let r1 = e.agent.backup(case);
        assert_eq!(r1["disks"][0]["method"], "full");

        let writes = img.fill(20 + k as u64, [5]);
        if *case == "missed" {
            // The source changed where change tracking will not say.
            img.fill(30, [20]);
        }
        img.write_vhdx(&disk_path(&vm, "d.vhdx"));
        let since = match *case {
            "unknown" => json!({ "rct-0002": ranges(&writes) }),
            "reset" => json!({}),
            "over" => json!({ "rct-0001": [[0, 64 * MIB]], "rct-0000": [[0, 1]] }),
            _ => json!({ "rct-0001": ranges(&writes) }),
        };
        let current = if *case == "reset" {
            "rct-0009"
        } else {
            "rct-0003"
        };
        write_rct(&vm, "d.vhdx", current, since);
        let r2 = e.agent.backup(case);
        let d = &r2["disks"][0];
        let tr = tracking_of(&e.gw, &id, 0);
        println!("{case}: {d}\n  inventory: {tr}");
        match *case {
            "unknown" => {
                assert_eq!(d["method"], "compare", "{r2}");
                assert_eq!(d["state"], "fallback");
                let reason = d["reason"].as_str().unwrap_or("");
                assert!(
                    reason.contains("change-tracking id rct-0001 unknown to the host"),
                    "{reason}"
                );
                assert_eq!(tr["state"], "fallback", "{tr}");
                assert_eq!(tr["reason"], d["reason"]);
            }
            "reset" => {
                assert_eq!(d["method"], "compare", "{r2}");
                assert_eq!(d["state"], "reset");
                assert_eq!(tr["state"], "reset", "{tr}");
                assert!(
                    tr["reason"].as_str().unwrap_or("").contains("reset"),
                    "{tr}"
                );
            }
            "over" => {
                // Over-reporting costs reads, never sends or correctness.
                assert_eq!(d["method"], "rct", "{r2}");
                assert_eq!(d["state"], "tracking");
                assert_eq!(u(&d["bytes_read"]), 64 * MIB, "{r2}");
                assert_sent(&r2, MIB);
                assert_eq!(tr["state"], "tracking", "{tr}");
            }
            _ => {
                assert_eq!(d["method"], "compare", "{r2}");
                assert_eq!(d["state"], "fallback");
                let alerts = r2["alerts"].as_array().expect("alerts");
                assert_eq!(alerts.len(), 1, "{r2}");
                assert!(
                    alerts[0].as_str().unwrap_or("").contains("chunk 20"),
                    "{r2}"
                );
                assert_eq!(tr["alerts"], r2["alerts"], "{tr}");
                // Both the reported and the missed chunk were sent.
                assert_sent(&r2, 2 * MIB);
                let jobs = ok(&mut e.gw.cmd(&["jobs", "--json"]));
                assert!(jobs.contains("ALERTS: disk 0"), "{jobs}");
            }
        }
        let point = r2["point"].as_str().expect("point");
        assert_eq!(kind_of(&e.gw, point), "incremental");
        let out = e.t.path().join(format!("{case}.raw"));
        restore(&e.gw, point, 0, &out);
        img.assert_restored(&out, case);
    }
}

#[test]
fn thirty_incrementals_restore_newest_and_oldest_from_complete_indexes() {
    let e = env();
    let id = "30000000-0000-0000-0000-000000000030";
    let vm = new_vm(&e.host, "often", id);
    let mut img = Image::new(128 * MIB);
    img.fill(1, (0..24).map(|i| i * 5));
    img.write_vhdx(&disk_path(&vm, "o.vhdx"));
    set_disks(&vm, &[("o.vhdx", "0:0")]);
    write_rct(&vm, "o.vhdx", "rct-0", json!({}));
    let first = e.agent.backup("often");
    let oldest = img.clone();
    let mut last = first.clone();
    for i in 1..=30u64 {
        let page = (i * 7 % 24) * 5;
        let writes = img.fill(100 + i, [page]);
        img.write_vhdx(&disk_path(&vm, "o.vhdx"));
        write_rct(
            &vm,
            "o.vhdx",
            &format!("rct-{i}"),
            json!({ format!("rct-{}", i - 1): ranges(&writes) }),
        );
        last = e.agent.backup("often");
        assert_eq!(last["disks"][0]["method"], "rct", "backup {i}: {last}");
        assert_sent(&last, MIB);
    }
    let points = e.gw.points();
    let mine: Vec<&Value> = points.iter().filter(|p| p["vm_id"] == id).collect();
    assert_eq!(mine.len(), 31);
    assert_eq!(
        mine.iter().filter(|p| p["kind"] == "incremental").count(),
        30
    );
    let (old_out, new_out) = (e.t.path().join("oldest.raw"), e.t.path().join("newest.raw"));
    let ro = restore(&e.gw, first["point"].as_str().expect("p"), 0, &old_out);
    let rn = restore(&e.gw, last["point"].as_str().expect("p"), 0, &new_out);
    println!(
        "restore of the oldest point: {} chunk(s) in {:.2} s; of the newest (30 incrementals later): {} chunk(s) in {:.2} s",
        ro["chunks"],
        ro["seconds"].as_f64().unwrap_or(0.0),
        rn["chunks"],
        rn["seconds"].as_f64().unwrap_or(0.0)
    );
    oldest.assert_restored(&old_out, "oldest point");
    img.assert_restored(&new_out, "newest point");
    // Both read exactly their disk's non-zero chunks from one complete index.
    assert_eq!(u(&ro["chunks"]), oldest.nonzero_pages());
    assert_eq!(u(&rn["chunks"]), img.nonzero_pages());
    assert_eq!(ro["chunks"], rn["chunks"]);
}

#[test]
fn resized_added_removed_and_moved_disks_continue_the_chain() {
    let e = env();
    let id = "50000000-0000-0000-0000-000000000005";
    let vm = new_vm(&e.host, "mover", id);
    let mut os = Image::new(64 * MIB);
    os.fill(1, [0, 3, 9, 17, 33, 60, 63]);
    os.write_vhdx(&disk_path(&vm, "os.vhdx"));
    set_disks(&vm, &[("os.vhdx", "0:0")]);
    let r1 = e.agent.backup("mover");
    assert_eq!(kind_of(&e.gw, r1["point"].as_str().expect("p")), "full");

    let check = |r: &Value, disks: &[&Image], tag: &str| {
        let point = r["point"].as_str().expect("point");
        assert_eq!(kind_of(&e.gw, point), "incremental", "{tag}: {r}");
        for (n, img) in disks.iter().enumerate() {
            let out = e.t.path().join(format!("{tag}-{n}.raw"));
            restore(&e.gw, point, n as u32, &out);
            img.assert_restored(&out, &format!("{tag} disk {n}"));
        }
    };

    // Grow the disk (new data beyond the old end) and add a second disk.
    os.resize(96 * MIB);
    os.fill(2, [3, 80, 95]);
    os.write_vhdx(&disk_path(&vm, "os.vhdx"));
    let mut data = Image::new(32 * MIB);
    data.fill(3, [1, 2, 30]);
    data.write_vhdx(&disk_path(&vm, "data.vhdx"));
    set_disks(&vm, &[("os.vhdx", "0:0"), ("data.vhdx", "0:1")]);
    let r2 = e.agent.backup("mover");
    assert_eq!(r2["disks"][0]["method"], "compare", "{r2}");
    assert_eq!(r2["disks"][1]["method"], "full", "{r2}");
    assert_sent(&r2, 6 * MIB); // 3 changed + 3 new chunks
    check(&r2, &[&os, &data], "grown+added");

    // Shrink it: what lay beyond the new end vanishes from the index.
    os.resize(48 * MIB);
    os.fill(4, [9]);
    os.write_vhdx(&disk_path(&vm, "os.vhdx"));
    let r3 = e.agent.backup("mover");
    assert_eq!(r3["disks"][0]["method"], "compare", "{r3}");
    assert_eq!(r3["disks"][1]["method"], "unchanged", "{r3}");
    check(&r3, &[&os, &data], "shrunk");

    // Remove the first disk: the data disk is now disk 0 and still continues.
    set_disks(&vm, &[("data.vhdx", "0:1")]);
    let r4 = e.agent.backup("mover");
    assert_eq!(r4["disks"][0]["method"], "unchanged", "{r4}");
    assert_eq!(r4["disks"][0]["base_stream"], 1, "{r4}");
    assert!(
        u(&r4["bytes_read"]) < 5 * MIB,
        "only config files read: {r4}"
    );
    check(&r4, &[&data], "removed");

    // Move the VM to another folder of the host.
    let moved = e.host.join("mover-moved");
    std::fs::rename(&vm, &moved).expect("move");
    data.fill(5, [2]);
    data.write_vhdx(&disk_path(&moved, "data.vhdx"));
    let r5 = e.agent.backup("mover");
    assert_eq!(r5["disks"][0]["method"], "compare", "{r5}");
    assert_sent(&r5, MIB);
    check(&r5, &[&data], "moved folder");

    // Move it to another host with another agent: no local hashes there, so
    // a full read + compare, but the chain continues and nothing is resent.
    let host2 = e.t.path().join("host2");
    std::fs::create_dir_all(&host2).expect("host2");
    let agent2 = Agent::enroll(&e.gw, &e.t.path().join("agent2"), &host2);
    std::fs::rename(&moved, host2.join("mover")).expect("move to host2");
    let r6 = agent2.backup("mover");
    assert_eq!(r6["disks"][0]["method"], "full", "{r6}");
    assert_eq!(r6["disks"][0]["state"], "reset", "{r6}");
    assert_eq!(r6["base_point"], r5["point"], "{r6}");
    assert_eq!(u(&r6["sent_chunks"]), 0, "{r6}");
    check(&r6, &[&data], "other agent");
    let tr = tracking_of(&e.gw, id, 0);
    assert_eq!(tr["state"], "reset", "{tr}");

    // And agent 2 continues incrementally from its own state.
    // (One chunk changes, one is deallocated: the delta marks it zero.)
    data.fill(6, [30]);
    data.pages.remove(&1);
    data.write_vhdx(&disk_path(&host2.join("mover"), "data.vhdx"));
    let r7 = agent2.backup("mover");
    assert_eq!(r7["disks"][0]["method"], "compare", "{r7}");
    assert_eq!(r7["disks"][0]["zeroed_chunks"], 1, "{r7}");
    assert_sent(&r7, MIB);
    check(&r7, &[&data], "other agent again");
}
