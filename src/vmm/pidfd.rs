//! Process identity checks and exit waits through pidfds.
//!
//! Why pidfds: a pidfd refers to one process for its whole life, so once it is opened
//! and the start time is checked, signals and exit waits cannot hit a process that reused
//! the pid. A pidfd becomes readable when its process exits (zombie included), which
//! tokio can wait on without polling.

use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::procfs;
use super::{Liveness, VmmProcess};

/// A pidfd for the recorded process if it is still that process and has not ended.
pub fn open_verified(process: &VmmProcess) -> Option<OwnedFd> {
    if process.boot_id != procfs::boot_id() {
        return None;
    }
    let pid = Pid::from_raw(process.pid)?;
    // Open first, then check: if the stat still shows the recorded start time, the pidfd
    // was opened on that very process.
    let fd = pidfd_open(pid, PidfdFlags::empty()).ok()?;
    let stat = procfs::stat(process.pid)?;
    (stat.start_time == process.start_time && !stat.ended).then_some(fd)
}

/// [`Liveness`] of the recorded process.
pub fn liveness(process: &VmmProcess) -> Liveness {
    match open_verified(process) {
        Some(_) => Liveness::Running,
        None => Liveness::Gone,
    }
}

/// Waits until the process behind `fd` exits.
pub async fn wait_exit(fd: &AsyncFd<OwnedFd>) {
    // Readable means exited; an error from the reactor means the fd is unusable, which
    // can only be treated as "no longer observable" (also an exit for our purposes).
    let _ = fd.readable().await;
}

/// Registers a pidfd with the reactor.
pub fn watch(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is moved into the AsyncFd, so the descriptor stays open and
    // unchanged for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(Into::into)
}

/// Waits up to `limit` for the exit; true if it happened.
pub async fn exited_within(fd: &AsyncFd<OwnedFd>, limit: Duration) -> bool {
    tokio::time::timeout(limit, wait_exit(fd)).await.is_ok()
}

/// Sends SIGKILL through the pidfd (never to a reused pid).
pub fn kill(fd: &AsyncFd<OwnedFd>) -> std::io::Result<()> {
    match pidfd_send_signal(fd.get_ref(), Signal::KILL) {
        // ESRCH: it has already exited.
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
