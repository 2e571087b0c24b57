//! What the guest init needs to know at boot, and the small disk that carries it.
//!
//! Why a disk: it is the one channel every VMM offers before any guest code runs, needs
//! no network and no agent connection, and survives reboots of the guest. The disk is a
//! raw file attached as a second virtio-blk device:
//!
//! ```text
//! offset 0   8 bytes  magic "HEARTHC1"
//! offset 8   4 bytes  length of the JSON, little endian
//! offset 12  length   GuestConfig as JSON
//! ...        zeros up to a multiple of 4096 bytes (whole sectors for any block size)
//! ```
//! The init recognises the config disk by its magic, not by device order: virtio-mmio
//! devices found through ACPI may be enumerated in any order.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// First bytes of a config disk.
pub const CONFIG_DISK_MAGIC: [u8; 8] = *b"HEARTHC1";
/// Size of the header (magic + length).
pub const CONFIG_DISK_HEADER: usize = 12;
/// The disk's size is a multiple of this.
const DISK_ALIGN: usize = 4096;
/// Largest JSON accepted; a bigger one is a bug, not a config.
pub const MAX_CONFIG_JSON: usize = 1 << 20;

/// Everything the guest init needs from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// The machine's id (reported back in logs).
    pub machine_id: String,
    /// The guest's hostname.
    pub hostname: String,
    /// Static network configuration of the guest's single interface; none leaves the
    /// network unconfigured (only loopback).
    pub network: Option<GuestNetwork>,
    /// The workload: program and arguments. The program is looked up in `PATH` (from
    /// `env`, or a default) when it has no `/`.
    pub command: Vec<String>,
    /// The workload's environment.
    pub env: Vec<(String, String)>,
    /// The workload's working directory; none means `/`.
    pub workdir: Option<String>,
    /// TCP ports the workload serves: the guest reports Ready only once something listens
    /// on each of them (IPv4 or IPv6). Empty: Ready as soon as the workload is started.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Who the workload runs as, in the image config's `User` form: `user`, `uid`,
    /// `user:group`, `uid:gid` (names looked up in the root's /etc/passwd and
    /// /etc/group); none: root.
    #[serde(default)]
    pub user: Option<String>,
    /// A prepared guest: boot, configure the network, report
    /// [`Idle`](crate::guest::protocol::GuestState::Idle) and wait for a
    /// [`Claim`](crate::guest::protocol::Claim) carrying the workload. The workload fields
    /// here (`command`, `env`, `workdir`, `user`, `ports`) are then ignored (the host
    /// leaves them empty) and `hostname` is a placeholder until the claim.
    #[serde(default)]
    pub prepared: bool,
    /// The root is an overlay: the read-only disk (the image's shared base) below the
    /// writable one (the machine's own layer). False: the one writable disk is the root.
    #[serde(default)]
    pub overlay_root: bool,
}

/// Static IPv4 settings of the guest interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Prefix length of the guest's subnet.
    pub prefix_len: u8,
    /// The default gateway (the host end of the tap).
    pub gateway: Ipv4Addr,
    /// Where names are resolved (`/etc/resolv.conf`); none leaves the root's own file.
    #[serde(default)]
    pub resolver: Option<GuestResolver>,
}

/// The guest's resolver: the host's embedded DNS server, and the domain short names are
/// tried in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestResolver {
    /// The server's address (port 53).
    pub nameserver: Ipv4Addr,
    /// The search domain: `peer` is asked as `peer.<search>`.
    pub search: String,
}

