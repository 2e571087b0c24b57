//! Step `lease`: a /29 block from the durable IP pool.
//!
//! Acquire is idempotent: the pool answers a machine with the block it already holds.
//! Release frees every block the machine holds; freeing nothing is fine.

use super::{StepContext, StepError, StepOutput};
use crate::machine::record::MachineRecord;

/// Leases a block; records the slot and the guest's address.
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<StepOutput, StepError> {
    let slot = cx.lease(&rec.id).await?;
    let plan = cx.net_plan(&rec.id, slot)?;
    Ok(StepOutput::Lease {
        slot,
        guest_ip: plan.guest_addr,
    })
}

/// Frees the machine's block.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    cx.release_lease(&rec.id).await
}
