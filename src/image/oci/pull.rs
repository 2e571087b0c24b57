//! Pulling an image from an OCI distribution registry into the blob directory (the HTTP
//! is in `registry`, every body bounded): resolve the manifest (an index picks
//! linux/amd64), check the layers against policy (their count, each one's size, their sum) and the blob directory's free
//! space before downloading anything, then fetch the blobs that are not already present,
//! verifying size and sha256 before they get their final name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};

use oci_client::client::linux_amd64_resolver;
use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE, OciDescriptor, OciImageManifest,
    OciManifest,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::blobs::{BlobPathError, Present, blob_path, check_present, sha256_hex, temp_path};
use super::config::{ConfigError, ImageConfig};
use super::pulled::{BuiltFor, FetchStats, Layer, Progress, PulledImage, compression_of};
use super::reference::OciRef;
use super::registry::{Registry, RegistryError};
use super::settings::RegistrySettings;
use crate::image::space::SpaceError;

/// Largest config blob accepted. Real configs are a few KiB (history included); the
/// limit only stops a hostile registry from filling memory, since configs are parsed
/// whole.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Layers downloaded at the same time: enough to hide per-request latency, few enough
/// not to starve a small host's disk and network.
const PARALLEL_DOWNLOADS: usize = 3;

/// A progress event at most every this many bytes of a layer (plus the last one), so a
/// CLI redrawing on each event does not redraw per network packet.
const PROGRESS_STEP: u64 = 256 << 10;

