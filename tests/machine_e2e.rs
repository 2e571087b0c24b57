//! End to end on real guests (root, QEMU): a Linux guest boots under hearthd's QEMU driver
//! with hearth-init as PID 1, signals ready, serves TCP on its own address, and is
//! stopped, started and destroyed; afterwards nothing of it is left on the host.

mod support;

use std::time::Duration;

use hearth::api::pb;
use hearth::client::Client;
use support::{Daemon, demo_request, destroy, events_until, http_get, wait_for};

async fn create(
    client: &mut Client,
    request_id: &str,
    name: &str,
    command: &[&str],
) -> pb::Machine {
    client
        .machines
        .create_machine(support::demo_request(request_id, name, command))
        .await
        .expect("create")
        .into_inner()
}

/// Processes whose command line carries the machine's marker.
fn vmm_processes(id: &str) -> Vec<i32> {
    let marker = format!("hearth-{id}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'));
        if !zombie
            && cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == marker.as_bytes())
        {
            found.push(pid);
        }
    }
    found
}

fn assert_nothing_left(daemon: &Daemon, ids: &[String]) {
    daemon.assert_no_host_leftovers();
    for id in ids {
        assert!(
            vmm_processes(id).is_empty(),
            "a VMM of {id} is still running"
        );
        let dir = daemon.layout().machine_dir(id);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_serve_stop_start_destroy_leaves_nothing() {
    let daemon = Daemon::start_with("");
    let mut client = daemon.client().await;
    let mut routes_watch = watch_routes(&mut client).await;
    let machine = create(&mut client, "e2e-1", "web", &[]).await;
    let started = wait_for(&mut client, &machine.id, pb::MachineState::Started).await;
    assert!(!started.guest_ip.is_empty());
    assert_eq!(vmm_processes(&machine.id), vec![started.vmm_pid as i32]);
    let page = http_get(&started.guest_ip, 80);
    assert!(page.contains("hearth demo"), "{page}");
    let routes = client
        .registry
        .list_routes(pb::ListRoutesRequest {})
        .await
        .expect("routes")
        .into_inner();
    assert!(
        routes
            .routes
            .iter()
            .any(|r| r.machine_id == machine.id && r.ip == started.guest_ip)
    );

    client
        .machines
        .stop_machine(pb::MachineRef {
            id: machine.id.clone(),
        })
        .await
        .expect("stop");
    wait_for(&mut client, &machine.id, pb::MachineState::Stopped).await;
    assert!(
        vmm_processes(&machine.id).is_empty(),
        "stopped machine still has a VMM"
    );
    let routes = client
        .registry
        .list_routes(pb::ListRoutesRequest {})
        .await
        .expect("routes");
    assert!(
        routes.into_inner().routes.is_empty(),
        "a stopped machine stays unpublished"
    );

    client
        .machines
        .start_machine(pb::MachineRef {
            id: machine.id.clone(),
        })
        .await
        .expect("start");
    let again = wait_for(&mut client, &machine.id, pb::MachineState::Started).await;
    assert_eq!(
        again.guest_ip, started.guest_ip,
        "the lease is kept across stop/start"
    );
    assert!(http_get(&again.guest_ip, 80).contains("hearth demo"));

    destroy(&mut client, &machine.id).await;
    let node = client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .expect("node")
        .into_inner();
    assert_eq!(node.ip_slots_used, 0);

    // Watchers saw the route come and go with each start and stop: published only once
    // the guest was ready, withdrawn before its resources were released.
    use pb::route_change::Kind;
    let expected = [
        Kind::Published,
        Kind::Unpublished,
        Kind::Published,
        Kind::Unpublished,
    ];
    assert_eq!(
        route_changes(&mut routes_watch, &machine.id, 4).await,
        expected
    );

    // The event log tells the whole run in order, ending destroyed.
    let log = events_until(&mut client, &machine.id, 0, pb::MachineState::Destroyed).await;
    assert!(log.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(
        log.first().map(|e| e.message.as_str()),
        Some("created"),
        "{log:?}"
    );
    assert_eq!(
        log.last().map(|e| e.state),
        Some(pb::MachineState::Destroyed as i32)
    );
    assert!(
        log.iter()
            .any(|e| e.message.starts_with("acquire ready: ok")),
        "{log:?}"
    );
    let routes = client
        .registry
        .list_routes(pb::ListRoutesRequest {})
        .await
        .expect("routes");
    assert!(routes.into_inner().routes.is_empty());
    assert_nothing_left(&daemon, &[machine.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_concurrent_machines_start_with_distinct_addresses() {
    let daemon = Daemon::start_with("");
    let client = daemon.client().await;
    let mut creates = Vec::new();
    for i in 0..5 {
        let mut client = client.clone();
        creates.push(tokio::spawn(async move {
            let m = create(&mut client, &format!("five-{i}"), &format!("m{i}"), &[]).await;
            wait_for(&mut client, &m.id, pb::MachineState::Started).await
        }));
    }
    let mut machines = Vec::new();
    for task in creates {
        machines.push(task.await.expect("task"));
    }
    let mut ips: Vec<_> = machines.iter().map(|m| m.guest_ip.clone()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 5, "{ips:?}");
    for m in &machines {
        assert!(http_get(&m.guest_ip, 80).contains("hearth demo"));
    }
    let mut destroys = Vec::new();
    for m in &machines {
        let mut client = client.clone();
        let id = m.id.clone();
        destroys.push(tokio::spawn(async move { destroy(&mut client, &id).await }));
    }
    for task in destroys {
        task.await.expect("destroy");
    }
    let ids: Vec<String> = machines.into_iter().map(|m| m.id).collect();
    assert_nothing_left(&daemon, &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_gets_ready_fails_after_bounded_boots_and_leaves_nothing() {
    // The workload never listens on its declared port, so the guest never reports ready.
    let daemon = Daemon::start_with("[guest]\nready_timeout_secs = 8\nboot_attempts = 2");
    let mut client = daemon.client().await;
    let machine = create(
        &mut client,
        "never",
        "never",
        &["/bin/busybox", "sleep", "1000"],
    )
    .await;
    let failed = wait_for(&mut client, &machine.id, pb::MachineState::Failed).await;
    assert!(
        failed.failure.contains("2 boot attempts"),
        "{}",
        failed.failure
    );
    let boots = failed
        .timings
        .iter()
        .filter(|t| t.step == "vmm" && t.direction == "acquire" && t.outcome == "ok")
        .count();
    assert_eq!(boots, 2, "{:?}", failed.timings);
    assert_nothing_left(&daemon, std::slice::from_ref(&machine.id));
    destroy(&mut client, &machine.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_step_failure_fails_the_machine_at_the_first_attempt_naming_the_cause() {
    let Some(registry) = support::registry::start_or_skip("permanent step failure") else {
        return;
    };
    let daemon = Daemon::start_with(&format!(
        "[images]\ninsecure_registries = [\"{}\"]\n",
        registry.addr
    ));
    let mut client = daemon.client().await;
    // A workload larger than the guest's config could ever hold is refused at admission,
    // naming the field; nothing is recorded.
    let mut huge = demo_request("too-big", "too-big", &["/bin/busybox", "sleep", "1"]);
    if let Some(spec) = huge.spec.as_mut() {
        spec.env.insert("HUGE".into(), "x".repeat(1_200_000));
    }
    let refused = client.machines.create_machine(huge).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("spec.env:"),
        "{}",
        refused.message()
    );
    assert!(support::all_machines(&mut client).await.is_empty());
    // An image the registry says it does not have can never be pulled: the image step
    // fails permanently, once, and the machine fails naming it.
    let mut request = demo_request("missing", "missing", &["/bin/app"]);
    if let Some(spec) = request.spec.as_mut() {
        spec.image = registry.reference("nothing", "here");
    }
    let machine = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    let failed = wait_for(&mut client, &machine.id, pb::MachineState::Failed).await;
    assert!(failed.failure.starts_with("image:"), "{}", failed.failure);
    let attempts = failed
        .timings
        .iter()
        .filter(|t| t.step == "image" && t.direction == "acquire")
        .count();
    assert_eq!(attempts, 1, "{:?}", failed.timings);
    assert!(
        !failed.timings.iter().any(|t| t.step == "vmm"),
        "no VMM for a machine without an image: {:?}",
        failed.timings
    );
    assert_nothing_left(&daemon, std::slice::from_ref(&machine.id));
    destroy(&mut client, &machine.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_readopts_its_running_machine() {
    let mut daemon = Daemon::start_with("");
    let mut client = daemon.client().await;
    let machine = create(&mut client, "adopt", "adopt", &[]).await;
    let started = wait_for(&mut client, &machine.id, pb::MachineState::Started).await;

    daemon.kill();
    daemon.spawn();
    let mut client = daemon.client().await;
    let after = client
        .machines
        .get_machine(pb::MachineRef {
            id: machine.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(after.vmm_pid, started.vmm_pid);
    // Re-adopted, not restarted: still started, same process, still serving.
    let settled = wait_for(&mut client, &machine.id, pb::MachineState::Started).await;
    assert_eq!(settled.vmm_pid, started.vmm_pid);
    assert_eq!(vmm_processes(&machine.id), vec![started.vmm_pid as i32]);
    assert!(http_get(&settled.guest_ip, 80).contains("hearth demo"));

    client
        .machines
        .stop_machine(pb::MachineRef {
            id: machine.id.clone(),
        })
        .await
        .expect("stop");
    wait_for(&mut client, &machine.id, pb::MachineState::Stopped).await;
    assert!(vmm_processes(&machine.id).is_empty());
    destroy(&mut client, &machine.id).await;
    assert_nothing_left(&daemon, &[machine.id]);
}

/// SIGKILLs the machine's VMM behind the daemon's back, then waits, on the event stream
/// alone (no call that would wake the run), for the run to notice and start it again.
async fn kill_vmm_and_see_it_started_again(
    client: &mut Client,
    id: &str,
    before: &pb::Machine,
    after_seq: u64,
) -> (pb::Machine, u64) {
    let pid = nix::unistd::Pid::from_raw(before.vmm_pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the VMM");
    let gone = support::wait_event(client, id, after_seq, "the VMM is gone").await;
    let log = events_until(client, id, gone.seq, pb::MachineState::Started).await;
    let last_seq = log.last().map_or(gone.seq, |e| e.seq);
    let again = support::get_machine(client, id).await;
    assert_eq!(again.state, pb::MachineState::Started as i32);
    assert_ne!(again.vmm_pid, before.vmm_pid, "a new VMM");
    assert_eq!(vmm_processes(id), vec![again.vmm_pid as i32]);
    assert_eq!(
        again.guest_ip, before.guest_ip,
        "the lease and network are kept"
    );
    assert!(http_get(&again.guest_ip, 80).contains("hearth demo"));
    (again, last_seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_dies_is_noticed_at_once_and_started_again_also_after_a_restart() {
    let mut daemon = Daemon::start_with("");
    let mut client = daemon.client().await;
    let mut routes_watch = watch_routes(&mut client).await;
    let machine = create(&mut client, "phoenix", "phoenix", &[]).await;
    let first = wait_for(&mut client, &machine.id, pb::MachineState::Started).await;

    // Under the running daemon: its exit watch notices, the route is withdrawn while the
    // guest is down and published again once the new one is ready.
    let (second, seq) =
        kill_vmm_and_see_it_started_again(&mut client, &machine.id, &first, 0).await;
    use pb::route_change::Kind;
    assert_eq!(
        route_changes(&mut routes_watch, &machine.id, 3).await,
        [Kind::Published, Kind::Unpublished, Kind::Published]
    );

    // After a daemon restart: the re-adopted run watches the VMM it found.
    daemon.kill();
    daemon.spawn();
    let mut client = daemon.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while support::node(&mut client).await.runs_observed < 1 {
        assert!(std::time::Instant::now() < deadline, "the run never looked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let adopted = support::get_machine(&mut client, &machine.id).await;
    assert_eq!(adopted.vmm_pid, second.vmm_pid, "re-adopted, not restarted");
    kill_vmm_and_see_it_started_again(&mut client, &machine.id, &adopted, seq).await;

    destroy(&mut client, &machine.id).await;
    assert_nothing_left(&daemon, &[machine.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_found_at_restart_is_repaired_through_the_normal_steps() {
    let mut daemon = Daemon::start_with("");
    let mut client = daemon.client().await;
    let machine = create(&mut client, "drift", "drift", &[]).await;
    let before = wait_for(&mut client, &machine.id, pb::MachineState::Started).await;

    // While the daemon is down, the host loses the machine's namespace.
    daemon.kill();
    let netns = format!("{}-{}", daemon.prefix, machine.id);
    let status = std::process::Command::new("ip")
        .args(["netns", "del", &netns])
        .status()
        .expect("ip netns del");
    assert!(status.success());
    daemon.spawn();
    let mut client = daemon.client().await;

    // The run notices, releases what stood on the network, builds it again and boots a
    // new VMM in it: the events tell it, ending with the route published again.
    let mut events = client
        .machines
        .watch_events(pb::WatchEventsRequest {
            machine_id: machine.id.clone(),
            after_seq: 0,
            history_only: false,
        })
        .await
        .expect("events")
        .into_inner();
    let mut noticed = false;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(240), events.message())
            .await
            .expect("the repair finishes in time")
            .expect("event stream")
            .expect("stream open");
        noticed |= event.message.contains("network is gone from the host");
        if noticed && event.message.starts_with("acquire publish: ok") {
            break;
        }
    }
    let after = wait_for(&mut client, &machine.id, pb::MachineState::Started).await;
    assert_ne!(
        after.vmm_pid, before.vmm_pid,
        "the VMM in the lost namespace was replaced"
    );
    assert_eq!(vmm_processes(&machine.id), vec![after.vmm_pid as i32]);
    assert!(http_get(&after.guest_ip, 80).contains("hearth demo"));
    support::assert_audit_clean(&mut client).await;
    destroy(&mut client, &machine.id).await;
    assert_nothing_left(&daemon, &[machine.id]);
}

/// Waits for the machine's event log to show a message starting with `prefix`.
/// A watch on the registry's route changes, from now on.
async fn watch_routes(client: &mut Client) -> tonic::Streaming<pb::RouteChange> {
    client
        .registry
        .watch_routes(pb::WatchRoutesRequest {})
        .await
        .expect("watch routes")
        .into_inner()
}

/// The next `n` route changes a watch hears, all about machine `id`.
async fn route_changes(
    watch: &mut tonic::Streaming<pb::RouteChange>,
    id: &str,
    n: usize,
) -> Vec<pb::route_change::Kind> {
    let mut kinds = Vec::new();
    while kinds.len() < n {
        let change = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("a route change in time")
            .expect("route stream")
            .expect("route stream open");
        let about = change.route.as_ref().map(|r| r.machine_id.clone());
        assert_eq!(about.as_deref(), Some(id));
        kinds.push(change.kind());
    }
    kinds
}

/// The first of the machine's events after `after_seq` whose message starts with `prefix`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_during_create_and_stop_during_start_cancel_the_step_in_progress() {
    // A long readiness deadline: the cancelled wait must not be what ends the step.
    let daemon = Daemon::start_with("[guest]\nready_timeout_secs = 600");
    let mut client = daemon.client().await;

    // Destroy while the `ready` step is waiting: the workload never listens on its
    // port, so only the destroy can end the wait.
    let request = support::shell_request("doomed", "doomed", "sleep 600");
    let doomed = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    support::wait_event(&mut client, &doomed.id, 0, "acquire vmm: ok").await;
    let clock = std::time::Instant::now();
    client
        .machines
        .destroy_machine(pb::MachineRef {
            id: doomed.id.clone(),
        })
        .await
        .expect("destroy");
    let gone = wait_for(&mut client, &doomed.id, pb::MachineState::Destroyed).await;
    assert!(
        clock.elapsed() < Duration::from_secs(60),
        "the boot wait was not cancelled"
    );
    assert!(
        !gone
            .timings
            .iter()
            .any(|t| t.step == "ready" && t.direction == "acquire"),
        "the ready wait ran to its end: {:?}",
        gone.timings
    );
    support::wait_event(&mut client, &doomed.id, 0, "ready cancelled").await;

    // Stop while a start is booting the guest again; repeating the stop changes nothing.
    let m = create(&mut client, "restless", "restless", &[]).await;
    wait_for(&mut client, &m.id, pb::MachineState::Started).await;
    client
        .machines
        .stop_machine(pb::MachineRef { id: m.id.clone() })
        .await
        .expect("stop");
    wait_for(&mut client, &m.id, pb::MachineState::Stopped).await;
    client
        .machines
        .start_machine(pb::MachineRef { id: m.id.clone() })
        .await
        .expect("start");
    let seq_before_stop = {
        // The start's VMM is up; its guest is booting.
        let mut events = client
            .machines
            .watch_events(pb::WatchEventsRequest {
                machine_id: m.id.clone(),
                after_seq: 0,
                history_only: false,
            })
            .await
            .expect("events")
            .into_inner();
        let mut vmm_acquires = 0;
        loop {
            let event = events.message().await.expect("stream").expect("open");
            if event.message.starts_with("acquire vmm: ok") {
                vmm_acquires += 1;
                if vmm_acquires == 2 {
                    break event.seq;
                }
            }
        }
    };
    for _ in 0..2 {
        client
            .machines
            .stop_machine(pb::MachineRef { id: m.id.clone() })
            .await
            .expect("stop");
    }
    let stopped = wait_for(&mut client, &m.id, pb::MachineState::Stopped).await;
    assert!(
        vmm_processes(&m.id).is_empty(),
        "the booting VMM was stopped"
    );
    // Every stop was answered before the machine reached Stopped, so their records come
    // before that event.
    let desired_changes = events_until(
        &mut client,
        &m.id,
        seq_before_stop,
        pb::MachineState::Stopped,
    )
    .await
    .iter()
    .filter(|e| e.message.starts_with("desired state"))
    .count();
    assert_eq!(desired_changes, 1, "a repeated stop is recorded once");
    assert_eq!(stopped.desired, pb::DesiredState::Stopped as i32);
    destroy(&mut client, &m.id).await;
    assert_nothing_left(&daemon, &[doomed.id, m.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_overrides_reach_the_guest_entrypoint_env_workdir_user_and_disk_size() {
    let daemon = Daemon::start_with("");
    let mut client = daemon.client().await;
    // The demo image's default is its web server; this replaces the entrypoint, then
    // serves what the workload saw about itself.
    let script = "mkdir -p /srv/www && cd /srv/www && \
        echo \"seen $GREETING in $OLDPWD as $(/bin/busybox id -u) on $(/bin/busybox df -m / | /bin/busybox tail -1 | /bin/busybox awk '{print $2}') MiB\" > index.html && \
        exec /bin/busybox httpd -f -p 80 -h /srv/www";
    let mut request = support::shell_request("ovr-1", "overrides", script);
    if let Some(spec) = request.spec.as_mut() {
        spec.env.insert("GREETING".into(), "hello".into());
        spec.workdir = "/tmp".into();
        spec.user = "0:0".into();
        spec.disk_mib = 600;
    }
    let m = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    let started = wait_for(&mut client, &m.id, pb::MachineState::Started).await;
    let page = http_get(&started.guest_ip, 80);
    assert!(page.contains("seen hello in /tmp as 0 on"), "{page}");
    let size: u64 = page
        .split(" on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {page}"));
    assert!(size > 500, "the root file system is {size} MiB: {page}");
    destroy(&mut client, &m.id).await;
    assert_nothing_left(&daemon, std::slice::from_ref(&m.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_created_stopped_settles_without_booting_and_starts_later() {
    let daemon = Daemon::start_with("");
    let mut client = daemon.client().await;
    let mut request = demo_request("cold-1", "later", &[]);
    request.start = Some(false);
    let created = client
        .machines
        .create_machine(request.clone())
        .await
        .expect("create stopped")
        .into_inner();
    let stopped = wait_for(&mut client, &created.id, pb::MachineState::Stopped).await;
    assert_eq!(stopped.vmm_pid, 0, "no VMM for a machine created stopped");
    assert!(vmm_processes(&created.id).is_empty());
    assert!(
        stopped.timings.iter().all(|t| t.step != "vmm"),
        "the vmm step never ran: {:?}",
        stopped.timings
    );
    // The same request again is the same machine; the same id asking to start is
    // another request, refused.
    let again = client
        .machines
        .create_machine(request.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(again.id, created.id);
    let mut started_body = request;
    started_body.start = None;
    let refused = client
        .machines
        .create_machine(started_body)
        .await
        .expect_err("same request id, another body");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("request_id"), "{refused:?}");

    client
        .machines
        .start_machine(pb::MachineRef {
            id: created.id.clone(),
        })
        .await
        .expect("start");
    let started = wait_for(&mut client, &created.id, pb::MachineState::Started).await;
    let page = http_get(&started.guest_ip, 80);
    assert!(page.contains("hearth demo"), "{page}");
    destroy(&mut client, &created.id).await;
    assert_nothing_left(&daemon, &[created.id]);
}
