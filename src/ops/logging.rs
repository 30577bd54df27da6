//! Log output: readable lines on a terminal, journald-friendly lines under systemd, or JSON.
//!
//! Under systemd (`JOURNAL_STREAM` set) lines carry no timestamp (the journal stamps them) and
//! no colour, and each starts with a `<N>` syslog priority prefix that journald turns into the
//! entry's priority, so `journalctl -p warning` works. The level filter comes from the
//! `AGENTCHATD_LOG` variable (tracing's env-filter syntax), `info` by default.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

/// Where log lines go and how they look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStyle {
    /// Timestamped, coloured when the terminal allows.
    Terminal,
    /// No timestamp, no colour, a syslog priority prefix per line.
    Journal,
    /// One JSON object per line.
    Json,
}

impl LogStyle {
    /// JSON when asked for; otherwise the journal style when stderr goes to journald.
    pub fn detect(json: bool) -> Self {
        if json {
            Self::Json
        } else if std::env::var_os("JOURNAL_STREAM").is_some() {
            Self::Journal
        } else {
            Self::Terminal
        }
    }
}

/// Installs the global subscriber. Later calls do nothing (the first one wins).
pub fn init(style: LogStyle) {
    let filter =
        EnvFilter::try_from_env("AGENTCHATD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match style {
        LogStyle::Terminal => builder.try_init(),
        LogStyle::Json => builder.json().try_init(),
        LogStyle::Journal => builder
            .with_ansi(false)
            .event_format(JournalFormat(format::format().without_time().with_ansi(false)))
            .try_init(),
    };
}

/// Prefixes each line with its syslog priority for journald.
struct JournalFormat(format::Format<format::Full, ()>);

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The syslog priority journald should record for a tracing level.
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(syslog_priority(Level::ERROR), 3);
        assert_eq!(syslog_priority(Level::WARN), 4);
        assert_eq!(syslog_priority(Level::INFO), 6);
        assert_eq!(syslog_priority(Level::DEBUG), 7);
        assert_eq!(syslog_priority(Level::TRACE), 7);
    }

    #[test]
    fn json_wins_over_the_journal() {
        assert_eq!(LogStyle::detect(true), LogStyle::Json);
    }
}
