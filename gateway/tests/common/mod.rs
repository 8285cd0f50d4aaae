//! An in-process gateway for API tests (`server::run` on a loopback
//! listener, a fresh data dir), shared by the gateway's integration tests.
#![allow(dead_code)]

use tierback_format::wire::*;
use tierback_gateway::config::DataDir;
use tokio_util::sync::CancellationToken;

pub struct TestGateway {
    pub _dir: tempfile::TempDir,
    pub url: String,
    pub admin: String,
    pub fingerprint: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn start() -> TestGateway {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("gw");
    let rep = tierback_gateway::setup::init(&data, None, "127.0.0.1:0")
        .await
        .expect("init");
    let dd = DataDir::new(&data);
    let state = tierback_gateway::server::open_state(&dd)
        .await
        .expect("state");
    let tls = tierback_gateway::tls::server_config(&dd.tls_cert(), &dd.tls_key()).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("https://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tierback_gateway::server::run(
        listener,
        state,
        tls,
        shutdown.clone(),
    ));
    let admin = std::fs::read_to_string(dd.admin_token())
        .expect("token")
        .trim()
        .to_string();
    TestGateway {
        _dir: dir,
        url,
        admin,
        fingerprint: rep.fingerprint,
        shutdown,
        task,
    }
}

pub fn http(fp: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tierback_format::pin::pinned_client_config(fp).expect("pin"))
        .build()
        .expect("client")
}

/// A started gateway with a pinned client, stopped when dropped.
pub struct Gw {
    _g: TestGateway,
    pub url: String,
    pub admin: String,
    pub c: reqwest::Client,
    _shutdown: tokio_util::sync::DropGuard,
}

pub async fn start_gw() -> Gw {
    let g = start().await;
    Gw {
        c: http(&g.fingerprint),
        url: g.url.clone(),
        admin: g.admin.clone(),
        _shutdown: g.shutdown.clone().drop_guard(),
        _g: g,
    }
}

impl Gw {
    pub fn u(&self, p: &str) -> String {
        format!("{}{p}", self.url)
    }

    /// Enrols an agent; its credential.
    pub async fn agent(&self) -> String {
        let tok: EnrollTokenResponse = self
            .c
            .post(self.u("/v1/admin/enroll-tokens"))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        let r: EnrollResponse = self
            .c
            .post(self.u("/v1/enroll"))
            .json(&EnrollRequest {
                token: tok.token,
                host_name: "hv".into(),
            })
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        r.credential
    }

    pub async fn post(&self, cred: &str, p: &str, body: reqwest::Body) -> (u16, serde_json::Value) {
        self.post_typed(cred, p, body, "application/octet-stream")
            .await
    }

    pub async fn post_typed(
        &self,
        cred: &str,
        p: &str,
        body: reqwest::Body,
        ct: &str,
    ) -> (u16, serde_json::Value) {
        let r = self
            .c
            .post(self.u(p))
            .bearer_auth(cred)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .expect("send");
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn json(
        &self,
        cred: &str,
        p: &str,
        v: &impl serde::Serialize,
    ) -> (u16, serde_json::Value) {
        self.post_typed(
            cred,
            p,
            serde_json::to_vec(v).expect("json").into(),
            "application/json",
        )
        .await
    }
}