/// Bounds on registry connections: a registry that stops answering fails the pull
/// instead of holding a machine create forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a pull failed. Every message names the reference, and the blob when one is at
/// fault.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The HTTP client could not be built (TLS setup).
    #[error("pulling {reference}: cannot set up the registry client: {source}")]
    Client {
        /// The image being pulled.
        reference: String,
        /// The cause.
        source: reqwest::Error,
    },
    /// A request to the registry failed: connection, TLS, authorisation, not found, a
    /// body over its cap.
    #[error("pulling {reference}: {what} from {endpoint}: {source}{detail}{hint}")]
    Registry {
        /// The image being pulled.
        reference: String,
        /// What was being fetched (`manifest`, `blob sha256:...`).
        what: String,
        /// `https://host:port`, or `http://...` for a registry listed as insecure.
        endpoint: String,
        /// The causes under `source` (`: cause: cause`), which its own message omits.
        detail: String,
        /// Advice when the cause is likely a plain-HTTP registry spoken to over HTTPS.
        hint: &'static str,
        /// The cause (boxed: errors travel by value).
        source: Box<RegistryError>,
    },
    /// The connection broke or the registry's stream failed while a blob was arriving.
    #[error("pulling {reference}: downloading blob {digest}: {source}")]
    Transfer {
        /// The image being pulled.
        reference: String,
        /// The blob.
        digest: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The reference names an image index without a linux/amd64 manifest.
    #[error(
        "pulling {reference}: image index {index} has no linux/amd64 manifest (it has: {available})"
    )]
    NoPlatform {
        /// The image being pulled.
        reference: String,
        /// The index digest.
        index: String,
        /// The platforms it lists, `os/arch`, comma separated.
        available: String,
    },
    /// An index entry chosen for linux/amd64 is itself an index.
    #[error("pulling {reference}: manifest {manifest} chosen from the index is another index")]
    NestedIndex {
        /// The image being pulled.
        reference: String,
        /// The digest of the nested index.
        manifest: String,
    },
    /// The image's config says it is for another platform.
    #[error("pulling {reference}: the image is for {os}/{architecture}, not linux/amd64")]
    WrongPlatform {
        /// The image being pulled.
        reference: String,
        /// The config's `os`.
        os: String,
        /// The config's `architecture`.
        architecture: String,
    },
    /// The manifest describes an artifact that is not a container image.
    #[error(
        "pulling {reference}: manifest {manifest} is not a container image (config media type `{media_type}`)"
    )]
    NotAnImage {
        /// The image being pulled.
        reference: String,
        /// The manifest digest.
        manifest: String,
        /// The config descriptor's media type.
        media_type: String,
    },
    /// A layer whose media type hearth cannot unpack.
    #[error(
        "pulling {reference}: layer {digest} has media type `{media_type}`, which hearth cannot unpack"
    )]
    UnsupportedLayer {
        /// The image being pulled.
        reference: String,
        /// The layer digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// A layer larger than `max_layer_bytes`, refused before download.
    #[error(
        "pulling {reference}: layer {digest} is {size} bytes, over the limit of {max} bytes (images.max_layer_mib)"
    )]
    LayerTooLarge {
        /// The image being pulled.
        reference: String,
        /// The layer digest.
        digest: String,
        /// Its declared size.
        size: u64,
        /// The configured limit.
        max: u64,
    },
    /// A manifest with more layers than `max_layers`, refused before download.
    #[error(
        "pulling {reference}: manifest {manifest} has {layers} layers, over the limit of {max} (images.max_layers)"
    )]
    TooManyLayers {
        /// The image being pulled.
        reference: String,
        /// The manifest digest.
        manifest: String,
        /// How many layers it lists.
        layers: u64,
        /// The configured limit.
        max: u64,
    },
    /// A manifest whose layers declare more bytes together than `max_image_bytes`,
    /// refused before download.
    #[error(
        "pulling {reference}: manifest {manifest} declares {total} bytes of compressed layers, over the image limit of {max} bytes (images.max_image_mib)"
    )]
    ImageTooLarge {
        /// The image being pulled.
        reference: String,
        /// The manifest digest.
        manifest: String,
        /// The sum of the layers' declared sizes.
        total: u64,
        /// The configured limit.
        max: u64,
    },
    /// The blob directory's file system has too little free space for the blobs still to
    /// be downloaded (plus the reserve), checked before any download.
    #[error("pulling {reference}: {source}")]
    NoSpace {
        /// The image being pulled.
        reference: String,
        /// The figures.
        source: SpaceError,
    },
    /// A config blob larger than [`MAX_CONFIG_BYTES`].
    #[error(
        "pulling {reference}: config blob {digest} is {size} bytes, over the limit of {max} bytes"
    )]
    ConfigTooLarge {
        /// The image being pulled.
        reference: String,
        /// The config digest.
        digest: String,
        /// Its declared size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A descriptor with a negative size.
    #[error("pulling {reference}: blob {digest} declares the negative size {size}")]
    NegativeSize {
        /// The image being pulled.
        reference: String,
        /// The blob digest.
        digest: String,
        /// The declared size.
        size: i64,
    },
    /// A descriptor whose digest is not sha256.
    #[error("pulling {reference}: {source}")]
    BlobName {
        /// The image being pulled.
        reference: String,
        /// The bad digest.
        source: BlobPathError,
    },
    /// The registry sent more bytes than the manifest declares for a blob.
    #[error(
        "pulling {reference}: blob {digest} sent more than the {declared} bytes the manifest declares"
    )]
    TooManyBytes {
        /// The image being pulled.
        reference: String,
        /// The blob digest.
        digest: String,
        /// The declared size.
        declared: u64,
    },
    /// The registry sent a different number of bytes than declared.
    #[error(
        "pulling {reference}: blob {digest} is {received} bytes, the manifest declares {declared}"
    )]
    SizeMismatch {
        /// The image being pulled.
        reference: String,
        /// The blob digest.
        digest: String,
        /// The declared size.
        declared: u64,
        /// The size received.
        received: u64,
    },
    /// The bytes received do not hash to the blob's digest.
    #[error("pulling {reference}: blob {digest} arrived with sha256:{actual}")]
    DigestMismatch {
        /// The image being pulled.
        reference: String,
        /// The expected digest.
        digest: String,
        /// The hex sha256 of what arrived.
        actual: String,
    },
    /// A local file operation in the blob directory failed.
    #[error("pulling {reference}: blob {digest}: {}: {source}", path.display())]
    Io {
        /// The image being pulled.
        reference: String,
        /// The blob digest (or `-` for the directory itself).
        digest: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config blob could not be read.
    #[error("pulling {reference}: config blob {digest}: {source}")]
    Config {
        /// The image being pulled.
        reference: String,
        /// The config digest.
        digest: String,
        /// The cause.
        source: ConfigError,
    },
}

