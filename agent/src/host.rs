//! The host provider seam and its folder implementation (HOST.md): a host
//! root with one folder per VM, each described by `vm.json`. Nothing outside
//! this module knows which provider the agent runs on.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors of the host provider.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("host root {0} does not exist or is not a folder")]
    NoRoot(PathBuf),
    #[error("{path}: {reason}")]
    BadDescriptor { path: PathBuf, reason: String },
    #[error("no VM named or with id {wanted:?} under {root} (VMs found: {found})")]
    UnknownVm {
        wanted: String,
        root: PathBuf,
        found: String,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `vm.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VmDescriptor {
    pub id: String,
    pub name: String,
    #[serde(default = "default_generation")]
    pub generation: u32,
    #[serde(default)]
    pub config_version: String,
    #[serde(default = "default_state")]
    pub state: String,
    #[serde(default)]
    pub config_files: Vec<String>,
    #[serde(default)]
    pub disks: Vec<DiskRef>,
}

fn default_generation() -> u32 {
    2
}
fn default_state() -> String {
    "Off".into()
}

/// One entry of vm.json's `disks`.
#[derive(Debug, Clone, Deserialize)]
pub struct DiskRef {
    #[serde(default)]
    pub controller: String,
    #[serde(default)]
    pub location: String,
    pub path: String,
}

/// A VM found on the host.
#[derive(Debug, Clone)]
pub struct HostVm {
    /// The VM's folder.
    pub folder: PathBuf,
    pub descriptor: VmDescriptor,
    /// Raw bytes of vm.json, carried into the recovery point.
    pub descriptor_bytes: Vec<u8>,
}

impl HostVm {
    /// Absolute path of a path from vm.json.
    pub fn resolve(&self, rel: &str) -> PathBuf {
        self.folder.join(rel)
    }
}

/// What the agent needs from a Hyper-V host.
pub trait HostProvider {
    /// Every VM on the host.
    fn list_vms(&self) -> Result<Vec<HostVm>, HostError>;

    /// The VM with this name or id (ids compare case-insensitively).
    fn find_vm(&self, wanted: &str) -> Result<HostVm, HostError>;
}

/// A host root on a local or mounted file system.
pub struct FolderHost {
    pub root: PathBuf,
}

impl FolderHost {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
}

/// A vm.json path must stay inside the VM folder.
fn check_relative(desc_path: &Path, p: &str) -> Result<(), HostError> {
    let bad =
        p.is_empty() || p.starts_with('/') || p.contains('\\') || p.split('/').any(|c| c == "..");
    if bad {
        return Err(HostError::BadDescriptor {
            path: desc_path.to_path_buf(),
            reason: format!("path {p:?} must be relative to the VM folder, with '/' and no '..'"),
        });
    }
    Ok(())
}

/// Reads and validates one VM folder.
pub fn read_vm(folder: &Path) -> Result<HostVm, HostError> {
    let p = folder.join("vm.json");
    let bytes = std::fs::read(&p).map_err(|source| HostError::Io {
        path: p.clone(),
        source,
    })?;
    let d: VmDescriptor = serde_json::from_slice(&bytes).map_err(|e| HostError::BadDescriptor {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    if d.id.is_empty()
        || !d.id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        || d.id.len() > 64
    {
        return Err(HostError::BadDescriptor {
            path: p,
            reason: format!("id {:?} is not a GUID", d.id),
        });
    }
    if d.name.is_empty() {
        return Err(HostError::BadDescriptor {
            path: p,
            reason: "name is empty".into(),
        });
    }
    for f in &d.config_files {
        check_relative(&p, f)?;
    }
    for disk in &d.disks {
        check_relative(&p, &disk.path)?;
    }
    Ok(HostVm {
        folder: folder.to_path_buf(),
        descriptor: d,
        descriptor_bytes: bytes,
    })
}

impl HostProvider for FolderHost {
    fn list_vms(&self) -> Result<Vec<HostVm>, HostError> {
        if !self.root.is_dir() {
            return Err(HostError::NoRoot(self.root.clone()));
        }
        let rd = std::fs::read_dir(&self.root).map_err(|source| HostError::Io {
            path: self.root.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|source| HostError::Io {
                path: self.root.clone(),
                source,
            })?;
            if e.path().join("vm.json").is_file() {
                out.push(read_vm(&e.path())?);
            }
        }
        out.sort_by(|a, b| a.descriptor.name.cmp(&b.descriptor.name));
        Ok(out)
    }

    fn find_vm(&self, wanted: &str) -> Result<HostVm, HostError> {
        let vms = self.list_vms()?;
        let found = vms.iter().position(|v| {
            v.descriptor.name == wanted || v.descriptor.id.eq_ignore_ascii_case(wanted)
        });
        match found {
            Some(i) => Ok(vms
                .into_iter()
                .nth(i)
                .ok_or(HostError::NoRoot(self.root.clone()))?),
            None => Err(HostError::UnknownVm {
                wanted: wanted.to_string(),
                root: self.root.clone(),
                found: if vms.is_empty() {
                    "none".into()
                } else {
                    vms.iter()
                        .map(|v| v.descriptor.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(root: &Path, name: &str, json: &str) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("vm.json"), json).expect("write");
    }

    #[test]
    fn finds_vms_by_name_and_id_and_names_the_missing_one() {
        let t = tempfile::tempdir().expect("tmp");
        vm(
            t.path(),
            "web01",
            r#"{"id":"8F0C2D1E-4B7A-4C59-9A0E-2F6D7C1B33A1","name":"web01","disks":[{"controller":"SCSI","location":"0:0","path":"Virtual Hard Disks/a.vhdx"}]}"#,
        );
        vm(
            t.path(),
            "db01",
            r#"{"id":"11111111-2222-3333-4444-555555555555","name":"db01"}"#,
        );
        let h = FolderHost::new(t.path());
        assert_eq!(h.list_vms().expect("list").len(), 2);
        assert_eq!(
            h.find_vm("web01").expect("by name").descriptor.disks.len(),
            1
        );
        assert_eq!(
            h.find_vm("8f0c2d1e-4b7a-4c59-9a0e-2f6d7c1b33a1")
                .expect("by id")
                .descriptor
                .name,
            "web01"
        );
        let err = h.find_vm("mail01").unwrap_err().to_string();
        assert!(
            err.contains("mail01") && err.contains("db01, web01"),
            "{err}"
        );
    }

    #[test]
    fn hostile_descriptors_are_refused() {
        let t = tempfile::tempdir().expect("tmp");
        vm(
            t.path(),
            "evil",
            r#"{"id":"11111111-2222-3333-4444-555555555555","name":"evil","disks":[{"path":"../../etc/passwd"}]}"#,
        );
        let err = FolderHost::new(t.path())
            .list_vms()
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be relative"), "{err}");
        vm(t.path(), "evil", r#"{"id":"x; rm","name":"evil"}"#);
        assert!(FolderHost::new(t.path()).list_vms().is_err());
        vm(t.path(), "evil", "not json");
        assert!(FolderHost::new(t.path()).list_vms().is_err());
        assert!(FolderHost::new(&t.path().join("nope")).list_vms().is_err());
    }
}
