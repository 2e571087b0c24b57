//! Step `network`: namespace, veth pair, tap, addresses and routes (see `net`).
//!
//! Acquire is idempotent: whatever exists is kept and whatever is missing is created.
//! Release removes whatever exists by name; names come from the machine id, so it works
//! after a crash at any point of acquire, with or without the lease still recorded.

use std::time::Duration;

use super::StepError;
use crate::actors::services::Services;
use crate::actors::tap_allocator::TapMsg;
use crate::actors::{ask, names};
use crate::machine::record::MachineRecord;
use crate::net::NetPlan;

const TIMEOUT: Duration = Duration::from_secs(30);

/// The machine's network plan. Release works without a lease: only names matter then.
pub fn plan(services: &Services, rec: &MachineRecord) -> Result<NetPlan, StepError> {
    let slot = rec.resources.lease_slot.unwrap_or(0);
    NetPlan::derive(
        &services.config().network.prefix,
        &rec.id,
        *services.pool(),
        slot,
    )
    .map_err(|e| StepError::Failed(format!("network plan: {e}")))
}

/// Creates the machine's network.
pub async fn acquire(services: &Services, rec: &MachineRecord) -> Result<(), StepError> {
    if rec.resources.lease_slot.is_none() {
        return Err(StepError::Failed("network: no lease recorded".into()));
    }
    let plan = plan(services, rec)?;
    ask(
        names::TAP_ALLOCATOR,
        |reply| TapMsg::Ensure { plan, reply },
        TIMEOUT,
    )
    .await??;
    Ok(())
}

/// Removes the machine's network.
pub async fn release(services: &Services, rec: &MachineRecord) -> Result<(), StepError> {
    let plan = plan(services, rec)?;
    ask(
        names::TAP_ALLOCATOR,
        |reply| TapMsg::Remove { plan, reply },
        TIMEOUT,
    )
    .await??;
    Ok(())
}
