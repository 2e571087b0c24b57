//! Step `publish`: the machine's route in the registry, only once its guest is ready.
//!
//! Acquire is idempotent (an identical route changes nothing). Release withdraws the
//! route; a missing route is fine. It runs first on stop and destroy, so nothing routes
//! to a guest that is going away.

use std::time::Duration;

use super::StepError;
use crate::actors::registry::RegistryMsg;
use crate::actors::services::Services;
use crate::actors::{ask, names};
use crate::machine::record::MachineRecord;
use crate::route::Route;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes the route.
pub async fn acquire(_: &Services, rec: &MachineRecord) -> Result<(), StepError> {
    let ip = rec
        .resources
        .guest_ip
        .ok_or_else(|| StepError::Failed("publish: no address recorded".into()))?;
    let route = Route {
        machine_id: rec.id.clone(),
        name: rec.name.clone(),
        ip,
        ports: rec.spec.ports.clone(),
    };
    ask(
        names::REGISTRY,
        |reply| RegistryMsg::Publish { route, reply },
        TIMEOUT,
    )
    .await??;
    Ok(())
}

/// Withdraws the route.
pub async fn release(_: &Services, rec: &MachineRecord) -> Result<(), StepError> {
    let machine = rec.id.clone();
    ask(
        names::REGISTRY,
        |reply| RegistryMsg::Unpublish { machine, reply },
        TIMEOUT,
    )
    .await??;
    Ok(())
}
