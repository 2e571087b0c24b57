//! Image bases: an ext4 file per image content, built once with `mkfs.ext4 -d` and kept
//! under `<root>/bases/<digest>.ext4`. The digest covers the content and the build
//! settings, so a changed image or setting gives a new base and never a stale one.
//!
//! Crash safety: a base is built under `<root>/tmp` and renamed into place, so a base file
//! that exists is complete; leftovers in `tmp` are removed at open.

use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::demo;
use super::reference::ImageRef;

/// Bumped when the way bases are built changes, so old bases are not reused.
const BUILDER_VERSION: &str = "hearth-base-1";

/// A built base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// Content digest (hex sha256).
    pub digest: String,
    /// The ext4 file.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
}

/// How bases are built.
#[derive(Debug, Clone)]
pub struct BaseSettings {
    /// Free space beyond the content, in MiB.
    pub headroom_mib: u64,
    /// Smallest base, in MiB.
    pub min_size_mib: u64,
    /// The static busybox the demo image is made from.
    pub busybox: PathBuf,
}

impl Default for BaseSettings {
    fn default() -> Self {
        BaseSettings {
            headroom_mib: 64,
            min_size_mib: 16,
            busybox: PathBuf::from("/bin/busybox"),
        }
    }
}

/// A base could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// File system work failed.
    #[error("image {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: io::Error,
    },
    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 for image {image}: {stderr}")]
    Mkfs {
        /// The image.
        image: String,
        /// What mkfs said.
        stderr: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BaseError {
    let what = what.into();
    move |source| BaseError::Io { what, source }
}

/// The base cache.
pub struct BaseStore {
    root: PathBuf,
    settings: BaseSettings,
}

impl BaseStore {
    /// Opens the cache at `root`, creating it, and clears partial builds of a crash.
    pub fn open(root: &Path, settings: BaseSettings) -> Result<BaseStore, BaseError> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(format!("clear {}", tmp.display())))?;
        }
        for dir in [root.join("bases"), tmp] {
            std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        }
        Ok(BaseStore {
            root: root.to_path_buf(),
            settings,
        })
    }

    fn digest(&self, image: &ImageRef) -> Result<String, BaseError> {
        let mut hasher = Sha256::new();
        hasher.update(BUILDER_VERSION);
        hasher.update(self.settings.headroom_mib.to_le_bytes());
        hasher.update(self.settings.min_size_mib.to_le_bytes());
        match image {
            ImageRef::Demo => {
                hasher.update(b"demo");
                hasher.update(demo::PAGE);
                hash_file(&mut hasher, &self.settings.busybox)?;
            }
            ImageRef::Tarball(path) => {
                hasher.update(b"tar");
                hash_file(&mut hasher, path)?;
            }
            ImageRef::Directory(path) => {
                hasher.update(b"dir");
                hash_tree(&mut hasher, path, Path::new(""))?;
            }
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// The base of `image`, building it when missing. Idempotent: a built base is returned
    /// as is (a cache hit costs one content hash). Blocking.
    pub fn ensure_base(&self, image: &ImageRef) -> Result<Base, BaseError> {
        let digest = self.digest(image)?;
        let path = self.root.join("bases").join(format!("{digest}.ext4"));
        if let Ok(meta) = std::fs::metadata(&path) {
            return Ok(Base {
                digest,
                path,
                size_bytes: meta.len(),
            });
        }
        let stage = self
            .root
            .join("tmp")
            .join(format!("{digest}.{}.d", std::process::id()));
        let result = self.build(image, &stage, &path);
        let _ = std::fs::remove_dir_all(&stage);
        let size_bytes = result?;
        Ok(Base {
            digest,
            path,
            size_bytes,
        })
    }

    fn build(&self, image: &ImageRef, stage: &Path, dest: &Path) -> Result<u64, BaseError> {
        let source = match image {
            ImageRef::Directory(dir) => dir.clone(),
            ImageRef::Demo => {
                demo::build(stage, &self.settings.busybox).map_err(io_err("demo build"))?;
                stage.to_path_buf()
            }
            ImageRef::Tarball(tar) => {
                std::fs::create_dir_all(stage)
                    .map_err(io_err(format!("create {}", stage.display())))?;
                let file =
                    std::fs::File::open(tar).map_err(io_err(format!("open {}", tar.display())))?;
                let mut archive = tar::Archive::new(file);
                archive.set_preserve_permissions(true);
                // `unpack` refuses entries that would land outside `stage`.
                archive
                    .unpack(stage)
                    .map_err(io_err(format!("unpack {}", tar.display())))?;
                stage.to_path_buf()
            }
        };
        let content = tree_bytes(&source).map_err(io_err(format!("size {}", source.display())))?;
        let mib =
            (content / (1 << 20) + self.settings.headroom_mib).max(self.settings.min_size_mib);
        let temp = self.root.join("tmp").join(format!(
            "{}.{}.ext4",
            dest.file_stem().and_then(|s| s.to_str()).unwrap_or("base"),
            std::process::id()
        ));
        let output = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                "hearth-root",
                "-E",
                "root_owner=0:0",
                "-d",
            ])
            .arg(&source)
            .arg(&temp)
            .arg(format!("{mib}M"))
            .output()
            .map_err(io_err("run mkfs.ext4 (package e2fsprogs)"))?;
        if !output.status.success() {
            let _ = std::fs::remove_file(&temp);
            return Err(BaseError::Mkfs {
                image: image.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o644))
            .map_err(io_err(format!("chmod {}", temp.display())))?;
        std::fs::rename(&temp, dest).map_err(io_err(format!("rename into {}", dest.display())))?;
        Ok(mib << 20)
    }

    /// Every built base.
    pub fn list(&self) -> Result<Vec<Base>, BaseError> {
        let dir = self.root.join("bases");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(format!("list {}", dir.display())))? {
            let entry = entry.map_err(io_err("list bases"))?;
            let path = entry.path();
            let Some(digest) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            let size_bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(Base {
                digest,
                path,
                size_bytes,
            });
        }
        Ok(out)
    }
}

fn hash_file(hasher: &mut Sha256, path: &Path) -> Result<(), BaseError> {
    let mut file = std::fs::File::open(path).map_err(io_err(format!("read {}", path.display())))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(io_err(format!("read {}", path.display())))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

/// Hashes a tree deterministically: sorted names, type, mode, owner, link target, bytes.
fn hash_tree(hasher: &mut Sha256, root: &Path, rel: &Path) -> Result<(), BaseError> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(io_err(format!("list {}", dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    entries.sort();
    for name in entries {
        let rel_path = rel.join(&name);
        let path = root.join(&rel_path);
        let meta =
            std::fs::symlink_metadata(&path).map_err(io_err(format!("stat {}", path.display())))?;
        hasher.update(rel_path.as_os_str().as_encoded_bytes());
        hasher.update(meta.mode().to_le_bytes());
        hasher.update(meta.uid().to_le_bytes());
        hasher.update(meta.gid().to_le_bytes());
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)
                .map_err(io_err(format!("readlink {}", path.display())))?;
            hasher.update(target.as_os_str().as_encoded_bytes());
        } else if meta.is_dir() {
            hash_tree(hasher, root, &rel_path)?;
        } else if meta.is_file() {
            hash_file(hasher, &path)?;
        }
    }
    Ok(())
}

fn tree_bytes(path: &Path) -> io::Result<u64> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 4096;
    for entry in std::fs::read_dir(path)? {
        total += tree_bytes(&entry?.path())?;
    }
    Ok(total)
}
