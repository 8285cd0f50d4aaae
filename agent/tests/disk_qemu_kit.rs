//! The reader against images made by qemu-img (the independent implementation)
//! from the realistic disks of tests/fixtures/make-test-disks.sh, and the
//! writer against `qemu-img check` / `qemu-img compare` on the same raws.

mod disk_common;

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use disk_common::*;
use tierback_agent::disk::open_disk;
use tierback_format::vhdx::testkit::vhdx_from_reader;
use tierback_format::vhdx::{VhdxOptions, VhdxWriter};

const FORMATS: &[(&str, &str)] = &[
    ("dynamic.vhdx", "dynamic VHDX, 32 MiB blocks, 512 B sectors"),
    ("dyn1m.vhdx", "dynamic VHDX, 1 MiB blocks, 512 B sectors"),
    ("fixed.vhdx", "fixed VHDX, "),
    ("dynamic.vhd", "dynamic VHD, 2 MiB blocks"),
    ("fixed.vhd", "fixed VHD"),
];

fn check_disk(name: &str) {
    let kit = kit();
    let raw = kit.join(format!("{name}.raw"));
    for (suffix, desc) in FORMATS {
        let file = kit.join(format!("{name}-{suffix}"));
        let disk = open_disk(&file, kit).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            disk.describe().contains(desc),
            "{}: {}",
            file.display(),
            disk.describe()
        );
        assert_eq!(disk.logical_sector_size(), 512);
        assert_eq!(disk.data_write_guid().is_some(), suffix.ends_with("vhdx"));
        assert_matches_raw(disk.as_ref(), &raw, &file.display().to_string());
    }
}

#[test]
fn win_gpt_qemu_images_read_like_the_raw() {
    check_disk("win-gpt");
}

#[test]
fn win_mbr_qemu_images_read_like_the_raw() {
    check_disk("win-mbr");
}

#[test]
fn linux_gpt_qemu_images_read_like_the_raw() {
    check_disk("linux-gpt");
}

#[test]
fn dynamic_images_report_sparse_ranges() {
    let kit = kit();
    for suffix in ["dynamic.vhdx", "dyn1m.vhdx", "dynamic.vhd"] {
        let f = kit.join(format!("linux-gpt-{suffix}"));
        let d = open_disk(&f, kit).unwrap_or_else(|e| panic!("{e}"));
        let allocated: u64 = d
            .allocated_ranges()
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|r| r.1)
            .sum();
        // xfs spreads metadata over its allocation groups: 32 MiB blocks catch
        // much of it, 1 MiB / 2 MiB blocks far less.
        let limit = if suffix == "dynamic.vhdx" {
            d.virtual_size() * 3 / 4
        } else {
            d.virtual_size() / 4
        };
        assert!(
            allocated < limit,
            "{suffix}: {allocated} of {} allocated",
            d.virtual_size()
        );
    }
}

#[test]
fn concurrent_unaligned_reads_match_the_raw() {
    let kit = kit();
    let raw = File::open(kit.join("win-gpt.raw")).expect("raw");
    for suffix in ["dyn1m.vhdx", "dynamic.vhd", "fixed.vhdx"] {
        let disk = open_disk(&kit.join(format!("win-gpt-{suffix}")), kit)
            .unwrap_or_else(|e| panic!("{e}"));
        let size = disk.virtual_size();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (disk, raw) = (&disk, &raw);
                s.spawn(move || {
                    let mut x = 0x1234_5678_9abc_def1u64 ^ (t << 40);
                    for _ in 0..300 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let len = (x % (3 << 20)) as usize + 1;
                        let off = (x >> 20) % (size - len as u64);
                        let mut got = vec![0u8; len];
                        disk.read_at(off, &mut got)
                            .unwrap_or_else(|e| panic!("{e}"));
                        assert!(
                            got == read_file_at(raw, off, len),
                            "{suffix}: {len} bytes at {off}"
                        );
                    }
                });
            }
        });
        let mut b = [0u8; 2];
        assert!(
            disk.read_at(size - 1, &mut b).is_err(),
            "read past the end must fail"
        );
        assert!(disk.read_at(u64::MAX, &mut b).is_err());
    }
}

fn write_vhdx(raw: &Path, out: &Path, opts: VhdxOptions) {
    let data = std::fs::read(raw).expect("raw");
    let w = BufWriter::new(File::create(out).expect("create"));
    let mut writer = VhdxWriter::create(w, opts).expect("create writer");
    // Odd piece size: writes cross block boundaries.
    for (i, piece) in data.chunks(3 << 19).enumerate() {
        writer.write_at(i as u64 * (3 << 19), piece).expect("write");
    }
    writer.finish().expect("finish");
}

#[test]
fn writer_output_passes_qemu_check_and_compare() {
    let kit = kit();
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, block, phys) in [
        ("linux-gpt", 32u32 << 20, 4096u32),
        ("win-gpt", 1 << 20, 512),
        ("win-mbr", 256 << 20, 4096),
    ] {
        let raw = kit.join(format!("{name}.raw"));
        let out = tmp.path().join(format!("{name}-tierback.vhdx"));
        let mut opts = VhdxOptions::new(std::fs::metadata(&raw).expect("raw").len());
        opts.block_size = block;
        opts.physical_sector_size = phys;
        if name == "win-mbr" {
            // The test kit's streaming converter.
            let f = File::create(&out).expect("create");
            let r = File::open(&raw).expect("raw");
            vhdx_from_reader(BufWriter::new(f), r, opts).expect("convert");
        } else {
            write_vhdx(&raw, &out, opts);
        }
        qemu_check("vhdx", &out);
        qemu_compare(&raw, "vhdx", &out);
        let disk = open_disk(&out, tmp.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(disk.physical_sector_size(), phys);
        assert_matches_raw(disk.as_ref(), &raw, &out.display().to_string());
        // Sparse: the ext4/xfs disk is mostly empty.
        if name == "linux-gpt" {
            let len = std::fs::metadata(&out).expect("out").len();
            assert!(
                len < 300 << 20,
                "writer output of {len} bytes is not sparse"
            );
        }
    }
}

#[test]
fn source_files_unchanged_by_open_and_full_read() {
    let kit = kit();
    for suffix in ["dynamic.vhdx", "fixed.vhd", "dynamic.vhd"] {
        let f = kit.join(format!("win-mbr-{suffix}"));
        let before = fingerprint(&f);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let disk = open_disk(&f, kit).unwrap_or_else(|e| panic!("{e}"));
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < disk.virtual_size() {
            let n = (disk.virtual_size() - off).min(buf.len() as u64) as usize;
            disk.read_at(off, &mut buf[..n])
                .unwrap_or_else(|e| panic!("{e}"));
            off += n as u64;
        }
        disk.allocated_ranges().unwrap_or_else(|e| panic!("{e}"));
        drop(disk);
        assert_eq!(fingerprint(&f), before, "{} changed", f.display());
    }
}
