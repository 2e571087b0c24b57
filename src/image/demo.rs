//! The built-in `demo` image: the smallest root file system that shows a machine working,
//! made from the host's static busybox so no registry or download is needed.
//!
//! Layout: `/bin/busybox` with applet symlinks, `/srv/www/index.html` for `busybox httpd`,
//! the empty mount points a guest init expects, and a minimal `/etc`. The layout is code,
//! so its identity is [`LAYOUT_VERSION`] plus the busybox bytes: bump the version whenever
//! anything below changes, or old cached bases would be reused.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::digest::Hasher;
use crate::elf::{ElfError, check_static};

/// Identity of the layout written by [`write_tree`].
pub const LAYOUT_VERSION: u64 = 1;

/// Busybox applets linked in `/bin`: a shell and what a person poking at a machine uses.
pub const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "httpd", "nc", "ip", "ps", "mount", "umount", "echo", "sleep", "wget",
    "mkdir", "rm", "cp", "mv", "ln", "grep", "kill", "ping", "uname", "hostname", "df", "env",
    "head", "tail", "touch", "dmesg", "vi",
];

/// The page the demo serves; tests look for "hearth demo".
pub const INDEX_HTML: &str = "<!doctype html>\n<title>hearth demo</title>\n<h1>hearth demo</h1>\n<p>Served by busybox httpd from a hearth machine.</p>\n";

/// Why the demo tree could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The configured busybox does not exist.
    #[error(
        "demo image: busybox {0} does not exist (install the busybox-static package or set images.busybox)"
    )]
    BusyboxMissing(PathBuf),
    /// The configured busybox is not a static executable.
    #[error("demo image: busybox {path} is {reason}")]
    NotStatic {
        /// The binary.
        path: PathBuf,
        /// What is wrong with it.
        reason: ElfError,
    },
    /// Writing the tree failed.
    #[error("demo image: {what} {path}: {source}")]
    Write {
        /// The operation.
        what: &'static str,
        /// The path in the tree.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Checks the busybox and feeds the demo's identity (layout version, busybox bytes) into
/// `h`. Cheap enough for every `ensure_base`: one read of a ~2 MB file.
pub(crate) fn identity(busybox: &Path, h: &mut Hasher) -> Result<(), DemoError> {
    let bytes = read_busybox(busybox)?;
    check_static(&bytes).map_err(|reason| DemoError::NotStatic {
        path: busybox.to_path_buf(),
        reason,
    })?;
    h.u64(LAYOUT_VERSION);
    h.bytes(&bytes);
    Ok(())
}

/// Whether the demo image can be built from `busybox` (exists and is static).
pub(crate) fn check(busybox: &Path) -> Result<(), DemoError> {
    let bytes = read_busybox(busybox)?;
    check_static(&bytes).map_err(|reason| DemoError::NotStatic {
        path: busybox.to_path_buf(),
        reason,
    })
}

fn read_busybox(busybox: &Path) -> Result<Vec<u8>, DemoError> {
    std::fs::read(busybox).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DemoError::BusyboxMissing(busybox.to_path_buf()),
        _ => DemoError::Write {
            what: "read",
            path: busybox.to_path_buf(),
            source,
        },
    })
}

/// Writes the demo root file system into the empty directory `root`.
pub(crate) fn write_tree(root: &Path, busybox: &Path) -> Result<(), DemoError> {
    let w = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| DemoError::Write { what, path, source }
    };
    let dirs: &[(&str, u32)] = &[
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("run", 0o755),
        ("srv", 0o755),
        ("srv/www", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/log", 0o755),
    ];
    for &(dir, mode) in dirs {
        let path = root.join(dir);
        std::fs::create_dir(&path).map_err(w("create directory", &path))?;
        // Set after creation: the process umask would strip the sticky and write bits.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(w("chmod", &path))?;
    }
    let target = root.join("bin/busybox");
    std::fs::copy(busybox, &target).map_err(w("copy busybox to", &target))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
        .map_err(w("chmod", &target))?;
    for applet in APPLETS {
        let link = root.join("bin").join(applet);
        std::os::unix::fs::symlink("busybox", &link).map_err(w("symlink", &link))?;
    }
    let files: &[(&str, &str, u32)] = &[
        ("srv/www/index.html", INDEX_HTML, 0o644),
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644),
    ];
    for &(file, text, mode) in files {
        let path = root.join(file);
        std::fs::write(&path, text).map_err(w("write", &path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(w("chmod", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_dynamic_busybox_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("busybox");
        let err = check(&missing).unwrap_err();
        assert!(matches!(err, DemoError::BusyboxMissing(_)), "{err}");
        assert!(err.to_string().contains(&missing.display().to_string()));
        if Path::new("/usr/bin/ls").exists() {
            let err = check(Path::new("/usr/bin/ls")).unwrap_err();
            assert!(matches!(err, DemoError::NotStatic { .. }), "{err}");
            assert!(err.to_string().contains("dynamically linked"), "{err}");
        }
    }

    #[test]
    fn tree_has_the_layout() {
        // Any file serves as the "busybox" here: the layout does not look inside it.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-busybox");
        std::fs::write(&fake, b"binary").unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        write_tree(&root, &fake).unwrap();
        assert_eq!(std::fs::read(root.join("bin/busybox")).unwrap(), b"binary");
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert!(
            std::fs::read_to_string(root.join("srv/www/index.html"))
                .unwrap()
                .contains("hearth demo")
        );
        let tmp = std::fs::metadata(root.join("tmp")).unwrap();
        assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
        for dir in ["proc", "sys", "dev", "run", "var/log"] {
            assert!(root.join(dir).is_dir(), "{dir}");
        }
        assert!(
            std::fs::read_to_string(root.join("etc/passwd"))
                .unwrap()
                .starts_with("root:x:0:0:")
        );
    }
}
