//! Step `network`: namespace, veth pair, tap, addresses and routes (see `net`).
//!
//! Acquire is idempotent: whatever exists is kept and whatever is missing is created.
//! Release removes whatever exists by name; names come from the machine id, so it works
//! after a crash at any point of acquire, with or without the lease still recorded.

use super::{Cause, Owned, StepContext, StepError};
use crate::machine::record::MachineRecord;
use crate::machine::step::{ResourceKind, Step};
use crate::net::NetPlan;

/// The machine's network plan. Release works without a lease: only names matter then.
pub fn plan(cx: &impl StepContext, rec: &MachineRecord) -> Result<NetPlan, StepError> {
    cx.net_plan(&rec.id, rec.resources.lease_slot.unwrap_or(0))
}

/// The plan of `step`, which needs the lease's addresses.
pub fn leased_plan(
    cx: &impl StepContext,
    rec: &MachineRecord,
    step: Step,
) -> Result<NetPlan, StepError> {
    if rec.resources.lease_slot.is_none() {
        return Err(StepError::Retry(Cause::NotRecorded {
            step,
            what: "lease",
        }));
    }
    plan(cx, rec)
}

/// What the step owns: the namespace and the host end of the veth pair (the tap and
/// the guest end live inside the namespace and go with it).
pub fn owned(cx: &impl StepContext, rec: &MachineRecord) -> Vec<Owned> {
    match plan(cx, rec) {
        Ok(plan) => vec![
            Owned::new(ResourceKind::Netns, plan.netns),
            Owned::new(ResourceKind::Link, plan.host_veth),
        ],
        Err(_) => Vec::new(),
    }
}

/// What a finished release forgets on the record: nothing (the step records nothing).
pub fn forget(_: &mut MachineRecord) {}

/// The probe: the namespace and the host link exist (two stats).
pub fn probe(cx: &impl StepContext, rec: &MachineRecord) -> bool {
    super::all_exist(cx, &owned(cx, rec))
}

/// Creates the machine's network.
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    cx.ensure_network(leased_plan(cx, rec, Step::Network)?).await
}

/// Removes the machine's network.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    cx.remove_network(plan(cx, rec)?).await
}

#[cfg(test)]
mod tests {
    use super::super::testing::{FakeHost, check_contract};
    use crate::machine::step::Step;

    #[tokio::test]
    async fn keeps_the_contract_and_a_lost_link_is_seen() {
        let (host, rec) = check_contract(Step::Network, Some("ensure_network")).await;
        let owned = super::owned(&host, &rec);
        assert_eq!(owned.len(), 2, "{owned:?}");
        host.lose(&owned[1]);
        assert!(!super::probe(&host, &rec));
    }

    #[tokio::test]
    async fn acquire_wants_a_lease_and_release_does_not() {
        let host = FakeHost::new();
        let rec = host.record();
        let err = super::acquire(&host, &rec).await.unwrap_err();
        assert!(err.to_string().contains("no lease"), "{err}");
        super::release(&host, &rec)
            .await
            .expect("release without a lease");
    }
}