impl PullError {
    /// Whether the image breaks a configured (or built-in) limit, found on its manifest
    /// before any download: pulling it again cannot succeed with the same settings.
    pub fn is_over_limit(&self) -> bool {
        matches!(
            self,
            PullError::LayerTooLarge { .. }
                | PullError::TooManyLayers { .. }
                | PullError::ImageTooLarge { .. }
                | PullError::ConfigTooLarge { .. }
        ) || matches!(self, PullError::Registry { source, .. } if source.is_too_large())
    }

    /// Whether the pull was refused for want of free space, which may be freed later.
    pub fn is_no_space(&self) -> bool {
        matches!(
            self,
            PullError::NoSpace {
                source: SpaceError::TooLittle { .. },
                ..
            }
        )
    }

    /// Whether the registry could not be reached (connection, TLS, timeout, a broken
    /// transfer), as opposed to a registry that answered with a refusal or a bad image.
    pub fn is_unreachable(&self) -> bool {
        match self {
            PullError::Registry { source, .. } => source.is_transport(),
            PullError::Transfer { .. } => true,
            _ => false,
        }
    }

    /// Whether the registry answered that the image does not exist (no such repository,
    /// tag or manifest): asking again will not make it appear.
    pub fn is_missing(&self) -> bool {
        matches!(self, PullError::Registry { source, .. } if source.is_not_found())
    }
}

/// Everything one pull needs, shared by the concurrent blob downloads.
struct Ctx<'a> {
    client: Arc<Registry>,
    repository: String,
    /// The tag or digest the reference names (the digest when both).
    wanted: String,
    reference: String,
    scheme: &'static str,
    blob_dir: &'a Path,
    progress: &'a (dyn Fn(Progress) + Send + Sync),
}

/// Whether a blob was downloaded or found present, and how many bytes came.
enum Fetched {
    Downloaded(u64),
    Reused,
}

