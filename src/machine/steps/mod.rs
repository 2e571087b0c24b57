//! The lifecycle steps, one per file, each with an idempotent acquire and an idempotent
//! release whose contracts are written on the functions. The order is declared once, in
//! `machine::step::CREATE_ORDER`; this module only dispatches.

pub mod disk;
pub mod image;
pub mod lease;
pub mod network;
pub mod publish;
pub mod ready;
pub mod vm_config;
pub mod vmm;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::record::{MachineRecord, VmmRecord};
use super::step::{Direction, Step};
use crate::actors::AskError;
use crate::actors::services::Services;

/// What an acquire found out that the record must keep.
#[derive(Debug, Clone)]
pub enum StepOutput {
    /// Nothing to record.
    Nothing,
    /// The base image the disk is cloned from.
    Base {
        /// Its digest.
        digest: String,
        /// Its file.
        path: PathBuf,
        /// The image's own workload settings, when it carries them.
        workload: Option<crate::machine::record::ImageWorkload>,
    },
    /// The leased block.
    Lease {
        /// The slot.
        slot: u32,
        /// The guest's address in it.
        guest_ip: Ipv4Addr,
    },
    /// The VMM process.
    Vmm(VmmRecord),
}

/// Why a step's effect failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A singleton did not answer.
    #[error(transparent)]
    Ask(#[from] AskError),
    /// The effect failed; the message says what and why.
    #[error("{0}")]
    Failed(String),
}

impl From<String> for StepError {
    fn from(message: String) -> Self {
        StepError::Failed(message)
    }
}

/// Runs one step's effect.
pub async fn run(
    step: Step,
    direction: Direction,
    services: &Services,
    rec: &MachineRecord,
) -> Result<StepOutput, StepError> {
    use Direction::{Acquire, Release};
    let nothing = |r: Result<(), StepError>| r.map(|()| StepOutput::Nothing);
    match (step, direction) {
        (Step::Image, Acquire) => image::acquire(services, rec).await,
        (Step::Image, Release) => nothing(image::release(services, rec).await),
        (Step::Disk, Acquire) => nothing(disk::acquire(services, rec).await),
        (Step::Disk, Release) => nothing(disk::release(services, rec).await),
        (Step::Lease, Acquire) => lease::acquire(services, rec).await,
        (Step::Lease, Release) => nothing(lease::release(services, rec).await),
        (Step::Network, Acquire) => nothing(network::acquire(services, rec).await),
        (Step::Network, Release) => nothing(network::release(services, rec).await),
        (Step::VmConfig, Acquire) => nothing(vm_config::acquire(services, rec).await),
        (Step::VmConfig, Release) => nothing(vm_config::release(services, rec).await),
        (Step::Vmm, Acquire) => vmm::acquire(services, rec).await,
        (Step::Vmm, Release) => nothing(vmm::release(services, rec).await),
        (Step::Ready, Acquire) => nothing(ready::acquire(services, rec).await),
        (Step::Ready, Release) => nothing(ready::release(services, rec).await),
        (Step::Publish, Acquire) => nothing(publish::acquire(services, rec).await),
        (Step::Publish, Release) => nothing(publish::release(services, rec).await),
    }
}

/// Records what an acquire found out.
pub fn apply_output(rec: &mut MachineRecord, output: &StepOutput) {
    match output {
        StepOutput::Nothing => {}
        StepOutput::Base {
            digest,
            path,
            workload,
        } => {
            rec.resources.base_digest = Some(digest.clone());
            rec.resources.base_path = Some(path.clone());
            rec.resources.image_workload = workload.clone();
        }
        StepOutput::Lease { slot, guest_ip } => {
            rec.resources.lease_slot = Some(*slot);
            rec.resources.guest_ip = Some(*guest_ip);
        }
        StepOutput::Vmm(vmm) => rec.resources.vmm = Some(vmm.clone()),
    }
}

/// The machine's directory: disk, config disk, sockets, logs.
pub fn machine_dir(services: &Services, rec: &MachineRecord) -> PathBuf {
    services.config().machine_dir(&rec.id)
}
