//! Step `cgroup`: the machine's cgroup (see `vmm::cgroup`), with a CPU quota of its
//! vCPUs and a memory limit of its memory plus the VMM's stated overhead. The VMM step
//! starts its process inside it.
//!
//! Acquire is idempotent: what is missing is created and the limits are written again;
//! when the record holds a VMM (the step redone in place after the cgroup was lost, or a
//! machine started by a daemon that had no such step) that process is moved in. Release
//! ends whatever still runs inside (the VMM step is released first, so nothing should)
//! and removes the directories; names come from the id alone, so it works after a crash
//! at any point.

use super::{Owned, StepContext, StepError};
use crate::machine::record::MachineRecord;
use crate::machine::step::ResourceKind;

/// Creates the cgroup and writes its limits.
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let running = rec.resources.vmm.as_ref().map(|v| v.pid);
    cx.ensure_cgroup(&rec.id, rec.spec.vcpus, rec.spec.memory_mib, running)
        .await
}

/// What the step owns: its directory in each hierarchy, named by the machine id.
pub fn owned(_: &impl StepContext, rec: &MachineRecord) -> Vec<Owned> {
    vec![Owned::new(ResourceKind::Cgroup, rec.id.clone())]
}

/// What a finished release forgets on the record: nothing (the step records nothing).
pub fn forget(_: &mut MachineRecord) {}

/// The probe: it exists (a stat per hierarchy).
pub fn probe(cx: &impl StepContext, rec: &MachineRecord) -> bool {
    super::all_exist(cx, &owned(cx, rec))
}

/// Removes the cgroup.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    cx.remove_cgroup(&rec.id).await
}

#[cfg(test)]
mod tests {
    use super::super::testing::check_contract;
    use crate::machine::step::Step;

    #[tokio::test]
    async fn keeps_the_contract_and_a_lost_cgroup_is_seen() {
        let (host, rec) = check_contract(Step::Cgroup, Some("ensure_cgroup")).await;
        host.lose(&super::owned(&host, &rec)[0]);
        assert!(!super::probe(&host, &rec));
    }
}
