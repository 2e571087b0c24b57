//! Per-machine disks: a private, writable copy of a base that costs as little as the host
//! file system allows.
//!
//! On a file system with reflinks (XFS, btrfs) the copy is a `FICLONE`: instant and
//! sharing every block until the guest writes. Elsewhere (ext4) it is a sparse copy that
//! visits only the data ranges (`SEEK_DATA`/`SEEK_HOLE`) and leaves holes as holes, so a
//! mostly empty 1 GiB base costs its few MiB of metadata, not 1 GiB. The copy is written
//! under a temporary name and renamed into place, so a disk at its final name is always
//! complete, whatever crashed when.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::io::Errno;

use super::mkfs::{MkfsError, grow};

/// How a disk came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// Shares the base's blocks (`FICLONE`); writes unshare them.
    Reflink,
    /// A sparse copy of the base's data ranges.
    SparseCopy,
    /// The disk was already complete; nothing was done.
    AlreadyPresent,
}

/// Why a disk could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// The destination has no file name, so no temporary name can be made next to it.
    #[error("disk path {0} has no file name")]
    BadDest(PathBuf),
    /// Something other than a regular file is in the disk's place; it is left alone.
    #[error("disk path {0} exists and is not a regular file")]
    NotAFile(PathBuf),
    /// A file operation failed.
    #[error("disk {path}: {what}: {source}")]
    Io {
        /// The file it failed on.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// Growing the copy failed.
    #[error("growing disk: {0}")]
    Grow(#[from] MkfsError),
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> CloneError {
    let path = path.to_path_buf();
    move |source| CloneError::Io { path, what, source }
}

/// The temporary name a clone is built under, next to `dest` (same file system, so the
/// final rename is atomic). Fixed, so an undo can find what a crash left.
pub fn partial_path(dest: &Path) -> Result<PathBuf, CloneError> {
    let name = dest
        .file_name()
        .ok_or_else(|| CloneError::BadDest(dest.to_path_buf()))?;
    let mut partial = name.to_os_string();
    partial.push(".partial");
    Ok(dest.with_file_name(partial))
}

/// Makes `dest` a private copy of the base image `base`, grown to `size_bytes` when that
/// is larger than the base (the file system is resized to match; a smaller size leaves
/// the base's size). The parent directory of `dest` must exist. The disk is mode 0600.
///
/// Idempotent: an existing `dest` is complete by construction (it only ever appears by
/// rename) and is kept as is (`AlreadyPresent`); a leftover temporary from an interrupted
/// call is discarded and the copy redone. Undo: [`remove_disk`].
pub fn clone_disk(
    base: &Path,
    dest: &Path,
    size_bytes: Option<u64>,
) -> Result<CloneMethod, CloneError> {
    let partial = partial_path(dest)?;
    match std::fs::symlink_metadata(dest) {
        Ok(meta) if meta.is_file() => return Ok(CloneMethod::AlreadyPresent),
        Ok(_) => return Err(CloneError::NotAFile(dest.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(dest, "stat")(e)),
    }
    remove_if_present(&partial)?;
    let result = build(base, &partial, size_bytes);
    let method = match result {
        Ok(method) => method,
        Err(e) => {
            // Best effort: the next call or remove_disk removes it too.
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, dest).map_err(io_err(dest, "rename into place"))?;
    sync_parent(dest).map_err(io_err(dest, "sync directory of"))?;
    Ok(method)
}

fn build(base: &Path, partial: &Path, size_bytes: Option<u64>) -> Result<CloneMethod, CloneError> {
    let src = File::open(base).map_err(io_err(base, "open base"))?;
    let len = src.metadata().map_err(io_err(base, "stat base"))?.len();
    let dst = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(partial)
        .map_err(io_err(partial, "create"))?;
    let method = match rustix::fs::ioctl_ficlone(&dst, &src) {
        Ok(()) => CloneMethod::Reflink,
        // Not supported by this file system, or base and disk on different ones.
        Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY | Errno::NOSYS) => {
            sparse_copy(&src, base, &dst, partial, len)?;
            CloneMethod::SparseCopy
        }
        Err(e) => return Err(io_err(partial, "FICLONE")(e.into())),
    };
    dst.sync_all().map_err(io_err(partial, "sync"))?;
    drop(dst);
    if let Some(size) = size_bytes.filter(|&size| size > len) {
        grow(partial, size)?;
        File::open(partial)
            .and_then(|f| f.sync_all())
            .map_err(io_err(partial, "sync"))?;
    }
    Ok(method)
}

/// Copies the data ranges of `src` into the empty `dst` at the same offsets and sets the
/// length, so holes stay holes. Falls back to a block-by-block copy that skips zero
/// blocks where `SEEK_DATA` is not supported.
fn sparse_copy(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    len: u64,
) -> Result<(), CloneError> {
    let mut offset = 0u64;
    while offset < len {
        let data = match rustix::fs::seek(src, rustix::fs::SeekFrom::Data(offset)) {
            Ok(data) => data,
            // No data after `offset`: the rest is one hole.
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::OPNOTSUPP) if offset == 0 => {
                return dense_copy(src, src_path, dst, dst_path, len);
            }
            Err(e) => return Err(io_err(src_path, "SEEK_DATA")(e.into())),
        };
        let hole = rustix::fs::seek(src, rustix::fs::SeekFrom::Hole(data))
            .map_err(|e| io_err(src_path, "SEEK_HOLE")(e.into()))?
            .min(len);
        copy_range(src, src_path, dst, dst_path, data, hole - data)?;
        offset = hole;
    }
    dst.set_len(len).map_err(io_err(dst_path, "set length"))
}

/// Copies `count` bytes at `offset` in the kernel (`copy_file_range`), or through a buffer
/// where the kernel refuses.
fn copy_range(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    offset: u64,
    count: u64,
) -> Result<(), CloneError> {
    let (mut off_in, mut off_out) = (offset, offset);
    let end = offset + count;
    while off_in < end {
        let chunk = usize::try_from(end - off_in)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), chunk) {
            Ok(0) => {
                return Err(io_err(src_path, "copy")(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "base shrank while copying",
                )));
            }
            Ok(_) => {}
            Err(Errno::INTR) => {}
            Err(Errno::XDEV | Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS) => {
                return buffered_range(src, src_path, dst, dst_path, off_in, end - off_in);
            }
            Err(e) => return Err(io_err(dst_path, "copy_file_range")(e.into())),
        }
    }
    Ok(())
}

