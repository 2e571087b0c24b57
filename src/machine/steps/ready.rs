//! Step `ready`: the guest init said it is ready (the workload runs and listens on every
//! port the spec declares), within the readiness deadline.
//!
//! Acquire only observes (it asks the guest agent), so it is safe to run any number of
//! times, after a daemon restart too; when the guest stays silent past the deadline, or
//! the VMM exits early, the step fails and the run counts a boot attempt. Release has no
//! host effect.

use super::{StepContext, StepError};
use crate::machine::record::MachineRecord;

/// Waits for the guest's ready message.
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let record = rec
        .resources
        .vmm
        .as_ref()
        .ok_or_else(|| StepError::Retry("ready: no VMM recorded".into()))?;
    cx.vmm()
        .wait_ready(&super::vmm::process_of(record), cx.ready_timeout())
        .await
        .map_err(|e| StepError::Retry(format!("ready: {e}")))?;
    Ok(())
}

/// Nothing to undo.
pub async fn release(_: &impl StepContext, _: &MachineRecord) -> Result<(), StepError> {
    Ok(())
}
