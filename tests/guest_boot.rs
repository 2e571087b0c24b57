//! Real Linux guests under QEMU (run as root): the guest kit, the static `hearth-init`
//! and the QEMU driver together.
//!
//! Needs the extracted guest kernel (`deploy/install-guest-kernel.sh`) and the static init
//! (`deploy/build-guest-init.sh`); without them every test here says so loudly and
//! returns. Host resources carry test-unique names (`hgt-<pid>-<n>`) and are removed by a
//! drop guard even when a test fails.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use hearth::guest::config::GuestConfig;
use hearth::guest::protocol::{ExitStatus, GuestState};
use hearth::vmm::{Accel, Liveness, VmmDriver, VmmProcess, find_processes};
use support::guest_fixture::{
    Cleanup, Fixture, PREFIX, assert_no_vmm, driver, http_get_in_netns, machine, read_from_image,
    test_net, unique,
};
use support::guest_prereqs::QEMU;

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The fixture, or `None` (after a loud message) when a prerequisite is missing.
fn fixture() -> Option<&'static Fixture> {
    support::guest_fixture::fixture("guest_boot")
}

fn config(id: &str, command: &[&str]) -> GuestConfig {
    GuestConfig {
        machine_id: id.to_string(),
        hostname: id.to_string(),
        network: None,
        command: command.iter().map(|s| s.to_string()).collect(),
        env: vec![("GREETING".into(), "hi there".into())],
        workdir: Some("/tmp".into()),
        ports: vec![],
        user: None,
        prepared: false,
        overlay_root: false,
    }
}

