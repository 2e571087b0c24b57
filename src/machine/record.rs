//! The durable record of one machine: what was asked, what is marked done, what the
//! machine owns on the host. The store persists it (versioned); the decision reads it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::spec::MachineSpec;
use super::step::{CREATE_ORDER, Direction, Mark, Step};

/// Where the caller wants the machine to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Desired {
    /// Running, ready and published.
    Started,
    /// No VMM; disk, lease and network kept for a fast start.
    Stopped,
    /// Nothing left on the host.
    Destroyed,
    /// Booted with no workload, its guest idle and its VMM paused, owned by a pool until
    /// a create claims it (appended: stored by position).
    Prepared,
}

/// The state the control plane sees (Fly Machines' vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MachineState {
    /// Recorded; the run has not begun.
    Created,
    /// Acquiring steps towards `started`.
    Starting,
    /// Running, ready, published.
    Started,
    /// Releasing the running part.
    Stopping,
    /// No VMM.
    Stopped,
    /// Releasing everything.
    Destroying,
    /// Nothing left on the host; the record stays as a tombstone.
    Destroyed,
    /// Gave up; everything acquired has been (or is being) released.
    Failed,
    /// Prepared capacity: every create step but `publish` done, the guest idle, the VMM
    /// paused (appended: stored by position).
    Prepared,
}

impl MachineState {
    /// Every state, in the order of the enum.
    pub const ALL: [MachineState; 9] = [
        MachineState::Created,
        MachineState::Starting,
        MachineState::Started,
        MachineState::Stopping,
        MachineState::Stopped,
        MachineState::Destroying,
        MachineState::Destroyed,
        MachineState::Failed,
        MachineState::Prepared,
    ];

    /// Lower-case name, as the CLI prints it.
    pub fn name(self) -> &'static str {
        match self {
            MachineState::Created => "created",
            MachineState::Starting => "starting",
            MachineState::Started => "started",
            MachineState::Stopping => "stopping",
            MachineState::Stopped => "stopped",
            MachineState::Destroying => "destroying",
            MachineState::Destroyed => "destroyed",
            MachineState::Failed => "failed",
            MachineState::Prepared => "prepared",
        }
    }
}

/// The VMM process a machine owns, as recorded for re-adoption after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmRecord {
    /// Driver name ("qemu").
    pub driver: String,
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
    /// The host's boot id when the process started.
    pub boot_id: String,
    /// The VMM's control socket.
    pub control_socket: PathBuf,
    /// The guest agent's socket.
    pub agent_socket: PathBuf,
    /// The boot attempt this process belongs to.
    pub attempt: u32,
}

/// What a machine owns on the host beyond what its id names. Host names (network
/// namespace, links, directory) are derived from the id and the config, so they need no
/// field: a step can always find and release them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Digest of the base image the disk was cloned from.
    pub base_digest: Option<String>,
    /// Path of the base image file.
    pub base_path: Option<PathBuf>,
    /// The leased /29 block.
    pub lease_slot: Option<u32>,
    /// The guest's address (from the lease).
    pub guest_ip: Option<Ipv4Addr>,
    /// The VMM process.
    pub vmm: Option<VmmRecord>,
    /// What the image asks the workload to run as (recorded by the `image` step), which
    /// the spec's overrides apply to.
    pub image_workload: Option<ImageWorkload>,
}

/// An image's own workload settings (an OCI image's config; the built-in defaults for
/// the other kinds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageWorkload {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, in the image's order.
    pub env: Vec<(String, String)>,
    /// `WorkingDir`.
    pub working_dir: Option<String>,
    /// `User`.
    pub user: Option<String>,
}

impl From<crate::image::oci::ImageConfig> for ImageWorkload {
    /// The settings of a parsed config blob (its layer and platform fields stay behind).
    fn from(config: crate::image::oci::ImageConfig) -> Self {
        ImageWorkload {
            entrypoint: config.entrypoint,
            cmd: config.cmd,
            env: config.env,
            working_dir: config.working_dir,
            user: config.user,
        }
    }
}

/// A machine's tie to a prepared-capacity pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pooled {
    /// The pool's name (from the config).
    pub pool: String,
    /// False while the pool owns the machine (prepared, or being prepared); true once a
    /// create claimed it. A claimed machine is never returned to a pool.
    pub claimed: bool,
}

/// One run of one step, kept for the control plane ("where did the time go").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTiming {
    /// The step.
    pub step: Step,
    /// Which way.
    pub direction: Direction,
    /// Wall clock at start, ms since the epoch.
    pub started_at_ms: u64,
    /// How long the effect took.
    pub duration_us: u64,
    /// `None` when it succeeded, else the error.
    pub error: Option<String>,
}

/// How many timings a record keeps; older ones are dropped first.
pub const TIMINGS_KEPT: usize = 64;

