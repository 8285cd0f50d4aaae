//! RCT-style change tracking from the host: the folder host's `rct.json`
//! sidecar (HOST.md), standing for Hyper-V's `QueryChangesVirtualDisk`.
//!
//! The file is untrusted input: every number is checked (negative, fractional
//! or beyond u64 is refused; `offset + len` saturates), ranges are sorted and
//! merged, the file size is bounded, and any defect becomes an [`RctError`]
//! that names it, never a panic. A bad file makes change tracking unavailable
//! for the VM (the caller falls back to full read + compare), it never fails
//! a backup.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::{ChangeSource, Changes, DiskContext, Method};
use crate::disk::merge_ranges;

/// Largest `rct.json` accepted.
pub const MAX_RCT_BYTES: u64 = 64 << 20;

/// Why `rct.json` could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RctError {
    #[error("rct.json is not valid JSON: {0}")]
    Json(String),
    #[error("rct.json: {0}")]
    Invalid(String),
    #[error("rct.json is {0} bytes, more than the {MAX_RCT_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("reading rct.json: {0}")]
    Io(String),
}

/// One disk's entry: the current id and the ranges written since earlier ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RctDisk {
    pub current: String,
    /// Earlier id → sorted, merged byte ranges `(offset, len)` written since.
    pub since: BTreeMap<String, Vec<(u64, u64)>>,
}

/// A parsed `rct.json`, keyed by disk path (as in vm.json).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RctFile {
    pub disks: BTreeMap<String, RctDisk>,
}

/// What the host's change tracking says about a disk since a stored id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RctAnswer {
    /// `current` is the stored id.
    Unchanged,
    /// Ranges written since the stored id (may over-report).
    Ranges(Vec<(u64, u64)>),
    /// The stored id is unknown to the host.
    Unknown { current: String },
    /// Tracking was reset: the host knows no earlier id at all.
    Reset { current: String },
}

impl RctDisk {
    /// Changes since `stored`.
    pub fn since_id(&self, stored: &str) -> RctAnswer {
        if self.current == stored {
            return RctAnswer::Unchanged;
        }
        match self.since.get(stored) {
            Some(r) => RctAnswer::Ranges(r.clone()),
            None if self.since.is_empty() => RctAnswer::Reset {
                current: self.current.clone(),
            },
            None => RctAnswer::Unknown {
                current: self.current.clone(),
            },
        }
    }
}

/// Reads `<vm folder>/rct.json`: `Ok(None)` when absent.
pub fn load(vm_folder: &Path) -> Result<Option<RctFile>, RctError> {
    let p = vm_folder.join("rct.json");
    let meta = match std::fs::metadata(&p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RctError::Io(e.to_string())),
    };
    if meta.len() > MAX_RCT_BYTES {
        return Err(RctError::TooLarge(meta.len()));
    }
    let bytes = std::fs::read(&p).map_err(|e| RctError::Io(e.to_string()))?;
    parse(&bytes).map(Some)
}

/// Parses the bytes of an `rct.json`.
pub fn parse(bytes: &[u8]) -> Result<RctFile, RctError> {
    if bytes.len() as u64 > MAX_RCT_BYTES {
        return Err(RctError::TooLarge(bytes.len() as u64));
    }
    let v: Value = serde_json::from_slice(bytes).map_err(|e| RctError::Json(e.to_string()))?;
    let Value::Object(top) = v else {
        return Err(RctError::Invalid(
            "the top level must be an object keyed by disk path".into(),
        ));
    };
    let mut out = RctFile::default();
    for (path, d) in top {
        let Value::Object(d) = d else {
            return Err(RctError::Invalid(format!("{path:?}: must be an object")));
        };
        let current = match d.get("current") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(RctError::Invalid(format!(
                    "{path:?}: \"current\" must be a non-empty string"
                )))
            }
        };
        let mut since = BTreeMap::new();
        match d.get("since") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (id, ranges) in m {
                    since.insert(id.clone(), parse_ranges(&path, id, ranges)?);
                }
            }
            Some(_) => {
                return Err(RctError::Invalid(format!(
                    "{path:?}: \"since\" must be an object of id → ranges"
                )))
            }
        }
        out.disks.insert(path, RctDisk { current, since });
    }
    Ok(out)
}