/// Polls the guest's state until `want` holds or the deadline passes.
async fn wait_state(
    driver: &VmmDriver,
    process: &VmmProcess,
    want: impl Fn(&GuestState) -> bool,
) -> GuestState {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = driver
            .guest_state(process, Duration::from_secs(10))
            .await
            .expect("guest state");
        if want(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "last state {state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_reports_ready_and_exit_status_then_stops_gracefully() {
    let Some(fx) = fixture() else { return };
    let mut cleanup = Cleanup::default();
    let id = unique("exit");
    let m = machine(
        fx,
        &mut cleanup,
        &config(&id, &["sh", "-c", "echo \"$GREETING from $(pwd)\"; exit 7"]),
    );
    let driver = driver(fx);

    let started = Instant::now();
    let process = driver.launch(&m.spec).await.expect("launch");
    assert_eq!(driver.liveness(&process), Liveness::Running);
    let ready = driver
        .wait_ready(&process, READY_TIMEOUT)
        .await
        .expect("ready");
    let wall = started.elapsed();
    assert!(ready.boot_ms > 0 && ready.boot_ms < 60_000, "{ready:?}");
    eprintln!(
        "launch to ready: {} ms (guest boot_ms {})",
        wall.as_millis(),
        ready.boot_ms
    );

    let state = wait_state(&driver, &process, |s| {
        matches!(s, GuestState::Exited { .. })
    })
    .await;
    assert_eq!(
        state,
        GuestState::Exited {
            boot_ms: Some(ready.boot_ms),
            status: ExitStatus::Code(7)
        }
    );

    let outcome = driver
        .stop(&process, Duration::from_secs(60))
        .await
        .expect("stop");
    assert!(outcome.graceful, "{outcome:?}");
    assert_eq!(driver.liveness(&process), Liveness::Gone);
    assert_no_vmm(&id, process.pid);
    // Stopping again is fine.
    assert!(driver.stop(&process, Duration::from_secs(1)).await.is_ok());

    // The workload's output went to the root disk, with its env and workdir, and the
    // graceful shutdown flushed it.
    let log = read_from_image(&m.spec.root_disk, "/var/log/hearth-workload.log");
    assert!(log.contains("hi there from /tmp"), "workload log: {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_twice_adopts_and_stop_forces_a_guest_that_will_not_stop() {
    let Some(fx) = fixture() else { return };
    let mut cleanup = Cleanup::default();
    let id = unique("stubborn");
    // Ignores SIGTERM; the guest init only gets rid of it with SIGKILL after its own
    // grace, which is longer than the host's grace below. The port it opens after the
    // trap is set makes Ready mean "the trap is in place".
    let mut cfg = config(
        &id,
        &[
            "sh",
            "-c",
            "trap '' TERM; httpd -p 8081 -h /www; while true; do sleep 1; done",
        ],
    );
    cfg.ports = vec![8081];
    let m = machine(fx, &mut cleanup, &cfg);
    let driver = driver(fx);

    let first = driver.launch(&m.spec).await.expect("launch");
    let second = driver.launch(&m.spec).await.expect("launch again");
    assert_eq!(first, second, "the second launch must adopt the first VMM");
    let ids: Vec<_> = find_processes(PREFIX)
        .into_iter()
        .filter(|(i, _)| *i == id)
        .collect();
    assert_eq!(ids, vec![(id.clone(), first.pid)]);

    driver
        .wait_ready(&first, READY_TIMEOUT)
        .await
        .expect("ready");
    let t = Instant::now();
    let outcome = driver
        .stop(&first, Duration::from_secs(1))
        .await
        .expect("stop");
    assert!(
        !outcome.graceful,
        "the guest should not have stopped in time"
    );
    // Grace, QMP `quit` and the wait for exit are each bounded (about 8 s in all); this
    // catches a stop that hangs, not one that is slow on a loaded host.
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "stop took {:?}",
        t.elapsed()
    );
    assert_eq!(driver.liveness(&first), Liveness::Gone);
    assert_no_vmm(&id, first.pid);

    // Idempotent: stopping a gone VMM is Ok.
    let again = driver
        .stop(&first, Duration::from_secs(1))
        .await
        .expect("stop again");
    assert!(again.graceful);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_guest_ends_the_ready_wait_early() {
    let Some(fx) = fixture() else { return };
    let mut cleanup = Cleanup::default();
    let id = unique("noroot");
    let mut m = machine(fx, &mut cleanup, &config(&id, &["true"]));
    // No root disk: a second copy of the config disk instead, so the init finds no root
    // disk and fails.
    let bad = m.spec.workdir.join("config2.img");
    std::fs::copy(&m.spec.config_disk, &bad).expect("copy");
    m.spec.root_disk = bad;
    let driver = driver(fx);
    let process = driver.launch(&m.spec).await.expect("launch");
    let t = Instant::now();
    let err = driver
        .wait_ready(&process, READY_TIMEOUT)
        .await
        .expect_err("must fail");
    assert!(
        t.elapsed() < Duration::from_secs(45),
        "the wait should end when the guest fails, took {:?}",
        t.elapsed()
    );
    let text = err.to_string();
    assert!(
        text.contains("disk") || text.contains("config"),
        "error should say what the init missed: {text}"
    );
    driver
        .stop(&process, Duration::from_secs(1))
        .await
        .expect("stop");
    assert_no_vmm(&id, process.pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networked_guest_serves_tcp_to_its_namespace() {
    let Some(fx) = fixture() else { return };
    let mut cleanup = Cleanup::default();
    let host_ip = Ipv4Addr::new(10, 251, 7, 1);
    let guest_ip = Ipv4Addr::new(10, 251, 7, 2);
    let net = test_net(&mut cleanup, host_ip);
    let id = unique("web");
    let mut cfg = config(&id, &["httpd", "-f", "-p", "8080", "-h", "/www"]);
    cfg.network = Some(net.guest_network(guest_ip));
    cfg.ports = vec![8080];
    let mut m = machine(fx, &mut cleanup, &cfg);
    net.attach(&mut m.spec, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    let driver = driver(fx);
    let process = driver.launch(&m.spec).await.expect("launch");
    // Ready means httpd listens on 8080.
    let ready = driver
        .wait_ready(&process, READY_TIMEOUT)
        .await
        .expect("ready");
    let (page, connect) = http_get_in_netns(&net.name, SocketAddr::from((guest_ip, 8080)));
    assert!(page.contains("hello from the guest"), "{page}");
    eprintln!(
        "networked guest ready in {} ms; TCP connect {:?}",
        ready.boot_ms, connect
    );
    let outcome = driver
        .stop(&process, Duration::from_secs(60))
        .await
        .expect("stop");
    assert!(outcome.graceful);
    assert_no_vmm(&id, process.pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_declared_ports() {
    let Some(fx) = fixture() else { return };
    let mut cleanup = Cleanup::default();
    let id = unique("late");
    // Listens only after a while: Ready must not come before.
    let mut cfg = config(&id, &["sh", "-c", "sleep 2; exec httpd -f -p 9090 -h /www"]);
    cfg.ports = vec![9090];
    let m = machine(fx, &mut cleanup, &cfg);
    let driver = driver(fx);
    let process = driver.launch(&m.spec).await.expect("launch");
    let early = driver
        .wait_ready(&process, Duration::from_millis(300))
        .await;
    assert!(early.is_err(), "ready before the port listened: {early:?}");
    let ready = driver
        .wait_ready(&process, READY_TIMEOUT)
        .await
        .expect("ready");
    assert!(ready.boot_ms >= 2000, "{ready:?}");
    driver
        .stop(&process, Duration::from_secs(60))
        .await
        .expect("stop");
    assert_no_vmm(&id, process.pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accel_probe_says_tcg_here_and_is_cached() {
    let Some(fx) = fixture() else { return };
    let cache = tempfile::tempdir().expect("cache");
    let t = Instant::now();
    let first = hearth::vmm::accel::probe_accel(Path::new(QEMU), &fx.kit, cache.path()).await;
    let probe = t.elapsed();
    // This machine's KVM cannot run a stock kernel (see the environment notes).
    assert_eq!(first, Accel::Tcg);
    // The answer is one cache file; a second call reads it rather than probing again.
    // Proof: a planted answer a probe here could never give comes back.
    let files: Vec<_> = std::fs::read_dir(cache.path())
        .expect("cache dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::write(&files[0], "\"kvm\"").expect("plant an answer");
    let t = Instant::now();
    let second = hearth::vmm::accel::probe_accel(Path::new(QEMU), &fx.kit, cache.path()).await;
    let cached = t.elapsed();
    eprintln!("accel probe: {first:?} in {probe:?}; cached answer in {cached:?}");
    assert_eq!(second, Accel::Kvm);
    // No probe VMM is left behind (its command line names the cache directory).
    let marker = cache.path().to_string_lossy().into_owned();
    let leftovers: Vec<_> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .filter(|c| c.contains(&marker))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_time_median() {
    let Some(fx) = fixture() else { return };
    let mut cleanup = Cleanup::default();
    let driver = driver(fx);
    let mut walls = Vec::new();
    let mut guest = Vec::new();
    for _ in 0..3 {
        let id = unique("bench");
        let m = machine(fx, &mut cleanup, &config(&id, &["sleep", "600"]));
        let t = Instant::now();
        let process = driver.launch(&m.spec).await.expect("launch");
        let ready = driver
            .wait_ready(&process, READY_TIMEOUT)
            .await
            .expect("ready");
        walls.push(t.elapsed().as_millis());
        guest.push(ready.boot_ms);
        driver
            .stop(&process, Duration::from_secs(60))
            .await
            .expect("stop");
    }
    walls.sort();
    guest.sort();
    eprintln!(
        "boot to ready over {} boots: median {} ms launch-to-ready (host), median {} ms guest boot_ms; all {walls:?} / {guest:?}",
        walls.len(),
        walls[walls.len() / 2],
        guest[guest.len() / 2]
    );
    assert!(walls[walls.len() / 2] < 30_000);
}

#[tokio::test]
async fn the_workload_runs_as_the_configured_user() {
    let Some(fx) = fixture() else { return };
    let mut cleanup = Cleanup::default();
    let id = unique("user");
    let mut cfg = config(
        &id,
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "echo \"ids $(/bin/busybox id -u):$(/bin/busybox id -g) groups $(/bin/busybox id -G)\"",
        ],
    );
    // The fixture's root has no /etc/passwd: numeric ids need none.
    cfg.user = Some("1234:567".into());
    let m = machine(fx, &mut cleanup, &cfg);
    let driver = driver(fx);
    let process = driver.launch(&m.spec).await.expect("launch");
    driver
        .wait_ready(&process, READY_TIMEOUT)
        .await
        .expect("ready");
    let state = wait_state(&driver, &process, |s| {
        matches!(s, GuestState::Exited { .. })
    })
    .await;
    assert!(
        matches!(
            state,
            GuestState::Exited {
                status: ExitStatus::Code(0),
                ..
            }
        ),
        "{state:?}"
    );
    driver
        .stop(&process, Duration::from_secs(60))
        .await
        .expect("stop");
    let log = read_from_image(&m.spec.root_disk, "/var/log/hearth-workload.log");
    assert!(
        log.contains("ids 1234:567 groups 567"),
        "workload log: {log:?}"
    );
}
