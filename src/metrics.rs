//! The daemon's metrics: every name is declared once in [`CATALOGUE`] (kind, help, and the
//! histogram buckets where there are any), and recorded through the small functions here,
//! so a call site cannot misspell a name or invent a label. The figures go to the global
//! `metrics` recorder; `api::metrics` installs the Prometheus one and serves it. Without a
//! recorder (unit tests, tools) every call is a no-op.
//!
//! Labels only take values from closed sets (step names, state names, method names the
//! API serves, singleton names), so no caller can grow the series without bound.

use std::time::Duration;

use serde::Deserialize;

use crate::machine::step::{Direction, Step};

/// What a metric is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// A level, set at each scrape or change.
    Gauge,
    /// A distribution of durations, in seconds.
    Histogram(&'static [f64]),
}

/// One metric: its exported name, kind and help text.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    /// The name in the exposition (`hearth_` prefix; counters end in `_total`).
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The help line.
    pub help: &'static str,
}

/// Step effects range from tens of microseconds (a record-only step) to a minute (a boot
/// that waits for readiness).
const STEP_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
];

/// API calls: most answer in under a millisecond; waits and streams run long.
const API_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
    30.0, 120.0,
];

/// A step effect's duration, by `step` and `direction`.
pub const STEP_DURATION: Metric = Metric {
    name: "hearth_step_duration_seconds",
    kind: Kind::Histogram(STEP_BUCKETS),
    help: "How long a step's host effect took, by step and direction (acquire or release).",
};
/// A failed step effect, by `step`, `direction` and `class` (retry or permanent).
pub const STEP_FAILURES: Metric = Metric {
    name: "hearth_step_failures_total",
    kind: Kind::Counter,
    help: "Step effects that failed, by step, direction and class (retry or permanent).",
};
/// Machines by recorded `state` (destroyed ones count until compaction removes them).
pub const MACHINES: Metric = Metric {
    name: "hearth_machines",
    kind: Kind::Gauge,
    help: "Machine records by state, read from the store at each scrape.",
};
/// Actor failures that were restarted, by `actor` (`machine` or a singleton's name).
pub const ACTOR_RESTARTS: Metric = Metric {
    name: "hearth_actor_restarts_total",
    kind: Kind::Counter,
    help: "Actors that failed and were restarted by the supervisor, by actor.",
};
/// Route changes not yet delivered to every sink.
pub const OUTBOX_DEPTH: Metric = Metric {
    name: "hearth_outbox_depth",
    kind: Kind::Gauge,
    help: "Route changes waiting in the durable outbox.",
};
/// A pool's target size, by `pool`.
pub const POOL_SIZE: Metric = Metric {
    name: "hearth_pool_size",
    kind: Kind::Gauge,
    help: "A prepared-capacity pool's target number of machines, by pool.",
};
/// A pool's machines ready to be claimed, by `pool`.
pub const POOL_READY: Metric = Metric {
    name: "hearth_pool_ready",
    kind: Kind::Gauge,
    help: "Prepared machines ready to be claimed, by pool.",
};
/// A pool's machines being built, by `pool`.
pub const POOL_REFILLING: Metric = Metric {
    name: "hearth_pool_refilling",
    kind: Kind::Gauge,
    help: "Prepared machines being built, by pool.",
};
/// Creates served from a pool since the daemon started, by `pool`.
pub const POOL_CLAIMS: Metric = Metric {
    name: "hearth_pool_claims_total",
    kind: Kind::Counter,
    help: "Creates served from the pool since the daemon started, by pool.",
};
/// API calls by `method` (`Service/Method`), until the response's headers: the whole
/// call for unary methods, the time to the first answer for streams.
pub const API_DURATION: Metric = Metric {
    name: "hearth_api_request_duration_seconds",
    kind: Kind::Histogram(API_BUCKETS),
    help: "API calls by method, until the response headers (a stream's first answer).",
};
/// Published routes a sink does not hold yet, by `sink`.
pub const SINK_PENDING: Metric = Metric {
    name: "hearth_sink_pending_routes",
    kind: Kind::Gauge,
    help: "Published routes a sink beyond the daemon does not hold yet, by sink.",
};
/// 1 while a sink holds exactly the published routes, by `sink`.
pub const SINK_IN_SYNC: Metric = Metric {
    name: "hearth_sink_in_sync",
    kind: Kind::Gauge,
    help: "1 while the sink holds exactly the published routes, else 0, by sink.",
};
/// How far behind a sink may be, by `sink`.
pub const SINK_LAG: Metric = Metric {
    name: "hearth_sink_lag_seconds",
    kind: Kind::Gauge,
    help: "0 while the sink is in sync, else seconds since it last held exactly the routes.",
};
/// Store commits by `durability` (`durable`: flushed to disk before it returns; `lazy`:
/// carried by the next durable one).
pub const STORE_COMMIT: Metric = Metric {
    name: "hearth_store_commit_seconds",
    kind: Kind::Histogram(STEP_BUCKETS),
    help: "How long a store commit took, by durability (durable: flushed to disk; lazy: not).",
};
/// The daemon's resident memory.
pub const RESIDENT_MEMORY: Metric = Metric {
    name: "hearth_resident_memory_bytes",
    kind: Kind::Gauge,
    help: "The daemon's resident set size, read at each scrape.",
};

