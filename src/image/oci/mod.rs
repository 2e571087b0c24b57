//! OCI images: references to registries, pulling into a content-addressed blob directory,
//! and reading OCI layout directories, both ending in the same [`PulledImage`].
//!
//! ```text
//! OciRef (host[:port]/repo:tag | @sha256:...)     parse: pure, errors name the part
//!    |  pull (async, registry.rs over reqwest)    https unless the registry is listed insecure;
//!    |                                            manifest, token, error bodies capped
//!    v
//! manifest (index -> linux/amd64) -> layers + config blobs
//!    |  limits (layer count, each layer, their sum) and free space, before any download
//!    |  each blob: reuse <blob_dir>/sha256/<hex> if its digest verifies,
//!    |  else download -> temp name -> verify size + sha256 -> rename
//!    v
//! PulledImage { manifest digest, layers (paths, media types), ImageConfig }
//!
//! layout::open(dir, tag|digest)                   the same PulledImage, paths in the layout
//! ```
//!
//! Architecture invariant: registry HTTP lives in `registry` alone, and every body it
//! reads has a cap (oci-client, whose manifest types are used, reads bodies whole). This
//! module only fetches and verifies blobs: unpacking layers (whiteouts,
//! compression) and building the ext4 base belong to the image store.

mod blobs;
mod config;
pub mod layout;
mod pull;
mod pulled;
mod reference;
mod registry;
mod settings;

pub use blobs::{BlobPathError, blob_path, read_verified};
pub use config::{ConfigError, ImageConfig};
pub use layout::LayoutError;
pub use pull::{MAX_CONFIG_BYTES, PullError, pull, pull_unless_built};
pub use pulled::{BuiltFor, FetchStats, Layer, LayerCompression, Progress, PulledImage};
pub use reference::{OciRef, OciRefError};
pub use registry::{MAX_MANIFEST_BYTES, MAX_TOKEN_BYTES, RegistryError};
pub use settings::{
    DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_LAYER_BYTES, DEFAULT_MAX_LAYERS, RegistrySettings,
};
