//! Step `ready`: the guest said it is ready.
//!
//! Not in this build yet (see `vm_config`): acquire fails saying so; release has no host
//! effect.

use super::StepError;
use super::vm_config::NO_DRIVER;
use crate::actors::services::Services;
use crate::machine::record::MachineRecord;

/// Fails: see the module doc.
pub async fn acquire(_: &Services, _: &MachineRecord) -> Result<(), StepError> {
    Err(StepError::Failed(format!("ready: {NO_DRIVER}")))
}

/// Nothing to undo.
pub async fn release(_: &Services, _: &MachineRecord) -> Result<(), StepError> {
    Ok(())
}
