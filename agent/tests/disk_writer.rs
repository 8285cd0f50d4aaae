//! The VHDX writer against qemu-img (`check` and `compare` with the raw) on
//! small purpose-built images, and its argument checks.

mod disk_common;

use std::fs::File;
use std::io::{BufWriter, Cursor};

use disk_common::*;
use tierback_agent::disk::open_disk;
use tierback_format::vhdx::testkit::pattern;
use tierback_format::vhdx::{Guid, VhdxError, VhdxOptions, VhdxWriter};

#[test]
fn odd_sizes_block_sizes_and_write_orders_pass_qemu() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().expect("tempdir");
    // (virtual size, block size, logical, physical, write order)
    let cases: &[(usize, u32, u32, u32, &str)] = &[
        ((37 << 20) + 3 * 512, 1 << 20, 512, 4096, "forward"),
        (20 << 20, 2 << 20, 512, 512, "backward"),
        ((9 << 20) + 512, 8 << 20, 512, 4096, "scattered"),
        (40 << 20, 32 << 20, 512, 4096, "overwrite"),
        (3 << 20, 256 << 20, 512, 4096, "forward"),
    ];
    for (i, &(size, block, lss, pss, order)) in cases.iter().enumerate() {
        let raw = holey_raw(i as u64 + 10, size);
        let raw_path = put(tmp.path(), &format!("case{i}.raw"), &raw);
        let out = tmp.path().join(format!("case{i}.vhdx"));
        let mut opts = VhdxOptions::new(size as u64);
        (
            opts.block_size,
            opts.logical_sector_size,
            opts.physical_sector_size,
        ) = (block, lss, pss);
        let mut w = VhdxWriter::create(BufWriter::new(File::create(&out).expect("create")), opts)
            .expect("writer");
        let piece = 3 * 65536 + 512;
        let mut pieces: Vec<(usize, &[u8])> = raw
            .chunks(piece)
            .enumerate()
            .map(|(k, c)| (k * piece, c))
            .collect();
        match order {
            "backward" => pieces.reverse(),
            "scattered" => pieces.sort_by_key(|(o, _)| (o * 7919) % 1031),
            "overwrite" => {
                // Garbage first everywhere, then the real data over it.
                for (o, c) in &pieces {
                    w.write_at(*o as u64, &pattern(99, c.len())).expect("write");
                }
            }
            _ => {}
        }
        for (o, c) in pieces {
            w.write_at(o as u64, c).expect("write");
        }
        w.finish().expect("finish");
        qemu_check("vhdx", &out);
        qemu_compare(&raw_path, "vhdx", &out);
        let info = run("qemu-img", &["info", "--output=json", path_str(&out)]);
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "{info}"
        );
        let disk = open_disk(&out, tmp.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_matches_bytes(disk.as_ref(), &raw, &format!("case {i}"));
    }
}

#[test]
fn all_zero_disk_stays_empty() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("zero.vhdx");
    let mut w = VhdxWriter::create(
        File::create(&out).expect("create"),
        VhdxOptions::new(64 << 20),
    )
    .expect("writer");
    w.write_at(0, &vec![0u8; 64 << 20]).expect("write");
    w.finish().expect("finish");
    qemu_check("vhdx", &out);
    let len = std::fs::metadata(&out).expect("meta").len();
    assert!(len <= 4 << 20, "all-zero VHDX is {len} bytes");
    let disk = open_disk(&out, tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(disk.allocated_ranges().expect("ranges"), vec![]);
}

#[test]
fn guids_can_be_set_and_are_written() {
    let g = Guid::random();
    let mut w =
        VhdxWriter::create(Cursor::new(Vec::new()), VhdxOptions::new(4 << 20)).expect("writer");
    assert_ne!(w.data_write_guid(), Guid::ZERO);
    w.set_data_write_guid(g);
    assert_eq!(w.data_write_guid(), g);
    let bytes = w.finish().expect("finish").into_inner();
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = put(tmp.path(), "g.vhdx", &bytes);
    assert_eq!(vhdx_data_write_guid(&p), g);
    let disk = open_disk(&p, tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(disk.data_write_guid(), Some(g.to_bytes()));
}

#[test]
fn writer_rejects_bad_options_and_writes() {
    let bad = |f: fn(&mut VhdxOptions)| {
        let mut o = VhdxOptions::new(8 << 20);
        f(&mut o);
        matches!(
            VhdxWriter::create(Cursor::new(Vec::new()), o),
            Err(VhdxError::InvalidOptions(_))
        )
    };
    assert!(bad(|o| o.block_size = 3 << 20));
    assert!(bad(|o| o.block_size = 512 << 10));
    assert!(bad(|o| o.block_size = 512 << 20));
    assert!(bad(|o| o.logical_sector_size = 1024));
    assert!(bad(|o| o.physical_sector_size = 2048));
    assert!(bad(|o| o.virtual_size = 0));
    assert!(bad(|o| o.virtual_size = (8 << 20) + 1));
    assert!(bad(|o| o.virtual_size = (64 << 40) + 4096));
    let mut w =
        VhdxWriter::create(Cursor::new(Vec::new()), VhdxOptions::new(8 << 20)).expect("writer");
    assert!(matches!(
        w.write_at(1, &[0u8; 512]),
        Err(VhdxError::Unaligned { .. })
    ));
    assert!(matches!(
        w.write_at(0, &[0u8; 100]),
        Err(VhdxError::Unaligned { .. })
    ));
    assert!(matches!(
        w.write_at(8 << 20, &[0u8; 512]),
        Err(VhdxError::OutOfRange { .. })
    ));
    assert!(matches!(
        w.write_at(u64::MAX - 511, &[0u8; 512]),
        Err(VhdxError::OutOfRange { .. })
    ));
    let mut o = VhdxOptions::new(8 << 20);
    o.logical_sector_size = 4096;
    let mut w = VhdxWriter::create(Cursor::new(Vec::new()), o).expect("writer");
    assert!(matches!(
        w.write_at(512, &[1u8; 4096]),
        Err(VhdxError::Unaligned { .. })
    ));
}
