//! The agent's own change-tracking state, per VM, in its state dir:
//!
//! ```text
//! S/tracking/<vm id>/state.json             VmRecord: the point it describes, per disk
//!                                           slot, path, size, ids, health, hash file
//! S/tracking/<vm id>/<point>-<stream>.hashes plaintext BLAKE3 of every chunk of the disk
//!                                           at that point (zero hash: zero chunk)
//! ```
//!
//! Written only after the gateway committed the point: hash files first
//! (tmp, fsync, rename), then `state.json` the same way, then the files of
//! older points are removed. A crash leaves either the old or the new state,
//! never a state naming a missing or half-written hash file; a damaged hash
//! file is detected by its checksum and treated as lost state.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tierback_format::ids::ChunkHash;
use tierback_format::wire::TrackingHealth;

use crate::state::write_durably;

const MAGIC: &[u8; 8] = b"TBHASH1\0";

/// What the last committed backup recorded about one disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    pub controller: String,
    pub location: String,
    /// vm.json path at that backup.
    pub path: String,
    /// Stream number of the disk in that point.
    pub stream_no: u32,
    pub size: u64,
    pub chunk_size: u32,
    /// DataWriteGuid of the leaf read (hex), if VHDX.
    pub data_write_guid: Option<String>,
    /// RCT change-tracking id current when the disk was read.
    pub change_id: Option<String>,
    /// File name of the hash list (in the VM's tracking dir).
    pub hashes_file: String,
    /// Health found by that backup.
    pub health: Option<TrackingHealth>,
}

impl DiskRecord {
    /// The record of disk stream `stream_no` of `point`, as announced in
    /// `spec`, with the health that backup (or export) found.
    pub fn for_point(
        point: &str,
        stream_no: u32,
        spec: &tierback_format::wire::StreamSpec,
        chunk_size: u32,
        health: TrackingHealth,
    ) -> Self {
        let ids = spec.tracking.clone().unwrap_or_default();
        DiskRecord {
            controller: spec.controller.clone().unwrap_or_default(),
            location: spec.location.clone().unwrap_or_default(),
            path: spec.path.clone(),
            stream_no,
            size: spec.size,
            chunk_size,
            data_write_guid: ids.data_write_guid,
            change_id: ids.change_id,
            hashes_file: format!("{point}-{stream_no}.hashes"),
            health: Some(health),
        }
    }
}

/// The state of one VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmRecord {
    /// The recovery point the hashes describe.
    pub point: String,
    pub disks: Vec<DiskRecord>,
}

impl VmRecord {
    /// The record of the disk in a controller slot, else at a path.
    pub fn disk(&self, controller: &str, location: &str, path: &str) -> Option<&DiskRecord> {
        self.disks
            .iter()
            .find(|d| d.controller == controller && d.location == location)
            .or_else(|| self.disks.iter().find(|d| d.path == path))
    }
}

/// `S/tracking`.
pub struct TrackingStore {
    dir: PathBuf,
}

impl TrackingStore {
    pub fn new(state_dir: &Path) -> TrackingStore {
        TrackingStore {
            dir: state_dir.join("tracking"),
        }
    }

    fn vm_dir(&self, vm_id: &str) -> anyhow::Result<PathBuf> {
        if vm_id.is_empty() || !vm_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("VM id {vm_id:?} cannot name a folder");
        }
        Ok(self.dir.join(vm_id.to_ascii_lowercase()))
    }

    /// The VM's state, `None` if there is none.
    pub fn load(&self, vm_id: &str) -> anyhow::Result<Option<VmRecord>> {
        let p = self.vm_dir(vm_id)?.join("state.json");
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// The hash list of a disk record, checked against its checksum, size
    /// and chunk size.
    pub fn load_hashes(&self, vm_id: &str, rec: &DiskRecord) -> anyhow::Result<Vec<ChunkHash>> {
        let p = self.vm_dir(vm_id)?.join(&rec.hashes_file);
        let b = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        decode_hashes(&b, rec.size, rec.chunk_size)
            .with_context(|| format!("{} is damaged", p.display()))
    }

    /// Saves a committed point's state: hash files, then `state.json`, then
    /// removes what the previous state used.
    pub fn save(
        &self,
        vm_id: &str,
        rec: &VmRecord,
        hashes: &[(&DiskRecord, &[ChunkHash])],
    ) -> anyhow::Result<()> {
        let dir = self.vm_dir(vm_id)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (d, h) in hashes {
            let bytes = encode_hashes(h, d.size, d.chunk_size);
            write_durably(&dir.join(&d.hashes_file), &bytes, false)?;
        }
        let json = serde_json::to_vec_pretty(rec)?;
        write_durably(&dir.join("state.json"), &json, false)?;
        let keep: Vec<&str> = rec.disks.iter().map(|d| d.hashes_file.as_str()).collect();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".hashes") && !keep.contains(&name.as_str()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }
}

