//! GC tests: mark and sweep against a real catalog in a temp dir, including
//! backups running during GC and a crash after every step.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tierback_format::ids::{ChunkHash, ChunkId, PackId, PointId};
use tierback_format::index::DiskIndex;

use super::gc::GcStep;
use super::tests::*;
use super::*;

/// Puts `chunks` and flushes them into one pack; returns their ids.
async fn stored(store: &ChunkStore, chunks: &[Bytes]) -> Vec<ChunkId> {
    for c in chunks {
        assert!(matches!(put_ok(store, c).await, PutOutcome::Stored { .. }));
    }
    store.flush().await.expect("flush");
    chunks
        .iter()
        .map(|c| store.chunk_id(&ChunkHash::of(c)))
        .collect()
}

async fn assert_readable(store: &ChunkStore, chunks: &[Bytes]) {
    for c in chunks {
        let got = store
            .get(&store.chunk_id(&ChunkHash::of(c)))
            .await
            .expect("live chunk readable");
        assert_eq!(&got, c);
    }
}

async fn assert_gone(store: &ChunkStore, chunks: &[Bytes]) {
    for c in chunks {
        assert!(matches!(
            store.get(&store.chunk_id(&ChunkHash::of(c))).await,
            Err(StoreError::NotFound(_))
        ));
    }
    let hashes: Vec<ChunkHash> = chunks.iter().map(|c| ChunkHash::of(c)).collect();
    assert!(store
        .lacking(&hashes)
        .await
        .expect("lacking")
        .iter()
        .all(|l| *l));
}

async fn assert_verify_clean(store: &ChunkStore) {
    let r = store.verify(None).await.expect("verify");
    assert!(
        r.damaged.is_empty() && r.damaged_indexes.is_empty(),
        "verify found damage: {r:?}"
    );
}

fn disk_bytes(root: &Path) -> u64 {
    pack_files(root)
        .iter()
        .map(|p| std::fs::metadata(p).expect("stat").len())
        .sum()
}

/// Pack files on disk and packs in the catalog are the same set.
async fn assert_files_match_catalog(root: &Path, catalog: &Catalog) {
    let on_disk: HashSet<String> = pack_files(root)
        .iter()
        .map(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .expect("name")
                .to_string()
        })
        .collect();
    let known: HashSet<String> = catalog
        .list_packs()
        .await
        .expect("packs")
        .iter()
        .map(|p| p.id.to_string())
        .collect();
    assert_eq!(on_disk, known);
}

fn nothing_done(r: &GcReport) -> bool {
    r.packs_removed == 0
        && r.packs_compacted == 0
        && r.chunks_removed == 0
        && r.orphan_files_removed == 0
        && r.orphan_indexes_removed == 0
}

