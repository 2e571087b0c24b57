//! The lifecycle steps, one per file. Each file is the whole unit: an idempotent acquire
//! and an idempotent release whose contracts are written on the functions, the host
//! objects it owns (`owned`, named from the machine's id and plan there and nowhere
//! else) and its probe (`probe`: is what a finished acquire made still there?). The steps
//! are declared once, here, in the step catalogue (`catalogue!`): each step's module and
//! its row (its place in the create order, what a stop releases, what it owns...), and
//! what its release forgets on the record (`forget`). The enum, the dispatch and every
//! order derive from it, so a new step is its catalogue row and its file. This module
//! also folds the probes into the run's observation ([`observe`]). A step reaches the
//! host's shared parts (the image cache, the leases, the network, the VMM) only through
//! its [`StepContext`]; its own files (the machine directory) it touches itself. Each
//! step is unit-tested against an in-memory host (`testing`).
//!
//! A failure is typed ([`StepError`]): what failed ([`Cause`]), and its class: `Retry` is
//! transient and is tried again after a backoff; `Permanent` can never succeed for this
//! record (a spec the guest config cannot hold, an image that does not exist) and fails
//! the machine at once, naming the cause.

pub mod context;
pub mod error;
#[cfg(test)]
pub mod testing;

use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use context::{BaseFound, Owned, StepContext};
pub use error::{Cause, StepError};

use super::decide::Observed;
use super::record::{MachineRecord, VmmRecord};
use super::step::{Direction, Mark, ResourceKind, StepInfo, StepSet};

