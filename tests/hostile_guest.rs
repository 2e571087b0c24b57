//! Hostile guests (root, QEMU): real guests whose init is `examples/hostile_guest.rs`, a
//! small static program that breaks the agent protocol on purpose (a guest whose init
//! was taken over: nothing else in a guest can write to the agent port). Each case checks
//! what the host does about it, and throughout that the API keeps answering GetNode
//! (asked every 10 ms: no call fails or stalls for seconds; the p50 and p99 are printed,
//! a figure for a reader, not a pass mark, as it depends on what else runs on the host),
//! that the daemon's memory
//! stays bounded (RSS sampled from /proc and printed), and that nothing leaks (the audit
//! is clean and no host resource of the daemon is left).
//!
//! The cases run one at a time (their latency figures would otherwise measure each
//! other's guests).

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hearth::api::pb;
use hearth::client::Client;
use support::{Daemon, percentile, wait_for};

/// No GetNode may take this long while a guest misbehaves: that is an API stalled by
/// the guest, not a slow host.
const STALL_LIMIT_MS: f64 = 2000.0;
/// How often GetNode is asked.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// The daemon's RSS may grow by at most this over its figure once the guests boot (the
/// guest kit, built for the first machine, is in it by then): what a guest sends must
/// cost the host a bounded buffer, whatever its volume (gigabytes in the long-line case).
const RSS_GROWTH_KIB: u64 = 16 * 1024;
/// A readiness deadline short enough for the cases that wait it out.
const READY_TIMEOUT_SECS: u64 = 15;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The hostile init, beside the test binaries (`deploy/build-guest-init.sh hostile` builds it);
/// `HEARTH_HOSTILE_INIT` names another.
fn hostile_init() -> PathBuf {
    std::env::var_os("HEARTH_HOSTILE_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_BIN_EXE_hearth-init"))
                .with_file_name("examples")
                .join("hostile_guest-static")
        })
}

/// A daemon booting the hostile init, one boot attempt per machine; `None` after a loud
/// skip message when the host cannot run the case.
fn hostile_daemon(case: &str) -> Option<Daemon> {
    hostile_daemon_with(case, "", "")
}

/// [`hostile_daemon`] with `guest` added to its `[guest]` table and `rest` after it.
fn hostile_daemon_with(case: &str, guest: &str, rest: &str) -> Option<Daemon> {
    let mut daemon = hostile_daemon_prepared(case, guest, rest)?;
    daemon.spawn();
    Some(daemon)
}

/// [`hostile_daemon_with`], not started yet.
fn hostile_daemon_prepared(case: &str, guest: &str, rest: &str) -> Option<Daemon> {
    support::guest_prereqs::guest_prereqs("hostile_guest")?;
    let init = hostile_init();
    if !init.is_file() {
        support::skipped(
            &format!("hostile_guest ({case})"),
            &format!(
                "no hostile guest init at {} (run deploy/build-guest-init.sh hostile, which builds \
                 examples/hostile_guest.rs static)",
                init.display()
            ),
        );
        return None;
    }
    Some(Daemon::prepare(&format!(
        "[guest]\ninit_binary = \"{}\"\nready_timeout_secs = {READY_TIMEOUT_SECS}\nboot_attempts = 1\nstop_grace_secs = 2\n{guest}{rest}",
        init.display()
    )))
}

