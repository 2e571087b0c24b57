//! EtcdSink: the singleton that makes etcd hold exactly this host's published routes
//! (`sinks::layout`: SkyDNS keys for CoreDNS and route records for proxies), every key
//! under one lease this host keeps alive. If the host dies, its keys expire with the lease
//! (`etcd.lease_ttl_secs`).
//!
//! It is level-triggered: whenever the routes change (their broadcast, coalesced: one
//! sync pending at most) and on every tick (a third of the TTL), it compares the routes
//! mirror (`Services::routes_view`) with what it knows etcd holds and writes the
//! difference in transactions. The lease is kept alive by a task of its own, so a long
//! sync never lets it lapse; a keep-alive that fails or finds the lease gone makes the
//! sink start afresh.
//!
//! Starting afresh (at start, and after any failure): a new connection, a new lease, the
//! keys etcd holds for this host read again (names only), and every wanted key written
//! again under the new lease (a key written again leaves its old lease, which then
//! expires holding nothing); extras planted or left while it was away are removed (only
//! keys of this host's exact shapes). Until then every route counts as pending. An outage
//! never blocks a machine: publish and unpublish steps commit to the store and return;
//! this sink catches up when etcd answers again, and reports the routes still pending
//! meanwhile (GetNode `sinks`, ListRoutes `pending_sinks`), from a board it updates after
//! every attempt, so a report never waits for a sync in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use super::machine::now_ms;
use super::services::Services;
use crate::sinks::layout::Layout;

/// How long one etcd call may take before the sink counts it as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Operations per transaction (etcd's default limit is 128).
const TXN_OPS: usize = 100;

/// Messages to the sink.
pub enum EtcdMsg {
    /// The routes changed: bring etcd in line.
    Changed,
    /// Retry whatever failed, and check the line.
    Tick,
    /// The keep-alive task found lease `id` gone (or could not renew it).
    LeaseLost(i64),
}

/// What the sink reports (read from its board, never by asking the actor).
#[derive(Debug, Clone, Default)]
pub struct SinkStatus {
    /// `etcd`.
    pub name: String,
    /// Its endpoints.
    pub endpoints: Vec<String>,
    /// True while etcd answers and holds what the records say.
    pub in_sync: bool,
    /// Published routes not (yet) fully in etcd, by machine id.
    pub pending: Vec<String>,
    /// The last failure, while it lasts.
    pub last_error: Option<String>,
    /// When etcd last held exactly the records (ms since the epoch; 0: never).
    pub last_sync_ms: u64,
    /// How far behind etcd may be: 0 while in sync; otherwise the time since it last held
    /// exactly the records (or since the sink started, when it never has), in ms.
    pub lag_ms: u64,
}

/// What the actor posts after every attempt; reports are computed from it and the
/// routes mirror at the moment they are asked for.
#[derive(Debug, Clone, Default)]
pub struct Board {
    /// Machines whose keys etcd holds, as the sink last knew.
    delivered: BTreeSet<String>,
    last_error: Option<String>,
    last_sync_ms: u64,
    /// When the sink first started (ms since the epoch), kept across its restarts.
    since_ms: u64,
}

/// The sink actor.
pub struct EtcdSink;

/// The etcd sink's state, when one is configured.
pub fn status(services: &Services) -> Option<SinkStatus> {
    let etcd = &services.config().etcd;
    if etcd.endpoints.is_empty() {
        return None;
    }
    let board = services
        .sink_board()
        .lock()
        .map(|b| b.clone())
        .unwrap_or_default();
    let pending: Vec<String> = services
        .routes_view()
        .all()
        .into_iter()
        .map(|route| route.machine_id)
        .filter(|id| !board.delivered.contains(id))
        .collect();
    let in_sync = board.last_error.is_none() && board.last_sync_ms > 0 && pending.is_empty();
    let lag_ms = if in_sync {
        0
    } else {
        let since = if board.last_sync_ms > 0 {
            board.last_sync_ms
        } else {
            board.since_ms
        };
        now_ms().saturating_sub(since)
    };
    Some(SinkStatus {
        name: "etcd".to_string(),
        endpoints: etcd.endpoints.clone(),
        in_sync,
        pending,
        last_error: board.last_error,
        last_sync_ms: board.last_sync_ms,
        lag_ms,
    })
}

/// The sinks that do not hold machine `id`'s route yet, by name: empty when it is not
/// published or every sink holds it. `status` is [`status`]'s answer, read once for
/// many machines.
pub fn pending_for(status: Option<&SinkStatus>, id: &str) -> Vec<String> {
    status
        .filter(|s| s.pending.iter().any(|p| p == id))
        .map(|s| vec![s.name.clone()])
        .unwrap_or_default()
}

