//! The builds the RootfsCache runs off its own thread: a local image (demo, directory,
//! archive) hashed and built on a blocking thread; a registry image pulled, then built by
//! manifest digest; an OCI layout read in place, then built the same way. Each reports
//! progress to whoever watches the build and ends in one [`Built`] or an error.

use std::path::PathBuf;
use std::sync::Arc;

use super::{ImageBase, ImageError, PullEvent, RootfsArgs, SourceIdentity, Watchers};
use crate::image::oci::{OciRef, PulledImage};
use crate::image::{Base, ImageRef};

/// A finished build.
#[derive(Debug, Clone)]
pub struct Built {
    /// The image as asked for.
    pub image: ImageRef,
    /// What identified its source file when it was read (single-file local images).
    pub identity: Option<SourceIdentity>,
    /// The base and the image's own settings.
    pub found: ImageBase,
    /// The OCI manifest digest (registry and layout images).
    pub manifest_digest: Option<String>,
    /// Blobs of the blob directory this base was built from (registry images).
    pub blobs: Vec<String>,
    /// The config blob among them.
    pub config_digest: Option<String>,
    /// What was asked of a registry for it.
    pub registry: RegistryUse,
    /// Whether an OCI base was made now (not found cached).
    pub made: bool,
}

/// What a build asked of a registry (the cache's counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryUse {
    /// Nothing: a local image, a layout, or a registry outage served by an earlier base.
    None,
    /// The manifest was resolved and its base found built, no layer fetched: a tag's
    /// freshness check, not a pull.
    Checked,
    /// The layers were fetched (or verified from the blob cache): a pull.
    Pulled,
}

/// The outcome of a build task.
pub type BuildOutcome = Result<Built, ImageError>;

/// Runs the build for `image`; never panics the caller (a panicking blocking task is an
/// error).
pub async fn run(args: Arc<RootfsArgs>, image: ImageRef, watchers: Watchers) -> BuildOutcome {
    match image {
        ImageRef::Oci(reference) => build_registry(args, reference, watchers).await,
        ImageRef::Layout { dir, reference } => build_layout(args, dir, reference, watchers).await,
        local => build_local(args, local, watchers).await,
    }
}

/// A build error; the message names the image once (most causes already do).
fn failed(image: &ImageRef, cause: impl std::fmt::Display) -> ImageError {
    let image = image.to_string();
    let cause = cause.to_string();
    let message = if cause.contains(&image) {
        cause
    } else {
        format!("image {image}: {cause}")
    };
    ImageError::Build { image, message }
}

/// A base store error, classed: a broken limit is refused for good, a full disk may be
/// freed, anything else is a build failure.
fn base_failed(image: &ImageRef, e: crate::image::BaseError) -> ImageError {
    if e.is_not_found() {
        return ImageError::NotFound(e.to_string());
    }
    let over_limit = e.is_over_limit();
    let no_space = e.is_no_space();
    match failed(image, e) {
        ImageError::Build { image, message } if over_limit => {
            ImageError::Refused { image, message }
        }
        ImageError::Build { image, message } if no_space => ImageError::NoSpace { image, message },
        other => other,
    }
}

/// A pull error, classed like [`base_failed`]; a missing image is not found.
fn pull_failed(image: &ImageRef, e: crate::image::oci::PullError) -> ImageError {
    let (over_limit, no_space, missing) = (e.is_over_limit(), e.is_no_space(), e.is_missing());
    match failed(image, e) {
        ImageError::Build { image, message } if over_limit => {
            ImageError::Refused { image, message }
        }
        ImageError::Build { image, message } if no_space => ImageError::NoSpace { image, message },
        ImageError::Build { message, .. } if missing => ImageError::NotFound(message),
        other => other,
    }
}

