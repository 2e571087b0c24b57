//! The VMM driver contract and its implementations.
//!
//! A machine's VMM is one host process that must outlive the daemon: it is started in its
//! own session with its stdio and serial console going to files in the machine's
//! directory, never to pipes to the daemon. The daemon keeps a durable [`VmmProcess`]
//! (pid + start time + host boot id + socket paths) and re-attaches to it after a restart
//! through those identities and the sockets.
//!
//! ```text
//!  launch ──> VmmProcess ──wait_ready──> GuestReady ──stop(grace)──> StopOutcome
//!    │ idempotent: adopts a process         │ agent socket:            │ agent Shutdown, then
//!    │ carrying the machine's marker        │ Status -> Ready          │ QMP quit, then SIGKILL
//!    └ waits until QMP answers              └ ends early if the VMM dies
//!  liveness(VmmProcess) -> Running | Gone (pid + start time + boot id; a zombie is Gone)
//! ```
//!
//! Beyond the life cycle, the contract has pause/resume and snapshots (written to files
//! under the machine directory, loaded into a fresh process), for prepared capacity, and
//! the prepared guest's life: launched with a config that says `prepared`, it reports
//! Idle (`wait_idle`) and may be paused; resumed, it is given its workload (`claim`) and
//! reports Ready like any guest.
//!
//! **Architecture invariant:** the driver set is a closed enum ([`VmmDriver`]) matched
//! exhaustively: every operation says what each driver does, including "unsupported".

pub mod accel;
pub mod agent;
pub mod cgroup;
pub mod confine;
pub mod firecracker;
pub mod logs;
pub mod marked;
mod pidfd;
pub mod procfs;
pub mod qemu;
pub mod qmp;
pub mod select;
pub mod settings;
mod spawn;
mod stopping;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::guest::kit::GuestKit;
use crate::guest::protocol::{Claim, ExitStatus, GuestState};

pub use accel::Accel;
pub use agent::{AgentError, AgentLink};
pub use firecracker::FirecrackerDriver;
pub use procfs::find_processes;
pub use qemu::QemuDriver;

/// The guest's serial console log in the machine directory (every driver).
pub const SERIAL_LOG: &str = "serial.log";
/// The guest's serial console as a socket the daemon drains into [`SERIAL_LOG`] (see
/// `logs`; QEMU).
pub const SERIAL_SOCKET: &str = "serial.sock";
/// The VMM's own stdout/stderr in the machine directory (every driver).
pub const VMM_LOG: &str = "vmm.log";
/// Default prefix of the process marker (`hearth-<machine id>`, every driver).
pub const DEFAULT_NAME_PREFIX: &str = "hearth-";

/// The tap device the VMM attaches the guest's network interface to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSpec {
    /// Interface name inside the machine's network namespace.
    pub name: String,
    /// The guest interface's MAC address.
    pub mac: [u8; 6],
}

/// Everything needed to start one machine's VMM.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The machine's id; the VMM process carries it as a marker in its command line.
    pub machine_id: String,
    /// The machine's directory: control sockets and logs live here.
    pub workdir: PathBuf,
    /// Network namespace (a name under `/run/netns`) the VMM runs in.
    pub netns: Option<String>,
    /// The tap device for the guest's interface; none: no network device.
    pub tap: Option<TapSpec>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// The kernel and initramfs.
    pub kit: GuestKit,
    /// The machine's writable disk (raw ext4 image): its whole root, or with `base_disk`
    /// the overlay's upper layer.
    pub root_disk: PathBuf,
    /// The image's base, shared with other machines, attached read-only (the overlay's
    /// lower layer); none for a full-copy root. A link to a shared inode: never handed to
    /// the VMM's uid.
    pub base_disk: Option<PathBuf>,
    /// The config disk (see [`crate::guest::config::write_config_disk`]).
    pub config_disk: PathBuf,
    /// How the process is confined before it runs.
    pub confine: Confinement,
}

/// How a VMM process is confined: applied between fork and exec, so it holds from the
/// VMM's first instruction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    /// The `cgroup.procs` files of the machine's cgroup (one per hierarchy); the process
    /// joins each before it runs.
    pub cgroup_procs: Vec<PathBuf>,
    /// The machine's cgroup relative to each hierarchy's root (`hearth_<prefix>/<id>`);
    /// a jailer nests its own cgroup here. Empty: none.
    pub cgroup_path: String,
    /// The identity it runs as; none: the daemon's (root).
    pub run_as: Option<RunAs>,
}