#[tokio::test]
async fn dead_pack_is_deleted_and_live_pack_kept() {
    let f = fixture(StoreConfig::default()).await;
    let a: Vec<Bytes> = (0..3).map(|i| noise(i, 50_000)).collect();
    let b: Vec<Bytes> = (10..13).map(|i| noise(i, 50_000)).collect();
    let ia = stored(&f.store, &a).await;
    let ib = stored(&f.store, &b).await;
    let (p1, p2) = (PointId([1; 16]), PointId([2; 16]));
    commit(&f, p1, "vm", &[ia]).await;
    commit(&f, p2, "vm", &[ib]).await;

    let r = f.store.gc(GcOptions::default()).await.expect("gc");
    assert!(nothing_done(&r), "{r:?}");
    assert_eq!((r.live_chunks, r.packs_before, r.chunks_before), (6, 2, 6));

    assert_eq!(f.store.delete_points(&[p2]).await.expect("delete"), 1);
    assert!(f.catalog.get_point(&p2).await.expect("get").is_none());
    assert!(!f.store.index_path(&p2, 0).exists());
    assert!(!f.store.index_path(&p2, 0).parent().expect("dir").exists());
    assert_eq!(f.store.delete_points(&[p2]).await.expect("again"), 0);

    let before = disk_bytes(f.dir.path());
    let dry = f
        .store
        .gc(GcOptions {
            dry_run: true,
            ..GcOptions::default()
        })
        .await
        .expect("dry run");
    assert_eq!((dry.packs_removed, dry.chunks_removed), (1, 3));
    assert_eq!(disk_bytes(f.dir.path()), before, "dry run changes nothing");

    let r = f.store.gc(GcOptions::default()).await.expect("gc");
    assert_eq!(
        (r.packs_removed, r.chunks_removed, r.packs_compacted),
        (1, 3, 0)
    );
    assert!(r.bytes_reclaimed > 150_000, "{r:?}");
    assert_eq!((r.packs_after, r.chunks_after), (1, 3));
    assert_eq!(r.bytes_before - r.bytes_after, r.bytes_reclaimed);
    assert_eq!(disk_bytes(f.dir.path()), before - r.bytes_reclaimed);
    assert_readable(&f.store, &a).await;
    assert_gone(&f.store, &b).await;
    assert_verify_clean(&f.store).await;
    assert_files_match_catalog(f.dir.path(), &f.catalog).await;

    let again = f.store.gc(GcOptions::default()).await.expect("gc again");
    assert!(nothing_done(&again), "idempotent: {again:?}");

    // Index files of no committed point: removed once an hour old.
    let idx = DiskIndex {
        size: 1 << 20,
        chunk_size: 1 << 20,
        entries: vec![],
    };
    let (stale, fresh) = (PointId([8; 16]), PointId([9; 16]));
    for p in [stale, fresh] {
        f.store
            .write_index_unchecked(&p, 0, &idx)
            .await
            .expect("index");
    }
    let stale_dir = f
        .store
        .index_path(&stale, 0)
        .parent()
        .expect("dir")
        .to_path_buf();
    std::fs::File::open(&stale_dir)
        .expect("open dir")
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .expect("age dir");
    let r = f.store.gc(GcOptions::default()).await.expect("gc");
    assert_eq!(r.orphan_indexes_removed, 1);
    assert!(!stale_dir.exists());
    assert!(
        f.store.index_path(&fresh, 0).exists(),
        "a commit may be writing it"
    );
    assert!(f.store.index_path(&p1, 0).exists());
}

#[tokio::test]
async fn sparse_pack_is_compacted_and_stays_readable() {
    let f = fixture(StoreConfig::default()).await;
    let c: Vec<Bytes> = (0..10)
        .map(|i| {
            if i % 2 == 0 {
                noise(i, 40_000)
            } else {
                text(i, 80_000)
            }
        })
        .collect();
    let ids = stored(&f.store, &c).await;
    let (p1, p2) = (PointId([1; 16]), PointId([2; 16]));
    commit(&f, p1, "vm", &[ids[..3].to_vec()]).await;
    commit(&f, p2, "vm", &[ids[3..].to_vec()]).await;
    let old = pack_files(f.dir.path());
    assert_eq!(old.len(), 1);
    let old_id = f
        .catalog
        .chunk_location(&ids[0])
        .await
        .expect("loc")
        .expect("present")
        .pack_id;
    let before = disk_bytes(f.dir.path());

    f.store.delete_points(&[p2]).await.expect("delete");
    let r = f.store.gc(GcOptions::default()).await.expect("gc");
    assert_eq!(
        (
            r.packs_compacted,
            r.chunks_moved,
            r.chunks_removed,
            r.packs_removed
        ),
        (1, 3, 7, 0),
        "{r:?}"
    );
    assert!(!old[0].exists(), "old pack file deleted");
    assert_eq!(pack_files(f.dir.path()).len(), 1);
    assert!(disk_bytes(f.dir.path()) < before / 2);
    assert!(f.catalog.get_pack(&old_id).await.expect("pack").is_none());
    for id in &ids[..3] {
        let loc = f
            .catalog
            .chunk_location(id)
            .await
            .expect("loc")
            .expect("present");
        assert_ne!(loc.pack_id, old_id, "moved to the new pack");
    }
    assert_readable(&f.store, &c[..3]).await;
    assert_gone(&f.store, &c[3..]).await;
    let v = f.store.verify(None).await.expect("verify");
    assert_eq!(v.chunks_checked, 3);
    assert!(v.damaged.is_empty() && v.damaged_indexes.is_empty());
    assert_files_match_catalog(f.dir.path(), &f.catalog).await;

    // Survives a reopen; a second run has nothing to do.
    let again = open_store(f.dir.path(), &f.catalog, StoreConfig::default()).await;
    assert_readable(&again, &c[..3]).await;
    let r = again.gc(GcOptions::default()).await.expect("gc again");
    assert!(nothing_done(&r), "idempotent: {r:?}");
    // Threshold 0 never compacts; 100 compacts anything not completely live.
    assert_eq!(
        again
            .gc(GcOptions {
                compact_below_percent: 0,
                ..GcOptions::default()
            })
            .await
            .expect("gc")
            .packs_compacted,
        0
    );
}

