//! Unpacking a root file system archive into a private directory, refusing anything that
//! could write outside it.
//!
//! The `tar` crate only parses here; creating the files is done by this module, because a
//! root file system needs what a generic unpacker gets wrong or leaves out (device nodes
//! and FIFOs, owners, hard links checked against the root). Safety rests on two rules:
//! every entry path is relative without `..`, and no path is ever resolved through a
//! symlink while unpacking (a parent that is a symlink is refused), so an archive cannot
//! plant `lib -> /etc` and then write `lib/passwd`. Symlinks themselves may point anywhere
//! inside the image: absolute targets are resolved by the guest against its own root;
//! relative targets that climb above the root are refused.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps};

/// Why an archive could not be unpacked. Entry names are as written in the archive.
#[derive(Debug, thiserror::Error)]
pub enum TarballError {
    /// The archive could not be opened.
    #[error("archive {archive}: {source}")]
    Open {
        /// The archive.
        archive: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The archive is corrupt or cut short (or the gzip stream is).
    #[error("archive {archive}: reading entries: {source}")]
    Read {
        /// The archive.
        archive: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An entry would land outside the root, or a link would point outside it.
    #[error("archive entry `{entry}` refused: {reason}")]
    Escapes {
        /// The entry's path in the archive.
        entry: String,
        /// Why.
        reason: String,
    },
    /// An entry of a kind a root file system cannot hold.
    #[error("archive entry `{entry}` has an unsupported type ({kind})")]
    Unsupported {
        /// The entry's path in the archive.
        entry: String,
        /// The tar type, as the crate names it.
        kind: String,
    },
    /// Creating an entry on disk failed.
    #[error("archive entry `{entry}`: {what} {path}: {source}")]
    Write {
        /// The entry's path in the archive.
        entry: String,
        /// The operation.
        what: &'static str,
        /// The path on disk.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Unpacks `archive` (gzip-compressed when `gzip`) into the existing empty directory
/// `root`, keeping modes, owners, device numbers and modification times. On error `root`
/// holds a partial tree; the caller removes it.
pub fn unpack(archive: &Path, gzip: bool, root: &Path) -> Result<(), TarballError> {
    let file = File::open(archive).map_err(|source| TarballError::Open {
        archive: archive.to_path_buf(),
        source,
    })?;
    let reader = BufReader::with_capacity(1 << 20, file);
    if gzip {
        unpack_stream(archive, flate2::read::MultiGzDecoder::new(reader), root)
    } else {
        unpack_stream(archive, reader, root)
    }
}

fn unpack_stream<R: Read>(archive: &Path, reader: R, root: &Path) -> Result<(), TarballError> {
    let read_err = |source| TarballError::Read {
        archive: archive.to_path_buf(),
        source,
    };
    let mut tar = tar::Archive::new(reader);
    // Directory modes and times are applied last: a read-only directory must still take
    // its children, and creating children would reset its modification time.
    let mut dirs: Vec<(PathBuf, String, u32, u64)> = Vec::new();
    for entry in tar.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        let raw = entry.path().map_err(read_err)?.into_owned();
        let name = raw.display().to_string();
        let Some(rel) = relative_path(&raw).map_err(|reason| escapes(&name, reason))? else {
            // `./` itself: the root, whose attributes mkfs sets.
            continue;
        };
        let header = entry.header();
        let mode = header.mode().map_err(read_err)? & 0o7777;
        let uid = header.uid().map_err(read_err)?;
        let gid = header.gid().map_err(read_err)?;
        let mtime = header.mtime().map_err(read_err)?;
        let link = entry.link_name().map_err(read_err)?.map(|l| l.into_owned());
        ensure_parent(root, &rel, &name)?;
        let dst = root.join(&rel);
        let w = |what: &'static str| {
            let (entry, path) = (name.clone(), dst.clone());
            move |source| TarballError::Write {
                entry,
                what,
                path,
                source,
            }
        };
        clear_place(&dst, kind.is_dir()).map_err(w("replace"))?;
        match kind {
            tar::EntryType::Directory => {
                if !dst.is_dir() {
                    std::fs::create_dir(&dst).map_err(w("create directory"))?;
                }
                set_owner(&dst, uid, gid).map_err(w("chown"))?;
                dirs.push((dst, name, mode, mtime));
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&dst)
                    .map_err(w("create"))?;
                std::io::copy(&mut entry, &mut out).map_err(w("write"))?;
            }
            tar::EntryType::Symlink => {
                let target =
                    link.ok_or_else(|| escapes(&name, "symlink without a target".into()))?;
                check_symlink_target(&rel, &target).map_err(|reason| escapes(&name, reason))?;
                std::os::unix::fs::symlink(&target, &dst).map_err(w("symlink"))?;
                set_owner(&dst, uid, gid).map_err(w("chown"))?;
                set_mtime(&dst, mtime).map_err(w("set time"))?;
                continue;
            }
            tar::EntryType::Link => {
                let target =
                    link.ok_or_else(|| escapes(&name, "hard link without a target".into()))?;
                let src = existing_inside(root, &target).map_err(|reason| {
                    escapes(
                        &name,
                        format!("hard link target `{}`: {reason}", target.display()),
                    )
                })?;
                std::fs::hard_link(&src, &dst).map_err(w("hard link"))?;
                // The link shares its target's inode: owner, mode and time are the target's.
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                // Device numbers are read only for devices: writers leave other entries'
                // fields blank or junk.
                let dev = if kind == tar::EntryType::Fifo {
                    0
                } else {
                    let header = entry.header();
                    rustix::fs::makedev(
                        header.device_major().map_err(read_err)?.unwrap_or(0),
                        header.device_minor().map_err(read_err)?.unwrap_or(0),
                    )
                };
                let file_type = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                rustix::fs::mknodat(CWD, &dst, file_type, Mode::from_raw_mode(0o600), dev)
                    .map_err(std::io::Error::from)
                    .map_err(w("mknod"))?;
            }
            other => {
                return Err(TarballError::Unsupported {
                    entry: name,
                    kind: format!("{other:?}"),
                });
            }
        }
        // Owner before mode: chown clears the set-id bits.
        set_owner(&dst, uid, gid).map_err(w("chown"))?;
        set_mode(&dst, mode).map_err(w("chmod"))?;
        set_mtime(&dst, mtime).map_err(w("set time"))?;
    }
    // Children first, so setting a parent's time is the last change inside it.
    for (dst, name, mode, mtime) in dirs.into_iter().rev() {
        let w = |what: &'static str| {
            let (entry, path) = (name.clone(), dst.clone());
            move |source| TarballError::Write {
                entry,
                what,
                path,
                source,
            }
        };
        set_mode(&dst, mode).map_err(w("chmod"))?;
        set_mtime(&dst, mtime).map_err(w("set time"))?;
    }
    Ok(())
}

