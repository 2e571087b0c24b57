//! hearth: the operator's CLI. Talks to hearthd over its Unix socket; prints tables for
//! people and `--json` for scripts.

/// `println!` for the CLI's output: when the reader of stdout has gone (`hearth node
/// audit | head -2`), the CLI stops quietly with success instead of panicking; any other
/// failure to write is reported and exits 1.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::output_failed(e);
        }
    }};
}

mod doctor;
mod image;
mod timeline;

use hearth::text::printable;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use comfy_table::Table;
use hearth::api::pb;
use hearth::client::{Client, connect};
use serde_json::json;

/// The socket the CLI calls unless told otherwise (`doctor` reads the config's instead).
const DEFAULT_SOCKET: &str = "/run/hearth/hearthd.sock";

/// Operate a hearthd.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// hearthd's API socket.
    #[arg(long, env = "HEARTH_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// A daemon's TCP listener instead of the socket (`https://host:7443`), with mutual
    /// TLS: needs --tls-ca, --tls-cert and --tls-key.
    #[arg(long, env = "HEARTH_ADDRESS")]
    address: Option<String>,
    /// The CA (PEM) that signed the daemon's certificate.
    #[arg(long, env = "HEARTH_TLS_CA", requires = "address")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), signed by the daemon's `api.tls_client_ca`.
    #[arg(long, env = "HEARTH_TLS_CERT", requires = "address")]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "HEARTH_TLS_KEY", requires = "address")]
    tls_key: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Machines on this host.
    #[command(subcommand)]
    Machine(Box<MachineCommand>),
    /// The image cache: pull ahead, list, remove, prune.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Checks what this host needs to run hearthd (KVM or TCG, the VMM, nftables,
    /// cgroups, the guest kernel and init, free space, the socket), each with a verdict
    /// and a fix; exits 1 when one fails. Needs no running daemon.
    Doctor {
        /// The daemon's config (default: /etc/hearth/hearthd.toml when present, else the
        /// defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The host's capacity and usage (and `node audit`).
    Node {
        #[command(subcommand)]
        command: Option<NodeCommand>,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Compare the host with the machine records: leaks (owned by no record) and missing
    /// resources (marked done, not there). Exits with status 1 when there are leaks.
    Audit,
}

#[derive(Subcommand)]
// Parsed once per run: the size of the biggest variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum MachineCommand {
    /// Create and start a machine.
    Create {
        /// Unique name (a DNS label).
        #[arg(long)]
        name: String,
        /// "demo"; an absolute path to a root filesystem directory or .tar[.gz] file; a
        /// registry reference host[:port]/repo:tag; or an OCI layout oci:/dir[:tag].
        /// A registry image is pulled on demand.
        #[arg(long, default_value = "demo")]
        image: String,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = 128)]
        memory_mib: u32,
        /// Idempotency key; a retry with the same key returns the same machine.
        #[arg(long)]
        request_id: Option<String>,
        /// TCP ports the workload serves.
        #[arg(long = "port")]
        ports: Vec<u32>,
        /// Environment, KEY=VALUE.
        #[arg(long = "env")]
        env: Vec<String>,
        /// Replaces the image's entrypoint (repeat for its arguments); the image's default
        /// command is then dropped.
        #[arg(long = "entrypoint")]
        entrypoint: Vec<String>,
        /// Replaces the image's working directory.
        #[arg(long, default_value = "")]
        workdir: String,
        /// Replaces the image's user: user[:group].
        #[arg(long, default_value = "")]
        user: String,
        /// Root disk size in MiB (0: the image's).
        #[arg(long, default_value_t = 0)]
        disk_mib: u32,
        /// Claim a prepared machine from this pool (fails when it has none ready);
        /// without it, a create matching a pool's image and shape claims when it can.
        #[arg(long, default_value = "")]
        pool: String,
        /// Record the machine stopped, without booting it (`machine start` boots it).
        #[arg(long)]
        stopped: bool,
        /// The workload (after `--`); empty means the image's default.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List machines.
    List {
        /// Include destroyed machines.
        #[arg(long)]
        all: bool,
        /// Include the pools' prepared machines.
        #[arg(long)]
        prepared: bool,
    },
    /// Show one machine with its step timings.
    Get {
        /// Machine id.
        id: String,
    },
    /// Start a machine.
    Start {
        /// Machine id.
        id: String,
    },
    /// Stop a machine.
    Stop {
        /// Machine id.
        id: String,
    },
    /// Destroy a machine.
    Destroy {
        /// Machine id.
        id: String,
    },
    /// Wait until a machine reaches a state.
    Wait {
        /// Machine id.
        id: String,
        /// created, starting, started, stopping, stopped, destroying, destroyed, failed.
        state: String,
        /// Seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u32,
    },
    /// Lifecycle events (of one machine, or all): the recorded history, and with
    /// `--follow` live events after it.
    Events {
        /// Machine id.
        id: Option<String>,
        /// Go on with live events after the history, until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
}