/// `MAGIC | size u64 | chunk_size u32 | count u64 | hash[32]* | BLAKE3 of all before`.
pub fn encode_hashes(h: &[ChunkHash], size: u64, chunk_size: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(60 + h.len() * 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&chunk_size.to_le_bytes());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    for x in h {
        out.extend_from_slice(&x.0);
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Inverse of [`encode_hashes`]; refuses damage and a size or chunk size
/// other than expected.
pub fn decode_hashes(b: &[u8], size: u64, chunk_size: u32) -> anyhow::Result<Vec<ChunkHash>> {
    if b.len() < 60 || &b[..8] != MAGIC || !(b.len() - 60).is_multiple_of(32) {
        bail!("not a hash list");
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        bail!("checksum mismatch");
    }
    let u64_at = |o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(x)
    };
    let mut c = [0u8; 4];
    c.copy_from_slice(&b[16..20]);
    let count = u64_at(20);
    if u64_at(8) != size || u32::from_le_bytes(c) != chunk_size {
        bail!("describes another disk size or chunk size");
    }
    let hashes: Vec<ChunkHash> = body[28..]
        .chunks_exact(32)
        .map(|r| {
            let mut h = [0u8; 32];
            h.copy_from_slice(r);
            ChunkHash(h)
        })
        .collect();
    if hashes.len() as u64 != count || count != size.div_ceil(u64::from(chunk_size.max(1))) {
        bail!("holds {} hashes, expected {count}", hashes.len());
    }
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_lists_round_trip_and_detect_damage() {
        let h = vec![ChunkHash([1; 32]), ChunkHash([0; 32]), ChunkHash([7; 32])];
        let size = (2 << 20) + 512;
        let b = encode_hashes(&h, size, 1 << 20);
        assert_eq!(decode_hashes(&b, size, 1 << 20).expect("decode"), h);
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(decode_hashes(&bad, size, 1 << 20).is_err());
        assert!(decode_hashes(&b, size + (1 << 20), 1 << 20).is_err());
        assert!(decode_hashes(&b[..50], size, 1 << 20).is_err());
    }

    #[test]
    fn state_saves_and_replaces_old_files() {
        let t = tempfile::tempdir().expect("tmp");
        let st = TrackingStore::new(t.path());
        let vm = "8f0c2d1e-4b7a-4c59-9a0e-2f6d7c1b33a1";
        assert!(st.load(vm).expect("load").is_none());
        let mk = |point: &str| DiskRecord {
            controller: "SCSI".into(),
            location: "0:0".into(),
            path: "a.vhdx".into(),
            stream_no: 0,
            size: 1 << 20,
            chunk_size: 1 << 20,
            data_write_guid: None,
            change_id: Some("rct-1".into()),
            hashes_file: format!("{point}-0.hashes"),
            health: None,
        };
        let h = vec![ChunkHash([3; 32])];
        for p in ["p1", "p2"] {
            let d = mk(p);
            let rec = VmRecord {
                point: p.into(),
                disks: vec![d.clone()],
            };
            st.save(vm, &rec, &[(&d, &h)]).expect("save");
        }
        let rec = st.load(vm).expect("load").expect("some");
        assert_eq!(rec.point, "p2");
        assert_eq!(st.load_hashes(vm, &rec.disks[0]).expect("hashes"), h);
        assert!(!t
            .path()
            .join("tracking")
            .join(vm)
            .join("p1-0.hashes")
            .exists());
        assert!(rec.disk("SCSI", "0:0", "x").is_some());
        assert!(rec.disk("IDE", "0:0", "a.vhdx").is_some());
        assert!(rec.disk("IDE", "0:0", "b.vhdx").is_none());
        assert!(st.load("../evil").is_err());
    }
}
