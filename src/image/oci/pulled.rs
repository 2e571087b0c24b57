//! What a pull or a layout read hands to the image store: verified blobs on disk, in
//! layer order, and the runtime settings the image asks for.

use std::path::PathBuf;

use super::config::ImageConfig;

/// An image whose blobs are all on local disk and verified against their digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// Digest of the image manifest (`sha256:<hex>`) for the chosen platform. This, not
    /// the tag, identifies the content.
    pub manifest_digest: String,
    /// Digest of the image index the manifest was picked from, when the reference named
    /// a multi-platform index.
    pub index_digest: Option<String>,
    /// Digest of the config blob.
    pub config_digest: String,
    /// Layers, bottom first, as they must be applied.
    pub layers: Vec<Layer>,
    /// Whether the layer blobs were fetched and verified. False when the caller said a
    /// base for this manifest is already built: then the layers' paths are where the
    /// blobs would be, unchecked, and must not be unpacked.
    pub layers_verified: bool,
    /// The runtime settings from the config blob.
    pub config: ImageConfig,
    /// What this call downloaded and what it found already present.
    pub stats: FetchStats,
}

/// Whether a base is already built for a manifest digest: then a pull or a layout read
/// skips fetching and verifying the layers, which would be wasted work.
pub type BuiltFor<'a> = &'a (dyn Fn(&str) -> bool + Send + Sync);

/// One layer blob on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// `sha256:<hex>` of the blob as stored (compressed).
    pub digest: String,
    /// The manifest's media type; says how the tar stream is compressed.
    pub media_type: String,
    /// Size of the blob in bytes (verified).
    pub size: u64,
    /// Where the verified blob is.
    pub path: PathBuf,
}

/// How a layer's tar stream is compressed, read from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// A plain tar stream.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// Layer media types hearth can unpack, with their compression. Anything else (foreign
/// layers, artifacts that are not file systems) is refused when the manifest is read.
pub(crate) const LAYER_MEDIA_TYPES: &[(&str, LayerCompression)] = &[
    (
        "application/vnd.oci.image.layer.v1.tar",
        LayerCompression::None,
    ),
    (
        "application/vnd.oci.image.layer.v1.tar+gzip",
        LayerCompression::Gzip,
    ),
    (
        "application/vnd.oci.image.layer.v1.tar+zstd",
        LayerCompression::Zstd,
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar",
        LayerCompression::None,
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        LayerCompression::Gzip,
    ),
];

/// The compression of a layer media type, or `None` when hearth cannot unpack it.
pub(crate) fn compression_of(media_type: &str) -> Option<LayerCompression> {
    LAYER_MEDIA_TYPES
        .iter()
        .find(|(known, _)| *known == media_type)
        .map(|(_, compression)| *compression)
}

impl Layer {
    /// The layer a manifest descriptor names, of `size` bytes, found (or expected) at
    /// `path`.
    pub(crate) fn new(
        desc: &oci_client::manifest::OciDescriptor,
        size: u64,
        path: PathBuf,
    ) -> Layer {
        Layer {
            digest: desc.digest.clone(),
            media_type: desc.media_type.clone(),
            size,
            path,
        }
    }

    /// How this layer is compressed. Pulls and layout reads only return layers with a
    /// known media type, so this is total for them.
    pub fn compression(&self) -> Option<LayerCompression> {
        compression_of(&self.media_type)
    }
}

/// Counters of one pull, for logs and for tests of blob reuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Blobs (layers and config) downloaded by this call.
    pub blobs_downloaded: usize,
    /// Bytes downloaded by this call (blob bodies only, not manifests).
    pub bytes_downloaded: u64,
    /// Blobs that were already in the blob directory and verified.
    pub blobs_reused: usize,
}

/// A progress report for one layer, for a CLI's progress bar. Every layer gets a first
/// event with `done == 0` (or `done == total` and `cached` when it was already present)
/// and a last event with `done == total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The layer's digest.
    pub digest: String,
    /// Bytes of the layer present so far.
    pub done: u64,
    /// The layer's declared size.
    pub total: u64,
    /// The blob was already in the blob directory; nothing is downloaded.
    pub cached: bool,
}