fn escapes(entry: &str, reason: String) -> TarballError {
    TarballError::Escapes {
        entry: entry.to_string(),
        reason,
    }
}

/// The entry path as a relative path of plain names; `None` for the root itself (`./`).
/// Absolute paths and `..` are refused rather than rewritten: an archive that has them
/// was not made as a root file system, and guessing what it meant is worse than saying so.
pub(crate) fn relative_path(raw: &Path) -> Result<Option<PathBuf>, String> {
    let mut rel = PathBuf::new();
    for part in raw.components() {
        match part {
            Component::Normal(name) => rel.push(name),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".into()),
            Component::ParentDir => return Err("path has a `..` component".into()),
        }
    }
    Ok((!rel.as_os_str().is_empty()).then_some(rel))
}

/// Refuses a relative symlink target that climbs above the image root from the link's
/// directory. Absolute targets are inside the image by definition (the guest resolves them).
pub(crate) fn check_symlink_target(link: &Path, target: &Path) -> Result<(), String> {
    if target.as_os_str().is_empty() {
        return Err("symlink with an empty target".into());
    }
    if target.is_absolute() {
        return Ok(());
    }
    let mut depth = link.components().count() as i64 - 1;
    for part in target.components() {
        match part {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
        if depth < 0 {
            return Err(format!(
                "symlink target `{}` points outside the image",
                target.display()
            ));
        }
    }
    Ok(())
}

/// Makes sure every parent of `rel` under `root` is a real directory, creating missing
/// ones. A parent that is a symlink or a file is refused: following it could leave the root.
fn ensure_parent(root: &Path, rel: &Path, entry: &str) -> Result<(), TarballError> {
    let mut at = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for part in parent.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(escapes(
                    entry,
                    format!(
                        "its parent `{}` is a symlink",
                        at.strip_prefix(root).unwrap_or(&at).display()
                    ),
                ));
            }
            Ok(_) => {
                return Err(escapes(
                    entry,
                    format!(
                        "its parent `{}` is not a directory",
                        at.strip_prefix(root).unwrap_or(&at).display()
                    ),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at).map_err(|source| TarballError::Write {
                    entry: entry.to_string(),
                    what: "create directory",
                    path: at.clone(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(TarballError::Write {
                    entry: entry.to_string(),
                    what: "stat",
                    path: at.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// The on-disk path of an earlier entry named by a hard link, reached without following
/// any symlink. Directories cannot be hard linked.
fn existing_inside(root: &Path, target: &Path) -> Result<PathBuf, String> {
    let rel = relative_path(target)?.ok_or("names the root")?;
    let mut at = root.to_path_buf();
    let count = rel.components().count();
    for (i, part) in rel.components().enumerate() {
        at.push(part);
        let meta =
            std::fs::symlink_metadata(&at).map_err(|e| format!("not unpacked before it ({e})"))?;
        let last = i + 1 == count;
        if !last && !meta.is_dir() {
            return Err("a parent is a symlink or not a directory".into());
        }
        if last && meta.is_dir() {
            return Err("is a directory".into());
        }
    }
    Ok(at)
}

/// Empties the place an entry goes: a later entry replaces an earlier one of the same name
/// (tar semantics), except that a directory entry keeps an existing directory's contents.
fn clear_place(dst: &Path, is_dir: bool) -> std::io::Result<()> {
    match std::fs::symlink_metadata(dst) {
        Ok(meta) if meta.is_dir() && is_dir => Ok(()),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(dst),
        Ok(_) => std::fs::remove_file(dst),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn set_owner(path: &Path, uid: u64, gid: u64) -> std::io::Result<()> {
    let uid =
        u32::try_from(uid).map_err(|_| std::io::Error::other(format!("uid {uid} out of range")))?;
    let gid =
        u32::try_from(gid).map_err(|_| std::io::Error::other(format!("gid {gid} out of range")))?;
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    // Never a symlink here: callers only pass paths they just created as something else.
    rustix::fs::chmodat(CWD, path, Mode::from_raw_mode(mode), AtFlags::empty())
        .map_err(std::io::Error::from)
}

fn set_mtime(path: &Path, mtime: u64) -> std::io::Result<()> {
    let when = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: when,
        last_modification: when,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_are_relative_plain_names() {
        assert_eq!(
            relative_path(Path::new("./etc/passwd")).unwrap(),
            Some(PathBuf::from("etc/passwd"))
        );
        assert_eq!(
            relative_path(Path::new("etc//x/")).unwrap(),
            Some(PathBuf::from("etc/x"))
        );
        assert_eq!(relative_path(Path::new("./")).unwrap(), None);
        assert!(
            relative_path(Path::new("/etc/passwd"))
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            relative_path(Path::new("../evil"))
                .unwrap_err()
                .contains("..")
        );
        assert!(
            relative_path(Path::new("a/../../evil"))
                .unwrap_err()
                .contains("..")
        );
    }

    #[test]
    fn symlink_targets_stay_inside() {
        let ok = [
            ("bin/sh", "busybox"),
            ("usr/bin/x", "../../bin/x"),
            ("a", "/etc/passwd"),
            ("a/b", "./c"),
        ];
        for (link, target) in ok {
            assert!(
                check_symlink_target(Path::new(link), Path::new(target)).is_ok(),
                "{link} -> {target}"
            );
        }
        let bad = [
            ("a", "../x"),
            ("usr/bin/x", "../../../etc/passwd"),
            ("a/b", "c/../../../d"),
            ("a", ""),
        ];
        for (link, target) in bad {
            assert!(
                check_symlink_target(Path::new(link), Path::new(target)).is_err(),
                "{link} -> {target}"
            );
        }
    }

    #[test]
    fn parents_through_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("lib")).unwrap();
        let err = ensure_parent(&root, Path::new("lib/evil"), "lib/evil").unwrap_err();
        assert!(
            err.to_string().contains("lib/evil") && err.to_string().contains("symlink"),
            "{err}"
        );
        ensure_parent(&root, Path::new("usr/share/doc/x"), "usr/share/doc/x").unwrap();
        assert!(root.join("usr/share/doc").is_dir());
        assert!(existing_inside(&root, Path::new("lib/x")).is_err());
    }
}
