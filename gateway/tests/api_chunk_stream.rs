//! Chunk streams (`POST /v1/agent/backups/{session}/chunk-stream`, upgraded
//! to `tierback-chunks/1`) against the in-process gateway: batches stored
//! and answered, duplicates counted, the commit finding what a stream
//! stored, and hostile streams (a lying hash, a record over the largest
//! chunk, a batch over the limit, a batch cut short, no upgrade, another
//! agent's session) answered with one error and the stream closed, the
//! gateway serving on.

mod common;

use common::{start_gw, Gw};
use tierback_format::ids::ChunkHash;
use tierback_format::wire::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Opens a backup session of a VM with one config stream of `size` bytes.
async fn session(g: &Gw, cred: &str, size: u64) -> String {
    let (s, b) = g
        .json(
            cred,
            "/v1/agent/backups",
            &BeginBackupRequest {
                vm: VmInfo {
                    id: "3e1b6c2a-0d4f-4a8e-9b7c-5f2e1d0c9a8b".into(),
                    name: "db01".into(),
                    generation: 2,
                    config_version: "9.0".into(),
                    state: "Running".into(),
                    folder: "/x".into(),
                    disks: vec![],
                },
                streams: vec![StreamSpec {
                    stream_no: 0,
                    kind: StreamKind::Config,
                    path: "vm.json".into(),
                    controller: None,
                    location: None,
                    size,
                    logical_sector_size: 512,
                    physical_sector_size: 512,
                    base_stream: None,
                    tracking: None,
                }],
                full: true,
                base_point: None,
            },
        )
        .await;
    assert_eq!(s, 200, "{b}");
    b["session_id"].as_str().expect("session id").to_string()
}

/// The upgrade request; the response as it came.
async fn upgrade(g: &Gw, cred: &str, sid: &str, proto: Option<&str>) -> reqwest::Response {
    let mut r =
        g.c.post(g.u(&format!("/v1/agent/backups/{sid}/chunk-stream")))
            .bearer_auth(cred);
    if let Some(p) = proto {
        r = r.header("connection", "upgrade").header("upgrade", p);
    }
    r.send().await.expect("send")
}

async fn open(g: &Gw, cred: &str, sid: &str) -> reqwest::Upgraded {
    let r = upgrade(g, cred, sid, Some(CHUNK_STREAM_PROTOCOL)).await;
    assert_eq!(r.status().as_u16(), 101);
    r.upgrade().await.expect("upgraded")
}

/// Sends `len` and then `bytes` as one batch (a well-formed batch has
/// `len == bytes.len()`).
async fn send(io: &mut reqwest::Upgraded, len: u64, bytes: &[u8]) {
    io.write_all(&len.to_le_bytes()).await.expect("write");
    io.write_all(bytes).await.expect("write");
    io.flush().await.expect("flush");
}

/// Reads one answer: its status byte and JSON.
async fn answer(io: &mut reqwest::Upgraded) -> (u8, serde_json::Value) {
    let mut head = [0u8; 5];
    io.read_exact(&mut head).await.expect("answer head");
    let [status, l @ ..] = head;
    let mut body = vec![0u8; u32::from_le_bytes(l) as usize];
    io.read_exact(&mut body).await.expect("answer body");
    (status, serde_json::from_slice(&body).expect("answer json"))
}

/// After an error the gateway closes the stream: the next read ends.
async fn closed(io: &mut reqwest::Upgraded) {
    let mut b = [0u8; 1];
    let n = io.read(&mut b).await.unwrap_or(0);
    assert_eq!(n, 0, "the stream should be closed");
}

