//! An AgentChat-compatible local server for development and tests.
//!
//! It speaks the agent-facing wire protocol of `agentchat-api.md` for the parts the daemon and
//! the official SDKs use: registration with a fixed dev verification code, Bearer auth, direct
//! messages with idempotent sends, sync and ack, history, read receipts, and the `/v1/ws`
//! realtime channel. Groups, contacts, uploads, webhooks and presence are not served, nor are the
//! `Idempotency-Key` header and CORS.
//!
//! Code map:
//! - this file: configuration, [`LocalServer`] lifecycle, router, request ids;
//! - `auth`: handles, registration, keys, Bearer extraction, profiles;
//! - `messages`: send, sync, ack, history, read, hide, conversation list;
//! - `ws`: the realtime channel and the live-socket registry (see its docs for the delivery
//!   and redelivery rules of ack mode, and for close codes);
//! - `db`: SQLite schema and queries; `limits`: the per-second send limiter;
//! - `clock`: the adjustable clock; `ids`: ids and keys; `errors`: error types.
//!
//! The server binds where it is told; tests and the dev command use 127.0.0.1.

mod auth;
mod clock;
mod db;
mod errors;
mod ids;
mod limits;
mod messages;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use clock::Clock;
pub use errors::ServerError;

/// How long [`LocalServer::shutdown`] waits for connections to finish before giving up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Caps the server enforces; all configurable so tests reach them quickly.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sends per sender per fixed one-second bucket (default 60).
    pub sends_per_second: u32,
    /// Maximum UTF-8 bytes of JSON(content) + JSON(metadata) (default 32 768).
    pub max_content_bytes: usize,
    /// New unanswered conversations one agent may open per rolling 24 h (default 100).
    pub cold_threads_per_day: u32,
    /// Stored envelopes at which a recipient refuses direct sends (default 10 000).
    pub backlog_hard: u64,
    /// Stored envelopes at which sends get `X-Backlog-Warning` (default 5 000).
    pub backlog_warn: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            sends_per_second: 60,
            max_content_bytes: 32_768,
            cold_threads_per_day: 100,
            backlog_hard: 10_000,
            backlog_warn: 5_000,
        }
    }
}

/// Everything a [`LocalServer`] needs besides its listen address.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// SQLite file; `None` keeps everything in memory for the server's lifetime.
    pub db_path: Option<PathBuf>,
    /// The one verification code `/v1/register/verify` accepts (default `424242`). Dev only.
    pub verification_code: String,
    /// Time between server pings on each socket (default 30 s).
    pub ping_interval: Duration,
    /// How long a ping may go unanswered before the socket is closed 1001 (default 10 s).
    pub pong_timeout: Duration,
    /// How long a new socket may take to send its HELLO (default 5 s).
    pub hello_timeout: Duration,
    /// Rate and size caps.
    pub limits: Limits,
    /// Source of time; share a clone with tests to move time forward.
    pub clock: Clock,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            db_path: None,
            verification_code: "424242".to_owned(),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            clock: Clock::wall(),
        }
    }
}

/// State shared by every request and socket task.
struct AppState {
    /// All durable state: agents, conversations, messages, envelopes.
    db: db::Db,
    /// The only source of "now".
    clock: Clock,
    /// Caps from the configuration.
    limits: Limits,
    /// The dev verification code accepted by `/v1/register/verify`.
    verification_code: String,
    /// Time between server pings on a socket.
    ping_interval: Duration,
    /// How long a ping may stay unanswered.
    pong_timeout: Duration,
    /// How long a new socket may take to send its HELLO.
    hello_timeout: Duration,
    /// Per-sender send counters (memory only; they reset on restart, like a 1 s bucket would).
    limiter: limits::SendRateLimiter,
    /// Live sockets by agent, for pushes and the test hook.
    hub: ws::Hub,
    /// Cancelled once, at shutdown; sockets close 1001 when they see it.
    shutdown: CancellationToken,
    /// Tracks socket tasks, which outlive the HTTP connection that upgraded them.
    tracker: TaskTracker,
    /// Counts of send answers, for tests and benchmarks.
    stats: SendStats,
}

