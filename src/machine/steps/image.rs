//! Step `image`: the machine's image has an ext4 base in the rootfs cache (a registry
//! image is pulled first), and the image's own workload settings are recorded.
//!
//! Acquire is idempotent: the cache answers with the existing base when it is built, and
//! concurrent machines share one build. Release is a no-op on the host: bases are shared
//! between machines and collected by the cache, not by a machine.

use super::{StepContext, StepError, StepOutput};
use crate::image::ImageRef;
use crate::machine::record::MachineRecord;

/// Ensures the base exists; records its digest and path. A reference that does not parse
/// is permanent (it was checked at admission, so only an older record can have one).
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<StepOutput, StepError> {
    let image =
        ImageRef::parse(&rec.spec.image).map_err(|e| StepError::Permanent(e.to_string()))?;
    let found = cx.ensure_base(image).await?;
    Ok(StepOutput::Base {
        digest: found.digest,
        path: found.path,
        workload: found.workload,
    })
}

/// Nothing to undo per machine (see the module doc).
pub async fn release(_: &impl StepContext, _: &MachineRecord) -> Result<(), StepError> {
    Ok(())
}