#[tokio::test]
async fn chunks_referenced_by_a_running_backup_survive() {
    let f = fixture(StoreConfig::default()).await;
    let c: Vec<Bytes> = (0..4).map(|i| noise(i, 40_000)).collect();
    let ids = stored(&f.store, &c).await; // no point names them: garbage

    // A backup that began before GC and heard "present" before GC started.
    let writer = f.store.begin_writer();
    assert_eq!(
        f.store
            .lacking(&[ChunkHash::of(&c[0])])
            .await
            .expect("lacking"),
        vec![false]
    );
    assert_eq!(put_ok(&f.store, &c[1]).await, PutOutcome::Duplicate);
    let no_compaction = GcOptions {
        compact_below_percent: 0,
        ..GcOptions::default()
    };
    let r = f.store.gc(no_compaction).await.expect("gc");
    assert_eq!((r.packs_removed, r.chunks_removed), (0, 0), "{r:?}");
    assert_readable(&f.store, &c[..2]).await;

    // It commits; its session ends.
    commit(&f, PointId([1; 16]), "vm", &[ids[..2].to_vec()]).await;
    drop(writer);
    assert_eq!(
        f.store.touches.len(),
        0,
        "touches forgotten with the backup"
    );
    let r = f
        .store
        .gc(GcOptions {
            compact_below_percent: 60,
            ..GcOptions::default()
        })
        .await
        .expect("gc");
    assert_eq!((r.packs_compacted, r.chunks_removed), (1, 2), "{r:?}");
    assert_readable(&f.store, &c[..2]).await;
    assert_gone(&f.store, &c[2..]).await;
    assert_verify_clean(&f.store).await;
}

