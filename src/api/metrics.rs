//! The Prometheus endpoint: `GET /metrics` on `metrics.listen`, in the text exposition
//! format, without authentication (keep it on loopback or a private network). Counters
//! and histograms are recorded where things happen (`crate::metrics`); the levels
//! (machines by state, outbox depth, pools, memory) are read from the store and the pool
//! actor at each scrape (one that cannot be read keeps its last value, with a warning).
//! At most [`MAX_CONNECTIONS`] scrapes are served at once, and a client has
//! [`HEADER_TIMEOUT`] to send its request.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::actors::services::Services;
use crate::machine::record::MachineState;
use crate::metrics::{self as m, Kind};

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The recorder could not be installed (one per process).
    #[error("metrics recorder: {0}")]
    Recorder(#[from] BuildError),
    /// The address could not be bound.
    #[error("metrics.listen {address}: {source}")]
    Bind {
        /// The configured address.
        address: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Scrapes served at once; more wait for a turn in the listen backlog.
pub const MAX_CONNECTIONS: usize = 8;

/// How long a client may take to send its request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs the process's Prometheus recorder, with each histogram's buckets from the
/// catalogue.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let mut builder = PrometheusBuilder::new();
    for metric in m::CATALOGUE {
        if let Kind::Histogram(buckets) = metric.kind {
            builder = builder.set_buckets_for_metric(Matcher::Full(metric.name.into()), buckets)?;
        }
    }
    let handle = builder.install_recorder()?;
    m::describe();
    Ok(handle)
}

/// Binds `address` (`host:port`); the bound address is what `GetNode` reports.
pub async fn bind(address: &str) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| MetricsError::Bind {
            address: address.to_string(),
            source,
        })
}

/// Serves scrapes until the daemon stops. Each connection is its own task; a scrape
/// reads the store, never writes it.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, services: Services) {
    // Histograms keep raw samples until upkeep folds them in; do it between scrapes too.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let mut stopping = services.stopping();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|stopping| *stopping) => return,
        };
        let (stream, _) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let services = services.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let handle = handle.clone();
                let services = services.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(answer(request, &handle, &services).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

async fn answer<B>(
    request: hyper::Request<B>,
    handle: &PrometheusHandle,
    services: &Services,
) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, content_type: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if request.uri().path() != "/metrics" {
        return reply(404, "text/plain", "only /metrics is served here\n".into());
    }
    refresh(services).await;
    handle.run_upkeep();
    reply(200, "text/plain; version=0.0.4", handle.render())
}

/// Sets the levels from the store, the pool actor and /proc.
async fn refresh(services: &Services) {
    match services.store().machines() {
        Ok(records) => {
            for state in MachineState::ALL {
                let count = records.iter().filter(|r| r.state == state).count();
                m::set_gauge(m::MACHINES, &[("state", state.name().into())], count as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: machines unreadable"),
    }
    match services.store().outbox_len() {
        Ok(depth) => m::set_gauge(m::OUTBOX_DEPTH, &[], depth as f64),
        Err(e) => tracing::warn!(error = %e, "metrics: outbox unreadable"),
    }
    let pools = crate::actors::ask(
        crate::actors::names::POOLS,
        crate::actors::pools::PoolMsg::Status,
        Duration::from_secs(2),
    )
    .await
    .unwrap_or_default();
    for pool in pools {
        let labels = [("pool", pool.name.clone())];
        m::set_gauge(m::POOL_SIZE, &labels, f64::from(pool.size));
        m::set_gauge(m::POOL_READY, &labels, f64::from(pool.ready));
        m::set_gauge(m::POOL_REFILLING, &labels, f64::from(pool.refilling));
        m::set_counter(m::POOL_CLAIMS, &labels, pool.claims);
    }
    if let Some(sink) = crate::actors::etcd_sink::status(services) {
        let labels = [("sink", sink.name.clone())];
        m::set_gauge(m::SINK_PENDING, &labels, sink.pending.len() as f64);
        m::set_gauge(m::SINK_IN_SYNC, &labels, f64::from(u8::from(sink.in_sync)));
        m::set_gauge(m::SINK_LAG, &labels, sink.lag_ms as f64 / 1000.0);
    }
    if let Some(bytes) = resident_bytes() {
        m::set_gauge(m::RESIDENT_MEMORY, &[], bytes as f64);
    }
}

/// This process's resident set, from `/proc/self/statm` (pages).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// The address actually bound (the configured one may have port 0).
pub fn local(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
