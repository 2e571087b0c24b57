//! The chaos harness (root, QEMU, `--features failpoints`): for every fail point the code
//! has (`hearth::failpoints::all`, so none can be forgotten) and both ways of failing
//! there, crash the run, and check that the machine converges to what was asked and that
//! nothing leaks.
//!
//! - `kill`: hearthd SIGKILLs itself at the point (what a crash does); it is started again
//!   on the same data dir, without fail points.
//! - `panic`: the actor that crosses the point panics once; the Supervisor restarts it and
//!   sends `Reconcile`.
//!
//! After convergence the machine is destroyed and the host is scanned: no namespace,
//! link, nftables chain, cgroup, VMM process, machine directory, lease or route may be
//! left. The table of every case is printed.
//!
//! `CHAOS_VMM=firecracker` (with `HEARTH_FIRECRACKER`) runs the same cases on the
//! Firecracker driver. Where KVM cannot boot the guest kernel, a machine cannot get past
//! its readiness wait. The cases then cover create up to and including `ready` and the
//! singletons crossed on the way, converging to `failed` (the readiness step gives up and
//! everything is released), and stop and destroy of a machine caught in its readiness
//! wait with a real Firecracker running; the points behind a started guest are listed as
//! not reachable on this host.

#![cfg(feature = "failpoints")]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth::api::pb;
use hearth::client::Client;
use hearth::failpoints;
use support::{Daemon, destroy, wait_for};
use tokio::sync::Semaphore;

/// Cases run at the same time (each boots guests under TCG on 2 cores).
const PARALLEL: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Kill,
    Panic,
}

impl Mode {
    fn action(self) -> &'static str {
        match self {
            Mode::Kill => "return(kill)",
            Mode::Panic => "1*panic",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Kill => "crash process",
            Mode::Panic => "panic actor",
        }
    }
}

/// A daemon for a chaos case. Its panics are the injected ones, so they print no
/// backtrace: a failing case's line must not drown in them in a CI log.
fn quiet_daemon(extra: &str) -> Daemon {
    let mut daemon = Daemon::prepare(extra);
    daemon
        .env
        .push(("RUST_BACKTRACE".to_string(), "0".to_string()));
    daemon
}

#[derive(Debug)]
struct Row {
    point: String,
    mode: Mode,
    crashed: bool,
    converged: bool,
    leaks: Vec<String>,
    seconds: f64,
    error: Option<String>,
}

impl Row {
    fn new(point: &str, mode: Mode) -> Row {
        Row {
            point: point.to_string(),
            mode,
            crashed: false,
            converged: false,
            leaks: Vec::new(),
            seconds: 0.0,
            error: None,
        }
    }

    /// A kill case whose crash has not been seen yet: waits for the daemon to kill itself
    /// and starts it again, without fail points. False (and the row says why) when the
    /// point was never reached.
    async fn crash_and_restart(&mut self, daemon: &mut Daemon) -> bool {
        if self.mode != Mode::Kill || self.crashed {
            return true;
        }
        self.crashed = daemon.wait_exit(Duration::from_secs(120)).await;
        if !self.crashed {
            self.error = Some("the fail point was never reached".into());
            return false;
        }
        daemon.spawn();
        true
    }

    /// Waits for machine `id` to reach `goal` (up to 180 s) and notes whether it did,
    /// and where it is stuck if not.
    async fn converge(&mut self, client: &mut Client, id: &str, goal: pb::MachineState) {
        let reply = client
            .machines
            .wait_machine(pb::WaitMachineRequest {
                id: id.to_string(),
                state: goal as i32,
                timeout_ms: 180_000,
            })
            .await
            .expect("wait")
            .into_inner();
        self.converged = reply.reached;
        if !self.converged {
            let now = support::get_machine(client, id).await;
            self.error = Some(format!("stuck in {:?}: {}", now.state, now.failure));
        }
    }

