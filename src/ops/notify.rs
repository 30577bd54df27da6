//! The systemd notification protocol (`sd_notify`) spoken directly over `$NOTIFY_SOCKET`, and
//! the watchdog settings systemd passes in `$WATCHDOG_USEC` and `$WATCHDOG_PID`.
//!
//! It only formats and sends the datagrams; it does not decide when the daemon is ready or
//! healthy (see [`super::health`] and [`super::watchdog`]). No libsystemd and no `unsafe`: the
//! socket is a std [`UnixDatagram`] and the monotonic clock comes from `rustix`.
//!
//! The environment variables are read, never removed: removing them is `unsafe` in this edition
//! and the daemon starts no child processes that could misuse them.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Why a notification could not be set up or sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is neither an absolute path nor an `@abstract` name.
    #[error("NOTIFY_SOCKET {value:?} is neither an absolute socket path nor an @abstract name")]
    UnsupportedAddress {
        /// The value as given, lossily decoded.
        value: String,
    },
    /// The address is valid syntax but the OS refused it (for example a path too long).
    #[error("NOTIFY_SOCKET {value:?} is not a usable socket address: {source}")]
    BadAddress {
        /// The value as given, lossily decoded.
        value: String,
        /// What the OS said.
        source: io::Error,
    },
    /// The local datagram socket could not be created.
    #[error("cannot create a socket for notifications: {0}")]
    Socket(#[source] io::Error),
    /// The datagram could not be sent, or was cut short.
    #[error("cannot send {state} to the notify socket {socket}: {source}")]
    Send {
        /// The first line of the message, e.g. `READY=1`.
        state: String,
        /// The socket address, as configured.
        socket: String,
        /// What the OS said.
        source: io::Error,
    },
    /// `$WATCHDOG_USEC` or `$WATCHDOG_PID` is not a positive integer.
    #[error("{name} {value:?} is not a positive integer")]
    BadWatchdogVar {
        /// The variable's name.
        name: &'static str,
        /// The value as given, lossily decoded.
        value: String,
    },
}

/// Sends state changes to systemd. Cheap to clone; clones share one socket.
///
/// A notifier built while `$NOTIFY_SOCKET` is unset is disabled: every method then succeeds
/// without doing anything, so the daemon can call it unconditionally.
#[derive(Clone, Debug)]
pub struct Notifier {
    /// `None` when not run under a notify-aware service manager.
    target: Option<Arc<Target>>,
}

/// Where notifications go and the socket they leave from.
#[derive(Debug)]
struct Target {
    /// The address as configured, for error messages.
    display: String,
    addr: SocketAddr,
    /// One unbound socket for the process lifetime, non-blocking so a full receive queue on
    /// the manager's side becomes an error instead of stalling a runtime thread.
    socket: UnixDatagram,
}