/// Its state.
pub struct SinkState {
    services: Services,
    layout: Layout,
    client: Option<Client>,
    lease: Option<Lease>,
    /// This host's keys as etcd holds them, as far as the sink knows ("" for a value it
    /// did not read: written again).
    known: BTreeMap<String, String>,
    /// True when `known` was read from etcd under the current lease (or kept since).
    read: bool,
    last_error: Option<String>,
    last_sync_ms: u64,
    /// Set by the forwarder when a change is waiting; cleared when a sync starts.
    dirty: Arc<AtomicBool>,
    forwarder: Option<JoinHandle<()>>,
}

struct Lease {
    id: i64,
    /// Renews it every third of the TTL; reports its loss.
    keeper: JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Runs `call` with [`CALL_TIMEOUT`], as a string error.
async fn timed<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {CALL_TIMEOUT:?}")),
    }
}

impl EtcdSink {
    fn options(services: &Services) -> Result<ConnectOptions, String> {
        let etcd = &services.config().etcd;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT);
        if !etcd.tls_ca.as_os_str().is_empty() {
            let read = |key: &str, path: &std::path::Path| {
                std::fs::read(path).map_err(|e| format!("{key} {}: {e}", path.display()))
            };
            let mut tls = etcd_client::TlsOptions::new().ca_certificate(
                etcd_client::Certificate::from_pem(read("etcd.tls_ca", &etcd.tls_ca)?),
            );
            if !etcd.tls_cert.as_os_str().is_empty() {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    read("etcd.tls_cert", &etcd.tls_cert)?,
                    read("etcd.tls_key", &etcd.tls_key)?,
                ));
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }

    /// Grants a lease and starts its keep-alive task.
    async fn lease(
        client: &mut Client,
        ttl_secs: u32,
        myself: &ActorRef<EtcdMsg>,
    ) -> Result<Lease, String> {
        let granted = timed("lease grant", client.lease_grant(i64::from(ttl_secs), None)).await?;
        let id = granted.id();
        let (mut keeper, mut answers) =
            timed("lease keep-alive", client.lease_keep_alive(id)).await?;
        let me = myself.clone();
        let every = Duration::from_millis(u64::from(ttl_secs) * 1000 / 3);
        let task = tokio::spawn(async move {
            // lease_keep_alive sent the first renewal; every answer is read, in turn.
            loop {
                let alive = match timed("lease keep-alive answer", answers.message()).await {
                    Ok(Some(answer)) => answer.ttl() > 0,
                    Ok(None) | Err(_) => false,
                };
                if !alive {
                    let _ = me.cast(EtcdMsg::LeaseLost(id));
                    return;
                }
                tokio::time::sleep(every).await;
                if timed("lease keep-alive", keeper.keep_alive())
                    .await
                    .is_err()
                {
                    let _ = me.cast(EtcdMsg::LeaseLost(id));
                    return;
                }
            }
        });
        Ok(Lease { id, keeper: task })
    }

    /// One attempt to bring etcd in line.
    async fn sync(state: &mut SinkState, myself: &ActorRef<EtcdMsg>) -> Result<(), String> {
        let services = state.services.clone();
        let etcd = &services.config().etcd;
        if state.client.is_none() {
            let options = Self::options(&services)?;
            let client = timed("connect", Client::connect(&etcd.endpoints, Some(options))).await?;
            state.client = Some(client);
        }
        let Some(client) = state.client.as_mut() else {
            return Ok(());
        };
        if state.lease.is_none() {
            state.lease = Some(Self::lease(client, etcd.lease_ttl_secs, myself).await?);
            state.read = false;
        }
        let Some(lease_id) = state.lease.as_ref().map(|l| l.id) else {
            return Ok(());
        };
        if !state.read {
            // Names only (every wanted key is written again under the new lease anyway),
            // so the answer stays small however many hosts share the tree.
            let mut present = BTreeMap::new();
            for prefix in [
                format!("{}/", state.layout.skydns_root()),
                state.layout.routes_prefix(),
            ] {
                let answer = timed(
                    "read keys",
                    client.get(
                        prefix,
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    ),
                )
                .await?;
                for kv in answer.kvs() {
                    if let Ok(key) = kv.key_str()
                        && state.layout.owns(key)
                    {
                        present.insert(key.to_string(), String::new());
                    }
                }
            }
            state.known = present;
            state.read = true;
        }
        let routes = services.routes_view().all();
        let plan = state.layout.reconcile(&routes, &state.known);
        // Each operation with the key it changes and the value it leaves (none: deleted).
        let mut ops: Vec<(TxnOp, String, Option<String>)> = Vec::new();
        for (key, value) in plan.put {
            let op = TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease_id)),
            );
            ops.push((op, key, Some(value)));
        }
        for key in plan.delete {
            ops.push((TxnOp::delete(key.clone(), None), key, None));
        }
        for chunk in ops.chunks(TXN_OPS) {
            let txn = Txn::new().and_then(
                chunk
                    .iter()
                    .map(|(op, _, _)| op.clone())
                    .collect::<Vec<_>>(),
            );
            crate::failpoints::hit("etcd_sink.write.before_effect");
            timed("write keys", client.txn(txn)).await?;
            crate::failpoints::hit("etcd_sink.write.after_effect");
            for (_, key, value) in chunk {
                match value {
                    Some(value) => state.known.insert(key.clone(), value.clone()),
                    None => state.known.remove(key),
                };
            }
        }
        state.last_sync_ms = now_ms();
        Ok(())
    }

    /// Forgets the connection, the lease and what etcd holds: the next sync starts afresh
    /// and, until it is done, every route counts as pending.
    fn reset(state: &mut SinkState) {
        state.client = None;
        state.lease = None;
        state.read = false;
        state.known.clear();
    }

    /// Posts what reports are computed from.
    fn post(state: &SinkState) {
        let delivered = state
            .services
            .routes_view()
            .all()
            .into_iter()
            .filter(|route| {
                state
                    .layout
                    .entries(route)
                    .iter()
                    .all(|(key, value)| state.known.get(key) == Some(value))
            })
            .map(|route| route.machine_id)
            .collect();
        if let Ok(mut board) = state.services.sink_board().lock() {
            *board = Board {
                delivered,
                last_error: state.last_error.clone(),
                last_sync_ms: state.last_sync_ms,
                since_ms: board.since_ms,
            };
        }
    }

    fn tick_every(services: &Services) -> Duration {
        Duration::from_millis(u64::from(services.config().etcd.lease_ttl_secs) * 1000 / 3)
            .max(Duration::from_millis(500))
    }
}

