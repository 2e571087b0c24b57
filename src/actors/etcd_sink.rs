//! EtcdSink: the singleton that makes etcd hold exactly this host's published routes
//! (`sinks::layout`: SkyDNS keys for CoreDNS and route records for proxies), every key
//! under one lease this host keeps alive. If the host dies, its keys expire with the lease
//! (`etcd.lease_ttl_secs`).
//!
//! It is level-triggered: whenever the routes change (their broadcast) and on every tick
//! (a third of the TTL), it compares the routes mirror (`Services::routes_view`) with
//! what it knows etcd holds and writes the difference in transactions. What it knows is
//! read again from etcd after any failure and at start, so extras planted or left while
//! it was away are removed (only keys this host owns), and missing ones written. After a
//! failure it starts afresh with a new connection and a new lease, and writes every key
//! again under it (a key written again leaves its old lease, which then expires holding
//! nothing). An outage never blocks a machine: publish and unpublish steps commit
//! to the store and return; this sink catches up when etcd answers again, and reports the
//! routes still pending meanwhile (`GetNode`).

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
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
    /// Keep the lease alive, and retry whatever failed.
    Tick,
    /// The sink's state, for GetNode.
    Status(RpcReplyPort<SinkStatus>),
}

/// What the sink reports.
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
    /// The last failure, when the last attempt failed.
    pub last_error: Option<String>,
    /// When etcd last held exactly the records (ms since the epoch; 0: never).
    pub last_sync_ms: u64,
}

/// The sink actor.
pub struct EtcdSink;

/// The etcd sink's state, when one is configured and it answers within `patience`.
pub async fn status(services: &Services, patience: Duration) -> Option<SinkStatus> {
    if services.config().etcd.endpoints.is_empty() {
        return None;
    }
    super::ask(super::names::ETCD_SINK, EtcdMsg::Status, patience)
        .await
        .ok()
}

/// Its state.
pub struct SinkState {
    services: Services,
    layout: Layout,
    client: Option<Client>,
    lease: Option<Lease>,
    /// This host's keys as etcd holds them, as far as the sink knows.
    known: BTreeMap<String, String>,
    /// True when `known` was read from etcd (or kept in step since).
    read: bool,
    last_error: Option<String>,
    last_sync_ms: u64,
    forwarder: Option<JoinHandle<()>>,
}

struct Lease {
    id: i64,
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
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

    /// One attempt to bring etcd in line; `tick` also renews the lease.
    async fn sync(state: &mut SinkState, tick: bool) -> Result<(), String> {
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
        if tick && let Some(lease) = state.lease.as_mut() {
            timed("lease keep-alive", lease.keeper.keep_alive()).await?;
            let answer = timed("lease keep-alive answer", lease.answers.message()).await?;
            if answer.is_none_or(|a| a.ttl() <= 0) {
                // Expired (an outage longer than the TTL): every key went with it.
                tracing::warn!(
                    lease = lease.id,
                    "etcd lease expired; writing every key again"
                );
                state.lease = None;
            }
        }
        if state.lease.is_none() {
            let granted = timed(
                "lease grant",
                client.lease_grant(i64::from(etcd.lease_ttl_secs), None),
            )
            .await?;
            let (keeper, answers) =
                timed("lease keep-alive", client.lease_keep_alive(granted.id())).await?;
            state.lease = Some(Lease {
                id: granted.id(),
                keeper,
                answers,
            });
            // Keys under an older lease would expire with it: write them all again.
            state.read = false;
        }
        let Some(lease_id) = state.lease.as_ref().map(|l| l.id) else {
            return Ok(());
        };
        if !state.read {
            let mut present = BTreeMap::new();
            for prefix in [
                format!("{}/", state.layout.skydns_root()),
                state.layout.routes_prefix(),
            ] {
                let answer = timed(
                    "read keys",
                    client.get(prefix, Some(GetOptions::new().with_prefix())),
                )
                .await?;
                for kv in answer.kvs() {
                    let (Ok(key), Ok(value)) = (kv.key_str(), kv.value_str()) else {
                        continue;
                    };
                    if state.layout.owns(key) {
                        // Written under which lease is unknown: every wanted key is
                        // written again, so none stays tied to an older lease.
                        let value = if kv.lease() == lease_id { value } else { "" };
                        present.insert(key.to_string(), value.to_string());
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

    fn status(state: &SinkState) -> SinkStatus {
        let routes = state.services.routes_view().all();
        let pending: Vec<String> = routes
            .iter()
            .filter(|route| {
                state
                    .layout
                    .entries(route)
                    .iter()
                    .any(|(key, value)| state.known.get(key) != Some(value))
            })
            .map(|route| route.machine_id.clone())
            .collect();
        SinkStatus {
            name: "etcd".to_string(),
            endpoints: state.services.config().etcd.endpoints.clone(),
            in_sync: state.last_error.is_none() && pending.is_empty() && state.read,
            pending,
            last_error: state.last_error.clone(),
            last_sync_ms: state.last_sync_ms,
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
        let forwarder = if config.etcd.endpoints.is_empty() {
            None
        } else {
            // Every route change (or a lag: something changed) asks for a sync.
            let mut changes = services.subscribe_routes();
            let me = myself.clone();
            let task = tokio::spawn(async move {
                loop {
                    match changes.recv().await {
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            if me.cast(EtcdMsg::Changed).is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
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
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut SinkState,
    ) -> Result<(), ActorProcessingErr> {
        let tick = match message {
            EtcdMsg::Status(reply) => {
                let _ = reply.send(Self::status(state));
                return Ok(());
            }
            EtcdMsg::Changed => false,
            EtcdMsg::Tick => {
                myself.send_after(Self::tick_every(&state.services), || EtcdMsg::Tick);
                true
            }
        };
        if state.services.config().etcd.endpoints.is_empty() {
            return Ok(());
        }
        match Self::sync(state, tick).await {
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
                // Start afresh once etcd answers: a new connection and a new lease (a
                // key written again moves to it; the old lease expires with nothing),
                // and what etcd holds read again.
                state.client = None;
                state.lease = None;
                state.read = false;
            }
        }
        Ok(())
    }
}
