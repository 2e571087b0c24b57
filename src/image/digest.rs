//! Content hashing of image sources, so a base is rebuilt exactly when what goes into it
//! changes and never otherwise.
//!
//! A directory is hashed by a deterministic walk (names sorted bytewise, symlinks never
//! followed) over everything `mkfs.ext4 -d` copies into the file system except timestamps:
//! relative path, file type, permission bits, owner, symlink target, device number, hard
//! link identity and file bytes. Every field is length-prefixed or fixed-width, so two
//! different trees cannot produce the same byte stream. The same walk counts what the
//! tree needs on disk, which sizes the ext4 image.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// Bytes of one file system block; the ext4 images are made with this block size.
pub(crate) const BLOCK: u64 = 4096;

/// Why a source could not be hashed or measured.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct WalkError {
    /// The operation that failed (read directory, stat, read file).
    pub what: &'static str,
    /// The path it failed on.
    pub path: PathBuf,
    /// The cause.
    pub source: std::io::Error,
}

/// What a tree needs in a file system, counted during the walk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Inodes: every entry including the root, hard links counted once.
    pub inodes: u64,
    /// Data blocks: file contents, directories and long symlink targets, rounded to blocks.
    pub data_bytes: u64,
    /// Sum of regular file sizes as they are (for reporting).
    pub file_bytes: u64,
}

/// A streaming hash with unambiguous field encoding.
pub(crate) struct Hasher(Sha256);

impl Hasher {
    /// A hash whose stream starts with `domain`, so hashes of different kinds never meet.
    pub(crate) fn new(domain: &str) -> Hasher {
        let mut h = Hasher(Sha256::new());
        h.bytes(domain.as_bytes());
        h
    }

    /// A length-prefixed byte string.
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
    }

    /// A fixed-width number.
    pub(crate) fn u64(&mut self, n: u64) {
        self.0.update(n.to_le_bytes());
    }

    /// Raw bytes of a stream whose length was already written.
    fn raw(&mut self, b: &[u8]) {
        self.0.update(b);
    }

    /// The digest: 64 lowercase hex characters.
    pub(crate) fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// Whether `s` has the shape of a digest this module produces. Digests become file names,
/// so anything else (a path, `..`) is refused before it gets near the file system.
pub fn is_valid_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Hashes a whole file's bytes into `h` (length first), reading it once.
pub(crate) fn hash_file(h: &mut Hasher, path: &Path) -> Result<(), WalkError> {
    let err = |what, source| WalkError {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(|e| err("open", e))?;
    let len = file.metadata().map_err(|e| err("stat", e))?.len();
    h.u64(len);
    let mut buf = vec![0u8; 1 << 20];
    let mut seen = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| err("read", e))?;
        if n == 0 {
            break;
        }
        seen += n as u64;
        h.raw(&buf[..n]);
    }
    if seen != len {
        // The file changed under us: the hash would not describe what mkfs copies.
        return Err(err(
            "read",
            std::io::Error::other(format!(
                "size changed while hashing ({len} -> {seen} bytes)"
            )),
        ));
    }
    Ok(())
}

/// Walks `root` and feeds every entry into `h` when given; always returns the stats.
/// The root directory's own attributes are left out: `mkfs.ext4` gives the file system
/// root its own owner and mode.
pub(crate) fn walk_tree(root: &Path, mut h: Option<&mut Hasher>) -> Result<TreeStats, WalkError> {
    let mut walker = Walker {
        stats: TreeStats {
            inodes: 1,
            data_bytes: BLOCK,
            file_bytes: 0,
        },
        links: HashMap::new(),
        next_link: 0,
    };
    walker.dir(root, Path::new(""), &mut h)?;
    Ok(walker.stats)
}

struct Walker {
    stats: TreeStats,
    /// (dev, inode) of files seen with more than one link, to their link ordinal.
    links: HashMap<(u64, u64), u64>,
    next_link: u64,
}