/// An unprivileged identity for a VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// Its own uid (no other machine's VMM shares it).
    pub uid: u32,
    /// The VMMs' group.
    pub gid: u32,
    /// The group of `/dev/kvm`, kept as a supplementary group so a KVM guest still
    /// starts; none when the host has no `/dev/kvm`.
    pub kvm_gid: Option<u32>,
}

/// A running (or once running) VMM, as the daemon stores it durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmProcess {
    /// Which driver started it (`"qemu"`).
    pub driver: String,
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks since host boot (field 22 of `/proc/PID/stat`); with the
    /// boot id it tells a reused pid from the process that was started.
    pub start_time: u64,
    /// The host's boot id when it was started.
    pub boot_id: String,
    /// The VMM's control socket (QMP for QEMU).
    pub control_socket: PathBuf,
    /// The host end of the guest agent's port.
    pub agent_socket: PathBuf,
}

impl VmmProcess {
    /// The live process carrying `machine_id`'s marker (the oldest, should there be
    /// several), as a record with the given driver and sockets: what a repeated launch
    /// adopts instead of starting a second VMM.
    pub fn find_running(
        name_prefix: &str,
        machine_id: &str,
        driver: &str,
        control_socket: PathBuf,
        agent_socket: PathBuf,
    ) -> Option<VmmProcess> {
        let pid = procfs::find_processes(name_prefix)
            .into_iter()
            .find(|(id, _)| id == machine_id)
            .map(|(_, pid)| pid)?;
        let stat = procfs::stat(pid).filter(|s| !s.ended)?;
        Some(VmmProcess {
            driver: driver.to_string(),
            pid,
            start_time: stat.start_time,
            boot_id: procfs::boot_id(),
            control_socket,
            agent_socket,
        })
    }

    /// The machine directory the VMM was started in (where its logs are).
    pub fn workdir(&self) -> Option<&std::path::Path> {
        self.control_socket.parent()
    }
}

/// Whether a recorded VMM process still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The very process that was started runs.
    Running,
    /// It has ended (or is a zombie), or the pid now belongs to another process, or the
    /// host rebooted since.
    Gone,
}

/// What the guest said when it became ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestReady {
    /// Milliseconds from guest kernel start to readiness, measured in the guest.
    pub boot_ms: u64,
    /// The guest's state when the wait ended (`Ready`, or `Exited` if the workload already
    /// ended after becoming ready).
    pub state: GuestState,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOutcome {
    /// The guest shut down by itself after the agent's Shutdown (or the VMM was already
    /// gone); false: it had to be made to quit (QMP `quit` or SIGKILL).
    pub graceful: bool,
}

