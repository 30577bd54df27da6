//! The operations HTTP endpoint: `GET /metrics` (Prometheus text), `GET /healthz` (are the
//! loops beating) and `GET /readyz` (has the daemon become ready), on one configurable address.
//!
//! It serves what [`Metrics`], [`Heartbeat`] and [`Readiness`] say and changes none of them.
//! There is no authentication: bind it to a loopback or otherwise private address.

use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::health::{Heartbeat, Readiness};
use super::metrics::{CONTENT_TYPE, Metrics};

/// How long open connections may take to finish after shutdown before the server stops
/// waiting for them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the endpoint could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("cannot listen on {addr} for metrics and health: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// The server failed while running.
    #[error("the metrics and health server failed: {0}")]
    Serve(#[source] io::Error),
    /// The server task panicked or was aborted.
    #[error("the metrics and health server task ended abnormally: {0}")]
    Task(String),
}

/// What the endpoints report on. Cheap to clone.
#[derive(Clone, Debug)]
pub struct OpsState {
    /// Rendered by `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Judged by `/healthz`.
    pub heartbeat: Heartbeat,
    /// Judged by `/readyz`.
    pub readiness: Readiness,
}

/// A running endpoint.
#[derive(Debug)]
pub struct OpsServer {
    local_addr: SocketAddr,
    task: JoinHandle<Result<(), io::Error>>,
}

// === impl OpsServer ===

impl OpsServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until the server has stopped, which happens after the shutdown token passed to
    /// [`start`] is cancelled and open connections finish (at most [`SHUTDOWN_GRACE`] later).
    ///
    /// # Errors
    /// [`HttpError::Serve`] if serving failed, [`HttpError::Task`] if the task panicked.
    pub async fn stopped(self) -> Result<(), HttpError> {
        match self.task.await {
            Ok(result) => result.map_err(HttpError::Serve),
            Err(err) => Err(HttpError::Task(err.to_string())),
        }
    }
}

/// The routes, for callers that serve them themselves.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Binds `addr` and serves the endpoints on a spawned task until `shutdown` is cancelled.
///
/// # Errors
/// [`HttpError::Bind`] when the address cannot be bound; nothing is spawned then.
pub async fn start(
    addr: SocketAddr,
    state: OpsState,
    shutdown: CancellationToken,
) -> Result<OpsServer, HttpError> {
    let bind_error = |source| HttpError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    tracing::info!(addr = %local_addr, "serving metrics and health");

    let graceful = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let task = tokio::spawn(async move {
        // A client that keeps a connection open must not hold up the daemon's exit, so the
        // graceful wait is capped.
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let result = tokio::select! {
            result = graceful => result,
            () = deadline => {
                tracing::warn!("metrics and health connections still open; stopping anyway");
                Ok(())
            }
        };
        tracing::debug!("metrics and health server stopped");
        result
    });
    Ok(OpsServer { local_addr, task })
}

async fn metrics(State(state): State<OpsState>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], state.metrics.render()).into_response()
}

async fn healthz(State(state): State<OpsState>) -> Response {
    let stalled = state.heartbeat.stalled();
    if stalled.is_empty() {
        return (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response();
    }
    let body = json!({ "status": "stalled", "stalled": stalled });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn readyz(State(state): State<OpsState>) -> Response {
    let pending = state.readiness.pending();
    if pending.is_empty() {
        return (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response();
    }
    let body = json!({ "status": "not ready", "pending": pending });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}
