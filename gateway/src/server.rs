//! `serve`: unlock the keys, open catalog and store, then run the HTTPS API
//! until shutdown. `run` takes a bound listener and a cancellation token so a
//! test can start a whole gateway in-process.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState, Sessions};
use crate::catalog::Catalog;
use crate::chunk_store::{ChunkStore, Keys, StoreConfig};
use crate::config::{write_file_durably, DataDir, GatewayConfig};

/// Reads the passphrase file and unwraps the master key.
pub fn unlock(dd: &DataDir, cfg: &GatewayConfig) -> anyhow::Result<Keys> {
    let pf = dd.passphrase_file(cfg);
    let pass = read_passphrase(&pf)?;
    let kf_path = dd.keys();
    let text = std::fs::read(&kf_path).with_context(|| format!("reading {}", kf_path.display()))?;
    let kf: tierback_format::keyfile::KeyFile = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a Tierback key file", kf_path.display()))?;
    let master = kf
        .unlock(&pass)
        .map_err(|e| anyhow::anyhow!("{e} (passphrase from {})", pf.display()))?;
    Ok(Keys::derive(&master))
}

/// A passphrase file's contents without the trailing newline.
pub fn read_passphrase(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut pass = std::fs::read(path)
        .with_context(|| format!("reading passphrase file {}", path.display()))?;
    while matches!(pass.last(), Some(b'\n' | b'\r')) {
        pass.pop();
    }
    if pass.is_empty() {
        anyhow::bail!("passphrase file {} is empty", path.display());
    }
    Ok(pass)
}

/// Opens everything `serve` needs.
pub async fn open_state(dd: &DataDir) -> anyhow::Result<Arc<AppState>> {
    let cfg = dd.load_config()?;
    let keys = unlock(dd, &cfg)?;
    let catalog = Catalog::open(&dd.catalog())
        .await
        .context("opening the catalog")?;
    let abandoned = catalog.abandon_running_jobs().await?;
    if abandoned > 0 {
        tracing::warn!(
            jobs = abandoned,
            "jobs of a previous run were abandoned; their data is left for GC"
        );
    }
    let store = ChunkStore::open(
        &dd.root,
        keys,
        catalog.clone(),
        StoreConfig {
            pack_target_size: cfg.pack_target_size,
            zstd_level: cfg.zstd_level,
        },
    )
    .await
    .context("opening the local chunk store")?;
    Ok(Arc::new(AppState {
        catalog,
        store: Arc::new(store),
        cfg,
        sessions: Sessions::default(),
        indexes: Default::default(),
        chunk_streams: Default::default(),
    }))
}

/// Serves the API on `listener` until `shutdown` is cancelled, then waits
/// (bounded) for in-flight requests.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = api::router(state.clone());
    let conns = tokio_util::task::TaskTracker::new();
    let reaper = {
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let idle = Duration::from_secs(state.cfg.session_idle_timeout_secs);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
                for job in state.sessions.reap(idle) {
                    let _ = state
                        .catalog
                        .finish_job(
                            &job,
                            "failed",
                            "the agent stopped sending; session expired",
                            None,
                        )
                        .await;
                }
            }
        })
    };
    // The scheduler enqueues due backups of protection groups (see scheduler/).
    tokio::spawn(crate::scheduler::run(
        state.catalog.clone(),
        shutdown.clone(),
    ));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => { if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended"); } }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
                }
            }
        });
    }
    conns.close();
    state.chunk_streams.stop.cancel();
    state.chunk_streams.tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        conns.wait().await;
        state.chunk_streams.tasks.wait().await;
    })
    .await;
    reaper.abort();
    state
        .store
        .flush()
        .await
        .context("sealing the open pack at shutdown")?;
    state.catalog.close().await;
    Ok(())
}

/// `serve --data-dir D`: binds, records the bound address for admin
/// commands, runs until SIGINT/SIGTERM.
pub async fn serve(data_dir: &Path) -> anyhow::Result<()> {
    let dd = DataDir::new(data_dir);
    let state = open_state(&dd).await?;
    let tls = crate::tls::server_config(&dd.tls_cert(), &dd.tls_key())?;
    let listener = TcpListener::bind(&state.cfg.listen)
        .await
        .with_context(|| format!("listening on {}", state.cfg.listen))?;
    let addr = listener.local_addr()?;
    write_file_durably(
        &dd.root.join("serve.addr"),
        addr.to_string().as_bytes(),
        false,
    )
    .context("recording the listen address")?;
    tracing::info!(%addr, "gateway listening (HTTPS)");
    eprintln!("tierback-gateway listening on https://{addr}");
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        });
    }
    run(listener, state, tls, shutdown).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
