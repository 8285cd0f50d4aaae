//! Opening a disk by content, and differencing chains: parent locators
//! resolved inside the VM folder only, linkage checked against the parent's
//! DataWriteGuid, loops refused.

use std::path::{Path, PathBuf};

use tierback_format::vhdx::layout::ParentLocator;
use tierback_format::vhdx::Guid;

use super::ranges::{intersect, merge_ranges};
use super::raw::RawDisk;
use super::source::{FileBacking, Image, MemBacking};
use super::vhd::{has_cookie, VhdDisk};
use super::vhdx::VhdxFile;
use super::{DiskError, ReadMode, VirtualDisk};

/// Deepest chain opened (Hyper-V allows 50 checkpoints).
const MAX_DEPTH: usize = 1024;

enum Format {
    Vhdx,
    Vhd,
    Raw,
}

fn detect(img: &Image) -> Result<Format, DiskError> {
    let p = img.path.as_path();
    let len = img.real_len();
    let mut head = [0u8; 8];
    if len >= 8 {
        img.read_raw(0, &mut head)?;
        if &head == b"vhdxfile" {
            return Ok(Format::Vhdx);
        }
        if has_cookie(&head) {
            return Ok(Format::Vhd);
        }
    }
    if len >= 512 {
        let mut tail = [0u8; 8];
        img.read_raw(len - 512, &mut tail)?;
        if has_cookie(&tail) {
            return Ok(Format::Vhd);
        }
    }
    let ext = p
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "raw" | "img" => Ok(Format::Raw),
        "vhdx" | "avhdx" if len < 8 => Err(DiskError::truncated(
            p,
            len,
            "the file identifier needs 8 bytes",
        )),
        "vhdx" | "avhdx" => Err(DiskError::corrupt(
            p,
            "no \"vhdxfile\" signature at offset 0",
        )),
        "vhd" | "avhd" => Err(DiskError::corrupt(
            p,
            "no VHD footer (\"conectix\") at the end or the start",
        )),
        _ => Err(DiskError::unsupported(
            p,
            "not a VHDX or VHD image, and not a .raw/.img file",
        )),
    }
}

pub(crate) fn open_disk(
    path: &Path,
    vm_dir: &Path,
    mode: ReadMode,
) -> Result<Box<dyn VirtualDisk>, DiskError> {
    let vm = vm_dir
        .canonicalize()
        .map_err(|e| DiskError::io(vm_dir, e))?;
    let mut seen = Vec::new();
    Ok(open_file(path, &vm, mode, &mut seen)?.0)
}

pub(crate) fn open_bytes(name: &Path, bytes: Vec<u8>) -> Result<Box<dyn VirtualDisk>, DiskError> {
    let img = Image::new(name, Box::new(MemBacking(bytes)));
    let len = img.real_len();
    let mut head = [0u8; 8];
    let is_vhdx = len >= 8 && {
        img.read_raw(0, &mut head)?;
        &head == b"vhdxfile"
    };
    if is_vhdx {
        let file = VhdxFile::open(img)?;
        if file.parent_locator.is_some() {
            return Err(DiskError::unsupported(
                name,
                "differencing disk opened without its VM folder",
            ));
        }
        return Ok(Box::new(VhdxDisk {
            file,
            parent: None,
            chain_len: 1,
        }));
    }
    match detect(&img) {
        Ok(Format::Vhd) => Ok(Box::new(VhdDisk::open(img)?)),
        _ => Ok(Box::new(RawDisk { img })),
    }
}

