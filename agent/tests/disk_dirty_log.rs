//! A VHDX left with a dirty log (a simulated Hyper-V crash: BAT updates only
//! in the log): replayed in memory it must read like the independently
//! computed expectation AND like the copy qemu-img repairs (`check -r all`,
//! then `convert -O raw`), and the source file must stay byte-for-byte and
//! mtime unchanged.

mod disk_common;

use std::sync::OnceLock;

use disk_common::*;
use tierback_agent::disk::{open_disk, DiskError, VirtualDisk};
use tierback_format::vhdx::testkit::{dirty_log_vhdx, pattern, DirtyLogFixture};

/// 520 blocks of 1 MiB: the BAT spans two 4 KiB pages, so the fixture also
/// carries a zero descriptor. Data in a few blocks on both pages.
fn fixture() -> &'static DirtyLogFixture {
    static F: OnceLock<DirtyLogFixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut raw = vec![0u8; 520 << 20];
        for (i, b) in [0usize, 1, 2, 10, 300, 513, 515].into_iter().enumerate() {
            let r = b << 20..(b + 1) << 20;
            raw[r].copy_from_slice(&pattern(i as u64 + 100, 1 << 20));
        }
        let f = dirty_log_vhdx(&raw, 1 << 20, 42).expect("fixture");
        assert!(f.has_zero_descriptor);
        assert_eq!(f.entries, 3);
        assert!(
            f.expected_raw != raw,
            "the log must change what the disk reads"
        );
        f
    })
}

const STEP: usize = 8 << 20;

/// Reads the disk in steps, handing each (offset, bytes) to `f`.
fn each_chunk(d: &dyn VirtualDisk, mut f: impl FnMut(usize, &[u8])) {
    let mut buf = vec![0u8; STEP];
    let size = d.virtual_size() as usize;
    let mut off = 0;
    while off < size {
        let n = STEP.min(size - off);
        d.read_at(off as u64, &mut buf[..n])
            .unwrap_or_else(|e| panic!("{e}"));
        f(off, &buf[..n]);
        off += n;
    }
}

#[test]
fn dirty_log_is_replayed_in_memory_like_qemu_repairs_it() {
    require_tool("qemu-img", "qemu-utils");
    let f = fixture();
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = put(tmp.path(), "dirty.vhdx", &f.file);
    let before = fingerprint(&src);
    std::thread::sleep(std::time::Duration::from_millis(20));

    // qemu refuses to open it read-only: the file really is dirty.
    let (ok, msg) = try_run("qemu-img", &["info", "-f", "vhdx", path_str(&src)]);
    assert!(
        !ok && msg.contains("replay"),
        "qemu-img info on a dirty file: {msg}"
    );

    let disk = open_disk(&src, tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        disk.describe()
            .contains("dirty log replayed in memory (3 entries)"),
        "{}",
        disk.describe()
    );
    assert_eq!(disk.virtual_size(), f.expected_raw.len() as u64);

    // Oracle: qemu replays the log of a copy, then converts it to raw.
    let copy = tmp.path().join("copy.vhdx");
    std::fs::copy(&src, &copy).expect("copy");
    let (_, out) = try_run(
        "qemu-img",
        &["check", "-r", "all", "-f", "vhdx", path_str(&copy)],
    );
    let repaired = tmp.path().join("repaired.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            path_str(&copy),
            path_str(&repaired),
        ],
    );
    let qemu = std::fs::File::open(&repaired).expect("repaired raw");
    assert_eq!(
        qemu.metadata().expect("meta").len(),
        f.expected_raw.len() as u64
    );

    each_chunk(disk.as_ref(), |off, got| {
        assert!(
            got == &f.expected_raw[off..off + got.len()],
            "replayed content differs from the expected bytes near {off}"
        );
        assert!(
            got == read_file_at(&qemu, off as u64, got.len()),
            "qemu's replay differs from ours near {off} (check said: {out})"
        );
    });
    // Everything outside allocated_ranges is zero.
    let ranges = disk.allocated_ranges().unwrap_or_else(|e| panic!("{e}"));
    check_ranges_shape(&ranges, disk.virtual_size(), "dirty log");
    let mut pos = 0usize;
    for (o, l) in ranges
        .iter()
        .copied()
        .chain([(f.expected_raw.len() as u64, 0)])
    {
        assert!(
            is_zero(&f.expected_raw[pos..o as usize]),
            "data outside allocated ranges before {o}"
        );
        pos = (o + l) as usize;
    }
    drop(disk);
    assert_eq!(
        fingerprint(&src),
        before,
        "the dirty source file was modified"
    );
}

#[test]
fn dirty_log_failures() {
    let f = fixture();
    let tmp = tempfile::tempdir().expect("tempdir");
    let open = |name: &str, bytes: &[u8]| -> DiskError {
        let p = put(tmp.path(), name, bytes);
        match open_disk(&p, tmp.path()) {
            Ok(d) => panic!("{name} opened: {}", d.describe()),
            Err(e) => e,
        }
    };
    // The log lost its entries but the header still says dirty.
    let mut b = f.file.clone();
    b[1 << 20..2 << 20].fill(0);
    let e = open("empty-log.vhdx", &b);
    assert!(
        e.to_string().contains("holds no valid entry sequence"),
        "{e}"
    );
    // The file is shorter than the log's FlushedFileOffset.
    let e = open("short.vhdx", &f.file[..(4 << 20) + 4096]);
    assert!(matches!(e, DiskError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("FlushedFileOffset"), "{e}");
}

#[test]
fn torn_last_entry_replays_the_valid_prefix_only() {
    let f = fixture();
    let tmp = tempfile::tempdir().expect("tempdir");
    // Entry 3 (the zero descriptor, last in the log) torn: its CRC fails, so
    // entries 1 and 2 form the active sequence and page 1 of the BAT survives.
    let mut b = f.file.clone();
    let log = &mut b[1 << 20..2 << 20];
    let third = (0..log.len())
        .step_by(4096)
        .filter(|&o| &log[o..o + 4] == b"loge")
        .nth(3)
        .expect("stale entry + 3 entries");
    log[third + 200] ^= 0xff;
    let p = put(tmp.path(), "torn.vhdx", &b);
    let d = open_disk(&p, tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(d.describe().contains("(2 entries)"), "{}", d.describe());
    each_chunk(d.as_ref(), |off, got| {
        if off < 512 << 20 {
            // BAT page 0 changes (entries 1 and 2) are there.
            assert!(got == &f.expected_raw[off..off + got.len()], "near {off}");
        } else {
            // Blocks 513 and 515 (BAT page 1) keep their pre-crash data.
            for blk in [513usize, 515] {
                let at = (blk << 20) - off;
                assert!(!is_zero(&got[at..at + 4096]), "block {blk}");
                assert!(is_zero(&f.expected_raw[blk << 20..(blk << 20) + 4096]));
            }
        }
    });
}
