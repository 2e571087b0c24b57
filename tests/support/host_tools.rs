//! Host tools the image tests and benchmarks drive: a runner for e2fsprogs and friends,
//! and a loop-mounted XFS with reflink (root only) that is unmounted and detached on drop.

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

/// A loop-mounted XFS with reflink, unmounted and detached on drop, pass or fail.
pub struct LoopXfs {
    dir: tempfile::TempDir,
    device: Option<String>,
    mounted: bool,
}

impl LoopXfs {
    /// Makes, attaches and mounts an XFS of `size` bytes with reflink.
    pub fn new(size: u64) -> LoopXfs {
        let dir = tempfile::Builder::new()
            .prefix("hearth-test-xfs-")
            .tempdir()
            .unwrap();
        let mut guard = LoopXfs {
            dir,
            device: None,
            mounted: false,
        };
        let file = guard.dir.path().join("xfs.img");
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        run(
            "mkfs.xfs",
            &["-q", "-m", "reflink=1", file.to_str().unwrap()],
        );
        let device = run("losetup", &["--find", "--show", file.to_str().unwrap()])
            .trim()
            .to_string();
        guard.device = Some(device.clone());
        std::fs::create_dir(guard.mount_point()).unwrap();
        run(
            "mount",
            &["-t", "xfs", &device, guard.mount_point().to_str().unwrap()],
        );
        guard.mounted = true;
        guard
    }

    /// Where it is mounted.
    pub fn mount_point(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopXfs {
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