/// Pulls `reference` into `blob_dir` (`blob_dir/sha256/<hex>`, created if needed) and
/// returns the verified layers and the image config. `progress` is called for every
/// layer (see [`Progress`]); it must be cheap, as it runs on the download task.
///
/// Plain HTTP is used only when the registry is listed in `settings.insecure`; basic
/// auth only when `settings.auth` names the registry. Before any download starts, the
/// manifest is checked against `settings.max_layers`, every layer against
/// `settings.max_layer_bytes` and the supported media types, the layers' declared sum
/// against `settings.max_image_bytes`, and the blob directory's file system must have
/// the blobs still missing there free, plus `settings.space`'s reserve.
///
/// Idempotent: a blob already present under its final name is verified (size, then
/// sha256) and reused; a corrupt one is replaced. A file only gets its final name after
/// it verified, so a pull interrupted at any point (error, crash, dropped future) leaves
/// either nothing or a temporary `.<hex>.partial-<pid>-<n>` file, which is removed by
/// the failing call itself or, after a crash, by the next pull. Undo: none needed; the
/// blob directory is a cache whose garbage collection belongs to the image store.
pub async fn pull(
    reference: &OciRef,
    settings: &RegistrySettings,
    blob_dir: &Path,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<PulledImage, PullError> {
    pull_unless_built(reference, settings, blob_dir, progress, &|_| false).await
}

/// [`pull`], except that when `built` says a base exists for the resolved manifest the
/// layers are neither fetched nor verified (`layers_verified` is false): the manifest
/// and the config, which hold the workload settings, are still read and checked.
pub async fn pull_unless_built(
    reference: &OciRef,
    settings: &RegistrySettings,
    blob_dir: &Path,
    progress: &(dyn Fn(Progress) + Send + Sync),
    built: BuiltFor<'_>,
) -> Result<PulledImage, PullError> {
    let ctx = connect(reference, settings, blob_dir, progress)?;
    let dir = blob_dir.join("sha256");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|source| PullError::Io {
            reference: ctx.reference.clone(),
            digest: "-".to_string(),
            path: dir.clone(),
            source,
        })?;
    remove_stale_partials(&dir);

    let (manifest, manifest_digest, index_digest) = resolve_manifest(&ctx).await?;
    let layer_sizes = check_manifest(&ctx, &manifest, &manifest_digest, settings)?;

    let mut stats = FetchStats::default();
    let config_size = declared_size(&ctx, &manifest.config)?;
    if config_size > MAX_CONFIG_BYTES {
        return Err(PullError::ConfigTooLarge {
            reference: ctx.reference.clone(),
            digest: manifest.config.digest.clone(),
            size: config_size,
            max: MAX_CONFIG_BYTES,
        });
    }
    let skip_layers = built(&manifest_digest);
    let mut wanted = vec![(&manifest.config, config_size)];
    if !skip_layers {
        wanted.extend(manifest.layers.iter().zip(layer_sizes.iter().copied()));
    }
    let to_download = missing_bytes(&ctx, &wanted).await?;
    settings
        .space
        .require(&dir, "downloading the image's blobs", to_download)
        .map_err(|source| match source {
            SpaceError::Statvfs { path, source } => PullError::Io {
                reference: ctx.reference.clone(),
                digest: "-".to_string(),
                path,
                source,
            },
            source @ SpaceError::TooLittle { .. } => PullError::NoSpace {
                reference: ctx.reference.clone(),
                source,
            },
        })?;
    let (config_path, fetched) = fetch_blob(&ctx, &manifest.config, config_size, false).await?;
    count(&mut stats, &fetched);
    let config = read_config(&ctx, &manifest.config.digest, &config_path).await?;
    if skip_layers {
        let layers = manifest
            .layers
            .iter()
            .zip(layer_sizes.iter())
            .map(|(desc, &size)| {
                let path =
                    blob_path(blob_dir, &desc.digest).map_err(|source| PullError::BlobName {
                        reference: ctx.reference.clone(),
                        source,
                    })?;
                Ok(Layer::new(desc, size, path))
            })
            .collect::<Result<_, PullError>>()?;
        return Ok(PulledImage {
            manifest_digest,
            index_digest,
            config_digest: manifest.config.digest.clone(),
            layers,
            layers_verified: false,
            config,
            stats,
        });
    }

    // The futures are built eagerly (they do nothing until polled) so the stream holds
    // no closure over borrowed items, which would make the pull future not `Send`.
    let downloads: Vec<_> = manifest
        .layers
        .iter()
        .zip(layer_sizes.iter())
        .map(|(layer, &size)| fetch_blob(&ctx, layer, size, true))
        .collect();
    let results: Vec<(PathBuf, Fetched)> = futures::stream::iter(downloads)
        .buffered(PARALLEL_DOWNLOADS)
        .try_collect()
        .await?;
    let mut layers = Vec::with_capacity(results.len());
    for ((path, fetched), (desc, &size)) in results
        .into_iter()
        .zip(manifest.layers.iter().zip(layer_sizes.iter()))
    {
        count(&mut stats, &fetched);
        layers.push(Layer::new(desc, size, path));
    }
    Ok(PulledImage {
        manifest_digest,
        index_digest,
        config_digest: manifest.config.digest.clone(),
        layers,
        layers_verified: true,
        config,
        stats,
    })
}

/// The registry client for this reference's registry: HTTP only when listed.
fn connect<'a>(
    reference: &OciRef,
    settings: &RegistrySettings,
    blob_dir: &'a Path,
    progress: &'a (dyn Fn(Progress) + Send + Sync),
) -> Result<Ctx<'a>, PullError> {
    let insecure = settings.is_insecure(reference.registry());
    let credentials = settings.credentials(reference.registry());
    let client = client_for(reference.registry(), insecure, credentials).map_err(|source| {
        PullError::Client {
            reference: reference.to_string(),
            source,
        }
    })?;
    Ok(Ctx {
        client,
        repository: reference.repository().to_string(),
        wanted: reference.manifest_reference().to_string(),
        reference: reference.to_string(),
        scheme: if insecure { "http" } else { "https" },
        blob_dir,
        progress,
    })
}

/// What a kept client is for: the registry, the scheme and the credentials.
type ClientKey = (String, bool, Option<(String, String)>);

/// Registry clients kept at once (a host pulls from a handful).
const MAX_CLIENTS: usize = 32;

