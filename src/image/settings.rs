//! The image cache's settings (`[images]` in the daemon's config), their defaults, and
//! the settings of the pulls, builds and collections they describe.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Image settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Free space added to a base image beyond its content, in MiB.
    pub headroom_mib: u64,
    /// The static busybox the built-in `demo` image is made from (package busybox-static).
    pub busybox: PathBuf,
    /// Registries (`host:port`) spoken to over plain HTTP; every other one over HTTPS.
    pub insecure_registries: Vec<String>,
    /// Credentials for registries that need basic auth.
    pub registry_auth: Vec<RegistryAuth>,
    /// Largest compressed layer a pull accepts, in MiB.
    pub max_layer_mib: u64,
    /// Most bytes all layers of one image may unpack to, in MiB (a decompression bomb
    /// stops there). A pull whose manifest declares more compressed bytes than this is
    /// refused before any download: a compressed layer does not unpack to less.
    pub max_image_mib: u64,
    /// Most layers one image may have; checked on the manifest before any download.
    pub max_layers: u64,
    /// Most entries (files, directories, links, whiteouts) all layers of one image, or a
    /// tar archive, may hold. Unpacking keeps each entry's path in memory (at most 4 KiB)
    /// and mkfs makes an inode for each, so this bounds both; a million is several times
    /// the largest distribution images.
    pub max_entries: u64,
    /// Free space (MiB) pulls and builds must leave on the file systems of the blob
    /// cache and the bases; one that would leave less is refused before it starts, and
    /// retried later (space may be freed).
    pub min_free_mib: u64,
    /// Bytes (MiB) bases and pulled blobs may take together; the least recently used
    /// bases no machine names are collected first. 0: no budget.
    pub cache_budget_mib: u64,
    /// A base no machine names and nothing used for this many hours is collected.
    /// 0: never for age alone.
    pub max_unused_hours: u64,
    /// How often the cache is collected by itself, in seconds. 0: only when asked
    /// (`hearth image prune`).
    pub collect_interval_secs: u64,
    /// A base used this recently (seconds) is never collected, whatever the budget.
    pub collect_grace_secs: u64,
    /// Directories of this host whose contents API callers may name as images (a
    /// directory, a tar archive or an `oci:` layout at or below one). Empty, the default:
    /// no host path is an image, only `demo` and registry references. A path outside is
    /// refused (INVALID_ARGUMENT naming this key) before anything is read.
    pub local_roots: Vec<PathBuf>,
    /// How new machines' root disks are made: `overlay` (the image's base shared
    /// read-only, a small writable disk per machine, joined by overlayfs in the guest;
    /// constant cost) or `copy` (a private copy of the whole base). A machine keeps the
    /// layout it was made with.
    pub disk_layout: DiskLayout,
}

/// Basic-auth credentials for one registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    /// `host:port` as in image references.
    pub registry: String,
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig {
            headroom_mib: 64,
            busybox: PathBuf::from("/bin/busybox"),
            insecure_registries: Vec::new(),
            registry_auth: Vec::new(),
            max_layer_mib: 4096,
            max_image_mib: 16384,
            max_layers: 128,
            max_entries: crate::image::DEFAULT_MAX_ENTRIES,
            min_free_mib: 256,
            cache_budget_mib: 0,
            max_unused_hours: 168,
            collect_interval_secs: 300,
            collect_grace_secs: 600,
            disk_layout: DiskLayout::Overlay,
            local_roots: Vec::new(),
        }
    }
}

impl ImagesConfig {
    /// The registry settings pulls use.
    pub fn registry_settings(&self) -> crate::image::oci::RegistrySettings {
        crate::image::oci::RegistrySettings {
            insecure: self.insecure_registries.clone(),
            auth: self
                .registry_auth
                .iter()
                .map(|a| (a.registry.clone(), a.username.clone(), a.password.clone()))
                .collect(),
            max_layer_bytes: self.max_layer_mib << 20,
            max_layers: self.max_layers,
            max_image_bytes: self.max_image_mib.saturating_mul(1 << 20),
            space: self.space_policy(),
        }
    }

    /// The image store's settings.
    pub fn base_settings(&self) -> crate::image::BaseSettings {
        crate::image::BaseSettings {
            headroom_mib: self.headroom_mib,
            busybox: self.busybox.clone(),
            max_entries: self.max_entries,
            space: self.space_policy(),
            local_roots: self.local_roots.clone(),
            ..crate::image::BaseSettings::default()
        }
    }

    /// How much free space pulls and builds leave.
    pub fn space_policy(&self) -> crate::image::space::SpacePolicy {
        crate::image::space::SpacePolicy {
            reserve_bytes: self.min_free_mib.saturating_mul(1 << 20),
            free: crate::image::space::FreeSpace::Statvfs,
        }
    }

    /// When bases are collected.
    pub fn collect_policy(&self) -> crate::image::collect::CollectPolicy {
        crate::image::collect::CollectPolicy {
            budget_bytes: (self.cache_budget_mib > 0).then_some(self.cache_budget_mib << 20),
            max_unused_secs: (self.max_unused_hours > 0)
                .then(|| self.max_unused_hours.saturating_mul(3600)),
            grace_secs: self.collect_grace_secs,
        }
    }

    /// How often a collection runs by itself.
    pub fn collect_every(&self) -> Option<std::time::Duration> {
        (self.collect_interval_secs > 0)
            .then(|| std::time::Duration::from_secs(self.collect_interval_secs))
    }
}

/// How a machine's root disk is made (`images.disk_layout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskLayout {
    /// The image's base, shared read-only by every machine of the image, under a small
    /// writable disk of the machine's own; the guest joins them with overlayfs. Costs
    /// the same for any image size.
    #[default]
    Overlay,
    /// A private copy of the whole base (a reflink where the file system has them, else
    /// a sparse copy): costs grow with the image on ext4.
    Copy,
}

impl DiskLayout {
    /// The config and API name.
    pub fn name(self) -> &'static str {
        match self {
            DiskLayout::Overlay => "overlay",
            DiskLayout::Copy => "copy",
        }
    }
}