/// Buffered copy of one range, skipping all-zero blocks so they stay holes in `dst`.
fn buffered_range(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    offset: u64,
    count: u64,
) -> Result<(), CloneError> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut at = offset;
    let end = offset + count;
    while at < end {
        let want = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
        let n = src
            .read_at(&mut buf[..want], at)
            .map_err(io_err(src_path, "read"))?;
        if n == 0 {
            return Err(io_err(src_path, "read")(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        for (i, block) in buf[..n].chunks(4096).enumerate() {
            if block.iter().any(|&b| b != 0) {
                dst.write_all_at(block, at + (i * 4096) as u64)
                    .map_err(io_err(dst_path, "write"))?;
            }
        }
        at += n as u64;
    }
    Ok(())
}

/// Whole-file copy for file systems without `SEEK_DATA`; zero blocks are skipped.
fn dense_copy(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    len: u64,
) -> Result<(), CloneError> {
    buffered_range(src, src_path, dst, dst_path, 0, len)?;
    dst.set_len(len).map_err(io_err(dst_path, "set length"))
}

/// Removes a machine disk and any temporary an interrupted [`clone_disk`] left.
///
/// Idempotent: a missing disk or temporary is success. Undo of [`clone_disk`], valid
/// whether or not that call finished.
pub fn remove_disk(dest: &Path) -> Result<(), CloneError> {
    remove_if_present(&partial_path(dest)?)?;
    remove_if_present(dest)
}

/// Removes the name `path`, whatever it is (a directory a VMM put in its machine
/// directory included; std's `remove_dir_all` follows no link). A missing name is fine.
fn remove_if_present(path: &Path) -> Result<(), CloneError> {
    let removed = match std::fs::remove_file(path) {
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => std::fs::remove_dir_all(path),
        other => other,
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "remove")(e)),
    }
}

/// Makes a rename in `path`'s directory durable.
pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
}

/// Compares two files byte for byte (for tests and checks).
pub fn same_content(a: &Path, b: &Path) -> std::io::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    /// A 64 MiB file with data at 0, 8 MiB and the last block, holes elsewhere.
    fn sparse_file(path: &Path) {
        let mut f = File::create(path).unwrap();
        f.write_all(&[1u8; 8192]).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&[2u8; 4096]).unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[3u8; 4096], (64 << 20) - 4096).unwrap();
    }

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (base, dest) = (dir.path().join("base"), dir.path().join("disk.ext4"));
        sparse_file(&base);
        let method = clone_disk(&base, &dest, None).unwrap();
        // The test directory may be on a reflink file system; both are correct.
        assert!(matches!(
            method,
            CloneMethod::SparseCopy | CloneMethod::Reflink
        ));
        assert!(same_content(&base, &dest).unwrap());
        let allocated = std::fs::metadata(&dest).unwrap().blocks() * 512;
        assert!(allocated <= 1 << 20, "{allocated} bytes allocated");
        assert_eq!(std::fs::metadata(&dest).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            clone_disk(&base, &dest, None).unwrap(),
            CloneMethod::AlreadyPresent
        );
    }

    #[test]
    fn buffered_copy_skips_zero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        sparse_file(&a);
        let src = File::open(&a).unwrap();
        let dst = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&b)
            .unwrap();
        dense_copy(&src, &a, &dst, &b, 64 << 20).unwrap();
        assert!(same_content(&a, &b).unwrap());
        assert!(std::fs::metadata(&b).unwrap().blocks() * 512 <= 1 << 20);
    }

    #[test]
    fn a_leftover_partial_is_replaced_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (base, dest) = (dir.path().join("base"), dir.path().join("disk"));
        sparse_file(&base);
        let partial = partial_path(&dest).unwrap();
        std::fs::write(&partial, b"half a disk").unwrap();
        clone_disk(&base, &dest, None).unwrap();
        assert!(!partial.exists());
        assert!(same_content(&base, &dest).unwrap());
        std::fs::write(&partial, b"another half").unwrap();
        remove_disk(&dest).unwrap();
        assert!(!partial.exists() && !dest.exists());
        remove_disk(&dest).unwrap();
    }

    #[test]
    fn a_missing_base_is_named_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("disk");
        let err = clone_disk(&dir.path().join("nope"), &dest, None).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(matches!(
            partial_path(Path::new("/")),
            Err(CloneError::BadDest(_))
        ));
    }
}
