//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/...`, as
//! written by skopeo, umoci or buildkit): the same [`PulledImage`] as a registry pull,
//! with layer paths pointing into the layout. Every blob used is verified (size and
//! sha256), because a layout directory is as untrusted as a registry.

use std::io;
use std::path::{Path, PathBuf};

use oci_client::client::linux_amd64_resolver;
use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    ImageIndexEntry, OCI_IMAGE_INDEX_MEDIA_TYPE, OciDescriptor, OciImageIndex, OciImageManifest,
};
use serde::de::DeserializeOwned;

use super::blobs::{BlobPathError, Present, blob_path, check_present, sha256_hex};
use super::config::{ConfigError, ImageConfig};
use super::pull::MAX_CONFIG_BYTES;
use super::pulled::{BuiltFor, FetchStats, Layer, PulledImage, compression_of};

/// The annotation naming an entry of `index.json` (its tag).
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Largest manifest or index read from a layout: they are parsed whole.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Why a layout directory could not be opened as an image.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file of the layout could not be read.
    #[error("OCI layout: {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The directory has no `oci-layout` file.
    #[error("{} is not an OCI layout (no oci-layout file)", dir.display())]
    NotALayout {
        /// The directory.
        dir: PathBuf,
    },
    /// `imageLayoutVersion` is not 1.x.
    #[error("OCI layout {}: unsupported imageLayoutVersion `{version}` (expected 1.x)", dir.display())]
    Version {
        /// The directory.
        dir: PathBuf,
        /// The version found.
        version: String,
    },
    /// A JSON file or blob of the layout is malformed.
    #[error("OCI layout: {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// No entry of `index.json` has the tag or digest asked for.
    #[error("OCI layout {}: no image `{wanted}` in index.json (tags: {available})", dir.display())]
    NotFound {
        /// The directory.
        dir: PathBuf,
        /// The tag or digest asked for.
        wanted: String,
        /// The tags index.json has, comma separated.
        available: String,
    },
    /// Several entries match and none is linux/amd64.
    #[error("OCI layout {}: `{wanted}` has no linux/amd64 manifest", dir.display())]
    NoPlatform {
        /// The directory.
        dir: PathBuf,
        /// The tag or digest asked for.
        wanted: String,
    },
    /// An index inside an index: not resolved further.
    #[error("OCI layout {}: manifest {digest} chosen from an index is another index", dir.display())]
    NestedIndex {
        /// The directory.
        dir: PathBuf,
        /// The nested index digest.
        digest: String,
    },
    /// The manifest describes an artifact that is not a container image.
    #[error("OCI layout {}: manifest {digest} is not a container image (config media type `{media_type}`)", dir.display())]
    NotAnImage {
        /// The directory.
        dir: PathBuf,
        /// The manifest digest.
        digest: String,
        /// The config descriptor's media type.
        media_type: String,
    },
    /// The image's config says it is for another platform.
    #[error("OCI layout {}: the image is for {os}/{architecture}, not linux/amd64", dir.display())]
    WrongPlatform {
        /// The directory.
        dir: PathBuf,
        /// The config's `os`.
        os: String,
        /// The config's `architecture`.
        architecture: String,
    },
    /// A layer whose media type hearth cannot unpack.
    #[error("OCI layout {}: layer {digest} has media type `{media_type}`, which hearth cannot unpack", dir.display())]
    UnsupportedLayer {
        /// The directory.
        dir: PathBuf,
        /// The layer digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// A descriptor whose digest is not sha256.
    #[error("OCI layout {}: {source}", dir.display())]
    BlobName {
        /// The directory.
        dir: PathBuf,
        /// The bad digest.
        source: BlobPathError,
    },
    /// A descriptor with a negative size, or a manifest or config over its size limit.
    #[error("OCI layout {}: blob {digest} has the unacceptable size {size}", dir.display())]
    BadSize {
        /// The directory.
        dir: PathBuf,
        /// The blob digest.
        digest: String,
        /// The declared (or actual) size.
        size: i64,
    },
    /// A blob named by a manifest is not in `blobs/`.
    #[error("OCI layout: blob {digest} is missing ({})", path.display())]
    BlobMissing {
        /// The blob digest.
        digest: String,
        /// Where it should be.
        path: PathBuf,
    },
    /// A blob's size or sha256 differs from its descriptor.
    #[error("OCI layout: blob {} does not match its digest {digest} or declared size", path.display())]
    BlobCorrupt {
        /// The blob digest.
        digest: String,
        /// The file.
        path: PathBuf,
    },
    /// The config blob could not be read.
    #[error("OCI layout: config blob {}: {source}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: ConfigError,
    },
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutMarker {
    image_layout_version: String,
}

