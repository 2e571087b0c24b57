//! NetFabric: the async face of the host network. Cheap to clone and safe to use from any
//! number of tokio tasks; every call becomes a job on one of a few dedicated OS threads
//! (see `worker`), chosen by namespace name, so calls for one machine run in order and
//! calls for different machines run side by side.

use std::sync::Arc;
use std::time::Instant;

use super::error::NetError;
use super::nfnl::Nfnl;
use super::observe::NetObservation;
use super::plan::NetPlan;
use super::policy::{self, Egress, MachinePolicy, PolicyConfig};
use super::scan::NetResource;
use super::worker::Workers;
use super::{apply, netns, observe, resolver, scan};

/// Worker threads. Link changes serialise on one kernel lock, so more threads than this
/// buy nothing; two let a slow call (a namespace that must be torn down by hand) not hold
/// up every other machine.
const WORKERS: usize = 2;

/// The host network of all machines on this host.
#[derive(Clone)]
pub struct NetFabric {
    workers: Arc<Workers>,
    /// The daemon-wide policy last installed.
    policy: Arc<std::sync::RwLock<Option<PolicyConfig>>>,
}

impl NetFabric {
    /// Starts the worker threads and makes /run/netns a shared mount point (as iproute2
    /// does). The calling thread's network namespace is taken as the root namespace.
    /// Does not need a tokio runtime.
    pub fn start() -> Result<NetFabric, NetError> {
        netns::prepare_run_dir()?;
        Ok(NetFabric {
            workers: Arc::new(Workers::start(WORKERS)?),
            policy: Arc::new(std::sync::RwLock::new(None)),
        })
    }

    /// Writes the daemon's part of the packet policy (its table, maps and shared
    /// chains; machine chains are kept), puts the guest resolver's address on `lo` (or
    /// removes it when guests do not resolve; see `resolver`) and, with egress
    /// `nat`, switches IPv4 forwarding
    /// on in the root namespace, logging that it did. Idempotent; called once at start,
    /// before any machine's policy. See `policy`.
    pub async fn install_policy(&self, cfg: PolicyConfig) -> Result<(), NetError> {
        let job = cfg.clone();
        self.workers
            .run(&cfg.table(), move |worker| {
                let mut nft = open_nft(None)?;
                nft.apply_in(None, &policy::daemon_changes(&job))?;
                let label = resolver::label(&job.prefix);
                match job.guest_dns {
                    Some(addr) => resolver::ensure(worker, &label, addr),
                    None => resolver::remove(worker, &label),
                }
            })
            .await?;
        if cfg.egress == Egress::Nat {
            enable_root_forwarding()?;
        }
        // A later install (the guest resolver withdrawn when its address cannot be
        // bound) replaces the earlier one, as it did in the table.
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(cfg);
        Ok(())
    }

    /// The installed daemon-wide policy.
    pub fn policy(&self) -> Option<PolicyConfig> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Writes one machine's chains and map elements (rules replaced). Idempotent. Undo:
    /// [`NetFabric::remove_policy`]. When the daemon's own part is gone (an operator's
    /// `nft flush ruleset`), it is written again first, so machines are repaired rather
    /// than failed.
    pub async fn ensure_policy(&self, machine: MachinePolicy) -> Result<(), NetError> {
        let cfg = self.policy().ok_or(NetError::PolicyNotInstalled)?;
        let key = machine.id.clone();
        self.workers
            .run(&key, move |_| {
                let mut nft = open_nft(None)?;
                let changes = policy::machine_changes(&cfg, &machine);
                match nft.apply_in(None, &changes) {
                    Err(NetError::Nftables { source, .. }) if source.is(libc::ENOENT) => {
                        nft.apply_in(None, &policy::daemon_changes(&cfg))?;
                        nft.apply_in(None, &changes)
                    }
                    other => other,
                }
            })
            .await
    }

    /// Removes whatever of machine `id`'s policy exists (its host veth is
    /// `<prefix><id>`). Idempotent: nothing there is success.
    pub async fn remove_policy(&self, prefix: &str, id: &str) -> Result<(), NetError> {
        let prefix = prefix.to_string();
        let id = id.to_string();
        self.workers
            .run(&id.clone(), move |_| {
                let mut nft = open_nft(None)?;
                let table = policy::table_name(&prefix);
                let present = nft
                    .has_chain(&table, &policy::marker_chain(&id))
                    .map_err(nft_query(format!("look up the chains of machine {id}")))?;
                if !present {
                    return Ok(());
                }
                let host_veth = format!("{prefix}{id}");
                nft.apply_in(None, &policy::release_changes(&prefix, &id, &host_veth))
            })
            .await
    }

    /// Whether machine `id`'s policy is on the host. Blocking but quick (one netlink
    /// query, tens of microseconds): callable from the thread that observes a machine.
    /// Runs on the calling thread, which must be in the root namespace (every thread but
    /// the fabric's own workers is).
    pub fn policy_present(prefix: &str, id: &str) -> Result<bool, NetError> {
        let mut nft = open_nft(None)?;
        nft.has_chain(&policy::table_name(prefix), &policy::marker_chain(id))
            .map_err(nft_query(format!("look up the chains of machine {id}")))
    }

    /// The ids of every machine with policy chains in the table of `prefix`, sorted.
    pub async fn scan_policies(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        let table = policy::table_name(prefix);
        self.workers
            .run(&table.clone(), move |_| {
                let mut nft = open_nft(None)?;
                let chains = nft
                    .chains(&table)
                    .map_err(nft_query(format!("list the chains of {table}")))?;
                let mut ids: Vec<String> = chains
                    .iter()
                    .filter_map(|c| policy::machine_of_chain(c).map(str::to_string))
                    .collect();
                ids.sort();
                ids.dedup();
                Ok(ids)
            })
            .await
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

fn open_nft(netns: Option<&str>) -> Result<Nfnl, NetError> {
    Nfnl::open().map_err(|source| NetError::Nftables {
        place: super::error::place(netns),
        action: "open a netfilter socket".to_string(),
        source,
    })
}

fn nft_query(action: String) -> impl FnOnce(super::NlError) -> NetError {
    move |source| NetError::Nftables {
        place: super::error::place(None),
        action,
        source,
    }
}

/// Egress `nat` needs the root namespace to forward. Switched on only when off, and
/// logged: it is a host-wide setting an operator must know about. Runs on the calling
/// (root namespace) thread.
fn enable_root_forwarding() -> Result<(), NetError> {
    let switched = apply::enable_forwarding().map_err(|source| NetError::Forwarding {
        netns: "(root)".to_string(),
        source,
    })?;
    if switched {
        tracing::warn!(
            "network.egress = \"nat\": switched IPv4 forwarding on in the root namespace"
        );
    }
    Ok(())
}