// === impl Notifier ===

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Self { target: None }
    }

    /// A notifier for `$NOTIFY_SOCKET`, or a disabled one when it is unset or empty.
    ///
    /// # Errors
    /// When the variable holds an address this notifier cannot use; see [`Notifier::to_socket`].
    pub fn from_env() -> Result<Self, NotifyError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(value) if !value.is_empty() => Self::to_socket(&value),
            _ => Ok(Self::disabled()),
        }
    }

    /// A notifier sending to `address`, written as in `$NOTIFY_SOCKET`: an absolute path, or
    /// `@name` for a Linux abstract socket.
    ///
    /// # Errors
    /// [`NotifyError::UnsupportedAddress`] for any other form (such as `vsock:`),
    /// [`NotifyError::BadAddress`] when the OS rejects it, [`NotifyError::Socket`] when no
    /// socket can be created. Nothing is sent yet, so a missing socket file is not an error here.
    pub fn to_socket(address: impl AsRef<OsStr>) -> Result<Self, NotifyError> {
        let address = address.as_ref();
        let display = address.to_string_lossy().into_owned();
        let addr = parse_address(address)?;
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        socket.set_nonblocking(true).map_err(NotifyError::Socket)?;
        Ok(Self { target: Some(Arc::new(Target { display, addr, socket })) })
    }

    /// Whether notifications are actually sent.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1`: startup finished (plugins loaded, inbox connected), or a reload finished.
    ///
    /// # Errors
    /// [`NotifyError::Send`] when the datagram cannot be sent.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send("READY=1")
    }

    /// `STATUS=<text>`: a one-line description shown by `systemctl status`.
    ///
    /// Line breaks in `text` become spaces, because each line of a notification is a separate
    /// assignment and a stray one could forge another state.
    ///
    /// # Errors
    /// [`NotifyError::Send`] when the datagram cannot be sent.
    pub fn status(&self, text: &str) -> Result<(), NotifyError> {
        let one_line: String =
            text.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).collect();
        self.send(&format!("STATUS={one_line}"))
    }

    /// `WATCHDOG=1`: the daemon is alive and healthy. Send it only from a health check, see
    /// [`super::watchdog::run`].
    ///
    /// # Errors
    /// [`NotifyError::Send`] when the datagram cannot be sent.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send("WATCHDOG=1")
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=`, as systemd 253 and later require for
    /// `Type=notify-reload`; older versions ignore the extra field. Send [`Notifier::ready`]
    /// when the reload is done, whether it succeeded or was refused.
    ///
    /// # Errors
    /// [`NotifyError::Send`] when the datagram cannot be sent.
    pub fn reloading(&self) -> Result<(), NotifyError> {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()))
    }

    /// `STOPPING=1`: shutdown has begun.
    ///
    /// # Errors
    /// [`NotifyError::Send`] when the datagram cannot be sent.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send("STOPPING=1")
    }

    /// `EXTEND_TIMEOUT_USEC=`: asks for `extra` more time for the current start, reload or
    /// stop, so a long drain is not killed at `TimeoutStopSec=`.
    ///
    /// # Errors
    /// [`NotifyError::Send`] when the datagram cannot be sent.
    pub fn extend_timeout(&self, extra: Duration) -> Result<(), NotifyError> {
        self.send(&format!("EXTEND_TIMEOUT_USEC={}", extra.as_micros()))
    }

    /// Sends one datagram; a no-op when disabled.
    fn send(&self, message: &str) -> Result<(), NotifyError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let send_error = |source| NotifyError::Send {
            state: message.lines().next().unwrap_or_default().to_owned(),
            socket: target.display.clone(),
            source,
        };
        let sent =
            target.socket.send_to_addr(message.as_bytes(), &target.addr).map_err(send_error)?;
        // Datagrams are all or nothing on Unix sockets, but a short count must not pass silently.
        if sent != message.len() {
            return Err(send_error(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", message.len()),
            )));
        }
        tracing::trace!(state = message, "notified the service manager");
        Ok(())
    }
}

/// Turns a `$NOTIFY_SOCKET` value into a socket address.
fn parse_address(value: &OsStr) -> Result<SocketAddr, NotifyError> {
    let bytes = value.as_bytes();
    let bad =
        |source| NotifyError::BadAddress { value: value.to_string_lossy().into_owned(), source };
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(PathBuf::from(value)).map_err(bad),
        Some(b'@') => abstract_address(&bytes[1..]).map_err(bad),
        _ => Err(NotifyError::UnsupportedAddress { value: value.to_string_lossy().into_owned() }),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract sockets exist only on Linux"))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC=` against.
///
/// std's `Instant` reads the same clock on Linux but does not expose its value, hence rustix.
pub fn monotonic_usec() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let micros = u64::try_from(now.tv_nsec / 1_000).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(micros)
}

