//! Delta indexes (incremental forever) at the API: a stream naming a
//! `base_stream` uploads only its changes, the gateway writes the complete
//! index; bases are validated; `last-point` returns what the agent recorded.

mod common;

use common::{start_gw as start, Gw};

use tierback_format::ids::ChunkHash;
use tierback_format::wire::*;

fn vm(id: &str) -> VmInfo {
    VmInfo {
        id: id.into(),
        name: format!("vm-{}", &id[..4]),
        generation: 2,
        config_version: "9.0".into(),
        state: "Running".into(),
        folder: "/x".into(),
        disks: vec![],
    }
}

fn disk(size: u64, base: Option<u32>) -> StreamSpec {
    StreamSpec {
        stream_no: 0,
        kind: StreamKind::Disk,
        path: "Virtual Hard Disks/a.vhdx".into(),
        controller: Some("SCSI".into()),
        location: Some("0:0".into()),
        size,
        logical_sector_size: 512,
        physical_sector_size: 4096,
        base_stream: base,
        tracking: Some(DiskTrackingIds {
            change_id: Some(format!("rct-{size}")),
            data_write_guid: None,
        }),
    }
}

fn chunk(b: u8) -> (ChunkHash, Vec<u8>) {
    let data = vec![b; 1 << 20];
    (ChunkHash(*blake3::hash(&data).as_bytes()), data)
}

/// One backup; returns the point id, or the failing status of commit.
async fn backup(
    g: &Gw,
    cred: &str,
    req: &BeginBackupRequest,
    send: &[(ChunkHash, Vec<u8>)],
    index: &[(u64, ChunkHash)],
) -> Result<String, (u16, String)> {
    let (s, b) = g.json(cred, "/v1/agent/backups", req).await;
    if s != 200 {
        return Err((s, b.to_string()));
    }
    let sid = b["session_id"].as_str().expect("sid").to_string();
    let mut body = Vec::new();
    for (h, d) in send {
        put_chunk_record(&mut body, h, d);
    }
    let (s, _) = g
        .post(
            cred,
            &format!("/v1/agent/backups/{sid}/chunks"),
            body.into(),
        )
        .await;
    assert_eq!(s, 200);
    let (s, b) = g
        .post(
            cred,
            &format!("/v1/agent/backups/{sid}/streams/0/index"),
            encode_stream_index(index).into(),
        )
        .await;
    if s != 200 {
        return Err((s, b.to_string()));
    }
    let (s, b) = g
        .json(
            cred,
            &format!("/v1/agent/backups/{sid}/commit"),
            &CommitRequest::default(),
        )
        .await;
    if s != 200 {
        return Err((s, b.to_string()));
    }
    Ok(b["point"].as_str().expect("point").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_indexes_become_complete_indexes() {
    let g = start().await;
    let cred = g.agent().await;
    let id = "de170000-0000-0000-0000-000000000001";
    let (c0, c1, c3, c2) = (chunk(1), chunk(2), chunk(3), chunk(4));
    let mb = 1u64 << 20;
    let full = BeginBackupRequest {
        vm: vm(id),
        streams: vec![disk(4 * mb, None)],
        full: false,
        base_point: None,
    };
    // No point yet: last-point is 404.
    let r =
        g.c.get(g.u(&format!("/v1/agent/vms/{id}/last-point")))
            .bearer_auth(&cred)
            .send()
            .await
            .expect("send");
    assert_eq!(r.status().as_u16(), 404);
    let p1 = backup(
        &g,
        &cred,
        &full,
        &[c0.clone(), c1.clone(), c3.clone()],
        &[(0, c0.0), (1, c1.0), (3, c3.0)],
    )
    .await
    .expect("full");
    let last: LastPointResponse =
        g.c.get(g.u(&format!("/v1/agent/vms/{id}/last-point")))
            .bearer_auth(&cred)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
    assert_eq!(last.point, p1);
    assert_eq!(
        last.streams[0]
            .tracking
            .as_ref()
            .and_then(|t| t.change_id.as_deref()),
        Some("rct-4194304")
    );

    // Bad bases.
    let no_base = BeginBackupRequest {
        streams: vec![disk(4 * mb, Some(0))],
        ..full.clone()
    };
    let e = backup(&g, &cred, &no_base, &[], &[])
        .await
        .expect_err("no base");
    assert_eq!(e.0, 400, "{e:?}");
    let other_vm = BeginBackupRequest {
        vm: vm("0be10000-0000-0000-0000-000000000002"),
        base_point: Some(p1.clone()),
        ..no_base.clone()
    };
    let e = backup(&g, &cred, &other_vm, &[], &[])
        .await
        .expect_err("other VM");
    assert_eq!(e.0, 400, "{e:?}");
    let gone = BeginBackupRequest {
        base_point: Some("00112233445566778899aabbccddeeff".into()),
        ..no_base.clone()
    };
    let e = backup(&g, &cred, &gone, &[], &[]).await.expect_err("gone");
    assert_eq!(e.0, 409, "{e:?}");
    // The zero marker is refused in a complete index.
    let e = backup(&g, &cred, &full, &[], &[(0, DELTA_ZERO_HASH)])
        .await
        .expect_err("zero in full");
    assert_eq!(e.0, 400, "{e:?}");

    // A delta: chunk 0 became zero, chunk 2 appeared, the disk shrank to
    // 3 MiB (chunk 3 vanishes), chunk 1 is unchanged and not mentioned.
    let delta = BeginBackupRequest {
        streams: vec![disk(3 * mb, Some(0))],
        base_point: Some(p1.clone()),
        ..full.clone()
    };
    // First without sending chunk 2: commit refuses (409), nothing visible.
    let e = backup(&g, &cred, &delta, &[], &[(0, DELTA_ZERO_HASH), (2, c2.0)])
        .await
        .expect_err("missing chunk");
    assert_eq!(e.0, 409, "{e:?}");
    let p2 = backup(
        &g,
        &cred,
        &delta,
        std::slice::from_ref(&c2),
        &[(0, DELTA_ZERO_HASH), (2, c2.0)],
    )
    .await
    .expect("delta");
    let ext: StreamExtents =
        g.c.get(g.u(&format!("/v1/admin/points/{p2}/streams/0/extents")))
            .bearer_auth(&g.admin)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
    assert_eq!(ext.chunks, vec![1, 2]);
    assert_eq!(ext.size, 3 * mb);
    let data =
        g.c.get(g.u(&format!(
            "/v1/admin/points/{p2}/streams/0/data?first=1&count=2"
        )))
        .bearer_auth(&g.admin)
        .send()
        .await
        .expect("send")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(&data[..mb as usize], &c1.1[..]);
    assert_eq!(&data[mb as usize..], &c2.1[..]);
    // The new point is the VM's last, an incremental.
    let points: Vec<PointSummary> =
        g.c.get(g.u("/v1/admin/points"))
            .bearer_auth(&g.admin)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
    let kinds: Vec<(&str, &str)> = points
        .iter()
        .map(|p| (p.id.as_str(), p.kind.as_str()))
        .collect();
    assert!(kinds.contains(&(p2.as_str(), "incremental")), "{kinds:?}");
}