fn parse_ranges(path: &str, id: &str, v: &Value) -> Result<Vec<(u64, u64)>, RctError> {
    let bad = |what: String| RctError::Invalid(format!("{path:?} since {id:?}: {what}"));
    let Value::Array(items) = v else {
        return Err(bad("ranges must be an array of [offset, length]".into()));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, r) in items.iter().enumerate() {
        let pair = match r {
            Value::Array(p) if p.len() == 2 => p,
            _ => return Err(bad(format!("range {i} is not [offset, length]"))),
        };
        let num = |x: &Value, what: &str| {
            x.as_u64().ok_or_else(|| {
                bad(format!(
                    "range {i}: {what} {x} is not a whole number in 0..2^64"
                ))
            })
        };
        let off = num(&pair[0], "offset")?;
        let len = num(&pair[1], "length")?;
        // Saturate: a range running past 2^64 covers everything from `off`.
        out.push((off, len.min(u64::MAX - off)));
    }
    Ok(merge_ranges(out))
}

/// The RCT change source.
pub struct RctSource {
    file: Result<Option<RctFile>, RctError>,
}

impl RctSource {
    /// Reads the VM folder's `rct.json` (once per backup).
    pub fn for_vm(vm_folder: &Path) -> RctSource {
        RctSource {
            file: load(vm_folder),
        }
    }

    /// The current change-tracking id of a disk, to record with the point.
    pub fn current_id(&self, disk_path: &str) -> Option<String> {
        match &self.file {
            Ok(Some(f)) => f.disks.get(disk_path).map(|d| d.current.clone()),
            _ => None,
        }
    }
}

impl ChangeSource for RctSource {
    fn method(&self) -> Method {
        Method::Rct
    }

