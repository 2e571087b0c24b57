//! The lifecycle steps, one per file. Each file is the whole unit: an idempotent acquire
//! and an idempotent release whose contracts are written on the functions, the host
//! objects it owns (`owned`, named from the machine's id and plan there and nowhere
//! else) and its probe (`probe`: is what a finished acquire made still there?). The order
//! is declared once, in the step catalogue (`machine::step::CATALOGUE`); this module only
//! dispatches, and folds the probes into the run's observation ([`observe`]). A step
//! reaches the singletons only through its [`StepContext`]; its own files (the machine
//! directory) it touches itself. Each step is unit-tested against an in-memory host
//! (`testing`).
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
#[cfg(test)]
pub mod testing;
pub mod vm_config;
pub mod vmm;

use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use context::{BaseFound, Owned, StepContext};

use super::decide::Observed;
use super::record::{MachineRecord, VmmRecord};
use super::step::{Direction, Mark, Step, StepSet};

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

/// The host objects `step` owns for `rec` (empty for a step that owns none, or whose
/// objects are rows of the store: a lease, a route).
pub fn owned<C: StepContext>(step: Step, cx: &C, rec: &MachineRecord) -> Vec<Owned> {
    match step {
        Step::Disk => disk::owned(cx, rec),
        Step::Network => network::owned(cx, rec),
        Step::Policy => policy::owned(cx, rec),
        Step::Cgroup => cgroup::owned(cx, rec),
        Step::Image | Step::Lease | Step::VmConfig | Step::Vmm | Step::Ready | Step::Publish => {
            Vec::new()
        }
    }
}

/// `step`'s probe: whether what its finished acquire made is still on the host. A step
/// with nothing of its own to look at (the image cache's base, a store row, a wait) is
/// present; the VMM is looked at apart ([`vmm::probe`]), as its loss is decided apart.
pub fn present<C: StepContext>(step: Step, cx: &C, rec: &MachineRecord) -> bool {
    match step {
        Step::Disk => disk::probe(cx, rec),
        Step::Network => network::probe(cx, rec),
        Step::VmConfig => vm_config::probe(cx, rec),
        Step::Policy => policy::probe(cx, rec),
        Step::Cgroup => cgroup::probe(cx, rec),
        Step::Image | Step::Lease | Step::Vmm | Step::Ready | Step::Publish => true,
    }
}

/// The run's observation: the VMM's liveness, and a fold over the probes of those of
/// `steps` that the record marks `Done` (nothing else is looked for).
pub fn observe<C: StepContext>(
    cx: &C,
    rec: &MachineRecord,
    steps: impl IntoIterator<Item = Step>,
) -> Observed {
    let mut gone = StepSet::EMPTY;
    for step in steps {
        if rec.mark(step) == Mark::Done && !present(step, cx, rec) {
            gone.insert(step);
        }
    }
    Observed {
        vmm: vmm::probe(cx, rec),
        gone,
        now_ms: crate::machine::now_ms(),
    }
}

/// Whether every one of `objects` exists; one the host cannot tell about counts as
/// there (nothing is redone on a guess).
pub fn all_exist<C: StepContext>(cx: &C, objects: &[Owned]) -> bool {
    objects.iter().all(|o| cx.exists(o) != Some(false))
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
