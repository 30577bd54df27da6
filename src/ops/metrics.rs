//! The daemon's metrics: lock-free counters, gauges and fixed-bucket histograms, the fixed set
//! of `agentchatd_*` metrics in [`Metrics`], and their rendering in the Prometheus text
//! exposition format 0.0.4.
//!
//! It only counts and renders; serving the text is [`super::http`]'s job, and deciding what to
//! count is the caller's. Label values must come from bounded sets (plugin ids from the config,
//! outcomes named in code), never from message data, since every distinct value is kept for
//! the process lifetime.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds, in seconds, of the latency histogram buckets: from 1 ms to past the longest
/// sensible plugin timeout. `+Inf` is implied.
pub const LATENCY_BUCKETS_SECS: [f64; 13] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        // Relaxed: each metric is independent and a scrape needs no ordering with other memory.
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// Sets the value from a count, saturating at `i64::MAX`.
    pub fn set_count(&self, count: usize) {
        self.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Adds `delta` (which may be negative).
    pub fn add(&self, delta: i64) {
        self.0.fetch_add(delta, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Durations counted into the [`LATENCY_BUCKETS_SECS`] buckets, with their sum.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket counts, not cumulative; the last slot is `+Inf`. Cumulated when rendered.
    buckets: [AtomicU64; LATENCY_BUCKETS_SECS.len() + 1],
    /// Sum of all observations in nanoseconds; integer so it can be atomic (overflows after
    /// centuries of total observed time).
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = LATENCY_BUCKETS_SECS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(LATENCY_BUCKETS_SECS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// A family of series of one metric, keyed by label values (in the order of the family's
/// label names). Series are created on first use and live as long as the registry.
#[derive(Debug)]
pub struct Family<T, const N: usize> {
    label_names: [&'static str; N],
    /// A std mutex: held only to find or insert a series, never across `.await`.
    series: Mutex<BTreeMap<[String; N], Arc<T>>>,
}

impl<T: Default, const N: usize> Family<T, N> {
    fn new(label_names: [&'static str; N]) -> Self {
        Self { label_names, series: Mutex::new(BTreeMap::new()) }
    }

    /// The series for `label_values`, created at zero if new.
    pub fn with(&self, label_values: [&str; N]) -> Arc<T> {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let key = label_values.map(str::to_owned);
        Arc::clone(series.entry(key).or_default())
    }

    /// A snapshot of every series, in label order, for rendering.
    fn snapshot(&self) -> Vec<([String; N], Arc<T>)> {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.iter().map(|(labels, value)| (labels.clone(), Arc::clone(value))).collect()
    }
}

/// Every metric the daemon exports. Share it as `Arc<Metrics>`; all updates take `&self`.
///
/// Each field's doc names the exported metric (prefixed `agentchatd_`).
#[derive(Debug)]
pub struct Metrics {
    /// `messages_received_total`: inbound messages taken from the inbox, duplicates included.
    pub messages_received: Counter,
    /// `messages_processed_total`: messages whose outcome was committed to the store.
    pub messages_processed: Counter,
    /// `messages_acked_total`: messages acknowledged to the server.
    pub messages_acked: Counter,
    /// `plugin_calls_total{plugin,outcome}`: plugin calls by outcome (e.g. `ok`, `error`,
    /// `timeout`, `trap`).
    pub plugin_calls: Family<Counter, 2>,
    /// `plugin_errors_total{plugin}`: plugin calls that did not return a verdict.
    pub plugin_errors: Family<Counter, 1>,
    /// `plugin_call_seconds{plugin}`: plugin call latency.
    pub plugin_call_seconds: Family<Histogram, 1>,
    /// `outbox_depth`: sends queued and not yet delivered or dead-lettered.
    pub outbox_depth: Gauge,
    /// `sends_total{result}`: send attempts by result (e.g. `sent`, `retry`, `dead`).
    pub sends: Family<Counter, 1>,
    /// `rate_limited_total`: responses with status 429.
    pub rate_limited: Counter,
    /// `dead_letters`: sends given up on and kept for the operator.
    pub dead_letters: Gauge,
    /// `cold_slots_used`: cold-conversation slots in use.
    pub cold_slots_used: Gauge,
    /// `reconnects_total`: inbox reconnections after a lost connection.
    pub reconnects: Counter,
    /// `connected`: 1 while the inbox is connected to the server, else 0.
    pub connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// === impl Metrics ===

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        Self {
            messages_received: Counter::default(),
            messages_processed: Counter::default(),
            messages_acked: Counter::default(),
            plugin_calls: Family::new(["plugin", "outcome"]),
            plugin_errors: Family::new(["plugin"]),
            plugin_call_seconds: Family::new(["plugin"]),
            outbox_depth: Gauge::default(),
            sends: Family::new(["result"]),
            rate_limited: Counter::default(),
            dead_letters: Gauge::default(),
            cold_slots_used: Gauge::default(),
            reconnects: Counter::default(),
            connected: Gauge::default(),
        }
    }

    /// Records one plugin call: its outcome, its latency, and an error unless `outcome` is
    /// `"ok"`.
    pub fn record_plugin_call(&self, plugin: &str, outcome: &str, elapsed: Duration) {
        self.plugin_calls.with([plugin, outcome]).inc();
        self.plugin_call_seconds.with([plugin]).observe(elapsed);
        if outcome != "ok" {
            self.plugin_errors.with([plugin]).inc();
        }
    }

    /// Records one send attempt by result, and a 429 when `rate_limited`.
    pub fn record_send(&self, result: &str, rate_limited: bool) {
        self.sends.with([result]).inc();
        if rate_limited {
            self.rate_limited.inc();
        }
    }

    /// Sets `connected` to 1 or 0.
    pub fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
    }

    /// Every metric in the Prometheus text format 0.0.4, with `# HELP` and `# TYPE` lines.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let out = &mut out;
        counter(out, "messages_received_total", HELP_RECEIVED, &self.messages_received);
        counter(out, "messages_processed_total", HELP_PROCESSED, &self.messages_processed);
        counter(out, "messages_acked_total", HELP_ACKED, &self.messages_acked);
        counter_family(out, "plugin_calls_total", HELP_PLUGIN_CALLS, &self.plugin_calls);
        counter_family(out, "plugin_errors_total", HELP_PLUGIN_ERRORS, &self.plugin_errors);
        histogram_family(
            out,
            "plugin_call_seconds",
            HELP_PLUGIN_SECONDS,
            &self.plugin_call_seconds,
        );
        gauge(out, "outbox_depth", HELP_OUTBOX_DEPTH, &self.outbox_depth);
        counter_family(out, "sends_total", HELP_SENDS, &self.sends);
        counter(out, "rate_limited_total", HELP_RATE_LIMITED, &self.rate_limited);
        gauge(out, "dead_letters", HELP_DEAD_LETTERS, &self.dead_letters);
        gauge(out, "cold_slots_used", HELP_COLD_SLOTS, &self.cold_slots_used);
        counter(out, "reconnects_total", HELP_RECONNECTS, &self.reconnects);
        gauge(out, "connected", HELP_CONNECTED, &self.connected);
        std::mem::take(out)
    }
}

const PREFIX: &str = "agentchatd_";

const HELP_RECEIVED: &str = "Inbound messages taken from the inbox.";
const HELP_PROCESSED: &str = "Inbound messages whose outcome was committed.";
const HELP_ACKED: &str = "Inbound messages acknowledged to the server.";
const HELP_PLUGIN_CALLS: &str = "Plugin calls by plugin and outcome.";
const HELP_PLUGIN_ERRORS: &str = "Plugin calls that failed, by plugin.";
const HELP_PLUGIN_SECONDS: &str = "Plugin call latency in seconds.";
const HELP_OUTBOX_DEPTH: &str = "Sends waiting in the outbox.";
const HELP_SENDS: &str = "Send attempts by result.";
const HELP_RATE_LIMITED: &str = "Responses refused with status 429.";
const HELP_DEAD_LETTERS: &str = "Sends given up on and kept for the operator.";
const HELP_COLD_SLOTS: &str = "Cold-conversation slots in use.";
const HELP_RECONNECTS: &str = "Inbox reconnections after a lost connection.";
const HELP_CONNECTED: &str = "Whether the inbox is connected (1) or not (0).";

// Writing to a String cannot fail, so the fmt::Results below are ignored on purpose.

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {PREFIX}{name} {help}");
    let _ = writeln!(out, "# TYPE {PREFIX}{name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: &Counter) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{PREFIX}{name} {}", value.get());
}

fn gauge(out: &mut String, name: &str, help: &str, value: &Gauge) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{PREFIX}{name} {}", value.get());
}

fn counter_family<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    family: &Family<Counter, N>,
) {
    header(out, name, help, "counter");
    for (values, value) in family.snapshot() {
        let labels = label_set(&family.label_names, &values, None);
        let _ = writeln!(out, "{PREFIX}{name}{labels} {}", value.get());
    }
}

