//! Damaged files give the right one-line DiskError (naming the file), or are
//! tolerated where the spec keeps a second copy. Bases are made by qemu-img.

mod disk_common;

use std::path::PathBuf;
use std::sync::OnceLock;

use disk_common::*;
use tierback_agent::disk::{open_disk, DiskError, VirtualDisk};
use tierback_format::vhdx::layout::*;

struct Base {
    raw: Vec<u8>,
    vhdx: Vec<u8>,
    fixed_vhd: Vec<u8>,
    dynamic_vhd: Vec<u8>,
}

/// An 8 MiB raw with holes, converted by qemu-img to a dynamic VHDX (1 MiB
/// blocks) and to fixed and dynamic VHD.
fn base() -> &'static Base {
    static B: OnceLock<Base> = OnceLock::new();
    B.get_or_init(|| {
        require_tool("qemu-img", "qemu-utils");
        let tmp = tempfile::tempdir().expect("tempdir");
        let raw = holey_raw(77, 8 << 20);
        let rp = put(tmp.path(), "b.raw", &raw);
        let conv = |fmt: &str, opts: &str, name: &str| {
            let out = tmp.path().join(name);
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
            std::fs::read(&out).expect("read converted")
        };
        Base {
            vhdx: conv("vhdx", "subformat=dynamic,block_size=1M", "b.vhdx"),
            fixed_vhd: conv("vpc", "subformat=fixed,force_size=on", "f.vhd"),
            dynamic_vhd: conv("vpc", "subformat=dynamic,force_size=on", "d.vhd"),
            raw,
        }
    })
}

/// Where things are in the qemu-made VHDX (found with the format structures).
struct Map {
    bat: usize,
    meta: usize,
    items: Vec<(tierback_format::vhdx::Guid, usize)>,
}

fn map(v: &[u8]) -> Map {
    let rt = RegionTable::parse(&v[REGION_TABLE1_OFFSET as usize..]).expect("region table");
    let off = |g| {
        rt.entries
            .iter()
            .find(|e| e.guid == g)
            .expect("region")
            .file_offset as usize
    };
    let (bat, meta) = (off(BAT_REGION), off(METADATA_REGION));
    let mt = MetadataTable::parse(&v[meta..]).expect("metadata table");
    Map {
        bat,
        meta,
        items: mt
            .entries
            .iter()
            .map(|e| (e.item_id, meta + e.offset as usize))
            .collect(),
    }
}

fn item(m: &Map, g: tierback_format::vhdx::Guid) -> usize {
    m.items.iter().find(|(id, _)| *id == g).expect("item").1
}

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        Case {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn path(&self, name: &str, bytes: &[u8]) -> PathBuf {
        put(self.dir.path(), name, bytes)
    }
    fn open(&self, name: &str, bytes: &[u8]) -> Result<Box<dyn VirtualDisk>, DiskError> {
        let p = self.path(name, bytes);
        open_disk(&p, self.dir.path())
    }
    fn err(&self, name: &str, bytes: &[u8]) -> DiskError {
        match self.open(name, bytes) {
            Ok(d) => panic!("{name} opened: {}", d.describe()),
            Err(e) => {
                let s = e.to_string();
                assert!(
                    s.contains(name) && !s.contains('\n'),
                    "not one line naming {name}: {s}"
                );
                e
            }
        }
    }
}

fn set_u64(v: &mut [u8], at: usize, x: u64) {
    v[at..at + 8].copy_from_slice(&x.to_le_bytes());
}
fn set_u32(v: &mut [u8], at: usize, x: u32) {
    v[at..at + 4].copy_from_slice(&x.to_le_bytes());
}

/// Index and value of the first FULLY_PRESENT payload entry after `skip` of them.
fn present_entry(v: &[u8], m: &Map, skip: usize) -> (usize, u64) {
    (0..8)
        .map(|i| {
            (
                i,
                u64::from_le_bytes(v[m.bat + 8 * i..m.bat + 8 * i + 8].try_into().expect("8")),
            )
        })
        .filter(|(_, e)| e & 7 == u64::from(PAYLOAD_BLOCK_FULLY_PRESENT))
        .nth(skip)
        .expect("present entry")
}

