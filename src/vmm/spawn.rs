//! Starting a VMM process that outlives the daemon, and reaping the ones this daemon
//! started.
//!
//! Both drivers start their VMM the same way: in its own session (the daemon's signals and
//! its death do not reach it), inside the machine's network namespace (entered between
//! fork and exec, never on a daemon thread), with stdout and stderr appended to a log file
//! in the machine directory (a pipe to the daemon would block or kill the VMM once the
//! daemon is gone). A task per child reaps it the moment it exits, so no zombie is left
//! while the daemon runs, and a stop can wait for that.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::{Confinement, LaunchError};

/// How long to wait for our reaper after the process has exited.
const REAP_WAIT: Duration = Duration::from_secs(2);

/// What to start.
pub struct DetachedCommand<'a> {
    /// The machine (for errors).
    pub machine_id: &'a str,
    /// The program.
    pub binary: &'a Path,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Working directory (the machine directory).
    pub workdir: &'a Path,
    /// Network namespace name under `/run/netns` to run in; none: the daemon's.
    pub netns: Option<&'a str>,
    /// File that receives stdout and stderr (appended).
    pub log: PathBuf,
    /// Cgroups to join and identity to take, before exec.
    pub confine: &'a Confinement,
    /// A tap (inside `netns`) to attach and hand over as descriptor [`TAP_FD`]; for a
    /// VMM that cannot open it itself once unprivileged.
    pub tap: Option<&'a str>,
}

/// The descriptor number a handed-over tap has in the VMM.
pub const TAP_FD: i32 = 3;

/// The processes this daemon started and has not reaped yet: pid -> exit description
/// (none while running).
#[derive(Default, Clone)]
pub struct Children {
    map: Arc<Mutex<HashMap<i32, watch::Receiver<Option<String>>>>>,
}

