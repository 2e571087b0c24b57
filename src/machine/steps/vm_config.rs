//! Step `vm_config`: the config disk the guest init reads at boot.
//!
//! Not in this build yet: the guest kit and guest init land with the VMM driver. Until
//! then the acquire fails with a message that says so, and the run fails the machine
//! and releases everything it acquired (the failure path is exercised for real).
//! Release is a no-op and always succeeds.

use super::StepError;
use crate::actors::services::Services;
use crate::machine::record::MachineRecord;

/// The message of every step that needs the VMM driver.
pub const NO_DRIVER: &str = "this build of hearthd has no VMM driver yet (guest kit, guest init and QEMU driver are not built in)";

/// Fails: see the module doc.
pub async fn acquire(_: &Services, _: &MachineRecord) -> Result<(), StepError> {
    Err(StepError::Failed(format!("vm_config: {NO_DRIVER}")))
}

/// Nothing was written, so nothing to undo.
pub async fn release(_: &Services, _: &MachineRecord) -> Result<(), StepError> {
    Ok(())
}
