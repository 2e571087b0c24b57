//! The steps that turn the initramfs into the machine's root: kernel filesystems, kernel
//! modules, the switch into the root disk, Ctrl-Alt-Del taken over as a stop request,
//! and the way out (power off, or a reboot where the VMM has no power-off device).

use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot, set_cad_enabled};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::time::{ClockId, clock_gettime};

use crate::disks::Root;

/// Where the root disk is mounted before it becomes `/`.
const NEW_ROOT: &str = "/newroot";
/// Where an overlay root's read-only base is mounted (in the initramfs).
const LOWER: &str = "/lower";
/// Where an overlay root's writable layer is mounted (in the initramfs).
const UPPER: &str = "/upper";
/// Mounts carried from the initramfs into the root disk.
const CARRIED_MOUNTS: &[&str] = &["/dev", "/proc", "/sys"];

/// Why a boot step failed; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: String,
        target: String,
        source: Errno,
    },
    #[error("module {path}: {source}")]
    Module { path: PathBuf, source: Errno },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("switch root into {root}: {step}: {source}")]
    SwitchRoot {
        root: PathBuf,
        step: &'static str,
        source: Errno,
    },
    #[error("take over Ctrl-Alt-Del: {step}: {source}")]
    CtrlAltDel { step: &'static str, source: Errno },
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    let _ = fs::create_dir_all(target);
    mount(Some(source), target, Some(fstype), flags, data).map_err(|source| BootError::Mount {
        fstype: fstype.to_string(),
        target: target.to_string(),
        source,
    })
}

/// Mounts `/proc`, `/sys` and a devtmpfs on `/dev` (device nodes appear as drivers bind,
/// with no udev).
pub fn mount_early() -> Result<(), BootError> {
    let safe = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", safe, None)?;
    mount_fs("sysfs", "/sys", "sysfs", safe, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
}

/// The kernel command line; `None` while `/proc` is not mounted (or unreadable).
pub fn cmdline() -> Option<String> {
    fs::read_to_string("/proc/cmdline").ok()
}

/// Whether the kernel command line holds `flag` as a whole word.
pub fn cmdline_has(flag: &str) -> bool {
    cmdline().is_some_and(|c| c.split_whitespace().any(|w| w == flag))
}

/// Turns Ctrl-Alt-Del into a stop request: the kernel then sends `SIGINT` to PID 1
/// instead of rebooting at once (Firecracker's graceful stop, `SendCtrlAltDel`, presses
/// it). `SIGINT` is blocked first so that a press during boot stays pending until the
/// supervise loop reads it from its signalfd: a blocked signal is queued even for PID 1,
/// which would otherwise discard it (no handler). Workloads start with an empty mask
/// (`std::process::Command` resets it in the child).
///
/// Must run as PID 1 (the kernel signals only its `cad_pid`, PID 1 by default).
/// Idempotent: both settings are absolute; there is no undo (the init keeps them for the
/// machine's life).
pub fn take_ctrl_alt_del() -> Result<(), BootError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(|source| {
        BootError::CtrlAltDel {
            step: "block SIGINT",
            source,
        }
    })?;
    set_cad_enabled(false).map_err(|source| BootError::CtrlAltDel {
        step: "reboot(RB_DISABLE_CAD)",
        source,
    })
}

/// Loads every `.ko` in `dir` in file-name order (the kit numbers them in dependency
/// order). A module already present (built in, or loaded) is fine.
pub fn load_modules(dir: &Path) -> Result<(), BootError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BootError::Io { path, source }
    };
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ko"))
        .collect();
    files.sort();
    let no_params = CString::default();
    for path in files {
        let f = fs::File::open(&path).map_err(io(&path))?;
        match finit_module(&f, &no_params, ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(source) => return Err(BootError::Module { path, source }),
        }
    }
    Ok(())
}