    /// A panic case: whether the machine's events (of every machine when `id` is empty)
    /// show a run restarted after a crash, or a singleton call that was dropped. The
    /// evidence may land after the goal state (unwinding and reporting take a while), so
    /// it is waited for up to a deadline.
    async fn note_panic(&mut self, client: &mut Client, id: &str) {
        if self.mode != Mode::Panic || self.crashed {
            return;
        }
        let mut events = client
            .machines
            .watch_events(pb::WatchEventsRequest {
                machine_id: id.to_string(),
                after_seq: 0,
                history_only: false,
            })
            .await
            .expect("events")
            .into_inner();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while let Ok(Ok(Some(event))) = tokio::time::timeout_at(deadline, events.message()).await {
            if event.message.contains("restarted after a crash")
                || event.message.contains("stopped before answering")
            {
                self.crashed = true;
                return;
            }
        }
    }

    /// The leak invariant at the converged state: what is on the host is exactly what
    /// the surviving records own.
    async fn note_audit(&mut self, client: &mut Client) {
        let audit = support::audit(client).await;
        self.leaks.extend(
            audit
                .leaks
                .iter()
                .map(|f| format!("leak {}: {}", f.name, f.why)),
        );
        self.leaks.extend(
            audit
                .missing
                .iter()
                .map(|f| format!("missing {}: {}", f.name, f.why)),
        );
    }

    /// Routes, and the DNS answers made from them, exist exactly for a started machine:
    /// none is visible for a machine that is not (and ListRoutes holds no other).
    async fn note_routes(&mut self, client: &mut Client, machine: &pb::Machine, started: bool) {
        let what = if started { "started" } else { "not started" };
        let routes = support::routes(client).await;
        let ids: Vec<&str> = routes.iter().map(|r| r.machine_id.as_str()).collect();
        let expected: Vec<&str> = if started {
            vec![machine.id.as_str()]
        } else {
            Vec::new()
        };
        if ids != expected {
            self.leaks
                .push(format!("routes {ids:?} for a machine {what}"));
        }
        let node = support::node(client).await;
        if node.dns_address.is_empty() || !have_dig() {
            return;
        }
        let name = format!("{}.hearth.internal", machine.name);
        let (status, answers) = support::dig(&node.dns_address, &name, "A", false);
        let resolves = status == "NOERROR" && !answers.is_empty();
        if resolves != started {
            self.leaks.push(format!(
                "DNS {status} {answers:?} for {name}, a machine {what}"
            ));
        }
    }

    /// The case as one table line.
    fn line(&self) -> String {
        format!(
            "{:<40} {:<14} {:>7} {:>9} {:>5} {:>7.2}{}",
            self.point,
            self.mode.name(),
            self.crashed,
            self.converged,
            self.leaks.len(),
            self.seconds,
            self.error
                .as_deref()
                .map(|e| format!("  {e}"))
                .unwrap_or_default()
                + &self
                    .leaks
                    .iter()
                    .map(|l| format!("  [{l}]"))
                    .collect::<String>()
        )
    }
}

async fn create(client: &mut Client, name: &str) -> Result<pb::Machine, tonic::Status> {
    client
        .machines
        .create_machine(support::demo_request(&format!("chaos-{name}"), name, &[]))
        .await
        .map(|reply| reply.into_inner())
}

/// Whether `dig` runs here (dnsutils); when not, the DNS half of the route check is
/// skipped, and said so once.
fn have_dig() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        let ok = std::process::Command::new("dig")
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            support::skipped(
                "chaos (DNS answers)",
                "no dig (dnsutils; run deploy/install-deps.sh)",
            );
        }
        ok
    })
}