fn histogram_family<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    family: &Family<Histogram, N>,
) {
    header(out, name, help, "histogram");
    for (values, histogram) in family.snapshot() {
        // Cumulate once from one read of each bucket, so `_count` always equals the `+Inf`
        // bucket even while other threads observe.
        let mut cumulative = 0;
        for (slot, bucket) in histogram.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let bound = match LATENCY_BUCKETS_SECS.get(slot) {
                Some(bound) => bound.to_string(),
                None => "+Inf".to_owned(),
            };
            let labels = label_set(&family.label_names, &values, Some(&bound));
            let _ = writeln!(out, "{PREFIX}{name}_bucket{labels} {cumulative}");
        }
        let labels = label_set(&family.label_names, &values, None);
        let sum_secs = histogram.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{PREFIX}{name}_sum{labels} {sum_secs}");
        let _ = writeln!(out, "{PREFIX}{name}_count{labels} {cumulative}");
    }
}

/// `{a="x",b="y"}` (plus `le` for histogram buckets), or nothing without labels.
fn label_set(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(name, value)| format!("{name}=\"{}\"", escape_label_value(value)))
        .collect();
    if let Some(le) = le {
        pairs.push(format!("le=\"{le}\""));
    }
    if pairs.is_empty() { String::new() } else { format!("{{{}}}", pairs.join(",")) }
}

