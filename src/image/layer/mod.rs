//! Applying OCI image layers, in order, onto a directory that becomes a root file system.
//!
//! ```text
//! layer blob (tar | tar+gzip | tar+zstd)
//!    |  decompress (flate2 | ruzstd, windows capped)   meter: budget, header cap, diff_id
//!    v
//! tar entries --> whiteout?  .wh.name -> remove lower `name`; .wh..wh..opq -> opaque dir
//!             --> place:     relative, no `..`, never through a symlink, links checked
//!    v
//! root/ (scratch: on any error the caller removes it)
//! ```
//!
//! A layer is a tar archive of changes: entries replace what lower layers had at the same
//! path (a directory over a directory merges), and whiteouts delete from lower layers. The
//! rules that keep every write inside the root are the ones plain root file system
//! archives follow (see `place`), which is why `tarball` unpacks through the same loop.
//! Limits are on the uncompressed stream and on the number of entries, summed over all the
//! layers of one image through a [`LayerBudget`], so a compression bomb stops at the
//! configured size and a flood of tiny files at the configured count, naming the entry it
//! was in. What unpacking keeps in memory per entry (its path, for whiteouts and directory
//! times) is bounded by `place::MAX_PATH`, so the entry limit bounds the memory too.

mod meter;
mod place;
mod unpack;
mod whiteout;
mod zstd;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

#[cfg(test)]
pub(crate) use place::{check_symlink_target, ensure_parent, existing_inside, relative_path};
pub(crate) use unpack::{EntryBudget, Failure, Kind, unpack};

pub(crate) use meter::Meter;

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip (any number of members).
    Gzip,
    /// zstd (any number of frames, skippable frames ignored).
    Zstd,
}

impl Compression {
    /// The compression of a layer media type, or `None` for a media type that is not a
    /// layer this module can apply (a foreign or encrypted layer, or not a layer at all).
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }
}

/// Limits on what the layers of one image may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLimits {
    /// Uncompressed bytes all the layers of one image may hold in total: the tar streams
    /// as they come out of decompression (file contents, headers and padding).
    pub max_bytes: u64,
    /// Entries all the layers of one image may hold in total: every tar entry read
    /// (whiteouts included) and every directory created because an entry's parent was
    /// missing. The tree built therefore never has more files than this.
    pub max_entries: u64,
}

/// The running totals of uncompressed bytes and entries for one image, carried from one
/// layer to the next so the limits hold for the image rather than for each layer.
#[derive(Debug, Clone)]
pub struct LayerBudget {
    limits: LayerLimits,
    used: u64,
    entries: u64,
}

impl LayerBudget {
    /// A budget with nothing used yet.
    pub fn new(limits: LayerLimits) -> LayerBudget {
        LayerBudget {
            limits,
            used: 0,
            entries: 0,
        }
    }

    /// Uncompressed bytes read so far, over every layer applied with this budget.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Entries counted so far, over every layer applied with this budget.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The limits this budget enforces.
    pub fn limits(&self) -> LayerLimits {
        self.limits
    }
}

/// What applying one layer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries read, whiteouts included.
    pub entries: u64,
    /// Bytes written into regular files.
    pub file_bytes: u64,
    /// `.wh.<name>` entries applied.
    pub whiteouts: u64,
    /// `.wh..wh..opq` entries applied.
    pub opaque_dirs: u64,
    /// Length of the uncompressed tar stream.
    pub uncompressed_bytes: u64,
    /// `sha256:<hex>` of the uncompressed tar stream: the image config lists these as
    /// `rootfs.diff_ids`, and the caller should compare.
    pub diff_id: String,
}

/// Why a layer could not be applied. `layer` is the label the caller gave (a digest, a
/// path); entry names are as written in the layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The layer blob could not be opened.
    #[error("layer {layer}: opening {path}: {source}")]
    Open {
        /// The layer.
        layer: String,
        /// The blob on disk.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The layer is corrupt or cut short (or its compressed stream is).
    #[error("layer {layer}: entry `{entry}`: reading the layer: {source}")]
    Read {
        /// The layer.
        layer: String,
        /// The entry being read, or where between entries, in parentheses.
        entry: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An entry would land outside the root, a link would point outside it, or the entry is
    /// malformed in a way that matters (a whiteout naming nothing, oversized headers).
    #[error("layer {layer}: entry `{entry}` refused: {reason}")]
    Refused {
        /// The layer.
        layer: String,
        /// The entry's path in the layer.
        entry: String,
        /// Why.
        reason: String,
    },
    /// An entry of a kind a root file system cannot hold.
    #[error("layer {layer}: entry `{entry}` has an unsupported type ({kind})")]
    Unsupported {
        /// The layer.
        layer: String,
        /// The entry's path in the layer.
        entry: String,
        /// The tar type, as the crate names it.
        kind: String,
    },
    /// Creating an entry on disk failed.
    #[error("layer {layer}: entry `{entry}`: {what} {path}: {source}")]
    Write {
        /// The layer.
        layer: String,
        /// The entry's path in the layer.
        entry: String,
        /// The operation.
        what: &'static str,
        /// The path on disk.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The image's uncompressed bytes went over [`LayerLimits::max_bytes`] while this entry
    /// was being read: a compression bomb, or an image larger than allowed.
    #[error(
        "layer {layer}: entry `{entry}` refused: the image goes over its limit of {limit} uncompressed bytes (images.max_image_mib)"
    )]
    TooLarge {
        /// The layer.
        layer: String,
        /// The entry being read, or where between entries, in parentheses.
        entry: String,
        /// The limit, in bytes.
        limit: u64,
    },
    /// The image's entries went over [`LayerLimits::max_entries`] at this entry: millions
    /// of tiny files, or an image larger than allowed.
    #[error(
        "layer {layer}: entry `{entry}` refused: the image has more than {limit} entries (images.max_entries)"
    )]
    TooManyEntries {
        /// The layer.
        layer: String,
        /// The entry that went over.
        entry: String,
        /// The limit.
        limit: u64,
    },
}