/// Opens the image `tag_or_digest` of the layout at `dir`: a tag is matched against the
/// `org.opencontainers.image.ref.name` annotation of `index.json`; a `sha256:` digest
/// names a manifest or index blob (listed in `index.json` or not). An index is resolved
/// to its linux/amd64 manifest. Blocking (hashes every blob): run it on a blocking
/// thread.
///
/// Idempotent: reads only; nothing in the layout is changed.
pub fn open(dir: &Path, tag_or_digest: &str) -> Result<PulledImage, LayoutError> {
    open_unless_built(dir, tag_or_digest, &|_| false)
}

/// [`open`], except that when `built` says a base exists for the chosen manifest the
/// layers are not hashed (`layers_verified` is false); the manifest and config are.
pub fn open_unless_built(
    dir: &Path,
    tag_or_digest: &str,
    built: BuiltFor<'_>,
) -> Result<PulledImage, LayoutError> {
    let layout = Layout { dir };
    layout.check_marker()?;
    let index_path = dir.join("index.json");
    let index: OciImageIndex = read_json(&index_path, MAX_MANIFEST_BYTES)?;

    let (entry_digest, entry_size, entry_type) = if tag_or_digest.starts_with("sha256:") {
        match index.manifests.iter().find(|m| m.digest == tag_or_digest) {
            Some(m) => (m.digest.clone(), Some(m.size), Some(m.media_type.clone())),
            None => (tag_or_digest.to_string(), None, None),
        }
    } else {
        let matches: Vec<ImageIndexEntry> = index
            .manifests
            .iter()
            .filter(|m| ref_name(m) == Some(tag_or_digest))
            .cloned()
            .collect();
        let chosen = match matches.as_slice() {
            [] => {
                let tags: Vec<&str> = index.manifests.iter().filter_map(ref_name).collect();
                return Err(LayoutError::NotFound {
                    dir: dir.to_path_buf(),
                    wanted: tag_or_digest.to_string(),
                    available: if tags.is_empty() {
                        "none".to_string()
                    } else {
                        tags.join(", ")
                    },
                });
            }
            [one] => one.clone(),
            several => {
                let digest =
                    linux_amd64_resolver(several).ok_or_else(|| LayoutError::NoPlatform {
                        dir: dir.to_path_buf(),
                        wanted: tag_or_digest.to_string(),
                    })?;
                several
                    .iter()
                    .find(|m| m.digest == digest)
                    .cloned()
                    .ok_or_else(|| LayoutError::NoPlatform {
                        dir: dir.to_path_buf(),
                        wanted: tag_or_digest.to_string(),
                    })?
            }
        };
        (chosen.digest, Some(chosen.size), Some(chosen.media_type))
    };

    let bytes = layout.read_blob(&entry_digest, entry_size, MAX_MANIFEST_BYTES)?;
    let is_index = match entry_type.as_deref() {
        Some(t) => t == OCI_IMAGE_INDEX_MEDIA_TYPE || t == IMAGE_MANIFEST_LIST_MEDIA_TYPE,
        None => looks_like_index(&bytes),
    };
    let (manifest_digest, index_digest, manifest_bytes) = if is_index {
        let path = layout.path_of(&entry_digest)?;
        let nested: OciImageIndex = parse_json(&path, &bytes)?;
        let chosen =
            linux_amd64_resolver(&nested.manifests).ok_or_else(|| LayoutError::NoPlatform {
                dir: dir.to_path_buf(),
                wanted: tag_or_digest.to_string(),
            })?;
        let entry = nested.manifests.iter().find(|m| m.digest == chosen);
        if entry.is_some_and(|m| {
            m.media_type == OCI_IMAGE_INDEX_MEDIA_TYPE
                || m.media_type == IMAGE_MANIFEST_LIST_MEDIA_TYPE
        }) {
            return Err(LayoutError::NestedIndex {
                dir: dir.to_path_buf(),
                digest: chosen,
            });
        }
        let bytes = layout.read_blob(&chosen, entry.map(|m| m.size), MAX_MANIFEST_BYTES)?;
        (chosen, Some(entry_digest), bytes)
    } else {
        (entry_digest, None, bytes)
    };
    let manifest_path = layout.path_of(&manifest_digest)?;
    let manifest: OciImageManifest = parse_json(&manifest_path, &manifest_bytes)?;
    let verify = !built(&manifest_digest);
    layout.image(manifest_digest, index_digest, &manifest, verify)
}

