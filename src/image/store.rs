//! The cache of ext4 bases, one per distinct image content, under `<data>/images`.
//!
//! ```text
//! <root>/
//!   bases/<digest>.ext4   complete base images, read-only (0444); present = usable
//!   bases/<digest>.json   what it was built from, when, how big (informational)
//!   tmp/<pid>.<start>-<n>-*  builds in progress: unpacked trees and images being made
//! ```
//!
//! A base appears at its final name only by rename, after mkfs succeeded and the file was
//! synced, so a crash at any point leaves either no base or a complete one, plus at most
//! some temporaries that the next `open` removes (their owning process is gone). The
//! digest covers the content and every setting that shapes the image, so a hit is always
//! the image a fresh build would make.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use super::clone::sync_parent;
use super::demo::{self, DemoError};
use super::digest::{Hasher, TreeStats, WalkError, hash_file, is_valid_digest, walk_tree};
use super::mkfs::{self, MkfsError};
use super::reference::{ImageRef, ImageRefError};
use super::space::{SpaceError, SpacePolicy};
use super::tarball::{self, TarballError};

/// Version of the way bases are built. Bump it when the mkfs options, the sizing or the
/// tree preparation change: every digest changes with it, so old bases are not reused.
pub const BUILDER_VERSION: u64 = 1;

/// How bases are built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseSettings {
    /// Free space added beyond the content, in MiB: what the guest can write.
    pub headroom_mib: u64,
    /// The smallest image made, in MiB, however small the content.
    pub min_size_mib: u64,
    /// The static busybox the `demo` image is made from.
    pub busybox: PathBuf,
    /// Most entries an unpacked image (all its layers, or an archive) may have.
    pub max_entries: u64,
    /// The free space a build must leave on the store's file system.
    pub space: SpacePolicy,
    /// `images.local_roots`: the only host directories an image may be read from.
    pub local_roots: Vec<PathBuf>,
}

/// The entry limit when nothing else is configured (see `images.max_entries`).
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;

impl Default for BaseSettings {
    fn default() -> Self {
        BaseSettings {
            headroom_mib: 64,
            min_size_mib: 32,
            busybox: PathBuf::from("/bin/busybox"),
            max_entries: DEFAULT_MAX_ENTRIES,
            space: SpacePolicy::default(),
            // Code that builds a store by hand (tests, benches) reads where it likes; the
            // daemon's comes from the config, where the default is none.
            local_roots: vec![PathBuf::from("/")],
        }
    }
}

/// A built base image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// Content digest: 64 lowercase hex characters.
    pub digest: String,
    /// The read-only ext4 image file.
    pub path: PathBuf,
    /// Its length (the file system size; the file is sparse).
    pub size_bytes: u64,
}