#[tokio::test]
async fn chunk_dedup_hit_during_gc_survives_and_second_gc_is_refused() {
    let f = fixture(StoreConfig::default()).await;
    let c: Vec<Bytes> = (0..3).map(|i| noise(i, 40_000)).collect();
    let ids = stored(&f.store, &c).await; // unreferenced: a dead pack
    let store = Arc::new(f.store);

    // Hold the sweep lock shared (as a dedup answer does) so GC, having
    // planned the pack as dead, waits for its exclusive lock.
    let shared_lock = store.sweep.read().await;
    let gc = {
        let s = store.clone();
        tokio::spawn(async move { s.gc(GcOptions::default()).await })
    };
    // Once GC queues for the exclusive lock it holds every free permit, so
    // a shared try-lock fails: that is when it has planned the pack as dead.
    let t0 = std::time::Instant::now();
    while store.sweep.try_read().is_ok() {
        assert!(t0.elapsed().as_secs() < 20, "GC never reached its sweep");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(matches!(
        store.gc(GcOptions::default()).await,
        Err(StoreError::GcRunning)
    ));
    // A backup is told "present" now (`lacking` touches under the shared lock).
    store.touches.touch([&ids[0]]);
    drop(shared_lock);
    let r = gc.await.expect("join").expect("gc");
    assert_eq!((r.packs_removed, r.packs_skipped), (0, 1), "{r:?}");
    assert_readable(&store, &c).await;
}

#[tokio::test]
async fn open_pack_chunks_survive_gc() {
    let f = fixture(StoreConfig::default()).await;
    let old = noise(1, 30_000);
    stored(&f.store, std::slice::from_ref(&old)).await; // dead
    let x = noise(2, 30_000);
    put_ok(&f.store, &x).await; // pending, named by nothing, no backup running
    let r = f.store.gc(GcOptions::default()).await.expect("gc");
    assert_eq!(r.packs_removed, 1);
    f.store.flush().await.expect("flush");
    assert_readable(&f.store, std::slice::from_ref(&x)).await;
}

#[tokio::test]
async fn index_naming_a_collected_chunk_is_refused_until_resent() {
    let f = fixture(StoreConfig::default()).await;
    let x = noise(1, 30_000);
    let ids = stored(&f.store, std::slice::from_ref(&x)).await;
    f.store.gc(GcOptions::default()).await.expect("gc");
    let p = PointId([7; 16]);
    let idx = DiskIndex {
        size: 1 << 20,
        chunk_size: 1 << 20,
        entries: vec![(0, ids[0])],
    };
    let e = f.store.write_index(&p, 0, &idx).await.expect_err("refused");
    assert!(matches!(e, StoreError::ChunksMissing { count: 1 }), "{e}");
    assert!(!f.store.index_path(&p, 0).exists());
    // The agent sends it again (it is lacking now) and commits.
    assert!(matches!(
        put_ok(&f.store, &x).await,
        PutOutcome::Stored { .. }
    ));
    f.store.flush().await.expect("flush");
    f.store.write_index(&p, 0, &idx).await.expect("write");
}

#[tokio::test]
async fn crash_after_each_gc_step_leaves_every_live_chunk_readable() {
    for step in [
        GcStep::DeadPackDropped,
        GcStep::NewPacksSealed,
        GcStep::ChunksMoved,
    ] {
        let f = fixture(StoreConfig::default()).await;
        let dead: Vec<Bytes> = (0..3).map(|i| noise(100 + i, 40_000)).collect();
        let sparse: Vec<Bytes> = (0..6).map(|i| noise(200 + i, 40_000)).collect();
        stored(&f.store, &dead).await;
        let sid = stored(&f.store, &sparse).await;
        commit(&f, PointId([1; 16]), "vm", &[sid[..2].to_vec()]).await;

        f.store
            .shared
            .faults
            .gc_stop_after
            .store(step as u8, Ordering::SeqCst);
        let e = f.store.gc(GcOptions::default()).await.expect_err("stopped");
        assert!(e.to_string().contains("simulated crash"), "{e}");

        // The gateway dies here; it restarts on the same files and catalog.
        let Fixture {
            dir,
            catalog,
            store,
        } = f;
        drop(store);
        let store = open_store(dir.path(), &catalog, StoreConfig::default()).await;
        assert_readable(&store, &sparse[..2]).await;
        assert_verify_clean(&store).await;

        let r = store
            .gc(GcOptions::default())
            .await
            .expect("gc after restart");
        assert_readable(&store, &sparse[..2]).await;
        assert_gone(&store, &dead).await;
        assert_gone(&store, &sparse[2..]).await;
        assert_verify_clean(&store).await;
        assert_files_match_catalog(dir.path(), &catalog).await;
        if step != GcStep::NewPacksSealed {
            assert_eq!(r.orphan_files_removed, 1, "{step:?}: {r:?}");
        }

        let again = store.gc(GcOptions::default()).await.expect("third gc");
        assert!(nothing_done(&again), "{step:?} idempotent: {again:?}");
        let packs: Vec<PackId> = catalog
            .list_packs()
            .await
            .expect("packs")
            .iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(packs.len(), 1, "{step:?}: one compacted pack remains");
    }
}

#[tokio::test]
async fn a_delta_keeps_its_base_alive_until_the_delta_is_gone() {
    let f = fixture(StoreConfig::default()).await;
    let base = noise(1, 1 << 20);
    let bid = stored(&f.store, std::slice::from_ref(&base)).await[0];
    let day2 = changed(&base, 4096, 2);
    let h2 = put_delta(&f.store, &day2, &base).await;
    let id2 = f.store.chunk_id(&h2);
    let (p1, p2) = (PointId([1; 16]), PointId([2; 16]));
    commit(&f, p1, "vm", &[vec![bid]]).await;
    commit(&f, p2, "vm", &[vec![id2]]).await;

    // Day 1 expires: its chunk is no point's, but day 2's delta needs it.
    f.store.delete_points(&[p1]).await.expect("delete");
    let r = f.store.gc(GcOptions::default()).await.expect("gc");
    assert_eq!(r.packs_removed, 0, "{r:?}");
    assert_readable(&f.store, &[base.clone(), day2.clone()]).await;
    assert_verify_clean(&f.store).await;

    // Day 2 expires too: the delta goes, its base one run later.
    f.store.delete_points(&[p2]).await.expect("delete");
    let r = f.store.gc(GcOptions::default()).await.expect("gc");
    assert_eq!(r.chunks_removed, 1, "{r:?}");
    assert_gone(&f.store, std::slice::from_ref(&day2)).await;
    assert_readable(&f.store, std::slice::from_ref(&base)).await;
    let r = f.store.gc(GcOptions::default()).await.expect("gc");
    assert_eq!(r.chunks_removed, 1, "{r:?}");
    assert_gone(&f.store, &[base]).await;
    assert_files_match_catalog(f.dir.path(), &f.catalog).await;
}

#[tokio::test]
async fn compaction_runs_in_bounded_batches_and_each_batch_lands() {
    use super::gc::{COMPACT_BATCH_PACKS, COMPACT_BATCH_TARGETS};
    // Packs of three 40 kB chunks (sealed once past 100 kB), one chunk of
    // each live: every pack is sparse. A batch ends once it re-wrote
    // COMPACT_BATCH_TARGETS packs' worth (40 live chunks here), so 60
    // packs take two batches, each ending with a flush that seals a last,
    // partly filled pack: 13 + 1 and 6 + 1 new packs of 3, 1, 3 and 2
    // chunks (one batch would have made 20 full ones).
    let target = 100_000;
    const { assert!(COMPACT_BATCH_TARGETS == 16, "the counts below assume it") };
    const { assert!(COMPACT_BATCH_PACKS > 60) };
    let cfg = StoreConfig {
        pack_target_size: target,
        ..StoreConfig::default()
    };
    let f = fixture(cfg).await;
    let mut live = Vec::new();
    let mut dead = Vec::new();
    let mut live_ids = Vec::new();
    for p in 0..60u64 {
        let c: Vec<Bytes> = (0..3).map(|i| noise(1000 + p * 3 + i, 40_000)).collect();
        let ids = stored(&f.store, &c).await;
        live_ids.push(ids[0]);
        live.push(c[0].clone());
        dead.extend_from_slice(&c[1..]);
    }
    assert_eq!(pack_files(f.dir.path()).len(), 60);
    commit(&f, PointId([7; 16]), "vm", &[live_ids]).await;

    let r = f.store.gc(GcOptions::default()).await.expect("gc");
    assert_eq!(
        (r.packs_compacted, r.chunks_moved, r.chunks_removed),
        (60, 60, 120),
        "{r:?}"
    );
    assert_eq!(r.packs_after, 21, "two batches: {r:?}");
    assert_readable(&f.store, &live).await;
    assert_gone(&f.store, &dead).await;
    assert_verify_clean(&f.store).await;
    assert_files_match_catalog(f.dir.path(), &f.catalog).await;
    let again = f.store.gc(GcOptions::default()).await.expect("gc again");
    assert!(nothing_done(&again), "{again:?}");
}
