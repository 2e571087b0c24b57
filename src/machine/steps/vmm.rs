//! Step `vmm`: the VMM process, inside the machine's namespace, outliving the daemon.
//!
//! Acquire is idempotent: the driver adopts a running process of this machine (found by
//! the marker in its command line) instead of starting a second one, so a crash between
//! starting the VMM and recording it costs nothing. Release stops the recorded process
//! (gracefully, then by force) and any other process carrying the machine's marker and
//! naming its directory, waiting for each to exit; a process already gone is fine.

use super::disk::{BASE_LINK, ROOT_DISK};
use super::vm_config::CONFIG_DISK;
use super::{Owned, StepContext, StepError, StepOutput, machine_dir};
use crate::machine::decide::VmmSeen;
use crate::machine::record::{DiskLayout, MachineRecord, VmmRecord};
use crate::machine::step::Step;
use crate::vmm::{LaunchSpec, Liveness, TapSpec, VmmProcess};

/// The driver's view of a recorded process.
pub fn process_of(record: &VmmRecord) -> VmmProcess {
    VmmProcess {
        driver: record.driver.clone(),
        pid: record.pid,
        start_time: record.start_time,
        boot_id: record.boot_id.clone(),
        control_socket: record.control_socket.clone(),
        agent_socket: record.agent_socket.clone(),
    }
}

/// Starts (or adopts) the VMM.
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<StepOutput, StepError> {
    let kit = cx.kit().await?;
    let plan = super::network::leased_plan(cx, rec, Step::Vmm)?;
    let dir = machine_dir(cx, rec);
    let spec = LaunchSpec {
        machine_id: rec.id.clone(),
        workdir: dir.clone(),
        netns: Some(plan.netns.clone()),
        tap: Some(TapSpec {
            name: plan.tap.clone(),
            mac: plan.guest_mac,
        }),
        vcpus: rec.spec.vcpus,
        memory_mib: u64::from(rec.spec.memory_mib),
        kit,
        root_disk: dir.join(ROOT_DISK),
        base_disk: (rec.disk_layout == DiskLayout::Overlay).then(|| dir.join(BASE_LINK)),
        config_disk: dir.join(CONFIG_DISK),
        confine: cx.vmm_confinement(&rec.id, rec.resources.lease_slot.unwrap_or(0)),
    };
    let process = cx.launch(spec).await?;
    cx.keep_logs(&rec.id, &process);
    Ok(StepOutput::Vmm(VmmRecord {
        driver: process.driver,
        pid: process.pid,
        start_time: process.start_time,
        boot_id: process.boot_id,
        control_socket: process.control_socket,
        agent_socket: process.agent_socket,
        attempt: rec.boot_attempts,
    }))
}

/// What the step owns by name: nothing (a VMM is found by the marker in its command
/// line and its working directory, see `vmm::marked`).
pub fn owned(_: &impl StepContext, _: &MachineRecord) -> Vec<Owned> {
    Vec::new()
}

/// What a finished release forgets on the record: the process.
pub fn forget(rec: &mut MachineRecord) {
    rec.resources.vmm = None;
}

/// The probe: present; the VMM's loss is decided apart, from [`seen`].
pub fn probe(_: &impl StepContext, _: &MachineRecord) -> bool {
    true
}

/// Whether the recorded VMM still runs.
pub fn seen(cx: &impl StepContext, rec: &MachineRecord) -> VmmSeen {
    match &rec.resources.vmm {
        None => VmmSeen::NotRecorded,
        Some(record) => match cx.liveness(&process_of(record)) {
            Liveness::Running => VmmSeen::Running,
            Liveness::Gone => VmmSeen::Gone,
        },
    }
}

/// Stops the VMM.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    if let Some(record) = &rec.resources.vmm {
        cx.stop_vmm(process_of(record)).await?;
    }
    // A process started but never recorded (a crash between the two) carries the marker;
    // it is waited for, so the network and directory released next are not in use.
    cx.kill_unrecorded(&rec.id, machine_dir(cx, rec)).await
}

#[cfg(test)]
mod tests {
    use super::super::testing::{FakeHost, check_contract};
    use crate::machine::decide::VmmSeen;
    use crate::machine::step::Step;

    #[tokio::test]
    async fn keeps_the_contract_with_one_vmm_and_a_half_launch_leaves_none() {
        let (host, mut rec) = check_contract(Step::Vmm, Some("launch")).await;
        let pid = rec.resources.vmm.as_ref().expect("vmm recorded").pid;
        assert_eq!(host.running_vmms(), [(pid, false)]);
        assert_eq!(super::seen(&host, &rec), VmmSeen::Running);
        assert!(host.logs_kept() > 0, "no log keeper for a launched VMM");
        // A second acquire adopts the running VMM.
        host.acquire(Step::Vmm, &mut rec).await.expect("again");
        assert_eq!(rec.resources.vmm.as_ref().map(|v| v.pid), Some(pid));
        host.kill_vmm(pid);
        assert_eq!(super::seen(&host, &rec), VmmSeen::Gone);
        host.release(Step::Vmm, &mut rec)
            .await
            .expect("release of a dead VMM");
        assert!(host.running_vmms().is_empty());
    }

    #[tokio::test]
    async fn a_vmm_started_but_not_recorded_is_ended_by_the_release() {
        let host = FakeHost::new();
        let mut rec = host.record();
        host.acquire_before(Step::Vmm, &mut rec).await;
        host.break_next("launch");
        assert!(host.acquire(Step::Vmm, &mut rec).await.is_err());
        assert!(rec.resources.vmm.is_none());
        assert_eq!(host.running_vmms().len(), 1);
        assert_eq!(super::seen(&host, &rec), VmmSeen::NotRecorded);
        host.release(Step::Vmm, &mut rec).await.expect("release");
        assert!(host.running_vmms().is_empty());
    }
}