/// Everything of this daemon still on the host or in its tables.
async fn leftovers(daemon: &Daemon, client: &mut Client) -> Vec<String> {
    let mut found = daemon.host_leftovers();
    found.extend(
        daemon
            .processes()
            .iter()
            .map(|pid| format!("process {pid}")),
    );
    if let Ok(entries) = std::fs::read_dir(daemon.layout().machines()) {
        found.extend(
            entries
                .flatten()
                .map(|e| format!("dir {}", e.file_name().to_string_lossy())),
        );
    }
    let node = client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .expect("node")
        .into_inner();
    if node.ip_slots_used > 0 {
        found.push(format!("{} leases", node.ip_slots_used));
    }
    found.extend(
        support::routes(client)
            .await
            .iter()
            .map(|r| format!("route {}", r.machine_id)),
    );
    found
}

/// Which VMM the cases run on.
struct Setup {
    /// Extra daemon config.
    config: String,
    /// Extra daemon config for stop and destroy cases when guests cannot boot: the
    /// machine waits for readiness long enough to be stopped or destroyed during it.
    config_waiting: String,
    /// Whether guests boot (else create converges to `failed`).
    guest_boots: bool,
}

/// The setup from `CHAOS_VMM`; none when Firecracker is asked for but not available.
fn setup() -> Option<Setup> {
    match std::env::var("CHAOS_VMM").as_deref() {
        Ok("firecracker") => {
            let env = support::firecracker_env::firecracker_env()?;
            let config = support::firecracker_env::daemon_config(env);
            Some(Setup {
                config_waiting: config
                    .replace("ready_timeout_secs = 3", "ready_timeout_secs = 600"),
                config,
                guest_boots: env.kvm_boots,
            })
        }
        _ => Some(Setup {
            config: String::new(),
            config_waiting: String::new(),
            guest_boots: true,
        }),
    }
}

/// Whether a run can cross `point` on a host where guests cannot boot: create up to its
/// (failing) `ready` step, the singletons used on the way, and stop and destroy of a
/// machine waiting for readiness (they release nothing beyond the `vmm` step's).
fn reachable_without_a_guest(point: &str) -> bool {
    use hearth::machine::step::{CREATE_ORDER, Step};
    let up_to_ready = |name: &str| {
        CREATE_ORDER
            .iter()
            .take_while(|s| **s != Step::Publish)
            .any(|s| s.name() == name)
    };
    let mut parts = point.split('.');
    match (parts.next(), parts.next()) {
        (Some("create" | "stop" | "destroy"), Some(step)) => up_to_ready(step),
        (Some("leases" | "rootfs_cache" | "fabric"), _) => true,
        // A pool's machines wait for an idle guest, which needs a guest that boots.
        _ => false,
    }
}