#[test]
fn truncated_files() {
    let b = base();
    let c = Case::new();
    let e = c.err("t300k.vhdx", &b.vhdx[..300 << 10]);
    assert!(
        matches!(e, DiskError::Truncated { .. }) && e.to_string().contains("1 MiB"),
        "{e}"
    );
    let e = c.err("t0.vhdx", &[]);
    assert!(matches!(e, DiskError::Truncated { .. }), "{e}");
    let e = c.err("t5.vhdx", b"vhdxf");
    assert!(matches!(e, DiskError::Truncated { .. }), "{e}");
    let m = map(&b.vhdx);
    let e = c.err("tmeta.vhdx", &b.vhdx[..m.meta.min(m.bat) + 4096]);
    assert!(matches!(e, DiskError::Truncated { .. }), "{e}");
    // Cut inside the last payload block.
    let e = c.err("tpay.vhdx", &b.vhdx[..b.vhdx.len() - (512 << 10)]);
    assert!(e.to_string().contains("points beyond end of file"), "{e}");
}

#[test]
fn one_bad_header_is_tolerated_two_are_not() {
    let b = base();
    let c = Case::new();
    for (n, off) in [(1, HEADER1_OFFSET), (2, HEADER2_OFFSET)] {
        let mut v = b.vhdx.clone();
        v[off as usize + 40] ^= 0x01;
        let d = c
            .open(&format!("h{n}.vhdx"), &v)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            d.describe()
                .contains(&format!("header {n} CRC-32C mismatch")),
            "{}",
            d.describe()
        );
        assert_matches_bytes(d.as_ref(), &b.raw, "one bad header");
    }
    let mut v = b.vhdx.clone();
    v[HEADER1_OFFSET as usize + 40] ^= 0x01;
    v[HEADER2_OFFSET as usize + 2000] ^= 0x80;
    let e = c.err("h12.vhdx", &v);
    let s = e.to_string();
    assert!(
        e.is_corrupt()
            && s.contains("header 1 CRC-32C mismatch")
            && s.contains("header 2 CRC-32C mismatch"),
        "{s}"
    );
    // Signature damage (with a valid CRC) is a bad header too.
    let mut v = b.vhdx.clone();
    for off in [HEADER1_OFFSET, HEADER2_OFFSET] {
        let o = off as usize;
        v[o] = b'X';
        store_crc32c(&mut v[o..o + HEADER_SIZE], 4);
    }
    assert!(c.err("hsig.vhdx", &v).to_string().contains("bad signature"));
}

fn rewrite_headers(v: &mut [u8], f: impl Fn(&mut Header, usize)) {
    for (k, off) in [HEADER1_OFFSET, HEADER2_OFFSET].into_iter().enumerate() {
        let o = off as usize;
        let mut h = Header::parse(&v[o..]).expect("header");
        f(&mut h, k);
        v[o..o + HEADER_SIZE].copy_from_slice(&h.encode());
    }
}

#[test]
fn header_fields() {
    let b = base();
    let c = Case::new();
    let mut v = b.vhdx.clone();
    rewrite_headers(&mut v, |h, _| h.version = 2);
    assert!(c.err("ver.vhdx", &v).is_unsupported());
    let mut v = b.vhdx.clone();
    rewrite_headers(&mut v, |h, k| {
        h.sequence_number = 5;
        h.log_length = if k == 0 { 1 << 20 } else { 2 << 20 };
    });
    assert!(c
        .err("seq.vhdx", &v)
        .to_string()
        .contains("same sequence number"));
    // The newer header wins: make header 1 newer and point it at a bogus log.
    let mut v = b.vhdx.clone();
    rewrite_headers(&mut v, |h, k| {
        h.sequence_number = 10 - k as u64;
        if k == 0 {
            h.log_offset = 4096;
        }
    });
    assert!(c.err("newer.vhdx", &v).to_string().contains("log at 4096"));
}

