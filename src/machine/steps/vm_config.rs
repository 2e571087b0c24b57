//! Step `vm_config`: the config disk the guest init reads at boot (workload, environment,
//! network, the ports that make it ready), written into the machine directory.
//!
//! Acquire is idempotent: the file is written to a temporary name and renamed, so a rerun
//! replaces it whole. It needs the image's workload and the lease's address, not the
//! disk: it makes the machine directory itself when the disk step has not yet (the
//! directory stays the disk step's, whose release removes it whole). Release deletes it; a missing file is fine. Both act on the name
//! only, never on what a VMM may have put there (see [`crate::vmmdir`]).

use super::{Cause, Owned, StepContext, StepError, machine_dir};
use crate::guest::config::{GuestConfig, GuestNetwork, WriteConfigError, write_config_disk};
use crate::image::ImageRef;
use crate::machine::record::{DiskLayout, ImageWorkload, MachineRecord};
use crate::machine::step::Step;
use crate::machine::workload::compose;

/// File name of the config disk inside the machine directory.
pub const CONFIG_DISK: &str = "config.disk";

/// What the guest is told. A workload the spec and the image cannot make (no command at
/// all) is permanent. A pool's prepared machine gets no workload: its guest boots, sets
/// up its network and waits, idle, for the claim that brings one (its hostname until
/// then is the machine id).
pub fn guest_config(cx: &impl StepContext, rec: &MachineRecord) -> Result<GuestConfig, StepError> {
    let plan = super::network::leased_plan(cx, rec, Step::VmConfig)?;
    let network = Some(GuestNetwork {
        address: plan.guest_addr,
        prefix_len: plan.prefix_len,
        gateway: plan.gateway,
        resolver: cx.guest_resolver(),
    });
    if rec.pool_owner().is_some() {
        return Ok(GuestConfig {
            machine_id: rec.id.clone(),
            hostname: rec.id.clone(),
            network,
            command: Vec::new(),
            env: Vec::new(),
            workdir: None,
            ports: Vec::new(),
            user: None,
            prepared: true,
            overlay_root: rec.disk_layout == DiskLayout::Overlay,
        });
    }
    // The image step records the image's own settings; a record from before that
    // (or an image kind without any) falls back to the kind's built-in defaults.
    let image = match &rec.resources.image_workload {
        Some(w) => w.clone(),
        None => {
            let image = ImageRef::parse(&rec.spec.image)
                .map_err(|e| StepError::Permanent(Cause::ImageRef(e)))?;
            let defaults = image.defaults();
            ImageWorkload {
                cmd: defaults.command,
                env: defaults.env,
                ..ImageWorkload::default()
            }
        }
    };
    let workload =
        compose(&image, &rec.spec).map_err(|e| StepError::Permanent(Cause::Workload(e)))?;
    Ok(GuestConfig {
        machine_id: rec.id.clone(),
        hostname: rec.name.clone(),
        network,
        command: workload.argv,
        env: workload.env,
        workdir: workload.workdir,
        ports: rec.spec.ports.clone(),
        user: workload.user,
        prepared: false,
        overlay_root: rec.disk_layout == DiskLayout::Overlay,
    })
}

/// What the step owns by name: nothing apart (its file lives in the machine directory,
/// which the disk step owns).
pub fn owned(_: &impl StepContext, _: &MachineRecord) -> Vec<Owned> {
    Vec::new()
}

/// What a finished release forgets on the record: nothing (the step records nothing).
pub fn forget(_: &mut MachineRecord) {}

/// The probe: whether the config disk a finished acquire wrote is still there as a
/// regular file (a stat that follows nothing): a VMM that removed or replaced it gets a
/// new one.
pub fn probe(cx: &impl StepContext, rec: &MachineRecord) -> bool {
    crate::vmmdir::VmmDir::open(&machine_dir(cx, rec))
        .and_then(|d| d.kind(CONFIG_DISK))
        .is_ok_and(|kind| kind == Some(rustix::fs::FileType::RegularFile))
}

/// Writes the config disk. A config larger than the disk format holds is permanent: the
/// same spec can never fit.
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let config = guest_config(cx, rec)?;
    // Made here too, so the config is written at the same time as the disk, not after it.
    let path = super::make_machine_dir(cx, rec).await?.join(CONFIG_DISK);
    tokio::task::spawn_blocking(move || {
        write_config_disk(&path, &config).map_err(|e| match e {
            WriteConfigError::TooLarge { .. } => StepError::Permanent(Cause::ConfigTooLarge(e)),
            WriteConfigError::Encode { .. } | WriteConfigError::Io { .. } => {
                StepError::Retry(Cause::GuestConfig(e))
            }
        })
    })
    .await
    .map_err(task)?
}

/// Deletes the config disk.
pub async fn release(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let path = machine_dir(cx, rec).join(CONFIG_DISK);
    // Whatever the VMM left at the name (a link, a directory) goes, nothing it points to.
    let removed = tokio::task::spawn_blocking({
        let path = path.clone();
        move || match crate::vmmdir::VmmDir::parent_of(&path) {
            Ok((dir, name)) => dir.remove(name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(task)?;
    removed.map_err(|source| {
        StepError::Retry(Cause::Io {
            action: "remove",
            path,
            source,
        })
    })
}

/// The step's blocking task ended without an answer.
fn task(source: tokio::task::JoinError) -> StepError {
    StepError::Retry(Cause::Task {
        work: "vm_config",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{FakeHost, check_contract};
    use crate::machine::step::{Mark, Step};
    use crate::machine::steps::StepContext;

    #[tokio::test]
    async fn keeps_the_contract_and_a_replaced_config_disk_is_seen() {
        let (host, mut rec) = check_contract(Step::VmConfig, None).await;
        let path = host.machine_dir(&rec.id).join(super::CONFIG_DISK);
        assert!(path.is_file());
        // A VMM that put a directory at the name gets a new config disk.
        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("plant a directory");
        assert!(!super::probe(&host, &rec));
        host.release(Step::VmConfig, &mut rec)
            .await
            .expect("release");
        assert!(!path.exists());
        host.acquire(Step::VmConfig, &mut rec).await.expect("again");
        assert!(path.is_file() && super::probe(&host, &rec));
    }

    #[tokio::test]
    async fn a_workload_the_config_cannot_hold_is_permanent_and_writes_nothing() {
        let host = FakeHost::new();
        let mut rec = host.record();
        host.acquire_before(Step::VmConfig, &mut rec).await;
        rec.spec.env = (0..2048)
            .map(|i| (format!("K{i}"), "v".repeat(1024)))
            .collect();
        let err = host.acquire(Step::VmConfig, &mut rec).await.unwrap_err();
        assert!(err.is_permanent(), "{err}");
        assert_eq!(rec.mark(Step::VmConfig), Mark::Begun);
        let path = host.machine_dir(&rec.id).join(super::CONFIG_DISK);
        assert!(!path.exists());
        host.release(Step::VmConfig, &mut rec)
            .await
            .expect("release");
    }
}
