//! Acceptance: bad input gets one clear line and a non-zero exit, never a
//! panic: wrong passphrase, bad or missing enrolment token, wrong
//! fingerprint, corrupt VHDX (truncated, bad CRC, bad BAT offset), unknown
//! VM, a second init.

use std::process::Command;

use tierback_e2e::*;

#[test]
fn init_refuses_an_initialised_dir_and_serve_refuses_a_wrong_passphrase() {
    let t = tempfile::tempdir().expect("tmp");
    let pass = t.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").expect("pass");
    let dir = t.path().join("gw");
    let init = |d: &std::path::Path| {
        let mut c = Command::new(bin("tierback-gateway"));
        c.args(["init", "--listen", "127.0.0.1:0", "--passphrase-file"])
            .arg(&pass)
            .arg("--data-dir")
            .arg(d);
        c
    };
    let out = ok(&mut init(&dir));
    assert!(out.contains("RECOVERY KEY"), "{out}");
    let before = std::fs::read(dir.join("keys.json")).expect("keys");
    let err = fails(&mut init(&dir));
    assert!(err.contains("already an initialised"), "{err}");
    assert_eq!(
        std::fs::read(dir.join("keys.json")).expect("keys"),
        before,
        "second init changed the keys"
    );

    let wrong = t.path().join("wrong");
    std::fs::write(&wrong, "Tr0ub4dor&3").expect("wrong");
    let err = fails(
        Command::new(bin("tierback-gateway"))
            .args(["serve", "--data-dir"])
            .arg(&dir)
            .env("TIERBACK_PASSPHRASE_FILE", &wrong),
    );
    assert!(err.contains("wrong passphrase"), "{err}");

    let err = fails(
        Command::new(bin("tierback-gateway"))
            .args(["points", "--data-dir"])
            .arg(t.path().join("nope")),
    );
    assert!(err.contains("init"), "{err}");
}

#[test]
fn enrolment_needs_a_valid_token_and_the_right_fingerprint() {
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    std::fs::create_dir_all(&host).expect("host");
    let enroll = |token: &str, fp: &str, state: &str| {
        let mut c = Command::new(bin("tierback-agent"));
        c.args([
            "enroll",
            "--gateway",
            &gw.url,
            "--token",
            token,
            "--fingerprint",
            fp,
        ])
        .arg("--state-dir")
        .arg(t.path().join(state))
        .arg("--host-root")
        .arg(&host);
        c
    };
    let err = fails(&mut enroll("tbe1.bogus", &gw.fingerprint, "a1"));
    assert!(err.contains("enrolment token"), "{err}");
    assert!(!t.path().join("a1/agent.toml").exists());

    let token = gw.enroll_token();
    let err = fails(&mut enroll(&token, &"ab".repeat(32), "a2"));
    assert!(err.contains("fingerprint"), "{err}");
    // The token was not spent by the refused connection.
    ok(&mut enroll(&token, &gw.fingerprint, "a3"));
    // …and is single-use.
    let err = fails(&mut enroll(&token, &gw.fingerprint, "a4"));
    assert!(err.contains("enrolment token"), "{err}");
}

/// Offset of the BAT from the region table (MS-VHDX 2.2.3), read
/// independently of the reader under test.
fn bat_offset(vhdx: &[u8]) -> usize {
    const BAT: [u8; 16] = [
        0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A,
        0x08,
    ];
    let rt = 192 * 1024;
    assert_eq!(&vhdx[rt..rt + 4], b"regi");
    let count = u32::from_le_bytes(vhdx[rt + 8..rt + 12].try_into().expect("4")) as usize;
    for i in 0..count {
        let e = rt + 16 + i * 32;
        if vhdx[e..e + 16] == BAT {
            return u64::from_le_bytes(vhdx[e + 16..e + 24].try_into().expect("8")) as usize;
        }
    }
    panic!("no BAT region");
}

#[test]
fn corrupt_disks_and_unknown_vms_are_clear_errors() {
    let fx = fixtures();
    let t = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(&t.path().join("gw"));
    let host = t.path().join("host");
    let good = std::fs::read(fx.join("win-mbr-dyn1m.vhdx")).expect("read");

    let truncated = t.path().join("truncated.vhdx");
    std::fs::write(&truncated, &good[..100_000]).expect("w");
    let mut bad_crc = good.clone();
    // Both headers (64 KiB and 128 KiB): flip a byte inside each.
    bad_crc[64 * 1024 + 40] ^= 0xff;
    bad_crc[128 * 1024 + 40] ^= 0xff;
    let bad_crc_p = t.path().join("badcrc.vhdx");
    std::fs::write(&bad_crc_p, &bad_crc).expect("w");
    let mut bad_bat = good.clone();
    let bat = bat_offset(&bad_bat);
    // First payload entry: FULLY_PRESENT at an offset far beyond the file.
    let entry: u64 = (0xF_FFFF << 20) | 6;
    bad_bat[bat..bat + 8].copy_from_slice(&entry.to_le_bytes());
    let bad_bat_p = t.path().join("badbat.vhdx");
    std::fs::write(&bad_bat_p, &bad_bat).expect("w");

    make_vm(
        &host,
        "truncated",
        "00000000-0000-0000-0000-000000000001",
        &[(&truncated, "d.vhdx")],
    );
    make_vm(
        &host,
        "badcrc",
        "00000000-0000-0000-0000-000000000002",
        &[(&bad_crc_p, "d.vhdx")],
    );
    make_vm(
        &host,
        "badbat",
        "00000000-0000-0000-0000-000000000003",
        &[(&bad_bat_p, "d.vhdx")],
    );
    let agent = Agent::enroll(&gw, &t.path().join("agent"), &host);

    let err = fails(&mut agent.cmd(&["backup", "--vm", "truncated"]));
    assert!(err.contains("d.vhdx") && err.contains("truncated"), "{err}");
    let err = fails(&mut agent.cmd(&["backup", "--vm", "badcrc"]));
    assert!(
        err.contains("d.vhdx") && err.to_lowercase().contains("crc"),
        "{err}"
    );
    let err = fails(&mut agent.cmd(&["backup", "--vm", "badbat"]));
    assert!(err.contains("d.vhdx") && err.contains("BAT"), "{err}");
    let err = fails(&mut agent.cmd(&["backup", "--vm", "mail01"]));
    assert!(err.contains("mail01") && err.contains("badbat"), "{err}");

    // None of those left a recovery point behind.
    assert!(gw.points().is_empty());
}
