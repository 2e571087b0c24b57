//! The blob directory: `<blob_dir>/sha256/<hex>`, one file per verified blob, the same
//! shape as an OCI layout's `blobs/`. A file under its final name has been verified;
//! downloads go to a temporary name next to it and are renamed only once they match.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::image::is_valid_digest;

/// Counter making temporary names unique among concurrent downloads in one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A digest that cannot name a blob file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("blob digest `{0}` is not sha256:<64 lowercase hex digits>")]
pub struct BlobPathError(pub String);

/// The hex part of a `sha256:<hex>` digest.
pub(crate) fn sha256_hex(digest: &str) -> Result<&str, BlobPathError> {
    digest
        .strip_prefix("sha256:")
        .filter(|hex| is_valid_digest(hex))
        .ok_or_else(|| BlobPathError(digest.to_string()))
}

/// Where the blob with `digest` lives under `blob_dir` (`blob_dir/sha256/<hex>`). Only
/// sha256 digests are accepted, so a digest can never name a path outside the directory.
pub fn blob_path(blob_dir: &Path, digest: &str) -> Result<PathBuf, BlobPathError> {
    Ok(blob_dir.join("sha256").join(sha256_hex(digest)?))
}

/// A fresh temporary name in the same directory as `dest`, so the final rename is atomic.
pub(crate) fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    dest.with_file_name(format!(".{name}.partial-{}-{seq}", std::process::id()))
}

/// The sha256 (hex) and length of a file's content. Blocking.
pub(crate) fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), len))
}

/// The content of the blob `digest` in `blob_dir` if it is there, at most `max` bytes,
/// and hashes to its digest; `None` otherwise. Blocking.
pub fn read_verified(blob_dir: &Path, digest: &str, max: u64) -> Option<Vec<u8>> {
    let path = blob_path(blob_dir, digest).ok()?;
    let hex = sha256_hex(digest).ok()?;
    if std::fs::metadata(&path).ok()?.len() > max {
        return None;
    }
    let bytes = std::fs::read(&path).ok()?;
    (hex::encode(Sha256::digest(&bytes)) == hex).then_some(bytes)
}

/// What was found at a blob's final path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Present {
    /// Nothing there.
    Missing,
    /// The file has the expected size and digest.
    Verified,
    /// The file is there but its content is not the blob (size or digest differ).
    Corrupt,
}

/// Checks the file at `path` against the expected size and sha256 hex. The size is
/// compared first so a truncated file costs no hashing. Blocking.
pub(crate) fn check_present(path: &Path, hex: &str, size: u64) -> io::Result<Present> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Present::Missing),
        Err(e) => return Err(e),
    };
    if !meta.is_file() || meta.len() != size {
        return Ok(Present::Corrupt);
    }
    let (actual, _) = sha256_file(path)?;
    Ok(if actual == hex {
        Present::Verified
    } else {
        Present::Corrupt
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn paths_come_only_from_sha256_digests() {
        let dir = Path::new("/b");
        assert_eq!(
            blob_path(dir, &format!("sha256:{EMPTY}")).unwrap(),
            Path::new("/b/sha256").join(EMPTY)
        );
        for bad in ["sha256:../../etc", "sha512:abc", EMPTY, "sha256:", ""] {
            assert_eq!(blob_path(dir, bad), Err(BlobPathError(bad.to_string())));
        }
        let t = temp_path(&dir.join("sha256").join(EMPTY));
        assert_eq!(t.parent(), Some(Path::new("/b/sha256")));
        assert_ne!(t, temp_path(&dir.join("sha256").join(EMPTY)));
    }

    #[test]
    fn a_blob_is_read_only_when_it_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let digest = format!("sha256:{EMPTY}");
        assert_eq!(read_verified(dir.path(), &digest, 10), None);
        std::fs::create_dir_all(dir.path().join("sha256")).unwrap();
        let path = blob_path(dir.path(), &digest).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert_eq!(read_verified(dir.path(), &digest, 10), Some(vec![]));
        std::fs::write(&path, b"not empty").unwrap();
        assert_eq!(read_verified(dir.path(), &digest, 100), None);
        assert_eq!(read_verified(dir.path(), "sha256:../x", 100), None);
    }

    #[test]
    fn presence_checks_size_then_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        assert_eq!(check_present(&path, EMPTY, 0).unwrap(), Present::Missing);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(check_present(&path, EMPTY, 0).unwrap(), Present::Verified);
        assert_eq!(check_present(&path, EMPTY, 1).unwrap(), Present::Corrupt);
        std::fs::write(&path, b"x").unwrap();
        assert_eq!(check_present(&path, EMPTY, 1).unwrap(), Present::Corrupt);
        assert_eq!(sha256_file(&path).unwrap().1, 1);
    }
}
