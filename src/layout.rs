//! Where the daemon keeps its files: the one place that spells the data and cache
//! directories' layout. Everything else asks a [`Layout`] for a path.
//!
//! ```text
//! <data_dir>/hearth.redb            the store
//! <data_dir>/machines/<id>/         a machine's directory (its VMM's: disk, sockets, logs)
//! <data_dir>/images/                the ext4 bases
//! <data_dir>/images/uppers/         the overlay disks' writable layer templates and stock
//! <cache_dir>/blobs/                pulled registry blobs
//! <cache_dir>/kit/                  the guest kernel and initramfs
//! <cache_dir>/vmm/                  the VMM drivers' caches (the accelerator probe)
//! ```

use std::path::{Path, PathBuf};

/// The daemon's directories and what lives where in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    data_dir: PathBuf,
    cache_dir: PathBuf,
}

impl Layout {
    /// The layout under `data_dir` (durable state) and `cache_dir` (what can be fetched
    /// or built again).
    pub fn new(data_dir: impl Into<PathBuf>, cache_dir: impl Into<PathBuf>) -> Layout {
        Layout {
            data_dir: data_dir.into(),
            cache_dir: cache_dir.into(),
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The redb file.
    pub fn store(&self) -> PathBuf {
        self.data_dir.join("hearth.redb")
    }

    /// The directory of every machine's directory.
    pub fn machines(&self) -> PathBuf {
        self.data_dir.join("machines")
    }

    /// Where machine `id` keeps its disk, config, sockets and logs.
    pub fn machine_dir(&self, id: &str) -> PathBuf {
        self.machines().join(id)
    }

    /// The image bases.
    pub fn images(&self) -> PathBuf {
        self.data_dir.join("images")
    }

    /// The overlay disks' writable layer templates and their stock.
    pub fn uppers(&self) -> PathBuf {
        self.images().join("uppers")
    }

    /// Pulled registry blobs.
    pub fn blobs(&self) -> PathBuf {
        self.cache_dir.join("blobs")
    }

    /// The guest kit's cache.
    pub fn kit(&self) -> PathBuf {
        self.cache_dir.join("kit")
    }

    /// The VMM drivers' cache.
    pub fn vmm_cache(&self) -> PathBuf {
        self.cache_dir.join("vmm")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_under_its_directory() {
        let layout = Layout::new("/d", "/c");
        assert_eq!(
            layout.machine_dir("0123456789"),
            Path::new("/d/machines/0123456789")
        );
        assert_eq!(layout.store(), Path::new("/d/hearth.redb"));
        assert_eq!(layout.uppers(), Path::new("/d/images/uppers"));
        assert_eq!(layout.blobs(), Path::new("/c/blobs"));
        assert_eq!(layout.kit(), Path::new("/c/kit"));
        assert_eq!(layout.vmm_cache(), Path::new("/c/vmm"));
    }
}
