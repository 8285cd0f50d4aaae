//! Tierback's own VHDX codec, following MS-VHDX (Virtual Hard Disk v2) to the
//! letter: on-disk structures, GUIDs in Windows byte order, CRC-32C helpers,
//! the metadata log's entry format, and a writer for dynamic and differencing
//! (AVHDX) files.
//!
//! This module owns bytes only. It never opens files: the writer works on any
//! `Write + Seek`, the parsers on caller-supplied slices. The reader that opens
//! VM disks (headers, log replay in memory, BAT, chains, legacy VHD) lives in
//! the agent (`tierback_agent::disk`) and uses the structures defined here.
//!
//! - [`guid`] — [`Guid`], mixed-endian as stored on disk.
//! - [`layout`] — file identifier, headers, region table, metadata table and
//!   items, parent locator, BAT entries and geometry, checksum helpers.
//! - [`log`] — log entry header, zero/data descriptors, data sectors.
//! - [`writer`] — [`VhdxWriter`].
//! - [`testkit`] — fixture generators for what qemu-img cannot make
//!   (AVHDX chains, 4 KiB-sector disks, dirty logs), with independent ground truth.
//!
//! What is not covered: the writer makes no fixed (LeaveBlocksAllocated) files
//! and never writes through its own log (it writes a fresh file whose headers
//! come last, so there is nothing to recover); user metadata items are neither
//! read nor written.

pub mod guid;
pub mod layout;
pub mod log;
pub mod testkit;
pub mod writer;

pub use guid::{Guid, GuidParseError};
pub use layout::{BatEntry, Geometry, Header, MetadataTable, ParentLocator, RegionTable};
pub use writer::{ParentInfo, VhdxOptions, VhdxWriter};

/// Why a VHDX structure did not parse. Messages are fragments meant to follow
/// the structure's name: "header 1 " + "CRC-32C mismatch (…)".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StructError {
    /// Fewer bytes than the structure needs.
    #[error("too short: {what} needs {need} bytes, got {got}")]
    TooShort {
        /// Which structure.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        got: usize,
    },
    /// The signature is not the expected one.
    #[error("bad signature (expected {expected:?})")]
    BadSignature {
        /// The signature the spec requires.
        expected: &'static str,
    },
    /// The stored CRC-32C is not the computed one.
    #[error("CRC-32C mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        /// Checksum in the file.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// A field holds a value the spec forbids.
    #[error("{0}")]
    Invalid(String),
}

/// Errors of the writer and the test kit.
#[derive(Debug, thiserror::Error)]
pub enum VhdxError {
    /// The underlying `Write + Seek` failed.
    #[error("VHDX write failed: {0}")]
    Io(#[from] std::io::Error),
    /// The options describe no valid VHDX.
    #[error("invalid VHDX options: {0}")]
    InvalidOptions(String),
    /// A write not aligned to the logical sector size.
    #[error("write of {len} bytes at {offset} is not aligned to the {sector}-byte logical sector")]
    Unaligned {
        /// Virtual offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Logical sector size.
        sector: u32,
    },
    /// A write past the end of the virtual disk.
    #[error("write of {len} bytes at {offset} goes beyond the virtual size {virtual_size}")]
    OutOfRange {
        /// Virtual offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Virtual disk size.
        virtual_size: u64,
    },
    /// A structure the test kit re-read did not parse.
    #[error("VHDX structure: {0}")]
    Struct(#[from] StructError),
}
