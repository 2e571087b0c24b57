//! Step `ready`: the guest init said it is ready (the workload runs and listens on every
//! port the spec declares), within the readiness deadline.
//!
//! Acquire only observes (it asks the guest agent), so it is safe to run any number of
//! times, after a daemon restart too; when the guest stays silent past the deadline, or
//! the VMM exits early, the step fails and the run counts a boot attempt. Release has no
//! host effect.

use super::StepError;
use crate::actors::services::Services;
use crate::machine::record::MachineRecord;

/// Waits for the guest's ready message.
pub async fn acquire(services: &Services, rec: &MachineRecord) -> Result<(), StepError> {
    let record = rec
        .resources
        .vmm
        .as_ref()
        .ok_or_else(|| StepError::Failed("ready: no VMM recorded".into()))?;
    services
        .vmm()
        .wait_ready(
            &super::vmm::process_of(record),
            services.config().ready_timeout(),
        )
        .await
        .map_err(|e| StepError::Failed(format!("ready: {e}")))?;
    Ok(())
}

/// Nothing to undo.
pub async fn release(_: &Services, _: &MachineRecord) -> Result<(), StepError> {
    Ok(())
}
