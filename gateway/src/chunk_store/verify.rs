//! `verify`: re-read every chunk the selected recovery points reference,
//! check its AES-GCM tag, decompress it, re-hash it against its id, and check
//! that every index of those points opens. Damage is reported with every
//! committed point that references the damaged chunk, not only the selected
//! ones, because all of them have lost data.
//!
//! Reads pack by pack in offset order on blocking threads; only ids and
//! locations are held in memory, never chunk data beyond one chunk per task.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use tierback_format::ids::{ChunkId, PackId, PointId};

use super::{blocking, ChunkStore, StoreError};
use crate::catalog::ChunkLocation;

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Recovery points whose data was checked.
    pub points_checked: u64,
    /// Distinct chunks read and checked.
    pub chunks_checked: u64,
    /// Sealed bytes read from packs.
    pub bytes_checked: u64,
    /// Every chunk that failed, in (pack, offset) order.
    pub damaged: Vec<DamagedChunk>,
    /// Indexes that did not open: (point, stream number, reason).
    pub damaged_indexes: Vec<(PointId, u32, String)>,
}

/// One damaged chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedChunk {
    /// The chunk.
    pub chunk_id: ChunkId,
    /// Its pack; all zeros when the catalog has no location for it at all.
    pub pack_id: PackId,
    /// Offset of its record in the pack (0 when it has no location).
    pub offset: u64,
    /// What failed.
    pub reason: String,
    /// Every committed point that references it, sorted.
    pub points: Vec<PointId>,
}

pub(super) async fn run(
    store: &ChunkStore,
    points: Option<&[PointId]>,
) -> Result<VerifyReport, StoreError> {
    let selected = match points {
        Some(p) => p.to_vec(),
        None => store.catalog.all_point_ids().await?,
    };
    let mut report = VerifyReport::default();
    let mut referenced: HashSet<ChunkId> = HashSet::new();
    for point in &selected {
        let (_, streams) = store
            .catalog
            .get_point(point)
            .await?
            .ok_or(StoreError::PointNotFound(*point))?;
        for s in streams {
            let stream_no = u32::try_from(s.stream_no).map_err(|_| {
                StoreError::Internal(format!("stream number {} out of range", s.stream_no))
            })?;
            match store.read_index(point, stream_no).await {
                Ok(idx) => referenced.extend(idx.entries.iter().map(|(_, id)| *id)),
                Err(e) => report
                    .damaged_indexes
                    .push((*point, stream_no, e.to_string())),
            }
        }
        report.points_checked += 1;
    }

    let ids: Vec<ChunkId> = referenced.into_iter().collect();
    let locations = store.catalog.lookup_chunks(&ids).await?;
    let mut by_pack: BTreeMap<PackId, Vec<(ChunkId, ChunkLocation)>> = BTreeMap::new();
    let mut damaged: Vec<(ChunkId, PackId, u64, String)> = Vec::new();
    for (id, loc) in ids.iter().zip(locations) {
        match loc {
            Some(loc) => by_pack.entry(loc.pack_id).or_default().push((*id, loc)),
            None => damaged.push((
                *id,
                PackId([0; 16]),
                0,
                "chunk is not in the catalog".into(),
            )),
        }
    }
    report.chunks_checked = ids.len() as u64;

    for (pack, mut chunks) in by_pack {
        chunks.sort_by_key(|(_, l)| l.offset);
        let shared = store.shared.clone();
        let (bytes, bad) = blocking(move || {
            let mut bytes = 0u64;
            let mut bad = Vec::new();
            // A fresh handle, not the read cache: verify checks what is on
            // disk now, and scanning every pack would only churn the cache.
            let file = std::fs::File::open(shared.layout.pack_path(&pack));
            for (id, loc) in &chunks {
                let checked = match &file {
                    Ok(f) => {
                        bytes += u64::from(loc.len);
                        shared.read_record(f, id, loc)
                    }
                    Err(e) => Err(super::pack_open_error(
                        loc,
                        std::io::Error::new(e.kind(), e.to_string()),
                    )),
                };
                if let Err(e) = checked {
                    bad.push((*id, pack, loc.offset, e.to_string()));
                }
            }
            (bytes, bad)
        })
        .await?;
        report.bytes_checked += bytes;
        damaged.extend(bad);
    }

    // GC may have moved a chunk (and deleted its old pack) while we read:
    // a chunk whose location changed since is read again at the new one.
    let mut confirmed = Vec::with_capacity(damaged.len());
    for d in damaged {
        let now = store.catalog.chunk_location(&d.0).await?;
        match now {
            Some(loc) if loc.pack_id != d.1 || loc.offset != d.2 => {
                let shared = store.shared.clone();
                let id = d.0;
                match blocking(move || shared.read_chunk(&id, &loc)).await? {
                    Ok(_) => {}
                    Err(e) => confirmed.push((d.0, loc.pack_id, loc.offset, e.to_string())),
                }
            }
            _ => confirmed.push(d),
        }
    }
    let mut damaged = confirmed;

    // Prune may have deleted selected points meanwhile: damage that no
    // committed point needs any more is not damage.
    if !report.damaged_indexes.is_empty() {
        let committed: HashSet<PointId> =
            store.catalog.all_point_ids().await?.into_iter().collect();
        report
            .damaged_indexes
            .retain(|(p, _, _)| committed.contains(p));
    }

    if !damaged.is_empty() {
        let mut refs = points_referencing(store, damaged.iter().map(|d| d.0).collect()).await?;
        damaged.retain(|d| refs.contains_key(&d.0));
        damaged.sort_by_key(|d| (d.1, d.2));
        report.damaged = damaged
            .into_iter()
            .map(|(chunk_id, pack_id, offset, reason)| DamagedChunk {
                points: refs
                    .remove(&chunk_id)
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                chunk_id,
                pack_id,
                offset,
                reason,
            })
            .collect();
    }
    Ok(report)
}

/// Every committed point whose indexes name any of `wanted` (reads all
/// committed indexes; only done when damage was found). Unreadable indexes
/// are skipped here: they are reported when their point is verified.
async fn points_referencing(
    store: &ChunkStore,
    wanted: HashSet<ChunkId>,
) -> Result<HashMap<ChunkId, BTreeSet<PointId>>, StoreError> {
    let mut out: HashMap<ChunkId, BTreeSet<PointId>> = HashMap::new();
    for (point, stream_no) in store.catalog.committed_streams().await? {
        let Ok(idx) = store.read_index(&point, stream_no).await else {
            continue;
        };
        for (_, id) in &idx.entries {
            if wanted.contains(id) {
                out.entry(*id).or_default().insert(point);
            }
        }
    }
    Ok(out)
}
