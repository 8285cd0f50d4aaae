//! Acceptance: a VM whose disk is a two-level AVHDX chain, a VHDX with a dirty
//! log, and a 4 KiB-sector VHDX restore to exactly the expected bytes. Ground
//! truth never comes from the reader under test: it is the raw image the
//! fixture was made from, overlaid with the writes the fixture made (and, for
//! the dirty log, also qemu-img's own log replay on a copy). The source files'
//! bytes and mtimes are unchanged by the backup.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use tierback_e2e::*;
use tierback_format::vhdx::testkit;
use tierback_format::vhdx::VhdxOptions;

fn snapshot(files: &[PathBuf]) -> Vec<(String, SystemTime)> {
    files
        .iter()
        .map(|f| {
            (
                sha256_file(f),
                std::fs::metadata(f)
                    .and_then(|m| m.modified())
                    .expect("mtime"),
            )
        })
        .collect()
}

fn restore_and_compare(gw: &Gateway, point: &str, expected: &[u8], t: &Path, tag: &str) {
    let truth = t.join(format!("{tag}-expected.raw"));
    std::fs::write(&truth, expected).expect("truth");
    let raw = t.join(format!("{tag}.raw"));
    let vhdx = t.join(format!("{tag}.vhdx"));
    gw.restore_disk(point, 0, "raw", &raw);
    assert!(
        std::fs::read(&raw).expect("read") == expected,
        "{tag}: raw restore differs from the expected bytes"
    );
    gw.restore_disk(point, 0, "vhdx", &vhdx);
    // qemu-img cannot read 4 KiB-sector VHDX; for the others it is a second oracle.
    if tag != "4k" {
        assert!(
            qemu_compare(&truth, "raw", &vhdx, "vhdx"),
            "{tag}: VHDX restore differs"
        );
        qemu_check_vhdx(&vhdx);
    }
}

#[test]
fn avhdx_chain_dirty_log_and_4k_sectors_restore_exactly() {
    let fx = fixtures();
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    let raw = std::fs::read(fx.join("win-mbr.raw")).expect("raw");

    // 1. Two-level chain: base.vhdx ← snap1.avhdx ← snap2.avhdx, partial-block writes in each.
    let names = [
        "web01-os.vhdx",
        "web01-os_5C1B.avhdx",
        "web01-os_9E2F.avhdx",
    ];
    let chain = testkit::avhdx_chain(&raw, &names, 1 << 20, 512, 42).expect("chain");
    let vm = make_vm(&host, "chain", "c4a10000-0000-0000-0000-000000000001", &[]);
    let vhd_dir = vm.join("Virtual Hard Disks");
    let mut chain_files = Vec::new();
    for l in &chain.levels {
        std::fs::write(vhd_dir.join(&l.name), &l.file).expect("write level");
        chain_files.push(vhd_dir.join(&l.name));
    }
    set_disks(&vm, &[&format!("Virtual Hard Disks/{}", names[2])]);
    let expected_chain = chain.levels.last().expect("leaf").expected.clone();
    assert_ne!(expected_chain, raw, "the children must change something");

    // 2. Dirty log.
    let dirty = testkit::dirty_log_vhdx(&raw, 1 << 20, 7).expect("dirty log");
    assert_ne!(dirty.expected_raw, raw, "the log must change the disk");
    let vm2 = make_vm(&host, "dirty", "d1f70000-0000-0000-0000-000000000002", &[]);
    let dirty_path = vm2.join("Virtual Hard Disks/dirty.vhdx");
    std::fs::write(&dirty_path, &dirty.file).expect("write dirty");
    set_disks(&vm2, &["Virtual Hard Disks/dirty.vhdx"]);
    // qemu's own replay, on a copy, must agree with the fixture's ground truth.
    let copy = t.path().join("dirty-copy.vhdx");
    std::fs::copy(&dirty_path, &copy).expect("copy");
    let _ = run(Command::new("qemu-img")
        .args(["check", "-r", "all", "-f", "vhdx"])
        .arg(&copy));
    let qemu_raw = t.path().join("dirty-qemu.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&copy)
        .arg(&qemu_raw));
    assert!(
        std::fs::read(&qemu_raw).expect("read") == dirty.expected_raw,
        "fixture truth disagrees with qemu's replay"
    );

    // 3. 4 KiB logical sectors.
    let mut opts = VhdxOptions::new(raw.len() as u64);
    opts.logical_sector_size = 4096;
    opts.physical_sector_size = 4096;
    opts.block_size = 1 << 20;
    let (k4, _) = testkit::vhdx_bytes_from_raw(&raw, opts).expect("4k");
    let vm3 = make_vm(&host, "fourk", "4b000000-0000-0000-0000-000000000003", &[]);
    let k4_path = vm3.join("Virtual Hard Disks/fourk.vhdx");
    std::fs::write(&k4_path, &k4).expect("write 4k");
    set_disks(&vm3, &["Virtual Hard Disks/fourk.vhdx"]);

    let mut sources = chain_files.clone();
    sources.push(dirty_path.clone());
    sources.push(k4_path.clone());
    // Make mtimes old enough that a write would be visible.
    for f in &sources {
        let old = filetime_past(f);
        assert!(old, "could not set mtime of {}", f.display());
    }
    let before = snapshot(&sources);

    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    let p_chain = agent.backup("chain")["point"]
        .as_str()
        .expect("p")
        .to_string();
    let p_dirty = agent.backup("dirty")["point"]
        .as_str()
        .expect("p")
        .to_string();
    let p_4k = agent.backup("fourk")["point"]
        .as_str()
        .expect("p")
        .to_string();
    assert_eq!(
        snapshot(&sources),
        before,
        "a source disk was modified by the backup"
    );

    let vms: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&mut gw.cmd(&["vms", "--json"]))).expect("json");
    let fourk = vms.iter().find(|v| v["name"] == "fourk").expect("fourk");
    assert_eq!(fourk["disks"][0]["logical_sector_size"], 4096);

    restore_and_compare(&gw, &p_chain, &expected_chain, t.path(), "chain");
    restore_and_compare(&gw, &p_dirty, &dirty.expected_raw, t.path(), "dirty");
    restore_and_compare(&gw, &p_4k, &raw, t.path(), "4k");
    // The restored 4 KiB VHDX keeps its sector size: our reader is the only
    // one here that can check it, so it must at least agree with the truth.
    assert_eq!(snapshot(&sources), before, "a source disk was modified");
}

fn set_disks(vm: &Path, paths: &[&str]) {
    let p = vm.join("vm.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
    v["disks"] = paths
        .iter()
        .enumerate()
        .map(|(i, path)| serde_json::json!({"controller": "SCSI", "location": format!("0:{i}"), "path": path}))
        .collect();
    std::fs::write(&p, serde_json::to_vec_pretty(&v).expect("json")).expect("write");
}

/// Sets a file's mtime an hour into the past (so a write during backup would
/// show), with `touch -d`.
fn filetime_past(f: &Path) -> bool {
    Command::new("touch")
        .args(["-m", "-d", "1 hour ago"])
        .arg(f)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
