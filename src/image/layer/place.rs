//! Putting one archive entry on disk under a root, without ever leaving it.
//!
//! Two rules carry the safety of everything unpacked (plain archives and image layers alike):
//! every entry path is relative without `..`, and no path is ever resolved through a symlink
//! while unpacking (a parent that is a symlink is refused), so an archive cannot plant
//! `lib -> /etc` and then write `lib/passwd`. Symlinks themselves may point anywhere inside
//! the image: absolute targets are resolved by the guest against its own root; relative
//! targets that climb above the root are refused. The tree is written by this process
//! alone, so a check made here still holds when the path is used a moment later.

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, CWD, Mode, Timespec, Timestamps, XattrFlags};

use super::unpack::{EntryBudget, Failure};

/// Longest entry path or hard link target accepted, in bytes (Linux's `PATH_MAX`). The
/// tar format lets a name run to megabytes (GNU long names, PAX records), and unpacking
/// keeps the path of every entry of a layer in memory, so this bound times the entry
/// limit bounds that memory. No real root file system has a path this long.
pub(crate) const MAX_PATH: usize = 4096;

/// Longest single name in a path, in bytes (`NAME_MAX`: no Linux file system stores more).
pub(crate) const MAX_NAME: usize = 255;

/// Longest symlink target accepted, in bytes: what ext4 (and the kernel, `PATH_MAX` less
/// its terminating NUL) can store.
pub(crate) const MAX_LINK_TARGET: usize = MAX_PATH - 1;

/// The entry path as a relative path of plain names; `None` for the root itself (`./`).
/// Absolute paths and `..` are refused rather than rewritten: an archive that has them
/// was not made as a root file system, and guessing what it meant is worse than saying so.
/// Paths over [`MAX_PATH`] bytes, or with a name over [`MAX_NAME`], are refused too.
pub(crate) fn relative_path(raw: &Path) -> Result<Option<PathBuf>, String> {
    let len = raw.as_os_str().len();
    if len > MAX_PATH {
        return Err(format!("path is {len} bytes, over the limit of {MAX_PATH}"));
    }
    let mut rel = PathBuf::new();
    for part in raw.components() {
        match part {
            Component::Normal(name) if name.len() > MAX_NAME => {
                return Err(format!(
                    "a name in the path is {} bytes, over the limit of {MAX_NAME}",
                    name.len()
                ));
            }
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
    let len = target.as_os_str().len();
    if len > MAX_LINK_TARGET {
        return Err(format!(
            "symlink target is {len} bytes, over the limit of {MAX_LINK_TARGET}"
        ));
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

/// What lies on the way to a path under the root, looked at without following symlinks.
pub(crate) enum Parents {
    /// Every parent is a real directory.
    Directories,
    /// A parent does not exist (so nothing exists below it either).
    Missing,
}

/// Checks the parents of `rel` under `root` without creating anything. A parent that is a
/// symlink is refused (following it could leave the root); one that is a file ends the
/// walk as [`Parents::Missing`], since nothing can exist below a file.
pub(crate) fn check_parents(root: &Path, rel: &Path, entry: &str) -> Result<Parents, Failure> {
    let mut at = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(Parents::Directories);
    };
    for part in parent.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(symlink_parent(root, &at, entry));
            }
            Ok(_) => return Ok(Parents::Missing),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Parents::Missing),
            Err(source) => return Err(Failure::write(entry, "stat", &at, source)),
        }
    }
    Ok(Parents::Directories)
}

/// Makes sure every parent of `rel` under `root` is a real directory, creating missing
/// ones, each taken from `budget` first. A parent that is a symlink or a file is refused:
/// following it could leave the root.
pub(crate) fn ensure_parent(
    root: &Path,
    rel: &Path,
    entry: &str,
    budget: &mut EntryBudget,
) -> Result<(), Failure> {
    let mut at = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for part in parent.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(symlink_parent(root, &at, entry));
            }
            Ok(_) => {
                return Err(Failure::refused(
                    entry,
                    format!(
                        "its parent `{}` is not a directory",
                        at.strip_prefix(root).unwrap_or(&at).display()
                    ),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                budget.take(entry)?;
                std::fs::create_dir(&at)
                    .map_err(|source| Failure::write(entry, "create directory", &at, source))?;
            }
            Err(source) => return Err(Failure::write(entry, "stat", &at, source)),
        }
    }
    Ok(())
}

fn symlink_parent(root: &Path, at: &Path, entry: &str) -> Failure {
    Failure::refused(
        entry,
        format!(
            "its parent `{}` is a symlink",
            at.strip_prefix(root).unwrap_or(at).display()
        ),
    )
}

/// The on-disk path of an earlier entry named by a hard link, reached without following
/// any symlink. Directories cannot be hard linked.
pub(crate) fn existing_inside(root: &Path, target: &Path) -> Result<PathBuf, String> {
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
/// (tar semantics, and a layer over the layers below it), except that a directory entry
/// keeps an existing directory's contents.
pub(crate) fn clear_place(dst: &Path, is_dir: bool) -> std::io::Result<()> {
    match std::fs::symlink_metadata(dst) {
        Ok(meta) if meta.is_dir() && is_dir => Ok(()),
        Ok(_) => remove_tree(dst),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes whatever is at `path`: a whole directory tree, or the file, device or symlink
/// itself (a symlink is never followed). Nothing there is not an error.
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        // `remove_dir_all` does not follow symlinks inside the tree either.
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets the owner without following a symlink.
pub(crate) fn set_owner(path: &Path, uid: u64, gid: u64) -> std::io::Result<()> {
    let uid =
        u32::try_from(uid).map_err(|_| std::io::Error::other(format!("uid {uid} out of range")))?;
    let gid =
        u32::try_from(gid).map_err(|_| std::io::Error::other(format!("gid {gid} out of range")))?;
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

/// Sets the permission bits, set-id and sticky bits included.
pub(crate) fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    // Never a symlink here: callers only pass paths they just created as something else.
    rustix::fs::chmodat(CWD, path, Mode::from_raw_mode(mode), AtFlags::empty())
        .map_err(std::io::Error::from)
}

/// Sets access and modification times, on a symlink itself rather than its target.
pub(crate) fn set_mtime(path: &Path, mtime: u64) -> std::io::Result<()> {
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

/// Sets extended attributes (name, value) on the path itself, not a symlink's target.
/// Called after chown: changing the owner drops `security.capability`.
pub(crate) fn set_xattrs(path: &Path, xattrs: &[(Vec<u8>, Vec<u8>)]) -> std::io::Result<()> {
    for (name, value) in xattrs {
        let name = std::ffi::OsStr::from_bytes(name);
        rustix::fs::lsetxattr(path, name, value, XattrFlags::empty()).map_err(|e| {
            std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("xattr `{}`: {e}", name.to_string_lossy()),
            )
        })?;
    }
    Ok(())
}
