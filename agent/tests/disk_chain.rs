//! Differencing chains (AVHDX) and 4 KiB-sector VHDX, which qemu cannot
//! make or read: ground truth is the raw image overlaid with the writes each
//! child received, computed without any reader. Also every parent-resolution
//! failure: missing parent, linkage mismatch, escaping paths, loops.

mod disk_common;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use disk_common::*;
use tierback_agent::disk::{open_disk, DiskError};
use tierback_format::vhdx::testkit::{
    apply_writes, avhdx_chain, differencing_vhdx, partial_block_writes, vhdx_bytes_from_raw,
};
use tierback_format::vhdx::{Guid, ParentInfo, VhdxOptions, VhdxWriter};

const VHD_DIR: &str = "Virtual Hard Disks";

fn child_opts(size: u64, block: u32, lss: u32, parent: Guid, rel: &str) -> VhdxOptions {
    let mut o = VhdxOptions::new(size);
    o.block_size = block;
    o.logical_sector_size = lss;
    o.parent = Some(ParentInfo {
        parent_linkage: parent,
        relative_path: rel.to_string(),
        absolute_win32_path: None,
        volume_path: None,
    });
    o
}

fn child_bytes(opts: VhdxOptions, writes: &[(u64, Vec<u8>)]) -> (Vec<u8>, Guid) {
    let (c, g) = differencing_vhdx(Cursor::new(Vec::new()), opts, writes).expect("child");
    (c.into_inner(), g)
}

fn err_of(path: &Path, vm: &Path) -> DiskError {
    match open_disk(path, vm) {
        Ok(d) => panic!("{} opened as {}", path.display(), d.describe()),
        Err(e) => e,
    }
}

/// Base made by qemu-img (independent), two children made by our writer with
/// partial-block writes; every level reads back raw + its writes.
#[test]
fn avhdx_two_level_chain_on_a_qemu_base() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = tmp.path().join("web01");
    let size = 24usize << 20;
    let block = 1u32 << 20;
    let raw = holey_raw(1, size);
    let raw_path = put(tmp.path(), "base.raw", &raw);
    let base = vm.join(VHD_DIR).join("web01-os.vhdx");
    std::fs::create_dir_all(base.parent().expect("dir")).expect("mkdir");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=1M",
            path_str(&raw_path),
            path_str(&base),
        ],
    );
    let base_guid = vhdx_data_write_guid(&base);

    let w1 = partial_block_writes(11, size as u64, block, 512);
    let (c1, g1) = child_bytes(
        child_opts(size as u64, block, 512, base_guid, "web01-os.vhdx"),
        &w1,
    );
    let p1 = put(&vm, &format!("{VHD_DIR}/web01-os_A1.avhdx"), &c1);
    let w2 = partial_block_writes(22, size as u64, block, 512);
    // The second child names its parent with a "./" prefix and forward slashes.
    let (c2, _) = child_bytes(
        child_opts(size as u64, block, 512, g1, "./web01-os_A1.avhdx"),
        &w2,
    );
    let p2 = put(&vm, &format!("{VHD_DIR}/web01-os_B2.avhdx"), &c2);

    let mut e1 = raw.clone();
    apply_writes(&mut e1, &w1);
    let mut e2 = e1.clone();
    apply_writes(&mut e2, &w2);
    assert_ne!(e1, raw);
    assert_ne!(e2, e1);

    let before = [fingerprint(&base), fingerprint(&p1), fingerprint(&p2)];
    let d1 = open_disk(&p1, &vm).unwrap_or_else(|e| panic!("{e}"));
    assert_matches_bytes(d1.as_ref(), &e1, "child 1");
    assert!(
        d1.describe()
            .contains("differencing VHDX, 1 MiB blocks, 512 B sectors, chain of 2"),
        "{}",
        d1.describe()
    );
    let d2 = open_disk(&p2, &vm).unwrap_or_else(|e| panic!("{e}"));
    assert_matches_bytes(d2.as_ref(), &e2, "child 2");
    assert!(d2.describe().ends_with("chain of 3"), "{}", d2.describe());
    assert_eq!(
        d2.data_write_guid(),
        Some(vhdx_data_write_guid(&p2).to_bytes())
    );

    // leaf_ranges: exactly the sectors written into child 2 (checkpoint delta),
    // rounded to whole blocks only where a whole block was written.
    let leaf = d2.leaf_ranges().expect("leaf ranges");
    for (o, d) in &w2 {
        let covered = leaf
            .iter()
            .any(|&(s, l)| s <= *o && o + d.len() as u64 <= s + l);
        assert!(
            covered,
            "write at {o} (+{}) missing from leaf ranges {leaf:?}",
            d.len()
        );
    }
    let leaf_bytes: u64 = leaf.iter().map(|r| r.1).sum();
    assert!(
        leaf_bytes < 6 << 20,
        "leaf ranges too coarse: {leaf_bytes} bytes"
    );
    drop((d1, d2));
    assert_eq!(
        [fingerprint(&base), fingerprint(&p1), fingerprint(&p2)],
        before,
        "a chain file changed"
    );
}