/// Why a config disk could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteConfigError {
    /// The config does not serialise (cannot happen with these types, kept honest).
    #[error("config for machine {machine_id}: cannot encode: {source}")]
    Encode {
        /// The machine.
        machine_id: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// The encoded config is larger than [`MAX_CONFIG_JSON`].
    #[error("config for machine {machine_id} is {len} bytes of JSON, more than {MAX_CONFIG_JSON}")]
    TooLarge {
        /// The machine.
        machine_id: String,
        /// Its size.
        len: usize,
    },
    /// The file could not be written.
    #[error("config disk {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Why bytes are not a config disk.
#[derive(Debug, thiserror::Error)]
pub enum ReadConfigError {
    /// The magic is absent: this is some other disk.
    #[error("not a config disk (no magic)")]
    NotConfigDisk,
    /// The header's length is impossible.
    #[error("config disk length {len} is larger than the disk or the limit")]
    BadLength {
        /// The length in the header.
        len: usize,
    },
    /// The JSON does not parse as a [`GuestConfig`].
    #[error("config disk JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes `config` into the disk format (header, JSON, zero padding).
pub fn encode_config_disk(config: &GuestConfig) -> Result<Vec<u8>, WriteConfigError> {
    let json = serde_json::to_vec(config).map_err(|source| WriteConfigError::Encode {
        machine_id: config.machine_id.clone(),
        source,
    })?;
    if json.len() > MAX_CONFIG_JSON {
        return Err(WriteConfigError::TooLarge {
            machine_id: config.machine_id.clone(),
            len: json.len(),
        });
    }
    let used = CONFIG_DISK_HEADER + json.len();
    let mut disk = Vec::with_capacity(used.div_ceil(DISK_ALIGN) * DISK_ALIGN);
    disk.extend_from_slice(&CONFIG_DISK_MAGIC);
    // The length fits: it is at most MAX_CONFIG_JSON.
    disk.extend_from_slice(&(json.len() as u32).to_le_bytes());
    disk.extend_from_slice(&json);
    disk.resize(used.div_ceil(DISK_ALIGN) * DISK_ALIGN, 0);
    Ok(disk)
}

/// Reads the JSON length from a disk's first bytes, or says it is not a config disk.
/// Lets a reader fetch the header first and then exactly the bytes it needs.
pub fn config_disk_len(header: &[u8]) -> Result<usize, ReadConfigError> {
    if header.len() < CONFIG_DISK_HEADER || header[..8] != CONFIG_DISK_MAGIC {
        return Err(ReadConfigError::NotConfigDisk);
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&header[8..12]);
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CONFIG_JSON {
        return Err(ReadConfigError::BadLength { len });
    }
    Ok(len)
}

/// Decodes a config disk's contents (at least header + JSON).
pub fn decode_config_disk(disk: &[u8]) -> Result<GuestConfig, ReadConfigError> {
    let len = config_disk_len(disk)?;
    let json = disk
        .get(CONFIG_DISK_HEADER..CONFIG_DISK_HEADER + len)
        .ok_or(ReadConfigError::BadLength { len })?;
    Ok(serde_json::from_slice(json)?)
}

/// Writes the config disk for `config` at `path`.
///
/// Idempotent: the disk is written under a temporary name, synced and renamed over
/// `path`, so a rerun replaces it whole and a crash leaves the old file or the new one.
/// The directory is its VMM's: nothing there is followed (see [`crate::vmmdir`]), a
/// planted temporary name is removed first. Undo: remove `path` (and a stray `path.tmp`).
pub fn write_config_disk(path: &Path, config: &GuestConfig) -> Result<(), WriteConfigError> {
    let disk = encode_config_disk(config)?;
    crate::vmmdir::VmmDir::parent_of(path)
        .and_then(|(dir, name)| dir.replace_file(name, &disk))
        .map_err(|source| WriteConfigError::Io {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn sample() -> GuestConfig {
        GuestConfig {
            machine_id: "m-1".into(),
            hostname: "web-1".into(),
            network: Some(GuestNetwork {
                address: Ipv4Addr::new(10, 213, 0, 6),
                prefix_len: 30,
                gateway: Ipv4Addr::new(10, 213, 0, 5),
                resolver: Some(GuestResolver {
                    nameserver: Ipv4Addr::new(10, 213, 255, 249),
                    search: "hearth.internal".into(),
                }),
            }),
            command: vec!["/bin/sh".into(), "-c".into(), "exit 7".into()],
            env: vec![("A".into(), "b c".into())],
            workdir: Some("/srv".into()),
            ports: vec![80],
            user: None,
            prepared: false,
            overlay_root: false,
        }
    }

    #[test]
    fn round_trips_and_is_sector_aligned() {
        let disk = encode_config_disk(&sample()).unwrap();
        assert_eq!(disk.len() % DISK_ALIGN, 0);
        assert_eq!(decode_config_disk(&disk).unwrap(), sample());
    }

    #[test]
    fn prepared_round_trips_and_defaults_to_false() {
        let mut prepared = sample();
        prepared.prepared = true;
        let disk = encode_config_disk(&prepared).unwrap();
        assert!(decode_config_disk(&disk).unwrap().prepared);
        // A config written before the field existed is a normal boot.
        let mut json = serde_json::to_value(sample()).unwrap();
        json.as_object_mut().unwrap().remove("prepared");
        let old: GuestConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old, sample());
    }

    #[test]
    fn other_disks_are_not_config_disks() {
        let ext4 = vec![0u8; 4096];
        assert!(matches!(
            decode_config_disk(&ext4),
            Err(ReadConfigError::NotConfigDisk)
        ));
        let mut bad = encode_config_disk(&sample()).unwrap();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_config_disk(&bad),
            Err(ReadConfigError::BadLength { .. })
        ));
    }

    #[test]
    fn write_is_idempotent_and_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.img");
        write_config_disk(&path, &sample()).unwrap();
        write_config_disk(&path, &sample()).unwrap();
        let mut other = sample();
        other.hostname = "web-2".into();
        write_config_disk(&path, &other).unwrap();
        assert_eq!(
            decode_config_disk(&fs::read(&path).unwrap()).unwrap(),
            other
        );
        assert!(!tmp.path().join("config.img.tmp").exists());
        // A link planted at the temporary name is removed, not written through.
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("config.img.tmp")).unwrap();
        write_config_disk(&path, &sample()).unwrap();
        assert_eq!(fs::read(outside.path()).unwrap(), b"");
        assert_eq!(
            decode_config_disk(&fs::read(&path).unwrap()).unwrap(),
            sample()
        );
    }
}
