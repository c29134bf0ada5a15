//! caseledger's HTTP server: CommCare's phone routes over the engines of a data dir.
//!
//! [`Server::bind`] opens the data dir's sled database once and an [`engine::Engine`] per
//! project space over it (the `{domain}` of `/a/{domain}/…`); [`Server::run`] serves until its
//! shutdown future resolves, then lets in-flight requests finish (an acknowledged append is
//! durable before it is acknowledged, I5), flushes, and removes `DIR/server.json`, the file
//! that names the serving process while it runs.
//!
//! Every route but `/healthz`, `/readyz`, `/metrics` and `/api/v1/openapi.json` takes a
//! [`Principal`] (module `auth`), so none can forget to authenticate; [`ServerError`] is turned
//! into a response in one place (`error`): OpenRosa XML on the phone routes, JSON
//! ([`ApiError`]) on caseledger's own API. Only this crate knows HTTP.
//!
//! Modules: `receiver` and `phone` are CommCare's routes; `api_v1` caseledger's JSON commands
//! and queries, `sse` its live subscriptions, `openapi` the document of both, `metrics` the
//! Prometheus exposition.
//!
//! ```ignore
//! let server = server::Server::bind(dir, "127.0.0.1:8000".parse()?, ServerConfig::default()).await?;
//! server.run(server::shutdown_signal()).await?;
//! ```

pub mod api_types;
mod api_v1;
mod auth;
mod data_api;
mod error;
mod limit;
mod metrics;
pub mod openapi;
mod phone;
mod receiver;
pub mod secret;
mod sse;
mod state;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Extension;
use axum::Router;
use engine::EngineConfig;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

pub use api_v1::{ApiPrincipal, DEFAULT_WAIT, MAX_WAIT};
pub use auth::{Access, Principal};
pub use error::{ApiError, ServerError};
pub use limit::LoginLimit;
pub use receiver::POSITION_HEADER;
pub use state::AppState;

/// How a server is set up.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The engines' configuration (parser limits, durability).
    pub engine: EngineConfig,
    /// Request bodies over this many bytes are refused with 413 before they are read (by
    /// `Content-Length`) or as soon as they pass it. Default: 4 × the parser's `max_bytes`, as
    /// the CLI refuses a file (a body between the two is stored as rejected, R50).
    pub max_body_bytes: usize,
    /// A request body not received within this time is answered 408.
    pub body_timeout: Duration,
    /// A request not answered within this time is answered 408.
    pub request_timeout: Duration,
    /// A connection that does not send a whole request head within this time (a slow client,
    /// or a kept-alive connection left idle) is closed.
    pub header_timeout: Duration,
    /// Failed logins allowed per client address and per login.
    pub login_limit: LoginLimit,
    /// Where the logs of record are: `None` for the sled store in the data dir; a JetStream
    /// cluster for replicas (issue 11): each project space's stream is the log, and the data
    /// dir holds only this process's replicas and projections (`engine::Engine::open_replica`).
    pub store: Option<jetstream::JetStreamConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let engine = EngineConfig::default();
        ServerConfig {
            max_body_bytes: engine.limits.max_bytes.saturating_mul(4),
            engine,
            body_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(120),
            header_timeout: HEADER_TIMEOUT,
            login_limit: LoginLimit::default(),
            store: None,
        }
    }
}

/// The name of the file that names the serving process, in the data dir.
pub const SERVER_FILE: &str = "server.json";

/// What `DIR/server.json` holds while a server runs.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ServerFile {
    /// The serving process.
    pub pid: u32,
    /// Where it listens, `127.0.0.1:PORT`.
    pub addr: String,
    /// When it started (RFC 3339, UTC).
    pub started_at: String,
}

/// A bound server, not yet serving.
pub struct Server {
    state: AppState,
    listener: tokio::net::TcpListener,
}

impl Server {
    /// Opens the store in `dir` (every project space in it) and binds `addr` (port 0 picks one).
    ///
    /// # Errors
    /// The engines' errors (a store another process holds is sled's lock error), or the bind's.
    pub async fn bind(
        dir: &Path,
        addr: SocketAddr,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        let state = match config.store.clone() {
            Some(store) => AppState::open_replicas(dir, config, &store).await?,
            None => {
                let owned = dir.to_path_buf();
                tokio::task::spawn_blocking(move || AppState::open(&owned, config))
                    .await
                    .map_err(|e| ServerError::Internal(format!("opening the store: {e}")))??
            }
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServerError::Io(format!("binding {addr}: {e}")))?;
        Ok(Server { state, listener })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        self.listener
            .local_addr()
            .map_err(|e| ServerError::Io(e.to_string()))
    }