/// Opens `path` and its parents; returns the disk and its chain length.
fn open_file(
    path: &Path,
    vm: &Path,
    mode: ReadMode,
    seen: &mut Vec<PathBuf>,
) -> Result<(Box<dyn VirtualDisk>, usize), DiskError> {
    let canon = path.canonicalize().map_err(|e| DiskError::io(path, e))?;
    seen.push(canon.clone());
    let img = Image::new(path, Box::new(FileBacking::open(path, mode)?));
    match detect(&img)? {
        Format::Raw => Ok((Box::new(RawDisk { img }), 1)),
        Format::Vhd => Ok((Box::new(VhdDisk::open(img)?), 1)),
        Format::Vhdx => {
            let file = VhdxFile::open(img)?;
            let Some(loc) = file.parent_locator.clone() else {
                return Ok((
                    Box::new(VhdxDisk {
                        file,
                        parent: None,
                        chain_len: 1,
                    }),
                    1,
                ));
            };
            let linkage = loc
                .get(ParentLocator::PARENT_LINKAGE)
                .ok_or_else(|| DiskError::corrupt(path, "parent locator has no parent_linkage"))?;
            let linkage = Guid::parse(linkage).map_err(|_| {
                DiskError::corrupt(path, format!("parent_linkage {linkage:?} is not a GUID"))
            })?;
            let linkage2 = loc
                .get(ParentLocator::PARENT_LINKAGE2)
                .and_then(|s| Guid::parse(s).ok());
            if seen.len() >= MAX_DEPTH {
                return Err(DiskError::unsupported(
                    path,
                    format!("a differencing chain deeper than {MAX_DEPTH}"),
                ));
            }
            let ppath = resolve_parent(path, &canon, vm, &loc)?;
            if seen.contains(&ppath) {
                return Err(DiskError::ChainLoop {
                    path: path.to_path_buf(),
                    again: ppath,
                });
            }
            let (parent, depth) = open_file(&ppath, vm, mode, seen)?;
            let Some(pg) = parent.data_write_guid() else {
                return Err(DiskError::unsupported(
                    path,
                    format!("parent {} is not a VHDX", ppath.display()),
                ));
            };
            let pg = Guid::from_bytes(pg);
            if pg != linkage && Some(pg) != linkage2 {
                let mut l = linkage.to_string();
                if let Some(l2) = linkage2 {
                    l += &format!(" or parent_linkage2 {l2}");
                }
                return Err(DiskError::ParentLinkageMismatch {
                    path: path.to_path_buf(),
                    parent: pg.to_string(),
                    linkage: l,
                });
            }
            if parent.logical_sector_size() != file.geo.logical_sector_size {
                return Err(DiskError::corrupt(
                    path,
                    format!(
                        "logical sector size {} differs from its parent's {}",
                        file.geo.logical_sector_size,
                        parent.logical_sector_size()
                    ),
                ));
            }
            Ok((
                Box::new(VhdxDisk {
                    file,
                    parent: Some(parent),
                    chain_len: depth + 1,
                }),
                depth + 1,
            ))
        }
    }
}

/// Path components of a Windows absolute path without its root
/// (`\\?\`, drive letter, `Volume{…}`, UNC server and share) or of a Unix one.
fn rootless_components(v: &str) -> Vec<String> {
    let s = v.replace('/', "\\");
    let mut rest = s.as_str();
    let mut skip = 0;
    if let Some(r) = rest.strip_prefix(r"\\?\") {
        rest = r;
        if let Some(r) = rest.strip_prefix(r"UNC\") {
            rest = r;
            skip = 2;
        }
    } else if let Some(r) = rest.strip_prefix(r"\\") {
        rest = r;
        skip = 2;
    }
    let mut comps: Vec<String> = rest
        .split('\\')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
        .skip(skip)
        .collect();
    if comps
        .first()
        .is_some_and(|c| c.ends_with(':') || c.starts_with("Volume{"))
    {
        comps.remove(0);
    }
    comps
}

/// Finds the parent named by `loc` inside `vm` (canonical). Returns its canonical path.
fn resolve_parent(
    child: &Path,
    child_canon: &Path,
    vm: &Path,
    loc: &ParentLocator,
) -> Result<PathBuf, DiskError> {
    let mut tried = Vec::new();
    let rel = loc.get(ParentLocator::RELATIVE_PATH);
    if let Some(rel) = rel {
        let escape = || DiskError::ParentOutsideVmDir {
            path: child.to_path_buf(),
            locator: rel.to_string(),
        };
        let mut p = child_canon.parent().unwrap_or(vm).to_path_buf();
        for comp in rel.split(['\\', '/']) {
            match comp {
                "" | "." => {}
                ".." => {
                    if !p.pop() {
                        return Err(escape());
                    }
                }
                c if c.contains(':') => return Err(escape()),
                c => p.push(c),
            }
        }
        if !p.starts_with(vm) {
            return Err(escape());
        }
        if p.is_file() {
            let c = p.canonicalize().map_err(|e| DiskError::io(&p, e))?;
            if !c.starts_with(vm) {
                return Err(escape());
            }
            return Ok(c);
        }
        tried.push(p);
    }
    for key in [
        ParentLocator::VOLUME_PATH,
        ParentLocator::ABSOLUTE_WIN32_PATH,
    ] {
        let Some(v) = loc.get(key) else { continue };
        let comps = rootless_components(v);
        if comps.iter().any(|c| c == ".." || c.contains(':')) {
            continue;
        }
        for k in 0..comps.len() {
            let cand = comps[k..].iter().fold(vm.to_path_buf(), |p, c| p.join(c));
            if cand.is_file() {
                if let Ok(c) = cand.canonicalize() {
                    if c.starts_with(vm) {
                        return Ok(c);
                    }
                }
            }
            tried.push(cand);
        }
    }
    let locator = rel
        .or_else(|| loc.get(ParentLocator::ABSOLUTE_WIN32_PATH))
        .or_else(|| loc.get(ParentLocator::VOLUME_PATH))
        .unwrap_or("(no path in the parent locator)")
        .to_string();
    Err(DiskError::ParentNotFound {
        path: child.to_path_buf(),
        locator,
        tried,
    })
}

