//! VMM processes found by their marker rather than by a record: those a crash (or a
//! cancelled launch) left between starting a VMM and recording it. Both the `vmm` step's
//! release and the orphan sweep end them, and the audit looks for them, so what counts
//! as "a VMM of this machine directory" is decided here once.

use std::io;
use std::path::Path;
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, pidfd_open};

use super::pidfd;

/// How long a SIGKILLed VMM may take to exit before the caller goes on (the namespace
/// removal copes with a namespace still held; this only makes it quick).
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// True when process `pid` belongs to the machine directory `dir`: its working
/// directory is `dir` (every VMM is started there, and QEMU names its files relative to
/// it), compared by device and inode; or, for a jailed Firecracker, its root directory
/// is a jail inside `dir`.
pub fn names_dir(pid: i32, dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let same =
        |a: &std::fs::Metadata, b: &std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    let Ok(wanted) = std::fs::metadata(dir) else {
        return false;
    };
    std::fs::metadata(format!("/proc/{pid}/cwd/")).is_ok_and(|cwd| same(&cwd, &wanted))
        || jailed_in(pid, dir)
}

/// Whether the root of process `pid` is one of the jails under `dir`
/// (`<dir>/jail/<exec name>/<id>/root`), compared by device and inode: the jailer pivots
/// into a bind mount of that directory, so the path is gone but the inode is the same.
fn jailed_in(pid: i32, dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(root) = std::fs::metadata(format!("/proc/{pid}/root/")) else {
        return false;
    };
    let jails = dir.join(super::firecracker::jailer::CHROOT_BASE);
    let Ok(execs) = std::fs::read_dir(jails) else {
        return false;
    };
    execs
        .flatten()
        .filter_map(|e| std::fs::read_dir(e.path()).ok())
        .flat_map(|ids| ids.flatten())
        .filter_map(|id| std::fs::metadata(id.path().join("root")).ok())
        .any(|m| m.dev() == root.dev() && m.ino() == root.ino())
}

/// An unrecorded VMM could not be ended.
#[derive(Debug, thiserror::Error)]
#[error("{call} VMM pid {pid}: {source}")]
pub struct KillError {
    /// The process.
    pub pid: i32,
    /// The call that failed, as the message reads: `pidfd of`, `watch`, `SIGKILL`.
    pub call: &'static str,
    /// The system error.
    #[source]
    pub source: io::Error,
}

fn failed(pid: i32, call: &'static str) -> impl FnOnce(io::Error) -> KillError {
    move |source| KillError { pid, call, source }
}

/// SIGKILLs every process carrying `marker` for machine `id` whose command line (or
/// jail) names `dir`, and waits (up to [`EXIT_WAIT`] each) for it to exit, so a caller
/// that goes on to remove the machine's network or directory finds nothing using them.
///
/// Idempotent: a process already gone is success. The pid is opened as a pidfd first and
/// checked after, so a pid reused since the scan is never signalled. Undo: none (a killed
/// VMM is started again by the `vmm` step's acquire).
pub async fn kill_unrecorded(marker: &str, id: &str, dir: &Path) -> Result<(), KillError> {
    for (machine, pid) in super::find_processes(marker) {
        if machine != id {
            continue;
        }
        let Some(raw) = Pid::from_raw(pid) else {
            continue;
        };
        let fd = match pidfd_open(raw, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => continue,
            Err(e) => return Err(failed(pid, "pidfd of")(e.into())),
        };
        if !names_dir(pid, dir) {
            continue;
        }
        let fd = pidfd::watch(fd).map_err(failed(pid, "watch"))?;
        pidfd::kill(&fd).map_err(failed(pid, "SIGKILL"))?;
        if !pidfd::exited_within(&fd, EXIT_WAIT).await {
            tracing::warn!(pid, machine = %id, "unrecorded VMM did not exit within {EXIT_WAIT:?} of SIGKILL");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_does_not_name_a_foreign_dir() {
        let me = std::process::id() as i32;
        assert!(!names_dir(
            me,
            Path::new("/nonexistent/machines/0123456789")
        ));
        let other = tempfile::tempdir().expect("tempdir");
        assert!(!names_dir(me, other.path()));
    }

    /// A process started in a directory belongs to it, whatever its command line says.
    #[test]
    fn a_process_belongs_to_the_directory_it_runs_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(dir.path())
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        let named = names_dir(pid, dir.path());
        let _ = child.kill();
        let _ = child.wait();
        assert!(named);
    }
}