/// 4 KiB logical sectors: a dynamic VHDX and a chain on it.
#[test]
fn four_k_sector_vhdx_and_chain() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let size = 20usize << 20;
    let raw = holey_raw(4, size);
    let mut o = VhdxOptions::new(size as u64);
    o.block_size = 2 << 20;
    o.logical_sector_size = 4096;
    o.physical_sector_size = 4096;
    let (bytes, _) = vhdx_bytes_from_raw(&raw, o).expect("vhdx");
    let p = put(tmp.path(), "4k.vhdx", &bytes);
    let d = open_disk(&p, tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.logical_sector_size(), 4096);
    assert_eq!(d.physical_sector_size(), 4096);
    assert!(d.describe().contains("4096 B sectors"), "{}", d.describe());
    assert_matches_bytes(d.as_ref(), &raw, "4k vhdx");

    let chain = avhdx_chain(
        &raw,
        &["disk.vhdx", "disk_1.avhdx", "disk_2.avhdx"],
        1 << 20,
        4096,
        7,
    )
    .expect("chain");
    for l in &chain.levels {
        put(tmp.path(), &l.name, &l.file);
    }
    let leaf = &chain.levels[2];
    let d = open_disk(&tmp.path().join(&leaf.name), tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.logical_sector_size(), 4096);
    assert_matches_bytes(d.as_ref(), &leaf.expected, "4k chain");
    let mut want = raw.clone();
    apply_writes(&mut want, &chain.levels[1].writes);
    apply_writes(&mut want, &chain.levels[2].writes);
    assert!(
        want == leaf.expected,
        "testkit expected bytes disagree with the writes"
    );
}

/// The test kit's all-writer chain with 512 B sectors and 32 MiB blocks (one chunk).
#[test]
fn testkit_chain_32m_blocks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let raw = holey_raw(9, 72 << 20);
    let chain = avhdx_chain(
        &raw,
        &["a.vhdx", "a_1.avhdx", "a_2.avhdx"],
        32 << 20,
        512,
        3,
    )
    .expect("chain");
    for l in &chain.levels {
        put(tmp.path(), &l.name, &l.file);
    }
    for l in &chain.levels {
        let d = open_disk(&tmp.path().join(&l.name), tmp.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_matches_bytes(d.as_ref(), &l.expected, &l.name);
    }
}

struct Vm {
    _tmp: tempfile::TempDir,
    vm: PathBuf,
    dir: PathBuf,
    raw: Vec<u8>,
    base_guid: Guid,
}

fn small_vm() -> Vm {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = tmp.path().join("vm");
    let dir = vm.join(VHD_DIR);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let raw = holey_raw(5, 4 << 20);
    let mut o = VhdxOptions::new(raw.len() as u64);
    o.block_size = 1 << 20;
    let (bytes, base_guid) = vhdx_bytes_from_raw(&raw, o).expect("base");
    put(&dir, "base.vhdx", &bytes);
    Vm {
        _tmp: tmp,
        vm,
        dir,
        raw,
        base_guid,
    }
}

fn add_child(v: &Vm, name: &str, parent: Guid, info: impl FnOnce(&mut ParentInfo)) -> PathBuf {
    let mut o = child_opts(v.raw.len() as u64, 1 << 20, 512, parent, "base.vhdx");
    if let Some(p) = o.parent.as_mut() {
        info(p);
    }
    let (bytes, _) = child_bytes(o, &[(512, vec![7u8; 1024])]);
    put(&v.dir, name, &bytes)
}

#[test]
fn missing_parent_is_an_error() {
    let v = small_vm();
    let c = add_child(&v, "c.avhdx", v.base_guid, |p| {
        p.relative_path = "gone.vhdx".into()
    });
    let e = err_of(&c, &v.vm);
    assert!(matches!(e, DiskError::ParentNotFound { .. }), "{e}");
    assert!(e.to_string().contains("gone.vhdx"), "{e}");
}