/// Why a VMM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The machine directory is unusable.
    #[error("machine {machine_id}: directory {path}: {source}")]
    Workdir {
        /// The machine.
        machine_id: String,
        /// The directory or file in it.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The network namespace could not be opened.
    #[error("machine {machine_id}: network namespace {netns}: {source}")]
    Netns {
        /// The machine.
        machine_id: String,
        /// The namespace name.
        netns: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The VMM could not be confined (its cgroup, its files' owner, its tap).
    #[error("machine {machine_id}: confine the VMM: {what}: {source}")]
    Confine {
        /// The machine.
        machine_id: String,
        /// What failed, naming the file.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The VMM binary could not be started.
    #[error("machine {machine_id}: cannot start {binary}: {source}")]
    Spawn {
        /// The machine.
        machine_id: String,
        /// The binary.
        binary: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The VMM exited before its control socket answered.
    #[error("machine {machine_id}: the VMM exited during start ({status}); its log: {log}")]
    Exited {
        /// The machine.
        machine_id: String,
        /// How it exited.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// The VMM refused its configuration (Firecracker's `fault_message` included).
    #[error("machine {machine_id}: {message}")]
    Api {
        /// The machine.
        machine_id: String,
        /// The request and what the VMM said.
        message: String,
    },
    /// The control socket did not answer in time.
    #[error(
        "machine {machine_id}: control socket {path} did not answer within {after:?}: {last_error}"
    )]
    ControlTimeout {
        /// The machine.
        machine_id: String,
        /// The socket.
        path: PathBuf,
        /// How long was waited.
        after: Duration,
        /// The last connection error.
        last_error: String,
    },
}

/// Why the guest did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    /// The VMM process ended (or was never there) before the guest was ready.
    #[error("VMM pid {pid} exited before the guest was ready; serial console: {console}")]
    VmmExited {
        /// The VMM's pid.
        pid: i32,
        /// The end of the guest's serial console log (kernel panics and init fatals).
        console: String,
    },
    /// The deadline passed.
    #[error("guest not ready within {after:?} (last state: {last_state})")]
    Timeout {
        /// How long was waited.
        after: Duration,
        /// The last state the guest reported, or why none was heard.
        last_state: String,
    },
    /// The workload ended before its ports listened.
    #[error("the workload exited before the guest was ready: {status:?}")]
    WorkloadExited {
        /// How it ended.
        status: ExitStatus,
    },
    /// The guest init reported a fatal error.
    #[error("guest init failed: {error}")]
    GuestFailed {
        /// Its message.
        error: String,
    },
    /// The guest is shutting down.
    #[error("the guest is shutting down")]
    ShuttingDown,
    /// A prepared guest waits for a claim: it is not going to be ready by itself.
    #[error("the guest is prepared and idle: it has not been claimed")]
    Unclaimed,
    /// A prepared guest was expected idle, but it runs (or ran) a workload.
    #[error("the guest is not idle: {state}")]
    NotIdle {
        /// The state it reported.
        state: String,
    },
    /// A claim larger than the guest accepts; refused before anything was sent.
    #[error("the claim is {len} bytes encoded, more than the {max} a guest accepts")]
    ClaimTooLarge {
        /// Its encoded size.
        len: usize,
        /// The bound.
        max: usize,
    },
}

/// Why a VMM could not be stopped.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// Signalling the process failed.
    #[error("VMM pid {pid}: kill: {source}")]
    Signal {
        /// The pid.
        pid: i32,
        /// The cause.
        source: std::io::Error,
    },
    /// It still runs after SIGKILL and a wait.
    #[error("VMM pid {pid} still runs {after:?} after SIGKILL")]
    StillRunning {
        /// The pid.
        pid: i32,
        /// How long was waited.
        after: Duration,
    },
}

/// Why pause, resume or a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The VMM's control API refused or did not answer.
    #[error("{message}")]
    Api {
        /// The request and what was said.
        message: String,
    },
    /// A file or directory for it could not be made.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// This driver does not do it (yet).
    #[error("the {driver} driver does not support {operation}")]
    Unsupported {
        /// The driver.
        driver: String,
        /// The operation.
        operation: String,
    },
}

/// A snapshot's files on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The machine state (devices, vCPUs).
    pub state: PathBuf,
    /// Guest memory.
    pub memory: PathBuf,
}

/// Whether a VMM runs its guest's vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Configured but the guest was never started.
    NotStarted,
    /// Running.
    Running,
    /// Paused.
    Paused,
}

/// The VMM drivers. Closed: every operation matches exhaustively.
pub enum VmmDriver {
    /// QEMU `microvm` (KVM when the probe says it works, TCG otherwise).
    Qemu(QemuDriver),
    /// Firecracker (KVM only), directly or through its jailer.
    Firecracker(FirecrackerDriver),
}

impl VmmDriver {
    /// What the log keeper of a machine whose VMM is `process` looks after: the console
    /// socket to drain (QEMU) and the files the VMM appends to itself (see `logs`).
    pub fn log_files(
        &self,
        process: &VmmProcess,
        machine_dir: &std::path::Path,
    ) -> (Option<(PathBuf, PathBuf)>, Vec<PathBuf>) {
        let vmm_log = machine_dir.join(VMM_LOG);
        match self {
            VmmDriver::Qemu(_) => (
                Some((
                    machine_dir.join(SERIAL_SOCKET),
                    machine_dir.join(SERIAL_LOG),
                )),
                vec![vmm_log],
            ),
            VmmDriver::Firecracker(_) => {
                let host = process.workdir().unwrap_or(machine_dir);
                (
                    None,
                    vec![
                        host.join(SERIAL_LOG),
                        host.join(firecracker::FC_LOG),
                        host.join(firecracker::METRICS_FILE),
                        vmm_log,
                    ],
                )
            }
        }
    }

