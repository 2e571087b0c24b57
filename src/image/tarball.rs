//! Unpacking a root file system archive into a private directory, refusing anything that
//! could write outside it.
//!
//! A plain archive is unpacked by the same loop as an image layer (see `layer`), with the
//! same rules: every entry path is relative without `..`, no path is ever resolved through
//! a symlink while unpacking (so an archive cannot plant `lib -> /etc` and then write
//! `lib/passwd`), relative symlink targets that climb above the root are refused, absolute
//! ones are resolved by the guest against its own root. Unlike a layer, `.wh.` names are
//! ordinary files here, and there is no size limit beyond the disk; the entry limit of
//! images (`images.max_entries`) holds for archives too, since unpacking keeps a path per
//! entry in memory.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use super::layer::{self, EntryBudget, Failure, Kind, Meter};
#[cfg(test)]
use super::layer::{check_symlink_target, ensure_parent, existing_inside, relative_path};

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
    /// The archive holds more entries than `max_entries` allows.
    #[error(
        "archive {archive}: entry `{entry}` refused: the image has more than {limit} entries (images.max_entries)"
    )]
    TooManyEntries {
        /// The archive.
        archive: PathBuf,
        /// The entry that went over.
        entry: String,
        /// The limit.
        limit: u64,
    },
}

impl TarballError {
    /// Whether the archive breaks a configured limit: it can never be unpacked with these
    /// settings.
    pub fn is_over_limit(&self) -> bool {
        match self {
            TarballError::TooManyEntries { .. } => true,
            TarballError::Open { .. }
            | TarballError::Read { .. }
            | TarballError::Escapes { .. }
            | TarballError::Unsupported { .. }
            | TarballError::Write { .. } => false,
        }
    }
}

/// Unpacks `archive` (gzip-compressed when `gzip`) into the existing empty directory
/// `root`, keeping modes, owners, device numbers, xattrs and modification times, and
/// refusing it once it has more than `max_entries` entries (directories made for entries
/// whose parent is missing count too). On error `root` holds a partial tree; the caller
/// removes it.
pub fn unpack(
    archive: &Path,
    gzip: bool,
    root: &Path,
    max_entries: u64,
) -> Result<(), TarballError> {
    let file = File::open(archive).map_err(|source| TarballError::Open {
        archive: archive.to_path_buf(),
        source,
    })?;
    let reader = BufReader::with_capacity(1 << 20, file);
    // No budget: the archive is the operator's own file, and the disk is the limit.
    let meter = Meter::new(0, u64::MAX);
    let mut entries = EntryBudget::new(0, max_entries);
    let result = if gzip {
        layer::unpack(
            flate2::read::MultiGzDecoder::new(reader),
            root,
            Kind::Archive,
            &meter,
            &mut entries,
        )
    } else {
        layer::unpack(reader, root, Kind::Archive, &meter, &mut entries)
    };
    result
        .map(|_| ())
        .map_err(|failure| tarball_error(archive, failure))
}

fn tarball_error(archive: &Path, failure: Failure) -> TarballError {
    match failure {
        Failure::Read { entry, source } => TarballError::Read {
            archive: archive.to_path_buf(),
            source: std::io::Error::new(source.kind(), format!("entry `{entry}`: {source}")),
        },
        Failure::Refused { entry, reason } => TarballError::Escapes { entry, reason },
        Failure::Unsupported { entry, kind } => TarballError::Unsupported { entry, kind },
        Failure::Write {
            entry,
            what,
            path,
            source,
        } => TarballError::Write {
            entry,
            what,
            path,
            source,
        },
        // Cannot happen without a limit; kept as a read error rather than a panic.
        Failure::TooLarge { entry, limit } => TarballError::Read {
            archive: archive.to_path_buf(),
            source: std::io::Error::other(format!(
                "entry `{entry}` goes over {limit} uncompressed bytes"
            )),
        },
        Failure::TooManyEntries { entry, limit } => TarballError::TooManyEntries {
            archive: archive.to_path_buf(),
            entry,
            limit,
        },
    }
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
        let mut budget = EntryBudget::unlimited();
        let err = ensure_parent(&root, Path::new("lib/evil"), "lib/evil", &mut budget).unwrap_err();
        assert!(
            err.to_string().contains("lib/evil") && err.to_string().contains("symlink"),
            "{err}"
        );
        ensure_parent(
            &root,
            Path::new("usr/share/doc/x"),
            "usr/share/doc/x",
            &mut budget,
        )
        .unwrap();
        assert!(root.join("usr/share/doc").is_dir());
        assert_eq!(budget.used(), 3, "usr, usr/share, usr/share/doc");
        // Directories made for a missing parent count against the limit.
        let mut tight = EntryBudget::new(0, 2);
        let err = ensure_parent(&root, Path::new("a/b/c/d"), "a/b/c/d", &mut tight).unwrap_err();
        assert!(
            matches!(&err, Failure::TooManyEntries { limit: 2, .. }),
            "{err}"
        );
        assert!(root.join("a/b").is_dir() && !root.join("a/b/c").exists());
        assert!(existing_inside(&root, Path::new("lib/x")).is_err());
    }
}