/// Why a base could not be built, found or removed.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// The image reference names nothing usable (see [`ImageRefError::is_not_found`]).
    #[error(transparent)]
    Image(#[from] ImageRefError),
    /// The demo image cannot be made on this host.
    #[error(transparent)]
    Demo(#[from] DemoError),
    /// Reading the source tree or archive failed.
    #[error("image {image}: {source}")]
    Read {
        /// The image reference.
        image: String,
        /// The cause.
        source: WalkError,
    },
    /// The archive could not be unpacked safely.
    #[error("image {image}: {source}")]
    Unpack {
        /// The image reference.
        image: String,
        /// The cause, naming the entry.
        source: TarballError,
    },
    /// mkfs failed.
    #[error("image {image}: {source}")]
    Mkfs {
        /// The image reference.
        image: String,
        /// The cause, with mkfs's stderr.
        source: MkfsError,
    },
    /// A file operation in the store failed.
    #[error("base store {path}: {what}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A digest that is not one (and must not become a file name).
    #[error("`{0}` is not a base digest (64 lowercase hex characters)")]
    InvalidDigest(String),
    /// An image layer could not be applied (the message names the layer and entry).
    #[error("image {image}: {message}")]
    Layer {
        /// The image.
        image: String,
        /// What went wrong.
        message: String,
    },
    /// The image breaks a configured limit (`images.max_entries`, `images.max_image_mib`;
    /// the message names it and the figures): it can never be built with these settings.
    #[error("image {image}: {message}")]
    OverLimit {
        /// The image.
        image: String,
        /// Which limit, at which entry.
        message: String,
    },
    /// The store's file system has too little free space for the build (it may be freed).
    #[error("image {image}: {source}")]
    NoSpace {
        /// The image.
        image: String,
        /// The figures.
        source: SpaceError,
    },
}

impl BaseError {
    /// Whether the image itself is absent (the API answers NOT_FOUND); every other error
    /// is a bad reference, a bad image or a host problem.
    pub fn is_not_found(&self) -> bool {
        matches!(self, BaseError::Image(e) if e.is_not_found())
    }

    /// Whether the image breaks a configured limit: building it again cannot succeed
    /// until the configuration changes.
    pub fn is_over_limit(&self) -> bool {
        matches!(self, BaseError::OverLimit { .. })
    }

    /// Whether the build was refused for want of free space, which may be freed later.
    pub fn is_no_space(&self) -> bool {
        matches!(
            self,
            BaseError::NoSpace {
                source: SpaceError::TooLittle { .. },
                ..
            }
        )
    }
}

/// A layer that could not be applied: over a limit, or anything else.
fn layer_error(image: &str, e: super::layer::LayerError) -> BaseError {
    let image = image.to_string();
    let message = e.to_string();
    if e.is_over_limit() {
        BaseError::OverLimit { image, message }
    } else {
        BaseError::Layer { image, message }
    }
}

/// A free-space refusal of a build of `image`; a failure to read the figure is a host
/// error like any other file operation.
fn space_err(image: &str) -> impl FnOnce(SpaceError) -> BaseError {
    let image = image.to_string();
    move |source| match source {
        SpaceError::Statvfs { path, source } => BaseError::Io {
            path,
            what: "statvfs",
            source,
        },
        source @ SpaceError::TooLittle { .. } => BaseError::NoSpace { image, source },
    }
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> BaseError {
    let path = path.to_path_buf();
    move |source| BaseError::Io { path, what, source }
}

/// What is written next to each base.
#[derive(Serialize)]
struct BaseMeta<'a> {
    digest: &'a str,
    source: &'a str,
    builder_version: u64,
    size_bytes: u64,
    content_bytes: u64,
    inodes: u64,
    built_unix: u64,
    build_millis: u64,
}

/// Distinguishes temporaries made by one process.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// The process a temporary belongs to: pid and start time (clock ticks after boot, field
/// 22 of `/proc/PID/stat`). The pid alone is not enough: in a container the daemon often
/// gets the same pid on every start, and its predecessor's leftovers must still go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    pid: u32,
    start: u64,
}

impl Owner {
    fn me() -> Owner {
        static ME: OnceLock<Owner> = OnceLock::new();
        *ME.get_or_init(|| {
            let pid = std::process::id();
            Owner {
                pid,
                start: process_start(pid).unwrap_or(0),
            }
        })
    }

    /// Parses `<pid>.<start>`.
    fn parse(s: &str) -> Option<Owner> {
        let (pid, start) = s.split_once('.')?;
        Some(Owner {
            pid: pid.parse().ok()?,
            start: start.parse().ok()?,
        })
    }

    /// Whether the process that made the temporary may still be working on it.
    fn is_alive(&self) -> bool {
        match process_start(self.pid) {
            Some(start) => start == self.start,
            // No such process; or no /proc to ask, then only our own files are known live.
            None => !Path::new("/proc/self").exists() || *self == Owner::me(),
        }
    }
}

/// A process's start time from `/proc/PID/stat`; the fields are counted after the last
/// `)` because the command name may contain spaces and parentheses.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); the start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A temporary file or directory removed when dropped unless kept.
struct Temp(Option<PathBuf>);

impl Temp {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// The temporary has been renamed away: nothing to remove.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let removed = match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
                Ok(_) => std::fs::remove_file(&path),
                Err(_) => Ok(()),
            };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a temporary");
            }
        }
    }
}

/// The base cache. Cheap to share (`Arc`); every method is blocking.
#[derive(Debug)]
pub struct BaseStore {
    root: PathBuf,
    settings: BaseSettings,
}