impl Walker {
    fn dir(
        &mut self,
        dir: &Path,
        rel: &Path,
        h: &mut Option<&mut Hasher>,
    ) -> Result<(), WalkError> {
        let read = std::fs::read_dir(dir).map_err(|source| WalkError {
            what: "read directory",
            path: dir.to_path_buf(),
            source,
        })?;
        let mut names = Vec::new();
        for entry in read {
            let entry = entry.map_err(|source| WalkError {
                what: "read directory",
                path: dir.to_path_buf(),
                source,
            })?;
            names.push(entry.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let entries = names.len() as u64;
        // A directory holds ~32 bytes of entry per name; large ones take more blocks.
        self.stats.data_bytes += round_up(entries * 32, BLOCK).saturating_sub(BLOCK);
        if let Some(h) = h.as_deref_mut() {
            h.u64(entries);
        }
        for name in names {
            self.entry(dir, rel, &name, h)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        dir: &Path,
        rel: &Path,
        name: &OsStr,
        h: &mut Option<&mut Hasher>,
    ) -> Result<(), WalkError> {
        let path = dir.join(name);
        let rel = rel.join(name);
        let meta = std::fs::symlink_metadata(&path).map_err(|source| WalkError {
            what: "stat",
            path: path.clone(),
            source,
        })?;
        let ft = meta.file_type();
        let kind: u8 = if ft.is_dir() {
            b'd'
        } else if ft.is_file() {
            b'f'
        } else if ft.is_symlink() {
            b'l'
        } else if ft.is_char_device() {
            b'c'
        } else if ft.is_block_device() {
            b'b'
        } else if ft.is_fifo() {
            b'p'
        } else {
            b's'
        };
        if let Some(h) = h.as_deref_mut() {
            h.bytes(rel.as_os_str().as_bytes());
            h.bytes(&[kind]);
            h.u64(u64::from(meta.mode() & 0o7777));
            h.u64(u64::from(meta.uid()));
            h.u64(u64::from(meta.gid()));
        }
        // A second name for an inode already seen costs no inode and no data, and is
        // recorded as a reference to the first one so a hard link differs from a copy.
        if !ft.is_dir() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(&ordinal) = self.links.get(&key) {
                if let Some(h) = h.as_deref_mut() {
                    h.bytes(b"hardlink");
                    h.u64(ordinal);
                }
                return Ok(());
            }
            self.links.insert(key, self.next_link);
            self.next_link += 1;
        }
        self.stats.inodes += 1;
        match kind {
            b'd' => {
                self.stats.data_bytes += BLOCK;
                self.dir(&path, &rel, h)?;
            }
            b'f' => {
                self.stats.data_bytes += round_up(meta.len(), BLOCK);
                self.stats.file_bytes += meta.len();
                if let Some(h) = h.as_deref_mut() {
                    hash_file(h, &path)?;
                }
            }
            b'l' => {
                let target = std::fs::read_link(&path).map_err(|source| WalkError {
                    what: "read link",
                    path: path.clone(),
                    source,
                })?;
                // ext4 keeps targets shorter than 60 bytes inside the inode.
                if target.as_os_str().len() >= 60 {
                    self.stats.data_bytes += BLOCK;
                }
                if let Some(h) = h.as_deref_mut() {
                    h.bytes(target.as_os_str().as_bytes());
                }
            }
            b'c' | b'b' => {
                if let Some(h) = h.as_deref_mut() {
                    h.u64(meta.rdev());
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// `n` rounded up to a multiple of `to`.
pub(crate) fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn digest(root: &Path) -> (String, TreeStats) {
        let mut h = Hasher::new("test");
        let stats = walk_tree(root, Some(&mut h)).unwrap();
        (h.finish(), stats)
    }

    fn sample() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc/conf.d")).unwrap();
        std::fs::write(dir.path().join("etc/hostname"), b"box\n").unwrap();
        std::fs::write(dir.path().join("etc/conf.d/a"), vec![7u8; 10_000]).unwrap();
        std::os::unix::fs::symlink("conf.d/a", dir.path().join("etc/link")).unwrap();
        dir
    }

    #[test]
    fn digest_is_deterministic_and_counts_the_tree() {
        let dir = sample();
        let (a, stats) = digest(dir.path());
        let (b, _) = digest(dir.path());
        assert_eq!(a, b);
        assert!(is_valid_digest(&a));
        // root, etc, conf.d, hostname, a, link
        assert_eq!(stats.inodes, 6);
        assert_eq!(stats.file_bytes, 10_004);
        assert_eq!(stats.data_bytes, 3 * BLOCK + BLOCK + 3 * BLOCK);
        let stats_only = walk_tree(dir.path(), None).unwrap();
        assert_eq!(stats_only, stats);
    }

    #[test]
    fn digest_follows_every_field_mkfs_copies() {
        type Change<'a> = (&'static str, Box<dyn Fn() + 'a>);
        let dir = sample();
        let (base, _) = digest(dir.path());
        let p = dir.path();
        let changes: Vec<Change> = vec![
            (
                "content",
                Box::new(|| std::fs::write(p.join("etc/hostname"), b"bpx\n").unwrap()),
            ),
            (
                "mode",
                Box::new(|| {
                    std::fs::set_permissions(
                        p.join("etc/hostname"),
                        std::fs::Permissions::from_mode(0o600),
                    )
                    .unwrap()
                }),
            ),
            (
                "link target",
                Box::new(|| {
                    std::fs::remove_file(p.join("etc/link")).unwrap();
                    std::os::unix::fs::symlink("conf.d/b", p.join("etc/link")).unwrap();
                }),
            ),
            (
                "rename",
                Box::new(|| {
                    std::fs::rename(p.join("etc/hostname"), p.join("etc/hostnamf")).unwrap()
                }),
            ),
            (
                "new empty dir",
                Box::new(|| std::fs::create_dir(p.join("srv")).unwrap()),
            ),
            (
                "hard link",
                Box::new(|| std::fs::hard_link(p.join("etc/conf.d/a"), p.join("a2")).unwrap()),
            ),
        ];
        let mut seen = vec![base];
        for (what, change) in changes {
            change();
            let (next, _) = digest(p);
            assert!(!seen.contains(&next), "{what} did not change the digest");
            seen.push(next);
        }
    }

    #[test]
    fn a_hard_link_differs_from_a_copy() {
        let linked = tempfile::tempdir().unwrap();
        std::fs::write(linked.path().join("a"), b"same").unwrap();
        std::fs::hard_link(linked.path().join("a"), linked.path().join("b")).unwrap();
        let copied = tempfile::tempdir().unwrap();
        std::fs::write(copied.path().join("a"), b"same").unwrap();
        std::fs::write(copied.path().join("b"), b"same").unwrap();
        let (l, ls) = digest(linked.path());
        let (c, cs) = digest(copied.path());
        assert_ne!(l, c);
        assert_eq!(ls.inodes + 1, cs.inodes);
    }

    #[test]
    fn digest_shape_is_checked() {
        assert!(is_valid_digest(&"a".repeat(64)));
        assert!(!is_valid_digest(&"A".repeat(64)));
        assert!(!is_valid_digest(&"a".repeat(63)));
        assert!(!is_valid_digest("../../etc/passwd"));
        assert!(!is_valid_digest(""));
    }

    #[test]
    fn domains_separate_hashes() {
        let mut a = Hasher::new("ab");
        a.bytes(b"c");
        let mut b = Hasher::new("a");
        b.bytes(b"bc");
        assert_ne!(a.finish(), b.finish());
    }
}
