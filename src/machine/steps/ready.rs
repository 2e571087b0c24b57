//! Step `ready`: the guest is where its record wants it, within the readiness deadline.
//!
//! - An ordinary machine: the guest init said it is ready (the workload runs and listens
//!   on every port the spec declares).
//! - A pool's prepared machine: the guest init said it is idle (booted, network up, no
//!   workload), and the VMM is then paused, so prepared capacity costs no CPU.
//! - A machine claimed from a pool: the VMM is resumed and the workload — composed from
//!   the claimed spec and the image as a cold create's config disk would carry it — goes
//!   to the guest with the host's wall-clock time and fresh entropy; then as an ordinary
//!   machine.
//!
//! Acquire is safe to run any number of times, after a daemon restart too: waits only
//! ask the guest for its state; a pause or a resume of a VMM already so is a no-op; and
//! a guest starts a workload only from `Idle`, so a claim sent again starts nothing
//! twice (a claimed guest that rebooted is idle again and gets it anew). When the guest
//! stays silent past the deadline, or the VMM exits early, the step fails and the run
//! counts a boot attempt. Release has no host effect.

use super::{StepContext, StepError};
use crate::guest::protocol::{Claim, claim_entropy};
use crate::machine::record::MachineRecord;

/// Waits for the guest to be where the record wants it (see the module doc).
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let record = rec
        .resources
        .vmm
        .as_ref()
        .ok_or_else(|| StepError::Retry("ready: no VMM recorded".into()))?;
    let process = super::vmm::process_of(record);
    let failed = |e: crate::vmm::ReadyError| StepError::Retry(format!("ready: {e}"));
    if rec.pool_owner().is_some() {
        // Run again after a crash between the pause and its record, the guest would be
        // paused and could not answer: it is resumed first (a no-op when it runs).
        cx.vmm()
            .resume(&process)
            .await
            .map_err(|e| StepError::Retry(format!("ready: resume: {e}")))?;
        cx.vmm()
            .wait_idle(&process, cx.ready_timeout())
            .await
            .map_err(failed)?;
        cx.vmm()
            .pause(&process)
            .await
            .map_err(|e| StepError::Retry(format!("ready: pause: {e}")))?;
        return Ok(());
    }
    if rec.claimed() {
        cx.vmm()
            .resume(&process)
            .await
            .map_err(|e| StepError::Retry(format!("ready: resume: {e}")))?;
        let workload = super::vm_config::guest_config(cx, rec)?;
        let entropy = claim_entropy()
            .map_err(|e| StepError::Retry(format!("ready: no entropy for the claim: {e}")))?;
        let claim = Claim::from_config(&workload, crate::machine::now_ms(), entropy);
        cx.vmm()
            .claim(&process, &claim, cx.ready_timeout())
            .await
            .map_err(|e| match e {
                crate::vmm::ReadyError::ClaimTooLarge { .. } => {
                    StepError::Permanent(format!("ready: the workload does not fit a claim: {e}"))
                }
                other => failed(other),
            })?;
        return Ok(());
    }
    cx.vmm()
        .wait_ready(&process, cx.ready_timeout())
        .await
        .map_err(failed)?;
    Ok(())
}

/// Nothing to undo.
pub async fn release(_: &impl StepContext, _: &MachineRecord) -> Result<(), StepError> {
    Ok(())
}