/// The durable record of one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// hearth's id (see `spec::new_machine_id`).
    pub id: String,
    /// Caller's name, unique among machines not destroyed.
    pub name: String,
    /// Caller's idempotency key for the create.
    pub request_id: String,
    /// What was asked.
    pub spec: MachineSpec,
    /// Where the caller wants it.
    pub desired: Desired,
    /// What the control plane sees.
    pub state: MachineState,
    /// The step in progress, when one is.
    pub current: Option<(Step, Direction)>,
    /// Marks of every step that is not `Untouched`.
    pub marks: BTreeMap<Step, Mark>,
    /// What the machine owns.
    pub resources: Resources,
    /// Failed boots since the last ready guest.
    pub boot_attempts: u32,
    /// Consecutive failures of the current step (reset when any step succeeds).
    pub step_failures: u32,
    /// Why the machine failed; set means the run releases everything and settles `failed`.
    pub failure: Option<String>,
    /// Recent step timings, oldest first.
    pub timings: Vec<StepTiming>,
    /// ms since the epoch.
    pub created_at_ms: u64,
    /// ms since the epoch.
    pub updated_at_ms: u64,
    /// The pool that owns (or owned) the machine. Stored beside the record's V2 shape
    /// (see `store::codec`), hence skipped here.
    #[serde(skip)]
    pub pooled: Option<Pooled>,
    /// When the VMM of a ready guest was lost (ms since the epoch), oldest first, at most
    /// [`CRASHES_KEPT`]: what the restart backoff and give-up are decided from. Stored in
    /// the record's V4 extension (see `store::codec`), hence skipped here.
    #[serde(skip)]
    pub crashes: Vec<u64>,
    /// How the machine's root disk is laid out, fixed when the record is made (a machine
    /// keeps its layout for life). Stored in the record's V5 extension (see
    /// `store::codec`); older records read as [`DiskLayout::Copy`], which is what they
    /// have.
    #[serde(skip)]
    pub disk_layout: DiskLayout,
}

/// How a machine's root disk is made (declared with the image settings that choose it).
pub use crate::image::settings::DiskLayout;

/// How many crash times a record keeps (`guest.max_restarts` is below it).
pub const CRASHES_KEPT: usize = 64;

impl MachineRecord {
    /// A new record, as CreateMachine commits it.
    pub fn new(
        id: String,
        name: String,
        request_id: String,
        spec: MachineSpec,
        now_ms: u64,
    ) -> Self {
        MachineRecord {
            id,
            name,
            request_id,
            spec,
            desired: Desired::Started,
            state: MachineState::Created,
            current: None,
            marks: BTreeMap::new(),
            resources: Resources::default(),
            boot_attempts: 0,
            step_failures: 0,
            failure: None,
            timings: Vec::new(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            pooled: None,
            crashes: Vec::new(),
            disk_layout: DiskLayout::default(),
        }
    }

    /// The pool that owns this machine while it is prepared capacity (not yet claimed).
    pub fn pool_owner(&self) -> Option<&str> {
        self.pooled
            .as_ref()
            .filter(|p| !p.claimed)
            .map(|p| p.pool.as_str())
    }

    /// True when a create claimed this machine from a pool (its guest waited idle for a
    /// workload).
    pub fn claimed(&self) -> bool {
        self.pooled.as_ref().is_some_and(|p| p.claimed)
    }

    /// The mark of a step.
    pub fn mark(&self, step: Step) -> Mark {
        self.marks.get(&step).copied().unwrap_or_default()
    }

    /// Sets a step's mark; `Untouched` removes it.
    pub fn set_mark(&mut self, step: Step, mark: Mark) {
        if mark == Mark::Untouched {
            self.marks.remove(&step);
        } else {
            self.marks.insert(step, mark);
        }
    }

    /// True when the step's effect may exist on the host.
    pub fn touched(&self, step: Step) -> bool {
        self.mark(step) != Mark::Untouched
    }

    /// True when nothing of the machine may exist on the host.
    pub fn nothing_touched(&self) -> bool {
        CREATE_ORDER.iter().all(|s| !self.touched(*s))
    }

    /// Appends a timing, dropping the oldest beyond [`TIMINGS_KEPT`].
    pub fn push_timing(&mut self, timing: StepTiming) {
        self.timings.push(timing);
        if self.timings.len() > TIMINGS_KEPT {
            let excess = self.timings.len() - TIMINGS_KEPT;
            self.timings.drain(..excess);
        }
    }

    /// True for the states the run never leaves without a new desired state.
    pub fn is_terminal(&self) -> bool {
        matches!(self.state, MachineState::Destroyed)
    }
}

/// One entry of a machine's append-only event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineEvent {
    /// Global sequence number (the store assigns it).
    pub seq: u64,
    /// The machine.
    pub machine_id: String,
    /// ms since the epoch.
    pub at_ms: u64,
    /// The machine's state after the event.
    pub state: MachineState,
    /// What happened, for a person.
    pub message: String,
}
