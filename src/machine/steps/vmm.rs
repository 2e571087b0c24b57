//! Step `vmm`: the VMM process.
//!
//! Not in this build yet (see `vm_config`): acquire fails saying so; release has nothing
//! to stop and succeeds.

use super::vm_config::NO_DRIVER;
use super::{StepError, StepOutput};
use crate::actors::services::Services;
use crate::machine::record::MachineRecord;

/// Fails: see the module doc.
pub async fn acquire(_: &Services, _: &MachineRecord) -> Result<StepOutput, StepError> {
    Err(StepError::Failed(format!("vmm: {NO_DRIVER}")))
}

/// Nothing was started, so nothing to stop.
pub async fn release(_: &Services, _: &MachineRecord) -> Result<(), StepError> {
    Ok(())
}
