//! The admin side of the API, used by the gateway's own admin commands. With
//! `--data-dir` it reads the gateway's address, admin token and certificate
//! from the data dir; with `--url/--token/--fingerprint` it reaches a gateway
//! on another machine. Either way the certificate is pinned.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tierback_format::wire::ApiErrorBody;

use crate::config::DataDir;

/// An authenticated admin connection to a gateway.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    /// Connection details from a local data dir.
    pub fn from_data_dir(dir: &Path) -> anyhow::Result<Self> {
        let dd = DataDir::new(dir);
        let cfg = dd.load_config()?;
        let addr = std::fs::read_to_string(dd.root.join("serve.addr"))
            .ok()
            .map(|s| s.trim().to_string())
            .unwrap_or(cfg.listen);
        let token = std::fs::read_to_string(dd.admin_token())
            .with_context(|| format!("reading the admin token {}", dd.admin_token().display()))?;
        let fp = crate::tls::fingerprint_of(&dd.tls_cert())?;
        Self::remote(&format!("https://{addr}"), token.trim(), &fp)
    }

    /// Connection to a remote gateway.
    pub fn remote(url: &str, token: &str, fingerprint: &str) -> anyhow::Result<Self> {
        let tls = tierback_format::pin::pinned_client_config(fingerprint)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .context("building the HTTPS client")?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| transport_error(&self.base, e))?;
        check(resp).await
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let r = self.send(self.http.get(self.url(path))).await?;
        r.json().await.context("decoding the gateway's answer")
    }

    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let r = self.send(self.http.post(self.url(path)).json(body)).await?;
        r.json().await.context("decoding the gateway's answer")
    }

    pub async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let r = self.send(self.http.delete(self.url(path))).await?;
        r.json().await.context("decoding the gateway's answer")
    }

    /// POST of a binary body; the JSON answer.
    pub async fn post_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<T> {
        let r = self
            .send(
                self.http
                    .post(self.url(path))
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(body),
            )
            .await?;
        r.json().await.context("decoding the gateway's answer")
    }

    /// A streaming GET.
    pub async fn get_stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        self.send(self.http.get(self.url(path))).await
    }
}

/// Turns a non-2xx response into one line: the gateway's own message.
pub async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let msg = serde_json::from_str::<ApiErrorBody>(&text)
        .map(|b| b.message)
        .unwrap_or(text);
    if status == reqwest::StatusCode::UNAUTHORIZED {
        anyhow::bail!("the gateway refused the credential ({msg}): check the admin token");
    }
    anyhow::bail!("gateway answered {}: {msg}", status.as_u16())
}

/// One line for a failed connection, with the innermost cause (e.g. the
/// certificate pin mismatch or "connection refused").
pub fn transport_error(base: &str, e: reqwest::Error) -> anyhow::Error {
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    anyhow::anyhow!(
        "cannot reach the gateway at {base}: {cause} (is `tierback-gateway serve` running?)"
    )
}