/// Mounts the root and makes it `/`: the kernel filesystems are moved into it, the
/// initramfs files are deleted (their memory is freed; this process keeps running from
/// its already loaded image), and the root is moved over `/` and entered with `chroot`
/// (the initramfs cannot be unmounted, so `pivot_root` does not apply).
///
/// An overlay root is the base mounted read-only on [`LOWER`], the writable layer on
/// [`UPPER`] (its `root` and `work` directories made on the first boot), and overlayfs
/// joining them. Those two mounts stay behind in the initramfs, out of the workload's
/// sight; the overlay holds them.
pub fn switch_root(found: &Root) -> Result<(), BootError> {
    let root = match found {
        Root::Single(dev) => dev.clone(),
        Root::Overlay { upper, .. } => upper.clone(),
    };
    let err = |step: &'static str| {
        let root = root.clone();
        move |source| BootError::SwitchRoot { root, step, source }
    };
    let _ = fs::create_dir_all(NEW_ROOT);
    match found {
        Root::Single(dev) => mount(
            Some(dev.as_path()),
            NEW_ROOT,
            Some("ext4"),
            MsFlags::MS_NOATIME,
            None::<&str>,
        )
        .map_err(err("mount ext4"))?,
        Root::Overlay { base, upper } => {
            let _ = fs::create_dir_all(LOWER);
            let _ = fs::create_dir_all(UPPER);
            mount(
                Some(base.as_path()),
                LOWER,
                Some("ext4"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOATIME,
                None::<&str>,
            )
            .map_err(err("mount the base read-only"))?;
            // The inode tables were left for the kernel to zero lazily, but the file's holes
            // read as zeros already: writing them would only cost the host disk space.
            mount(
                Some(upper.as_path()),
                UPPER,
                Some("ext4"),
                MsFlags::MS_NOATIME,
                Some("noinit_itable"),
            )
            .map_err(err("mount the writable layer"))?;
            let (upper_root, work) = (format!("{UPPER}/root"), format!("{UPPER}/work"));
            first_boot_dirs(&upper_root, &work).map_err(err("prepare the writable layer"))?;
            let options = format!("lowerdir={LOWER},upperdir={upper_root},workdir={work}");
            mount(
                Some("overlay"),
                NEW_ROOT,
                Some("overlay"),
                MsFlags::MS_NOATIME,
                Some(options.as_str()),
            )
            .map_err(err("mount overlay"))?;
        }
    }
    for m in CARRIED_MOUNTS {
        let target = format!("{NEW_ROOT}{m}");
        let _ = fs::create_dir_all(&target);
        mount(
            Some(*m),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(err("move kernel filesystem"))?;
    }
    // Best effort: only memory is at stake.
    let _ = fs::remove_file("/init");
    let _ = fs::remove_dir_all("/lib/hearth");
    nix::unistd::chdir(NEW_ROOT).map_err(err("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(err("move root"))?;
    nix::unistd::chroot(".").map_err(err("chroot"))?;
    nix::unistd::chdir("/").map_err(err("chdir /"))?;
    // Conveniences most workloads expect; not fatal if the image cannot hold them.
    let _ = mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    );
    let _ = mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    Ok(())
}

/// Makes the overlay's upper and work directories when missing (the layer's first boot),
/// the upper one owned and moded like the base's root, which it then stands for.
fn first_boot_dirs(upper_root: &str, work: &str) -> Result<(), Errno> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let errno = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    if !Path::new(upper_root).is_dir() {
        // Made whole under another name, then renamed: a boot that dies half way leaves
        // only the other name, which the next boot starts again from.
        let fresh = format!("{upper_root}.new");
        let _ = fs::remove_dir(&fresh);
        let lower = fs::metadata(LOWER).map_err(errno)?;
        fs::create_dir(&fresh).map_err(errno)?;
        std::os::unix::fs::chown(&fresh, Some(lower.uid()), Some(lower.gid())).map_err(errno)?;
        fs::set_permissions(&fresh, fs::Permissions::from_mode(lower.mode() & 0o7777))
            .map_err(errno)?;
        fs::rename(&fresh, upper_root).map_err(errno)?;
    }
    match fs::create_dir(work) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(errno(e)),
        _ => Ok(()),
    }
}

/// Milliseconds since the kernel started (`CLOCK_BOOTTIME`, the clock behind
/// `/proc/uptime`, read at nanosecond resolution).
pub fn uptime_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| (t.tv_sec() as u64) * 1000 + (t.tv_nsec() as u64) / 1_000_000)
        .unwrap_or(0)
}

/// Flushes the filesystems and ends the machine, so that the VMM exits: a power-off, or
/// with [`hearth::guest::HALT_BY_REBOOT_FLAG`] on the command line a reboot (Firecracker has no
/// power-off device and exits when the guest reboots with `reboot=k`). Never returns: if
/// the chosen call fails the other one is tried (QEMU runs with `-no-reboot`, so it exits
/// on a reboot too), and if that fails as well the init waits forever rather than exit.
///
/// Callable at any point of the boot: if `/proc` is not mounted yet it is mounted here to
/// read the command line; if that fails too, the machine powers off.
pub fn halt() -> ! {
    nix::unistd::sync();
    let line = cmdline()
        .or_else(|| {
            let safe = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            let _ = mount_fs("proc", "/proc", "proc", safe, None);
            cmdline()
        })
        .unwrap_or_default();
    let (first, fallback) = if crate::cmdline::halt_by_reboot(&line) {
        (RebootMode::RB_AUTOBOOT, RebootMode::RB_POWER_OFF)
    } else {
        (RebootMode::RB_POWER_OFF, RebootMode::RB_AUTOBOOT)
    };
    let _ = reboot(first);
    let _ = reboot(fallback);
    loop {
        nix::unistd::pause();
    }
}
