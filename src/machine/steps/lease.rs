//! Step `lease`: a /29 block from the durable IP pool.
//!
//! Acquire is idempotent: the pool answers a machine with the block it already holds.
//! The commit that begins a run with this step has usually taken the block already
//! (`decide::takes_lease`), so the acquire finds it with a read. Release frees every block
//! the machine holds; freeing nothing is fine.

use super::{Owned, StepContext, StepError, StepOutput};
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

/// What the step owns by name: nothing (its block is a row of the store).
pub fn owned(_: &impl StepContext, _: &MachineRecord) -> Vec<Owned> {
    Vec::new()
}

/// What a finished release forgets on the record: the slot and the guest's address.
pub fn forget(rec: &mut MachineRecord) {
    rec.resources.lease_slot = None;
    rec.resources.guest_ip = None;
}

/// The probe: a store row, looked at by the audit.
pub fn probe(_: &impl StepContext, _: &MachineRecord) -> bool {
    true
}

/// Frees the machine's block.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    cx.release_lease(&rec.id).await
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ID, check_contract};
    use crate::machine::step::Step;

    #[tokio::test]
    async fn keeps_the_contract_and_holds_one_block() {
        let (host, mut rec) = check_contract(Step::Lease, Some("lease")).await;
        let slot = rec.resources.lease_slot.expect("slot recorded");
        assert_eq!(
            host.leases().into_iter().collect::<Vec<_>>(),
            [(slot, ID.to_string())]
        );
        assert!(rec.resources.guest_ip.is_some());
        host.release(Step::Lease, &mut rec).await.expect("release");
        assert!(host.leases().is_empty());
    }
}
