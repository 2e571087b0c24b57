//! OCI whiteouts: how a layer deletes what the layers below it put in the tree.
//!
//! `dir/.wh.name` removes `dir/name` (a file or a whole tree); `dir/.wh..wh..opq` makes
//! `dir` opaque, removing everything below it. Both apply to the LOWER layers only: what
//! the same layer writes survives, whether the marker comes before or after it in the
//! archive. So the layer keeps a record of every path it wrote (and their parents), and a
//! removal spares those, descending into directories the layer wrote into to remove only
//! what came from below. Nothing here follows a symlink: a parent that is a symlink is
//! refused, and a symlink being removed is removed itself.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::place::{self, Parents};
use super::unpack::{EntryBudget, Failure};

const PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Names starting with this are reserved by the layer format (AUFS kept hard link and
/// metadata files under it); they are never created and carry no meaning here.
const RESERVED: &[u8] = b".wh..wh.";

/// What a whiteout entry asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Whiteout {
    /// Remove this path from the lower layers.
    Remove(PathBuf),
    /// Remove everything the lower layers put below this directory (empty: the root).
    Opaque(PathBuf),
    /// A reserved name: skip the entry.
    Reserved,
}

/// The whiteout an entry path stands for, if its name is one.
pub(crate) fn classify(rel: &Path) -> Result<Option<Whiteout>, String> {
    let Some(name) = rel.file_name() else {
        return Ok(None);
    };
    let name = name.as_bytes();
    if !name.starts_with(PREFIX) {
        return Ok(None);
    }
    let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
    if name == OPAQUE {
        return Ok(Some(Whiteout::Opaque(parent)));
    }
    if name.starts_with(RESERVED) {
        return Ok(Some(Whiteout::Reserved));
    }
    let target = &name[PREFIX.len()..];
    if target.is_empty() || target == b"." || target == b".." {
        return Err("whiteout that names no file".into());
    }
    Ok(Some(Whiteout::Remove(
        parent.join(OsStr::from_bytes(target)),
    )))
}

/// The paths one layer has written so far, with all their parents.
#[derive(Default)]
pub(crate) struct Written {
    paths: HashSet<PathBuf>,
}

impl Written {
    /// Records `rel` and its parents.
    pub(crate) fn insert(&mut self, rel: &Path) {
        let mut at = Some(rel);
        while let Some(path) = at.filter(|p| !p.as_os_str().is_empty()) {
            // A recorded path has its parents recorded already.
            if !self.paths.insert(path.to_path_buf()) {
                break;
            }
            at = path.parent();
        }
    }

    fn contains(&self, rel: &Path) -> bool {
        self.paths.contains(rel)
    }
}

/// Removes the lower layers' `rel` (see the module comment for what is spared).
pub(crate) fn remove(
    root: &Path,
    rel: &Path,
    written: &Written,
    entry: &str,
) -> Result<(), Failure> {
    match place::check_parents(root, rel, entry)? {
        Parents::Missing => Ok(()),
        Parents::Directories if written.contains(rel) => prune(root, rel, written, entry),
        Parents::Directories => {
            let path = root.join(rel);
            place::remove_tree(&path)
                .map_err(|source| Failure::write(entry, "remove", &path, source))
        }
    }
}

/// Makes directory `rel` opaque: creates it when missing, and removes what the lower
/// layers put below it.
pub(crate) fn make_opaque(
    root: &Path,
    rel: &Path,
    written: &mut Written,
    entry: &str,
    budget: &mut EntryBudget,
) -> Result<(), Failure> {
    // The marker's own path: its parents are exactly the directory and those above it.
    place::ensure_parent(root, &rel.join(OsStr::from_bytes(OPAQUE)), entry, budget)?;
    written.insert(rel);
    prune(root, rel, written, entry)
}

/// Removes everything below directory `rel` that this layer did not write. A path this
/// layer wrote is kept, and if it is a directory (possibly merged over a lower one) the
/// walk goes on inside it. Does nothing when `rel` is not a real directory.
fn prune(root: &Path, rel: &Path, written: &Written, entry: &str) -> Result<(), Failure> {
    let mut stack = vec![rel.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let path = root.join(&dir);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Failure::write(entry, "stat", &path, source)),
        }
        let children = std::fs::read_dir(&path)
            .map_err(|source| Failure::write(entry, "list", &path, source))?;
        for child in children {
            let child = child.map_err(|source| Failure::write(entry, "list", &path, source))?;
            let child_rel = dir.join(child.file_name());
            if written.contains(&child_rel) {
                stack.push(child_rel);
            } else {
                let child_path = child.path();
                place::remove_tree(&child_path)
                    .map_err(|source| Failure::write(entry, "remove", &child_path, source))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteout_names_are_classified() {
        let c = |p: &str| classify(Path::new(p));
        assert_eq!(c("etc/passwd").unwrap(), None);
        assert_eq!(
            c("etc/.wh.passwd").unwrap(),
            Some(Whiteout::Remove(PathBuf::from("etc/passwd")))
        );
        assert_eq!(
            c(".wh.opt").unwrap(),
            Some(Whiteout::Remove(PathBuf::from("opt")))
        );
        assert_eq!(
            c("usr/share/.wh..wh..opq").unwrap(),
            Some(Whiteout::Opaque(PathBuf::from("usr/share")))
        );
        assert_eq!(
            c(".wh..wh..opq").unwrap(),
            Some(Whiteout::Opaque(PathBuf::new()))
        );
        assert_eq!(c("a/.wh..wh.plnk").unwrap(), Some(Whiteout::Reserved));
        assert!(c("a/.wh.").is_err());
        assert!(c("a/.wh...").is_err());
        assert!(c("a/.wh..").is_err());
    }

    #[test]
    fn written_paths_record_their_parents() {
        let mut written = Written::default();
        written.insert(Path::new("a/b/c"));
        written.insert(Path::new("a/d"));
        for p in ["a", "a/b", "a/b/c", "a/d"] {
            assert!(written.contains(Path::new(p)), "{p}");
        }
        assert!(!written.contains(Path::new("a/b/e")));
        assert!(!written.contains(Path::new("")));
    }
}