/// Declares the steps: for each, its module (the step's file) and its catalogue row. Rows
/// are in storage order (records keep steps by position: append, never reorder);
/// `create` is the step's place in the create order, from which every other order is
/// derived (`machine::step`). From this one list come the [`Step`] enum, the catalogue
/// and the dispatch to each step's `acquire`, `release`, `owned` and `probe`.
macro_rules! catalogue {
    ($(
        $(#[$doc:meta])*
        $variant:ident => $module:ident {
            create: $create:expr,
            cancellable: $cancellable:expr,
            stop_releases: $stop_releases:expr,
            prepared: $prepared:expr,
            in_place: $in_place:expr,
            needs: [$($need:ident),*],
            owns: [$($kind:ident),*] $(,)?
        }
    ),* $(,)?) => {
        $(pub mod $module;)*

        /// One named step of a machine's run. Each has an idempotent acquire and an
        /// idempotent release (see its module).
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash,
            serde::Serialize, serde::Deserialize,
        )]
        pub enum Step {
            $($(#[$doc])* $variant,)*
        }

        /// Every step's catalogue row, in storage order.
        pub const ROWS: &[StepInfo] = &[$(
            StepInfo {
                step: Step::$variant,
                name: stringify!($module),
                create: $create,
                cancellable: $cancellable,
                stop_releases: $stop_releases,
                prepared: $prepared,
                in_place: $in_place,
                needs: &[$(Step::$need),*],
                owns: &[$(ResourceKind::$kind),*],
            },
        )*];

        /// Runs one step's effect.
        pub async fn run<C: StepContext>(
            step: Step,
            direction: Direction,
            cx: &C,
            rec: &MachineRecord,
        ) -> Result<StepOutput, StepError> {
            match (step, direction) {
                $(
                    (Step::$variant, Direction::Acquire) => {
                        $module::acquire(cx, rec).await.map(IntoOutput::into_output)
                    }
                    (Step::$variant, Direction::Release) => {
                        $module::release(cx, rec).await.map(|()| StepOutput::Nothing)
                    }
                )*
            }
        }

        /// The host objects `step` owns for `rec`, named as its file names them (empty
        /// for a step that owns none, or whose objects are rows of the store: a lease,
        /// a route).
        pub fn owned<C: StepContext>(step: Step, cx: &C, rec: &MachineRecord) -> Vec<Owned> {
            match step {
                $(Step::$variant => $module::owned(cx, rec),)*
            }
        }

        /// What `step`'s finished release forgets on the record (what its acquire
        /// recorded: a base, a lease, a process).
        pub fn forget(step: Step, rec: &mut MachineRecord) {
            match step {
                $(Step::$variant => $module::forget(rec),)*
            }
        }

        /// `step`'s probe: whether what its finished acquire made is still on the host. A
        /// step with nothing of its own to look at (the image cache's base, a store row,
        /// a wait) is present; the VMM's liveness is looked at apart ([`vmm::seen`]), as
        /// its loss is decided apart.
        pub fn present<C: StepContext>(step: Step, cx: &C, rec: &MachineRecord) -> bool {
            match step {
                $(Step::$variant => $module::probe(cx, rec),)*
            }
        }
    };
}

catalogue! {
    /// The image's ext4 base is built and cached (rootfs cache). First: everything after
    /// it is pointless for an image that cannot be built.
    Image => image {
        create: 0, cancellable: true, stop_releases: false, prepared: true, in_place: false,
        needs: [],
        owns: [],
    },
    /// The machine's own disk, under its directory.
    Disk => disk {
        create: 1, cancellable: false, stop_releases: false, prepared: true, in_place: false,
        needs: [Image],
        owns: [MachineDir],
    },
    /// An address block from the durable IP lease pool; before the network, whose
    /// addresses come from it.
    Lease => lease {
        create: 2, cancellable: false, stop_releases: false, prepared: true, in_place: false,
        needs: [],
        owns: [Lease],
    },
    /// Network namespace, veth pair, tap, addresses, routes.
    Network => network {
        create: 3, cancellable: false, stop_releases: false, prepared: true, in_place: false,
        needs: [Lease],
        owns: [Netns, Link],
    },
    /// The config disk the guest init reads at boot.
    VmConfig => vm_config {
        create: 5, cancellable: false, stop_releases: false, prepared: true, in_place: false,
        needs: [Image, Lease],
        owns: [],
    },
    /// The VMM process. Only waits are cancellable: abandoning a step that changes the
    /// host with blocking work (a disk clone, a VMM launch) would let its release run
    /// while that work still creates what the release removes.
    Vmm => vmm {
        create: 7, cancellable: false, stop_releases: true, prepared: true, in_place: false,
        needs: [Image, Disk, Lease, Network, Policy, VmConfig, Cgroup],
        owns: [Vmm],
    },
    /// The guest signalled readiness (a wait: cancellable).
    Ready => ready {
        create: 8, cancellable: true, stop_releases: true, prepared: true, in_place: false,
        needs: [Vmm],
        owns: [],
    },
    /// The machine's route is in the registry. Last: nothing may route to a guest that
    /// is not ready. Only it waits for a claim: nothing routes to a machine nobody asked
    /// for.
    Publish => publish {
        create: 9, cancellable: false, stop_releases: true, prepared: false, in_place: false,
        needs: [Ready],
        owns: [Route],
    },
    /// The machine's packet policy: its nftables chains in the daemon's table. Right
    /// after the network, before anything can send through it; in place (its effect is
    /// independent of the VMM's). A prepared machine runs only hearth's own init, paused:
    /// its policy is written at the claim, with the workload's ports.
    Policy => policy {
        create: 4, cancellable: false, stop_releases: false, prepared: false, in_place: true,
        needs: [Lease],
        owns: [Policy],
    },
    /// The machine's cgroup, which its VMM joins: CPU quota and memory limit. Released
    /// with the VMM that runs in it; in place (limits apply to whatever runs inside, and a
    /// redo moves the running VMM back in).
    Cgroup => cgroup {
        create: 6, cancellable: false, stop_releases: true, prepared: true, in_place: true,
        needs: [],
        owns: [Cgroup],
    },
}

/// What an acquire returns: nothing, or something the record keeps.
pub trait IntoOutput {
    /// As a [`StepOutput`].
    fn into_output(self) -> StepOutput;
}

impl IntoOutput for () {
    fn into_output(self) -> StepOutput {
        StepOutput::Nothing
    }
}

impl IntoOutput for StepOutput {
    fn into_output(self) -> StepOutput {
        self
    }
}

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
        vmm: vmm::seen(cx, rec),
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

/// Makes the machine's directory when it is missing, and returns it. Idempotent. The
/// directory is the `disk` step's (its release removes it whole); `vm_config` makes it too
/// when it runs first.
pub async fn make_machine_dir(
    cx: &impl StepContext,
    rec: &MachineRecord,
) -> Result<PathBuf, StepError> {
    let dir = machine_dir(cx, rec);
    match tokio::fs::create_dir_all(&dir).await {
        Ok(()) => Ok(dir),
        Err(source) => Err(StepError::Retry(Cause::Io {
            action: "create",
            path: dir,
            source,
        })),
    }
}