fn ref_name(entry: &ImageIndexEntry) -> Option<&str> {
    entry
        .annotations
        .as_ref()
        .and_then(|a| a.get(REF_NAME_ANNOTATION))
        .map(String::as_str)
}

/// For a blob named only by digest: an index has `manifests`, an image manifest has not.
fn looks_like_index(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        manifests: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| p.manifests.is_some())
}

struct Layout<'a> {
    dir: &'a Path,
}

impl Layout<'_> {
    fn check_marker(&self) -> Result<(), LayoutError> {
        let path = self.dir.join("oci-layout");
        if !path.is_file() {
            return Err(LayoutError::NotALayout {
                dir: self.dir.to_path_buf(),
            });
        }
        let marker: LayoutMarker = read_json(&path, 64 << 10)?;
        if !marker.image_layout_version.starts_with("1.") {
            return Err(LayoutError::Version {
                dir: self.dir.to_path_buf(),
                version: marker.image_layout_version,
            });
        }
        Ok(())
    }

    fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    fn path_of(&self, digest: &str) -> Result<PathBuf, LayoutError> {
        blob_path(&self.blobs_dir(), digest).map_err(|source| LayoutError::BlobName {
            dir: self.dir.to_path_buf(),
            source,
        })
    }

    fn bad_size(&self, digest: &str, size: i64) -> LayoutError {
        LayoutError::BadSize {
            dir: self.dir.to_path_buf(),
            digest: digest.to_string(),
            size,
        }
    }

    /// Reads a small blob whole and verifies it (size when known, sha256 always).
    fn read_blob(&self, digest: &str, size: Option<i64>, max: u64) -> Result<Vec<u8>, LayoutError> {
        let path = self.path_of(digest)?;
        let hex = sha256_hex(digest).map_err(|source| LayoutError::BlobName {
            dir: self.dir.to_path_buf(),
            source,
        })?;
        let len = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayoutError::BlobMissing {
                    digest: digest.to_string(),
                    path,
                });
            }
            Err(source) => return Err(LayoutError::Io { path, source }),
        };
        if len > max {
            return Err(self.bad_size(digest, i64::try_from(len).unwrap_or(i64::MAX)));
        }
        let bytes = std::fs::read(&path).map_err(|source| LayoutError::Io {
            path: path.clone(),
            source,
        })?;
        use sha2::Digest as _;
        let actual = hex::encode(sha2::Sha256::digest(&bytes));
        let size_ok = size.is_none_or(|s| u64::try_from(s).is_ok_and(|s| s == len));
        if actual != hex || !size_ok {
            return Err(LayoutError::BlobCorrupt {
                digest: digest.to_string(),
                path,
            });
        }
        Ok(bytes)
    }

    /// Verifies a large blob in place by streaming it through sha256.
    fn verify_blob(&self, desc: &OciDescriptor) -> Result<(PathBuf, u64), LayoutError> {
        let path = self.path_of(&desc.digest)?;
        let hex = sha256_hex(&desc.digest).map_err(|source| LayoutError::BlobName {
            dir: self.dir.to_path_buf(),
            source,
        })?;
        let size = u64::try_from(desc.size).map_err(|_| self.bad_size(&desc.digest, desc.size))?;
        match check_present(&path, hex, size) {
            Ok(Present::Verified) => Ok((path, size)),
            Ok(Present::Missing) => Err(LayoutError::BlobMissing {
                digest: desc.digest.clone(),
                path,
            }),
            Ok(Present::Corrupt) => Err(LayoutError::BlobCorrupt {
                digest: desc.digest.clone(),
                path,
            }),
            Err(source) => Err(LayoutError::Io { path, source }),
        }
    }

    fn image(
        &self,
        manifest_digest: String,
        index_digest: Option<String>,
        manifest: &OciImageManifest,
        verify: bool,
    ) -> Result<PulledImage, LayoutError> {
        let config_type = manifest.config.media_type.as_str();
        if config_type != IMAGE_CONFIG_MEDIA_TYPE && config_type != IMAGE_DOCKER_CONFIG_MEDIA_TYPE {
            return Err(LayoutError::NotAnImage {
                dir: self.dir.to_path_buf(),
                digest: manifest_digest,
                media_type: config_type.to_string(),
            });
        }
        // Check every layer's type before hashing anything large.
        for layer in &manifest.layers {
            if compression_of(&layer.media_type).is_none() {
                return Err(LayoutError::UnsupportedLayer {
                    dir: self.dir.to_path_buf(),
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                });
            }
        }
        let config_bytes = self.read_blob(
            &manifest.config.digest,
            Some(manifest.config.size),
            MAX_CONFIG_BYTES,
        )?;
        let config_path = self.path_of(&manifest.config.digest)?;
        let config = ImageConfig::parse(&config_bytes).map_err(|source| LayoutError::Config {
            path: config_path,
            source,
        })?;
        let os = config.os.as_deref().unwrap_or("linux");
        let architecture = config.architecture.as_deref().unwrap_or("amd64");
        if os != "linux" || architecture != "amd64" {
            return Err(LayoutError::WrongPlatform {
                dir: self.dir.to_path_buf(),
                os: os.to_string(),
                architecture: architecture.to_string(),
            });
        }
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for desc in &manifest.layers {
            let (path, size) = if verify {
                self.verify_blob(desc)?
            } else {
                let size =
                    u64::try_from(desc.size).map_err(|_| self.bad_size(&desc.digest, desc.size))?;
                (self.path_of(&desc.digest)?, size)
            };
            layers.push(Layer::new(desc, size, path));
        }
        Ok(PulledImage {
            manifest_digest,
            index_digest,
            config_digest: manifest.config.digest.clone(),
            stats: FetchStats {
                blobs_reused: layers.len() + 1,
                ..FetchStats::default()
            },
            layers,
            layers_verified: verify,
            config,
        })
    }
}

fn read_json<T: DeserializeOwned>(path: &Path, max: u64) -> Result<T, LayoutError> {
    let io_err = |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io_err)?.len();
    if len > max {
        return Err(io_err(io::Error::other(format!(
            "{len} bytes, more than the {max} accepted"
        ))));
    }
    let bytes = std::fs::read(path).map_err(io_err)?;
    parse_json(path, &bytes)
}

fn parse_json<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, LayoutError> {
    serde_json::from_slice(bytes).map_err(|source| LayoutError::Json {
        path: path.to_path_buf(),
        source,
    })
}
