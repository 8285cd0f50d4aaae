//! Acceptance: VMs built from real tools (GPT ESP+MSR+NTFS, MBR NTFS, Linux
//! ext4+xfs) in every container qemu-img makes back up and restore
//! byte-identical, as raw and as VHDX; restored VHDX files pass `qemu-img
//! check`; a whole-VM restore carries the config files byte for byte.

use tierback_e2e::*;

const CONTAINERS: [(&str, &str); 5] = [
    ("dynamic.vhdx", "dynamic VHDX 32 MiB blocks"),
    ("dyn1m.vhdx", "dynamic VHDX 1 MiB blocks"),
    ("fixed.vhdx", "fixed VHDX"),
    ("dynamic.vhd", "dynamic VHD"),
    ("fixed.vhd", "fixed VHD"),
];

#[test]
fn every_container_restores_byte_identical_as_raw_and_vhdx() {
    let fx = fixtures();
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    // One VM per container format, each with the three realistic disks.
    let mut vms = Vec::new();
    for (i, (suffix, _)) in CONTAINERS.iter().enumerate() {
        let name = format!("vm-{}", suffix.replace('.', "-"));
        let id = format!("8f0c2d1e-4b7a-4c59-9a0e-2f6d7c1b33{i:02}");
        let disks: Vec<_> = ["win-gpt", "win-mbr", "linux-gpt"]
            .iter()
            .map(|d| {
                (
                    fx.join(format!("{d}-{suffix}")),
                    format!("{d}.{}", suffix.rsplit('.').next().unwrap_or("vhdx")),
                )
            })
            .collect();
        let refs: Vec<_> = disks
            .iter()
            .map(|(p, n)| (p.as_path(), n.as_str()))
            .collect();
        make_vm(&host, &name, &id, &refs);
        vms.push(name);
    }
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    for (vm, (suffix, what)) in vms.iter().zip(CONTAINERS) {
        let rep = agent.backup(vm);
        let point = rep["point"].as_str().expect("point").to_string();
        assert!(
            rep["bytes_read"].as_u64().unwrap_or(0) > 0,
            "{what}: nothing read"
        );
        for (n, d) in ["win-gpt", "win-mbr", "linux-gpt"].iter().enumerate() {
            let raw_truth = fx.join(format!("{d}.raw"));
            let out_raw = t.path().join(format!("{vm}-{d}.raw"));
            let out_vhdx = t.path().join(format!("{vm}-{d}.vhdx"));
            gw.restore_disk(&point, n as u32, "raw", &out_raw);
            gw.restore_disk(&point, n as u32, "vhdx", &out_vhdx);
            assert!(
                qemu_compare(&raw_truth, "raw", &out_raw, "raw"),
                "{what} {d}: raw restore differs ({suffix})"
            );
            assert!(
                qemu_compare(&raw_truth, "raw", &out_vhdx, "vhdx"),
                "{what} {d}: VHDX restore differs ({suffix})"
            );
            qemu_check_vhdx(&out_vhdx);
            std::fs::remove_file(&out_raw).expect("rm");
            std::fs::remove_file(&out_vhdx).expect("rm");
        }
    }
}

#[test]
fn whole_vm_restore_carries_config_files_byte_identical() {
    let fx = fixtures();
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    let src = make_vm(
        &host,
        "web01",
        "8f0c2d1e-4b7a-4c59-9a0e-2f6d7c1b33a1",
        &[
            (&fx.join("win-gpt-dynamic.vhdx"), "web01-os.vhdx"),
            (&fx.join("linux-gpt-dynamic.vhd"), "web01-data.vhd"),
        ],
    );
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    let point = agent.backup("web01")["point"]
        .as_str()
        .expect("point")
        .to_string();

    // vms --json shows the VM with its disks.
    let vms: serde_json::Value =
        serde_json::from_str(&ok(&mut gw.cmd(&["vms", "--json"]))).expect("json");
    assert_eq!(vms[0]["name"], "web01");
    assert_eq!(vms[0]["disks"].as_array().map(|d| d.len()), Some(2));
    assert_eq!(vms[0]["disks"][0]["virtual_size"], 256 << 20);

    let to = t.path().join("restored/web01");
    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
    ok(gw.cmd(&["restore-vm", "--point", &point, "--to"]).arg(&to));
    let desc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(to.join("vm.json")).expect("vm.json")).expect("json");
    assert_eq!(desc["id"], "8f0c2d1e-4b7a-4c59-9a0e-2f6d7c1b33a1");
    for f in desc["config_files"].as_array().expect("config files") {
        let rel = f.as_str().expect("str");
        assert_eq!(
            sha256_file(&to.join(rel)),
            sha256_file(&src.join(rel)),
            "{rel} differs"
        );
    }
    let disks = desc["disks"].as_array().expect("disks");
    assert_eq!(disks[0]["path"], "Virtual Hard Disks/web01-os.vhdx");
    assert_eq!(disks[1]["path"], "Virtual Hard Disks/web01-data.vhdx");
    let os = to.join("Virtual Hard Disks/web01-os.vhdx");
    let data = to.join("Virtual Hard Disks/web01-data.vhdx");
    qemu_check_vhdx(&os);
    assert!(qemu_compare(&fx.join("win-gpt.raw"), "raw", &os, "vhdx"));
    assert!(qemu_compare(
        &fx.join("linux-gpt.raw"),
        "raw",
        &data,
        "vhdx"
    ));

    // Restores never overwrite.
    let err = fails(gw.cmd(&["restore-vm", "--point", &point, "--to"]).arg(&to));
    assert!(err.contains("not empty"), "{err}");
}