/// One client per registry, scheme and credentials for the life of the process:
/// building one loads the TLS roots (about 10 ms here, more than resolving a manifest on
/// loopback), and a kept client also keeps its connections and tokens.
fn client_for(
    registry: &str,
    insecure: bool,
    credentials: Option<(&str, &str)>,
) -> Result<Arc<Registry>, reqwest::Error> {
    static CLIENTS: OnceLock<Mutex<HashMap<ClientKey, Arc<Registry>>>> = OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    let key = (
        registry.to_string(),
        insecure,
        credentials.map(|(u, p)| (u.to_string(), p.to_string())),
    );
    if let Some(client) = clients.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(client);
    }
    let client = Arc::new(Registry::new(
        registry,
        insecure,
        credentials,
        CONNECT_TIMEOUT,
        READ_TIMEOUT,
    )?);
    if let Ok(mut clients) = clients.lock() {
        // Callers name the registries: past the bound, start over rather than keep one
        // client (and its connections) for every registry ever named.
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients.insert(key, client.clone());
    }
    Ok(client)
}

impl Ctx<'_> {
    fn registry_error(&self, what: String, source: RegistryError) -> PullError {
        // A plain-HTTP registry spoken to over HTTPS fails in the TLS handshake, which
        // surfaces as a transport error; say what to do about it.
        let hint = match (&source, self.scheme) {
            (RegistryError::Transport(_), "https") => {
                " (spoken to over HTTPS; a registry that serves plain HTTP must be listed in the `insecure` registry setting)"
            }
            _ => "",
        };
        let mut detail = String::new();
        let mut cause = std::error::Error::source(&source);
        while let Some(c) = cause {
            detail.push_str(": ");
            detail.push_str(&c.to_string());
            cause = c.source();
        }
        PullError::Registry {
            reference: self.reference.clone(),
            what,
            endpoint: self.client.endpoint().to_string(),
            detail,
            hint,
            source: Box::new(source),
        }
    }
}

/// Fetches the manifest the reference names; an index is resolved to its linux/amd64
/// entry. Returns the image manifest, its digest and the index digest if there was one.
async fn resolve_manifest(
    ctx: &Ctx<'_>,
) -> Result<(OciImageManifest, String, Option<String>), PullError> {
    let (manifest, digest) = ctx
        .client
        .manifest(&ctx.repository, &ctx.wanted)
        .await
        .map_err(|e| ctx.registry_error("manifest".to_string(), e))?;
    let index = match manifest {
        OciManifest::Image(image) => return Ok((image, digest, None)),
        OciManifest::ImageIndex(index) => index,
    };
    let Some(chosen) = linux_amd64_resolver(&index.manifests) else {
        let available: Vec<String> = index
            .manifests
            .iter()
            .map(|m| match &m.platform {
                Some(p) => format!("{}/{}", p.os, p.architecture),
                None => format!("{} without a platform", m.digest),
            })
            .collect();
        return Err(PullError::NoPlatform {
            reference: ctx.reference.clone(),
            index: digest,
            available: available.join(", "),
        });
    };
    let (manifest, _) = ctx
        .client
        .manifest(&ctx.repository, &chosen)
        .await
        .map_err(|e| ctx.registry_error(format!("manifest {chosen}"), e))?;
    match manifest {
        OciManifest::Image(image) => Ok((image, chosen, Some(digest))),
        OciManifest::ImageIndex(_) => Err(PullError::NestedIndex {
            reference: ctx.reference.clone(),
            manifest: chosen,
        }),
    }
}