#[test]
fn absolute_path_fallback_stays_inside_the_vm_folder() {
    let v = small_vm();
    let c = add_child(&v, "c.avhdx", v.base_guid, |p| {
        p.relative_path = r"old\place\base.vhdx".into();
        p.absolute_win32_path = Some(r"\\?\D:\Hyper-V\vm\Virtual Hard Disks\base.vhdx".into());
    });
    let d = open_disk(&c, &v.vm).unwrap_or_else(|e| panic!("{e}"));
    let mut want = v.raw.clone();
    want[512..1536].fill(7);
    assert_matches_bytes(d.as_ref(), &want, "fallback");
    // An absolute path to a file outside the VM folder is never used.
    let outside = v.vm.parent().expect("tmp").join("base.vhdx");
    std::fs::copy(v.dir.join("base.vhdx"), &outside).expect("copy");
    let c2 = add_child(&v, "c2.avhdx", v.base_guid, |p| {
        p.relative_path = "nothere.vhdx".into();
        p.absolute_win32_path = Some(outside.display().to_string());
    });
    assert!(matches!(
        err_of(&c2, &v.vm),
        DiskError::ParentNotFound { .. }
    ));
}

#[test]
fn parent_linkage_mismatch_is_an_error() {
    let v = small_vm();
    let c = add_child(&v, "c.avhdx", Guid::random(), |_| {});
    let e = err_of(&c, &v.vm);
    assert!(matches!(e, DiskError::ParentLinkageMismatch { .. }), "{e}");
    assert!(e.to_string().contains(&v.base_guid.to_string()), "{e}");
}

#[test]
fn parent_paths_escaping_the_vm_folder_are_refused() {
    let v = small_vm();
    // A real parent one level above the VM folder.
    std::fs::copy(
        v.dir.join("base.vhdx"),
        v.vm.parent().expect("tmp").join("x.vhdx"),
    )
    .expect("copy");
    for rel in [
        r"..\..\x.vhdx",
        "../../x.vhdx",
        r"..\..\..\..\..\..\..\x.vhdx",
        r"C:\x.vhdx",
    ] {
        let c = add_child(&v, "c.avhdx", v.base_guid, |p| p.relative_path = rel.into());
        let e = err_of(&c, &v.vm);
        assert!(
            matches!(e, DiskError::ParentOutsideVmDir { .. }),
            "{rel}: {e}"
        );
        assert!(e.to_string().contains("outside the VM folder"), "{e}");
    }
    // A symlink inside the folder that points outside is refused as well.
    std::os::unix::fs::symlink(
        v.vm.parent().expect("tmp").join("x.vhdx"),
        v.dir.join("link.vhdx"),
    )
    .expect("symlink");
    let c = add_child(&v, "c.avhdx", v.base_guid, |p| {
        p.relative_path = "link.vhdx".into()
    });
    assert!(matches!(
        err_of(&c, &v.vm),
        DiskError::ParentOutsideVmDir { .. }
    ));
    // Going up and down again inside the folder is fine.
    let c = add_child(&v, "c.avhdx", v.base_guid, |p| {
        p.relative_path = r"..\Virtual Hard Disks\base.vhdx".into()
    });
    open_disk(&c, &v.vm).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn chain_loops_are_errors() {
    let v = small_vm();
    let size = v.raw.len() as u64;
    // a -> b -> a, with linkages that match so only the loop is wrong.
    let (ga, gb) = (Guid::random(), Guid::random());
    for (name, own, parent, parent_name) in [
        ("a.avhdx", ga, gb, "b.avhdx"),
        ("b.avhdx", gb, ga, "a.avhdx"),
    ] {
        let mut w = VhdxWriter::create(
            Cursor::new(Vec::new()),
            child_opts(size, 1 << 20, 512, parent, parent_name),
        )
        .expect("w");
        w.set_data_write_guid(own);
        put(&v.dir, name, &w.finish().expect("finish").into_inner());
    }
    let e = err_of(&v.dir.join("a.avhdx"), &v.vm);
    assert!(matches!(e, DiskError::ChainLoop { .. }), "{e}");
    // A file that is its own parent.
    let mut w = VhdxWriter::create(
        Cursor::new(Vec::new()),
        child_opts(size, 1 << 20, 512, ga, "self.avhdx"),
    )
    .expect("w");
    w.set_data_write_guid(ga);
    let p = put(
        &v.dir,
        "self.avhdx",
        &w.finish().expect("finish").into_inner(),
    );
    assert!(matches!(err_of(&p, &v.vm), DiskError::ChainLoop { .. }));
}

#[test]
fn parent_with_other_sector_size_is_refused() {
    let v = small_vm();
    let mut o = child_opts(v.raw.len() as u64, 1 << 20, 4096, v.base_guid, "base.vhdx");
    o.physical_sector_size = 4096;
    let (bytes, _) = child_bytes(o, &[]);
    let c = put(&v.dir, "c.avhdx", &bytes);
    let e = err_of(&c, &v.vm);
    assert!(e.to_string().contains("logical sector size"), "{e}");
}
