//! One daemon per state directory: an exclusive advisory lock on `<state_dir>/agentchatd.lock`.
//!
//! The lock is the kernel's (`flock`, through std's [`File::try_lock`]), so it disappears with
//! the process however it dies; there is no stale PID file to clean up. The PID and start time
//! written into the file only make the refusal message useful. This module does not stop or
//! signal the other instance.
//!
//! The file is never deleted: removing it while another process waits on the same path would
//! let two processes lock two different files.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the state directory.
pub const LOCK_FILE_NAME: &str = "agentchatd.lock";

/// Who holds the lock, as read from the lock file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The holder's process id.
    pub pid: u32,
    /// When the holder started, RFC 3339, if it wrote it.
    pub started: Option<String>,
}

/// Why the instance lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("{}", held_message(path, holder.as_ref()))]
    Held {
        /// The lock file.
        path: PathBuf,
        /// The holder, when its file could be read (it may be mid-write).
        holder: Option<Holder>,
    },
    /// The state directory or the lock file could not be created or opened.
    #[error("cannot open the lock file {}: {source}", path.display())]
    Open {
        /// The lock file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Locking failed for a reason other than another holder (e.g. unsupported file system).
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The lock was taken but our PID could not be written into it.
    #[error("cannot write to the lock file {}: {source}", path.display())]
    Write {
        /// The lock file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

fn held_message(path: &Path, holder: Option<&Holder>) -> String {
    let who = match holder {
        Some(Holder { pid, started: Some(started) }) => format!("pid {pid}, started {started}"),
        Some(Holder { pid, started: None }) => format!("pid {pid}"),
        None => "pid unknown".to_owned(),
    };
    format!("another agentchatd ({who}) holds {}; stop it or use another state.dir", path.display())
}

/// The held instance lock; dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    /// Kept open for the lock's lifetime: closing it is what releases the lock.
    file: File,
    path: PathBuf,
}

// === impl InstanceLock ===

impl InstanceLock {
    /// Takes the lock for `state_dir`, creating the directory and the file if needed, and
    /// records this process's PID and start time in it. Never waits.
    ///
    /// # Errors
    /// [`LockError::Held`] when another process (or another `InstanceLock` in this one) holds
    /// it; the other variants for file system failures.
    pub fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        let path = state_dir.join(LOCK_FILE_NAME);
        let open_error = |source| LockError::Open { path: path.clone(), source };
        std::fs::create_dir_all(state_dir).map_err(open_error)?;
        // No truncation on open: until we hold the lock, the contents are the holder's.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(open_error)?;

        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = read_holder(&file);
                return Err(LockError::Held { path, holder });
            }
            Err(TryLockError::Error(source)) => return Err(LockError::Lock { path, source }),
        }

        let lock = Self { file, path };
        lock.record_self()
            .map_err(|source| LockError::Write { path: lock.path.clone(), source })?;
        tracing::debug!(path = %lock.path.display(), "instance lock taken");
        Ok(lock)
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file's contents with our PID and start time.
    fn record_self(&self) -> io::Result<()> {
        let contents = format!(
            "pid={}\nstarted={}\n",
            std::process::id(),
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        let mut file = &self.file;
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(contents.as_bytes())?;
        file.flush()
    }
}

/// Why `agentchatd reload` could not ask the daemon to reload.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// Nobody holds the lock: no daemon runs on this state directory.
    #[error("no agentchatd is running on {0} (its instance lock is free); nothing to reload")]
    NotRunning(PathBuf),
    /// The lock is held but the holder's pid cannot be read.
    #[error("{0} is held but names no pid; reload with `systemctl reload agentchatd` instead")]
    Unknown(PathBuf),
    /// The signal could not be sent.
    #[error(
        "cannot signal agentchatd (pid {pid}): {source}; run as the daemon's user, or use \
         `systemctl reload agentchatd`"
    )]
    Send {
        /// The holder.
        pid: u32,
        /// The OS error.
        source: io::Error,
    },
    /// The lock could not be inspected.
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// Sends SIGHUP to the daemon holding the lock of `state_dir`, which reloads its config and
/// plugins. Returns the pid signalled.
///
/// # Errors
/// A [`SignalError`] saying why no signal was sent.
pub fn signal_reload(state_dir: &Path) -> Result<u32, SignalError> {
    let path = state_dir.join(LOCK_FILE_NAME);
    if !path.exists() {
        return Err(SignalError::NotRunning(path));
    }
    let holder = match InstanceLock::acquire(state_dir) {
        Ok(_free) => return Err(SignalError::NotRunning(path)),
        Err(LockError::Held { holder, .. }) => holder,
        Err(other) => return Err(other.into()),
    };
    let pid = holder.map(|h| h.pid).ok_or_else(|| SignalError::Unknown(path.clone()))?;
    let target = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| SignalError::Unknown(path.clone()))?;
    rustix::process::kill_process(target, rustix::process::Signal::HUP)
        .map_err(|err| SignalError::Send { pid, source: err.into() })?;
    Ok(pid)
}

/// Reads who holds the lock; `None` when the file is empty or unreadable (a holder that has
/// just taken the lock may not have written yet).
fn read_holder(file: &File) -> Option<Holder> {
    // The file is ours to read but tiny; a bound keeps a corrupted huge file from being read.
    let mut text = String::new();
    let mut file = file;
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(4096).read_to_string(&mut text).ok()?;
    parse_holder(&text)
}

/// Parses the `key=value` lines written by [`InstanceLock::record_self`].
fn parse_holder(text: &str) -> Option<Holder> {
    let mut pid = None;
    let mut started = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("pid", value)) => pid = value.trim().parse().ok(),
            Some(("started", value)) => started = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    Some(Holder { pid: pid?, started })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_lines_are_parsed_in_any_order_and_unknown_keys_ignored() {
        let holder = parse_holder("started=2026-01-02T03:04:05Z\nversion=1\npid=42\n");
        assert_eq!(holder, Some(Holder { pid: 42, started: Some("2026-01-02T03:04:05Z".into()) }));
    }

    #[test]
    fn an_empty_or_garbled_file_names_no_holder() {
        assert_eq!(parse_holder(""), None);
        assert_eq!(parse_holder("pid=abc\n"), None);
        assert_eq!(parse_holder("\u{0}\u{1}garbage"), None);
    }

    #[test]
    fn the_message_names_the_file_and_whatever_is_known_of_the_holder() {
        let path = Path::new("/var/lib/agentchatd/agentchatd.lock");
        let known = Holder { pid: 7, started: Some("2026-01-02T03:04:05Z".into()) };
        assert_eq!(
            held_message(path, Some(&known)),
            "another agentchatd (pid 7, started 2026-01-02T03:04:05Z) holds \
             /var/lib/agentchatd/agentchatd.lock; stop it or use another state.dir"
        );
        assert_eq!(
            held_message(path, None),
            "another agentchatd (pid unknown) holds /var/lib/agentchatd/agentchatd.lock; \
             stop it or use another state.dir"
        );
    }
}
