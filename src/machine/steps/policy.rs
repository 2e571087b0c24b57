//! Step `policy`: the machine's packet policy (see `net::policy`): its three chains in
//! the daemon's nftables table and the map elements that lead its host veth's packets
//! into them. Deny by default: the host, other machines and (unless egress is `nat`)
//! the outside are closed to the guest, and only its declared TCP ports are open towards
//! it.
//!
//! Acquire is idempotent: the chains are rewritten whole in one atomic batch, so it also
//! updates the ports and repairs a half-deleted policy. It runs in place (see
//! `StepInfo::in_place`): redoing it never restarts the VMM. Release removes whatever of
//! the machine's chains and elements exists, found by name from the id alone, so it works
//! without a lease and after a crash at any point.

use super::{Owned, StepContext, StepError, network};
use crate::machine::record::MachineRecord;
use crate::machine::step::{ResourceKind, Step};
use crate::net::policy::MachinePolicy;

/// Writes the machine's policy.
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let plan = network::leased_plan(cx, rec, Step::Policy)?;
    cx.ensure_policy(MachinePolicy {
        id: rec.id.clone(),
        host_veth: plan.host_veth,
        guest_ip: plan.guest_addr,
        ports: rec.spec.ports.clone(),
    })
    .await
}

/// What the step owns: its chains in the daemon's table, named by the machine id.
pub fn owned(_: &impl StepContext, rec: &MachineRecord) -> Vec<Owned> {
    vec![Owned::new(ResourceKind::Policy, rec.id.clone())]
}

/// What a finished release forgets on the record: nothing (the step records nothing).
pub fn forget(_: &mut MachineRecord) {}

/// The probe: it exists (one netlink query; a query that fails says present).
pub fn probe(cx: &impl StepContext, rec: &MachineRecord) -> bool {
    super::all_exist(cx, &owned(cx, rec))
}

/// Removes the machine's policy.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    cx.remove_policy(&rec.id).await
}

#[cfg(test)]
mod tests {
    use super::super::testing::check_contract;
    use crate::machine::step::Step;

    #[tokio::test]
    async fn keeps_the_contract_and_a_lost_policy_is_seen() {
        let (host, rec) = check_contract(Step::Policy, Some("ensure_policy")).await;
        host.lose(&super::owned(&host, &rec)[0]);
        assert!(!super::probe(&host, &rec));
    }
}