/// Every metric the daemon exports.
pub const CATALOGUE: &[Metric] = &[
    STEP_DURATION,
    STEP_FAILURES,
    MACHINES,
    ACTOR_RESTARTS,
    OUTBOX_DEPTH,
    POOL_SIZE,
    POOL_READY,
    POOL_REFILLING,
    POOL_CLAIMS,
    API_DURATION,
    SINK_PENDING,
    SINK_IN_SYNC,
    SINK_LAG,
    STORE_COMMIT,
    RESIDENT_MEMORY,
];

/// Registers every metric's help text with the installed recorder, and every failure
/// counter at zero (each step, direction and class), so a query sees a series that has
/// not happened yet as 0 rather than as missing.
pub fn describe() {
    for metric in CATALOGUE {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            Kind::Histogram(_) => metrics::describe_histogram!(metric.name, metric.help),
        }
    }
    for info in crate::machine::step::CATALOGUE {
        for direction in [Direction::Acquire, Direction::Release] {
            for class in ["retry", "permanent"] {
                metrics::counter!(
                    STEP_FAILURES.name,
                    "step" => info.name,
                    "direction" => direction.name(),
                    "class" => class
                )
                .increment(0);
            }
        }
    }
}

/// Registers `actor`'s restart counter at zero (the supervisor names its children).
pub fn restarts_known(actor: &str) {
    metrics::counter!(ACTOR_RESTARTS.name, "actor" => actor.to_string()).increment(0);
}

/// A step's effect finished: its duration, and its failure class when it failed.
pub fn step_finished(step: Step, direction: Direction, took: Duration, failure: Option<bool>) {
    let labels = [("step", step.name()), ("direction", direction.name())];
    metrics::histogram!(STEP_DURATION.name, &labels).record(took.as_secs_f64());
    if let Some(permanent) = failure {
        let class = if permanent { "permanent" } else { "retry" };
        metrics::counter!(
            STEP_FAILURES.name,
            "step" => step.name(),
            "direction" => direction.name(),
            "class" => class
        )
        .increment(1);
    }
}

/// The supervisor restarted `actor` (`machine`, or a singleton's registered name).
pub fn actor_restarted(actor: &str) {
    metrics::counter!(ACTOR_RESTARTS.name, "actor" => actor.to_string()).increment(1);
}

/// A store commit took `took` (`durable`: flushed to disk before it returned).
pub fn store_committed(durable: bool, took: Duration) {
    let durability = if durable { "durable" } else { "lazy" };
    metrics::histogram!(STORE_COMMIT.name, "durability" => durability).record(took.as_secs_f64());
}

/// An API call to `method` took `took` to its response headers.
pub fn api_call(method: &'static str, took: Duration) {
    metrics::histogram!(API_DURATION.name, "method" => method).record(took.as_secs_f64());
}

/// Sets a counter kept elsewhere (the pool actor's claims) to its total.
pub fn set_counter(metric: Metric, labels: &[(&'static str, String)], total: u64) {
    metrics::counter!(metric.name, to_labels(labels)).absolute(total);
}

fn to_labels(labels: &[(&'static str, String)]) -> Vec<metrics::Label> {
    labels
        .iter()
        .map(|(key, value)| metrics::Label::new(*key, value.clone()))
        .collect()
}

/// Sets a gauge with the given labels.
pub fn set_gauge(metric: Metric, labels: &[(&'static str, String)], value: f64) {
    metrics::gauge!(metric.name, to_labels(labels)).set(value);
}

/// The Prometheus endpoint (`[metrics]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `IP:port` serving `GET /metrics` in the text exposition format, without
    /// authentication; empty turns it off. Loopback by default. An address that cannot be
    /// bound is logged and the daemon runs without metrics.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9464".to_string(),
        }
    }
}
