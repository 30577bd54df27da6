//! Running as a service: the pieces an operator relies on, each usable on its own.
//!
//! - [`notify`]: `sd_notify` over `$NOTIFY_SOCKET` (ready, status, watchdog, reloading,
//!   stopping) and the watchdog interval systemd asks for.
//! - [`health`]: the [`health::Heartbeat`] the daemon's loops beat and the
//!   [`health::Readiness`] conditions that make it ready.
//! - [`watchdog`]: pings systemd's watchdog only while every loop beats.
//! - [`lock`]: one daemon per state directory.
//! - [`logging`]: terminal, journald or JSON log lines.
//! - [`metrics`]: the `agentchatd_*` metrics in the Prometheus text format.
//! - [`http`]: `/metrics`, `/healthz` and `/readyz` on a local address.
//!
//! None of these start on their own or read the config; the service decides which to use and
//! passes them what they need.

pub mod health;
pub mod http;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod watchdog;
