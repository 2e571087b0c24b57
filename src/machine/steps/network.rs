//! Step `network`: namespace, veth pair, tap, addresses and routes (see `net`).
//!
//! Acquire is idempotent: whatever exists is kept and whatever is missing is created.
//! Release removes whatever exists by name; names come from the machine id, so it works
//! after a crash at any point of acquire, with or without the lease still recorded.

use super::{StepContext, StepError};
use crate::machine::record::MachineRecord;
use crate::net::NetPlan;

/// The machine's network plan. Release works without a lease: only names matter then.
pub fn plan(cx: &impl StepContext, rec: &MachineRecord) -> Result<NetPlan, StepError> {
    cx.net_plan(&rec.id, rec.resources.lease_slot.unwrap_or(0))
}

/// The plan of a step that needs the lease's addresses.
pub fn leased_plan(
    cx: &impl StepContext,
    rec: &MachineRecord,
    step: &str,
) -> Result<NetPlan, StepError> {
    if rec.resources.lease_slot.is_none() {
        return Err(StepError::Retry(format!("{step}: no lease recorded")));
    }
    plan(cx, rec)
}

/// Creates the machine's network.
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    cx.ensure_network(leased_plan(cx, rec, "network")?).await
}

/// Removes the machine's network.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    cx.remove_network(plan(cx, rec)?).await
}
