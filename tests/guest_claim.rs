//! Prepared guests under QEMU (run as root): a guest booted with no workload reports Idle,
//! is paused and resumed, and a claim over the agent link gives it its workload, hostname,
//! clock and entropy; a second claim starts nothing.
//!
//! Needs what `guest_boot` needs (the extracted guest kernel, the static init, busybox,
//! QEMU); without it every test here says so loudly and returns. Host resources carry
//! test-unique names (`hgt-<pid>-<n>`) and are removed by a drop guard even when a test
//! fails.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth::guest::config::{GuestConfig, GuestNetwork};
use hearth::guest::protocol::{Claim, GuestState, claim_entropy};
use hearth::vmm::{Liveness, ReadyError, RunState};
use support::guest_fixture::{
    Cleanup, Fixture, assert_no_vmm, driver, http_get_in_netns, machine, read_from_image, test_net,
    unique,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const CLAIM_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the claimed workloads serve.
const PORT: u16 = 8080;

/// The fixture, or `None` (after a loud message) when a prerequisite is missing.
fn fixture() -> Option<&'static Fixture> {
    support::guest_fixture::fixture("guest_claim")
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// What the host writes for a prepared machine: network and a placeholder hostname, no
/// workload.
fn prepared_config(id: &str, network: Option<GuestNetwork>) -> GuestConfig {
    GuestConfig {
        machine_id: id.to_string(),
        hostname: "prepared".into(),
        network,
        command: vec![],
        env: vec![],
        workdir: None,
        ports: vec![],
        user: None,
        prepared: true,
        overlay_root: false,
    }
}

/// The machine a claim turns the prepared one into (its workload fields go in the claim).
fn claimed_config(prepared: &GuestConfig, hostname: &str, script: &str) -> GuestConfig {
    GuestConfig {
        hostname: hostname.into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        workdir: Some("/www".into()),
        prepared: false,
        ..prepared.clone()
    }
}

/// The `key=value` words of a page or file.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Serves a page made when the workload started: its env, the guest's hostname and clock.
const PAGE_SCRIPT: &str = "echo \"mark=$CLAIM_MARK host=$(hostname) now=$(date +%s)\" > /www/index.html; exec httpd -f -p 8080 -h /www";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_prepared_guest_is_claimed_once() {
    let Some(fx) = fixture() else { return };
    let mut cleanup = Cleanup::default();
    let host_ip = Ipv4Addr::new(10, 251, 9, 1);
    let guest_ip = Ipv4Addr::new(10, 251, 9, 2);
    let net = test_net(&mut cleanup, host_ip);
    let ns = net.name.clone();
    let id = unique("claim");
    let prepared = prepared_config(&id, Some(net.guest_network(guest_ip)));
    let mut m = machine(fx, &mut cleanup, &prepared);
    net.attach(&mut m.spec, [0x52, 0x54, 0x00, 0x12, 0x34, 0x57]);
    let driver = driver(fx);

    let t = Instant::now();
    let process = driver.launch(&m.spec).await.expect("launch");
    driver
        .wait_idle(&process, BOOT_TIMEOUT)
        .await
        .expect("the prepared guest reports idle");
    let to_idle = t.elapsed();
    driver.pause(&process).await.expect("pause");
    assert_eq!(
        driver.run_state(&process).await.expect("run state"),
        RunState::Paused
    );
    // Paused for a while, as prepared capacity waits: under TCG the guest's clock stands
    // still meanwhile, so only the claim can make it right again.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mark = format!("first-{}", std::process::id());
    let mut wanted = claimed_config(&prepared, "claimed-web", PAGE_SCRIPT);
    wanted.env = vec![("CLAIM_MARK".into(), mark.clone())];
    wanted.ports = vec![PORT];
    let claim = Claim::from_config(&wanted, now_unix_ms(), claim_entropy().expect("entropy"));

    let t = Instant::now();
    driver.resume(&process).await.expect("resume");
    let resumed = t.elapsed();
    let ready = driver
        .claim(&process, &claim, CLAIM_TIMEOUT)
        .await
        .expect("the claimed guest gets ready");
    let claimed = t.elapsed();
    eprintln!(
        "prepared guest: launch to idle {} ms; claim: resume {:.1} ms, resume + claim to ready {:.1} ms",
        to_idle.as_millis(),
        resumed.as_secs_f64() * 1000.0,
        claimed.as_secs_f64() * 1000.0
    );
    assert!(matches!(ready.state, GuestState::Ready { .. }), "{ready:?}");
    assert_eq!(
        driver.run_state(&process).await.expect("run state"),
        RunState::Running
    );

    let (page, _) = http_get_in_netns(&ns, SocketAddr::from((guest_ip, PORT)));
    assert_eq!(field(&page, "mark"), Some(mark.as_str()), "{page}");
    assert_eq!(field(&page, "host"), Some("claimed-web"), "{page}");
    let guest_now: u64 = field(&page, "now")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no clock in {page}"));
    let host_now = now_unix_ms() / 1000;
    assert!(
        guest_now.abs_diff(host_now) <= 2,
        "guest clock {guest_now} vs host {host_now}: {page}"
    );

    // A second claim (a retry, or a mistake) starts nothing: the guest answers Ready.
    let mut other = wanted.clone();
    other.hostname = "second".into();
    other.env = vec![("CLAIM_MARK".into(), "second".into())];
    let second = Claim::from_config(&other, now_unix_ms(), claim_entropy().expect("entropy"));
    let again = driver
        .claim(&process, &second, CLAIM_TIMEOUT)
        .await
        .expect("a repeated claim waits for the readiness that is there");
    assert_eq!(again.boot_ms, ready.boot_ms, "{again:?} vs {ready:?}");
    let (page, _) = http_get_in_netns(&ns, SocketAddr::from((guest_ip, PORT)));
    assert_eq!(field(&page, "mark"), Some(mark.as_str()), "{page}");
    assert_eq!(
        driver
            .guest_state(&process, Duration::from_secs(10))
            .await
            .expect("state"),
        GuestState::Ready {
            boot_ms: ready.boot_ms
        }
    );

    let outcome = driver
        .stop(&process, Duration::from_secs(60))
        .await
        .expect("stop");
    assert!(outcome.graceful, "{outcome:?}");
    assert_eq!(driver.liveness(&process), Liveness::Gone);
    assert_no_vmm(&id, process.pid);
    // The clock and the entropy went in without complaint (the init logs a failed one).
    let log = read_from_image(&m.spec.root_disk, "/var/log/hearth-workload.log");
    assert!(!log.contains("claim:"), "workload log: {log:?}");

    drop(cleanup);
    assert!(
        !Path::new("/run/netns").join(&ns).exists(),
        "namespace {ns} left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_sets_the_guest_clock_to_the_hosts_word() {
    let Some(fx) = fixture() else { return };
    let mut cleanup = Cleanup::default();
    let id = unique("clock");
    let prepared = prepared_config(&id, None);
    let m = machine(fx, &mut cleanup, &prepared);
    let driver = driver(fx);
    let process = driver.launch(&m.spec).await.expect("launch");
    driver
        .wait_idle(&process, BOOT_TIMEOUT)
        .await
        .expect("idle");
    // A time no guest clock has by itself: 30 days ahead.
    let ahead = 30 * 24 * 3600;
    let wanted = claimed_config(&prepared, "clocked", "date +%s > /tmp/now");
    let claim = Claim::from_config(
        &wanted,
        now_unix_ms() + ahead * 1000,
        claim_entropy().expect("entropy"),
    );
    driver
        .claim(&process, &claim, CLAIM_TIMEOUT)
        .await
        .expect("ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(
        driver
            .guest_state(&process, Duration::from_secs(10))
            .await
            .expect("state"),
        GuestState::Exited { .. }
    ) {
        assert!(Instant::now() < deadline, "the workload did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    driver
        .stop(&process, Duration::from_secs(60))
        .await
        .expect("stop");
    assert_no_vmm(&id, process.pid);
    let guest_now: u64 = read_from_image(&m.spec.root_disk, "/tmp/now")
        .trim()
        .parse()
        .expect("a time");
    let expected = now_unix_ms() / 1000 + ahead;
    assert!(
        guest_now.abs_diff(expected) <= 60,
        "guest clock {guest_now}, expected about {expected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_guest_is_not_ready_by_itself_and_stops_gracefully() {
    let Some(fx) = fixture() else { return };
    let mut cleanup = Cleanup::default();
    let id = unique("idle");
    let m = machine(fx, &mut cleanup, &prepared_config(&id, None));
    let driver = driver(fx);
    let process = driver.launch(&m.spec).await.expect("launch");
    driver
        .wait_idle(&process, BOOT_TIMEOUT)
        .await
        .expect("idle");
    // Waiting for readiness without a claim ends at once, saying why.
    let t = Instant::now();
    let err = driver
        .wait_ready(&process, BOOT_TIMEOUT)
        .await
        .expect_err("not ready without a claim");
    assert!(matches!(err, ReadyError::Unclaimed), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let outcome = driver
        .stop(&process, Duration::from_secs(60))
        .await
        .expect("stop");
    assert!(outcome.graceful, "{outcome:?}");
    assert_no_vmm(&id, process.pid);
}
