//! Step `vmm`: the VMM process, inside the machine's namespace, outliving the daemon.
//!
//! Acquire is idempotent: the driver adopts a running process of this machine (found by
//! the marker in its command line) instead of starting a second one, so a crash between
//! starting the VMM and recording it costs nothing. Release stops the recorded process
//! (gracefully, then by force) and any other process carrying the machine's marker and
//! naming its directory, waiting for each to exit; a process already gone is fine.

use super::disk::{BASE_LINK, ROOT_DISK};
use super::vm_config::CONFIG_DISK;
use super::{StepContext, StepError, StepOutput, machine_dir};
use crate::machine::record::{DiskLayout, MachineRecord, VmmRecord};
use crate::vmm::{LaunchSpec, TapSpec, VmmProcess};

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
    let plan = super::network::leased_plan(cx, rec, "vmm")?;
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
    let process = cx
        .vmm()
        .launch(&spec)
        .await
        .map_err(|e| StepError::Retry(e.to_string()))?;
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

/// Stops the VMM.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    if let Some(record) = &rec.resources.vmm {
        cx.vmm()
            .stop(&process_of(record), cx.stop_grace())
            .await
            .map_err(|e| StepError::Retry(e.to_string()))?;
    }
    // A process started but never recorded (a crash between the two) carries the marker;
    // it is waited for, so the network and directory released next are not in use.
    crate::vmm::marked::kill_unrecorded(cx.vmm().name_prefix(), &rec.id, &machine_dir(cx, rec))
        .await
        .map_err(StepError::Retry)
}
