//! An in-process gateway for API tests (`server::run` on a loopback
//! listener, a fresh data dir), shared by the gateway's integration tests.
#![allow(dead_code)]

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
