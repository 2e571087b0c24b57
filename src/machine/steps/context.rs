//! What a step may reach: a narrow context, defined here and implemented twice: over the
//! daemon's services (`actors::context`), and over an in-memory host for the steps' unit
//! tests (`steps::testing`). The steps see handles for the image cache, the lease pool,
//! the host network, the route registry and the VMM — never the actor tree, the store or
//! the whole service set — so `machine` imports nothing from `actors`, and a step's reach
//! is written in one place.
//!
//! Besides acting, the context answers whether a host object exists ([`Owned`], by kind
//! and name): the steps' probes are built on that one question.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::StepError;
use crate::guest::config::GuestResolver;
use crate::guest::kit::GuestKit;
use crate::guest::protocol::Claim;
use crate::image::ImageRef;
use crate::machine::record::ImageWorkload;
use crate::machine::step::ResourceKind;
use crate::net::NetPlan;
use crate::net::policy::MachinePolicy;
use crate::route::Route;
use crate::vmm::{Confinement, ControlError, LaunchSpec, Liveness, ReadyError, VmmProcess};

/// One host object a step owns: its kind and its name as the host knows it (a namespace
/// or link name, a machine id for a policy or cgroup, a directory's path).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owned {
    /// What kind of object.
    pub kind: ResourceKind,
    /// Its name.
    pub name: String,
}

impl Owned {
    /// An object of `kind` named `name`.
    pub fn new(kind: ResourceKind, name: impl Into<String>) -> Owned {
        Owned {
            kind,
            name: name.into(),
        }
    }
}

/// The base image a machine's disk is cloned from, as the image cache answers.
#[derive(Debug, Clone)]
pub struct BaseFound {
    /// The base's digest.
    pub digest: String,
    /// Its file.
    pub path: PathBuf,
    /// The image's own workload settings, when it carries them.
    pub workload: Option<ImageWorkload>,
}

/// Everything the steps may touch. Every call is idempotent, as the step contracts that
/// use them require; a call that cannot be answered (a singleton restarting) is a
/// [`StepError::Retry`].
pub trait StepContext: Send + Sync {
    /// The machine's directory: disk, config disk, sockets, logs.
    fn machine_dir(&self, id: &str) -> PathBuf;

    /// The machine's network plan for lease `slot` (names depend only on the id).
    fn net_plan(&self, id: &str, slot: u32) -> Result<NetPlan, StepError>;

    /// Whether `object` exists on the host; `None` when that cannot be told now (a
    /// query that failed), which a probe takes as present: nothing is redone on a guess.
    fn exists(&self, object: &Owned) -> Option<bool>;

    /// Where the writable layers' empty templates are kept (`overlay` disks).
    fn upper_templates(&self) -> PathBuf;

    /// The resolver guests are told to use (`dns.guests`), if any.
    fn guest_resolver(&self) -> Option<GuestResolver>;

    /// How long a guest may take to report ready.
    fn ready_timeout(&self) -> Duration;

    /// The guest kernel and initramfs.
    fn kit(&self) -> impl Future<Output = Result<GuestKit, StepError>> + Send;

    /// The image's base, built (or pulled and built) by the image cache.
    fn ensure_base(
        &self,
        image: ImageRef,
    ) -> impl Future<Output = Result<BaseFound, StepError>> + Send;

    /// The machine's address block (the one it holds, or a new one).
    fn lease(&self, machine: &str) -> impl Future<Output = Result<u32, StepError>> + Send;

    /// Frees every block the machine holds.
    fn release_lease(&self, machine: &str) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Makes whatever of the plan's namespace, links and tap is missing.
    fn ensure_network(&self, plan: NetPlan) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Removes whatever of the plan's network exists.
    fn remove_network(&self, plan: NetPlan) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Writes the machine's packet policy (rules replaced).
    fn ensure_policy(
        &self,
        machine: MachinePolicy,
    ) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Removes whatever of the machine's packet policy exists.
    fn remove_policy(&self, machine: &str) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Creates the machine's cgroup (or keeps it), writes its limits, and moves
    /// `running` (the recorded VMM) in when given.
    fn ensure_cgroup(
        &self,
        machine: &str,
        vcpus: u32,
        memory_mib: u32,
        running: Option<i32>,
    ) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Removes the machine's cgroup, ending whatever still runs inside.
    fn remove_cgroup(&self, machine: &str) -> impl Future<Output = Result<(), StepError>> + Send;

    /// How the machine's VMM is confined: its cgroup, and the unprivileged identity of
    /// lease slot `slot`.
    fn vmm_confinement(&self, machine: &str, slot: u32) -> Confinement;

    /// Makes sure the machine's VMM logs are drained and capped (see `vmm::logs`).
    fn keep_logs(&self, machine: &str, process: &VmmProcess);

    /// Starts the machine's VMM, or adopts the one that runs for it (see
    /// `VmmDriver::launch`).
    fn launch(
        &self,
        spec: LaunchSpec,
    ) -> impl Future<Output = Result<VmmProcess, StepError>> + Send;

    /// Whether the recorded process still runs.
    fn liveness(&self, process: &VmmProcess) -> Liveness;

    /// Stops the VMM (gracefully within the configured grace, then by force); a process
    /// already gone is fine.
    fn stop_vmm(&self, process: VmmProcess) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Ends, and waits for, any process of the machine `machine` that carries its marker
    /// and runs in `dir`, but is not recorded (a crash between a start and its record).
    fn kill_unrecorded(
        &self,
        machine: &str,
        dir: PathBuf,
    ) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Waits until the guest reports ready (see `VmmDriver::wait_ready`).
    fn wait_ready(
        &self,
        process: &VmmProcess,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), ReadyError>> + Send;

    /// Waits until a prepared guest reports idle (see `VmmDriver::wait_idle`).
    fn wait_idle(
        &self,
        process: &VmmProcess,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), ReadyError>> + Send;

    /// Claims a prepared guest and waits for it to be ready (see `VmmDriver::claim`).
    fn claim(
        &self,
        process: &VmmProcess,
        claim: &Claim,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), ReadyError>> + Send;

    /// Pauses the guest's vCPUs. Idempotent.
    fn pause(&self, process: &VmmProcess) -> impl Future<Output = Result<(), ControlError>> + Send;

    /// Resumes a paused guest. Idempotent.
    fn resume(&self, process: &VmmProcess)
    -> impl Future<Output = Result<(), ControlError>> + Send;

    /// Opens a TCP connection from the host to `addr` (as a route to the guest reaches
    /// it) and closes it at once; an error says why none was established within
    /// `timeout`.
    fn tcp_connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Puts the route in the registry.
    fn publish(&self, route: Route) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Withdraws the machine's route.
    fn unpublish(&self, machine: &str) -> impl Future<Output = Result<(), StepError>> + Send;
}