/// Escapes a label value as the text format requires: backslash, double quote and line feed.
pub fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        assert_eq!(escape_label_value(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label_value("two\nlines"), "two\\nlines");
        assert_eq!(escape_label_value("plain-id_1"), "plain-id_1");
    }

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_covers_them() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_millis(1)); // exactly on the 0.001 bound
        histogram.observe(Duration::from_millis(7)); // 0.01
        histogram.observe(Duration::from_secs(60)); // +Inf
        let counts: Vec<u64> =
            histogram.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[3], 1);
        assert_eq!(counts[LATENCY_BUCKETS_SECS.len()], 1);
        assert_eq!(histogram.count(), 3);
    }

    #[test]
    fn a_family_without_series_renders_only_its_header() {
        let text = Metrics::new().render();
        assert!(text.contains(
            "# HELP agentchatd_sends_total Send attempts by result.\n\
             # TYPE agentchatd_sends_total counter\n\
             # HELP agentchatd_rate_limited_total"
        ));
    }

    #[test]
    fn every_metric_has_help_and_type_before_its_samples() {
        let metrics = Metrics::new();
        metrics.record_plugin_call("echo", "ok", Duration::from_millis(3));
        metrics.record_send("sent", false);
        let text = metrics.render();
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap_or_default().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|base| declared.iter().any(|d| d == base))
                    .unwrap_or(name);
                assert_eq!(declared.last().map(String::as_str), Some(base), "{line}");
            }
        }
        assert_eq!(declared.len(), 13);
    }
}
