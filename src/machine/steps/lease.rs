//! Step `lease`: a /29 block from the durable IP pool.
//!
//! Acquire is idempotent: the pool answers a machine with the block it already holds.
//! Release frees every block the machine holds; freeing nothing is fine.

use std::time::Duration;

use super::{StepError, StepOutput};
use crate::actors::ip_pool::IpPoolMsg;
use crate::actors::services::Services;
use crate::actors::{ask, names};
use crate::machine::record::MachineRecord;
use crate::net::NetPlan;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Leases a block; records the slot and the guest's address.
pub async fn acquire(services: &Services, rec: &MachineRecord) -> Result<StepOutput, StepError> {
    let machine = rec.id.clone();
    let slot = ask(
        names::IP_POOL,
        |reply| IpPoolMsg::Lease { machine, reply },
        TIMEOUT,
    )
    .await??;
    let plan = NetPlan::derive(
        &services.config().network.prefix,
        &rec.id,
        *services.pool(),
        slot,
    )
    .map_err(|e| StepError::Failed(format!("lease: {e}")))?;
    Ok(StepOutput::Lease {
        slot,
        guest_ip: plan.guest_addr,
    })
}

/// Frees the machine's block.
pub async fn release(_: &Services, rec: &MachineRecord) -> Result<(), StepError> {
    let machine = rec.id.clone();
    ask(
        names::IP_POOL,
        |reply| IpPoolMsg::Release { machine, reply },
        TIMEOUT,
    )
    .await??;
    Ok(())
}