    fn changes(&self, ctx: &DiskContext<'_>) -> Changes {
        let file = match &self.file {
            Ok(Some(f)) => f,
            Ok(None) => return Changes::NotApplicable,
            Err(e) => {
                return Changes::Lost {
                    reason: format!("{e}: full read + compare"),
                    reset: false,
                }
            }
        };
        let Some(d) = file.disks.get(ctx.path) else {
            return Changes::NotApplicable;
        };
        let Some(stored) = ctx.prev.change_id.as_deref() else {
            return Changes::Lost {
                reason: format!(
                    "no change-tracking id was recorded at the last backup (the host now reports {}): full read + compare",
                    d.current
                ),
                reset: false,
            };
        };
        match d.since_id(stored) {
            RctAnswer::Unchanged => Changes::Ranges(Vec::new()),
            RctAnswer::Ranges(r) => Changes::Ranges(r),
            RctAnswer::Unknown { .. } => Changes::Lost {
                reason: format!(
                    "change-tracking id {stored} unknown to the host: full read + compare"
                ),
                reset: false,
            },
            RctAnswer::Reset { current } => Changes::Lost {
                reason: format!(
                    "change tracking was reset on the host (id {stored} dropped, now {current}): full read + compare"
                ),
                reset: true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
      "Virtual Hard Disks/web01-os.vhdx": {
        "current": "rct-0003",
        "since": {
          "rct-0002": [[1048576, 65536], [73400320, 4194304]],
          "rct-0001": [[0, 1073741824]]
        }
      }
    }"#;

    #[test]
    fn parses_the_documented_example() {
        let f = parse(GOOD.as_bytes()).expect("parse");
        let d = &f.disks["Virtual Hard Disks/web01-os.vhdx"];
        assert_eq!(d.since_id("rct-0003"), RctAnswer::Unchanged);
        assert_eq!(
            d.since_id("rct-0002"),
            RctAnswer::Ranges(vec![(1048576, 65536), (73400320, 4194304)])
        );
        assert!(matches!(d.since_id("rct-0009"), RctAnswer::Unknown { .. }));
    }

    #[test]
    fn reset_is_told_from_unknown() {
        let f = parse(br#"{"a.vhdx": {"current": "rct-9"}}"#).expect("parse");
        assert_eq!(
            f.disks["a.vhdx"].since_id("rct-1"),
            RctAnswer::Reset {
                current: "rct-9".into()
            }
        );
    }

    #[test]
    fn overlapping_and_unsorted_ranges_merge() {
        let f = parse(
            br#"{"a": {"current": "2", "since": {"1": [[100, 50], [0, 10], [120, 100], [5, 5]]}}}"#,
        )
        .expect("parse");
        assert_eq!(
            f.disks["a"].since_id("1"),
            RctAnswer::Ranges(vec![(0, 10), (100, 120)])
        );
    }

    #[test]
    fn huge_ranges_saturate_instead_of_overflowing() {
        let max = u64::MAX;
        let text = format!(
            r#"{{"a": {{"current": "2", "since": {{"1": [[{max}, {max}], [10, {max}]]}}}}}}"#
        );
        let f = parse(text.as_bytes()).expect("parse");
        let RctAnswer::Ranges(r) = f.disks["a"].since_id("1") else {
            panic!("ranges expected")
        };
        assert_eq!(r, vec![(10, max - 10)]);
        // And the chunk mapping clips them to the disk.
        assert_eq!(
            super::super::chunks_of_ranges(&r, 1 << 20, 3 << 20),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn hostile_input_gives_clear_errors() {
        let cases: &[(&str, &str)] = &[
            ("not json", "not valid JSON"),
            ("[]", "top level must be an object"),
            (r#"{"a": 5}"#, "must be an object"),
            (r#"{"a": {"since": {}}}"#, "\"current\" must be"),
            (r#"{"a": {"current": ""}}"#, "\"current\" must be"),
            (
                r#"{"a": {"current": "x", "since": []}}"#,
                "\"since\" must be",
            ),
            (
                r#"{"a": {"current": "x", "since": {"y": 3}}}"#,
                "must be an array",
            ),
            (
                r#"{"a": {"current": "x", "since": {"y": [[1]]}}}"#,
                "not [offset, length]",
            ),
            (
                r#"{"a": {"current": "x", "since": {"y": [[-1, 5]]}}}"#,
                "offset -1",
            ),
            (
                r#"{"a": {"current": "x", "since": {"y": [[1, -5]]}}}"#,
                "length -5",
            ),
            (
                r#"{"a": {"current": "x", "since": {"y": [[1.5, 5]]}}}"#,
                "offset 1.5",
            ),
            (
                r#"{"a": {"current": "x", "since": {"y": [[1e30, 5]]}}}"#,
                "not a whole number",
            ),
            (
                r#"{"a": {"current": "x", "since": {"y": [["0", 5]]}}}"#,
                "not a whole number",
            ),
            (r#"{"a": {"current": "x""#, "not valid JSON"),
        ];
        for (text, want) in cases {
            let e = parse(text.as_bytes()).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = parse(s.as_bytes());
        }

        #[test]
        fn ranges_never_panic(a in proptest::num::u64::ANY, b in proptest::num::u64::ANY, c in proptest::num::u64::ANY) {
            let text = format!(r#"{{"d": {{"current": "2", "since": {{"1": [[{a}, {b}], [{c}, {a}]]}}}}}}"#);
            let f = parse(text.as_bytes()).expect("valid numbers parse");
            if let RctAnswer::Ranges(r) = f.disks["d"].since_id("1") {
                let _ = super::super::chunks_of_ranges(&r, 1 << 20, 64 << 30);
            }
        }
    }
}
