//! Offline seeding: `tierback-agent export` writes a VM's first full to a
//! folder, `tierback-gateway import` brings it into the gateway with the
//! printed seed key; restores are byte-identical (qemu-img compare against
//! the source VHDX), the next network backup is an incremental that sends
//! only what changed since the export, and a wrong key, a flipped byte or a
//! truncated file each fail with one line and leave no point.
//!
//! Disks are dynamic VHDX written by the format crate's writer from sparse
//! page maps (1 MiB pages = the gateway's default chunk size).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tierback_e2e::*;
use tierback_format::vhdx::testkit::pattern;
use tierback_format::vhdx::{VhdxOptions, VhdxWriter};

const MIB: u64 = 1 << 20;

/// A sparse disk: 1 MiB pages, zeros elsewhere.
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

    fn fill(&mut self, seed: u64, pages: impl IntoIterator<Item = u64>) {
        for n in pages {
            let data = pattern(seed.wrapping_mul(1_000_003).wrapping_add(n), MIB as usize);
            self.pages.insert(n, data);
        }
    }

    fn write_vhdx(&self, path: &Path) {
        let mut o = VhdxOptions::new(self.size);
        o.block_size = MIB as u32;
        let f = std::fs::File::create(path).expect("create vhdx");
        let mut w = VhdxWriter::create(f, o).expect("writer");
        for (n, p) in &self.pages {
            w.write_at(n * MIB, p).expect("write");
        }
        w.finish().expect("finish").sync_all().expect("sync");
    }
}

struct Env {
    t: tempfile::TempDir,
    gw: Gateway,
    agent: Agent,
    vm: PathBuf,
}

const VM_ID: &str = "5eed0000-0000-0000-0000-000000000001";

/// A gateway, an agent and VM "seeded" with two disks (disk 1 repeats some
/// of disk 0's pages, so the seed dedups).
fn env(a: &Image, b: &Image) -> Env {
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    std::fs::create_dir_all(&host).expect("host");
    let vm = make_vm(&host, "seeded", VM_ID, &[]);
    a.write_vhdx(&vm.join("Virtual Hard Disks/a.vhdx"));
    b.write_vhdx(&vm.join("Virtual Hard Disks/b.vhdx"));
    let p = vm.join("vm.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
    v["disks"] = json!([
        {"controller": "SCSI", "location": "0:0", "path": "Virtual Hard Disks/a.vhdx"},
        {"controller": "SCSI", "location": "0:1", "path": "Virtual Hard Disks/b.vhdx"},
    ]);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).expect("json")).expect("vm.json");
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    Env { t, gw, agent, vm }
}

fn images() -> (Image, Image) {
    let mut a = Image::new(256 * MIB);
    a.fill(1, (0..40).map(|i| i * 6));
    let mut b = Image::new(128 * MIB);
    b.fill(2, 0..20);
    // Five pages identical to disk 0's: stored once in the seed.
    for n in 0..5u64 {
        let page = a.pages[&(n * 6)].clone();
        b.pages.insert(100 + n, page);
    }
    (a, b)
}

/// `export --json` to `media`; returns the summary.
fn export(e: &Env, media: &Path) -> Value {
    let out = ok(e
        .agent
        .cmd(&["export", "--json", "--vm", "seeded", "--to"])
        .arg(media));
    serde_json::from_str(&out).expect("export json")
}

fn import(e: &Env, from: &Path, key: &str) -> std::process::Command {
    let mut c = e.gw.cmd(&["import", "--seed-key", key, "--from"]);
    c.arg(from);
    c
}

