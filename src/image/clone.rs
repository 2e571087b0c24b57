//! Each machine's own disk: a copy-on-write clone of the base where the file system can
//! (FICLONE on XFS with reflink, btrfs), else a sparse copy that never writes the holes.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// How a disk was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// Shared extents, O(1) in the size.
    Reflink,
    /// Data regions copied, holes kept.
    SparseCopy,
    /// The disk was already there.
    Existing,
}

/// A disk could not be made or removed.
#[derive(Debug, thiserror::Error)]
#[error("disk {path}: {source}")]
pub struct CloneError {
    path: PathBuf,
    source: io::Error,
}

fn at(path: &Path) -> impl Fn(io::Error) -> CloneError + '_ {
    move |source| CloneError {
        path: path.to_path_buf(),
        source,
    }
}

fn temp_of(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

/// Clones `base` to `dest`. Idempotent: an existing `dest` is kept (it only ever appears
/// by rename, so it is complete); a partial copy from a crash is replaced. Undo:
/// [`remove_disk`].
pub fn clone_disk(
    base: &Path,
    dest: &Path,
    size_bytes: Option<u64>,
) -> Result<CloneMethod, CloneError> {
    if dest.exists() {
        return Ok(CloneMethod::Existing);
    }
    let temp = temp_of(dest);
    let source = File::open(base).map_err(at(base))?;
    let mut out = File::create(&temp).map_err(at(&temp))?;
    let method = match rustix::fs::ioctl_ficlone(&out, &source) {
        Ok(()) => CloneMethod::Reflink,
        Err(_) => {
            sparse_copy(&source, &mut out).map_err(at(&temp))?;
            CloneMethod::SparseCopy
        }
    };
    if let Some(size) = size_bytes {
        let current = out.metadata().map_err(at(&temp))?.len();
        if size > current {
            out.set_len(size).map_err(at(&temp))?;
        }
    }
    out.sync_all().map_err(at(&temp))?;
    std::fs::rename(&temp, dest).map_err(at(dest))?;
    Ok(method)
}

/// Copies the data regions of `source` into `out`, leaving holes as holes.
fn sparse_copy(source: &File, out: &mut File) -> io::Result<()> {
    let len = source.metadata()?.len();
    out.set_len(len)?;
    let mut reader = source.try_clone()?;
    let mut offset = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while offset < len {
        let data = match rustix::fs::seek(source, rustix::fs::SeekFrom::Data(offset)) {
            Ok(pos) => pos,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole =
            rustix::fs::seek(source, rustix::fs::SeekFrom::Hole(data)).map_err(io::Error::from)?;
        reader.seek(SeekFrom::Start(data))?;
        out.seek(SeekFrom::Start(data))?;
        let mut left = hole - data;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = reader.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        offset = hole;
    }
    Ok(())
}

/// Removes a machine disk and any partial copy. Idempotent: missing files are fine.
pub fn remove_disk(dest: &Path) -> Result<(), CloneError> {
    for path in [dest.to_path_buf(), temp_of(dest)] {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(at(&path)(e)),
            _ => {}
        }
    }
    Ok(())
}
