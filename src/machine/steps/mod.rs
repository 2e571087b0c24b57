//! The lifecycle steps, one per file, each with an idempotent acquire and an idempotent
//! release whose contracts are written on the functions. The order is declared once, in
//! the step catalogue (`machine::step::CATALOGUE`); this module only dispatches. A step
//! reaches the host and the singletons only through its [`StepContext`].
//!
//! A failure is typed ([`StepError`]): `Retry` is transient and is tried again after a
//! backoff; `Permanent` can never succeed for this record (a spec the guest config cannot
//! hold, an image that does not exist) and fails the machine at once, naming the cause.

pub mod cgroup;
pub mod context;
pub mod disk;
pub mod image;
pub mod lease;
pub mod network;
pub mod policy;
pub mod publish;
pub mod ready;
pub mod vm_config;
pub mod vmm;

use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use context::{BaseFound, StepContext};

use super::record::{MachineRecord, VmmRecord};
use super::step::{Direction, Step};

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

/// Why a step's effect failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Transient (a singleton restarting, the host busy, a registry unreachable): the run
    /// tries again after a backoff, a bounded number of times.
    #[error("{0}")]
    Retry(String),
    /// Can never succeed for this record: the machine fails at once, naming the cause.
    #[error("{0}")]
    Permanent(String),
}

impl StepError {
    /// True when trying again cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, StepError::Permanent(_))
    }
}

impl From<String> for StepError {
    /// An untyped failure is transient: retrying is the safe default.
    fn from(message: String) -> Self {
        StepError::Retry(message)
    }
}

/// Runs one step's effect.
pub async fn run<C: StepContext>(
    step: Step,
    direction: Direction,
    cx: &C,
    rec: &MachineRecord,
) -> Result<StepOutput, StepError> {
    use Direction::{Acquire, Release};
    let nothing = |r: Result<(), StepError>| r.map(|()| StepOutput::Nothing);
    match (step, direction) {
        (Step::Image, Acquire) => image::acquire(cx, rec).await,
        (Step::Image, Release) => nothing(image::release(cx, rec).await),
        (Step::Disk, Acquire) => nothing(disk::acquire(cx, rec).await),
        (Step::Disk, Release) => nothing(disk::release(cx, rec).await),
        (Step::Lease, Acquire) => lease::acquire(cx, rec).await,
        (Step::Lease, Release) => nothing(lease::release(cx, rec).await),
        (Step::Network, Acquire) => nothing(network::acquire(cx, rec).await),
        (Step::Network, Release) => nothing(network::release(cx, rec).await),
        (Step::Policy, Acquire) => nothing(policy::acquire(cx, rec).await),
        (Step::Policy, Release) => nothing(policy::release(cx, rec).await),
        (Step::VmConfig, Acquire) => nothing(vm_config::acquire(cx, rec).await),
        (Step::VmConfig, Release) => nothing(vm_config::release(cx, rec).await),
        (Step::Cgroup, Acquire) => nothing(cgroup::acquire(cx, rec).await),
        (Step::Cgroup, Release) => nothing(cgroup::release(cx, rec).await),
        (Step::Vmm, Acquire) => vmm::acquire(cx, rec).await,
        (Step::Vmm, Release) => nothing(vmm::release(cx, rec).await),
        (Step::Ready, Acquire) => nothing(ready::acquire(cx, rec).await),
        (Step::Ready, Release) => nothing(ready::release(cx, rec).await),
        (Step::Publish, Acquire) => nothing(publish::acquire(cx, rec).await),
        (Step::Publish, Release) => nothing(publish::release(cx, rec).await),
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
pub fn machine_dir(cx: &impl StepContext, rec: &MachineRecord) -> PathBuf {
    cx.machine_dir(&rec.id)
}
