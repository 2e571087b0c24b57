//! Prepared guests under QEMU (run as root): a guest booted with no workload reports Idle,
//! is paused and resumed, and a claim over the agent link gives it its workload, hostname,
//! clock and entropy; a second claim starts nothing.
//!
//! Needs what `guest_boot` needs (the extracted guest kernel, the static init, busybox,
//! QEMU); without it every test here says so loudly and returns. Host resources carry
//! test-unique names (`hgc-<pid>-<n>`) and are removed by a drop guard even when a test
//! fails.

mod support;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth::guest::config::{GuestConfig, GuestNetwork, write_config_disk};
use hearth::guest::kit::GuestKit;
use hearth::guest::protocol::{Claim, GuestState, claim_entropy};
use hearth::vmm::{
    LaunchSpec, Liveness, QemuDriver, ReadyError, RunState, TapSpec, VmmDriver, find_processes,
};
use support::guest_prereqs::QEMU;

/// Marker prefix of every VMM these tests start (never the daemon's).
const PREFIX: &str = "hearthtest-";
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const CLAIM_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the claimed workloads serve.
const PORT: u16 = 8080;

struct Fixture {
    kit: GuestKit,
    /// A root image with busybox; each guest boots a copy.
    root_template: PathBuf,
    cache_dir: PathBuf,
    _dir: tempfile::TempDir,
}

/// The fixture, or `None` (after a loud message) when a prerequisite is missing.
fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture).as_ref()
}

fn build_fixture() -> Option<Fixture> {
    let prereqs = support::guest_prereqs::guest_prereqs("guest_claim")?;
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("rootfs");
    for d in ["bin", "etc", "var/log", "tmp", "www", "proc", "sys", "dev"] {
        std::fs::create_dir_all(tree.join(d)).expect("mkdir");
    }
    std::fs::copy(&prereqs.busybox, tree.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "sleep", "echo", "cat", "httpd", "date", "hostname"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).expect("symlink");
    }
    let root_template = dir.path().join("root.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(&tree)
        .arg(&root_template)
        .arg("32M"));
    Some(Fixture {
        kit: prereqs.kit,
        root_template,
        cache_dir: dir.path().join("cache"),
        _dir: dir,
    })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "hgc-{}-{}{}",
        std::process::id(),
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn driver(fx: &Fixture) -> VmmDriver {
    VmmDriver::Qemu(
        QemuDriver::new(PathBuf::from(QEMU), fx.cache_dir.clone()).with_name_prefix(PREFIX),
    )
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Kills the test's VMMs and deletes its network namespaces, whatever happened.
#[derive(Default)]
struct Cleanup {
    machines: Vec<String>,
    netns: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (id, pid) in find_processes(PREFIX) {
            if self.machines.contains(&id) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
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

/// A machine directory with a fresh root disk and the config disk.
struct Machine {
    spec: LaunchSpec,
    _dir: tempfile::TempDir,
}

fn machine(fx: &Fixture, cleanup: &mut Cleanup, config: &GuestConfig) -> Machine {
    let dir = tempfile::tempdir().expect("machine dir");
    let root_disk = dir.path().join("root.img");
    std::fs::copy(&fx.root_template, &root_disk).expect("root disk");
    let config_disk = dir.path().join("config.img");
    write_config_disk(&config_disk, config).expect("config disk");
    cleanup.machines.push(config.machine_id.clone());
    Machine {
        spec: LaunchSpec {
            machine_id: config.machine_id.clone(),
            workdir: dir.path().to_path_buf(),
            netns: None,
            tap: None,
            vcpus: 1,
            memory_mib: 128,
            kit: fx.kit.clone(),
            root_disk,
            config_disk,
        },
        _dir: dir,
    }
}

/// A network namespace with a tap device whose host end has `host_ip`/30.
fn test_net(cleanup: &mut Cleanup, host_ip: Ipv4Addr) -> (String, String) {
    let name = unique("ns");
    cleanup.netns.push(name.clone());
    let tap = "tap0".to_string();
    run(Command::new("ip").args(["netns", "add", &name]));
    let ip = |args: &[&str]| {
        run(Command::new("ip").args(["-n", name.as_str()]).args(args));
    };
    ip(&["link", "set", "lo", "up"]);
    ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
    ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &tap]);
    ip(&["link", "set", &tap, "up"]);
    (name, tap)
}

/// `GET /index.html` from inside network namespace `ns` (on a thread of its own, since
/// `setns` changes the calling thread); the response body.
fn http_get_in_netns(ns: &str, addr: SocketAddr) -> String {
    let ns_path = Path::new("/run/netns").join(ns);
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let f = std::fs::File::open(&ns_path).expect("open netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            .expect("send");
        let mut response = String::new();
        s.read_to_string(&mut response).expect("read");
        response
    })
    .join()
    .expect("netns thread")
}

/// The `key=value` words of a page or file.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// A file from an ext4 image (read with debugfs, without mounting).
fn read_from_image(image: &Path, path: &str) -> String {
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image))
}

fn assert_no_vmm(id: &str, pid: i32) {
    assert!(
        !find_processes(PREFIX).iter().any(|(i, _)| i == id),
        "a VMM for {id} is still running"
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(!stat.contains(") Z "), "VMM pid {pid} left as a zombie");
}

/// Serves a page made when the workload started: its env, the guest's hostname and clock.
const PAGE_SCRIPT: &str = "echo \"mark=$CLAIM_MARK host=$(hostname) now=$(date +%s)\" > /www/index.html; exec httpd -f -p 8080 -h /www";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_prepared_guest_is_claimed_once() {
    let Some(fx) = fixture() else { return };
    let mut cleanup = Cleanup::default();
    let host_ip = Ipv4Addr::new(10, 251, 9, 1);
    let guest_ip = Ipv4Addr::new(10, 251, 9, 2);
    let (ns, tap) = test_net(&mut cleanup, host_ip);
    let id = unique("claim");
    let prepared = prepared_config(
        &id,
        Some(GuestNetwork {
            address: guest_ip,
            prefix_len: 30,
            gateway: host_ip,
        }),
    );
    let mut m = machine(fx, &mut cleanup, &prepared);
    m.spec.netns = Some(ns.clone());
    m.spec.tap = Some(TapSpec {
        name: tap,
        mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x57],
    });
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

    let page = http_get_in_netns(&ns, SocketAddr::from((guest_ip, PORT)));
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
    let page = http_get_in_netns(&ns, SocketAddr::from((guest_ip, PORT)));
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