/// Builds (or finds) the base of a local image on a blocking thread.
async fn build_local(args: Arc<RootfsArgs>, image: ImageRef, watchers: Watchers) -> BuildOutcome {
    watchers.emit(PullEvent::Phase("building ext4".into()));
    let task_image = image.clone();
    tokio::task::spawn_blocking(move || {
        // The identity is taken before hashing: a source changed while it is hashed is
        // seen as changed next time.
        let identity = super::source_identity(&args.bases, &task_image);
        let base = args.bases.ensure_base(&task_image);
        crate::heap::give_back();
        Ok::<_, crate::image::BaseError>((identity, base?))
    })
    .await
    .map_err(|e| failed(&image, format!("base build task: {e}")))?
    .map_err(|e| base_failed(&image, e))
    .map(|(identity, base)| Built {
        image,
        identity,
        found: ImageBase {
            base,
            workload: None,
        },
        manifest_digest: None,
        blobs: Vec::new(),
        config_digest: None,
        registry: RegistryUse::None,
        made: false,
    })
}

/// Pulls a registry image (blobs already in the blob directory are verified, not
/// fetched again) and builds its base unless one exists for its manifest.
async fn build_registry(
    args: Arc<RootfsArgs>,
    reference: OciRef,
    watchers: Watchers,
) -> BuildOutcome {
    let image = ImageRef::Oci(reference.clone());
    watchers.emit(PullEvent::Phase("resolving".into()));
    let progress = {
        let watchers = watchers.clone();
        move |p| watchers.emit(PullEvent::Layer(p))
    };
    // A base already built for the manifest makes fetching and hashing the layers waste.
    let bases = args.bases.clone();
    let built = move |manifest: &str| bases.has_oci_base(manifest);
    let pulled = crate::image::oci::pull_unless_built(
        &reference,
        &args.registry,
        &args.blob_dir,
        &progress,
        &built,
    )
    .await;
    let pulled = match pulled {
        Ok(pulled) => pulled,
        Err(e) if e.is_unreachable() => {
            // A registry outage must not stop machines from images already built here.
            let Some(built) = built_before(&args, &reference) else {
                return Err(failed(&image, e));
            };
            tracing::warn!(image = %reference, error = %e, "registry unreachable; using the base built before");
            watchers.emit(PullEvent::Phase(
                "registry unreachable; using the base built before".into(),
            ));
            return Ok(built);
        }
        Err(e) => return Err(pull_failed(&image, e)),
    };
    let layers_fetched = pulled.layers_verified;
    if !layers_fetched {
        watchers.emit(PullEvent::Phase("base already built".into()));
    }
    let blobs = std::iter::once(pulled.config_digest.clone())
        .chain(pulled.layers.iter().map(|l| l.digest.clone()))
        .collect();
    let config_digest = Some(pulled.config_digest.clone());
    let mut built = build_pulled(&args, image, pulled, watchers).await?;
    built.blobs = blobs;
    built.config_digest = config_digest;
    built.registry = if layers_fetched {
        RegistryUse::Pulled
    } else {
        RegistryUse::Checked
    };
    Ok(built)
}

/// The base this reference was last built as, with the settings from its config blob
/// (verified), when all of it is still here.
fn built_before(args: &RootfsArgs, reference: &OciRef) -> Option<Built> {
    let name = reference.to_string();
    let images = args.services.store().images().ok()?;
    let (digest, entry) = images
        .into_iter()
        .filter(|(_, entry)| entry.names.contains(&name))
        .max_by_key(|(_, entry)| entry.last_used_unix)?;
    let base = args.bases.get(&digest).ok()??;
    let config_digest = entry.config_digest.clone()?;
    let bytes = crate::image::oci::read_verified(
        &args.blob_dir,
        &config_digest,
        crate::image::oci::MAX_CONFIG_BYTES,
    )?;
    let config = crate::image::oci::ImageConfig::parse(&bytes).ok()?;
    Some(Built {
        image: ImageRef::Oci(reference.clone()),
        identity: None,
        found: ImageBase {
            base,
            workload: Some(config.into()),
        },
        manifest_digest: entry.manifest_digest,
        blobs: entry.blobs,
        config_digest: Some(config_digest),
        registry: RegistryUse::None,
        made: false,
    })
}