/// Checks the manifest against policy before any blob is fetched; returns the layer
/// sizes in layer order.
fn check_manifest(
    ctx: &Ctx<'_>,
    manifest: &OciImageManifest,
    manifest_digest: &str,
    settings: &RegistrySettings,
) -> Result<Vec<u64>, PullError> {
    let config_type = manifest.config.media_type.as_str();
    if config_type != IMAGE_CONFIG_MEDIA_TYPE && config_type != IMAGE_DOCKER_CONFIG_MEDIA_TYPE {
        return Err(PullError::NotAnImage {
            reference: ctx.reference.clone(),
            manifest: manifest_digest.to_string(),
            media_type: config_type.to_string(),
        });
    }
    sha256_hex(&manifest.config.digest).map_err(|source| PullError::BlobName {
        reference: ctx.reference.clone(),
        source,
    })?;
    let layers = u64::try_from(manifest.layers.len()).unwrap_or(u64::MAX);
    if layers > settings.max_layers {
        return Err(PullError::TooManyLayers {
            reference: ctx.reference.clone(),
            manifest: manifest_digest.to_string(),
            layers,
            max: settings.max_layers,
        });
    }
    let mut sizes = Vec::with_capacity(manifest.layers.len());
    for layer in &manifest.layers {
        sha256_hex(&layer.digest).map_err(|source| PullError::BlobName {
            reference: ctx.reference.clone(),
            source,
        })?;
        if compression_of(&layer.media_type).is_none() {
            return Err(PullError::UnsupportedLayer {
                reference: ctx.reference.clone(),
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        }
        let size = declared_size(ctx, layer)?;
        if size > settings.max_layer_bytes {
            return Err(PullError::LayerTooLarge {
                reference: ctx.reference.clone(),
                digest: layer.digest.clone(),
                size,
                max: settings.max_layer_bytes,
            });
        }
        sizes.push(size);
    }
    let total = sizes
        .iter()
        .fold(0u64, |sum, &size| sum.saturating_add(size));
    if total > settings.max_image_bytes {
        return Err(PullError::ImageTooLarge {
            reference: ctx.reference.clone(),
            manifest: manifest_digest.to_string(),
            total,
            max: settings.max_image_bytes,
        });
    }
    Ok(sizes)
}

/// The bytes of `wanted` blobs (descriptor, declared size) not in the blob directory at
/// their declared size: what the pull will download. A blob present at the right size
/// may still fail its digest check and be fetched again; the reserve covers that.
async fn missing_bytes(ctx: &Ctx<'_>, wanted: &[(&OciDescriptor, u64)]) -> Result<u64, PullError> {
    let mut total = 0u64;
    for (desc, size) in wanted {
        let path = blob_path(ctx.blob_dir, &desc.digest).map_err(|source| PullError::BlobName {
            reference: ctx.reference.clone(),
            source,
        })?;
        let present = tokio::fs::metadata(&path)
            .await
            .is_ok_and(|meta| meta.is_file() && meta.len() == *size);
        if !present {
            total = total.saturating_add(*size);
        }
    }
    Ok(total)
}

fn declared_size(ctx: &Ctx<'_>, desc: &OciDescriptor) -> Result<u64, PullError> {
    u64::try_from(desc.size).map_err(|_| PullError::NegativeSize {
        reference: ctx.reference.clone(),
        digest: desc.digest.clone(),
        size: desc.size,
    })
}

fn count(stats: &mut FetchStats, fetched: &Fetched) {
    match fetched {
        Fetched::Downloaded(bytes) => {
            stats.blobs_downloaded += 1;
            stats.bytes_downloaded += bytes;
        }
        Fetched::Reused => stats.blobs_reused += 1,
    }
}

/// Removes a temporary file unless disarmed, so an error or a dropped future leaves no
/// partial blob behind.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Makes the blob `desc` (of `size` bytes, already checked) present and verified under
/// `ctx.blob_dir`, downloading it unless a verified copy is there.
async fn fetch_blob(
    ctx: &Ctx<'_>,
    desc: &OciDescriptor,
    size: u64,
    report: bool,
) -> Result<(PathBuf, Fetched), PullError> {
    let digest = desc.digest.as_str();
    let name_err = |source| PullError::BlobName {
        reference: ctx.reference.clone(),
        source,
    };
    let path = blob_path(ctx.blob_dir, digest).map_err(name_err)?;
    let hex = sha256_hex(digest).map_err(name_err)?.to_string();
    let io_err = |path: &Path, source| PullError::Io {
        reference: ctx.reference.clone(),
        digest: digest.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let emit = |done: u64, cached: bool| {
        if report {
            (ctx.progress)(Progress {
                digest: digest.to_string(),
                done,
                total: size,
                cached,
            });
        }
    };

    let present = {
        let (check, hex) = (path.clone(), hex.clone());
        tokio::task::spawn_blocking(move || check_present(&check, &hex, size))
            .await
            .map_err(|e| io_err(&path, std::io::Error::other(e)))?
            .map_err(|e| io_err(&path, e))?
    };
    match present {
        Present::Verified => {
            emit(size, true);
            return Ok((path, Fetched::Reused));
        }
        Present::Corrupt => {
            tracing::warn!(blob = %path.display(), "cached blob does not match its digest; downloading it again");
            tokio::fs::remove_file(&path)
                .await
                .map_err(|e| io_err(&path, e))?;
        }
        Present::Missing => {}
    }

    emit(0, false);
    let mut response = ctx
        .client
        .blob(&ctx.repository, digest)
        .await
        .map_err(|e| ctx.registry_error(format!("blob {digest}"), e))?;
    let temp = temp_path(&path);
    let mut guard = TempGuard(Some(temp.clone()));
    let mut file = tokio::fs::File::create(&temp)
        .await
        .map_err(|e| io_err(&temp, e))?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut reported = 0u64;
    loop {
        let chunk = response.chunk().await.map_err(|e| PullError::Transfer {
            reference: ctx.reference.clone(),
            digest: digest.to_string(),
            source: std::io::Error::other(e),
        })?;
        let Some(chunk) = chunk else { break };
        received += chunk.len() as u64;
        if received > size {
            return Err(PullError::TooManyBytes {
                reference: ctx.reference.clone(),
                digest: digest.to_string(),
                declared: size,
            });
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| io_err(&temp, e))?;
        if received - reported >= PROGRESS_STEP {
            reported = received;
            emit(received, false);
        }
    }
    if received != size {
        return Err(PullError::SizeMismatch {
            reference: ctx.reference.clone(),
            digest: digest.to_string(),
            declared: size,
            received,
        });
    }
    let actual = hex::encode(hasher.finalize());
    if actual != hex {
        return Err(PullError::DigestMismatch {
            reference: ctx.reference.clone(),
            digest: digest.to_string(),
            actual,
        });
    }
    // Durable before it gets the name that means "verified".
    file.sync_all().await.map_err(|e| io_err(&temp, e))?;
    drop(file);
    tokio::fs::rename(&temp, &path)
        .await
        .map_err(|e| io_err(&path, e))?;
    guard.0 = None;
    if reported != received || received == 0 {
        emit(received, false);
    }
    Ok((path, Fetched::Downloaded(received)))
}

async fn read_config(ctx: &Ctx<'_>, digest: &str, path: &Path) -> Result<ImageConfig, PullError> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|source| PullError::Io {
            reference: ctx.reference.clone(),
            digest: digest.to_string(),
            path: path.to_path_buf(),
            source,
        })?;
    let config = ImageConfig::parse(&bytes).map_err(|source| PullError::Config {
        reference: ctx.reference.clone(),
        digest: digest.to_string(),
        source,
    })?;
    let os = config.os.as_deref().unwrap_or("linux");
    let architecture = config.architecture.as_deref().unwrap_or("amd64");
    if os != "linux" || architecture != "amd64" {
        return Err(PullError::WrongPlatform {
            reference: ctx.reference.clone(),
            os: os.to_string(),
            architecture: architecture.to_string(),
        });
    }
    Ok(config)
}

/// Removes temporary files left by pulls of processes that no longer exist (a crash
/// mid-download). Files of live processes, this one included, are left alone: they may
/// be downloads in progress. Best effort: a failure here only leaves litter.
fn remove_stale_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((_, tail)) = name.split_once(".partial-") else {
            continue;
        };
        let Some(pid) = tail.split('-').next() else {
            continue;
        };
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_partials_of_dead_processes_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        // Above the kernel's pid_max (at most 2^22), so no process has it.
        let dead = dir.path().join(".abc.partial-999999999-0");
        let live = dir
            .path()
            .join(format!(".abc.partial-{}-0", std::process::id()));
        let blob = dir.path().join("abc");
        for path in [&dead, &live, &blob] {
            std::fs::write(path, b"x").unwrap();
        }
        remove_stale_partials(dir.path());
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(blob.exists());
    }
}
