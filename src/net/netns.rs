//! Named network namespaces, kept alive by a bind mount under /run/netns (the iproute2
//! convention, so `ip netns exec` and the VMM launcher find them), and a way to run code
//! inside one on a dedicated OS thread: `setns` changes the calling thread, so it must
//! never run on a tokio worker.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

/// Where namespace `name` is mounted.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn is_netns(path: &Path) -> bool {
    // A bind-mounted namespace file lives on nsfs; a leftover plain file does not.
    match nix::sys::statfs::statfs(path) {
        Ok(stat) => stat.filesystem_type() == nix::sys::statfs::NSFS_MAGIC,
        Err(_) => false,
    }
}

/// Creates namespace `name` unless it exists. Idempotent: an existing namespace is kept;
/// a leftover file that is not a namespace (a crash between creating the file and
/// mounting on it) is replaced. Undo: [`delete`].
pub fn create(name: &str) -> io::Result<()> {
    let path = netns_path(name);
    if is_netns(&path) {
        return Ok(());
    }
    std::fs::create_dir_all("/run/netns")?;
    let _ = umount2(&path, MntFlags::MNT_DETACH);
    File::create(&path)?;
    let target = path.clone();
    std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
        mount(
            Some(own.as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("netns creation thread panicked"))?
}

/// Deletes namespace `name`. Idempotent: a missing namespace is fine. The kernel frees
/// the namespace (and links still inside it) once no process uses it.
pub fn delete(name: &str) -> io::Result<()> {
    let path = netns_path(name);
    let _ = umount2(&path, MntFlags::MNT_DETACH);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Names under /run/netns starting with `prefix`.
pub fn list(prefix: &str) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir("/run/netns") {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            out.push(name);
        }
    }
    Ok(out)
}

/// Runs `work` on a fresh OS thread that has entered namespace `name`. The thread ends
/// with `work`, so no other code ever runs in the namespace by accident.
pub fn run_in<T, F>(name: &str, work: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let file = File::open(netns_path(name))?;
    std::thread::spawn(move || -> io::Result<T> {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET)?;
        work()
    })
    .join()
    .map_err(|_| io::Error::other("netns worker thread panicked"))?
}
