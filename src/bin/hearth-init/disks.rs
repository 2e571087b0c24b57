//! Finds the disks the host attached: the config disk (recognised by its magic), and the
//! root: the one other disk, or for an overlay root (the config says which) the image's
//! shared base (the read-only one) and the machine's writable layer. Device order is not
//! relied on: virtio-mmio devices found through ACPI may be enumerated in any order.

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
    /// What the root is made of.
    pub root: Root,
    /// The decoded config disk.
    pub config: GuestConfig,
}

/// The root's block devices (`/dev/vdX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// One writable disk is the whole root.
    Single(PathBuf),
    /// The read-only base below the writable layer.
    Overlay {
        /// The image's base (read-only).
        base: PathBuf,
        /// The machine's own layer.
        upper: PathBuf,
    },
}

/// Why the disks could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "by the deadline: config disk {config}, other disks {others:?}; want one config disk and the root's disks"
    )]
    NotFound { config: bool, others: Vec<String> },
    #[error("several candidate root disks: {0:?}")]
    Ambiguous(Vec<String>),
    #[error(
        "an overlay root needs one read-only and one writable disk; read-only: {read_only:?}, writable: {writable:?}"
    )]
    OverlayDisks {
        read_only: Vec<String>,
        writable: Vec<String>,
    },
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
        let wanted = match &config {
            Some(c) if c.overlay_root => 2,
            _ => 1,
        };
        // Until the config disk is readable, two other disks may be an overlay root's.
        if others.len() > 2 || (config.is_some() && others.len() > wanted) {
            return Err(DiskError::Ambiguous(others));
        }
        match config {
            Some(config) if others.len() == wanted => {
                let root = root_of(&config, &others, read_only)?;
                return Ok(Found { root, config });
            }
            config if Instant::now() >= deadline => {
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

/// The root made of the disks other than the config disk (as many as the config wants).
fn root_of(
    config: &GuestConfig,
    others: &[String],
    read_only: impl Fn(&str) -> bool,
) -> Result<Root, DiskError> {
    let dev = |name: &String| PathBuf::from("/dev").join(name);
    if !config.overlay_root {
        return Ok(Root::Single(dev(&others[0])));
    }
    let (ro, rw): (Vec<String>, Vec<String>) =
        others.iter().cloned().partition(|name| read_only(name));
    match (ro.as_slice(), rw.as_slice()) {
        ([base], [upper]) => Ok(Root::Overlay {
            base: dev(base),
            upper: dev(upper),
        }),
        _ => Err(DiskError::OverlayDisks {
            read_only: ro,
            writable: rw,
        }),
    }
}

/// Whether the kernel marks block device `name` read-only (the device said so).
fn read_only(name: &str) -> bool {
    fs::read_to_string(format!("/sys/block/{name}/ro")).is_ok_and(|v| v.trim() == "1")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(overlay_root: bool) -> GuestConfig {
        GuestConfig {
            machine_id: "m".into(),
            hostname: "m".into(),
            network: None,
            command: vec!["/bin/true".into()],
            env: Vec::new(),
            workdir: None,
            ports: Vec::new(),
            user: None,
            prepared: false,
            overlay_root,
        }
    }

    #[test]
    fn the_read_only_disk_is_the_base_whatever_the_order() {
        let others = vec!["vda".to_string(), "vdc".to_string()];
        for base in ["vda", "vdc"] {
            let root = root_of(&config(true), &others, |n| n == base).expect("root");
            let upper = if base == "vda" { "vdc" } else { "vda" };
            assert_eq!(
                root,
                Root::Overlay {
                    base: PathBuf::from("/dev").join(base),
                    upper: PathBuf::from("/dev").join(upper),
                }
            );
        }
        // Two writable disks, or two read-only ones: not an overlay root.
        for ro in [false, true] {
            let err = root_of(&config(true), &others, |_| ro).expect_err("refused");
            assert!(matches!(err, DiskError::OverlayDisks { .. }), "{err}");
        }
        assert_eq!(
            root_of(&config(false), &others[..1], |_| false).expect("single"),
            Root::Single(PathBuf::from("/dev/vda"))
        );
    }
}
