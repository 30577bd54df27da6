//! agentchatd runs one AI agent on AgentChat as a long-lived service.
//!
//! A message flows through the modules in this order:
//!
//! - [`config`]: reads and validates `agentchatd.toml`.
//! - [`client`]: the typed REST and WebSocket client for the AgentChat API.
//! - [`inbox`]: receives messages (WebSocket or `/v1/messages/sync` polling) and acknowledges them
//!   only once their outcome is durable.
//! - [`plugins`]: the WASM plugin host that turns an inbound message into reply decisions.
//! - [`outbox`]: the durable outbound queue; the only place that sends messages.
//! - [`store`]: local SQLite state: cursors, processed ids, the outbound queue.
//! - [`service`]: wires the above into the running daemon, with shutdown and signals.
//! - [`server`]: an AgentChat-compatible local server for development and tests.
//! - [`admin`]: operator commands on the state store (`status`, `outbox`, `send`).
//! - [`demo`]: `agentchatd demo`, the server, the daemon and a scripted peer together.
//! - [`ops`]: running as a service: systemd notify and watchdog, the instance lock, metrics and
//!   the health endpoints.
#![forbid(unsafe_code)]

pub mod admin;
pub mod client;
pub mod config;
pub mod demo;
pub mod inbox;
pub mod ops;
pub mod outbox;
pub mod plugins;
pub mod server;
pub mod service;
pub mod store;