/// How often to send `WATCHDOG=1`, from `$WATCHDOG_USEC` and `$WATCHDOG_PID`: half the
/// configured timeout, or `None` when the watchdog is off or meant for another process.
///
/// # Errors
/// [`NotifyError::BadWatchdogVar`] when either variable is set but not a positive integer.
pub fn watchdog_interval() -> Result<Option<Duration>, NotifyError> {
    watchdog_interval_from(
        std::env::var_os("WATCHDOG_USEC").as_deref(),
        std::env::var_os("WATCHDOG_PID").as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] with the variables and our PID given, so it can be tested without
/// touching the process environment.
///
/// # Errors
/// As [`watchdog_interval`].
pub fn watchdog_interval_from(
    watchdog_usec: Option<&OsStr>,
    watchdog_pid: Option<&OsStr>,
    own_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = watchdog_usec else {
        return Ok(None);
    };
    let usec = parse_positive("WATCHDOG_USEC", usec)?;
    // systemd sets WATCHDOG_PID to the main PID; a process started by us would inherit the
    // variables and must not ping on our behalf.
    if let Some(pid) = watchdog_pid
        && parse_positive("WATCHDOG_PID", pid)? != u64::from(own_pid)
    {
        return Ok(None);
    }
    Ok(Some(Duration::from_micros(usec) / 2))
}

fn parse_positive(name: &'static str, value: &OsStr) -> Result<u64, NotifyError> {
    value.to_str().and_then(|text| text.trim().parse::<u64>().ok()).filter(|&n| n > 0).ok_or_else(
        || NotifyError::BadWatchdogVar { name, value: value.to_string_lossy().into_owned() },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(usec: Option<&str>, pid: Option<&str>) -> Result<Option<Duration>, NotifyError> {
        watchdog_interval_from(usec.map(OsStr::new), pid.map(OsStr::new), 100)
    }

    #[test]
    fn the_watchdog_interval_is_half_the_timeout() {
        let half = interval(Some("30000000"), None).expect("valid");
        assert_eq!(half, Some(Duration::from_secs(15)));
        let ours = interval(Some("30000000"), Some("100")).expect("valid");
        assert_eq!(ours, Some(Duration::from_secs(15)));
    }

    #[test]
    fn no_watchdog_when_unset_or_meant_for_another_process() {
        assert_eq!(interval(None, Some("100")).expect("valid"), None);
        assert_eq!(interval(Some("30000000"), Some("101")).expect("valid"), None);
    }

    #[test]
    fn malformed_watchdog_variables_are_named_in_the_error() {
        for (usec, pid, name) in [
            ("0", None, "WATCHDOG_USEC"),
            ("-5", None, "WATCHDOG_USEC"),
            ("soon", None, "WATCHDOG_USEC"),
            ("30000000", Some("x"), "WATCHDOG_PID"),
        ] {
            let err = interval(Some(usec), pid).expect_err(usec);
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }

    #[test]
    fn only_paths_and_abstract_names_are_accepted() {
        assert!(Notifier::to_socket("/run/systemd/notify").is_ok());
        assert!(Notifier::to_socket("@agentchatd-test").is_ok());
        for bad in ["", "relative/path", "vsock:2:1234"] {
            let err = Notifier::to_socket(bad).expect_err(bad);
            assert!(matches!(err, NotifyError::UnsupportedAddress { .. }), "{err}");
        }
        let too_long = format!("/{}", "x".repeat(200));
        let err = Notifier::to_socket(&too_long).expect_err("path too long");
        assert!(matches!(err, NotifyError::BadAddress { .. }), "{err}");
    }

    #[test]
    fn a_disabled_notifier_succeeds_without_sending() {
        let notifier = Notifier::disabled();
        assert!(!notifier.is_enabled());
        notifier.ready().expect("no-op");
        notifier.reloading().expect("no-op");
        notifier.stopping().expect("no-op");
    }

    #[test]
    fn sending_to_a_missing_socket_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.sock");
        let notifier = Notifier::to_socket(&path).expect("valid address");
        let err = notifier.ready().expect_err("nobody listens");
        let text = err.to_string();
        assert!(text.starts_with("cannot send READY=1 to the notify socket"), "{text}");
        assert!(text.contains("absent.sock"), "{text}");
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let first = monotonic_usec();
        let second = monotonic_usec();
        assert!(first > 0 && second >= first);
    }
}
