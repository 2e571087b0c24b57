//! The names of the lifecycle steps, their order, and the marks a record keeps of them.
//!
//! Step names are stable: they are stored (by position, see `store`), shown to the control
//! plane, and used in fail-point names. Append new steps; never reorder or remove one.

use serde::{Deserialize, Serialize};

/// One named step of a machine's run. Each has an idempotent acquire and an idempotent
/// release (see `machine::steps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Step {
    /// The image's ext4 base is built and cached (rootfs cache).
    Image,
    /// The machine's own copy of the base, under its directory.
    Disk,
    /// An address block from the durable IP lease pool.
    Lease,
    /// Network namespace, veth pair, tap, addresses, routes.
    Network,
    /// The config disk the guest init reads at boot.
    VmConfig,
    /// The VMM process.
    Vmm,
    /// The guest signalled readiness.
    Ready,
    /// The machine's route is in the registry.
    Publish,
}

/// The order in which a machine is brought up. Teardown runs the reverse. Image first
/// because everything after it is pointless for an image that cannot be built; the lease
/// before the network because the network's addresses come from it; publish last because
/// nothing may route to a guest that is not ready.
pub const CREATE_ORDER: [Step; 8] = [
    Step::Image,
    Step::Disk,
    Step::Lease,
    Step::Network,
    Step::VmConfig,
    Step::Vmm,
    Step::Ready,
    Step::Publish,
];

/// Steps a stop releases; a stopped machine keeps its disk, lease, network and config.
pub const STOP_RELEASES: [Step; 3] = [Step::Publish, Step::Ready, Step::Vmm];

impl Step {
    /// Whether an acquire of this step may be abandoned halfway when the machine is no
    /// longer wanted started. Only the waits are: the image step waits on the rootfs
    /// cache (whose build belongs to the cache and goes on without the machine) and the
    /// ready step waits on the guest. The others change the host with blocking work
    /// that cannot be stopped halfway (a disk clone, a VMM launch); abandoning them would
    /// let their release run while that work still creates what the release removes.
    /// They take milliseconds, so they finish and are then released.
    pub fn cancellable(self) -> bool {
        matches!(self, Step::Image | Step::Ready)
    }

    /// The stable name shown in the API and logs.
    pub fn name(self) -> &'static str {
        match self {
            Step::Image => "image",
            Step::Disk => "disk",
            Step::Lease => "lease",
            Step::Network => "network",
            Step::VmConfig => "vm_config",
            Step::Vmm => "vmm",
            Step::Ready => "ready",
            Step::Publish => "publish",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which way a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// Bring the resource into being.
    Acquire,
    /// Release it.
    Release,
}

impl Direction {
    /// "acquire" or "release".
    pub fn name(self) -> &'static str {
        match self {
            Direction::Acquire => "acquire",
            Direction::Release => "release",
        }
    }
}

/// What the record knows of one step's effect on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Mark {
    /// Never started, or released.
    #[default]
    Untouched,
    /// The effect may have started (recorded before it runs); it may be partial.
    Begun,
    /// The effect finished and is recorded.
    Done,
}