impl Actor for EtcdSink {
    type Msg = EtcdMsg;
    type State = SinkState;
    type Arguments = Services;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        services: Services,
    ) -> Result<SinkState, ActorProcessingErr> {
        let config = services.config();
        let layout = Layout {
            domain: config.dns.domain.clone(),
            host: config.etcd.host_name(),
            ttl: config.dns.ttl_secs,
        };
        if let Ok(mut board) = services.sink_board().lock()
            && board.since_ms == 0
        {
            board.since_ms = now_ms();
        }
        let dirty = Arc::new(AtomicBool::new(false));
        let forwarder = if config.etcd.endpoints.is_empty() {
            None
        } else {
            // Every route change (or a lag: something changed) asks for a sync, unless
            // one is already waiting.
            let mut changes = services.subscribe_routes();
            let me = myself.clone();
            let waiting = dirty.clone();
            let task = tokio::spawn(async move {
                loop {
                    match changes.recv().await {
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            if !waiting.swap(true, Ordering::AcqRel)
                                && me.cast(EtcdMsg::Changed).is_err()
                            {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
            dirty.store(true, Ordering::Release);
            myself.cast(EtcdMsg::Changed)?;
            myself.send_after(Self::tick_every(&services), || EtcdMsg::Tick);
            Some(task)
        };
        Ok(SinkState {
            services,
            layout,
            client: None,
            lease: None,
            known: BTreeMap::new(),
            read: false,
            last_error: None,
            last_sync_ms: 0,
            dirty,
            forwarder,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut SinkState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(task) = state.forwarder.take() {
            task.abort();
        }
        state.lease = None;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut SinkState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            EtcdMsg::Changed => state.dirty.store(false, Ordering::Release),
            EtcdMsg::Tick => {
                myself.send_after(Self::tick_every(&state.services), || EtcdMsg::Tick);
            }
            EtcdMsg::LeaseLost(id) => {
                if state.lease.as_ref().is_none_or(|l| l.id != id) {
                    return Ok(());
                }
                tracing::warn!(lease = id, "etcd lease lost; writing every key again");
                Self::reset(state);
            }
        }
        if state.services.config().etcd.endpoints.is_empty() {
            return Ok(());
        }
        match Self::sync(state, &myself).await {
            Ok(()) => {
                if state.last_error.take().is_some() {
                    tracing::info!("etcd sink in line with the records again");
                }
            }
            Err(e) => {
                if state.last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "etcd sink: will retry");
                }
                state.last_error = Some(e);
                Self::reset(state);
            }
        }
        Self::post(state);
        Ok(())
    }
}