    /// Serves until `shutdown` resolves; then stops accepting, lets requests in flight finish,
    /// flushes every engine and removes `DIR/server.json`.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let addr = self.local_addr()?;
        let file = self.state.dir().join(SERVER_FILE);
        write_server_file(&file, addr)?;
        tracing::info!(addr = %addr, dir = %self.state.dir().display(), "serving");
        let app = router(self.state.clone());
        // Each connection: HTTP/1.1 with a timer, so a client that sends its request head too
        // slowly (or a kept-alive connection that never sends the next one) is closed after
        // `HEADER_TIMEOUT`; bodies and whole requests have their own timeouts (`router`).
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.state.inner.config.header_timeout);
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (stream, remote) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors, or a connection reset before accept: go on.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let service = TowerToHyperService::new(
                        app.clone().layer(Extension(ConnectInfo(remote))),
                    );
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, "connection ended");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        // No new connections; SSE streams end on this signal (the graceful shutdown would wait
        // for them forever), then requests in flight finish.
        drop(self.listener);
        self.state.inner.shutdown.send_replace(true);
        graceful.shutdown().await;
        self.state.stop_followers();
        let served: Result<(), ServerError> = Ok(());
        tracing::info!("shutting down: flushing the store");
        let state = self.state;
        let flushed = tokio::task::spawn_blocking(move || {
            for (domain, engine) in state.engines() {
                engine.flush().map_err(|e| {
                    tracing::error!(domain = %domain, error = %e, "flush at shutdown failed");
                    e
                })?;
            }
            Ok::<_, ServerError>(())
        })
        .await
        .map_err(|e| ServerError::Internal(format!("flush task: {e}")))?;
        if let Err(e) = std::fs::remove_file(&file) {
            tracing::warn!(file = %file.display(), error = %e, "server file not removed");
        }
        served.and(flushed)
    }
}

/// The default [`ServerConfig::header_timeout`]: how long a client may take to send a request
/// head (also: how long a kept-alive connection may stay idle before its next request).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Every route, with the body cap and timeouts; handlers take [`Principal`] to be reached.
fn router(state: AppState) -> Router {
    let config = &state.inner.config;
    let max_body = config.max_body_bytes;
    let body_timeout = config.body_timeout;
    let request_timeout = config.request_timeout;
    let receive = post(receiver::receive);
    Router::new()
        .route("/a/{domain}/receiver/", receive.clone())
        .route("/a/{domain}/receiver/{app_id}/", receive.clone())
        .route("/a/{domain}/receiver/secure/", receive.clone())
        .route("/a/{domain}/receiver/secure/{app_id}/", receive)
        .route("/a/{domain}/phone/restore/", get(phone::restore))
        .route("/a/{domain}/phone/restore/{app_id}/", get(phone::restore))
        .merge(openapi::routes().split_for_parts().0)
        .merge(data_api::routes())
        .layer(DefaultBodyLimit::max(max_body))
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

/// Alive: answers while the process serves. Reveals nothing.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "ok", content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready: every project space's projections have folded the log up to its written head.
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses((status = 200, description = "ready", content_type = "text/plain"),
        (status = 503, description = "not ready", content_type = "text/plain")))]
async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    let behind = state
        .engines()
        .iter()
        .any(|(_, e)| e.projections().checkpoint() < e.log().written_head());
    if behind {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// Writes `DIR/server.json` whole (a temporary file renamed over it).
fn write_server_file(path: &PathBuf, addr: SocketAddr) -> Result<(), ServerError> {
    let record = ServerFile {
        pid: std::process::id(),
        addr: addr.to_string(),
        started_at: engine::now().to_string(),
    };
    let text = serde_json::to_string(&record).map_err(|e| ServerError::Internal(e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n")
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| ServerError::Io(format!("{}: {e}", path.display())))
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT"),
        () = terminate => tracing::info!("SIGTERM"),
    }
}
