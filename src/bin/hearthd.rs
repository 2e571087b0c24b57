//! hearthd: the worker daemon. Opens the store, starts the actor tree, serves the API,
//! and only then wakes every recorded machine and sweeps orphans: the API answers before
//! recovery and the sweep run.
//!
//! Stopping the daemon (SIGTERM, SIGINT) leaves the machines running; the next start
//! re-adopts them. Destroying a machine is an API call, never a side effect of shutdown.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use hearth::actors::names;
use hearth::actors::services::Listening;
use hearth::actors::services::Services;
use hearth::actors::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};
use hearth::api::{metrics, server};
use hearth::config::{Config, LogFormat};
use hearth::image::BaseStore;
use hearth::net::policy::GUEST_DNS_PORT;
use hearth::net::{NetFabric, PoolCidr};
use hearth::store::Store;
use ractor::Actor;
use tokio::signal::unix::{SignalKind, signal};

/// How long a stopping daemon waits for its API connections to close by themselves
/// (streams and waits are told to end at once; this bounds a slow or stuck client).
const DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// The hearth worker daemon.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long, env = "HEARTH_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("hearthd: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    init_log(config.log.format);
    // Chaos-test builds only: fail points from FAILPOINTS, kept for the process's life.
    #[cfg(feature = "failpoints")]
    let _failpoints = hearth::failpoints::setup();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hearthd: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let format = config.log.format;
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Plain on stderr whatever the log filter says; in JSON too for a pipeline.
            eprintln!("hearthd: {e}");
            if format == LogFormat::Json {
                tracing::error!("{e}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// The log on stderr (the journal under systemd), filtered by `HEARTH_LOG` (default
/// `info`). In JSON each line carries its spans' fields, so a machine's lines name the
/// machine and the step.
fn init_log(format: LogFormat) {
    // The DNS library logs every question at INFO: guests would decide how fast the log
    // grows. Its warnings and errors stay; HEARTH_LOG can ask for more.
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
        .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// The log filter without HEARTH_LOG: INFO for the daemon, WARN for the DNS library.
const DEFAULT_LOG_FILTER: &str = "info,hickory_server=warn,hickory_proto=warn,hickory_net=warn";

async fn run(config: Config) -> Result<(), String> {
    // The TLS files are read and checked before anything touches the host.
    let tls = if config.api.listen.is_empty() {
        None
    } else {
        Some(server::tls_settings(&config.api).map_err(|e| e.to_string())?)
    };
    for dir in [&config.data_dir, &config.cache_dir] {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    // A layout the VMMs cannot use is refused now, naming its key, rather than found by
    // every launch (and retried) later.
    hearth::vmm::confine::check_layout(&config.layout(), &config.vmm)?;
    // A crashed predecessor's lock can outlive it for a moment (see open_waiting).
    let store = Store::open_waiting(&config.store_path(), std::time::Duration::from_secs(5))
        .map_err(|e| format!("{e} ({})", config.store_path().display()))?
        .with_history(hearth::store::HistoryBounds {
            first: config.store.events_first,
            last: config.store.events_last,
        });
    let pool = PoolCidr::parse(&config.network.pool).map_err(|e| format!("network.pool: {e}"))?;
    let net = NetFabric::start().map_err(|e| e.to_string())?;
    // The daemon's packet policy goes in before any machine is woken: a machine's own
    // chains hang off it.
    let mut policy = config
        .network
        .policy(config.dns.guests)
        .map_err(|e| e.to_string())?;
    // The guest resolver takes the pool's last block. A machine that holds it from before
    // (the pool was full while guests did not resolve yet) keeps it: guests go without a
    // resolver until that machine is gone, rather than one address on two links.
    if policy.guest_dns.is_some()
        && let Some(reserved) = pool.resolver_slot()
        && let Some(holder) = store
            .leases()
            .map_err(|e| format!("read leases: {e}"))?
            .get(&reserved)
    {
        tracing::error!(
            machine = %holder,
            "dns.guests: machine {holder} holds the pool's last block, which the guest \
             resolver needs; guests get no resolver until it is destroyed"
        );
        policy.guest_dns = None;
    }
    net.install_policy(policy.clone())
        .await
        .map_err(|e| format!("network policy: {e}"))?;
    let choice = hearth::vmm::select::choose(&config.vmm, &config.layout(), config.kit_source())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(driver = %choice.driver.describe(), reason = %choice.reason, "vmm");
    let vmm = choice.driver;
    let bases = BaseStore::open(&config.layout().images(), config.images.base_settings())
        .map_err(|e| e.to_string())?;
    // Half-made writable layers of an interrupted refill (the stock itself only ever
    // holds complete ones).
    match hearth::image::clear_partials(&config.uppers_dir()) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "half-made writable layers removed"),
        Err(e) => tracing::warn!(error = %e, "half-made writable layers not removed"),
    }
    let host = hearth::vmm::confine::VmmHost::detect(&config.network.prefix, &config.vmm)?;
    hearth::vmm::confine::private_files(&config.layout())?;
    let services = Services::new(config.clone(), store, pool, net, vmm, host);
    // The recorder goes in before any actor runs, so nothing they count is lost.
    // Metrics are optional: an address that cannot be bound (taken by another exporter)
    // is logged as an error and the daemon serves without them, rather than not at all.
    let metrics = if config.metrics.listen.is_empty() {
        None
    } else {
        let handle = metrics::install().map_err(|e| e.to_string())?;
        match metrics::bind(&config.metrics.listen).await {
            Ok(listener) => Some((listener, handle)),
            Err(e) => {
                tracing::error!(error = %e, "serving without metrics");
                None
            }
        }
    };

    let (supervisor, supervisor_done) = Supervisor::spawn(
        Some(names::SUPERVISOR.to_string()),
        Supervisor,
        SupervisorArgs {
            services: services.clone(),
            bases: Arc::new(bases),
        },
    )
    .await
    .map_err(|e| format!("start the supervisor: {e}"))?;

    // Every listener is bound before any machine is woken: a bad address or TLS file
    // stops the start here, naming its key.
    let unix = server::bind(&config.api.socket)
        .map_err(|e| format!("api.socket {}: {e}", config.api.socket.display()))?;
    let tcp = match tls {
        None => None,
        Some(tls) => {
            let listener = server::bind_tcp(&config.api.listen)
                .await
                .map_err(|e| format!("api.listen {}: {e}", config.api.listen))?;
            Some((listener, tls))
        }
    };
    // DNS, like metrics, is optional: a taken address is logged, not fatal.
    let dns = if config.dns.listen.is_empty() {
        None
    } else {
        match hearth::dns::bind(&config.dns.listen).await {
            Ok(sockets) => Some(sockets),
            Err(e) => {
                tracing::error!(error = %e, address = %config.dns.listen, "dns.listen: serving without DNS");
                None
            }
        }
    };
    // The guest resolver's address was put on its link with the policy above.
    let guest_dns = match services.guest_resolver() {
        None => None,
        Some(addr) => {
            let address = std::net::SocketAddr::from((addr, GUEST_DNS_PORT)).to_string();
            match hearth::dns::bind(&address).await {
                Ok(sockets) => Some(sockets),
                Err(e) => {
                    // No hole for port 53 without our resolver behind it: the address
                    // and its rules go, and guests are told of no resolver.
                    tracing::error!(error = %e, %address, "dns.guests: guests cannot resolve names");
                    policy.guest_dns = None;
                    services
                        .net()
                        .install_policy(policy.clone())
                        .await
                        .map_err(|e| format!("network policy without the guest resolver: {e}"))?;
                    None
                }
            }
        }
    };
    let listening = Listening {
        api: tcp.as_ref().and_then(|(l, _)| l.local_addr().ok()),
        metrics: metrics.as_ref().and_then(|(l, _)| metrics::local(l)),
        dns: dns.as_ref().and_then(hearth::dns::local),
        guest_dns: guest_dns.as_ref().and_then(hearth::dns::local),
    };
    services.set_listening(listening.clone());
    tracing::info!(
        socket = %config.api.socket.display(),
        tcp = ?listening.api,
        metrics = ?listening.metrics,
        dns = ?listening.dns,
        guest_dns = ?listening.guest_dns,
        "serving"
    );
    if let Some((listener, handle)) = metrics {
        tokio::spawn(metrics::serve(listener, handle, services.clone()));
    }
    let sockets: Vec<_> = dns.into_iter().chain(guest_dns).collect();
    if !sockets.is_empty() {
        let handler = hearth::dns::Handler::new(
            services.routes_view().clone(),
            &config.dns.domain,
            config.dns.ttl_secs,
        );
        let mut stopping = services.stopping();
        tokio::spawn(hearth::dns::serve(handler, sockets, async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
        }));
    }
    // Recovery runs after the API serves: every recorded machine gets `Reconcile`.
    supervisor
        .cast(SupervisorMsg::WakeAll)
        .map_err(|e| format!("wake machines: {e}"))?;

    // Orphans (hearth's names with no owning record, left by a crash between acquiring
    // and recording or by an older daemon) are released off the API's path: a slow sweep
    // must not delay the API. It only touches ids no live record owns (see audit::sweep).
    let sweeping = services.clone();
    tokio::spawn(async move {
        match hearth::audit::sweep(&sweeping).await {
            Ok(report) => tracing::info!(
                released = report.released.len(),
                kept = report.kept.len(),
                failed = report.failed.len(),
                elapsed_ms = report.elapsed.as_secs_f64() * 1000.0,
                "orphan sweep done"
            ),
            Err(e) => tracing::warn!(error = %e, "orphan sweep could not run"),
        }
    });

    // The guest kit is assembled once per kernel and init (cached on disk); do it now,
    // off the API's path, rather than in the first machine's `vmm` step.
    let warm = services.clone();
    tokio::spawn(async move {
        if let Err(e) = warm.kit().await {
            tracing::warn!(error = %e, "guest kit not ready; machines cannot boot until it is");
        }
    });

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let stopper = services.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down; machines keep running");
        stopper.begin_shutdown();
    });
    // The server stops accepting at once; open streams and waits end with UNAVAILABLE
    // (see `api::machines::async_stream`); a connection still open after the drain is
    // dropped with the process.
    let mut drained = services.stopping();
    let serving = server::serve(
        server::Listeners { unix, tcp },
        services,
        supervisor.clone(),
    );
    tokio::select! {
        served = serving => served.map_err(|e| format!("api: {e}"))?,
        () = async {
            let _ = drained.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(DRAIN).await;
        } => tracing::warn!(drain_secs = DRAIN.as_secs_f64(), "connections still open after the drain; closing them"),
    }
    supervisor.stop(None);
    let _ = supervisor_done.await;
    let _ = std::fs::remove_file(&config.api.socket);
    Ok(())
}
