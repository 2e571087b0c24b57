//! Step `image`: the machine's image has an ext4 base in the rootfs cache (a registry
//! image is pulled first), and the image's own workload settings are recorded.
//!
//! Acquire is idempotent: the cache answers with the existing base when it is built, and
//! concurrent machines share one build. Release is a no-op on the host: bases are shared
//! between machines and collected by the cache, not by a machine.

use std::time::Duration;

use super::{StepError, StepOutput};
use crate::actors::rootfs_cache::RootfsMsg;
use crate::actors::services::Services;
use crate::actors::{ask, names};
use crate::image::ImageRef;
use crate::machine::record::MachineRecord;

/// Building a base can take a while (unpacking, mkfs).
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// Ensures the base exists; records its digest and path.
pub async fn acquire(_: &Services, rec: &MachineRecord) -> Result<StepOutput, StepError> {
    let image = ImageRef::parse(&rec.spec.image).map_err(|e| StepError::Failed(e.to_string()))?;
    let found = ask(
        names::ROOTFS_CACHE,
        |reply| RootfsMsg::EnsureBase {
            image,
            progress: None,
            reply,
        },
        BUILD_TIMEOUT,
    )
    .await?
    .map_err(|e| StepError::Failed(e.to_string()))?;
    Ok(StepOutput::Base {
        digest: found.base.digest,
        path: found.base.path,
        workload: found.workload,
    })
}

/// Nothing to undo per machine (see the module doc).
pub async fn release(_: &Services, _: &MachineRecord) -> Result<(), StepError> {
    Ok(())
}
