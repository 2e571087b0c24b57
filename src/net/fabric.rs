//! NetFabric: the async face of the host network. Cheap to clone and safe to use from any
//! number of tokio tasks; every call becomes a job on one of a few dedicated OS threads
//! (see `worker`), chosen by namespace name, so calls for one machine run in order and
//! calls for different machines run side by side.

use std::sync::Arc;
use std::time::Instant;

use super::error::NetError;
use super::observe::NetObservation;
use super::plan::NetPlan;
use super::scan::NetResource;
use super::worker::Workers;
use super::{apply, netns, observe, scan};

/// Worker threads. Link changes serialise on one kernel lock, so more threads than this
/// buy nothing; two let a slow call (a namespace that must be torn down by hand) not hold
/// up every other machine.
const WORKERS: usize = 2;

/// The host network of all machines on this host.
#[derive(Clone)]
pub struct NetFabric {
    workers: Arc<Workers>,
}

impl NetFabric {
    /// Starts the worker threads and makes /run/netns a shared mount point (as iproute2
    /// does). The calling thread's network namespace is taken as the root namespace.
    /// Does not need a tokio runtime.
    pub fn start() -> Result<NetFabric, NetError> {
        netns::prepare_run_dir()?;
        Ok(NetFabric {
            workers: Arc::new(Workers::start(WORKERS)?),
        })
    }

    /// Makes `plan` true on the host: namespace, veth pair, tap, addresses, forwarding,
    /// routes.
    ///
    /// Idempotent: whatever exists and is right is kept, whatever is missing is created,
    /// so it also completes a half-done earlier call; what stands in the way (a host veth
    /// whose peer is not in this namespace) is replaced. Undo: [`NetFabric::remove`].
    pub async fn ensure(&self, plan: &NetPlan) -> Result<(), NetError> {
        let started = Instant::now();
        let job = plan.clone();
        let result = self
            .workers
            .run(&plan.netns, move |w| apply::ensure(w, &job))
            .await;
        tracing::debug!(netns = %plan.netns, elapsed_us = started.elapsed().as_micros() as u64, ok = result.is_ok(), "network ensure");
        result
    }

    /// Removes whatever of `plan` exists.
    ///
    /// Idempotent, and works on any partial state. When it returns Ok, nothing of the
    /// plan is visible on the host any more: the namespace is unmounted and the host veth
    /// and its route are gone (the kernel's asynchronous teardown has been waited for,
    /// and finished by hand if something still held the namespace). So `ensure` of the
    /// same plan may follow at once, and [`NetFabric::scan`] does not report it.
    ///
    /// Takes ~1.5 ms when the namespace has been idle for a few tens of milliseconds, and
    /// ~15-70 ms right after `ensure` or `observe` of the same plan: the kernel frees a
    /// namespace only an RCU grace period after the last netlink socket inside it closed.
    /// At most ~0.3 s when something (a VMM still running inside) holds the namespace.
    pub async fn remove(&self, plan: &NetPlan) -> Result<(), NetError> {
        let started = Instant::now();
        let job = plan.clone();
        let result = self
            .workers
            .run(&plan.netns, move |w| apply::remove(w, &job))
            .await;
        tracing::debug!(netns = %plan.netns, elapsed_us = started.elapsed().as_micros() as u64, ok = result.is_ok(), "network remove");
        result
    }

    /// Which parts of `plan` exist right now. Read-only (it opens a netlink socket inside
    /// the namespace, which delays a `remove` that follows within milliseconds; see there).
    pub async fn observe(&self, plan: &NetPlan) -> Result<NetObservation, NetError> {
        let job = plan.clone();
        self.workers
            .run(&plan.netns, move |w| observe::observe(w, &job))
            .await
    }

    /// Every namespace (`<prefix>-...` under /run/netns) and root-namespace link
    /// (`<prefix><machine id>`) on the host, sorted. A host veth whose namespace is
    /// already deleted and that the kernel is about to take away is waited for, not
    /// reported: what this returns is what stays.
    pub async fn scan(&self, prefix: &str) -> Result<Vec<NetResource>, NetError> {
        let prefix = prefix.to_string();
        self.workers
            .run(&prefix.clone(), move |w| scan::scan(w, &prefix))
            .await
    }
}
