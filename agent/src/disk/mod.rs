//! Reading VM disks: VHDX, AVHDX chains, legacy VHD and raw images, as a
//! [`VirtualDisk`] of the guest-visible bytes.
//!
//! MUST NOT: write to a source disk. Every file is opened read-only
//! (`File::open`, plus an `O_RDONLY | O_DIRECT` handle for payload reads)
//! and only ever read with `pread`; a dirty VHDX log is replayed into an
//! in-memory overlay, never onto the file.
//!
//! Every offset and size read from a file is validated before use (against
//! the file size, the structures around it and the spec's limits) and turns
//! into a [`DiskError`] naming the file, never a panic or an allocation sized
//! by untrusted input beyond what the file itself holds.
//!
//! | module | owns |
//! |---|---|
//! | `source` | read-only file access (pread), the in-memory log overlay |
//! | `direct` | payload reads around the page cache (`O_DIRECT`), buffered fallback |
//! | `log` | finding the active log sequence and replaying it in memory |
//! | `vhdx` | headers, region table, metadata, BAT, block reads of one VHDX file |
//! | `chain` | parent locator resolution inside the VM folder, linkage checks |
//! | `vhd` | legacy VHD (fixed, dynamic) |
//! | `raw` | raw images |
//! | `ranges` | sorted byte-range arithmetic |
//!
//! Concurrency: a disk is immutable once opened; `read_at` takes `&self` and
//! uses positioned reads, so any number of threads may read one disk at once.

mod chain;
mod direct;
mod log;
mod ranges;
mod raw;
mod source;
mod vhd;
mod vhdx;

use std::path::{Path, PathBuf};

pub use ranges::merge_ranges;

/// Why a disk could not be opened or read. Every message is one line that
/// names the file and says what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An I/O error on the file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than a structure it declares.
    #[error("{}: truncated: file is {file_len} bytes, {needed}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        file_len: u64,
        /// What needs more ("region table needs 256 KiB").
        needed: String,
    },
    /// A structure is invalid (bad checksum, offsets out of bounds, overlaps …).
    #[error("{}: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong ("header 1 CRC-32C mismatch").
        what: String,
    },
    /// A valid file using a feature this reader does not implement.
    #[error("{}: unsupported: {what}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The feature.
        what: String,
    },
    /// The parent of a differencing disk is not where its locator says.
    #[error("{}: parent {locator} not found (looked for {})", path.display(), tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    ParentNotFound {
        /// The child.
        path: PathBuf,
        /// The locator's path.
        locator: String,
        /// Files looked for.
        tried: Vec<PathBuf>,
    },
    /// The parent locator points outside the VM folder.
    #[error("{}: parent locator names {locator} which is outside the VM folder", path.display())]
    ParentOutsideVmDir {
        /// The child.
        path: PathBuf,
        /// The offending path.
        locator: String,
    },
    /// The parent found is not the one the child was made from.
    #[error("{}: parent DataWriteGuid {parent} does not match parent_linkage {linkage}", path.display())]
    ParentLinkageMismatch {
        /// The child.
        path: PathBuf,
        /// The parent's DataWriteGuid.
        parent: String,
        /// The child's parent_linkage (and parent_linkage2, if any).
        linkage: String,
    },
    /// Following parents leads back to a file already in the chain.
    #[error("{}: differencing chain loops back to {}", path.display(), again.display())]
    ChainLoop {
        /// The child whose parent closes the loop.
        path: PathBuf,
        /// The file met twice.
        again: PathBuf,
    },
    /// A read outside the virtual disk.
    #[error("{}: read of {len} bytes at {offset} is beyond the virtual size {virtual_size}", path.display())]
    OutOfRange {
        /// The disk (leaf file).
        path: PathBuf,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The disk's size.
        virtual_size: u64,
    },
}

