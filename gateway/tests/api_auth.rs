//! The HTTPS API started in-process (`server::run`), probed as a hostile
//! client would: no credential, garbage credentials, the other side's
//! credential, another agent's session, oversized and malformed bodies, and
//! a client pinning the wrong certificate.

mod common;

use common::{http, start};
use tierback_format::wire::*;

async fn status(req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let r = req.send().await.expect("send");
    let s = r.status().as_u16();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (s, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_the_right_credential() {
    let g = start().await;
    let c = http(&g.fingerprint);
    let u = |p: &str| format!("{}{p}", g.url);

    // No credential, garbage, wrong prefix: 401 with a body that says nothing.
    for auth in [
        None,
        Some("garbage"),
        Some("tba1.agent-x.deadbeef"),
        Some("tbadm1.00"),
    ] {
        for (m, p) in [
            ("GET", "/v1/admin/points"),
            ("POST", "/v1/agent/backups"),
            ("GET", "/v1/admin/vms"),
            ("GET", "/v1/admin/groups"),
            ("POST", "/v1/admin/groups"),
            ("GET", "/v1/admin/groups/prod"),
            ("DELETE", "/v1/admin/groups/prod"),
            ("POST", "/v1/admin/groups/prod/members"),
            ("DELETE", "/v1/admin/groups/prod/members/web01"),
            ("GET", "/v1/admin/space"),
        ] {
            let mut r = c.request(m.parse().expect("method"), u(p));
            if let Some(a) = auth {
                r = r.bearer_auth(a);
            }
            let (s, body) = status(r).await;
            assert_eq!(s, 401, "{m} {p} with {auth:?}");
            assert_eq!(body["error"], "unauthorized");
            assert_eq!(body["message"], "missing or invalid credential");
        }
    }

    // Admin works on admin routes, is forbidden on agent routes.
    let (s, _) = status(c.get(u("/v1/admin/points")).bearer_auth(&g.admin)).await;
    assert_eq!(s, 200);
    let (s, _) = status(
        c.post(u("/v1/agent/inventory"))
            .bearer_auth(&g.admin)
            .json(&serde_json::json!({"vms": []})),
    )
    .await;
    assert_eq!(s, 403);

    // Enrol two agents.
    let mut creds = Vec::new();
    for host in ["hv1", "hv2"] {
        let tok: EnrollTokenResponse = c
            .post(u("/v1/admin/enroll-tokens"))
            .bearer_auth(&g.admin)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        let r: EnrollResponse = c
            .post(u("/v1/enroll"))
            .json(&EnrollRequest {
                token: tok.token.clone(),
                host_name: host.into(),
            })
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        // The token is spent.
        let (s, _) = status(c.post(u("/v1/enroll")).json(&EnrollRequest {
            token: tok.token,
            host_name: "x".into(),
        }))
        .await;
        assert_eq!(s, 401);
        creds.push(r.credential);
    }
    // Agent credentials are forbidden on admin routes.
    let (s, _) = status(c.get(u("/v1/admin/points")).bearer_auth(&creds[0])).await;
    assert_eq!(s, 403);
    // A tampered agent credential is unknown.
    let mut bad = creds[0].clone();
    // Another last character, whatever it was (a '0' must not stay '0').
    let last = bad.pop().expect("a credential is not empty");
    bad.push(if last == '0' { '1' } else { '0' });
    let (s, _) = status(c.get(u("/v1/admin/points")).bearer_auth(&bad)).await;
    assert_eq!(s, 401);

    // Agent 1 opens a session; agent 2 cannot see it.
    let vm = VmInfo {
        id: "8f0c2d1e-4b7a-4c59-9a0e-2f6d7c1b33a1".into(),
        name: "web01".into(),
        generation: 2,
        config_version: "9.0".into(),
        state: "Running".into(),
        folder: "/x".into(),
        disks: vec![],
    };
    let stream = StreamSpec {
        stream_no: 0,
        kind: StreamKind::Config,
        path: "vm.json".into(),
        controller: None,
        location: None,
        size: 10,
        logical_sector_size: 512,
        physical_sector_size: 512,
        base_stream: None,
        tracking: None,
    };
    let begin: BeginBackupResponse = c
        .post(u("/v1/agent/backups"))
        .bearer_auth(&creds[0])
        .json(&BeginBackupRequest {
            vm: vm.clone(),
            streams: vec![stream.clone()],
            full: true,
            base_point: None,
        })
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let lack = u(&format!("/v1/agent/backups/{}/lack", begin.session_id));
    let (s, _) = status(
        c.post(&lack)
            .bearer_auth(&creds[1])
            .json(&LackRequest { hashes: vec![] }),
    )
    .await;
    assert_eq!(s, 404, "another agent's session must look missing");
    let (s, _) = status(
        c.post(&lack)
            .bearer_auth(&creds[0])
            .json(&LackRequest { hashes: vec![] }),
    )
    .await;
    assert_eq!(s, 200);

    // Hostile bodies: a chunk whose hash lies, a truncated record, a path escaping the VM folder.
    let chunks = u(&format!("/v1/agent/backups/{}/chunks", begin.session_id));
    let mut body = Vec::new();
    put_chunk_record(
        &mut body,
        &tierback_format::ids::ChunkHash([7; 32]),
        b"not the hash",
    );
    let (s, b) = status(c.post(&chunks).bearer_auth(&creds[0]).body(body.clone())).await;
    assert_eq!(s, 400, "{b}");
    let (s, _) = status(
        c.post(&chunks)
            .bearer_auth(&creds[0])
            .body(body[..40].to_vec()),
    )
    .await;
    assert_eq!(s, 400);
    // A record declaring more than the largest chunk, and a body over the
    // request limit (nine records of the largest chunk size), are refused
    // while they stream in.
    let mut body = vec![0u8; 32];
    body.extend_from_slice(&(MAX_CHUNK_SIZE + 1).to_le_bytes());
    let (s, b) = status(c.post(&chunks).bearer_auth(&creds[0]).body(body)).await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["message"].as_str().unwrap_or("").contains("maximum"),
        "{b}"
    );
    let mut body = Vec::new();
    for i in 0..9u8 {
        let data = vec![i; MAX_CHUNK_SIZE as usize];
        let h = tierback_format::ids::ChunkHash(*blake3::hash(&data).as_bytes());
        put_chunk_record(&mut body, &h, &data);
    }
    // The gateway answers before the client has sent it all, so the client
    // sees either that answer or the connection closed under its writes.
    match c
        .post(&chunks)
        .bearer_auth(&creds[0])
        .body(body)
        .send()
        .await
    {
        Ok(r) => {
            assert_eq!(r.status().as_u16(), 400);
            let b: serde_json::Value = r.json().await.expect("json");
            assert!(b["message"].as_str().unwrap_or("").contains("limit"), "{b}");
        }
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    let evil = StreamSpec {
        path: "../../etc/passwd".into(),
        ..stream
    };
    let (s, _) = status(c.post(u("/v1/agent/backups")).bearer_auth(&creds[0]).json(
        &BeginBackupRequest {
            vm,
            streams: vec![evil],
            full: true,
            base_point: None,
        },
    ))
    .await;
    assert_eq!(s, 400);
    // Commit of an index naming a chunk never sent is refused; nothing becomes visible.
    let idx = u(&format!(
        "/v1/agent/backups/{}/streams/0/index",
        begin.session_id
    ));
    let h = tierback_format::ids::ChunkHash(*blake3::hash(b"0123456789").as_bytes());
    let (s, _) = status(
        c.post(&idx)
            .bearer_auth(&creds[0])
            .body(encode_stream_index(&[(0, h)])),
    )
    .await;
    assert_eq!(s, 200);
    let commit = u(&format!("/v1/agent/backups/{}/commit", begin.session_id));
    let (s, b) = status(
        c.post(&commit)
            .bearer_auth(&creds[0])
            .json(&CommitRequest::default()),
    )
    .await;
    assert_eq!(s, 409, "{b}");
    let pts: Vec<PointSummary> = c
        .get(u("/v1/admin/points"))
        .bearer_auth(&g.admin)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(pts.is_empty());
    // Send it, commit again: now the point exists.
    let mut body = Vec::new();
    put_chunk_record(&mut body, &h, b"0123456789");
    let (s, _) = status(c.post(&chunks).bearer_auth(&creds[0]).body(body)).await;
    assert_eq!(s, 200);
    let (s, b) = status(
        c.post(&commit)
            .bearer_auth(&creds[0])
            .json(&CommitRequest::default()),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let pts: Vec<PointSummary> = c
        .get(u("/v1/admin/points"))
        .bearer_auth(&g.admin)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(pts.len(), 1);
    assert_eq!(pts[0].kind, "full");

    g.shutdown.cancel();
    g.task.await.expect("join").expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pinning_another_certificate_cannot_connect() {
    let g = start().await;
    let wrong = "00".repeat(32);
    let err = http(&wrong)
        .get(format!("{}/v1/health", g.url))
        .send()
        .await
        .expect_err("must fail");
    let mut cause: &dyn std::error::Error = &err;
    let mut text = cause.to_string();
    while let Some(n) = cause.source() {
        cause = n;
        text.push_str(&format!(": {n}"));
    }
    assert!(text.contains("fingerprint"), "{text}");
    let ok = http(&g.fingerprint)
        .get(format!("{}/v1/health", g.url))
        .send()
        .await
        .expect("pinned ok");
    assert_eq!(ok.status().as_u16(), 200);
    g.shutdown.cancel();
    g.task.await.expect("join").expect("clean shutdown");
}
