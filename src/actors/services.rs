//! What every actor and API handler shares: the configuration, the store, the drivers,
//! and the broadcast channels that carry events to watchers. Built once at start.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OnceCell, broadcast};

use crate::config::Config;
use crate::guest::kit::{GuestKit, KitError, KitSource};
use crate::machine::decide::Policy;
use crate::machine::record::MachineEvent;
use crate::net::{NetFabric, PoolCidr};
use crate::route::RouteChange;
use crate::store::Store;
use crate::vmm::confine::VmmHost;
use crate::vmm::logs::{KeepSpec, LogKeepers};
use crate::vmm::{VmmDriver, VmmProcess};

/// Shared services. Cheap to clone (everything inside is shared).
#[derive(Clone)]
pub struct Services {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    store: Store,
    pool: PoolCidr,
    net: NetFabric,
    vmm: VmmDriver,
    kit: OnceCell<GuestKit>,
    host: VmmHost,
    logs: LogKeepers,
    runs_observed: AtomicU64,
    singleton_restarts: AtomicU64,
    events: broadcast::Sender<MachineEvent>,
    routes: broadcast::Sender<RouteChange>,
    /// True once the daemon is stopping: streams and waits end, so the API can close.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Where the daemon listens besides its socket, once bound.
    listening: std::sync::OnceLock<Listening>,
    /// The published routes in memory (written by the RegistryPublisher only).
    routes_view: crate::route::RouteTable,
    /// The etcd sink's last posted state (written by the EtcdSink only).
    sink_board: std::sync::Mutex<super::etcd_sink::Board>,
}

/// The addresses the daemon bound besides its Unix socket (the configured ones may say
/// port 0).
#[derive(Clone, Debug, Default)]
pub struct Listening {
    /// The TCP API (mutual TLS).
    pub api: Option<std::net::SocketAddr>,
    /// The Prometheus endpoint.
    pub metrics: Option<std::net::SocketAddr>,
    /// The embedded DNS server (UDP and TCP).
    pub dns: Option<std::net::SocketAddr>,
    /// The same server on the guest resolver's address (port 53).
    pub guest_dns: Option<std::net::SocketAddr>,
}

/// Capacity of the broadcast channels: a watcher that falls this far behind is told it
/// lagged and re-reads from the store.
const BROADCAST_CAPACITY: usize = 1024;

impl Services {
    /// Assembles the services.
    pub fn new(
        config: Config,
        store: Store,
        pool: PoolCidr,
        net: NetFabric,
        vmm: VmmDriver,
        host: VmmHost,
    ) -> Self {
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (routes, _) = broadcast::channel(BROADCAST_CAPACITY);
        Services {
            inner: Arc::new(Inner {
                config,
                store,
                pool,
                net,
                vmm,
                kit: OnceCell::new(),
                host,
                logs: LogKeepers::default(),
                runs_observed: AtomicU64::new(0),
                singleton_restarts: AtomicU64::new(0),
                events,
                routes,
                stopping: tokio::sync::watch::Sender::new(false),
                listening: std::sync::OnceLock::new(),
                routes_view: crate::route::RouteTable::default(),
                sink_board: std::sync::Mutex::new(super::etcd_sink::Board::default()),
            }),
        }
    }

    /// Marks the daemon as stopping: open streams and waits of the API end with
    /// UNAVAILABLE (machines are untouched). Idempotent.
    pub fn begin_shutdown(&self) {
        self.inner.stopping.send_replace(true);
    }

    /// Records where the daemon listens (once, at start).
    pub fn set_listening(&self, listening: Listening) {
        let _ = self.inner.listening.set(listening);
    }

    /// Where the daemon listens besides its socket.
    pub fn listening(&self) -> Listening {
        self.inner.listening.get().cloned().unwrap_or_default()
    }