fn state_name(value: i32) -> String {
    pb::MachineState::try_from(value)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("MACHINE_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| value.to_string())
}

fn machine_json(m: &pb::Machine) -> serde_json::Value {
    json!({
        "id": m.id, "name": m.name, "request_id": m.request_id, "state": state_name(m.state),
        "current_step": m.current_step, "guest_ip": m.guest_ip, "vmm_pid": m.vmm_pid,
        "failure": m.failure, "boot_attempts": m.boot_attempts,
        "disk_layout": m.disk_layout, "pending_sinks": m.pending_sinks,
        "timings": m.timings.iter().map(|t| json!({
            "step": t.step, "direction": t.direction, "started_at_ms": t.started_at_ms,
            "duration_us": t.duration_us, "outcome": t.outcome,
        })).collect::<Vec<_>>(),
    })
}

fn print_machines(json_out: bool, machines: &[pb::Machine]) {
    if json_out {
        let all: Vec<_> = machines.iter().map(machine_json).collect();
        outln!("{}", serde_json::Value::Array(all));
        return;
    }
    let mut table = Table::new();
    table.set_header(["ID", "NAME", "STATE", "STEP", "IP", "PID"]);
    for m in machines {
        table.add_row([
            printable(&m.id),
            printable(&m.name),
            state_name(m.state),
            printable(&m.current_step),
            m.guest_ip.clone(),
            if m.vmm_pid == 0 {
                String::new()
            } else {
                m.vmm_pid.to_string()
            },
        ]);
    }
    outln!("{table}");
}

fn print_machine(json_out: bool, m: &pb::Machine) {
    if json_out {
        outln!("{}", machine_json(m));
        return;
    }
    print_machines(false, std::slice::from_ref(m));
    if !m.failure.is_empty() {
        // Failures can quote the guest (its error, its console): shown, never obeyed.
        outln!("failure: {}", printable(&m.failure));
    }
    outln!("disk: {}", printable(&m.disk_layout));
    if !m.pending_sinks.is_empty() {
        outln!(
            "publication pending in: {}",
            printable(&m.pending_sinks.join(", "))
        );
    }
    // The latest run as a timeline: one bar per step on a shared axis.
    let (rows, earlier) = timeline::latest_run(&m.timings, TIMELINE_WIDTH);
    let mut table = Table::new();
    table.set_header(["STEP", "DIRECTION", "AT MS", "MS", "TIMELINE", "OUTCOME"]);
    for row in &rows {
        let t = &m.timings[row.index];
        table.add_row([
            t.step.clone(),
            t.direction.clone(),
            format!("{:.1}", row.offset_ms),
            format!("{:.2}", t.duration_us as f64 / 1000.0),
            row.bar.clone(),
            printable(&t.outcome),
        ]);
    }
    outln!("{table}");
    if earlier > 0 {
        outln!("({earlier} earlier step runs not drawn; --json lists every one)");
    }
}

/// Characters of the timeline's time axis.
const TIMELINE_WIDTH: usize = 40;

fn kind_name(value: i32) -> String {
    pb::ResourceKind::try_from(value)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("RESOURCE_KIND_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| value.to_string())
}

fn finding_json(f: &pb::AuditFinding) -> serde_json::Value {
    json!({"kind": kind_name(f.kind), "name": f.name, "machine_id": f.machine_id, "why": f.why})
}

fn print_audit(json_out: bool, report: &pb::AuditReport) {
    if json_out {
        outln!(
            "{}",
            json!({
                "leaks": report.leaks.iter().map(finding_json).collect::<Vec<_>>(),
                "missing": report.missing.iter().map(finding_json).collect::<Vec<_>>(),
                "machines": report.machines, "duration_us": report.duration_us,
            })
        );
        return;
    }
    for (title, findings) in [("leaks", &report.leaks), ("missing", &report.missing)] {
        if findings.is_empty() {
            outln!("{title}: none");
            continue;
        }
        outln!("{title}: {}", findings.len());
        let mut table = Table::new();
        table.set_header(["KIND", "NAME", "MACHINE", "WHY"]);
        for f in findings.iter() {
            table.add_row([
                kind_name(f.kind),
                f.name.clone(),
                f.machine_id.clone(),
                f.why.clone(),
            ]);
        }
        outln!("{table}");
    }
    outln!(
        "{} machine records compared in {:.1} ms",
        report.machines,
        report.duration_us as f64 / 1000.0
    );
}

/// The daemon's TCP listener at `address`, with the client's certificate.
async fn connect_tls(address: &str, cli: &Cli) -> Result<Client, String> {
    let read = |flag: &str, path: &Option<PathBuf>| -> Result<Vec<u8>, String> {
        let path = path
            .as_ref()
            .ok_or_else(|| format!("--address needs {flag}"))?;
        std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    let tls = hearth::client::TlsClient {
        ca: read("--tls-ca", &cli.tls_ca)?,
        cert: read("--tls-cert", &cli.tls_cert)?,
        key: read("--tls-key", &cli.tls_key)?,
        server_name: None,
    };
    let channel = hearth::client::channel_tls(address, &tls)
        .await
        .map_err(|e| format!("connect {address}: {e}"))?;
    Ok(Client::over(channel))
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    if let Command::Doctor { config } = &cli.command {
        return doctor::run(&cli.socket, config.as_deref(), cli.json).await;
    }
    let mut client: Client = match &cli.address {
        None => connect(&cli.socket)
            .await
            .map_err(|e| format!("connect {}: {e}", cli.socket.display()))?,
        Some(address) => connect_tls(address, &cli).await?,
    };
    let status = |e: tonic::Status| format!("{:?}: {}", e.code(), e.message());
    match cli.command {
        // Answered above, without a connection.
        Command::Doctor { .. } => {}
        Command::Image(command) => return image::run(&mut client, cli.json, command).await,
        Command::Node {
            command: Some(NodeCommand::Audit),
        } => {
            let report = client
                .node
                .audit(pb::AuditRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print_audit(cli.json, &report);
            if !report.leaks.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Node { command: None } => {
            let n = client
                .node
                .get_node(pb::GetNodeRequest {})
                .await
                .map_err(status)?
                .into_inner();
            outln!(
                "{}",
                json!({"version": n.version, "vcpus_total": n.vcpus_total, "vcpus_used": n.vcpus_used,
                    "memory_mib_total": n.memory_mib_total, "memory_mib_used": n.memory_mib_used,
                    "machines": n.machines, "ip_slots_total": n.ip_slots_total,
                    "ip_slots_used": n.ip_slots_used, "vmm": n.vmm,
                    "runs_observed": n.runs_observed, "image_pulls": n.image_pulls,
                    "image_checks": n.image_checks, "image_builds": n.image_builds,
                    "pools": n.pools.iter().map(|p| json!({"name": p.name, "image": p.image,
                        "size": p.size, "ready": p.ready, "refilling": p.refilling,
                        "claims": p.claims, "misses": p.misses,
                        "last_refill_ms": p.last_refill_ms, "last_error": p.last_error}))
                        .collect::<Vec<_>>(),
                    "sinks": n.sinks.iter().map(|s| json!({"name": s.name, "endpoints": s.endpoints,
                        "in_sync": s.in_sync, "pending": s.pending, "last_error": printable(&s.last_error),
                        "last_sync_ms": s.last_sync_ms, "lag_ms": s.lag_ms}))
                        .collect::<Vec<_>>(),
                    "api_address": n.api_address, "metrics_address": n.metrics_address,
                    "dns_address": n.dns_address, "guest_dns_address": n.guest_dns_address})
            );
        }
        Command::Machine(command) => match *command {
            MachineCommand::Create {
                name,
                image,
                vcpus,
                memory_mib,
                request_id,
                ports,
                env,
                entrypoint,
                workdir,
                user,
                disk_mib,
                pool,
                stopped,
                command,
            } => {
                let env = env
                    .into_iter()
                    .map(|kv| match kv.split_once('=') {
                        Some((k, v)) => Ok((k.to_string(), v.to_string())),
                        None => Err(format!("--env {kv:?}: expected KEY=VALUE")),
                    })
                    .collect::<Result<_, _>>()?;
                let request_id = match request_id {
                    Some(id) => id,
                    None => format!(
                        "cli-{}",
                        hearth::machine::spec::new_machine_id().map_err(|e| e.to_string())?
                    ),
                };
                let spec = pb::MachineSpec {
                    image,
                    vcpus,
                    memory_mib,
                    command,
                    env,
                    ports,
                    entrypoint,
                    workdir,
                    user,
                    disk_mib,
                    pool,
                };
                let m = client
                    .machines
                    .create_machine(pb::CreateMachineRequest {
                        request_id,
                        name,
                        spec: Some(spec),
                        start: stopped.then_some(false),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                print_machine(cli.json, &m);
            }
            MachineCommand::List { all, prepared } => {
                let list = client
                    .machines
                    .list_machines(pb::ListMachinesRequest {
                        include_destroyed: all,
                        include_prepared: prepared,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                print_machines(cli.json, &list.machines);
            }
            MachineCommand::Get { id } => {
                let m = client
                    .machines
                    .get_machine(pb::MachineRef { id })
                    .await
                    .map_err(status)?;
                print_machine(cli.json, &m.into_inner());
            }
            MachineCommand::Start { id } => {
                let m = client
                    .machines
                    .start_machine(pb::MachineRef { id })
                    .await
                    .map_err(status)?;
                print_machine(cli.json, &m.into_inner());
            }
            MachineCommand::Stop { id } => {
                let m = client
                    .machines
                    .stop_machine(pb::MachineRef { id })
                    .await
                    .map_err(status)?;
                print_machine(cli.json, &m.into_inner());
            }
            MachineCommand::Destroy { id } => {
                let m = client
                    .machines
                    .destroy_machine(pb::MachineRef { id })
                    .await
                    .map_err(status)?;
                print_machine(cli.json, &m.into_inner());
            }
            MachineCommand::Wait { id, state, timeout } => {
                let wanted = pb::MachineState::from_str_name(&format!(
                    "MACHINE_STATE_{}",
                    state.to_uppercase()
                ))
                .ok_or_else(|| format!("{state:?} is not a machine state"))?;
                let reply = client
                    .machines
                    .wait_machine(pb::WaitMachineRequest {
                        id,
                        state: wanted as i32,
                        timeout_ms: timeout.saturating_mul(1000),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if let Some(m) = &reply.machine {
                    print_machine(cli.json, m);
                }
                if !reply.reached {
                    return Err(format!("the machine did not reach {state}"));
                }
            }
            MachineCommand::Events { id, follow } => {
                let mut stream = client
                    .machines
                    .watch_events(pb::WatchEventsRequest {
                        machine_id: id.unwrap_or_default(),
                        after_seq: 0,
                        history_only: !follow,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                while let Some(event) = stream.message().await.map_err(status)? {
                    if cli.json {
                        outln!(
                            "{}",
                            json!({"seq": event.seq, "machine_id": event.machine_id, "at_ms": event.at_ms,
                                "state": state_name(event.state), "message": event.message})
                        );
                    } else {
                        outln!(
                            "{:>6} {} {:<10} {}",
                            event.seq,
                            event.machine_id,
                            state_name(event.state),
                            printable(&event.message)
                        );
                    }
                }
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hearth: {e}");
            return ExitCode::FAILURE;
        }
    };
    let remote = cli.address.clone();
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hearth: {}", printable(&e));
            // A TLS 1.3 server refuses a client certificate after the client thinks the
            // handshake is done, so the refusal surfaces as a cancelled first call.
            let transport = ["Cancelled", "Unavailable", "Unknown", "connect "]
                .iter()
                .any(|start| e.starts_with(start))
                || e.contains("transport error");
            if let Some(address) = remote
                && transport
            {
                eprintln!(
                    "hearth: {address} refused or dropped the connection: is --tls-cert signed by the daemon's api.tls_client_ca, and --tls-ca the CA of its api.tls_cert?"
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// Ends the CLI after a write to stdout failed (see `outln!`).
fn output_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("hearth: writing the output: {e}");
    std::process::exit(1);
}
