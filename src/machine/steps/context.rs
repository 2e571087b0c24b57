//! What a step may reach: a narrow context, defined here and implemented by the actors
//! (`actors::context`). The steps see handles for the image cache, the lease pool, the
//! host network, the route registry and the VMM driver — never the actor tree, the store
//! or the whole service set — so `machine` imports nothing from `actors`, and a step's
//! reach is written in one place.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::StepError;
use crate::guest::config::GuestResolver;
use crate::guest::kit::GuestKit;
use crate::image::ImageRef;
use crate::machine::record::ImageWorkload;
use crate::net::NetPlan;
use crate::net::policy::MachinePolicy;
use crate::route::Route;
use crate::vmm::{Confinement, VmmDriver, VmmProcess};

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

    /// The VMM driver.
    fn vmm(&self) -> &VmmDriver;

    /// Where the writable layers' empty templates are kept (`overlay` disks).
    fn upper_templates(&self) -> PathBuf;

    /// The resolver guests are told to use (`dns.guests`), if any.
    fn guest_resolver(&self) -> Option<GuestResolver>;

    /// How long a guest may take to report ready.
    fn ready_timeout(&self) -> Duration;

    /// How long a guest gets to shut down before it is made to.
    fn stop_grace(&self) -> Duration;

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
