//! Checkpoint delta: when the disk's leaf is an AVHDX child whose parent is
//! exactly the file the last backup read (the parent's DataWriteGuid, which
//! the child's `parent_linkage` was checked against when the chain opened,
//! equals the DataWriteGuid recorded at the last backup), the changed sectors
//! are the child's own: [`VirtualDisk::leaf_ranges`].

use super::{guid_text, ChangeSource, Changes, DiskContext, Method};
#[cfg(doc)]
use crate::disk::VirtualDisk;

/// The checkpoint change source.
pub struct CheckpointSource;

impl ChangeSource for CheckpointSource {
    fn method(&self) -> Method {
        Method::Checkpoint
    }

    fn changes(&self, ctx: &DiskContext<'_>) -> Changes {
        let Some(parent) = ctx.disk.parent_data_write_guid() else {
            return Changes::NotApplicable;
        };
        if ctx.prev.data_write_guid.as_deref() != Some(guid_text(parent).as_str()) {
            return Changes::NotApplicable;
        }
        match ctx.disk.leaf_ranges() {
            Ok(r) => Changes::Ranges(r),
            Err(e) => Changes::Lost {
                reason: format!("reading the checkpoint delta failed ({e}): full read + compare"),
                reset: false,
            },
        }
    }
}
