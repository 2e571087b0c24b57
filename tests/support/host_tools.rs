//! Host tools the image tests and benchmarks drive: a runner for e2fsprogs and friends,
//! and loop-mounted file systems (root only: an XFS with reflink, a small ext4 to fill)
//! that are unmounted and detached on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The tool's path in the sbin and bin directories (root's PATH may lack sbin).
pub fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs a tool and returns its stdout; panics with its stderr on failure.
pub fn run(name: &str, args: &[&str]) -> String {
    let out = Command::new(tool(name)).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file system on a loop device, unmounted and detached on drop, pass or fail.
pub struct LoopFs {
    /// Holds the image file (and the mount point, unless one was given).
    dir: tempfile::TempDir,
    mount: PathBuf,
    device: Option<String>,
    mounted: bool,
}

/// The XFS the image tests clone onto: [`LoopFs`] made with reflink.
pub type LoopXfs = LoopFs;

impl LoopFs {
    /// Makes, attaches and mounts an XFS of `size` bytes with reflink.
    pub fn new(size: u64) -> LoopFs {
        LoopFs::make("xfs", &["mkfs.xfs", "-q", "-m", "reflink=1"], size, None)
    }

    /// Makes, attaches and mounts an ext4 of `size` bytes at `mount` (created if missing).
    pub fn ext4_at(size: u64, mount: &Path) -> LoopFs {
        LoopFs::make("ext4", &["mkfs.ext4", "-q", "-F"], size, Some(mount))
    }

    fn make(kind: &str, mkfs: &[&str], size: u64, mount: Option<&Path>) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix(&format!("hearth-test-{kind}-"))
            .tempdir()
            .unwrap();
        let mount = mount.map_or_else(|| dir.path().join("mnt"), Path::to_path_buf);
        let mut guard = LoopFs {
            dir,
            mount,
            device: None,
            mounted: false,
        };
        let file = guard.dir.path().join(format!("{kind}.img"));
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        let mut args: Vec<&str> = mkfs[1..].to_vec();
        args.push(file.to_str().unwrap());
        run(mkfs[0], &args);
        let device = run("losetup", &["--find", "--show", file.to_str().unwrap()])
            .trim()
            .to_string();
        guard.device = Some(device.clone());
        std::fs::create_dir_all(&guard.mount).unwrap();
        run(
            "mount",
            &["-t", kind, &device, guard.mount.to_str().unwrap()],
        );
        guard.mounted = true;
        guard
    }

    /// Where it is mounted.
    pub fn mount_point(&self) -> PathBuf {
        self.mount.clone()
    }

    /// MiB an unprivileged writer may still use on it.
    pub fn free_mib(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.mount).unwrap();
        st.f_bavail.saturating_mul(st.f_frsize) >> 20
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let mnt = self.mount_point();
            let ok = Command::new(tool("umount"))
                .arg(&mnt)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let _ = Command::new(tool("umount")).arg("-l").arg(&mnt).status();
            }
        }
        if let Some(device) = self.device.take() {
            let _ = Command::new(tool("losetup")).args(["-d", &device]).status();
        }
    }
}