    /// Starts the machine's VMM, or adopts the one already running for it.
    ///
    /// Idempotent: a VMM carrying this machine's marker is adopted, not started twice; the
    /// call returns once the control socket answers. Undo: [`VmmDriver::stop`].
    pub async fn launch(&self, spec: &LaunchSpec) -> Result<VmmProcess, LaunchError> {
        match self {
            VmmDriver::Qemu(q) => q.launch(spec).await,
            VmmDriver::Firecracker(f) => f.launch(spec).await,
        }
    }

    /// Whether the recorded process still runs. Cheap (a pidfd and one `/proc` read).
    pub fn liveness(&self, process: &VmmProcess) -> Liveness {
        match self {
            VmmDriver::Qemu(_) | VmmDriver::Firecracker(_) => pidfd::liveness(process),
        }
    }

    /// Returns once the recorded process has exited (at once if it is already gone or is
    /// not that process any more). Holds only a pidfd: cancelling the wait is free.
    pub async fn exited(&self, process: &VmmProcess) {
        let Some(fd) = pidfd::open_verified(process) else {
            return;
        };
        match pidfd::watch(fd) {
            Ok(fd) => pidfd::wait_exit(&fd).await,
            // No reactor registration: the exit cannot be waited for, so it is reported
            // now; the caller observes the process and finds it still running.
            Err(e) => tracing::warn!(pid = process.pid, error = %e, "cannot watch the VMM's exit"),
        }
    }

    /// Waits until the guest reports ready, the VMM exits, or `timeout` passes.
    /// Safe to call again at any time (after a daemon restart too): it asks the guest for
    /// its current state.
    pub async fn wait_ready(
        &self,
        process: &VmmProcess,
        timeout: Duration,
    ) -> Result<GuestReady, ReadyError> {
        match self {
            VmmDriver::Qemu(_) => {
                agent::wait_ready(process, AgentLink::for_process(process), timeout).await
            }
            VmmDriver::Firecracker(f) => f.wait_ready(process, timeout).await,
        }
    }

    /// Waits until a prepared guest (its config says `prepared`) reports Idle: booted,
    /// network up, waiting for a claim. Ends early when the VMM exits, and with an error
    /// when the guest runs a workload (`NotIdle`), failed, or shuts down. Safe to call
    /// again at any time, like [`VmmDriver::wait_ready`].
    pub async fn wait_idle(
        &self,
        process: &VmmProcess,
        timeout: Duration,
    ) -> Result<(), ReadyError> {
        agent::wait_idle(process, self.agent_link(process), timeout).await
    }

    /// Claims a prepared guest: sends it `claim` (hostname, workload, wall clock,
    /// entropy) and waits for readiness as [`VmmDriver::wait_ready`] does. The guest must
    /// run (resume a paused one first), or the wait runs into `timeout`.
    ///
    /// Idempotent: only an Idle guest starts the claim's workload; a guest already
    /// claimed answers with its state, so a retry (after a daemon restart, say) just
    /// waits for readiness again and never starts a second workload. A claim whose
    /// encoding exceeds what the guest accepts is refused before sending
    /// (`ClaimTooLarge`).
    pub async fn claim(
        &self,
        process: &VmmProcess,
        claim: &Claim,
        timeout: Duration,
    ) -> Result<GuestReady, ReadyError> {
        agent::claim(process, self.agent_link(process), claim, timeout).await
    }

    /// The agent link of a process, as its driver reaches it.
    fn agent_link(&self, process: &VmmProcess) -> AgentLink {
        match self {
            VmmDriver::Qemu(_) => AgentLink::for_process(process),
            VmmDriver::Firecracker(f) => f.agent_link(process),
        }
    }

    /// Asks the guest for its current state over the agent socket.
    pub async fn guest_state(
        &self,
        process: &VmmProcess,
        timeout: Duration,
    ) -> Result<GuestState, AgentError> {
        let link = match self {
            VmmDriver::Qemu(_) => AgentLink::for_process(process),
            VmmDriver::Firecracker(f) => f.agent_link(process),
        };
        agent::guest_state(link, timeout).await
    }

