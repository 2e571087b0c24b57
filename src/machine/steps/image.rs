//! Step `image`: the machine's image has an ext4 base in the rootfs cache (a registry
//! image is pulled first), and the image's own workload settings are recorded.
//!
//! Acquire is idempotent: the cache answers with the existing base when it is built, and
//! concurrent machines share one build. Release is a no-op on the host: bases are shared
//! between machines and collected by the cache, not by a machine.

use super::{Cause, Owned, StepContext, StepError, StepOutput};
use crate::image::ImageRef;
use crate::machine::record::MachineRecord;

/// Ensures the base exists; records its digest and path. A reference that does not parse
/// is permanent (it was checked at admission, so only an older record can have one).
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<StepOutput, StepError> {
    let image =
        ImageRef::parse(&rec.spec.image).map_err(|e| StepError::Permanent(Cause::ImageRef(e)))?;
    let found = cx.ensure_base(image).await?;
    Ok(StepOutput::Base {
        digest: found.digest,
        path: found.path,
        workload: found.workload,
    })
}

/// What the step owns by name: nothing (the base is the image cache's, shared).
pub fn owned(_: &impl StepContext, _: &MachineRecord) -> Vec<Owned> {
    Vec::new()
}

/// What a finished release forgets on the record: the base it recorded.
pub fn forget(rec: &mut MachineRecord) {
    rec.resources.base_digest = None;
    rec.resources.base_path = None;
}

/// The probe: nothing of the machine's own to look at.
pub fn probe(_: &impl StepContext, _: &MachineRecord) -> bool {
    true
}

/// Nothing to undo per machine (see the module doc).
pub async fn release(_: &impl StepContext, _: &MachineRecord) -> Result<(), StepError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::check_contract;
    use crate::machine::step::Step;

    #[tokio::test]
    async fn keeps_the_contract_and_records_the_base_which_a_release_leaves() {
        let (host, mut rec) = check_contract(Step::Image, Some("ensure_base")).await;
        let base = rec.resources.base_path.clone().expect("base recorded");
        assert!(rec.resources.base_digest.is_some());
        host.release(Step::Image, &mut rec).await.expect("release");
        assert!(base.is_file(), "a machine's release took the shared base");
    }
}