impl Children {
    /// Starts `cmd` detached and hands the child to a reaper task. Returns the pid.
    pub fn spawn(&self, cmd: DetachedCommand<'_>) -> Result<i32, LaunchError> {
        let workdir_err = |path: &Path| {
            let machine_id = cmd.machine_id.to_string();
            let path = path.to_path_buf();
            move |source| LaunchError::Workdir {
                machine_id,
                path,
                source,
            }
        };
        let netns = match cmd.netns {
            Some(name) => Some(fs::File::open(Path::new("/run/netns").join(name)).map_err(
                |source| LaunchError::Netns {
                    machine_id: cmd.machine_id.to_string(),
                    netns: name.to_string(),
                    source,
                },
            )?),
            None => None,
        };
        // The log sits in a directory the VMM can write: opened without following a
        // link (a planted one is removed and the file made anew).
        let log = crate::vmmdir::VmmDir::parent_of(&cmd.log)
            .and_then(|(dir, name)| super::logs::open_append(&dir, &name))
            .map_err(workdir_err(&cmd.log))?;
        let log2 = log.try_clone().map_err(workdir_err(&cmd.log))?;

        let mut command = tokio::process::Command::new(cmd.binary);
        command
            .args(&cmd.args)
            .current_dir(cmd.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        // Everything the child needs is opened or built here, in the parent: between
        // fork and exec only async-signal-safe system calls run, no allocation.
        let cgroup_files = cmd
            .confine
            .cgroup_procs
            .iter()
            .map(|path| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|source| LaunchError::Confine {
                        machine_id: cmd.machine_id.to_string(),
                        what: format!("open {}", path.display()),
                        source,
                    })
            })
            .collect::<Result<Vec<fs::File>, LaunchError>>()?;
        let cgroup_fds: Vec<i32> = cgroup_files.iter().map(|f| f.as_raw_fd()).collect();
        let tap_request = cmd.tap.map(tap_request);
        let run_as = cmd.confine.run_as;
        let groups: Vec<libc::gid_t> = run_as.and_then(|r| r.kvm_gid).into_iter().collect();
        // SAFETY: the closure runs in the forked child before exec, touches only memory
        // prepared above, and makes only async-signal-safe system calls on descriptors
        // the parent keeps open until spawn returns.
        unsafe {
            command.pre_exec(move || {
                let check = |rc: libc::c_int| {
                    if rc < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(rc)
                    }
                };
                // Its own session: the VMM outlives the daemon and its signals.
                check(libc::setsid())?;
                if let Some(fd) = netns_fd {
                    check(libc::setns(fd, libc::CLONE_NEWNET))?;
                }
                // Into the machine's cgroup ("0" is the writer itself), before anything
                // of the VMM runs.
                for fd in &cgroup_fds {
                    let n = libc::write(*fd, b"0".as_ptr().cast(), 1);
                    if n != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(request) = &tap_request {
                    let tun = check(libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR))?;
                    check(libc::ioctl(
                        tun,
                        libc::TUNSETIFF as _,
                        request as *const TapReq,
                    ))?;
                    if tun != TAP_FD {
                        check(libc::dup2(tun, TAP_FD))?;
                        libc::close(tun);
                    }
                }
                if let Some(id) = run_as {
                    check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                    check(libc::setresgid(id.gid, id.gid, id.gid))?;
                    check(libc::setresuid(id.uid, id.uid, id.uid))?;
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| LaunchError::Spawn {
            machine_id: cmd.machine_id.to_string(),
            binary: cmd.binary.to_path_buf(),
            source,
        })?;
        drop(netns);
        drop(cgroup_files);
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        self.reap_in_background(pid, child);
        Ok(pid)
    }

    fn reap_in_background(&self, pid: i32, mut child: tokio::process::Child) {
        let (tx, rx) = watch::channel(None);
        lock(&self.map).insert(pid, rx);
        let map = Arc::clone(&self.map);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            let _ = tx.send(Some(status));
            lock(&map).remove(&pid);
        });
    }

    /// How our child `pid` exited, if it is ours and has exited.
    pub fn exit_of(&self, pid: i32) -> Option<String> {
        lock(&self.map).get(&pid).and_then(|rx| rx.borrow().clone())
    }

    /// Waits until our reaper has reaped `pid` (no-op for processes we did not start).
    pub async fn reaped(&self, pid: i32) {
        let rx = lock(&self.map).get(&pid).cloned();
        if let Some(mut rx) = rx {
            let _ = tokio::time::timeout(REAP_WAIT, rx.wait_for(|s| s.is_some())).await;
        }
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct TapReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// The request that attaches to the persistent tap `name` (made by the network step
/// with the same flags).
fn tap_request(name: &str) -> TapReq {
    let mut request = TapReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    let len = name.len().min(libc::IFNAMSIZ - 1);
    request.name[..len].copy_from_slice(&name.as_bytes()[..len]);
    request
}

/// Gives the machine's directory and the files in it to the VMM's uid, the directory
/// private to it (0700): the VMM then writes its sockets and logs there and reaches its
/// disks, and no other machine's VMM can. `shared` (the link to the image's base, whose
/// inode other machines use too) is left as it is: readable, not the VMM's. So is any
/// other regular file with more than one link: a file of this directory is the machine's
/// alone, so a second link means a shared inode (the base, renamed by a VMM that hoped to
/// be handed it), and handing it over would give one machine every machine's base.
/// Idempotent.
pub fn hand_over(
    machine_id: &str,
    dir: &Path,
    shared: Option<&Path>,
    uid: u32,
    gid: u32,
) -> Result<(), LaunchError> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |path: &Path, what: &str| {
        let machine_id = machine_id.to_string();
        let what = format!("{what} {}", path.display());
        move |source| LaunchError::Confine {
            machine_id,
            what,
            source,
        }
    };
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(failed(dir, "chown"))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(failed(dir, "chmod"))?;
    for entry in fs::read_dir(dir).map_err(failed(dir, "list"))? {
        let path = entry.map_err(failed(dir, "list"))?.path();
        if shared == Some(path.as_path()) {
            continue;
        }
        let meta = fs::symlink_metadata(&path).map_err(failed(&path, "stat"))?;
        if meta.is_file() && std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
            continue;
        }
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(failed(&path, "chown"))?;
    }
    Ok(())
}

/// Removes `path` if it exists, whatever it is (a directory planted where a socket goes
/// included), never following a link. Idempotent.
pub fn remove_stale(machine_id: &str, path: &Path) -> Result<(), LaunchError> {
    crate::vmmdir::remove(path).map_err(|source| LaunchError::Workdir {
        machine_id: machine_id.to_string(),
        path: path.to_path_buf(),
        source,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent (single inserts
    // and removes), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Run as root (as the suite is): the machine's own files go to the VMM's uid, while
    /// the shared base, under its own name or any other (a VMM that renamed it), stays.
    #[test]
    fn hand_over_never_gives_away_a_shared_inode() {
        let dir = tempfile::tempdir().unwrap();
        let machine = dir.path().join("m");
        fs::create_dir(&machine).unwrap();
        let base = dir.path().join("base.img");
        fs::write(&base, b"base").unwrap();
        fs::hard_link(&base, machine.join("base.ext4")).unwrap();
        fs::hard_link(&base, machine.join("rootfs.ext4")).unwrap();
        fs::write(machine.join("config.disk"), b"config").unwrap();
        let link = machine.join("base.ext4");
        hand_over("m", &machine, Some(&link), 54_321, 54_321).unwrap();
        let owner = |name: &str| fs::metadata(machine.join(name)).unwrap().uid();
        assert_eq!(owner("config.disk"), 54_321);
        assert_eq!(owner("base.ext4"), 0);
        assert_eq!(owner("rootfs.ext4"), 0, "the base under the layer's name");
        assert_eq!(fs::metadata(&machine).unwrap().uid(), 54_321);
    }
}