/// A machine whose hostile init runs `mode` (its words after the program), with
/// `ports` declared.
fn hostile_request(name: &str, mode: &[&str], ports: &[u32]) -> pb::CreateMachineRequest {
    pb::CreateMachineRequest {
        request_id: name.into(),
        name: name.into(),
        spec: Some(pb::MachineSpec {
            image: "demo".into(),
            vcpus: 1,
            memory_mib: 128,
            ports: ports.to_vec(),
            entrypoint: vec!["/hostile".into()],
            command: mode.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        start: None,
    }
}

async fn create(client: &mut Client, request: pb::CreateMachineRequest) -> pb::Machine {
    client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner()
}

/// What the watcher saw.
struct Samples {
    latencies_ms: Vec<f64>,
    failures: usize,
    rss_kib: Vec<(std::time::Instant, u64)>,
}

/// Asks GetNode every [`PROBE_EVERY`] on its own connection and samples the daemon's
/// RSS, until stopped.
struct Watcher {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Samples>,
    pid: i32,
    /// At the daemon's start.
    rss_start_kib: u64,
    /// Once the case's VMMs run (see [`Watcher::booting`]): building the guest kit and the
    /// image before that peaks higher, and is freed.
    rss_booted_kib: u64,
    booted_at: std::time::Instant,
}

impl Watcher {
    async fn start(daemon: &Daemon) -> Watcher {
        let pid = daemon.pid().expect("the daemon's pid");
        let rss_start_kib = support::rss_kib(pid).expect("the daemon's RSS");
        let mut client = daemon.client().await;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Samples {
                latencies_ms: Vec::new(),
                failures: 0,
                rss_kib: Vec::new(),
            };
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stopped.load(Ordering::Relaxed) {
                tick.tick().await;
                let clock = std::time::Instant::now();
                match client.node.get_node(pb::GetNodeRequest {}).await {
                    Ok(_) => samples
                        .latencies_ms
                        .push(clock.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => samples.failures += 1,
                }
                if let Some(kib) = support::rss_kib(pid) {
                    samples.rss_kib.push((std::time::Instant::now(), kib));
                }
            }
            samples
        });
        Watcher {
            stop,
            task,
            pid,
            rss_start_kib,
            rss_booted_kib: rss_start_kib,
            booted_at: std::time::Instant::now(),
        }
    }

    /// Takes the RSS baseline once the VMMs of `ids` run (the guests are still booting,
    /// so nothing of theirs has reached the daemon yet).
    async fn booting(&mut self, client: &mut Client, ids: &[&str]) {
        for id in ids {
            support::wait_machine_until(client, id, Duration::from_secs(120), |m| {
                m.vmm_pid != 0 || m.state == pb::MachineState::Failed as i32
            })
            .await;
        }
        self.rss_booted_kib = support::rss_kib(self.pid).expect("the daemon's RSS");
        self.booted_at = std::time::Instant::now();
    }

    /// Stops, prints the figures, and fails the test when GetNode stalled or failed, or
    /// the daemon's memory grew past the bound.
    async fn finish(self, case: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.task.await.expect("watcher");
        let mut sorted = samples.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let p50 = percentile(&sorted, 0.5);
        let p99 = percentile(&sorted, 0.99);
        let max = sorted.last().copied().unwrap_or(f64::NAN);
        let peak = |after: bool| {
            samples
                .rss_kib
                .iter()
                .filter(|(at, _)| (*at >= self.booted_at) == after)
                .map(|(_, kib)| *kib)
                .max()
                .unwrap_or(0)
        };
        let (rss_before, rss_max) = (peak(false), peak(true));
        let bound = self.rss_booted_kib + RSS_GROWTH_KIB;
        println!(
            "hostile_guest {case}: GetNode x{} p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; \
             daemon RSS at start {:.1} MiB (peak {:.1} MiB building the kit and image), \
             once the VMMs ran {:.1} MiB, max after {:.1} MiB (bound {:.1} MiB)",
            sorted.len(),
            self.rss_start_kib as f64 / 1024.0,
            rss_before as f64 / 1024.0,
            self.rss_booted_kib as f64 / 1024.0,
            rss_max as f64 / 1024.0,
            bound as f64 / 1024.0,
        );
        assert_eq!(samples.failures, 0, "GetNode failed during {case}");
        assert!(
            sorted.len() >= 100,
            "too few GetNode samples: {}",
            sorted.len()
        );
        assert!(
            max < STALL_LIMIT_MS,
            "{case}: a GetNode took {max:.2} ms (p99 {p99:.2} ms)"
        );
        assert!(
            rss_max <= bound,
            "{case}: the daemon's RSS reached {rss_max} KiB (booted {} KiB)",
            self.rss_booted_kib
        );
    }
}

/// The error of the machine's last `ready` acquire.
fn ready_error(machine: &pb::Machine) -> String {
    machine
        .timings
        .iter()
        .rev()
        .find(|t| t.step == "ready" && t.direction == "acquire")
        .map(|t| t.outcome.clone())
        .unwrap_or_else(|| panic!("no ready attempt: {machine:#?}"))
}

/// The guest's serial console once it holds `needle` (the daemon drains the console
/// into its log as it comes; waits up to 30 s for it).
async fn console_with(daemon: &Daemon, id: &str, needle: &str) -> String {
    console_until(daemon, id, needle, Duration::from_secs(30)).await
}

/// [`console_with`], waiting up to `limit`.
async fn console_until(daemon: &Daemon, id: &str, needle: &str, limit: Duration) -> String {
    let path = daemon
        .layout()
        .machine_dir(id)
        .join(hearth::vmm::SERIAL_LOG);
    let deadline = std::time::Instant::now() + limit;
    loop {
        let log = String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
        if log.contains(needle) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {needle:?} on the console: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Destroys what is left, and checks that nothing leaks.
async fn clean_up(daemon: &Daemon, client: &mut Client, ids: &[&str]) {
    for id in ids {
        support::destroy(client, id).await;
    }
    support::assert_audit_clean(client).await;
    daemon.assert_no_host_leftovers();
    assert!(
        daemon.processes().is_empty(),
        "VMMs left: {:?}",
        daemon.processes()
    );
}

/// Text shown to an operator must be inert: no control characters but newline and tab.
fn assert_inert(text: &str) {
    assert!(
        !text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "raw control characters in {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_flooding_the_channel_with_garbage_fails_at_its_deadline() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = hostile_daemon("garbage") else {
        return;
    };
    let mut client = daemon.client().await;
    let mut watcher = Watcher::start(&daemon).await;

    let m = create(&mut client, hostile_request("flood", &["garbage"], &[80])).await;
    watcher.booting(&mut client, &[&m.id]).await;
    let failed = wait_for(&mut client, &m.id, pb::MachineState::Failed).await;
    // Never a message, so never ready: the host waits out the deadline and says what it
    // got instead, counted, bounded and escaped.
    let why = ready_error(&failed);
    println!("garbage: {why}");
    assert!(why.contains("guest not ready within"), "{why}");
    assert!(why.contains("were not agent messages"), "{why}");
    assert!(why.contains("the first began: "), "{why}");
    let rejected: u64 = why
        .split(" lines from the guest")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {why}"));
    assert!(rejected > 100, "{why}");
    assert!(why.len() < hearth::text::MAX_EVENT_MESSAGE, "{}", why.len());
    assert_inert(&why);
    assert_inert(&failed.failure);

    watcher.finish("garbage").await;
    clean_up(&daemon, &mut client, &[&m.id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_of_megabytes_is_dropped_unread_and_what_hides_at_its_end_is_not_believed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = hostile_daemon("long-line") else {
        return;
    };
    let mut client = daemon.client().await;
    let mut watcher = Watcher::start(&daemon).await;

    // No declared port: a Ready believed from the end of the long line would start the
    // machine at once.
    let m = create(
        &mut client,
        hostile_request("longline", &["long-line"], &[]),
    )
    .await;
    watcher.booting(&mut client, &[&m.id]).await;
    let failed = wait_for(&mut client, &m.id, pb::MachineState::Failed).await;
    let why = ready_error(&failed);
    println!("long-line: {why}");
    assert!(why.contains("guest not ready within"), "{why}");
    assert!(why.contains("(last state: no answer"), "{why}");
    assert!(
        why.contains(&format!(
            "were longer than {} bytes",
            hearth::guest::protocol::MAX_GUEST_LINE
        )) && !why.contains(" and 0 were longer"),
        "{why}"
    );
    assert_inert(&why);

    watcher.finish("long-line").await;
    clean_up(&daemon, &mut client, &[&m.id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_saying_ready_before_its_ports_listen_is_published_only_once_they_do() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = hostile_daemon("ready-early") else {
        return;
    };
    let mut client = daemon.client().await;
    let mut watcher = Watcher::start(&daemon).await;
    let mut routes = client
        .registry
        .watch_routes(pb::WatchRoutesRequest {})
        .await
        .expect("watch routes")
        .into_inner();

    // One listens 4 s after saying Ready, one never does.
    let late = create(
        &mut client,
        hostile_request("late", &["ready-early", "4"], &[80]),
    )
    .await;
    let never = create(
        &mut client,
        hostile_request("never", &["ready-early", "never"], &[80]),
    )
    .await;
    watcher.booting(&mut client, &[&late.id, &never.id]).await;

    // The first route published is the late listener's, and when it appears the port
    // already accepts, first try: the guest's console shows it began listening before.
    let change = tokio::time::timeout(Duration::from_secs(120), routes.message())
        .await
        .expect("a route in time")
        .expect("route stream")
        .expect("route stream open");
    assert_eq!(change.kind(), pb::route_change::Kind::Published);
    let route = change.route.expect("route");
    assert_eq!(route.machine_id, late.id);
    let page = support::http_get(&route.ip, 80);
    assert!(page.contains("hostile guest"), "{page}");
    let log = console_with(&daemon, &late.id, "hostile-guest: listening on [80]").await;
    let said = log.find("hostile-guest: saying ready");
    let listened = log.find("hostile-guest: listening on [80]");
    assert!(said.is_some() && said < listened, "{log}");
    let started = wait_for(&mut client, &late.id, pb::MachineState::Started).await;
    let ready = started
        .timings
        .iter()
        .rev()
        .find(|t| t.step == "ready" && t.outcome == "ok")
        .expect("ready timing");
    // It waited for the port, not just for the word.
    assert!(ready.duration_us >= 3_000_000, "{ready:?}");

    // The one that never listens fails, naming the port; it never had a route.
    let failed = wait_for(&mut client, &never.id, pb::MachineState::Failed).await;
    let why = ready_error(&failed);
    println!("ready-early never: {why}");
    assert!(
        why.contains("the guest said it is ready, but port 80 at")
            && why.contains("did not accept a connection"),
        "{why}"
    );
    let listed = client
        .registry
        .list_routes(pb::ListRoutesRequest {})
        .await
        .expect("routes")
        .into_inner()
        .routes;
    assert!(
        listed.iter().all(|r| r.machine_id != never.id),
        "{listed:?}"
    );

    watcher.finish("ready-early").await;
    clean_up(&daemon, &mut client, &[&late.id, &never.id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_exits_are_only_hints_and_a_claimed_exit_fails_the_boot() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = hostile_daemon("fake-exited") else {
        return;
    };
    let mut client = daemon.client().await;
    let mut watcher = Watcher::start(&daemon).await;

    // Thousands of unasked Exited events, then an honest Ready: the events only make the
    // host ask for the state, once while a question is open, and the state says Ready.
    let hints = create(
        &mut client,
        hostile_request("hints", &["exit-hints"], &[80]),
    )
    .await;
    // The guest's state says its workload exited before it was ready: the normal policy
    // (a failed boot attempt; here the only one) fails the machine, naming the status.
    let exited = create(
        &mut client,
        hostile_request("exited", &["claims-exited"], &[80]),
    )
    .await;
    watcher.booting(&mut client, &[&hints.id, &exited.id]).await;

    let started = wait_for(&mut client, &hints.id, pb::MachineState::Started).await;
    let log = console_with(&daemon, &hints.id, "exit hints: ").await;
    let asked: u32 = log
        .lines()
        .find_map(|l| l.split("status requests after 2000 exit hints: ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count on the console: {log}"));
    println!("exit-hints: the host asked for the state {asked} times");
    assert!((1..=2).contains(&asked), "{asked}");
    let page = support::http_get(&started.guest_ip, 80);
    assert!(page.contains("hostile guest"), "{page}");

    let failed = wait_for(&mut client, &exited.id, pb::MachineState::Failed).await;
    let why = ready_error(&failed);
    println!("claims-exited: {why}");
    assert!(
        why.contains("the workload exited before the guest was ready: Code(3)"),
        "{why}"
    );
    assert_eq!(failed.vmm_pid, 0, "{failed:?}");

    watcher.finish("fake-exited").await;
    clean_up(&daemon, &mut client, &[&hints.id, &exited.id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_rebooting_itself_in_a_loop_is_backed_off_then_failed_with_its_events_capped() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = hostile_daemon_with(
        "reboot-loop",
        "max_restarts = 2\nrestart_backoff_ms = 400\nrestart_backoff_max_ms = 800\n",
        "[store]\nevents_first = 4\nevents_last = 8\n",
    ) else {
        return;
    };
    let mut client = daemon.client().await;
    let mut watcher = Watcher::start(&daemon).await;
    // Ready, serving its port, and one second later the machine reboots itself; every
    // boot after the backoff does the same.
    let looper = create(
        &mut client,
        hostile_request("looper", &["reboot-after", "1"], &[80]),
    )
    .await;
    watcher.booting(&mut client, &[&looper.id]).await;
    let failed =
        support::wait_machine_until(&mut client, &looper.id, Duration::from_secs(180), |m| {
            // Failed, and done releasing what it held.
            m.state == pb::MachineState::Failed as i32 && m.current_step.is_empty()
        })
        .await;
    println!("reboot-loop: {}", failed.failure);
    assert!(
        failed.failure.contains("3 times") && failed.failure.contains("guest.max_restarts"),
        "{}",
        failed.failure
    );
    assert_inert(&failed.failure);
    assert_eq!(failed.vmm_pid, 0, "a failed machine keeps no VMM");
    // The history kept its first 4 and last 8 events of the many the loop made.
    let mut replay = support::watch_machine(&mut client, &looper.id, 0).await;
    support::destroy(&mut client, &looper.id).await;
    let mut kept = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(120), replay.message())
            .await
            .unwrap_or_else(|_| panic!("no destroy in the history: {kept:#?}"))
            .expect("event stream")
            .expect("stream open");
        if event.message.starts_with("desired state: destroyed") {
            break;
        }
        kept.push(event);
    }
    let seqs: Vec<u64> = kept.iter().map(|e| e.seq).collect();
    println!(
        "reboot-loop: {} events kept of {}",
        kept.len(),
        seqs.last().copied().unwrap_or(0)
    );
    assert_eq!(kept.len(), 12, "{kept:#?}");
    assert_eq!(kept[0].message, "created");
    assert!(seqs[4] > seqs[3] + 1, "the middle was dropped: {seqs:?}");
    // The end is kept: the failure and the releases after it.
    assert!(
        kept.iter()
            .any(|e| e.message.starts_with("failed: the guest stopped 3 times")),
        "{kept:#?}"
    );
    assert!(
        kept.last()
            .is_some_and(|e| e.message.starts_with("release ")),
        "{kept:#?}"
    );

    watcher.finish("reboot-loop").await;
    clean_up(&daemon, &mut client, &[]).await;
}

/// A guest that opens 2,000 TCP connections to its resolver, then floods it with UDP
/// questions for a minute: the daemon keeps a bounded number of descriptors (the DNS
/// server's connection caps), another machine is created and started meanwhile, GetNode
/// answers throughout, and the daemon's log, filtered as an operator runs it, grows by a
/// bounded amount (no line per question; refused connections once per 10 s, counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_abusing_its_resolver_costs_bounded_descriptors_and_log() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut daemon) = hostile_daemon_prepared("dns-abuse", "", "") else {
        return;
    };
    let log = daemon.dir.path().join("hearthd.log");
    daemon.spawn_default_logging(&log);
    let mut client = daemon.client().await;
    let mut watcher = Watcher::start(&daemon).await;
    let fds_before = daemon.open_fds();

    let m = create(
        &mut client,
        hostile_request("dnsabuse", &["dns-abuse", "2000", "60"], &[80]),
    )
    .await;
    watcher.booting(&mut client, &[&m.id]).await;
    wait_for(&mut client, &m.id, pb::MachineState::Started).await;
    // Thousands of connects under emulation take a while.
    let opened = console_until(&daemon, &m.id, "connections open", Duration::from_secs(120)).await;
    let log_at_flood = std::fs::metadata(&log).map_or(0, |m| m.len());
    let fds_holding = daemon.open_fds();

    // Another machine, while the first holds its connections and floods.
    let other = create(
        &mut client,
        hostile_request("neighbour", &["ready-early", "0"], &[80]),
    )
    .await;
    wait_for(&mut client, &other.id, pb::MachineState::Started).await;
    let fds_both = daemon.open_fds();

    // The flood's end (a minute after it began).
    let console = console_until(&daemon, &m.id, "queries sent", Duration::from_secs(150)).await;
    let sent: u64 = console
        .lines()
        .find_map(|line| {
            let words = line.split("dns-abuse: ").nth(1)?.trim_end();
            words.strip_suffix(" queries sent")?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no count: {console}"));
    let growth = std::fs::metadata(&log).map_or(0, |m| m.len()) - log_at_flood;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    println!(
        "dns-abuse: {sent} UDP questions in 60 s; daemon log grew {growth} bytes over the flood \
         (with a machine created meanwhile); descriptors {fds_before} at start, {fds_holding} \
         while the guest held its connections, {fds_both} with the second machine; {}",
        opened
            .lines()
            .find(|l| l.contains("connections open"))
            .unwrap_or_default()
    );
    assert!(
        sent > 1000,
        "the flood was too small to mean anything: {sent}"
    );
    assert!(
        growth < 64 * 1024,
        "the log grew {growth} bytes during a minute of guest questions"
    );
    assert!(!text.contains("query:flood"), "questions were logged");
    let cap = fds_before + hearth::dns::TCP_TOTAL + 64;
    assert!(
        fds_holding <= cap && fds_both <= cap,
        "descriptors {fds_holding}/{fds_both}, cap {cap}"
    );
    watcher.finish("dns-abuse").await;
    clean_up(&daemon, &mut client, &[&m.id, &other.id]).await;
}
