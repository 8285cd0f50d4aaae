//! Property tests: random bytes and random mutations of valid small images
//! (VHDX by our writer and by qemu-img, a differencing VHDX, a VHDX with a
//! dirty log, a dynamic VHD) never panic the parsers, and whatever opens can
//! be read without panicking. Mutations are structure-aware: they aim at
//! headers, region tables, metadata, BAT, log and VHD structures, and can
//! repair the checksums so the damage reaches the deeper checks.

mod disk_common;

use std::io::Cursor;
use std::sync::OnceLock;

use disk_common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use tierback_agent::disk::{open_image_bytes, VirtualDisk};
use tierback_format::vhdx::layout::*;
use tierback_format::vhdx::log::{LogEntryHeader, LOG_SECTOR};
use tierback_format::vhdx::testkit::{differencing_vhdx, dirty_log_vhdx, vhdx_bytes_from_raw};
use tierback_format::vhdx::{Guid, ParentInfo, VhdxOptions};

struct Seeds {
    ours: Vec<u8>,
    qemu: Vec<u8>,
    child: Vec<u8>,
    dirty: Vec<u8>,
    vhd: Vec<u8>,
}

fn seeds() -> &'static Seeds {
    static S: OnceLock<Seeds> = OnceLock::new();
    S.get_or_init(|| {
        require_tool("qemu-img", "qemu-utils");
        let raw = holey_raw(3, 6 << 20);
        let mut o = VhdxOptions::new(raw.len() as u64);
        o.block_size = 1 << 20;
        let (ours, g) = vhdx_bytes_from_raw(&raw, o.clone()).expect("vhdx");
        let mut co = o.clone();
        co.parent = Some(ParentInfo {
            parent_linkage: g,
            relative_path: "p.vhdx".into(),
            absolute_win32_path: Some(r"\\?\C:\vms\p.vhdx".into()),
            volume_path: Some(r"\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\p.vhdx".into()),
        });
        let writes = vec![
            (4096u64, vec![5u8; 8192]),
            ((2 << 20) + 512, vec![6u8; 512]),
        ];
        let (c, _) = differencing_vhdx(Cursor::new(Vec::new()), co, &writes).expect("child");
        let dirty = dirty_log_vhdx(&raw, 1 << 20, 1).expect("dirty").file;
        let tmp = tempfile::tempdir().expect("tempdir");
        let rp = put(tmp.path(), "r.raw", &raw);
        let conv = |fmt: &str, opts: &str| {
            let out = tmp.path().join("out");
            run(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    fmt,
                    "-o",
                    opts,
                    path_str(&rp),
                    path_str(&out),
                ],
            );
            std::fs::read(&out).expect("converted")
        };
        Seeds {
            ours,
            qemu: conv("vhdx", "subformat=dynamic,block_size=1M"),
            child: c.into_inner(),
            dirty,
            vhd: conv("vpc", "subformat=dynamic,force_size=on"),
        }
    })
}

/// `cases`, or PROPTEST_CASES when set (for long local fuzzing runs).
fn config(cases: u32) -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

/// Reads what an opened disk offers, bounded: ranges, the first and last MiB,
/// a few unaligned reads.
fn exercise(d: &dyn VirtualDisk) {
    let size = d.virtual_size();
    let _ = d.describe();
    let _ = d.data_write_guid();
    let _ = d.leaf_ranges();
    if let Ok(r) = d.allocated_ranges() {
        let mut budget = 16u64 << 20;
        for (o, l) in r {
            let n = l.min(budget).min(4 << 20);
            let mut b = vec![0u8; n as usize];
            let _ = d.read_at(o, &mut b);
            budget -= n;
            if budget == 0 {
                break;
            }
        }
    }
    for (o, l) in [
        (0u64, 1u64 << 20),
        (size.saturating_sub(1 << 20), 1 << 20),
        (size / 3 + 1, 70_001),
        (size.saturating_sub(1), 2),
    ] {
        let l = l.min(size.saturating_sub(o)).min(4 << 20);
        let mut b = vec![0u8; l as usize];
        let _ = d.read_at(o, &mut b);
    }
}

/// Field values that reach edge cases: extremes, powers of two, plausible
/// BAT entries (state bits + small offsets) and huge offsets with any state.
fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        Just(0u64),
        Just(u64::MAX),
        (0u64..8, 0u64..64).prop_map(|(st, mb)| (mb << 20) | st),
        (0u64..8).prop_map(|st| !7u64 | st),
        (0u32..64).prop_map(|k| u64::MAX >> k),
        (0u32..64).prop_map(|k| 1u64 << k),
    ]
}

/// Recomputes every checksum a mutation may have broken.
fn repair_vhdx(v: &mut [u8]) {
    for off in [HEADER1_OFFSET, HEADER2_OFFSET] {
        let o = off as usize;
        if v.len() >= o + HEADER_SIZE {
            store_crc32c(&mut v[o..o + HEADER_SIZE], 4);
        }
    }
    for off in [REGION_TABLE1_OFFSET, REGION_TABLE2_OFFSET] {
        let o = off as usize;
        if v.len() >= o + REGION_TABLE_SIZE {
            store_crc32c(&mut v[o..o + REGION_TABLE_SIZE], 4);
        }
    }
    // Log entries of the 1 MiB log at 1 MiB (both writers put it there).
    let (ls, le) = (1usize << 20, 2usize << 20);
    if v.len() >= le {
        let mut o = ls;
        while o + LOG_SECTOR <= le {
            if let Ok(h) = LogEntryHeader::parse(&v[o..]) {
                let n = h.entry_length as usize;
                if n > 0 && is_aligned(n as u64, LOG_SECTOR as u64) && o + n <= le {
                    store_crc32c(&mut v[o..o + n], 4);
                }
            }
            o += LOG_SECTOR;
        }
    }
}

