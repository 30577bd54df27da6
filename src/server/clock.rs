//! The server's only source of "now". Every timestamp, window and bucket goes through
//! [`Clock`], so tests can move time forward (for example past a 24 h window) without waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

/// Wall-clock time plus an adjustable offset. Clones share the offset, so a test can keep one
/// copy and advance the server's view of time.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The real wall clock with no offset.
    pub fn wall() -> Clock {
        Clock::default()
    }

    /// The current time as the server sees it.
    pub fn now(&self) -> DateTime<Utc> {
        let offset = chrono::Duration::milliseconds(self.offset_ms.load(Ordering::Relaxed));
        Utc::now() + offset
    }

    /// Milliseconds since the Unix epoch, as the server sees it.
    pub fn now_ms(&self) -> i64 {
        self.now().timestamp_millis()
    }

    /// The current time rendered the way the wire shows it: RFC 3339, milliseconds, `Z`.
    pub fn now_string(&self) -> String {
        self.now().to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}