#[test]
fn region_table_damage() {
    let b = base();
    let c = Case::new();
    let mut v = b.vhdx.clone();
    v[REGION_TABLE1_OFFSET as usize + 100] ^= 0x10;
    let d = c.open("rt1.vhdx", &v).unwrap_or_else(|e| panic!("{e}"));
    assert_matches_bytes(d.as_ref(), &b.raw, "region table 1 damaged");
    v[REGION_TABLE2_OFFSET as usize + 9000] ^= 0x10;
    let e = c.err("rt12.vhdx", &v);
    assert!(
        e.to_string()
            .contains("region table CRC-32C mismatch (both copies)"),
        "{e}"
    );
    // A required region nobody knows.
    let mut v = b.vhdx.clone();
    for off in [REGION_TABLE1_OFFSET, REGION_TABLE2_OFFSET] {
        let o = off as usize;
        let mut rt = RegionTable::parse(&v[o..]).expect("rt");
        rt.entries.push(RegionTableEntry {
            guid: tierback_format::vhdx::Guid::random(),
            file_offset: 64 << 20,
            length: 1 << 20,
            required: true,
        });
        v[o..o + REGION_TABLE_SIZE].copy_from_slice(&rt.encode());
    }
    assert!(c.err("rtreq.vhdx", &v).is_unsupported());
    // The metadata region moved onto the BAT.
    let mut v = b.vhdx.clone();
    let m = map(&v);
    for off in [REGION_TABLE1_OFFSET, REGION_TABLE2_OFFSET] {
        let o = off as usize;
        let mut rt = RegionTable::parse(&v[o..]).expect("rt");
        for e in &mut rt.entries {
            if e.guid == METADATA_REGION {
                e.file_offset = m.bat as u64;
            }
        }
        v[o..o + REGION_TABLE_SIZE].copy_from_slice(&rt.encode());
    }
    assert!(c.err("rtov.vhdx", &v).to_string().contains("overlaps"));
}

#[test]
fn bat_damage() {
    let b = base();
    let c = Case::new();
    let m = map(&b.vhdx);
    let (i, e) = present_entry(&b.vhdx, &m, 0);
    let (j, _) = present_entry(&b.vhdx, &m, 1);
    let cases: Vec<(&str, usize, u64, &str)> = vec![
        (
            "beyond.vhdx",
            i,
            (100u64 << 30) | 6,
            "points beyond end of file",
        ),
        ("header.vhdx", i, 6, "points into the header section"),
        (
            "meta.vhdx",
            i,
            m.meta as u64 | 6,
            "overlaps the metadata region",
        ),
        ("dup.vhdx", j, e, "overlap"),
        ("state4.vhdx", i, e & !7 | 4, "reserved state 4"),
        (
            "partial.vhdx",
            i,
            e & !7 | 7,
            "PARTIALLY_PRESENT in a disk without parent",
        ),
    ];
    for (name, idx, val, msg) in cases {
        let mut v = b.vhdx.clone();
        set_u64(&mut v, m.bat + 8 * idx, val);
        let err = c.err(name, &v);
        assert!(
            err.is_corrupt() && err.to_string().contains(msg),
            "{name}: {err}"
        );
    }
    let mut v = b.vhdx.clone();
    set_u64(&mut v, m.bat + 8 * i, (100u64 << 30) | 6);
    assert!(c
        .err("msg.vhdx", &v)
        .to_string()
        .contains(&format!("BAT entry {i} points beyond end of file")));
    // ZERO / UNMAPPED / UNDEFINED blocks read as zeros.
    let mut v = b.vhdx.clone();
    let mut want = b.raw.clone();
    for (k, state) in [
        (0usize, PAYLOAD_BLOCK_ZERO),
        (1, PAYLOAD_BLOCK_UNMAPPED),
        (2, PAYLOAD_BLOCK_UNDEFINED),
    ] {
        let (idx, e) = present_entry(&b.vhdx, &m, k);
        set_u64(&mut v, m.bat + 8 * idx, e & !7 | u64::from(state));
        want[idx << 20..(idx + 1) << 20].fill(0);
    }
    let d = c.open("states.vhdx", &v).unwrap_or_else(|e| panic!("{e}"));
    assert_matches_bytes(d.as_ref(), &want, "zero states");
}

