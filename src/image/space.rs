//! Free space on the file systems images are written to, checked before a pull downloads
//! anything and before a build writes a base, so that a full disk fails an image at once
//! with the figures (free, needed, kept free) instead of halfway through with `ENOSPC`,
//! and so that images never take the last of the space the machines' disks grow into.
//!
//! The figure is `statvfs`'s `f_bavail`: what an unprivileged writer may still use. The
//! daemon runs as root and could dig into the blocks reserved for root, but those are the
//! host's own margin; the configured reserve (`images.min_free_mib`) comes on top.

use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// Why an image may not take the space it needs, or the free space could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// The file system has less free space than the work needs plus the reserve.
    #[error(
        "not enough free space on {}: {what} needs {} MiB and {} MiB are kept free (images.min_free_mib), but only {} MiB are free",
        path.display(),
        mib_up(*needed_bytes),
        mib_up(*reserve_bytes),
        free_bytes / MIB
    )]
    TooLittle {
        /// A path on the file system.
        path: PathBuf,
        /// What needs the space (`downloading the layers`, `building the ext4 base`).
        what: &'static str,
        /// Bytes free (available to unprivileged writers).
        free_bytes: u64,
        /// Bytes the work needs.
        needed_bytes: u64,
        /// Bytes kept free besides.
        reserve_bytes: u64,
    },
    /// `statvfs` failed.
    #[error("reading the free space of {}: {source}", path.display())]
    Statvfs {
        /// The path asked about.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// Where the free-space figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeSpace {
    /// `statvfs` of the file system, every time it is asked.
    Statvfs,
    /// A fixed number of bytes, whatever the disk has (for tests of the refusal).
    Fixed(u64),
}

impl FreeSpace {
    /// Bytes free on the file system holding `path`.
    pub fn available(&self, path: &Path) -> Result<u64, SpaceError> {
        match *self {
            FreeSpace::Fixed(bytes) => Ok(bytes),
            FreeSpace::Statvfs => {
                let stat = rustix::fs::statvfs(path).map_err(|e| SpaceError::Statvfs {
                    path: path.to_path_buf(),
                    source: e.into(),
                })?;
                Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
            }
        }
    }
}

/// How much space images must leave free, and how free space is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpacePolicy {
    /// Bytes that must remain free after the work is done.
    pub reserve_bytes: u64,
    /// Where the free figure comes from.
    pub free: FreeSpace,
}

/// The reserve when nothing else is configured: 256 MiB, enough for the store, logs and
/// the first writes of the machines' disks while an operator notices.
pub const DEFAULT_RESERVE_BYTES: u64 = 256 * MIB;

impl Default for SpacePolicy {
    fn default() -> Self {
        SpacePolicy {
            reserve_bytes: DEFAULT_RESERVE_BYTES,
            free: FreeSpace::Statvfs,
        }
    }
}

impl SpacePolicy {
    /// Refuses `what` when the file system holding `path` has less than `needed_bytes` plus
    /// the reserve free.
    pub fn require(
        &self,
        path: &Path,
        what: &'static str,
        needed_bytes: u64,
    ) -> Result<(), SpaceError> {
        let free_bytes = self.free.available(path)?;
        check(path, what, free_bytes, needed_bytes, self.reserve_bytes)
    }
}

/// The decision alone: room for `needed_bytes` with `reserve_bytes` left over out of
/// `free_bytes`.
pub fn check(
    path: &Path,
    what: &'static str,
    free_bytes: u64,
    needed_bytes: u64,
    reserve_bytes: u64,
) -> Result<(), SpaceError> {
    if needed_bytes
        .checked_add(reserve_bytes)
        .is_some_and(|total| total <= free_bytes)
    {
        return Ok(());
    }
    Err(SpaceError::TooLittle {
        path: path.to_path_buf(),
        what,
        free_bytes,
        needed_bytes,
        reserve_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_what_is_needed_plus_the_reserve() {
        let path = Path::new("/data/images");
        check(path, "building", 300 * MIB, 44 * MIB, 256 * MIB).unwrap();
        check(path, "building", 300 * MIB, 0, 300 * MIB).unwrap();
        let err = check(
            path,
            "building the ext4 base",
            300 * MIB,
            45 * MIB,
            256 * MIB,
        )
        .unwrap_err();
        let SpaceError::TooLittle {
            free_bytes,
            needed_bytes,
            reserve_bytes,
            ..
        } = err
        else {
            panic!("expected TooLittle, got {err}");
        };
        assert_eq!(
            (free_bytes, needed_bytes, reserve_bytes),
            (300 * MIB, 45 * MIB, 256 * MIB)
        );
        let message = err.to_string();
        for part in [
            "/data/images",
            "building the ext4 base needs 45 MiB",
            "256 MiB are kept free (images.min_free_mib)",
            "only 300 MiB are free",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        // Huge declared sizes do not wrap around.
        assert!(check(path, "x", u64::MAX, u64::MAX, 1).is_err());
    }

    #[test]
    fn statvfs_reads_a_real_figure_and_fixed_overrides_it() {
        let dir = tempfile::tempdir().unwrap();
        let free = FreeSpace::Statvfs.available(dir.path()).unwrap();
        assert!(free > 0, "a writable temp dir has some space");
        assert_eq!(FreeSpace::Fixed(7).available(dir.path()).unwrap(), 7);
        let missing = dir.path().join("missing");
        assert!(matches!(
            FreeSpace::Statvfs.available(&missing),
            Err(SpaceError::Statvfs { .. })
        ));
        let policy = SpacePolicy {
            reserve_bytes: 10,
            free: FreeSpace::Fixed(100),
        };
        policy.require(dir.path(), "x", 90).unwrap();
        assert!(policy.require(dir.path(), "x", 91).is_err());
    }
}