/// Waits until the machine's run is in its readiness wait (the VMM is running).
async fn wait_for_ready_step(client: &mut Client, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = support::get_machine(client, id).await;
        if m.current_step == "acquire:ready" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never reached the ready step: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The points a prepared-capacity pool crosses: building a prepared machine
/// (`prepare.*`, `pools.refill.*`) and claiming one (`claim.*`, `pools.claim.*`).
fn pool_point(point: &str) -> bool {
    point.starts_with("prepare.") || point.starts_with("claim.") || point.starts_with("pools.")
}

/// A pool case: the daemon has a pool of one. A refill point is armed from the start and
/// converges when the pool holds one ready machine; a claim point is armed after the pool
/// is full and converges when the claiming create (retried with the same request id after
/// a crash) is started. Either way a create then claims, nothing was claimed twice (one
/// claimed record, one VMM per machine), and after the pool is drained nothing is left.
async fn run_pool_case(point: String, mode: Mode) -> Row {
    let mut row = Row::new(&point, mode);
    let refill = point.starts_with("prepare.") || point.starts_with("pools.refill");
    let fail_env = format!("{point}={}", mode.action());
    let env = [("FAILPOINTS", fail_env.as_str())];
    let mut daemon = quiet_daemon(&support::demo_pool("p", 1));
    let clock = Instant::now();
    let fill = Duration::from_secs(240);
    if refill {
        daemon.spawn_with_env(&env);
        if !row.crash_and_restart(&mut daemon).await {
            return row;
        }
    } else {
        daemon.spawn();
        let mut client = daemon.client().await;
        support::wait_pool(&mut client, "p", 1, fill).await;
        daemon.kill();
        daemon.spawn_with_env(&env);
    }
    let mut client = daemon.client().await;
    if refill {
        support::wait_pool(&mut client, "p", 1, fill).await;
    }
    let request = support::demo_request("chaos-claim", "claimed", &[]);
    let answer = client.machines.create_machine(request.clone()).await;
    let m = match answer {
        Ok(m) => m.into_inner(),
        Err(status) => {
            // The claim is durable before the crash point; a retry finds it.
            if mode == Mode::Kill {
                assert!(
                    daemon.wait_exit(Duration::from_secs(120)).await,
                    "no answer and no crash: {status:?}"
                );
                daemon.spawn();
                client = daemon.client().await;
            }
            row.crashed = true;
            client
                .machines
                .create_machine(request)
                .await
                .expect("create retried after the crash")
                .into_inner()
        }
    };
    if mode == Mode::Kill && !row.crashed {
        if !row.crash_and_restart(&mut daemon).await {
            return row;
        }
        client = daemon.client().await;
    }
    row.converge(&mut client, &m.id, pb::MachineState::Started)
        .await;
    row.seconds = clock.elapsed().as_secs_f64();
    // A panicked PoolManager is counted by the node; a panicked run shows in the events
    // of whichever machine it ran.
    if mode == Mode::Panic && support::node(&mut client).await.singleton_restarts > 0 {
        row.crashed = true;
    }
    row.note_panic(&mut client, "").await;
    // Never two claims of one prepared machine: one claimed record (the create's), and
    // one VMM per machine that has one, once the pool has refilled behind the claim.
    support::wait_pool(&mut client, "p", 1, fill).await;
    let records = support::all_machines(&mut client).await;
    let claimed: Vec<&pb::Machine> = records.iter().filter(|r| r.claimed).collect();
    if claimed.len() != 1 || claimed[0].id != m.id {
        row.leaks.push(format!(
            "claimed records: {:?}",
            claimed.iter().map(|r| &r.id).collect::<Vec<_>>()
        ));
    }
    let with_vmm = records.iter().filter(|r| r.vmm_pid != 0).count();
    let running = daemon.processes().len();
    if running != with_vmm {
        row.leaks.push(format!(
            "{running} VMM processes for {with_vmm} machines with a VMM"
        ));
    }
    row.note_audit(&mut client).await;
    destroy(&mut client, &m.id).await;
    // Drain: a daemon without the pool destroys its machines through their own runs.
    client = support::drain_pools(&mut daemon).await;
    row.leaks.extend(leftovers(&daemon, &mut client).await);
    row
}

/// The points route publication crosses on its way out: the embedded registry's
/// unpublish, and the etcd sink's writes (publish and unpublish alike).
fn sink_point(point: &str) -> bool {
    point.starts_with("etcd_sink.") || point == "registry.unpublish.after_commit"
}

/// This daemon's keys in etcd (the chaos cases run as host `chaos`).
async fn etcd_keys(etcd: &support::etcd::Etcd) -> Vec<String> {
    etcd.keys("/")
        .await
        .unwrap_or_default()
        .into_keys()
        .filter(|k| k.starts_with("/hearth/routes/chaos/") || k.ends_with("/chaos"))
        .collect()
}

/// Waits (up to 30 s) until this daemon's keys in etcd are exactly `machine`'s (or none);
/// notes the difference in the row if they never are.
async fn etcd_holds(row: &mut Row, etcd: &support::etcd::Etcd, machine: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys = etcd_keys(etcd).await;
        let exact = match machine {
            None => keys.is_empty(),
            Some(id) => keys.len() == 3 && keys.iter().filter(|k| k.contains(id)).count() == 2,
        };
        if exact {
            return;
        }
        if Instant::now() > deadline {
            row.leaks
                .push(format!("etcd holds {keys:?} for {machine:?}"));
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A sink case, with a real etcd: the point is armed while a machine is published (the
/// etcd writes only) and again while it is destroyed. Each time the daemon crashes there
/// (or the actor panics and is restarted) and recovers; etcd must then hold exactly the
/// started machine's keys, and none once it is destroyed, and the host nothing.
async fn run_sink_case(point: String, mode: Mode) -> Row {
    let mut row = Row::new(&point, mode);
    let Some(etcd) = support::etcd::Etcd::start("chaos (etcd sink points)").await else {
        row.error = Some("no etcd here".into());
        return row;
    };
    let fail_env = format!("{point}={}", mode.action());
    let env = [("FAILPOINTS", fail_env.as_str())];
    let mut daemon = quiet_daemon(&etcd.config("chaos", 3));
    let clock = Instant::now();
    let on_publish = point.starts_with("etcd_sink.");
    if on_publish {
        daemon.spawn_with_env(&env);
    } else {
        daemon.spawn();
    }
    let mut client = daemon.client().await;
    let m = create(&mut client, "sunk").await.expect("create");
    if on_publish {
        if !row.crash_and_restart(&mut daemon).await {
            return row;
        }
        client = daemon.client().await;
    }
    row.converge(&mut client, &m.id, pb::MachineState::Started)
        .await;
    row.note_routes(&mut client, &m, true).await;
    etcd_holds(&mut row, &etcd, Some(&m.id)).await;
    // A panicked sink is restarted by the supervisor, which the node counts (the count
    // may land just after etcd is in line: the after-effect point panics once the write
    // is done).
    let restarted = |mut client: Client| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let restarts = support::node(&mut client).await.singleton_restarts;
            if restarts > 0 || Instant::now() > deadline {
                return restarts;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let restarts_before = if mode == Mode::Panic && on_publish {
        restarted(client.clone()).await
    } else {
        0
    };
    // A restarted sink writes every key again under its new lease: that first write
    // passes (`1*off`), so the point fires at the unpublish's write.
    let unpublish_env = if on_publish {
        format!("{point}=1*off->{}", mode.action())
    } else {
        fail_env.clone()
    };
    daemon.kill();
    daemon.spawn_with_env(&[("FAILPOINTS", unpublish_env.as_str())]);
    client = daemon.client().await;
    if on_publish {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !support::node(&mut client)
            .await
            .sinks
            .first()
            .is_some_and(|s| s.in_sync)
        {
            if Instant::now() > deadline {
                row.error = Some("the restarted sink never got in line".into());
                return row;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    client
        .machines
        .destroy_machine(pb::MachineRef { id: m.id.clone() })
        .await
        .expect("destroy");
    if mode == Mode::Kill {
        let crashed = daemon.wait_exit(Duration::from_secs(120)).await;
        if !crashed {
            row.error = Some("the fail point was never reached on unpublish".into());
            return row;
        }
        row.crashed = true;
        daemon.spawn();
        client = daemon.client().await;
    }
    row.converge(&mut client, &m.id, pb::MachineState::Destroyed)
        .await;
    etcd_holds(&mut row, &etcd, None).await;
    row.seconds = clock.elapsed().as_secs_f64();
    if mode == Mode::Panic {
        // The singleton's panic is counted by the node (published and unpublished once
        // each: a restart in between starts the count again).
        let restarts = restarted(client.clone()).await;
        row.crashed = restarts > 0 && (restarts_before > 0 || !on_publish);
        if !row.crashed {
            row.error = Some(format!(
                "no singleton restart seen (publish {restarts_before}, unpublish {restarts})"
            ));
        }
    }
    row.note_audit(&mut client).await;
    row.leaks.extend(leftovers(&daemon, &mut client).await);
    row
}

/// Drives the operation of `point` so that the run crosses it, fails there, recovers,
/// and converges; then destroys the machine and looks for leftovers.
async fn run_case(point: String, mode: Mode, setup: Arc<Setup>) -> Row {
    if pool_point(&point) {
        return run_pool_case(point, mode).await;
    }
    if sink_point(&point) {
        return run_sink_case(point, mode).await;
    }
    let operation = point.split('.').next().unwrap_or("create").to_string();
    let waiting = !setup.guest_boots && matches!(operation.as_str(), "stop" | "destroy");
    let mut daemon = quiet_daemon(if waiting {
        &setup.config_waiting
    } else {
        &setup.config
    });
    let fail_env = format!("{point}={}", mode.action());
    let env = [("FAILPOINTS", fail_env.as_str())];
    let mut row = Row::new(&point, mode);

    // Bring the machine to where the operation starts, without fail points.
    let singleton = !matches!(operation.as_str(), "create" | "start" | "stop" | "destroy");
    let armed_from_start = singleton || operation == "create";
    if armed_from_start {
        daemon.spawn_with_env(&env);
    } else {
        daemon.spawn();
    }
    let mut client = daemon.client().await;
    // A crash may beat the answer to the caller (see below); a retry with the same
    // request id after the restart returns the machine the first call recorded.
    let first = create(&mut client, "c").await;
    let created = match first {
        Ok(m) => Some(m),
        Err(status) if mode == Mode::Kill && status.code() == tonic::Code::Unknown => None,
        Err(status) => panic!("create: {status:?}"),
    };
    let m = match created {
        Some(m) => m,
        None => {
            assert!(
                daemon.wait_exit(Duration::from_secs(120)).await,
                "no answer and no crash"
            );
            daemon.spawn();
            client = daemon.client().await;
            row.crashed = true;
            create(&mut client, "c")
                .await
                .expect("create retried after the crash")
        }
    };
    if !armed_from_start {
        if waiting {
            wait_for_ready_step(&mut client, &m.id).await;
        } else {
            wait_for(&mut client, &m.id, pb::MachineState::Started).await;
        }
        if operation == "start" {
            client
                .machines
                .stop_machine(pb::MachineRef { id: m.id.clone() })
                .await
                .expect("stop");
            wait_for(&mut client, &m.id, pb::MachineState::Stopped).await;
        }
        daemon.kill();
        daemon.spawn_with_env(&env);
        client = daemon.client().await;
        let target = pb::MachineRef { id: m.id.clone() };
        let answer = match operation.as_str() {
            "start" => client.machines.start_machine(target).await.map(|_| ()),
            "stop" => client.machines.stop_machine(target).await.map(|_| ()),
            _ => client.machines.destroy_machine(target).await.map(|_| ()),
        };
        // The run starts as soon as the change is committed, so a crash at its first fail
        // point may come before the answer reaches the caller. The change is durable
        // either way; the convergence below shows it.
        if let Err(status) = answer
            && !(mode == Mode::Kill && status.code() == tonic::Code::Unknown)
        {
            panic!("{operation}: {status:?}");
        }
    }
    let goal = match operation.as_str() {
        "stop" => pb::MachineState::Stopped,
        "destroy" => pb::MachineState::Destroyed,
        _ if !setup.guest_boots => pb::MachineState::Failed,
        _ => pb::MachineState::Started,
    };

    let clock = Instant::now();
    if mode == Mode::Kill && !row.crashed {
        if !row.crash_and_restart(&mut daemon).await {
            return row;
        }
        client = daemon.client().await;
    }
    row.converge(&mut client, &m.id, goal).await;
    row.seconds = clock.elapsed().as_secs_f64();
    // A panic leaves the process up; the machine's events show the restarted run (or,
    // for a singleton, the step whose call it dropped).
    row.note_panic(&mut client, &m.id).await;
    row.note_audit(&mut client).await;
    row.note_routes(&mut client, &m, goal == pb::MachineState::Started)
        .await;
    if goal == pb::MachineState::Started {
        let running = daemon.processes().len();
        if running != 1 {
            row.leaks
                .push(format!("{running} VMM processes for one started machine"));
        }
    }
    if goal != pb::MachineState::Destroyed {
        destroy(&mut client, &m.id).await;
    }
    row.leaks.extend(leftovers(&daemon, &mut client).await);
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fail_point_converges_without_leaks() {
    // CHAOS_FILTER=<substring> runs only the matching points (for a person debugging).
    let filter = std::env::var("CHAOS_FILTER").unwrap_or_default();
    let Some(setup) = setup() else { return };
    let setup = Arc::new(setup);
    let (points, unreachable): (Vec<String>, Vec<String>) = failpoints::all()
        .into_iter()
        .filter(|p| p.contains(&filter))
        .partition(|p| setup.guest_boots || reachable_without_a_guest(p));
    let gate = Arc::new(Semaphore::new(PARALLEL));
    let mut tasks = Vec::new();
    for point in &points {
        for mode in [Mode::Kill, Mode::Panic] {
            let gate = gate.clone();
            let point = point.clone();
            let setup = setup.clone();
            tasks.push(tokio::spawn(async move {
                let _slot = gate.acquire_owned().await.expect("semaphore");
                let row = run_case(point, mode, setup).await;
                // Progress as cases end (the table below comes at the very end).
                eprintln!("chaos: {}", row.line());
                row
            }));
        }
    }
    let mut rows = Vec::new();
    for task in tasks {
        rows.push(task.await.expect("case"));
    }

    println!(
        "{:<40} {:<14} {:>7} {:>9} {:>5} {:>7}",
        "fail point", "mode", "crashed", "converged", "leaks", "seconds"
    );
    for r in &rows {
        println!("{}", r.line());
    }
    let bad: Vec<&Row> = rows
        .iter()
        .filter(|r| !r.crashed || !r.converged || !r.leaks.is_empty())
        .collect();
    for point in &unreachable {
        println!(
            "{point:<40} {:<14} not reachable: guests cannot boot on this host",
            "both"
        );
    }
    println!(
        "{} cases, {} failed, {} points not reachable here",
        rows.len(),
        bad.len(),
        unreachable.len()
    );
    // The failed cases once more, last, where a reader of a cut log still sees them.
    let bad_lines: Vec<String> = bad.iter().map(|r| r.line()).collect();
    for line in &bad_lines {
        eprintln!("chaos FAILED: {line}");
    }
    assert!(
        bad.is_empty(),
        "cases that did not converge cleanly:\n{}",
        bad_lines.join("\n")
    );
    assert_eq!(rows.len(), points.len() * 2);
}

/// Starts a daemon whose fail point `point` panics every time, creates a machine, and
/// checks that it ends `failed` with `reason` in its failure, that everything it acquired
/// was released, and that the daemon kept answering.
async fn crash_loop(point: &str, reason: &str) {
    let mut daemon = quiet_daemon("");
    daemon.spawn_with_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    let mut client = daemon.client().await;
    let m = create(&mut client, "loop").await.expect("create");
    let failed = wait_for(&mut client, &m.id, pb::MachineState::Failed).await;
    assert!(failed.failure.contains(reason), "{}", failed.failure);
    client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .expect("the daemon still answers");
    support::assert_audit_clean(&mut client).await;
    destroy(&mut client, &m.id).await;
    let left = leftovers(&daemon, &mut client).await;
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_machine_run_fails_the_machine_not_the_daemon() {
    crash_loop("create.vm_config.before_effect", "machine actor crashed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_singleton_fails_the_step_not_the_daemon() {
    crash_loop("registry.publish.after_commit", "registry_publisher").await;
}
