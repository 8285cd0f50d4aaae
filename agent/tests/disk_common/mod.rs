//! Shared helpers of the `disk_*` integration tests: required tools, the
//! realistic disk kit (tests/fixtures/make-test-disks.sh), comparing a
//! [`VirtualDisk`] with its raw ground truth.
//!
//! Missing tools make tests FAIL, never skip.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tierback_agent::disk::VirtualDisk;

/// PATH plus the sbin directories where mkfs tools live on Debian.
pub fn path_env() -> String {
    format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Panics (test failure) if `cmd` is not installed, naming the Debian package.
pub fn require_tool(cmd: &str, package: &str) {
    let found = path_env()
        .split(':')
        .any(|d| !d.is_empty() && Path::new(d).join(cmd).is_file());
    assert!(
        found,
        "required tool `{cmd}` is missing: install the Debian package `{package}`"
    );
}

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .env("PATH", path_env())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`run`] but returns (success, stdout+stderr).
pub fn try_run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .env("PATH", path_env())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-img check` must pass.
pub fn qemu_check(fmt: &str, file: &Path) {
    require_tool("qemu-img", "qemu-utils");
    run("qemu-img", &["check", "-f", fmt, path_str(file)]);
}

/// `qemu-img compare` of a raw image and another image must report them identical.
pub fn qemu_compare(raw: &Path, fmt: &str, file: &Path) {
    require_tool("qemu-img", "qemu-utils");
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            fmt,
            path_str(raw),
            path_str(file),
        ],
    );
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The repository root (agent/..).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent has a parent")
        .to_path_buf()
}

/// The tools make-test-disks.sh needs, with their Debian packages.
pub const KIT_TOOLS: &[(&str, &str)] = &[
    ("qemu-img", "qemu-utils"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mkntfs", "ntfs-3g"),
    ("ntfscp", "ntfs-3g"),
    ("mkfs.xfs", "xfsprogs"),
    ("sgdisk", "gdisk"),
    ("sfdisk", "fdisk"),
    ("mkfs.vfat", "dosfstools"),
    ("mmd", "mtools"),
    ("mcopy", "mtools"),
    ("cc", "gcc"),
    ("openssl", "openssl"),
];

/// The realistic disks of tests/fixtures/make-test-disks.sh, built once into
/// a cache under the target dir keyed by the script's contents. Test
/// runners that start one process per test (nextest) share it: it is built
/// into a temporary directory and renamed into place, so a racing process
/// either finds the finished kit or builds its own copy and discards it.
pub fn kit() -> &'static Path {
    static KIT: OnceLock<PathBuf> = OnceLock::new();
    KIT.get_or_init(|| {
        for (cmd, pkg) in KIT_TOOLS {
            require_tool(cmd, pkg);
        }
        let script = repo_root().join("tests/fixtures/make-test-disks.sh");
        let text = std::fs::read(&script).expect("read kit script");
        let key = blake3::hash(&text).to_hex();
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("disk-kit");
        let dir = base.join(&key.as_str()[..16]);
        if dir.join("DONE").is_file() {
            return dir;
        }
        std::fs::create_dir_all(&base).expect("create kit dir");
        let tmp = base.join(format!(
            "build-{}-{}",
            std::process::id(),
            key.as_str().get(..8).unwrap_or("x")
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("create kit build dir");
        let t = std::time::Instant::now();
        run("bash", &[path_str(&script), path_str(&tmp)]);
        std::fs::write(tmp.join("DONE"), b"ok").expect("mark kit");
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another process finished first; its copy is as good as ours.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        eprintln!("disk kit built in {:.1?} at {}", t.elapsed(), dir.display());
        dir
    })
}

/// Reads `len` bytes of a file at `off`; bytes past its end read as zeros.
pub fn read_file_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let flen = f.metadata().expect("metadata").len();
    let n = flen.saturating_sub(off).min(len as u64) as usize;
    f.read_exact_at(&mut v[..n], off).expect("read raw");
    v
}

const STEP: u64 = 4 << 20;

/// Checks a disk against its raw image: same size, every allocated range
/// reads like the raw, every byte outside them is zero in the raw, ranges
/// sorted, merged and inside the disk.
pub fn assert_matches_raw(disk: &dyn VirtualDisk, raw: &Path, label: &str) {
    let f = File::open(raw).expect("open raw");
    let size = f.metadata().expect("metadata").len();
    assert_eq!(disk.virtual_size(), size, "{label}: virtual size");
    let ranges = disk
        .allocated_ranges()
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    check_ranges_shape(&ranges, size, label);
    let mut pos = 0u64;
    for &(off, len) in &ranges {
        assert_zero_in_raw(&f, pos, off, label);
        let mut o = off;
        while o < off + len {
            let n = STEP.min(off + len - o) as usize;
            let mut got = vec![0u8; n];
            disk.read_at(o, &mut got)
                .unwrap_or_else(|e| panic!("{label}: read at {o}: {e}"));
            let want = read_file_at(&f, o, n);
            if got != want {
                let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                panic!("{label}: byte {} differs from the raw", o + i as u64);
            }
            o += n as u64;
        }
        pos = off + len;
    }
    assert_zero_in_raw(&f, pos, size, label);
}

/// True if `b` is all zeros (a memcmp, fast even in unoptimised test builds).
pub fn is_zero(b: &[u8]) -> bool {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    b.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

fn assert_zero_in_raw(f: &File, from: u64, to: u64, label: &str) {
    let mut o = from;
    while o < to {
        let n = STEP.min(to - o) as usize;
        let b = read_file_at(f, o, n);
        if !is_zero(&b) {
            let i = b.iter().position(|&x| x != 0).unwrap_or(0);
            panic!(
                "{label}: raw byte {} is non-zero but outside allocated_ranges",
                o + i as u64
            );
        }
        o += n as u64;
    }
}

/// Ranges are sorted, non-empty, non-overlapping, non-adjacent, inside `size`.
pub fn check_ranges_shape(ranges: &[(u64, u64)], size: u64, label: &str) {
    for w in ranges.windows(2) {
        assert!(
            w[0].0 + w[0].1 < w[1].0,
            "{label}: ranges not sorted/merged: {w:?}"
        );
    }
    for r in ranges {
        assert!(
            r.1 > 0 && r.0 + r.1 <= size,
            "{label}: bad range {r:?} (size {size})"
        );
    }
}

/// Checks a disk against expected bytes in memory (whole disk) and its
/// allocated ranges against them.
pub fn assert_matches_bytes(disk: &dyn VirtualDisk, want: &[u8], label: &str) {
    assert_eq!(
        disk.virtual_size(),
        want.len() as u64,
        "{label}: virtual size"
    );
    let mut got = vec![0u8; want.len()];
    for (i, chunk) in got.chunks_mut(STEP as usize).enumerate() {
        disk.read_at(i as u64 * STEP, chunk)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
    }
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{label}: byte {i} is {:#04x}, expected {:#04x}",
            got[i], want[i]
        );
    }
    let ranges = disk
        .allocated_ranges()
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    check_ranges_shape(&ranges, want.len() as u64, label);
    let mut pos = 0usize;
    for &(off, len) in ranges
        .iter()
        .chain(std::iter::once(&(want.len() as u64, 0)))
    {
        let gap = &want[pos..off as usize];
        if !is_zero(gap) {
            let i = gap.iter().position(|&x| x != 0).unwrap_or(0);
            panic!(
                "{label}: byte {} is non-zero but outside allocated_ranges",
                pos + i
            );
        }
        pos = (off + len) as usize;
    }
}

/// BLAKE3 of a file and its mtime: the "never written" witness.
pub fn fingerprint(p: &Path) -> (blake3::Hash, std::time::SystemTime, u64) {
    let bytes = std::fs::read(p).expect("read file");
    let md = std::fs::metadata(p).expect("metadata");
    (
        blake3::hash(&bytes),
        md.modified().expect("mtime"),
        md.len(),
    )
}

/// The current header's DataWriteGuid of a VHDX file, parsed with the format
/// structures only (not the reader under test).
pub fn vhdx_data_write_guid(p: &Path) -> tierback_format::vhdx::Guid {
    use tierback_format::vhdx::layout::{Header, HEADER1_OFFSET, HEADER2_OFFSET};
    let b = std::fs::read(p).expect("read vhdx");
    let h1 = Header::parse(&b[HEADER1_OFFSET as usize..]).ok();
    let h2 = Header::parse(&b[HEADER2_OFFSET as usize..]).ok();
    match (h1, h2) {
        (Some(a), Some(b)) if a.sequence_number >= b.sequence_number => a.data_write_guid,
        (_, Some(b)) => b.data_write_guid,
        (Some(a), None) => a.data_write_guid,
        (None, None) => panic!("{} has no valid header", p.display()),
    }
}

/// Writes `bytes` to `dir/name`, creating directories.
pub fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(&p, bytes).expect("write fixture");
    p
}

/// A pseudo-random raw image of `size` bytes with holes: every third MiB is zero.
pub fn holey_raw(seed: u64, size: usize) -> Vec<u8> {
    let mut raw = tierback_format::vhdx::testkit::pattern(seed, size);
    for (i, chunk) in raw.chunks_mut(1 << 20).enumerate() {
        if i % 3 == 1 {
            chunk.fill(0);
        }
    }
    raw
}
