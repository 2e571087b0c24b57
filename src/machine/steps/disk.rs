//! Step `disk`: the machine's directory and its own copy of the base image.
//!
//! Acquire is idempotent: the directory is created if missing, and the clone keeps an
//! existing complete disk (it writes a temporary file and renames it). Release removes
//! the whole machine directory (disk, config disk, sockets, logs); a missing directory is
//! fine, so it works whether or not acquire ever ran or finished.

use super::{StepContext, StepError, machine_dir};
use crate::machine::record::MachineRecord;

/// File name of the root disk inside the machine directory.
pub const ROOT_DISK: &str = "rootfs.ext4";

/// Clones the base into the machine directory.
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let dir = machine_dir(cx, rec);
    let base = rec
        .resources
        .base_path
        .clone()
        .ok_or_else(|| StepError::Retry("disk: no base image recorded".into()))?;
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| StepError::Retry(format!("create {}: {e}", dir.display())))?;
    // Grown to the spec's size (resize2fs) when that is larger than the base's.
    let size = (rec.spec.disk_mib > 0).then(|| u64::from(rec.spec.disk_mib) << 20);
    let dest = dir.join(ROOT_DISK);
    blocking(move || crate::image::clone_disk(&base, &dest, size).map(|_| ())).await
}

/// Removes the machine directory.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let dir = machine_dir(cx, rec);
    let disk = dir.join(ROOT_DISK);
    blocking(move || crate::image::remove_disk(&disk)).await?;
    match tokio::fs::remove_dir_all(&dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StepError::Retry(format!("remove {}: {e}", dir.display())))
        }
        _ => Ok(()),
    }
}

/// Runs a disk operation on a blocking thread (clones and removals of large files).
async fn blocking<E: std::fmt::Display>(
    work: impl FnOnce() -> Result<(), E> + Send + 'static,
) -> Result<(), StepError> {
    tokio::task::spawn_blocking(move || work().map_err(|e| e.to_string()))
        .await
        .map_err(|e| StepError::Retry(format!("disk task: {e}")))?
        .map_err(StepError::Retry)
}