/// Reads an OCI layout in place (every blob used is verified) and builds its base.
async fn build_layout(
    args: Arc<RootfsArgs>,
    dir: PathBuf,
    reference: String,
    watchers: Watchers,
) -> BuildOutcome {
    let image = ImageRef::Layout {
        dir: dir.clone(),
        reference: reference.clone(),
    };
    watchers.emit(PullEvent::Phase("verifying layout blobs".into()));
    let bases = args.bases.clone();
    let pulled = tokio::task::spawn_blocking(move || {
        crate::image::oci::layout::open_unless_built(&dir, &reference, &|manifest: &str| {
            bases.has_oci_base(manifest)
        })
    })
    .await
    .map_err(|e| failed(&image, format!("layout read task: {e}")))?
    .map_err(|e| failed(&image, e))?;
    if !pulled.layers_verified {
        watchers.emit(PullEvent::Phase("base already built".into()));
    }
    build_pulled(&args, image, pulled, watchers).await
}

/// Builds the base of an image whose blobs are on local disk, on a blocking thread.
async fn build_pulled(
    args: &Arc<RootfsArgs>,
    image: ImageRef,
    pulled: PulledImage,
    watchers: Watchers,
) -> BuildOutcome {
    let name = image.to_string();
    let task_args = args.clone();
    let manifest_digest = pulled.manifest_digest.clone();
    let (base, made, config) = tokio::task::spawn_blocking(move || {
        let phase = |p: String| watchers.emit(PullEvent::Phase(p));
        let base =
            task_args
                .bases
                .ensure_oci_base(&name, &pulled, task_args.max_image_bytes, &phase);
        if matches!(base, Ok((_, true))) {
            // Unpacking held layer buffers and the tree's entries, now free.
            crate::heap::give_back();
        }
        base.map(|(base, made): (Base, bool)| (base, made, pulled.config))
    })
    .await
    .map_err(|e| failed(&image, format!("base build task: {e}")))?
    .map_err(|e| base_failed(&image, e))?;
    Ok(Built {
        image,
        identity: None,
        found: ImageBase {
            base,
            workload: Some(config.into()),
        },
        manifest_digest: Some(manifest_digest),
        blobs: Vec::new(),
        config_digest: None,
        registry: RegistryUse::None,
        made,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::BaseError;
    use crate::image::space::SpaceError;

    #[test]
    fn limits_are_refused_for_good_and_a_full_disk_may_be_retried() {
        let image = ImageRef::Demo;
        let over = BaseError::OverLimit {
            image: "demo".into(),
            message: "more than 10 entries (images.max_entries)".into(),
        };
        let refused = base_failed(&image, over);
        assert!(matches!(refused, ImageError::Refused { .. }), "{refused}");
        assert!(refused.is_permanent());
        assert!(refused.to_string().contains("images.max_entries"));

        let full = BaseError::NoSpace {
            image: "demo".into(),
            source: SpaceError::TooLittle {
                path: "/data/images".into(),
                what: "building the ext4 base",
                free_bytes: 1 << 20,
                needed_bytes: 40 << 20,
                reserve_bytes: 256 << 20,
            },
        };
        let no_space = base_failed(&image, full);
        assert!(matches!(no_space, ImageError::NoSpace { .. }), "{no_space}");
        assert!(!no_space.is_permanent());
        assert!(no_space.to_string().contains("only 1 MiB are free"));

        let other = BaseError::Layer {
            image: "demo".into(),
            message: "layer x: corrupt".into(),
        };
        let build = base_failed(&image, other);
        assert!(matches!(build, ImageError::Build { .. }) && !build.is_permanent());
    }
}
