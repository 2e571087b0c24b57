//! Finds the two disks the host attached: the config disk (recognised by its magic) and
//! the root disk (the other one). Device order is not relied on: virtio-mmio devices found
//! through ACPI may be enumerated in any order.

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hearth::guest::config::{
    CONFIG_DISK_HEADER, GuestConfig, ReadConfigError, config_disk_len, decode_config_disk,
};

/// Pause between looks at `/sys/block` while the disks are still appearing.
const RESCAN: Duration = Duration::from_millis(2);

/// The disks found.
pub struct Found {
    /// Block device of the root disk (`/dev/vdX`).
    pub root: PathBuf,
    /// The decoded config disk.
    pub config: GuestConfig,
}

/// Why the disks could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "by the deadline: config disk {config}, other disks {others:?}; want one config disk and one root disk"
    )]
    NotFound { config: bool, others: Vec<String> },
    #[error("several candidate root disks: {0:?}")]
    Ambiguous(Vec<String>),
    #[error("config disk {path}: {source}")]
    Config {
        path: PathBuf,
        source: ReadConfigError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Waits until the config disk and exactly one other virtio disk exist, then decodes the
/// config.
pub fn find(deadline: Instant) -> Result<Found, DiskError> {
    loop {
        let mut config: Option<GuestConfig> = None;
        let mut others = Vec::new();
        for name in virtio_disks() {
            let dev = PathBuf::from("/dev").join(&name);
            match read_config(&dev) {
                Ok(Some(c)) => config = Some(c),
                Ok(None) => others.push(name),
                // The node may not exist yet although sysfs shows the disk: retry.
                Err(DiskError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if others.len() > 1 {
            return Err(DiskError::Ambiguous(others));
        }
        match (config, others.first().cloned()) {
            (Some(config), Some(root)) => {
                return Ok(Found {
                    root: PathBuf::from("/dev").join(root),
                    config,
                });
            }
            (config, _) if Instant::now() >= deadline => {
                return Err(DiskError::NotFound {
                    config: config.is_some(),
                    others,
                });
            }
            _ => {}
        }
        std::thread::sleep(RESCAN);
    }
}

/// Names of the virtio block devices (`vda`, `vdb`, ...), sorted.
fn virtio_disks() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir("/sys/block")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("vd"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The config on `dev`, or none when `dev` is not a config disk.
fn read_config(dev: &PathBuf) -> Result<Option<GuestConfig>, DiskError> {
    let io = |source| DiskError::Io {
        path: dev.clone(),
        source,
    };
    let mut f = fs::File::open(dev).map_err(io)?;
    let mut header = [0u8; CONFIG_DISK_HEADER];
    // A disk shorter than the header is not a config disk.
    if f.read_exact(&mut header).is_err() {
        return Ok(None);
    }
    let len = match config_disk_len(&header) {
        Ok(len) => len,
        Err(ReadConfigError::NotConfigDisk) => return Ok(None),
        Err(source) => {
            return Err(DiskError::Config {
                path: dev.clone(),
                source,
            });
        }
    };
    let mut disk = header.to_vec();
    disk.resize(CONFIG_DISK_HEADER + len, 0);
    f.read_exact(&mut disk[CONFIG_DISK_HEADER..]).map_err(io)?;
    decode_config_disk(&disk)
        .map(Some)
        .map_err(|source| DiskError::Config {
            path: dev.clone(),
            source,
        })
}