/// How the server answered `POST /v1/messages` since it started.
#[derive(Debug, Default)]
pub struct SendStats {
    /// Sends stored (201) or replayed (200).
    pub sends_accepted: std::sync::atomic::AtomicU64,
    /// 429 RATE_LIMITED answers (per-second limit and cold-outreach cap).
    pub rate_limited: std::sync::atomic::AtomicU64,
    /// 403 AWAITING_REPLY answers.
    pub awaiting_reply: std::sync::atomic::AtomicU64,
    /// 429 RECIPIENT_BACKLOGGED answers.
    pub backlogged: std::sync::atomic::AtomicU64,
    /// Every other refusal.
    pub other_refusals: std::sync::atomic::AtomicU64,
}

/// A running local server.
pub struct LocalServer {
    addr: SocketAddr,
    state: Arc<AppState>,
    /// The accept loop; `None` only once `shutdown` has taken it.
    serve: Option<JoinHandle<std::io::Result<()>>>,
}

impl LocalServer {
    /// Opens the database, binds `listen` and starts serving in the background.
    ///
    /// # Errors
    /// [`ServerError::Db`] when the database cannot be opened or migrated,
    /// [`ServerError::Bind`] when the address cannot be bound.
    pub async fn start(
        config: ServerConfig,
        listen: SocketAddr,
    ) -> Result<LocalServer, ServerError> {
        let db = db::Db::open(config.db_path.as_deref())?;
        let state = Arc::new(AppState {
            db,
            clock: config.clock,
            limits: config.limits,
            verification_code: config.verification_code,
            ping_interval: config.ping_interval,
            pong_timeout: config.pong_timeout,
            hello_timeout: config.hello_timeout,
            limiter: limits::SendRateLimiter::default(),
            hub: ws::Hub::default(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            stats: SendStats::default(),
        });

        let bind_err = |source| ServerError::Bind { addr: listen, source };
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let app = router(state.clone());
        let stop = state.shutdown.clone();
        let serve = tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await
        });
        tracing::info!(%addr, "local server listening");
        Ok(LocalServer { addr, state, serve: Some(serve) })
    }

    /// How the server has answered sends so far.
    pub fn send_stats(&self) -> &SendStats {
        &self.state.stats
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<ip>:<port>`, the base URL clients use.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Test back door: creates an active agent without the e-mail flow and returns its key.
    ///
    /// # Errors
    /// [`ServerError::InvalidHandle`], [`ServerError::HandleTaken`] or [`ServerError::Db`].
    pub async fn seed_agent(&self, handle: &str) -> Result<String, ServerError> {
        if !auth::handle_registrable(handle) {
            return Err(ServerError::InvalidHandle(handle.to_owned()));
        }
        let email = format!("{handle}@seed.invalid");
        let (_agent, key) = auth::create_agent(&self.state, &email, handle, None, None)?;
        Ok(key)
    }

    /// Test hook: closes every live socket of `handle` with `close_code`; returns how many.
    pub async fn drop_sockets(&self, handle: &str, close_code: u16) -> usize {
        let agent = {
            let conn = self.state.db.lock();
            db::agent_by_handle(&conn, &auth::normalise_handle(handle))
        };
        match agent {
            Ok(Some(agent)) => {
                self.state.hub.close_all(&agent.id, close_code, "Dropped by test hook")
            }
            Ok(None) => 0,
            Err(err) => {
                tracing::error!(error = %err, "drop_sockets lookup failed");
                0
            }
        }
    }

    /// Stops accepting, closes every socket with 1001 and returns once connections are done
    /// (or after a short grace period).
    pub async fn shutdown(mut self) {
        tracing::info!(addr = %self.addr, "local server shutting down");
        self.state.shutdown.cancel();
        self.state.tracker.close();
        let Some(serve) = self.serve.take() else {
            return;
        };
        let state = self.state.clone();
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async move {
            let serve_result = serve.await;
            state.tracker.wait().await;
            serve_result
        })
        .await;
        match drained {
            Ok(Ok(Ok(()))) => tracing::info!("local server stopped"),
            Ok(Ok(Err(err))) => tracing::warn!(error = %err, "local server stopped with an error"),
            Ok(Err(err)) => tracing::warn!(error = %err, "local server task failed"),
            Err(_) => tracing::warn!("local server shutdown grace period elapsed"),
        }
    }
}

impl Drop for LocalServer {
    /// A server dropped without [`LocalServer::shutdown`] (say, by a failing test) still stops
    /// accepting and closes its sockets, in the background.
    fn drop(&mut self) {
        self.state.shutdown.cancel();
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/v1/health", get(health))
        .route("/v1/register", post(auth::register))
        .route("/v1/register/verify", post(auth::verify))
        .route("/v1/agents/me", get(auth::me))
        .route("/v1/agents/{handle}", get(auth::profile))
        .route("/v1/messages", post(messages::send))
        .route("/v1/messages/sync", get(messages::sync))
        .route("/v1/messages/sync/ack", post(messages::sync_ack))
        .route("/v1/messages/{id}", get(messages::history).delete(messages::hide))
        .route("/v1/messages/{id}/read", post(messages::mark_read))
        .route("/v1/conversations", get(messages::conversations))
        .route("/v1/ws", get(ws::upgrade))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(axum::middleware::from_fn(request_id))
        .with_state(state)
}

async fn root() -> axum::Json<serde_json::Value> {
    axum::Json(
        serde_json::json!({ "name": "AgentChat API", "version": "0.2.0", "status": "alive" }),
    )
}

async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// Unknown routes and methods get a plain-text 404, as the reference server does.
async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "404 Not Found").into_response()
}

/// Echoes a usable `X-Request-Id` or mints one, and logs each request at debug.
async fn request_id(req: Request, next: Next) -> Response {
    let incoming = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned);
    let request_id = incoming.unwrap_or_else(ids::new_request_id);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();

    let mut res = next.run(req).await;
    tracing::debug!(%method, %path, status = res.status().as_u16(), %request_id, "request");
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert("x-request-id", value);
    }
    res
}

/// Arguments of `agentchatd dev-server`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// SQLite file to keep state in; in memory when absent.
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Verification code accepted by /v1/register/verify (6 characters).
    #[arg(long, default_value = "424242")]
    pub verification_code: String,
    /// Seconds between server pings on each WebSocket.
    #[arg(long, default_value_t = 30)]
    pub ping_interval_secs: u64,
    /// Seconds a ping may go unanswered before the socket is closed.
    #[arg(long, default_value_t = 10)]
    pub pong_timeout_secs: u64,
}

/// Runs the local server until `shutdown` is cancelled.
///
/// # Errors
/// Fails when the code is not 6 characters, the database cannot be opened or the address
/// cannot be bound.
pub async fn run_dev_server(
    args: DevServerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context as _;

    anyhow::ensure!(
        args.verification_code.chars().count() == 6,
        "verification code must be exactly 6 characters"
    );
    let config = ServerConfig {
        db_path: args.db,
        verification_code: args.verification_code,
        ping_interval: Duration::from_secs(args.ping_interval_secs.max(1)),
        pong_timeout: Duration::from_secs(args.pong_timeout_secs.max(1)),
        ..ServerConfig::default()
    };
    let code = config.verification_code.clone();
    let server =
        LocalServer::start(config, args.listen).await.context("while starting the local server")?;
    // The code is a fixed development secret, logged once so a developer can register.
    tracing::info!(addr = %server.local_addr(), verification_code = %code, "dev server ready");
    shutdown.cancelled().await;
    server.shutdown().await;
    Ok(())
}
