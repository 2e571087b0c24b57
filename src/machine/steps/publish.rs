//! Step `publish`: the machine's route in the registry, only once its guest is ready.
//!
//! Acquire is idempotent (an identical route changes nothing). Release withdraws the
//! route; a missing route is fine. It runs first on stop and destroy, so nothing routes
//! to a guest that is going away.

use super::{Cause, Owned, StepContext, StepError};
use crate::machine::record::MachineRecord;
use crate::machine::step::Step;
use crate::route::Route;

/// Publishes the route.
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let ip = rec
        .resources
        .guest_ip
        .ok_or(StepError::Retry(Cause::NotRecorded {
            step: Step::Publish,
            what: "address",
        }))?;
    cx.publish(Route {
        machine_id: rec.id.clone(),
        name: rec.name.clone(),
        ip,
        ports: rec.spec.ports.clone(),
    })
    .await
}

/// What the step owns by name: nothing (its route is a row of the store).
pub fn owned(_: &impl StepContext, _: &MachineRecord) -> Vec<Owned> {
    Vec::new()
}

/// What a finished release forgets on the record: nothing (the step records nothing).
pub fn forget(_: &mut MachineRecord) {}

/// The probe: a store row, looked at by the audit.
pub fn probe(_: &impl StepContext, _: &MachineRecord) -> bool {
    true
}

/// Withdraws the route.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    cx.unpublish(&rec.id).await
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ID, check_contract};
    use crate::machine::step::Step;

    #[tokio::test]
    async fn keeps_the_contract_and_publishes_one_route() {
        let (host, mut rec) = check_contract(Step::Publish, Some("publish")).await;
        let routes = host.routes();
        assert_eq!(routes.len(), 1);
        assert_eq!(Some(routes[ID].ip), rec.resources.guest_ip);
        host.release(Step::Publish, &mut rec)
            .await
            .expect("release");
        assert!(host.routes().is_empty());
    }
}