impl BaseStore {
    /// Opens (creating when missing) the store under `root` and removes temporaries left by
    /// processes that no longer exist.
    pub fn open(root: &Path, settings: BaseSettings) -> Result<Self, BaseError> {
        let store = BaseStore {
            root: root.to_path_buf(),
            settings,
        };
        for dir in [store.bases_dir(), store.tmp_dir()] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir, "create directory"))?;
        }
        store.remove_stale_temporaries()?;
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The settings bases are built with.
    pub fn settings(&self) -> &BaseSettings {
        &self.settings
    }

    fn bases_dir(&self) -> PathBuf {
        self.root.join("bases")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn base_path(&self, digest: &str) -> PathBuf {
        self.bases_dir().join(format!("{digest}.ext4"))
    }

    fn meta_path(&self, digest: &str) -> PathBuf {
        self.bases_dir().join(format!("{digest}.json"))
    }

    fn temp(&self, digest: &str, suffix: &str) -> Temp {
        let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        let short = digest.get(..12).unwrap_or(digest);
        let owner = Owner::me();
        Temp(Some(self.tmp_dir().join(format!(
            "{}.{}-{n}-{short}.{suffix}",
            owner.pid, owner.start
        ))))
    }

    fn remove_stale_temporaries(&self) -> Result<(), BaseError> {
        let tmp = self.tmp_dir();
        let entries = std::fs::read_dir(&tmp).map_err(io_err(&tmp, "read directory"))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&tmp, "read directory"))?;
            let name = entry.file_name();
            let Some(owner) = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(Owner::parse)
            else {
                continue;
            };
            if owner.is_alive() {
                continue;
            }
            tracing::info!(path = %entry.path().display(), "removing a temporary left by an earlier process");
            drop(Temp(Some(entry.path())));
        }
        Ok(())
    }

    /// Whether a base can be made for `image` now: the directory or archive exists, or for
    /// the demo image, the configured busybox exists and is static.
    pub fn check_available(&self, image: &ImageRef) -> Result<(), BaseError> {
        image.check_local_roots(&self.settings.local_roots)?;
        image.check_available()?;
        if *image == ImageRef::Demo {
            demo::check(&self.settings.busybox)?;
        }
        Ok(())
    }

    /// The digest `image` has now (reads the whole source).
    pub fn digest(&self, image: &ImageRef) -> Result<String, BaseError> {
        Ok(self.identify(image)?.0)
    }

    /// The digest, and for a directory the stats gathered by the same walk.
    fn identify(&self, image: &ImageRef) -> Result<(String, Option<TreeStats>), BaseError> {
        let mut h = Hasher::new("hearth-base");
        h.u64(BUILDER_VERSION);
        h.u64(self.settings.headroom_mib);
        h.u64(self.settings.min_size_mib);
        let read_err = |source| BaseError::Read {
            image: image.to_string(),
            source,
        };
        let stats = match image {
            ImageRef::Demo => {
                h.bytes(b"demo");
                demo::identity(&self.settings.busybox, &mut h)?;
                None
            }
            ImageRef::Directory(dir) => {
                h.bytes(b"directory");
                Some(walk_tree(dir, Some(&mut h)).map_err(read_err)?)
            }
            ImageRef::Oci(_) | ImageRef::Layout { .. } => return Err(needs_pull(image)),
            ImageRef::Tarball(file) => {
                h.bytes(if ImageRef::is_gzip(file) {
                    b"tar.gz"
                } else {
                    b"tar"
                });
                hash_file(&mut h, file).map_err(read_err)?;
                None
            }
        };
        Ok((h.finish(), stats))
    }

    /// The base for `image`, built when no base with its current content digest exists.
    ///
    /// Idempotent: a cached base is returned untouched (same digest, same file); a build
    /// writes to temporaries and renames the finished image into place, so concurrent or
    /// interrupted calls never expose a partial base. Temporaries (unpacked trees, images
    /// being made) are removed on success and failure. Undo: [`BaseStore::remove`].
    /// Blocking: a cold build unpacks and runs mkfs.
    pub fn ensure_base(&self, image: &ImageRef) -> Result<Base, BaseError> {
        self.check_available(image)?;
        let started = Instant::now();
        let (digest, dir_stats) = self.identify(image)?;
        if let Some(base) = self.get(&digest)? {
            tracing::debug!(%image, %digest, "base cached");
            return Ok(base);
        }
        let name = image.to_string();
        // The tree mkfs copies: the directory itself, or a temporary one.
        let mut tree_temp = None;
        let (tree, stats) = match image {
            ImageRef::Oci(_) | ImageRef::Layout { .. } => return Err(needs_pull(image)),
            ImageRef::Directory(dir) => {
                let stats = match dir_stats {
                    Some(stats) => stats,
                    None => self.measure(&name, dir)?,
                };
                (dir.clone(), stats)
            }
            ImageRef::Tarball(file) => {
                let temp = self.temp(&digest, "tree");
                std::fs::create_dir(temp.path())
                    .map_err(io_err(temp.path(), "create directory"))?;
                let tree = temp.path().to_path_buf();
                tree_temp = Some(temp);
                tarball::unpack(
                    file,
                    ImageRef::is_gzip(file),
                    &tree,
                    self.settings.max_entries,
                )
                .map_err(|source| {
                    if source.is_over_limit() {
                        BaseError::OverLimit {
                            image: name.clone(),
                            message: source.to_string(),
                        }
                    } else {
                        BaseError::Unpack {
                            image: name.clone(),
                            source,
                        }
                    }
                })?;
                let stats = self.measure(&name, &tree)?;
                (tree, stats)
            }
            ImageRef::Demo => {
                let temp = self.temp(&digest, "tree");
                std::fs::create_dir(temp.path())
                    .map_err(io_err(temp.path(), "create directory"))?;
                let tree = temp.path().to_path_buf();
                tree_temp = Some(temp);
                demo::write_tree(&tree, &self.settings.busybox)?;
                let stats = self.measure(&name, &tree)?;
                (tree, stats)
            }
        };
        let base = self.finish_base(&name, &digest, &tree, &stats, started)?;
        drop(tree_temp);
        Ok(base)
    }

    /// The base for a pulled OCI image, keyed by its manifest digest (and the builder's
    /// settings): its layers applied in order onto a scratch tree, each checked against
    /// the config's `diff_ids`, then mkfs. `max_bytes` bounds what all layers together
    /// may write, the settings' `max_entries` how many entries they may hold. The store's
    /// file system must have the layers' compressed size free before unpacking starts (a
    /// floor: unpacked layers are rarely smaller) and the planned image size before mkfs,
    /// each with the reserve on top. Returns the base and whether it was built now
    /// (false: cached).
    ///
    /// `phase` hears what the build is doing (`unpacking layer 2/3`, `building ext4`),
    /// for a progress display.
    ///
    /// Idempotent like [`BaseStore::ensure_base`]; a failed build leaves nothing behind
    /// (the scratch tree and the image being made are temporaries).
    pub fn ensure_oci_base(
        &self,
        name: &str,
        pulled: &super::oci::PulledImage,
        max_bytes: u64,
        phase: &dyn Fn(String),
    ) -> Result<(Base, bool), BaseError> {
        let started = Instant::now();
        let digest = self.oci_digest(&pulled.manifest_digest);
        if let Some(base) = self.get(&digest)? {
            return Ok((base, false));
        }
        if !pulled.layers_verified {
            // The pull skipped the layers because this base existed; it is gone now.
            return Err(BaseError::Layer {
                image: name.to_string(),
                message: format!(
                    "the base for manifest {} was removed while the image was read; try again",
                    pulled.manifest_digest
                ),
            });
        }
        let compressed = pulled
            .layers
            .iter()
            .fold(0u64, |sum, layer| sum.saturating_add(layer.size));
        self.settings
            .space
            .require(&self.root, "unpacking the layers", compressed)
            .map_err(space_err(name))?;
        let temp = self.temp(&digest, "tree");
        std::fs::create_dir(temp.path()).map_err(io_err(temp.path(), "create directory"))?;
        let tree = temp.path().to_path_buf();
        let mut budget = super::layer::LayerBudget::new(super::layer::LayerLimits {
            max_bytes,
            max_entries: self.settings.max_entries,
        });
        for (i, layer) in pulled.layers.iter().enumerate() {
            phase(format!("unpacking layer {}/{}", i + 1, pulled.layers.len()));
            let compression = super::layer::Compression::from_media_type(&layer.media_type)
                .ok_or_else(|| BaseError::Layer {
                    image: name.to_string(),
                    message: format!(
                        "layer {}: unsupported media type {}",
                        layer.digest, layer.media_type
                    ),
                })?;
            let stats = super::layer::apply_layer(
                &layer.path,
                &layer.digest,
                compression,
                &tree,
                &mut budget,
            )
            .map_err(|e| layer_error(name, e))?;
            if let Some(want) = pulled.config.diff_ids.get(i)
                && *want != stats.diff_id
            {
                return Err(BaseError::Layer {
                    image: name.to_string(),
                    message: format!(
                        "layer {}: uncompressed digest {} differs from the config's diff_id {want}",
                        layer.digest, stats.diff_id
                    ),
                });
            }
        }
        let stats = self.measure(name, &tree)?;
        phase("building ext4".to_string());
        let base = self.finish_base(name, &digest, &tree, &stats, started)?;
        drop(temp);
        Ok((base, true))
    }

    /// The base digest of an OCI image with `manifest_digest` (and these settings).
    pub fn oci_digest(&self, manifest_digest: &str) -> String {
        let mut h = Hasher::new("hearth-base");
        h.u64(BUILDER_VERSION);
        h.u64(self.settings.headroom_mib);
        h.u64(self.settings.min_size_mib);
        h.bytes(b"oci");
        h.bytes(manifest_digest.as_bytes());
        h.finish()
    }

    /// Whether the base of the OCI image with `manifest_digest` is built.
    pub fn has_oci_base(&self, manifest_digest: &str) -> bool {
        self.base_path(&self.oci_digest(manifest_digest)).is_file()
    }

    /// mkfs of `tree` into a temporary, made read-only, synced, described and renamed into
    /// place as the base `digest`.
    fn finish_base(
        &self,
        name: &str,
        digest: &str,
        tree: &Path,
        stats: &TreeStats,
        started: Instant,
    ) -> Result<Base, BaseError> {
        let image = name;
        let digest = digest.to_string();
        let plan = mkfs::plan(
            stats,
            self.settings.headroom_mib,
            self.settings.min_size_mib,
        );
        // The image file is sparse, but mkfs writes the content, the inode tables and the
        // journal: the planned size is what it may take.
        self.settings
            .space
            .require(&self.root, "building the ext4 base", plan.size_bytes)
            .map_err(space_err(name))?;
        let image_temp = self.temp(&digest, "ext4");
        mkfs::make(tree, image_temp.path(), plan).map_err(|source| BaseError::Mkfs {
            image: name.to_string(),
            source,
        })?;
        let path = self.base_path(&digest);
        // Read-only: a base is shared by every disk cloned from it.
        std::fs::set_permissions(image_temp.path(), std::fs::Permissions::from_mode(0o444))
            .map_err(io_err(image_temp.path(), "chmod"))?;
        std::fs::File::open(image_temp.path())
            .and_then(|f| f.sync_all())
            .map_err(io_err(image_temp.path(), "sync"))?;
        let build_millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.write_meta(&digest, name, stats, plan.size_bytes, build_millis)?;
        std::fs::rename(image_temp.path(), &path).map_err(io_err(&path, "rename into place"))?;
        image_temp.keep();
        sync_parent(&path).map_err(io_err(&self.bases_dir(), "sync directory"))?;
        tracing::info!(%image, %digest, size_bytes = plan.size_bytes, build_millis, "base built");
        Ok(Base {
            digest,
            path,
            size_bytes: plan.size_bytes,
        })
    }

    fn measure(&self, image: &str, tree: &Path) -> Result<TreeStats, BaseError> {
        walk_tree(tree, None).map_err(|source| BaseError::Read {
            image: image.to_string(),
            source,
        })
    }

    fn write_meta(
        &self,
        digest: &str,
        source: &str,
        stats: &TreeStats,
        size_bytes: u64,
        build_millis: u64,
    ) -> Result<(), BaseError> {
        let meta = BaseMeta {
            digest,
            source,
            builder_version: BUILDER_VERSION,
            size_bytes,
            content_bytes: stats.file_bytes,
            inodes: stats.inodes,
            built_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            build_millis,
        };
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| BaseError::Io {
            path: self.meta_path(digest),
            what: "encode",
            source: std::io::Error::other(e),
        })?;
        let temp = self.temp(digest, "json");
        std::fs::write(temp.path(), text).map_err(io_err(temp.path(), "write"))?;
        let path = self.meta_path(digest);
        std::fs::rename(temp.path(), &path).map_err(io_err(&path, "rename into place"))?;
        temp.keep();
        Ok(())
    }

    /// The base with `digest`, if built.
    pub fn get(&self, digest: &str) -> Result<Option<Base>, BaseError> {
        if !is_valid_digest(digest) {
            return Err(BaseError::InvalidDigest(digest.to_string()));
        }
        let path = self.base_path(digest);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(Base {
                digest: digest.to_string(),
                path,
                size_bytes: meta.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, "stat")(e)),
        }
    }

    /// What the base's description says it was built from and when (seconds since the
    /// epoch), for a base that has no entry in the store (built by an older hearth, or
    /// the daemon died between the build and its record). `None` when unreadable.
    pub fn described(&self, digest: &str) -> Option<(String, u64)> {
        #[derive(serde::Deserialize)]
        struct Described {
            source: String,
            built_unix: u64,
        }
        let text = std::fs::read(self.meta_path(digest)).ok()?;
        let d: Described = serde_json::from_slice(&text).ok()?;
        Some((d.source, d.built_unix))
    }

    /// Every built base, sorted by digest.
    pub fn list(&self) -> Result<Vec<Base>, BaseError> {
        let dir = self.bases_dir();
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir, "read directory"))? {
            let entry = entry.map_err(io_err(&dir, "read directory"))?;
            let name = entry.file_name();
            let Some(digest) = name.to_str().and_then(|n| n.strip_suffix(".ext4")) else {
                continue;
            };
            if !is_valid_digest(digest) {
                continue;
            }
            if let Some(base) = self.get(digest)? {
                bases.push(base);
            }
        }
        bases.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(bases)
    }

    /// Removes the base with `digest` and its metadata; true when the base file was there
    /// (so what it took on disk was freed now). Disks cloned from it are separate files
    /// and are not affected.
    ///
    /// Idempotent: removing a missing base is success (false). Undo of
    /// [`BaseStore::ensure_base`].
    pub fn remove(&self, digest: &str) -> Result<bool, BaseError> {
        if !is_valid_digest(digest) {
            return Err(BaseError::InvalidDigest(digest.to_string()));
        }
        let removed = |path: &Path| match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(path, "remove")(e)),
        };
        let base_was_there = removed(&self.base_path(digest))?;
        removed(&self.meta_path(digest))?;
        Ok(base_was_there)
    }
}

