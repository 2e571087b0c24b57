//! Step `disk`: the machine's directory and its own copy of the base image.
//!
//! Acquire is idempotent: the directory is created if missing, and the clone keeps an
//! existing complete disk (it writes a temporary file and renames it). Release removes
//! the whole machine directory (disk, config disk, sockets, logs); a missing directory is
//! fine, so it works whether or not acquire ever ran or finished.

use super::{StepError, machine_dir};
use crate::actors::rootfs_cache;
use crate::actors::services::Services;
use crate::machine::record::MachineRecord;

/// File name of the root disk inside the machine directory.
pub const ROOT_DISK: &str = "rootfs.ext4";

/// Clones the base into the machine directory.
pub async fn acquire(services: &Services, rec: &MachineRecord) -> Result<(), StepError> {
    let dir = machine_dir(services, rec);
    let base = rec
        .resources
        .base_path
        .clone()
        .ok_or_else(|| StepError::Failed("disk: no base image recorded".into()))?;
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| StepError::Failed(format!("create {}: {e}", dir.display())))?;
    // Grown to the spec's size (resize2fs) when that is larger than the base's.
    let size = (rec.spec.disk_mib > 0).then(|| u64::from(rec.spec.disk_mib) << 20);
    rootfs_cache::clone_disk(base, dir.join(ROOT_DISK), size).await?;
    Ok(())
}

/// Removes the machine directory.
pub async fn release(services: &Services, rec: &MachineRecord) -> Result<(), StepError> {
    let dir = machine_dir(services, rec);
    rootfs_cache::remove_disk(dir.join(ROOT_DISK)).await?;
    match tokio::fs::remove_dir_all(&dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StepError::Failed(format!("remove {}: {e}", dir.display())))
        }
        _ => Ok(()),
    }
}
