//! Named network namespaces, kept alive by a bind mount under /run/netns exactly as
//! iproute2 does it, so `ip netns` and a VMM launcher (`ip netns exec`, or `setns` on
//! `/run/netns/<name>`) find them.
//!
//! Entering and creating change the *calling thread's* namespace: these functions are
//! only called on the fabric's worker threads (see `worker`), which go back to the root
//! namespace after every job. Never on a tokio worker.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::stat::Mode;
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};

use super::error::NetError;

/// Where iproute2 (and therefore everyone) keeps named network namespaces.
const RUN_DIR: &str = "/run/netns";

/// Where namespace `name` is mounted.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(name)
}

fn fail<'a>(name: &'a str, action: &'static str) -> impl FnOnce(io::Error) -> NetError + 'a {
    move |source| NetError::Netns {
        name: name.to_string(),
        action,
        source,
    }
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Makes /run/netns exist and be a shared mount point, as iproute2 does before its first
/// `netns add`: namespace mounts made here then propagate into mount namespaces created
/// later (a VMM jail, a systemd unit with its own mounts). Idempotent.
pub(crate) fn prepare_run_dir() -> Result<(), NetError> {
    // Two fabrics starting at once must not both bind the directory onto itself.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    std::fs::create_dir_all(RUN_DIR).map_err(fail(RUN_DIR, "create directory"))?;
    let shared = || {
        mount(
            None::<&str>,
            RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself, then share it.
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(RUN_DIR),
                RUN_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| fail(RUN_DIR, "bind-mount onto itself")(errno(e)))?;
            shared().map_err(|e| fail(RUN_DIR, "make shared")(errno(e)))
        }
        Err(e) => Err(fail(RUN_DIR, "make shared")(errno(e))),
    }
}

/// Opens namespace `name`: `None` when nothing is mounted there (missing, or a plain file
/// left by a crash between creating the mount point and mounting on it).
pub(crate) fn open(name: &str) -> Result<Option<File>, NetError> {
    let file = match File::open(netns_path(name)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(name, "open")(e)),
    };
    let stat = fstatfs(file.as_fd()).map_err(|e| fail(name, "inspect")(errno(e)))?;
    Ok((stat.filesystem_type() == NSFS_MAGIC).then_some(file))
}

/// Moves the calling thread into namespace `ns`.
pub(crate) fn enter(name: &str, ns: &File) -> Result<(), NetError> {
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| fail(name, "enter")(errno(e)))
}

/// Creates namespace `name` and leaves the calling thread inside it. The caller has
/// checked that nothing is mounted there. On failure no mount is left, and the new
/// namespace dies as soon as the thread leaves it.
///
/// Idempotent with [`open`]: a leftover plain file at the path is reused as the mount
/// point. Undo: [`delete`].
pub(crate) fn create_and_enter(name: &str) -> Result<(), NetError> {
    let path = netns_path(name);
    // Normally made by `prepare_run_dir` at start; cheap to make sure.
    std::fs::create_dir_all(RUN_DIR).map_err(fail(RUN_DIR, "create directory"))?;
    // Read-only, mode 0, like iproute2: the file is only a mount point.
    nix::fcntl::open(
        &path,
        OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(name, "create mount point")(errno(e)))?;
    let mounted = unshare(CloneFlags::CLONE_NEWNET)
        .map_err(|e| fail(name, "create")(errno(e)))
        .and_then(|()| {
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| fail(name, "bind-mount")(errno(e)))
        });
    if mounted.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    mounted
}

/// Deletes namespace `name`: detaches the mount and removes the mount point. The kernel
/// then destroys the namespace and every link in it (the tap, the namespace end of the
/// veth and with it the host end) asynchronously, once nothing else holds it.
///
/// Idempotent: a missing mount or file is fine. Returns whether anything was there.
pub(crate) fn delete(name: &str) -> Result<bool, NetError> {
    let path = netns_path(name);
    let unmounted = match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) => true,
        // Not a mount point, or no such file: nothing mounted.
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => false,
        Err(e) => return Err(fail(name, "unmount")(errno(e))),
    };
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(unmounted),
        Err(e) => Err(fail(name, "remove mount point")(e)),
    }
}

/// Names under /run/netns that start with `prefix`, mounted or not (a plain file there
/// is the leftover of a crashed create and is cleaned by [`delete`] all the same).
pub(crate) fn list(prefix: &str) -> Result<Vec<String>, NetError> {
    let entries = match std::fs::read_dir(RUN_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(fail(RUN_DIR, "list")(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(fail(RUN_DIR, "list"))?;
        if let Some(name) = entry.file_name().to_str()
            && name.starts_with(prefix)
        {
            names.push(name.to_string());
        }
    }
    Ok(names)
}