#[test]
fn metadata_damage() {
    let b = base();
    let c = Case::new();
    let m = map(&b.vhdx);
    let fp = item(&m, FILE_PARAMETERS_ITEM);
    let vs = item(&m, VIRTUAL_DISK_SIZE_ITEM);
    let ls = item(&m, LOGICAL_SECTOR_SIZE_ITEM);
    let ps = item(&m, PHYSICAL_SECTOR_SIZE_ITEM);
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let edits: Vec<(&str, Edit, &str)> = vec![
        (
            "bs.vhdx",
            Box::new(move |v| set_u32(v, fp, 3 << 20)),
            "block size",
        ),
        (
            "bs0.vhdx",
            Box::new(move |v| set_u32(v, fp, 0)),
            "block size",
        ),
        (
            "vs0.vhdx",
            Box::new(move |v| set_u64(v, vs, 0)),
            "virtual disk size",
        ),
        (
            "vsodd.vhdx",
            Box::new(move |v| set_u64(v, vs, (8 << 20) + 100)),
            "not a multiple",
        ),
        (
            "vshuge.vhdx",
            Box::new(move |v| set_u64(v, vs, u64::MAX)),
            "virtual disk size",
        ),
        (
            "ls.vhdx",
            Box::new(move |v| set_u32(v, ls, 1024)),
            "logical sector size",
        ),
        (
            "ps.vhdx",
            Box::new(move |v| set_u32(v, ps, 1000)),
            "physical sector size",
        ),
        (
            "sig.vhdx",
            Box::new(move |v| v[m.meta] = b'X'),
            "metadata table bad signature",
        ),
        (
            "parent.vhdx",
            Box::new(move |v| set_u32(v, fp + 4, 2)),
            "without a parent locator",
        ),
        // Virtual size grown past what the BAT region holds.
        (
            "vsbig.vhdx",
            Box::new(move |v| set_u64(v, vs, 1 << 40)),
            "too small",
        ),
    ];
    for (name, f, msg) in edits {
        let mut v = b.vhdx.clone();
        f(&mut v);
        let e = c.err(name, &v);
        assert!(e.to_string().contains(msg), "{name}: {e}");
    }
    // An item pointing outside the region, an unknown required item, a missing item.
    let entry = |v: &[u8], g| {
        (0..v[m.meta + 10] as usize)
            .map(|k| m.meta + 32 + 32 * k)
            .find(|&at| v[at..at + 16] == tierback_format::vhdx::Guid::to_bytes(g))
            .expect("entry")
    };
    let mut v = b.vhdx.clone();
    let at = entry(&v, VIRTUAL_DISK_SIZE_ITEM);
    set_u32(&mut v, at + 16, 2 << 20);
    assert!(c
        .err("off.vhdx", &v)
        .to_string()
        .contains("outside the metadata region"));
    let mut v = b.vhdx.clone();
    let at = entry(&v, PAGE83_ITEM);
    v[at] ^= 0xff;
    assert!(c.err("unk.vhdx", &v).is_unsupported());
    let mut v = b.vhdx.clone();
    let at = entry(&v, PAGE83_ITEM);
    v[at] ^= 0xff;
    v[at + 24] &= !4; // not required any more: ignored, but the real item is now missing
    assert!(c
        .err("miss.vhdx", &v)
        .to_string()
        .contains("virtual disk id is missing"));
}