impl DiskError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            DiskError::Io { path, .. }
            | DiskError::Truncated { path, .. }
            | DiskError::Corrupt { path, .. }
            | DiskError::Unsupported { path, .. }
            | DiskError::ParentNotFound { path, .. }
            | DiskError::ParentOutsideVmDir { path, .. }
            | DiskError::ParentLinkageMismatch { path, .. }
            | DiskError::ChainLoop { path, .. }
            | DiskError::OutOfRange { path, .. } => path,
        }
    }

    /// True when the file's content is damaged or inconsistent (as opposed to
    /// I/O failures, unsupported features or a misplaced parent).
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            DiskError::Truncated { .. }
                | DiskError::Corrupt { .. }
                | DiskError::ParentLinkageMismatch { .. }
                | DiskError::ChainLoop { .. }
        )
    }

    /// True for a valid file using a feature this reader lacks.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, DiskError::Unsupported { .. })
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> DiskError {
        DiskError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn corrupt(path: &Path, what: impl Into<String>) -> DiskError {
        DiskError::Corrupt {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
    pub(crate) fn unsupported(path: &Path, what: impl Into<String>) -> DiskError {
        DiskError::Unsupported {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
    pub(crate) fn truncated(path: &Path, file_len: u64, needed: impl Into<String>) -> DiskError {
        DiskError::Truncated {
            path: path.to_path_buf(),
            file_len,
            needed: needed.into(),
        }
    }
}

/// A virtual disk as the guest sees it.
pub trait VirtualDisk: Send + Sync {
    /// Size in bytes.
    fn virtual_size(&self) -> u64;
    /// Logical sector size in bytes (512 or 4096).
    fn logical_sector_size(&self) -> u32;
    /// Physical sector size in bytes (512 or 4096).
    fn physical_sector_size(&self) -> u32;
    /// Byte ranges (offset, len) of the virtual disk that may hold non-zero
    /// data, sorted, non-overlapping, merged; everything outside reads as
    /// zeros. For a chain: what each layer holds, plus its parent's ranges
    /// where the layer passes reads through. Fixed VHDX/VHD/raw: the whole
    /// disk except blocks the BAT says are zero/unmapped.
    fn allocated_ranges(&self) -> Result<Vec<(u64, u64)>, DiskError>;
    /// Reads exactly `buf.len()` bytes at a virtual offset (any alignment;
    /// crossing blocks ok). Reads beyond `virtual_size` are an error. Uses
    /// pread (`&self`), so many threads may read at once.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// VHDX DataWriteGuid of the leaf, in on-disk byte order (None for VHD/raw).
    fn data_write_guid(&self) -> Option<[u8; 16]>;
    /// Human description for logs: "dynamic VHDX, 32 MiB blocks, 512 B sectors, chain of 3".
    fn describe(&self) -> String;
    /// Ranges the leaf file itself defines: for a differencing VHDX, every
    /// sector written since its parent was frozen (present sectors and blocks
    /// it marks zero, undefined or unmapped, which hide the parent), i.e. the
    /// checkpoint delta; for any other disk the same as
    /// [`allocated_ranges`](Self::allocated_ranges).
    fn leaf_ranges(&self) -> Result<Vec<(u64, u64)>, DiskError> {
        self.allocated_ranges()
    }
    /// For a differencing VHDX: the DataWriteGuid of its parent (checked
    /// against the child's parent_linkage when the chain was opened), in
    /// on-disk byte order. None for any other disk.
    fn parent_data_write_guid(&self) -> Option<[u8; 16]> {
        None
    }
}

/// How the payload (guest data) of a disk's files is read. File structures
/// (headers, BAT, log, bitmaps) always go through the page cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadMode {
    /// Around the page cache (`O_DIRECT`) where the file system allows it,
    /// buffered where it does not: a backup streams the disk once, and
    /// filling and reclaiming the page cache would cost more CPU than the
    /// reads themselves.
    #[default]
    Direct,
    /// Through the page cache only.
    Buffered,
}

/// Opens a `.vhdx`/`.avhdx`/`.vhd` (recognised by content: the `vhdxfile`
/// identifier, or a VHD footer `conectix` at the end or its copy at the start)
/// or a raw image (`.raw`/`.img` extension), READ-ONLY.
///
/// Differencing parents are resolved through the parent locator's
/// `relative_path` (then `volume_path` and `absolute_win32_path`, only as
/// files found inside `vm_dir`), and must lie inside `vm_dir`, the VM folder:
/// paths escaping it are refused. `parent_linkage` (or `parent_linkage2`) is
/// checked against the parent's DataWriteGuid. Chains of any depth up to
/// 1024; a loop is an error. Payload is read as [`ReadMode::Direct`].
pub fn open_disk(path: &Path, vm_dir: &Path) -> Result<Box<dyn VirtualDisk>, DiskError> {
    chain::open_disk(path, vm_dir, ReadMode::Direct)
}

/// [`open_disk`] with the payload of every file of the chain read as `mode`.
pub fn open_disk_with(
    path: &Path,
    vm_dir: &Path,
    mode: ReadMode,
) -> Result<Box<dyn VirtualDisk>, DiskError> {
    chain::open_disk(path, vm_dir, mode)
}

/// Parses an in-memory VHDX, VHD or (anything else) raw image, as
/// [`open_disk`] would a file, without resolving parents (a differencing disk
/// fails with [`DiskError::Unsupported`] after its metadata was parsed).
/// `name` stands for the path in error messages. For fuzzing and tests.
pub fn open_image_bytes(name: &str, bytes: Vec<u8>) -> Result<Box<dyn VirtualDisk>, DiskError> {
    chain::open_bytes(Path::new(name), bytes)
}

pub(crate) fn human_size(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (u, name) in UNITS {
        if n >= u && n & (u - 1) == 0 {
            return format!("{} {name}", n / u);
        }
    }
    format!("{n} B")
}