    /// Watches for [`Services::begin_shutdown`].
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.stopping.subscribe()
    }

    /// Makes sure the log keeper of machine `id`, whose VMM is `process`, runs (see
    /// `vmm::logs`). Idempotent and cheap; it ends by itself with the VMM.
    pub fn keep_logs(&self, id: &str, process: &VmmProcess) {
        let (console, appended) = self
            .vmm()
            .log_files(process, &self.config().machine_dir(id));
        let spec = KeepSpec {
            machine_id: id.to_string(),
            console,
            appended,
            cap: u64::from(self.config().vmm.log_max_mib.max(1)) << 20,
        };
        let services = self.clone();
        let process = process.clone();
        self.inner.logs.keep(spec, move || {
            services.vmm().liveness(&process) == crate::vmm::Liveness::Running
        });
    }

    /// What confines VMMs on this host (cgroups, identities).
    pub fn vmm_host(&self) -> &VmmHost {
        &self.inner.host
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The machines' address pool.
    pub fn pool(&self) -> &PoolCidr {
        &self.inner.pool
    }

    /// How many of the pool's blocks machines may lease: all but the last when guests
    /// resolve through the embedded DNS (its first address is their resolver).
    pub fn lease_slots(&self) -> u32 {
        let reserved = u32::from(self.guest_resolver().is_some());
        self.pool().slot_count().saturating_sub(reserved)
    }

    /// The address guests resolve names at (port 53), when `dns.guests` is on.
    pub fn guest_resolver(&self) -> Option<std::net::Ipv4Addr> {
        self.net().policy().and_then(|p| p.guest_dns)
    }

    /// The host network fabric (used by the tap allocator).
    pub fn net(&self) -> &NetFabric {
        &self.inner.net
    }

    /// The VMM driver.
    pub fn vmm(&self) -> &VmmDriver {
        &self.inner.vmm
    }

    /// The guest kit, assembled on first use (cached on disk, so later daemons reuse it).
    pub async fn kit(&self) -> Result<&GuestKit, String> {
        self.inner
            .kit
            .get_or_try_init(|| async {
                let source = KitSource {
                    kernel_dir: self.inner.config.guest.kernel_dir.clone(),
                    init_binary: self.inner.config.init_binary(),
                };
                let cache = self.inner.config.layout().kit();
                tokio::task::spawn_blocking(move || {
                    GuestKit::ensure(&source, &cache).map_err(|e: KitError| e.to_string())
                })
                .await
                .map_err(|e| format!("guest kit task: {e}"))?
            })
            .await
    }

    /// Counts a machine run that has looked at the host since the daemon started (its
    /// first `Reconcile`): after a restart, when it equals the machines, every one of them
    /// has been re-adopted or repaired.
    pub fn note_run_observed(&self) {
        self.inner.runs_observed.fetch_add(1, Ordering::Relaxed);
    }

    /// Machine runs that have looked at the host since the daemon started.
    pub fn runs_observed(&self) -> u64 {
        self.inner.runs_observed.load(Ordering::Relaxed)
    }

    /// Counts a singleton that failed and is restarted.
    pub fn note_singleton_restart(&self) {
        self.inner
            .singleton_restarts
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Singleton failures since the daemon started (each was restarted).
    pub fn singleton_restarts(&self) -> u64 {
        self.inner.singleton_restarts.load(Ordering::Relaxed)
    }

    /// The retry bounds of every run.
    pub fn policy(&self) -> Policy {
        let guest = &self.inner.config.guest;
        Policy {
            max_boot_attempts: guest.boot_attempts,
            max_step_failures: 5,
            max_restarts: guest.max_restarts,
            restart_window_ms: guest.restart_window_secs.saturating_mul(1000),
            restart_backoff_ms: guest.restart_backoff_ms,
            restart_backoff_max_ms: guest.restart_backoff_max_ms,
        }
    }

    /// What admission measures a new machine against: the configured vCPUs and memory,
    /// and the address pool's blocks.
    pub fn room(&self) -> crate::store::Room {
        let (vcpus, memory_mib) = self.capacity_totals();
        crate::store::Room {
            vcpus,
            memory_mib,
            slots: self.lease_slots(),
        }
    }

    /// The vCPUs and MiB the host admits: the configured totals, or the host's where
    /// they are 0 (see `machine::admission::totals`).
    pub fn capacity_totals(&self) -> (u32, u64) {
        let capacity = &self.inner.config.capacity;
        crate::machine::admission::totals(capacity.vcpus, capacity.memory_mib, crate::host::size())
    }

    /// Publishes machine events to watchers (after they were committed).
    pub fn emit(&self, event: MachineEvent) {
        // No receiver is not an error: nobody is watching.
        let _ = self.inner.events.send(event);
    }

    /// Subscribes to machine events.
    pub fn subscribe_events(&self) -> broadcast::Receiver<MachineEvent> {
        self.inner.events.subscribe()
    }

    /// Delivers a route change to the embedded registry's watchers.
    pub fn emit_route(&self, change: RouteChange) {
        let _ = self.inner.routes.send(change);
    }

    /// The published routes, mirrored in memory (see [`crate::route::RouteTable`]).
    pub fn routes_view(&self) -> &crate::route::RouteTable {
        &self.inner.routes_view
    }

    /// The etcd sink's board (see `etcd_sink::status`).
    pub fn sink_board(&self) -> &std::sync::Mutex<super::etcd_sink::Board> {
        &self.inner.sink_board
    }

    /// Subscribes to route changes.
    pub fn subscribe_routes(&self) -> broadcast::Receiver<RouteChange> {
        self.inner.routes.subscribe()
    }
}