/// A VHDX file and, for a differencing one, its parent chain.
struct VhdxDisk {
    file: VhdxFile,
    parent: Option<Box<dyn VirtualDisk>>,
    chain_len: usize,
}

impl VirtualDisk for VhdxDisk {
    fn virtual_size(&self) -> u64 {
        self.file.geo.virtual_size
    }
    fn logical_sector_size(&self) -> u32 {
        self.file.geo.logical_sector_size
    }
    fn physical_sector_size(&self) -> u32 {
        self.file.physical_sector_size
    }

    fn allocated_ranges(&self) -> Result<Vec<(u64, u64)>, DiskError> {
        let [mut present, pass, _] = self.file.ranges()?;
        if let Some(parent) = &self.parent {
            let through = intersect(&parent.allocated_ranges()?, &pass);
            present.extend(through);
        }
        Ok(merge_ranges(present))
    }

    fn leaf_ranges(&self) -> Result<Vec<(u64, u64)>, DiskError> {
        let [mut present, _, hidden] = self.file.ranges()?;
        present.extend(hidden);
        Ok(merge_ranges(present))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let size = self.file.geo.virtual_size;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > size)
        {
            return Err(DiskError::OutOfRange {
                path: self.file.img.path.clone(),
                offset,
                len: buf.len() as u64,
                virtual_size: size,
            });
        }
        self.file.read(offset, buf, self.parent.as_deref())
    }

    fn data_write_guid(&self) -> Option<[u8; 16]> {
        Some(self.file.data_write_guid().to_bytes())
    }

    fn parent_data_write_guid(&self) -> Option<[u8; 16]> {
        self.parent.as_ref().and_then(|p| p.data_write_guid())
    }

    fn describe(&self) -> String {
        let mut s = self.file.describe();
        if self.chain_len > 1 {
            s += &format!(", chain of {}", self.chain_len);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_and_buffered_reads_of_a_vhdx_agree() {
        use tierback_format::vhdx::{VhdxOptions, VhdxWriter};
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("d.vhdx");
        let size = 24u64 << 20;
        let mut want = vec![0u8; size as usize];
        let mut opts = VhdxOptions::new(size);
        opts.block_size = 2 << 20;
        let file = std::fs::File::create(&path).expect("create");
        let mut w = VhdxWriter::create(file, opts).expect("writer");
        // Whole blocks, a block's odd middle, and a piece across a block edge.
        for (o, l, v) in [
            (0usize, 2usize << 20, 1u8),
            (5 << 20, 12288 + 512, 2),
            ((8 << 20) - 4096, 3 << 20, 3),
        ] {
            let data: Vec<u8> = (0..l).map(|i| v ^ (i % 253) as u8).collect();
            w.write_at(o as u64, &data).expect("write");
            want[o..o + l].copy_from_slice(&data);
        }
        w.finish().expect("finish");
        for mode in [ReadMode::Direct, ReadMode::Buffered] {
            let d = open_disk(&path, tmp.path(), mode).expect("open");
            let mut all = vec![0u8; size as usize];
            d.read_at(0, &mut all).expect("read");
            assert!(all == want, "{mode:?}: whole disk");
            for (o, l) in [
                (1usize << 20, 1usize << 20),
                (5 << 20, 100_000),
                (511, 70_001),
            ] {
                let mut b = vec![0u8; l + 1];
                d.read_at(o as u64, &mut b[1..]).expect("read");
                assert!(b[1..] == want[o..o + l], "{mode:?} at {o}+{l}");
            }
        }
    }

    #[test]
    fn windows_paths_lose_their_root() {
        assert_eq!(
            rootless_components(r"\\?\D:\Hyper-V\Virtual Hard Disks\a.vhdx"),
            ["Hyper-V", "Virtual Hard Disks", "a.vhdx"]
        );
        assert_eq!(
            rootless_components(r"\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\vms\a.vhdx"),
            ["vms", "a.vhdx"]
        );
        assert_eq!(
            rootless_components(r"\\?\UNC\server\share\vms\a.vhdx"),
            ["vms", "a.vhdx"]
        );
        assert_eq!(rootless_components(r"\\server\share\a.vhdx"), ["a.vhdx"]);
        assert_eq!(
            rootless_components("/srv/vms/web01/a.vhdx"),
            ["srv", "vms", "web01", "a.vhdx"]
        );
        assert_eq!(rootless_components(r"C:\a.vhdx"), ["a.vhdx"]);
    }
}
