//! The health-gated watchdog pinger: sends `WATCHDOG=1` on a fixed interval, but only while
//! every loop registered with the [`Heartbeat`] is beating.
//!
//! When a loop stalls the pings stop, so systemd's `WatchdogSec=` runs out and it kills and
//! restarts the daemon; a stall that heals before then resumes the pings. This module does not
//! read the environment (see [`super::notify::watchdog_interval`]) and restarts nothing itself.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::health::{Heartbeat, Stall};
use super::notify::Notifier;

/// tokio's interval cannot tick every 0 s; a zero interval is raised to this.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// Pings `notifier` every `interval` while `heartbeat` is healthy, until `shutdown` is
/// cancelled. The first check happens at once.
///
/// Run it as its own task with the interval from [`super::notify::watchdog_interval`]
/// (already half of `WatchdogSec=`). A stall is logged at warn once when it starts (naming the
/// loops) and at info when it ends; a failed send is logged at warn once per run of failures,
/// because systemd will act on the missing pings anyway and one line is enough to explain why.
pub async fn run(
    notifier: Notifier,
    heartbeat: Heartbeat,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval.max(MIN_INTERVAL));
    // After a long pause (a suspended VM, a starved runtime) one ping is enough; a burst of
    // catch-up pings would only hide how late we are.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stalled_before: Vec<String> = Vec::new();
    let mut send_failing = false;

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }

        let stalled = heartbeat.stalled();
        report_change(&stalled_before, &stalled);
        stalled_before = stalled.iter().map(|s| s.loop_name.clone()).collect();
        if !stalled.is_empty() {
            continue;
        }

        match notifier.watchdog() {
            Ok(()) if send_failing => {
                tracing::info!("watchdog pings are getting through again");
                send_failing = false;
            }
            Ok(()) => {}
            Err(err) if !send_failing => {
                tracing::warn!(error = %err, "cannot send the watchdog ping");
                send_failing = true;
            }
            Err(_) => {}
        }
    }
    tracing::debug!("watchdog pinger stopped");
}

/// Logs the start, change or end of a stall.
fn report_change(before: &[String], now: &[Stall]) {
    let unchanged = before.len() == now.len()
        && before.iter().zip(now).all(|(name, stall)| *name == stall.loop_name);
    if unchanged {
        return;
    }
    if now.is_empty() {
        tracing::info!(recovered = ?before, "all loops beat again; resuming watchdog pings");
        return;
    }
    for stall in now {
        tracing::warn!(
            stalled_loop = %stall.loop_name,
            silent_for_secs = stall.silent_for.as_secs_f64(),
            stall_limit_secs = stall.stall_limit.as_secs_f64(),
            "loop stalled; withholding watchdog pings so systemd restarts the daemon"
        );
    }
}
