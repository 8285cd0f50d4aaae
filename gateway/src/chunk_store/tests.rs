//! Tests of the chunk store against a real catalog in a temp dir.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tierback_format::crypto::MasterKey;
use tierback_format::ids::{ChunkHash, ChunkId, PointId};
use tierback_format::index::DiskIndex;
use tierback_format::pack::parse_pack;

use super::*;
use crate::catalog::{Catalog, NewPoint, NewStream};

pub(super) const MASTER: [u8; 32] = [0x11; 32];

pub(super) struct Fixture {
    pub dir: tempfile::TempDir,
    pub catalog: Catalog,
    pub store: ChunkStore,
}

pub(super) async fn fixture(cfg: StoreConfig) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let catalog = Catalog::open(&dir.path().join("catalog.db"))
        .await
        .expect("catalog");
    let store = open_store(dir.path(), &catalog, cfg).await;
    Fixture {
        dir,
        catalog,
        store,
    }
}

pub(super) async fn open_store(dir: &Path, catalog: &Catalog, cfg: StoreConfig) -> ChunkStore {
    let keys = Keys::derive(&MasterKey::from_bytes(MASTER));
    ChunkStore::open(dir, keys, catalog.clone(), cfg)
        .await
        .expect("open store")
}

/// Incompressible bytes, distinct per seed.
pub(super) fn noise(seed: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    Bytes::from(v)
}

/// Compressible bytes, distinct per seed.
pub(super) fn text(seed: u64, len: usize) -> Bytes {
    let line = format!("chunk {seed} of a virtual disk\n");
    Bytes::from(
        line.as_bytes()
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect::<Vec<u8>>(),
    )
}

pub(super) async fn put_ok(store: &ChunkStore, data: &Bytes) -> PutOutcome {
    store
        .put(ChunkHash::of(data), data.clone())
        .await
        .expect("put")
}