impl LayerError {
    /// Whether the image breaks one of the configured limits ([`LayerLimits`]): it can
    /// never be applied with these settings, however often it is tried.
    pub fn is_over_limit(&self) -> bool {
        match self {
            LayerError::TooLarge { .. } | LayerError::TooManyEntries { .. } => true,
            LayerError::Open { .. }
            | LayerError::Read { .. }
            | LayerError::Refused { .. }
            | LayerError::Unsupported { .. }
            | LayerError::Write { .. } => false,
        }
    }

    fn from_failure(layer: &str, failure: Failure) -> LayerError {
        let layer = layer.to_string();
        match failure {
            Failure::Read { entry, source } => LayerError::Read {
                layer,
                entry,
                source,
            },
            Failure::Refused { entry, reason } => LayerError::Refused {
                layer,
                entry,
                reason,
            },
            Failure::Unsupported { entry, kind } => LayerError::Unsupported { layer, entry, kind },
            Failure::Write {
                entry,
                what,
                path,
                source,
            } => LayerError::Write {
                layer,
                entry,
                what,
                path,
                source,
            },
            Failure::TooLarge { entry, limit } => LayerError::TooLarge {
                layer,
                entry,
                limit,
            },
            Failure::TooManyEntries { entry, limit } => LayerError::TooManyEntries {
                layer,
                entry,
                limit,
            },
        }
    }
}

/// Applies the layer blob at `layer` (labelled `label` in errors) onto `root`, over the
/// layers applied there before it, counting its uncompressed bytes and its entries against
/// `budget`.
/// Layers must be applied in the order the manifest lists them, onto the same root, with
/// the same budget.
///
/// `root` is scratch, owned by the caller: on any error (a refused entry, a corrupt
/// stream, the budget running out) it holds a partial tree, and this function does not
/// undo what it wrote.
///
/// Idempotent: no; applying the same layer twice is harmless for most layers but not all
/// (a whiteout of a path the layer also writes), so a retry starts again from an empty
/// root with a fresh budget. Undo: the caller removes `root` whole (`remove_dir_all`),
/// which works whatever a failed or interrupted apply left, since nothing is ever written
/// outside it.
///
/// Must run as root (owners, device nodes, set-id bits, `security.*` xattrs), on a root
/// no other process writes to meanwhile. Blocking: async callers use `spawn_blocking`.
pub fn apply_layer(
    layer: &Path,
    label: &str,
    compression: Compression,
    root: &Path,
    budget: &mut LayerBudget,
) -> Result<LayerStats, LayerError> {
    let file = File::open(layer).map_err(|source| LayerError::Open {
        layer: label.to_string(),
        path: layer.to_path_buf(),
        source,
    })?;
    apply_layer_from(file, label, compression, root, budget)
}

/// [`apply_layer`] from any reader of the (compressed) layer blob, such as a download
/// being verified as it streams.
pub fn apply_layer_from(
    blob: impl Read,
    label: &str,
    compression: Compression,
    root: &Path,
    budget: &mut LayerBudget,
) -> Result<LayerStats, LayerError> {
    let meter = Meter::new(budget.used, budget.limits.max_bytes);
    let mut entries = EntryBudget::new(budget.entries, budget.limits.max_entries);
    let before = budget.used;
    let reader = BufReader::with_capacity(1 << 20, blob);
    let result = match compression {
        Compression::None => unpack(reader, root, Kind::Layer, &meter, &mut entries),
        Compression::Gzip => unpack(
            flate2::read::MultiGzDecoder::new(reader),
            root,
            Kind::Layer,
            &meter,
            &mut entries,
        ),
        Compression::Zstd => unpack(
            zstd::ZstdReader::new(reader),
            root,
            Kind::Layer,
            &meter,
            &mut entries,
        ),
    };
    budget.used = meter.used();
    budget.entries = entries.used();
    let counts = result.map_err(|failure| LayerError::from_failure(label, failure))?;
    Ok(LayerStats {
        entries: counts.entries,
        file_bytes: counts.file_bytes,
        whiteouts: counts.whiteouts,
        opaque_dirs: counts.opaque_dirs,
        uncompressed_bytes: meter.used() - before,
        diff_id: meter.digest(),
    })
}