#[test]
fn vhd_damage() {
    let b = base();
    let c = Case::new();
    let d = c
        .open("f.vhd", &b.fixed_vhd)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_matches_bytes(d.as_ref(), &b.raw, "fixed vhd");
    let mut v = b.fixed_vhd.clone();
    let n = v.len();
    v[n - 512 + 50] ^= 1;
    assert!(c
        .err("fbad.vhd", &v)
        .to_string()
        .contains("footer checksum mismatch"));
    assert!(c
        .err("ftrunc.vhd", &b.fixed_vhd[..b.fixed_vhd.len() - 1000])
        .to_string()
        .contains("footer"));
    // Dynamic: a damaged end footer falls back to the copy at offset 0.
    let mut v = b.dynamic_vhd.clone();
    let n = v.len();
    v[n - 512 + 50] ^= 1;
    let d = c.open("dcopy.vhd", &v).unwrap_or_else(|e| panic!("{e}"));
    assert!(d.describe().contains("using the copy"), "{}", d.describe());
    assert_matches_bytes(d.as_ref(), &b.raw, "dynamic vhd via footer copy");
    // Dynamic header checksum, BAT entry beyond the end, differencing type.
    let doff = u64::from_be_bytes(b.dynamic_vhd[16..24].try_into().expect("8")) as usize;
    let mut v = b.dynamic_vhd.clone();
    v[doff + 100] ^= 1;
    assert!(c
        .err("dh.vhd", &v)
        .to_string()
        .contains("dynamic header checksum mismatch"));
    let table =
        u64::from_be_bytes(b.dynamic_vhd[doff + 16..doff + 24].try_into().expect("8")) as usize;
    let mut v = b.dynamic_vhd.clone();
    v[table..table + 4].copy_from_slice(&0x0fff_0000u32.to_be_bytes());
    assert!(c
        .err("dbat.vhd", &v)
        .to_string()
        .contains("BAT entry 0 points beyond end of file"));
    let mut v = b.dynamic_vhd.clone();
    let n = v.len();
    for at in [0, n - 512] {
        v[at + 63] = 4;
        let sum = v[at..at + 512]
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
        v[at + 64..at + 68].copy_from_slice(&(!sum).to_be_bytes());
    }
    assert!(c.err("diff.vhd", &v).is_unsupported());
    // A dynamic VHD whose bitmap clears a sector reads zeros there.
    let mut v = b.dynamic_vhd.clone();
    let s0 = u32::from_be_bytes(v[table..table + 4].try_into().expect("4"));
    assert_ne!(s0, u32::MAX, "block 0 is allocated in the fixture");
    v[s0 as usize * 512] &= 0x7f; // sector 0
    let mut want = b.raw.clone();
    want[..512].fill(0);
    let d = c.open("bitmap.vhd", &v).unwrap_or_else(|e| panic!("{e}"));
    assert_matches_bytes(d.as_ref(), &want, "vhd bitmap");
}

#[test]
fn not_disks_and_bad_reads() {
    let b = base();
    let c = Case::new();
    assert!(c.err("notes.txt", b"hello").is_unsupported());
    assert!(c
        .err("junk.vhdx", &[7u8; 4 << 20])
        .to_string()
        .contains("vhdxfile"));
    assert!(c
        .err("junk.vhd", &[7u8; 4096])
        .to_string()
        .contains("conectix"));
    let missing = c.dir.path().join("missing.vhdx");
    let e = open_disk(&missing, c.dir.path())
        .err()
        .expect("missing file");
    assert!(
        matches!(e, DiskError::Io { .. }) && e.to_string().contains("missing.vhdx"),
        "{e}"
    );
    // Raw images by extension.
    let d = c.open("disk.img", &b.raw).unwrap_or_else(|e| panic!("{e}"));
    assert_matches_bytes(d.as_ref(), &b.raw, "raw");
    assert_eq!(d.data_write_guid(), None);
    let d = c.open("ok.vhdx", &b.vhdx).unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 4096];
    let e = d
        .read_at((8 << 20) - 4095, &mut buf)
        .expect_err("out of range");
    assert!(
        matches!(e, DiskError::OutOfRange { .. }) && e.to_string().contains("ok.vhdx"),
        "{e}"
    );
    d.read_at((8 << 20) - 4096, &mut buf)
        .unwrap_or_else(|e| panic!("{e}"));
}
