//! Step `disk`: the machine's directory and its root disk, in the layout its record names.
//!
//! - `overlay`: a hard link to the image's base (`base.ext4`, shared read-only by every
//!   machine of the image) and a writable layer of its own (`rootfs.ext4`, `disk_mib`
//!   rounded up to a size class, or [`crate::image::DEFAULT_UPPER_MIB`] MiB: a ready copy
//!   of an empty template). The guest joins them with overlayfs. Constant cost whatever
//!   the image's size.
//! - `copy`: `rootfs.ext4` is a private copy of the base, grown to `disk_mib`.
//!
//! Acquire is idempotent: the directory is created if missing, a link to the right base
//! is kept, and a disk at its final name is complete (each is made under a temporary name
//! and renamed). Release removes the whole machine directory (disks, link, config disk,
//! sockets, logs); a missing directory is fine, so it works whether or not acquire ever
//! ran or finished. Removing the link never touches the base.

use super::{Cause, Owned, StepContext, StepError, machine_dir};
use crate::image::{CloneError, UpperSource};
use crate::machine::record::{DiskLayout, MachineRecord};
use crate::machine::step::{ResourceKind, Step};

/// File name of the machine's writable disk inside its directory: the whole root in the
/// `copy` layout, the overlay's upper layer in the `overlay` layout.
pub const ROOT_DISK: &str = "rootfs.ext4";

/// File name of the link to the shared base (`overlay` layout only).
pub const BASE_LINK: &str = "base.ext4";

/// Makes the machine's disks in its layout.
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let base = rec
        .resources
        .base_path
        .clone()
        .ok_or(StepError::Retry(Cause::NotRecorded {
            step: Step::Disk,
            what: "base image",
        }))?;
    let dir = super::make_machine_dir(cx, rec).await?;
    let dest = dir.join(ROOT_DISK);
    match rec.disk_layout {
        DiskLayout::Overlay => {
            let mib = crate::image::layer_mib(rec.spec.disk_mib);
            let templates = cx.upper_templates();
            let (link, layer) = (dir.join(BASE_LINK), dest);
            let made = {
                let templates = templates.clone();
                run_blocking(move || {
                    crate::image::make_overlay(&base, &link, &layer, &templates, mib)
                })
                .await?
            };
            let source = match made {
                Ok(source) => source,
                // Bases and machine directories on different file systems: no retry helps.
                Err(e) if e.is_cross_device() => {
                    return Err(StepError::Permanent(Cause::OverlayAcrossFileSystems(e)));
                }
                Err(e) => return Err(StepError::Retry(Cause::Overlay(e))),
            };
            // The next machine of this size finds a ready layer; made off this step's path.
            if source != UpperSource::AlreadyPresent {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = crate::image::refill_stock(&templates, mib) {
                        tracing::warn!(error = %e, mib, "writable layer stock not refilled");
                    }
                });
            }
            Ok(())
        }
        DiskLayout::Copy => {
            // Grown to the spec's size (resize2fs) when that is larger than the base's.
            let size = (rec.spec.disk_mib > 0).then(|| u64::from(rec.spec.disk_mib) << 20);
            blocking(move || crate::image::clone_disk(&base, &dest, size).map(|_| ())).await
        }
    }
}

/// What the step owns: the machine directory.
pub fn owned(cx: &impl StepContext, rec: &MachineRecord) -> Vec<Owned> {
    vec![Owned::new(
        ResourceKind::MachineDir,
        machine_dir(cx, rec).display().to_string(),
    )]
}

/// What a finished release forgets on the record: nothing (the step records nothing).
pub fn forget(_: &mut MachineRecord) {}

/// The probe: whether what a finished acquire made is still there (a few stats): the
/// disk, and in the `overlay` layout the link to the base, with the layer not the base
/// itself.
pub fn probe(cx: &impl StepContext, rec: &MachineRecord) -> bool {
    let dir = machine_dir(cx, rec);
    let disk = dir.join(ROOT_DISK);
    match rec.disk_layout {
        DiskLayout::Copy => disk.exists(),
        DiskLayout::Overlay => {
            disk.exists()
                && dir.join(BASE_LINK).exists()
                && !rec
                    .resources
                    .base_path
                    .as_ref()
                    .is_some_and(|base| crate::image::same_file(&disk, base))
        }
    }
}

/// Removes the machine directory.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let dir = machine_dir(cx, rec);
    let disk = dir.join(ROOT_DISK);
    blocking(move || crate::image::remove_disk(&disk)).await?;
    match tokio::fs::remove_dir_all(&dir).await {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
            Err(StepError::Retry(Cause::Io {
                action: "remove",
                path: dir,
                source,
            }))
        }
        _ => Ok(()),
    }
}

/// Runs a disk operation on a blocking thread (clones and removals of large files); its
/// own result is the caller's to classify.
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StepError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|source| {
            StepError::Retry(Cause::Task {
                work: "disk",
                source,
            })
        })
}

/// [`run_blocking`] for a copy or a removal, whose every failure is worth a retry.
async fn blocking(
    work: impl FnOnce() -> Result<(), CloneError> + Send + 'static,
) -> Result<(), StepError> {
    run_blocking(work)
        .await?
        .map_err(|e| StepError::Retry(Cause::Disk(e)))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{FakeHost, check_contract_of};
    use crate::machine::record::DiskLayout;
    use crate::machine::step::Step;
    use crate::machine::steps::StepContext;

    #[tokio::test]
    async fn keeps_the_contract_in_both_layouts_and_a_lost_disk_is_seen() {
        for layout in [DiskLayout::Copy, DiskLayout::Overlay] {
            let (host, rec) =
                check_contract_of(Step::Disk, None, |rec| rec.disk_layout = layout).await;
            let dir = host.machine_dir(&rec.id);
            assert!(dir.join(super::ROOT_DISK).is_file(), "{layout:?}");
            assert_eq!(
                dir.join(super::BASE_LINK).exists(),
                layout == DiskLayout::Overlay
            );
            std::fs::remove_file(dir.join(super::ROOT_DISK)).expect("lose the disk");
            assert!(!super::probe(&host, &rec), "{layout:?}");
        }
    }

    #[tokio::test]
    async fn a_release_after_a_half_acquire_leaves_no_directory() {
        let host = FakeHost::new();
        let mut rec = host.record();
        host.acquire_before(Step::Disk, &mut rec).await;
        // What a crash halfway through leaves: the directory and a partial disk.
        let dir = host.machine_dir(&rec.id);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join(".rootfs.ext4.partial"), b"half").expect("partial");
        assert!(!super::probe(&host, &rec));
        host.release(Step::Disk, &mut rec).await.expect("release");
        assert!(!dir.exists());
    }
}