fn record(body: &mut Vec<u8>, data: &[u8], base: Option<&ChunkHash>) -> ChunkHash {
    let h = ChunkHash(*blake3::hash(data).as_bytes());
    put_chunk_record_with_base(body, &h, base, data);
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_stored_and_answered_on_one_stream() {
    let g = start_gw().await;
    let cred = g.agent().await;
    let sid = session(&g, &cred, 10).await;
    let mut io = open(&g, &cred, &sid).await;

    // Two records, one with a base hint, one large enough to arrive in
    // many TLS records.
    let big: Vec<u8> = (0..MAX_CHUNK_SIZE).map(|i| (i % 251) as u8).collect();
    let mut batch = Vec::new();
    let small = record(&mut batch, b"0123456789", None);
    record(&mut batch, &big, Some(&small));
    send(&mut io, batch.len() as u64, &batch).await;
    let (status, a) = answer(&mut io).await;
    assert_eq!(status, 0, "{a}");
    let a: ChunksResponse = serde_json::from_value(a).expect("answer");
    assert_eq!((a.stored, a.duplicate), (2, 0));
    assert!(a.stored_bytes > 0 && a.stored_bytes < big.len() as u64);

    // The same batch again on the same stream: both already there.
    send(&mut io, batch.len() as u64, &batch).await;
    let (status, a) = answer(&mut io).await;
    assert_eq!(status, 0, "{a}");
    assert_eq!(
        (a["stored"].as_u64(), a["duplicate"].as_u64()),
        (Some(0), Some(2))
    );

    // A batch of length 0 ends the stream.
    send(&mut io, 0, &[]).await;
    closed(&mut io).await;

    // The commit finds the chunk the stream stored.
    let (s, b) = g
        .post(
            &cred,
            &format!("/v1/agent/backups/{sid}/streams/0/index"),
            encode_stream_index(&[(0, small)]).into(),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = g
        .json(
            &cred,
            &format!("/v1/agent/backups/{sid}/commit"),
            &CommitRequest::default(),
        )
        .await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_streams_get_one_error_and_are_closed() {
    let g = start_gw().await;
    let cred = g.agent().await;
    let other = g.agent().await;
    let sid = session(&g, &cred, 10).await;

    // No upgrade asked for, another agent's session, no such session.
    let r = upgrade(&g, &cred, &sid, None).await;
    assert_eq!(r.status().as_u16(), 400);
    let r = upgrade(&g, &cred, &sid, Some("websocket")).await;
    assert_eq!(r.status().as_u16(), 400);
    let r = upgrade(&g, &other, &sid, Some(CHUNK_STREAM_PROTOCOL)).await;
    assert_eq!(
        r.status().as_u16(),
        404,
        "another agent's session must look missing"
    );
    let r = upgrade(&g, &cred, "nope", Some(CHUNK_STREAM_PROTOCOL)).await;
    assert_eq!(r.status().as_u16(), 404);
    let r = upgrade(&g, "garbage", &sid, Some(CHUNK_STREAM_PROTOCOL)).await;
    assert_eq!(r.status().as_u16(), 401);

    // A record whose hash lies: an error naming the mismatch, then closed.
    let mut io = open(&g, &cred, &sid).await;
    let mut batch = Vec::new();
    put_chunk_record(&mut batch, &ChunkHash([7; 32]), b"not the hash");
    send(&mut io, batch.len() as u64, &batch).await;
    let (status, a) = answer(&mut io).await;
    assert_eq!(status, 1, "{a}");
    assert_eq!(a["error"], "bad_request", "{a}");
    closed(&mut io).await;

    // A record declaring more than the largest chunk.
    let mut io = open(&g, &cred, &sid).await;
    let mut batch = vec![0u8; 32];
    batch.extend_from_slice(&(MAX_CHUNK_SIZE + 1).to_le_bytes());
    send(&mut io, batch.len() as u64, &batch).await;
    let (status, a) = answer(&mut io).await;
    assert_eq!(status, 1, "{a}");
    assert!(
        a["message"].as_str().unwrap_or("").contains("maximum"),
        "{a}"
    );
    closed(&mut io).await;

    // A patch record without its base.
    let mut io = open(&g, &cred, &sid).await;
    let mut batch = vec![0u8; 32];
    batch.extend_from_slice(&(4 | CHUNK_RECORD_PATCH_FLAG).to_le_bytes());
    batch.extend_from_slice(&[0; 4]);
    send(&mut io, batch.len() as u64, &batch).await;
    let (status, a) = answer(&mut io).await;
    assert_eq!(status, 1, "{a}");
    assert!(a["message"].as_str().unwrap_or("").contains("base"), "{a}");
    closed(&mut io).await;

    // A batch declared over the limit is refused before any of it is read.
    let mut io = open(&g, &cred, &sid).await;
    send(&mut io, u64::MAX, &[]).await;
    let (status, a) = answer(&mut io).await;
    assert_eq!(status, 1, "{a}");
    assert!(a["message"].as_str().unwrap_or("").contains("limit"), "{a}");
    closed(&mut io).await;

    // A record longer than what is left of its batch.
    let mut io = open(&g, &cred, &sid).await;
    let mut batch = Vec::new();
    record(&mut batch, b"0123456789", None);
    send(&mut io, (batch.len() - 1) as u64, &batch[..batch.len() - 1]).await;
    let (status, a) = answer(&mut io).await;
    assert_eq!(status, 1, "{a}");
    assert!(
        a["message"].as_str().unwrap_or("").contains("truncated"),
        "{a}"
    );
    closed(&mut io).await;

    // A batch cut short by the agent going away: nothing to answer to, and
    // the gateway serves on.
    let mut io = open(&g, &cred, &sid).await;
    let mut batch = Vec::new();
    record(&mut batch, &[3u8; 4096], None);
    send(&mut io, batch.len() as u64, &batch[..100]).await;
    io.shutdown().await.expect("shutdown");
    drop(io);

    let mut io = open(&g, &cred, &sid).await;
    let mut batch = Vec::new();
    record(&mut batch, b"still serving", None);
    send(&mut io, batch.len() as u64, &batch).await;
    let (status, a) = answer(&mut io).await;
    assert_eq!(status, 0, "{a}");
    assert_eq!(a["stored"].as_u64(), Some(1), "{a}");
}