    /// Stops the VMM: graceful shutdown through the guest agent within `grace`, then the
    /// VMM's own quit, then SIGKILL.
    ///
    /// Idempotent: a process that is already gone is `Ok(graceful: true)`. When the daemon
    /// started the process, it is also reaped before this returns (no zombie is left).
    /// The agent socket takes one client at a time: drop a pending [`VmmDriver::wait_ready`]
    /// for the same machine first, or the Shutdown waits behind it until `grace` runs out.
    pub async fn stop(
        &self,
        process: &VmmProcess,
        grace: Duration,
    ) -> Result<StopOutcome, StopError> {
        match self {
            VmmDriver::Qemu(q) => q.stop(process, grace).await,
            VmmDriver::Firecracker(f) => f.stop(process, grace).await,
        }
    }

    /// Whether the guest's vCPUs run.
    pub async fn run_state(&self, process: &VmmProcess) -> Result<RunState, ControlError> {
        match self {
            VmmDriver::Qemu(q) => q.run_state(process).await,
            VmmDriver::Firecracker(f) => Ok(match f.instance_state(process).await? {
                firecracker::api::InstanceState::NotStarted => RunState::NotStarted,
                firecracker::api::InstanceState::Running => RunState::Running,
                firecracker::api::InstanceState::Paused => RunState::Paused,
            }),
        }
    }

    /// Pauses the guest's vCPUs. Idempotent. Undo: [`VmmDriver::resume`].
    pub async fn pause(&self, process: &VmmProcess) -> Result<(), ControlError> {
        match self {
            VmmDriver::Qemu(q) => q.set_running(process, false).await,
            VmmDriver::Firecracker(f) => f.pause(process).await,
        }
    }

    /// Resumes a paused guest. Idempotent.
    pub async fn resume(&self, process: &VmmProcess) -> Result<(), ControlError> {
        match self {
            VmmDriver::Qemu(q) => q.set_running(process, true).await,
            VmmDriver::Firecracker(f) => f.resume(process).await,
        }
    }

    /// Writes a snapshot of a paused guest to files named `name` under the machine
    /// directory. Idempotent: the files are rewritten. Undo: removing them (the machine
    /// directory's removal does).
    pub async fn snapshot(
        &self,
        process: &VmmProcess,
        name: &str,
    ) -> Result<Snapshot, ControlError> {
        match self {
            VmmDriver::Qemu(_) => Err(ControlError::Unsupported {
                driver: qemu::DRIVER_NAME.into(),
                operation: "snapshots".into(),
            }),
            VmmDriver::Firecracker(f) => f.snapshot(process, name).await,
        }
    }

    /// Starts a fresh VMM for `spec` from `snapshot` (taken of this machine), paused
    /// unless `resume`. Idempotent like [`VmmDriver::launch`]. Undo: [`VmmDriver::stop`].
    pub async fn restore(
        &self,
        spec: &LaunchSpec,
        snapshot: &Snapshot,
        resume: bool,
    ) -> Result<VmmProcess, LaunchError> {
        match self {
            VmmDriver::Qemu(_) => Err(LaunchError::Api {
                machine_id: spec.machine_id.clone(),
                message: "the qemu driver does not support snapshots".into(),
            }),
            VmmDriver::Firecracker(f) => f.restore(spec, snapshot, resume).await,
        }
    }

    /// The driver's name, as the node API shows it.
    pub fn describe(&self) -> String {
        match self {
            VmmDriver::Qemu(_) => qemu::DRIVER_NAME.to_string(),
            VmmDriver::Firecracker(_) => firecracker::DRIVER_NAME.to_string(),
        }
    }

    /// The prefix of the marker this driver's processes carry (`-name <prefix><id>` for
    /// QEMU, `--id <prefix><id>` for Firecracker and its jailer), for
    /// [`find_processes`].
    pub fn name_prefix(&self) -> &str {
        match self {
            VmmDriver::Qemu(q) => q.name_prefix(),
            VmmDriver::Firecracker(f) => f.name_prefix(),
        }
    }
}