/// A registry image has no local source to build from: it is pulled first, then built
/// by [`BaseStore::ensure_oci_base`].
fn needs_pull(image: &ImageRef) -> BaseError {
    BaseError::Layer {
        image: image.to_string(),
        message: "a registry image is built from its pulled layers".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, settings: BaseSettings) -> BaseStore {
        BaseStore::open(&dir.join("images"), settings).unwrap()
    }

    #[test]
    fn digests_follow_content_kind_and_settings() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("f"), b"x").unwrap();
        let s = store(dir.path(), BaseSettings::default());
        let d1 = s.digest(&ImageRef::Directory(tree.clone())).unwrap();
        assert_eq!(d1, s.digest(&ImageRef::Directory(tree.clone())).unwrap());
        let bigger = store(
            dir.path(),
            BaseSettings {
                headroom_mib: 128,
                ..BaseSettings::default()
            },
        );
        assert_ne!(
            d1,
            bigger.digest(&ImageRef::Directory(tree.clone())).unwrap()
        );
        // The same bytes as a tar and as a tar.gz are different sources.
        let a = dir.path().join("a.tar");
        let b = dir.path().join("a.tar.gz");
        std::fs::write(&a, b"bytes").unwrap();
        std::fs::write(&b, b"bytes").unwrap();
        assert_ne!(
            s.digest(&ImageRef::Tarball(a)).unwrap(),
            s.digest(&ImageRef::Tarball(b)).unwrap()
        );
    }

    #[test]
    fn digests_are_checked_before_touching_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), BaseSettings::default());
        for bad in ["../../etc/passwd", "", "ABC"] {
            assert!(matches!(s.remove(bad), Err(BaseError::InvalidDigest(_))));
            assert!(matches!(s.get(bad), Err(BaseError::InvalidDigest(_))));
        }
        let missing = "0".repeat(64);
        assert_eq!(s.get(&missing).unwrap(), None);
        s.remove(&missing).unwrap();
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn temporaries_of_dead_processes_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("images/tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        // pid_max is at most 2^22, so this pid cannot be alive.
        let stale = tmp.join("4194304999.5-0-abc.tree");
        std::fs::create_dir_all(stale.join("etc")).unwrap();
        let me = Owner::me();
        let mine = tmp.join(format!("{}.{}-0-abc.ext4", me.pid, me.start));
        std::fs::write(&mine, b"").unwrap();
        // Our pid with another start time: a predecessor that had the same pid.
        let predecessor = tmp.join(format!("{}.{}-0-abc.ext4", me.pid, me.start + 1));
        std::fs::write(&predecessor, b"").unwrap();
        let foreign = tmp.join("not-ours");
        std::fs::write(&foreign, b"").unwrap();
        store(dir.path(), BaseSettings::default());
        assert!(!stale.exists() && !predecessor.exists());
        assert!(mine.exists() && foreign.exists());
    }

    #[test]
    fn process_start_is_read_past_the_command_name() {
        let me = Owner::me();
        assert!(me.start > 0);
        assert_eq!(process_start(me.pid), Some(me.start));
        assert_eq!(Owner::parse(&format!("{}.{}", me.pid, me.start)), Some(me));
        assert_eq!(Owner::parse("12"), None);
        assert!(me.is_alive());
    }

    #[test]
    fn a_build_without_room_is_refused_with_the_figures_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("f"), b"x").unwrap();
        let s = store(
            dir.path(),
            BaseSettings {
                headroom_mib: 0,
                space: SpacePolicy {
                    reserve_bytes: 1 << 20,
                    free: super::super::space::FreeSpace::Fixed(20 << 20),
                },
                ..BaseSettings::default()
            },
        );
        let err = s.ensure_base(&ImageRef::Directory(tree)).unwrap_err();
        assert!(err.is_no_space() && !err.is_over_limit(), "{err}");
        let message = err.to_string();
        for part in [
            "building the ext4 base needs 32 MiB",
            "1 MiB are kept free (images.min_free_mib)",
            "only 20 MiB are free",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        assert!(s.list().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(s.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn an_archive_over_the_entry_limit_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("root.tar");
        let mut builder = tar::Builder::new(Vec::new());
        for i in 0..5 {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(1);
            builder
                .append_data(&mut h, format!("f{i}"), &b"x"[..])
                .unwrap();
        }
        std::fs::write(&archive, builder.into_inner().unwrap()).unwrap();
        let s = store(
            dir.path(),
            BaseSettings {
                max_entries: 4,
                ..BaseSettings::default()
            },
        );
        let err = s.ensure_base(&ImageRef::Tarball(archive)).unwrap_err();
        assert!(err.is_over_limit() && !err.is_no_space(), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("images.max_entries") && message.contains("`f4`"),
            "{message}"
        );
        assert_eq!(std::fs::read_dir(s.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_busybox_makes_demo_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(
            dir.path(),
            BaseSettings {
                busybox: dir.path().join("busybox"),
                ..BaseSettings::default()
            },
        );
        let err = s.ensure_base(&ImageRef::Demo).unwrap_err();
        assert!(
            matches!(err, BaseError::Demo(DemoError::BusyboxMissing(_))),
            "{err}"
        );
    }
}