pub(super) fn pack_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(root.join("packs")).expect("ls packs") {
        for f in std::fs::read_dir(sub.expect("entry").path()).expect("ls sub") {
            let p = f.expect("entry").path();
            // Sealed packs only, not the open pack's tmp file.
            if p.extension().is_some_and(|e| e == "pack") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

pub(super) fn all_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("ls") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

pub(super) fn small_packs() -> StoreConfig {
    StoreConfig {
        pack_target_size: 200 << 10,
        zstd_level: 1,
    }
}

pub(super) async fn commit(f: &Fixture, point: PointId, vm: &str, streams: &[Vec<ChunkId>]) {
    let mut rows = Vec::new();
    for (n, ids) in streams.iter().enumerate() {
        let index = DiskIndex {
            size: 1 << 30,
            chunk_size: 1 << 20,
            entries: ids
                .iter()
                .enumerate()
                .map(|(i, id)| (i as u64 * 2, *id))
                .collect(),
        };
        f.store
            .write_index(&point, n as u32, &index)
            .await
            .expect("write index");
        rows.push(NewStream {
            stream_no: n as u32,
            kind: "disk".into(),
            path: format!("disk{n}.vhdx"),
            controller: None,
            location: None,
            size: index.size,
            chunk_size: index.chunk_size,
            logical_sector: 512,
            physical_sector: 4096,
            chunk_count: ids.len() as u64,
        });
    }
    f.catalog
        .commit_point(&NewPoint {
            id: point,
            vm_id: vm.into(),
            vm_name: vm.into(),
            created_at: 1,
            kind: "full".into(),
            agent_id: "a".into(),
            job_id: None,
            logical_bytes: 0,
            stored_bytes: 0,
            bytes_read: 0,
            bytes_sent: 0,
            streams: rows,
        })
        .await
        .expect("commit point");
}

#[tokio::test]
async fn put_flush_get_round_trip() {
    let f = fixture(StoreConfig::default()).await;
    let chunks = vec![
        text(1, 1 << 20),
        noise(2, 300_000),
        Bytes::from_static(b"tiny"),
        text(3, 65_536),
    ];
    let ids: Vec<ChunkId> = chunks
        .iter()
        .map(|c| f.store.chunk_id(&ChunkHash::of(c)))
        .collect();
    for c in &chunks {
        match put_ok(&f.store, c).await {
            PutOutcome::Stored { stored_bytes } => assert!(stored_bytes > 0),
            other => panic!("first put: {other:?}"),
        }
    }
    // Pending is not durable: not readable, and missing at commit.
    assert!(matches!(
        f.store.get(&ids[0]).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(f.store.missing(&ids).await.expect("missing"), ids);
    f.store.flush().await.expect("flush");
    assert!(f.store.missing(&ids).await.expect("missing").is_empty());
    for (c, id) in chunks.iter().zip(&ids) {
        assert_eq!(&f.store.get(id).await.expect("get"), c);
    }
    // One pack, readable on its own with the master key.
    let packs = pack_files(f.dir.path());
    assert_eq!(packs.len(), 1);
    let bytes = std::fs::read(&packs[0]).expect("read pack");
    let master = MasterKey::from_bytes(MASTER);
    let (_, toc) = parse_pack(|p| master.pack_key(p), &bytes).expect("parse pack");
    assert_eq!(toc.iter().map(|e| e.chunk_id).collect::<Vec<_>>(), ids);
    assert!(bytes.len() < (1 << 20), "text compresses: {}", bytes.len());
    // Flushing with nothing open writes nothing.
    f.store.flush().await.expect("flush");
    assert_eq!(pack_files(f.dir.path()).len(), 1);
    // Survives a reopen.
    let again = open_store(f.dir.path(), &f.catalog, StoreConfig::default()).await;
    assert_eq!(&again.get(&ids[1]).await.expect("get"), &chunks[1]);
}

#[tokio::test]
async fn duplicates_are_stored_once() {
    let f = fixture(StoreConfig::default()).await;
    let c = noise(7, 100_000);
    assert!(matches!(
        put_ok(&f.store, &c).await,
        PutOutcome::Stored { .. }
    ));
    assert_eq!(put_ok(&f.store, &c).await, PutOutcome::Duplicate, "pending");
    f.store.flush().await.expect("flush");
    assert_eq!(
        put_ok(&f.store, &c).await,
        PutOutcome::Duplicate,
        "catalogued"
    );
    // Concurrent puts of one new chunk: exactly one stores it.
    let store = Arc::new(f.store);
    let d = noise(8, 100_000);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (s, d) = (store.clone(), d.clone());
        set.spawn(async move { s.put(ChunkHash::of(&d), d).await });
    }
    let mut stored = 0;
    while let Some(r) = set.join_next().await {
        if let PutOutcome::Stored { .. } = r.expect("join").expect("put") {
            stored += 1;
        }
    }
    assert_eq!(stored, 1);
    store.flush().await.expect("flush");
    let master = MasterKey::from_bytes(MASTER);
    let records: usize = pack_files(f.dir.path())
        .iter()
        .map(|p| {
            parse_pack(|id| master.pack_key(id), &std::fs::read(p).expect("read"))
                .expect("parse")
                .1
                .len()
        })
        .sum();
    assert_eq!(records, 2);
}

#[tokio::test]
async fn lacking_before_and_after_put_and_flush() {
    let f = fixture(StoreConfig::default()).await;
    let (a, b) = (text(1, 70_000), text(2, 70_000));
    let hashes = [ChunkHash::of(&a), ChunkHash::of(&b), ChunkHash::of(&a)];
    assert_eq!(
        f.store.lacking(&hashes).await.expect("lacking"),
        vec![true, true, false],
        "a hash asked twice is lacking at its first position only"
    );
    put_ok(&f.store, &a).await;
    assert_eq!(
        f.store.lacking(&hashes).await.expect("lacking"),
        vec![false, true, false],
        "pending counts"
    );
    f.store.flush().await.expect("flush");
    assert_eq!(
        f.store.lacking(&hashes).await.expect("lacking"),
        vec![false, true, false],
        "catalogued"
    );
    // More than one SQL batch, mixed.
    let many: Vec<ChunkHash> = (0..700u64)
        .map(|i| ChunkHash::of(&i.to_le_bytes()))
        .chain([hashes[0]])
        .collect();
    let l = f.store.lacking(&many).await.expect("lacking");
    assert_eq!(l.iter().filter(|x| **x).count(), 700);
    assert!(!l[700]);
    let reopened = open_store(f.dir.path(), &f.catalog, StoreConfig::default()).await;
    assert_eq!(
        reopened.lacking(&hashes).await.expect("lacking"),
        vec![false, true, false]
    );
}

#[tokio::test]
async fn hash_mismatch_stores_nothing() {
    let f = fixture(StoreConfig::default()).await;
    let data = text(1, 1000);
    let wrong = ChunkHash::of(b"something else");
    let e = f
        .store
        .put(wrong, data.clone())
        .await
        .expect_err("mismatch");
    assert!(
        matches!(e, StoreError::HashMismatch { expected, .. } if expected == wrong),
        "{e}"
    );
    assert!(e.to_string().contains("nothing was stored"));
    assert_eq!(
        f.store
            .lacking(&[wrong, ChunkHash::of(&data)])
            .await
            .expect("lacking"),
        vec![true, true]
    );
    f.store.flush().await.expect("flush");
    assert!(pack_files(f.dir.path()).is_empty());
    let big = Bytes::from(vec![0u8; MAX_CHUNK_SIZE + 1]);
    assert!(matches!(
        f.store.put(ChunkHash::of(&big), big).await,
        Err(StoreError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn flipped_byte_is_found_by_get_and_verify() {
    let f = fixture(StoreConfig::default()).await;
    let (a, b, c) = (noise(1, 50_000), noise(2, 50_000), text(3, 50_000));
    for x in [&a, &b, &c] {
        put_ok(&f.store, x).await;
    }
    f.store.flush().await.expect("flush");
    let id = |d: &Bytes| f.store.chunk_id(&ChunkHash::of(d));
    let (p1, p2, p3) = (PointId([1; 16]), PointId([2; 16]), PointId([3; 16]));
    commit(&f, p1, "vm1", &[vec![id(&a), id(&b)], vec![id(&c)]]).await;
    commit(&f, p2, "vm2", &[vec![id(&a)]]).await;
    commit(&f, p3, "vm3", &[vec![id(&c)]]).await;

    let clean = f.store.verify(None).await.expect("verify");
    assert_eq!((clean.points_checked, clean.chunks_checked), (3, 3));
    assert!(clean.bytes_checked > 100_000);
    assert!(clean.damaged.is_empty() && clean.damaged_indexes.is_empty());

    let loc = f
        .catalog
        .chunk_location(&id(&a))
        .await
        .expect("loc")
        .expect("present");
    let path = f.store.pack_path(&loc.pack_id);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[(loc.offset + 1000) as usize] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");

    let e = f.store.get(&id(&a)).await.expect_err("damaged");
    assert!(
        matches!(e, StoreError::Corrupt { pack, offset, .. } if pack == loc.pack_id && offset == loc.offset),
        "{e}"
    );
    assert_eq!(f.store.get(&id(&b)).await.expect("undamaged"), b);

    // Verifying only p1 names every point that lost data: p1 and p2.
    let r = f.store.verify(Some(&[p1])).await.expect("verify");
    assert_eq!(r.points_checked, 1);
    assert_eq!(r.chunks_checked, 3);
    assert_eq!(r.damaged.len(), 1);
    let d = &r.damaged[0];
    assert_eq!(
        (d.chunk_id, d.pack_id, d.offset),
        (id(&a), loc.pack_id, loc.offset)
    );
    assert_eq!(d.points, vec![p1, p2]);
    assert!(d.reason.contains("authentication failed"), "{}", d.reason);
    let r = f.store.verify(Some(&[p3])).await.expect("verify");
    assert!(r.damaged.is_empty());
    assert_eq!(f.store.verify(None).await.expect("verify").damaged.len(), 1);
    assert!(matches!(
        f.store.verify(Some(&[PointId([9; 16])])).await,
        Err(StoreError::PointNotFound(_))
    ));

    // A damaged index is reported too.
    let idx = f.store.index_path(&p3, 0);
    let mut ib = std::fs::read(&idx).expect("read idx");
    ib[20] ^= 0x80;
    std::fs::write(&idx, &ib).expect("write idx");
    let r = f.store.verify(Some(&[p3])).await.expect("verify");
    assert_eq!(r.damaged_indexes.len(), 1);
    assert_eq!((r.damaged_indexes[0].0, r.damaged_indexes[0].1), (p3, 0));

    // A missing pack file is damage, not an I/O failure of verify.
    std::fs::remove_file(&path).expect("rm pack");
    let r = f.store.verify(Some(&[p2])).await.expect("verify");
    assert_eq!(r.damaged.len(), 1);
    assert!(r.damaged[0].reason.contains("missing"));
}

#[tokio::test]
async fn swapped_records_fail_to_open() {
    let f = fixture(StoreConfig::default()).await;
    let (a, b) = (noise(1, 40_000), noise(2, 40_000));
    put_ok(&f.store, &a).await;
    put_ok(&f.store, &b).await;
    f.store.flush().await.expect("flush");
    let la = f
        .catalog
        .chunk_location(&f.store.chunk_id(&ChunkHash::of(&a)))
        .await
        .expect("a")
        .expect("a");
    let lb = f
        .catalog
        .chunk_location(&f.store.chunk_id(&ChunkHash::of(&b)))
        .await
        .expect("b")
        .expect("b");
    assert_eq!(
        (la.pack_id, la.len),
        (lb.pack_id, lb.len),
        "same pack, same sealed size"
    );
    let path = f.store.pack_path(&la.pack_id);
    let mut bytes = std::fs::read(&path).expect("read");
    let (ra, rb) = (
        la.offset as usize..(la.offset + u64::from(la.len)) as usize,
        lb.offset as usize..(lb.offset + u64::from(lb.len)) as usize,
    );
    let rec_a = bytes[ra.clone()].to_vec();
    let rec_b = bytes[rb.clone()].to_vec();
    bytes[ra].copy_from_slice(&rec_b);
    bytes[rb].copy_from_slice(&rec_a);
    std::fs::write(&path, &bytes).expect("write");
    for d in [&a, &b] {
        let e = f
            .store
            .get(&f.store.chunk_id(&ChunkHash::of(d)))
            .await
            .expect_err("swapped");
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    }
}

#[tokio::test]
async fn crash_leftovers_are_removed_and_their_chunks_lacking() {
    let f = fixture(StoreConfig::default()).await;
    let chunks = [text(1, 100_000), noise(2, 100_000)];
    for c in &chunks {
        put_ok(&f.store, c).await;
    }
    // Simulate a crash while the pack was being written: its .tmp is on disk,
    // nothing was renamed or catalogued.
    let open = f.store.state().open.take().expect("open pack");
    let id = *open.builder.id();
    let tmp = open.builder.tmp.clone();
    let final_path = f.store.pack_path(&id);
    assert!(tmp.exists(), "records stream into the pack's tmp file");
    drop(open);
    drop(f.store);

    let store = open_store(f.dir.path(), &f.catalog, StoreConfig::default()).await;
    assert!(!tmp.exists(), "crash garbage removed");
    assert!(!final_path.exists());
    let hashes: Vec<ChunkHash> = chunks.iter().map(|c| ChunkHash::of(c)).collect();
    assert_eq!(
        store.lacking(&hashes).await.expect("lacking"),
        vec![true, true]
    );
    // The agent resends them and they are stored normally.
    for c in &chunks {
        assert!(matches!(put_ok(&store, c).await, PutOutcome::Stored { .. }));
    }
    store.flush().await.expect("flush");
    assert_eq!(
        store.lacking(&hashes).await.expect("lacking"),
        vec![false, false]
    );
}

#[tokio::test]
async fn index_round_trip_and_tampering() {
    let f = fixture(StoreConfig::default()).await;
    let p = PointId([5; 16]);
    let i0 = DiskIndex {
        size: 10 << 20,
        chunk_size: 1 << 20,
        entries: vec![(0, ChunkId([1; 32])), (9, ChunkId([2; 32]))],
    };
    let i1 = DiskIndex {
        size: 4096,
        chunk_size: 1 << 20,
        entries: vec![(0, ChunkId([3; 32]))],
    };
    f.store
        .write_index_unchecked(&p, 0, &i0)
        .await
        .expect("write 0");
    f.store
        .write_index_unchecked(&p, 1, &i1)
        .await
        .expect("write 1");
    assert_eq!(f.store.read_index(&p, 0).await.expect("read 0"), i0);
    assert_eq!(f.store.read_index(&p, 1).await.expect("read 1"), i1);
    assert!(matches!(
        f.store.read_index(&p, 2).await,
        Err(StoreError::IndexNotFound { stream_no: 2, .. })
    ));

    // Swapped between streams: the AD binds the stream number.
    let (f0, f1) = (f.store.index_path(&p, 0), f.store.index_path(&p, 1));
    let (b0, b1) = (
        std::fs::read(&f0).expect("r0"),
        std::fs::read(&f1).expect("r1"),
    );
    std::fs::write(&f0, &b1).expect("w0");
    std::fs::write(&f1, &b0).expect("w1");
    assert!(matches!(
        f.store.read_index(&p, 0).await,
        Err(StoreError::BadIndex { .. })
    ));
    assert!(matches!(
        f.store.read_index(&p, 1).await,
        Err(StoreError::BadIndex { .. })
    ));
    // Moved to another point.
    let q = PointId([6; 16]);
    files::ensure_dir(f.store.index_path(&q, 0).parent().expect("dir")).expect("mkdir");
    std::fs::write(f.store.index_path(&q, 0), &b0).expect("w");
    assert!(matches!(
        f.store.read_index(&q, 0).await,
        Err(StoreError::BadIndex { .. })
    ));
    // Any flipped byte.
    for i in (0..b0.len()).step_by(7) {
        let mut bad = b0.clone();
        bad[i] ^= 0x20;
        std::fs::write(&f0, &bad).expect("w");
        assert!(
            matches!(
                f.store.read_index(&p, 0).await,
                Err(StoreError::BadIndex { .. })
            ),
            "byte {i}"
        );
    }
    // Invalid indexes are refused before anything is written.
    let bad = DiskIndex {
        size: 1 << 20,
        chunk_size: 1 << 20,
        entries: vec![(1, ChunkId([1; 32]))],
    };
    assert!(matches!(
        f.store.write_index_unchecked(&p, 7, &bad).await,
        Err(StoreError::InvalidIndex(_))
    ));
    assert!(!f.store.index_path(&p, 7).exists());
}

#[tokio::test]
async fn disk_full_while_sealing_loses_nothing() {
    let f = fixture(StoreConfig::default()).await;
    let chunks: Vec<Bytes> = (0..4).map(|i| noise(i, 60_000)).collect();
    for c in &chunks {
        put_ok(&f.store, c).await;
    }
    f.store
        .shared
        .faults
        .enospc_writes
        .store(1, Ordering::SeqCst);
    let e = f.store.flush().await.expect_err("disk full");
    assert!(e.is_disk_full(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("local store disk is full while writing pack "),
        "{msg}"
    );
    assert!(
        msg.ends_with(": free space or add capacity; nothing was lost"),
        "{msg}"
    );
    assert!(pack_files(f.dir.path()).is_empty(), "nothing renamed");
    let ids: Vec<ChunkId> = chunks
        .iter()
        .map(|c| f.store.chunk_id(&ChunkHash::of(c)))
        .collect();
    let hashes: Vec<ChunkHash> = chunks.iter().map(|c| ChunkHash::of(c)).collect();
    // Still pending (not lacking, so agents do not resend), not durable.
    assert_eq!(
        f.store.lacking(&hashes).await.expect("lacking"),
        vec![false; 4]
    );
    assert_eq!(f.store.missing(&ids).await.expect("missing").len(), 4);
    // The store keeps working: new puts go on, and the next flush writes all.
    let extra = noise(99, 60_000);
    put_ok(&f.store, &extra).await;
    f.store.flush().await.expect("flush after space was freed");
    assert!(f.store.missing(&ids).await.expect("missing").is_empty());
    for (c, id) in chunks.iter().zip(&ids) {
        assert_eq!(&f.store.get(id).await.expect("get"), c);
    }
    assert_eq!(
        f.store
            .get(&f.store.chunk_id(&ChunkHash::of(&extra)))
            .await
            .expect("get"),
        extra
    );
    assert_eq!(pack_files(f.dir.path()).len(), 2);
}

/// Makes the store's next durable write fail with ENOSPC and checks that
/// putting `chunk` is refused as "disk full".
async fn put_fails_disk_full(store: &ChunkStore, chunk: &Bytes) {
    store.shared.faults.enospc_writes.store(1, Ordering::SeqCst);
    let e = store
        .put(ChunkHash::of(chunk), chunk.clone())
        .await
        .expect_err("disk full");
    assert!(e.is_disk_full(), "{e}");
}

#[tokio::test]
async fn disk_full_mid_record_is_cut_back_and_the_pack_stays_valid() {
    let f = fixture(StoreConfig::default()).await;
    let chunks: Vec<Bytes> = (0..3).map(|i| text(i, 300_000)).collect();
    for c in &chunks[..2] {
        put_ok(&f.store, c).await;
    }
    put_fails_disk_full(&f.store, &chunks[2]).await;
    let hash = ChunkHash::of(&chunks[2]);
    assert_eq!(f.store.lacking(&[hash]).await.expect("lacking"), vec![true]);
    put_ok(&f.store, &chunks[2]).await;
    f.store.flush().await.expect("flush");
    for c in &chunks {
        let id = f.store.chunk_id(&ChunkHash::of(c));
        assert_eq!(&f.store.get(&id).await.expect("get"), c);
    }
    // One pack, whose records sit where its TOC says (get checked each).
    assert_eq!(pack_files(f.dir.path()).len(), 1);
}

#[tokio::test]
async fn disk_full_at_rotation_fails_the_put_that_needs_space() {
    let f = fixture(small_packs()).await;
    let chunks: Vec<Bytes> = (0..5).map(|i| noise(i, 60_000)).collect();
    for c in &chunks[..4] {
        put_ok(&f.store, c).await; // 4 × 60 KB ≥ 200 KiB target: next put rotates
    }
    put_fails_disk_full(&f.store, &chunks[4]).await;
    assert_eq!(
        f.store
            .lacking(&[ChunkHash::of(&chunks[4])])
            .await
            .expect("lacking"),
        vec![true],
        "not stored"
    );
    assert!(
        matches!(
            put_ok(&f.store, &chunks[4]).await,
            PutOutcome::Stored { .. }
        ),
        "retry succeeds"
    );
    f.store.flush().await.expect("flush");
    for c in &chunks {
        assert_eq!(
            &f.store
                .get(&f.store.chunk_id(&ChunkHash::of(c)))
                .await
                .expect("get"),
            c
        );
    }
}

#[tokio::test]
async fn disk_full_writing_an_index() {
    let f = fixture(StoreConfig::default()).await;
    let p = PointId([1; 16]);
    let i = DiskIndex {
        size: 1 << 20,
        chunk_size: 1 << 20,
        entries: vec![(0, ChunkId([1; 32]))],
    };
    f.store
        .shared
        .faults
        .enospc_writes
        .store(1, Ordering::SeqCst);
    let e = f
        .store
        .write_index_unchecked(&p, 0, &i)
        .await
        .expect_err("disk full");
    assert!(
        e.to_string()
            .starts_with("local store disk is full while writing index 0 of point "),
        "{e}"
    );
    assert!(all_files(f.dir.path()).iter().all(|p| !p.ends_with(".tmp")));
    f.store
        .write_index_unchecked(&p, 0, &i)
        .await
        .expect("write after space was freed");
    assert_eq!(f.store.read_index(&p, 0).await.expect("read"), i);
}

#[tokio::test]
async fn concurrent_puts_rotate_packs_and_store_each_chunk_once() {
    let f = fixture(small_packs()).await;
    let store = Arc::new(f.store);
    let chunks: Arc<Vec<Bytes>> = Arc::new(
        (0..40)
            .map(|i| {
                if i % 2 == 0 {
                    noise(i, 50_000)
                } else {
                    text(i, 120_000)
                }
            })
            .collect(),
    );
    let mut set = tokio::task::JoinSet::new();
    for t in 0..6u64 {
        let (s, chunks) = (store.clone(), chunks.clone());
        set.spawn(async move {
            let mut stored = 0;
            // Every task puts every chunk, in a different order.
            for k in 0..chunks.len() as u64 {
                let c = &chunks[((k * 7 + t * 5) % chunks.len() as u64) as usize];
                if let PutOutcome::Stored { .. } =
                    s.put(ChunkHash::of(c), c.clone()).await.expect("put")
                {
                    stored += 1;
                }
            }
            stored
        });
    }
    let mut stored = 0;
    while let Some(r) = set.join_next().await {
        stored += r.expect("join");
    }
    assert_eq!(stored, 40);
    store.flush().await.expect("flush");
    let packs = pack_files(f.dir.path());
    assert!(packs.len() > 2, "rotated: {} packs", packs.len());
    let master = MasterKey::from_bytes(MASTER);
    let mut seen = std::collections::HashSet::new();
    for p in &packs {
        let bytes = std::fs::read(p).expect("read");
        for e in parse_pack(|id| master.pack_key(id), &bytes)
            .expect("parse")
            .1
        {
            assert!(seen.insert(e.chunk_id), "chunk in two packs");
        }
    }
    assert_eq!(seen.len(), 40);
    for c in chunks.iter() {
        assert_eq!(
            &store
                .get(&store.chunk_id(&ChunkHash::of(c)))
                .await
                .expect("get"),
            c
        );
    }
}

/// `base` with 64 KiB of other bytes written at `at`, as a day's change.
pub(super) fn changed(base: &Bytes, at: usize, seed: u64) -> Bytes {
    let mut v = base.to_vec();
    v[at..at + 65_536].copy_from_slice(&noise(seed, 65_536));
    Bytes::from(v)
}

/// Stores `data` hinted at `base` and flushes; returns its hash.
pub(super) async fn put_delta(store: &ChunkStore, data: &Bytes, base: &Bytes) -> ChunkHash {
    let h = ChunkHash::of(data);
    store
        .put_with_base(h, data.clone(), Some(ChunkHash::of(base)))
        .await
        .expect("put");
    store.flush().await.expect("flush");
    h
}

#[tokio::test]
async fn a_hinted_chunk_is_stored_as_a_small_delta_and_reads_back() {
    let f = fixture(StoreConfig::default()).await;
    let base = noise(1, 1 << 20);
    let (bh, bid) = (
        ChunkHash::of(&base),
        f.store.chunk_id(&ChunkHash::of(&base)),
    );
    put_ok(&f.store, &base).await;
    f.store.flush().await.expect("flush");

    let day2 = changed(&base, 300_000, 2);
    let h2 = ChunkHash::of(&day2);
    let PutOutcome::Stored { stored_bytes } = f
        .store
        .put_with_base(h2, day2.clone(), Some(bh))
        .await
        .expect("put")
    else {
        panic!("not stored")
    };
    // Incompressible data: a plain chunk would take the whole MiB.
    assert!(stored_bytes < 100_000, "delta took {stored_bytes} bytes");
    f.store.flush().await.expect("flush");
    // A third version hinted at the delta is stored against the delta's
    // base: chains stay one deep.
    let day3 = changed(&day2, 700_000, 3);
    let h3 = ChunkHash::of(&day3);
    let PutOutcome::Stored { stored_bytes } = f
        .store
        .put_with_base(h3, day3.clone(), Some(h2))
        .await
        .expect("put")
    else {
        panic!("not stored")
    };
    assert!(stored_bytes < 200_000, "delta took {stored_bytes} bytes");
    // A hint at a chunk the store lacks: stored plain.
    let other = noise(9, 1 << 20);
    let PutOutcome::Stored { stored_bytes } = f
        .store
        .put_with_base(
            ChunkHash::of(&other),
            other.clone(),
            Some(ChunkHash([5; 32])),
        )
        .await
        .expect("put")
    else {
        panic!("not stored")
    };
    assert!(stored_bytes > 1 << 20);
    f.store.flush().await.expect("flush");

    let (id2, id3) = (f.store.chunk_id(&h2), f.store.chunk_id(&h3));
    for (id, want) in [(id2, &day2), (id3, &day3), (bid, &base)] {
        assert_eq!(&f.store.get(&id).await.expect("get"), want);
    }
    for (id, base_of) in [(id2, Some(bid)), (id3, Some(bid)), (bid, None)] {
        let (_, b) = f
            .catalog
            .chunk_location_and_base(&id)
            .await
            .expect("lookup")
            .expect("stored");
        assert_eq!(b, base_of);
    }
    // Restore frames decode alone: a delta is served as a raw payload.
    let loc = f.store.locate(&[id2]).await.expect("locate")[0].expect("loc");
    let got = f.store.get_payloads_at(vec![(id2, loc)]).await;
    let payload = got[0].as_ref().expect("payload");
    assert_eq!(
        tierback_format::crypto::decode_chunk_payload(payload).expect("decode"),
        day2.to_vec()
    );
    let r = f.store.verify(None).await.expect("verify");
    assert!(r.damaged.is_empty(), "{r:?}");
}

#[tokio::test]
async fn a_delta_whose_base_is_gone_is_named_as_damaged() {
    let f = fixture(StoreConfig::default()).await;
    let base = noise(1, 1 << 20);
    put_ok(&f.store, &base).await;
    f.store.flush().await.expect("flush");
    let day2 = changed(&base, 0, 2);
    let h2 = put_delta(&f.store, &day2, &base).await;
    let (bid, id2) = (
        f.store.chunk_id(&ChunkHash::of(&base)),
        f.store.chunk_id(&h2),
    );
    commit(&f, PointId([1; 16]), "vm", &[vec![id2]]).await;
    // Lose the base's row (as a damaged catalog would).
    f.catalog.merge_all().await.expect("merge");
    sqlx::query("DELETE FROM chunks WHERE id = ?")
        .bind(&bid.0[..])
        .execute(&f.catalog.pool)
        .await
        .expect("delete");
    let err = f.store.get(&id2).await.expect_err("base gone");
    let msg = err.to_string();
    assert!(
        msg.contains(&id2.to_string()) && msg.contains(&bid.to_string()),
        "{msg}"
    );
    let r = f.store.verify(None).await.expect("verify");
    assert!(r.damaged.iter().any(|d| d.chunk_id == id2), "{r:?}");
}

#[tokio::test]
async fn payloads_read_in_any_order_come_back_in_the_order_asked() {
    let f = fixture(StoreConfig::default()).await;
    // Two packs; in each, records of different sizes, one of them far from
    // the others (a big incompressible record between them).
    let first = [
        text(1, 1 << 20),
        noise(2, 1 << 20),
        text(3, 4096),
        text(4, 200_000),
    ];
    let second = [noise(5, 300_000), text(6, 1 << 20)];
    for c in &first {
        put_ok(&f.store, c).await;
    }
    f.store.flush().await.expect("flush");
    for c in &second {
        put_ok(&f.store, c).await;
    }
    f.store.flush().await.expect("flush");
    let all: Vec<&Bytes> = first.iter().chain(&second).collect();
    let ids: Vec<ChunkId> = all
        .iter()
        .map(|c| f.store.chunk_id(&ChunkHash::of(c)))
        .collect();
    let locs = f.store.locate(&ids).await.expect("locate");
    // Asked out of pack order, with a duplicate and a chunk the store lacks
    // (a location past the end of a pack).
    let mut bogus = locs[0].expect("loc");
    bogus.offset += 1 << 30;
    let ask: Vec<(ChunkId, ChunkLocation)> = [5, 2, 0, 4, 2, 3, 1]
        .iter()
        .map(|&k| (ids[k], locs[k].expect("loc")))
        .chain([(ChunkId([9; 32]), bogus)])
        .collect();
    let got = f.store.get_payloads_at(ask.clone()).await;
    assert_eq!(got.len(), ask.len());
    for (k, r) in [5, 2, 0, 4, 2, 3, 1].iter().zip(&got) {
        let payload = r.as_ref().expect("payload");
        assert_eq!(
            &tierback_format::crypto::decode_chunk_payload(payload).expect("decode")[..],
            &all[*k][..],
            "chunk {k}"
        );
    }
    assert!(got[7].is_err(), "a record past the end of its pack");
}

/// A patch record's data: `chunk_len | bitmap | blocks` for the 4 KiB
/// blocks `blocks` of `data`.
fn patch_of(data: &Bytes, blocks: &[usize]) -> Bytes {
    use tierback_format::wire::PATCH_BLOCK;
    let n = data.len().div_ceil(PATCH_BLOCK);
    let mut bitmap = vec![0u8; n.div_ceil(8)];
    let mut out = (data.len() as u32).to_le_bytes().to_vec();
    for &b in blocks {
        bitmap[b / 8] |= 1 << (b % 8);
    }
    out.extend_from_slice(&bitmap);
    for b in 0..n {
        if blocks.contains(&b) {
            out.extend_from_slice(&data[b * PATCH_BLOCK..((b + 1) * PATCH_BLOCK).min(data.len())]);
        }
    }
    Bytes::from(out)
}

#[tokio::test]
async fn a_patch_is_rebuilt_from_its_base_checked_and_stored_as_a_delta() {
    let f = fixture(StoreConfig::default()).await;
    let base = noise(1, 1 << 20);
    let bh = ChunkHash::of(&base);
    put_ok(&f.store, &base).await;
    f.store.flush().await.expect("flush");
    // 64 KiB written at 300,000: blocks 73..=89.
    let day2 = changed(&base, 300_000, 2);
    let h2 = ChunkHash::of(&day2);
    let blocks: Vec<usize> = (73..=89).collect();
    // Tracking that missed the last block: the rebuilt chunk does not match,
    // nothing is stored.
    let short = patch_of(&day2, &blocks[..blocks.len() - 1]);
    assert_eq!(
        f.store.put_patch(h2, bh, short).await.expect("put"),
        PutOutcome::Refused
    );
    assert!(f.store.lacking(&[h2]).await.expect("lacking")[0]);
    // A base the store lacks: refused too.
    assert_eq!(
        f.store
            .put_patch(h2, ChunkHash([5; 32]), patch_of(&day2, &blocks))
            .await
            .expect("put"),
        PutOutcome::Refused
    );
    // The right blocks: stored as a small delta, reads back whole.
    let put = f.store.put_patch(h2, bh, patch_of(&day2, &blocks)).await;
    assert!(
        matches!(put, Ok(PutOutcome::Stored { stored_bytes }) if stored_bytes < 100_000),
        "{put:?}"
    );
    f.store.flush().await.expect("flush");
    let id2 = f.store.chunk_id(&h2);
    assert_eq!(&f.store.get(&id2).await.expect("get"), &day2);
    // A patch of that delta (chains stay one deep: stored against the root).
    let day3 = changed(&day2, 700_000, 3);
    let h3 = ChunkHash::of(&day3);
    let put = f
        .store
        .put_patch(h3, h2, patch_of(&day3, &(170..=187).collect::<Vec<_>>()))
        .await;
    assert!(matches!(put, Ok(PutOutcome::Stored { .. })), "{put:?}");
    f.store.flush().await.expect("flush");
    let id3 = f.store.chunk_id(&h3);
    assert_eq!(&f.store.get(&id3).await.expect("get"), &day3);
    let (_, b) = f
        .catalog
        .chunk_location_and_base(&id3)
        .await
        .expect("lookup")
        .expect("stored");
    assert_eq!(b, Some(f.store.chunk_id(&bh)));
    // Sent again: a duplicate.
    assert_eq!(
        f.store
            .put_patch(h3, h2, patch_of(&day3, &[0]))
            .await
            .expect("put"),
        PutOutcome::Duplicate
    );
}
