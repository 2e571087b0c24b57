//! Step `vm_config`: the config disk the guest init reads at boot (workload, environment,
//! network, the ports that make it ready), written into the machine directory.
//!
//! Acquire is idempotent: the file is written to a temporary name and renamed, so a rerun
//! replaces it whole. Release deletes it; a missing file is fine.

use super::{StepError, machine_dir};
use crate::actors::services::Services;
use crate::guest::config::{GuestConfig, GuestNetwork, write_config_disk};
use crate::image::ImageRef;
use crate::machine::record::MachineRecord;

/// File name of the config disk inside the machine directory.
pub const CONFIG_DISK: &str = "config.disk";

/// What the guest is told.
pub fn guest_config(services: &Services, rec: &MachineRecord) -> Result<GuestConfig, StepError> {
    if rec.resources.lease_slot.is_none() {
        return Err(StepError::Failed("vm_config: no lease recorded".into()));
    }
    let plan = super::network::plan(services, rec)?;
    let image = ImageRef::parse(&rec.spec.image).map_err(|e| StepError::Failed(e.to_string()))?;
    let defaults = image.defaults();
    let command = if rec.spec.command.is_empty() {
        defaults.command
    } else {
        rec.spec.command.clone()
    };
    if command.is_empty() {
        return Err(StepError::Failed(
            "vm_config: the image has no default command and the spec gives none".into(),
        ));
    }
    let mut env = defaults.env;
    env.retain(|(k, _)| !rec.spec.env.iter().any(|(key, _)| key == k));
    env.extend(rec.spec.env.iter().cloned());
    Ok(GuestConfig {
        machine_id: rec.id.clone(),
        hostname: rec.name.clone(),
        network: Some(GuestNetwork {
            address: plan.guest_addr,
            prefix_len: plan.prefix_len,
            gateway: plan.gateway,
        }),
        command,
        env,
        workdir: None,
        ports: rec.spec.ports.clone(),
        user: None,
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