fn restore_matches(e: &Env, point: &str, disk: u32, src: &str) {
    let out = e.t.path().join(format!("r-{point}-{disk}.raw"));
    e.gw.restore_disk(point, disk, "raw", &out);
    let src = e.vm.join("Virtual Hard Disks").join(src);
    assert!(
        qemu_compare(&out, "raw", &src, "vhdx"),
        "disk {disk} of {point} differs from {}",
        src.display()
    );
    std::fs::remove_file(&out).expect("rm");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("ls").flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn exported_seed_imports_restores_and_the_next_backup_is_incremental() {
    let (mut a, b) = images();
    let e = env(&a, &b);
    let media = e.t.path().join("media");
    let x = export(&e, &media);
    let key = x["seed_key"].as_str().expect("seed_key").to_string();
    let point = x["vms"][0]["point"].as_str().expect("point").to_string();
    // 40 pages of disk 0, 20 of disk 1 (its 5 repeats are stored once), config files.
    assert_eq!(x["vms"][0]["duplicate_chunks"], 5, "{x}");
    assert!(x["chunks"].as_u64().expect("chunks") >= 60, "{x}");
    // The key is never written to the media.
    let seed_dir = media.join(VM_ID);
    for f in std::fs::read_dir(&seed_dir).expect("ls").flatten() {
        let bytes = std::fs::read(f.path()).expect("read");
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(&key) && !text.contains(&key.replace('-', "")));
        assert!(!f.file_name().to_string_lossy().ends_with(".tmp"));
    }
    assert!(
        e.gw.points().is_empty(),
        "nothing at the gateway before import"
    );

    let out = ok(import(&e, &media, &key).arg("--json"));
    let r: Value = serde_json::from_str(&out).expect("import json");
    assert_eq!(r[0]["point"], point.as_str(), "{r}");
    let pts = e.gw.points();
    assert_eq!(pts.len(), 1);
    assert_eq!(pts[0]["kind"], "full");
    restore_matches(&e, &point, 0, "a.vhdx");
    restore_matches(&e, &point, 1, "b.vhdx");
    let jobs = ok(&mut e.gw.cmd(&["jobs", "--json"]));
    assert!(jobs.contains("imported from offline seed"), "{jobs}");
    // Importing the same seed again is refused.
    let err = fails(&mut import(&e, &media, &key));
    assert!(err.contains("already"), "{err}");

    // Change 5 pages of disk 0 (a new VHDX: no change tracking survives, so
    // the agent reads in full and compares with the hashes the export kept).
    a.fill(9, [0, 6, 12, 200, 255]);
    a.write_vhdx(&e.vm.join("Virtual Hard Disks/a.vhdx"));
    let r = e.agent.backup("seeded");
    assert_eq!(r["base_point"], point.as_str(), "{r}");
    assert_eq!(r["disks"][0]["method"], "compare", "{r}");
    assert_eq!(r["disks"][1]["method"], "unchanged", "{r}");
    let sent = r["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(
        (5 * MIB..5 * MIB + (64 << 10)).contains(&sent),
        "only the 5 changed chunks are sent: {r}"
    );
    let new_point = r["point"].as_str().expect("point").to_string();
    let kind =
        e.gw.points()
            .into_iter()
            .find(|p| p["id"] == new_point.as_str())
            .map(|p| p["kind"].clone());
    assert_eq!(kind, Some(json!("incremental")));
    restore_matches(&e, &new_point, 0, "a.vhdx");
    restore_matches(&e, &new_point, 1, "b.vhdx");
}

#[test]
fn wrong_key_damage_and_truncation_fail_with_one_line_and_no_point() {
    let (a, b) = images();
    let e = env(&a, &b);
    let media = e.t.path().join("media");
    // This time by protection group: the agent asks the gateway for its members.
    let group = |args: &[&str]| {
        let mut c = std::process::Command::new(bin("tierback-gateway"));
        c.args(["group", args[0], "--data-dir"])
            .arg(&e.gw.dir)
            .args(&args[1..]);
        ok(&mut c);
    };
    group(&["create", "branch"]);
    group(&["add", "branch", "--vm", "seeded"]);
    let out = ok(e
        .agent
        .cmd(&["export", "--json", "--group", "branch", "--to"])
        .arg(&media));
    let x: Value = serde_json::from_str(&out).expect("export json");
    assert_eq!(x["vms"][0]["vm_id"], VM_ID, "{x}");
    let key = x["seed_key"].as_str().expect("seed_key").to_string();
    let good = media.join(VM_ID);

    let other = "AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAC-VWUD";
    let err = fails(&mut import(&e, &good, other));
    eprintln!("wrong key: {err}");
    assert!(
        err.contains("manifest.tbs") && err.contains("wrong seed key"),
        "{err}"
    );
    assert!(e.gw.points().is_empty());

    let flipped = e.t.path().join("flipped");
    copy_dir(&good, &flipped);
    let data = flipped.join("data-000000.tbs");
    let mut bytes = std::fs::read(&data).expect("read");
    let mid = bytes.len() * 2 / 3;
    bytes[mid] ^= 0x40;
    std::fs::write(&data, &bytes).expect("write");
    let err = fails(&mut import(&e, &flipped, &key));
    eprintln!("flipped byte: {err}");
    assert!(err.contains("data-000000.tbs"), "{err}");
    assert!(e.gw.points().is_empty());

    let cut = e.t.path().join("cut");
    copy_dir(&good, &cut);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(cut.join("data-000000.tbs"))
        .expect("open");
    let len = f.metadata().expect("meta").len();
    f.set_len(len - 1000).expect("truncate");
    let err = fails(&mut import(&e, &cut, &key));
    eprintln!("truncated: {err}");
    assert!(
        err.contains("data-000000.tbs") && err.contains("truncated"),
        "{err}"
    );
    assert!(e.gw.points().is_empty());

    // The failed imports left nothing in the way of the good seed.
    ok(&mut import(&e, &good, &key));
    assert_eq!(e.gw.points().len(), 1);
    ok(&mut e.gw.cmd(&["verify"]));
}
