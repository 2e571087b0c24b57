//! Step `vm_config`: the config disk the guest init reads at boot (workload, environment,
//! network, the ports that make it ready), written into the machine directory.
//!
//! Acquire is idempotent: the file is written to a temporary name and renamed, so a rerun
//! replaces it whole. Release deletes it; a missing file is fine.

use super::{StepError, machine_dir};
use crate::actors::services::Services;
use crate::guest::config::{GuestConfig, GuestNetwork, write_config_disk};
use crate::image::ImageRef;
use crate::machine::record::{ImageWorkload, MachineRecord};
use crate::machine::workload::compose;

/// File name of the config disk inside the machine directory.
pub const CONFIG_DISK: &str = "config.disk";

/// What the guest is told.
pub fn guest_config(services: &Services, rec: &MachineRecord) -> Result<GuestConfig, StepError> {
    if rec.resources.lease_slot.is_none() {
        return Err(StepError::Failed("vm_config: no lease recorded".into()));
    }
    let plan = super::network::plan(services, rec)?;
    // The image step records the image's own settings; a record from before that
    // (or an image kind without any) falls back to the kind's built-in defaults.
    let image = match &rec.resources.image_workload {
        Some(w) => w.clone(),
        None => {
            let image =
                ImageRef::parse(&rec.spec.image).map_err(|e| StepError::Failed(e.to_string()))?;
            let defaults = image.defaults();
            ImageWorkload {
                cmd: defaults.command,
                env: defaults.env,
                ..ImageWorkload::default()
            }
        }
    };
    let workload = compose(&image, &rec.spec).map_err(|e| StepError::Failed(e.to_string()))?;
    Ok(GuestConfig {
        machine_id: rec.id.clone(),
        hostname: rec.name.clone(),
        network: Some(GuestNetwork {
            address: plan.guest_addr,
            prefix_len: plan.prefix_len,
            gateway: plan.gateway,
        }),
        command: workload.argv,
        env: workload.env,
        workdir: workload.workdir,
        ports: rec.spec.ports.clone(),
        user: workload.user,
    })
}

/// Writes the config disk.
pub async fn acquire(services: &Services, rec: &MachineRecord) -> Result<(), StepError> {
    let config = guest_config(services, rec)?;
    let path = machine_dir(services, rec).join(CONFIG_DISK);
    tokio::task::spawn_blocking(move || {
        write_config_disk(&path, &config).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| StepError::Failed(format!("vm_config task: {e}")))??;
    Ok(())
}

/// Deletes the config disk.
pub async fn release(services: &Services, rec: &MachineRecord) -> Result<(), StepError> {
    let path = machine_dir(services, rec).join(CONFIG_DISK);
    match tokio::fs::remove_file(&path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StepError::Failed(format!("remove {}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}