fn repair_vhd(v: &mut [u8]) {
    let sum = |b: &[u8], f: usize| {
        !b.iter()
            .enumerate()
            .filter(|(i, _)| !(f..f + 4).contains(i))
            .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)))
    };
    let n = v.len();
    for at in [0, n.saturating_sub(512)] {
        if n >= at + 512 {
            let c = sum(&v[at..at + 512], 64);
            v[at + 64..at + 68].copy_from_slice(&c.to_be_bytes());
        }
    }
    if n >= 512 + 1024 {
        let c = sum(&v[512..1536], 36);
        v[512 + 36..512 + 40].copy_from_slice(&c.to_be_bytes());
    }
}

/// Offsets worth hitting in a VHDX: structure fields rather than payload.
fn vhdx_target(v: &[u8], sel: u8, r: u32) -> usize {
    let r = r as usize;
    let meta_bat = |g: Guid| {
        RegionTable::parse(v.get(REGION_TABLE1_OFFSET as usize..).unwrap_or(&[]))
            .ok()
            .and_then(|t| {
                t.entries
                    .iter()
                    .find(|e| e.guid == g)
                    .map(|e| e.file_offset as usize)
            })
            .unwrap_or(2 << 20)
    };
    match sel % 9 {
        0 => HEADER1_OFFSET as usize + r % 80,
        1 => HEADER2_OFFSET as usize + r % 80,
        2 => REGION_TABLE1_OFFSET as usize + r % 80,
        3 => REGION_TABLE2_OFFSET as usize + r % 80,
        4 => meta_bat(METADATA_REGION) + r % (32 + 7 * 32),
        5 => meta_bat(METADATA_REGION) + 65536 + r % 200,
        6 => meta_bat(BAT_REGION) + r % 128,
        7 => (1 << 20) + r % (16 * LOG_SECTOR),
        _ => r % v.len().max(1),
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn random_bytes_never_panic(kind in 0u8..4, body in proptest::collection::vec(any::<u8>(), 0..20_000), big in 0usize..3) {
        let mut v = body;
        match kind {
            0 => {}
            1 => { v.splice(0..0, *b"vhdxfile"); v.resize(v.len().max(big << 20), 0); }
            2 => { v.resize(v.len().max(512), 0); let n = v.len(); v[n - 512..n - 504].copy_from_slice(b"conectix"); }
            _ => { v.resize(v.len().max(1536), 0); v[..8].copy_from_slice(b"conectix"); repair_vhd(&mut v); }
        }
        if let Ok(d) = open_image_bytes("fuzz.vhdx", v) {
            exercise(d.as_ref());
        }
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn mutated_vhdx_never_panics(
        which in 0u8..4,
        muts in proptest::collection::vec((any::<u8>(), any::<u32>(), any::<u8>(), 0u8..5, interesting_u64()), 1..8),
        repair in any::<bool>(),
        cut in proptest::option::weighted(0.1, any::<u32>()),
    ) {
        let s = seeds();
        let mut v = match which { 0 => s.ours.clone(), 1 => s.qemu.clone(), 2 => s.child.clone(), _ => s.dirty.clone() };
        for (sel, r, byte, how, word) in muts {
            let at = vhdx_target(&v, sel, r);
            if at < v.len() {
                match how {
                    0 => v[at] ^= 1 << (byte % 8),
                    1 => v[at] = byte,
                    2 => v[at] = 0xff,
                    3 => v[at] = 0,
                    // A whole field (BAT entry, offset, size) replaced.
                    _ => {
                        let a = at & !7;
                        if a + 8 <= v.len() {
                            v[a..a + 8].copy_from_slice(&word.to_le_bytes());
                        }
                    }
                }
            }
        }
        if repair {
            repair_vhdx(&mut v);
        }
        if let Some(c) = cut {
            v.truncate(c as usize % (v.len() + 1));
        }
        if let Ok(d) = open_image_bytes("mut.vhdx", v) {
            exercise(d.as_ref());
        }
    }

    #[test]
    fn mutated_vhd_never_panics(
        muts in proptest::collection::vec((any::<u32>(), any::<u8>(), 0u8..3, any::<bool>(), interesting_u64().prop_map(|w| w as u32)), 1..6),
        repair in any::<bool>(),
    ) {
        let s = seeds();
        let mut v = s.vhd.clone();
        let n = v.len();
        for (r, byte, area, whole, word) in muts {
            let r = r as usize;
            let at = match area { 0 => n - 512 + r % 512, 1 => 512 + r % 1024, _ => 1536 + r % 4096 };
            if whole {
                // A whole big-endian field (BAT entry, offset, size) replaced.
                let a = at & !3;
                if a + 4 <= n {
                    v[a..a + 4].copy_from_slice(&word.to_be_bytes());
                }
            } else {
                v[at] = byte;
            }
        }
        if repair {
            repair_vhd(&mut v);
        }
        if let Ok(d) = open_image_bytes("mut.vhd", v) {
            exercise(d.as_ref());
        }
    }
}

#[test]
fn seeds_open_cleanly() {
    let s = seeds();
    for (name, v) in [
        ("ours.vhdx", &s.ours),
        ("qemu.vhdx", &s.qemu),
        ("dirty.vhdx", &s.dirty),
        ("d.vhd", &s.vhd),
    ] {
        let d = open_image_bytes(name, v.clone()).unwrap_or_else(|e| panic!("{e}"));
        exercise(d.as_ref());
    }
    let e = open_image_bytes("child.avhdx", s.child.clone())
        .err()
        .expect("child needs its folder");
    assert!(e.is_unsupported(), "{e}");
}
