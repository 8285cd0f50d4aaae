//! Acceptance: dedup across VMs (a second VM with the same guest content
//! stores far fewer new bytes), `points --json` reports logical vs stored
//! bytes, and `verify` names a damaged chunk and every point that needs it.

use tierback_e2e::*;

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[test]
fn second_vm_with_same_guest_content_stores_far_less() {
    let fx = fixtures();
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    // Same guest OS disk, in two different containers: dedup works on
    // virtual-disk chunks, not on container bytes.
    make_vm(
        &host,
        "vm-a",
        "aaaaaaaa-0000-0000-0000-000000000001",
        &[(&fx.join("win-gpt-dynamic.vhdx"), "a.vhdx")],
    );
    make_vm(
        &host,
        "vm-b",
        "bbbbbbbb-0000-0000-0000-000000000002",
        &[(&fx.join("win-gpt-fixed.vhdx"), "b.vhdx")],
    );
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    let a = agent.backup("vm-a");
    let b = agent.backup("vm-b");
    let pts = gw.points();
    let pa = pts.iter().find(|p| p["id"] == a["point"]).expect("point a");
    let pb = pts.iter().find(|p| p["id"] == b["point"]).expect("point b");
    for p in [pa, pb] {
        assert!(u(p, "logical_bytes") > 0);
        assert_eq!(p["tiers"], serde_json::json!(["local"]));
        assert!(p["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
    assert_eq!(
        u(pa, "logical_bytes"),
        u(pb, "logical_bytes"),
        "same guest content, same logical bytes"
    );
    let (sa, sb) = (u(pa, "stored_bytes"), u(pb, "stored_bytes"));
    println!(
        "vm-a stored {sa} B, vm-b stored {sb} B of {} logical",
        u(pa, "logical_bytes")
    );
    assert!(sa > 1 << 20, "the first VM must store its data ({sa} B)");
    // Only the VM's own config files differ.
    assert!(
        sb * 10 < sa,
        "second VM stored {sb} B, first {sa} B: expected far fewer"
    );
    assert!(
        u(&b, "bytes_sent") * 10 < u(&a, "bytes_sent"),
        "agent should not resend known chunks"
    );
}

#[test]
fn verify_names_the_damaged_chunk_and_every_point_needing_it() {
    let fx = fixtures();
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    make_vm(
        &host,
        "vm-a",
        "aaaaaaaa-0000-0000-0000-000000000001",
        &[(&fx.join("win-mbr-dynamic.vhdx"), "a.vhdx")],
    );
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);
    let p1 = agent.backup("vm-a")["point"]
        .as_str()
        .expect("p")
        .to_string();
    let p2 = agent.backup("vm-a")["point"]
        .as_str()
        .expect("p")
        .to_string();

    let clean: serde_json::Value =
        serde_json::from_str(&ok(&mut gw.cmd(&["verify", "--json"]))).expect("json");
    assert_eq!(clean["damaged"].as_array().map(|d| d.len()), Some(0));
    assert!(u(&clean, "chunks_checked") > 0);
    assert_eq!(u(&clean, "points_checked"), 2);

    // Flip one byte inside the first chunk record of the first pack.
    let mut packs: Vec<_> = walk(&gw.dir.join("packs"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    packs.sort();
    assert!(!packs.is_empty(), "no packs written");
    let mut bytes = std::fs::read(&packs[0]).expect("read pack");
    bytes[200] ^= 0x01;
    std::fs::write(&packs[0], &bytes).expect("write pack");

    let o = run(&mut gw.cmd(&["verify", "--json"]));
    assert_eq!(o.status.code(), Some(1), "verify must exit 1 on damage");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let damaged = r["damaged"].as_array().expect("damaged");
    assert_eq!(damaged.len(), 1, "exactly the flipped chunk: {r}");
    let mut pts: Vec<_> = damaged[0]["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    pts.sort();
    let mut want = vec![p1.as_str(), p2.as_str()];
    want.sort();
    assert_eq!(pts, want);
    assert_eq!(damaged[0]["chunk"].as_str().map(str::len), Some(64));

    // Human output names it too; a restore needing it fails loudly.
    let o = run(&mut gw.cmd(&["verify", "--point", &p1]));
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("DAMAGED chunk")
            && text.contains(damaged[0]["chunk"].as_str().unwrap_or("?")),
        "{text}"
    );
    let err = fails(
        gw.cmd(&[
            "restore-disk",
            "--point",
            &p1,
            "--disk",
            "0",
            "--format",
            "raw",
            "--out",
        ])
        .arg(t.path().join("x.raw")),
    );
    assert!(
        !t.path().join("x.raw").exists(),
        "a failed restore must not leave a file: {err}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
