//! The host network of a machine on real kernel objects (root required): namespace, veth
//! pair, tap, addresses, forwarding, routes; idempotent ensure and remove from any
//! partial state; traffic from the host into the namespace; scans that see exactly what
//! is left. `ip` is used here only to look and to set up odd states independently.
//!
//! Every test takes its own name prefix and /24 pool; a guard deletes everything with
//! the prefix even when the test fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use hearth::net::policy::{self, Egress, HostPort, MachinePolicy, PolicyConfig};
use hearth::net::{NetFabric, NetObservation, NetPlan, NetResource, PoolCidr, netns_path};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn random_u32() -> u32 {
    let mut raw = [0u8; 4];
    getrandom::fill(&mut raw).expect("random");
    u32::from_le_bytes(raw)
}

/// A test-unique prefix and pool, and a guard that removes everything carrying the prefix.
struct Fixture {
    fabric: NetFabric,
    prefix: String,
    pool: PoolCidr,
}

impl Fixture {
    fn new() -> Fixture {
        // One random base per test process, plus a counter: fixtures of one process never
        // share a prefix or a pool, and parallel processes almost never do.
        static BASE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let base = *BASE.get_or_init(random_u32);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("tn{:03x}", base.wrapping_add(n) & 0xfff);
        let pool = PoolCidr::parse(&format!(
            "10.214.{}.0/24",
            (base >> 16).wrapping_add(n) & 0xff
        ))
        .expect("pool");
        Fixture {
            fabric: NetFabric::start().expect("fabric"),
            prefix,
            pool,
        }
    }

    fn plan(&self, slot: u32) -> NetPlan {
        let id = format!(
            "{:010x}",
            u64::from(random_u32()) << 8 | u64::from(slot & 0xff)
        );
        NetPlan::derive(&self.prefix, &id, self.pool, slot).expect("plan")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for name in netns_names(&self.prefix) {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
        for name in root_links(&self.prefix) {
            let _ = Command::new("ip").args(["link", "del", &name]).status();
        }
        let _ = Command::new("ip")
            .args([
                "-4",
                "addr",
                "flush",
                "label",
                &hearth::net::resolver::label(&self.prefix),
            ])
            .status();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &policy::table_name(&self.prefix)])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("run");
    assert!(status.success(), "{args:?}");
}

fn netns_names(prefix: &str) -> Vec<String> {
    run(&["ip", "netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect()
}

fn root_links(prefix: &str) -> Vec<String> {
    run(&["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// `ip -o link` inside the namespace: name -> (index, line).
fn ns_link_line(ns: &str, name: &str) -> Option<String> {
    run(&["ip", "-n", ns, "-o", "link", "show"])
        .lines()
        .find(|l| {
            l.split(": ")
                .nth(1)
                .is_some_and(|n| n.split('@').next() == Some(name))
        })
        .map(str::to_string)
}

fn link_index(line: &str) -> String {
    line.split(':').next().unwrap_or_default().to_string()
}

fn expect_complete(fabric: &NetFabric, plan: &NetPlan) -> impl std::future::Future<Output = ()> {
    let fabric = fabric.clone();
    let plan = plan.clone();
    async move {
        let seen = fabric.observe(&plan).await.expect("observe");
        assert!(seen.is_complete(), "{seen:?}");
    }
}

fn assert_gone(prefix: &str, plan: &NetPlan) {
    assert!(
        !netns_path(&plan.netns).exists(),
        "{} still mounted",
        plan.netns
    );
    assert!(
        !root_links(prefix).contains(&plan.host_veth),
        "{} still in the root namespace",
        plan.host_veth
    );
    let routes = run(&["ip", "route", "show"]);
    assert!(
        !routes.contains(&format!("{}/30", plan.guest_network())),
        "{routes}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_creates_everything_and_twice_is_a_no_op() {
    let fx = Fixture::new();
    let plan = fx.plan(3);
    let root_forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read");
    fx.fabric.ensure(&plan).await.expect("ensure");
    expect_complete(&fx.fabric, &plan).await;

    // Independently, through iproute2.
    let ns = &plan.netns;
    assert!(netns_names(&fx.prefix).contains(ns));
    let addrs = run(&["ip", "-n", ns, "-o", "-4", "addr", "show"]);
    assert!(
        addrs.contains(&format!("eth0    inet {}/30", plan.ns_addr)),
        "{addrs}"
    );
    assert!(
        addrs.contains(&format!("tap0    inet {}/30", plan.gateway)),
        "{addrs}"
    );
    let host_addr = run(&["ip", "-o", "-4", "addr", "show", "dev", &plan.host_veth]);
    assert!(
        host_addr.contains(&format!("inet {}/30", plan.host_addr)),
        "{host_addr}"
    );
    let tap = run(&["ip", "-n", ns, "-d", "link", "show", "tap0"]);
    assert!(
        tap.contains("tun type tap") && tap.contains("persist"),
        "{tap}"
    );
    assert!(tap.contains(",UP"), "{tap}");
    let veth = run(&["ip", "-n", ns, "-d", "link", "show", "eth0"]);
    assert!(veth.contains("veth") && veth.contains("state UP"), "{veth}");
    assert!(run(&["ip", "-n", ns, "link", "show", "lo"]).contains("LOOPBACK,UP"));
    let ns_routes = run(&["ip", "-n", ns, "route", "show"]);
    assert!(
        ns_routes.contains(&format!("default via {} dev eth0", plan.host_addr)),
        "{ns_routes}"
    );
    let root_routes = run(&["ip", "route", "show", "dev", &plan.host_veth]);
    assert!(
        root_routes.contains(&format!("{}/30 via {}", plan.guest_network(), plan.ns_addr)),
        "{root_routes}"
    );
    let to_guest = run(&["ip", "route", "get", &plan.guest_addr.to_string()]);
    assert!(
        to_guest.contains(&format!("via {} dev {}", plan.ns_addr, plan.host_veth)),
        "{to_guest}"
    );
    let forwarding = run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "cat",
        "/proc/sys/net/ipv4/ip_forward",
    ]);
    assert_eq!(forwarding.trim(), "1");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read"),
        root_forwarding,
        "the root namespace's forwarding must not change"
    );

    // Twice: nothing is recreated (same link indexes), nothing is duplicated.
    let before_eth0 = ns_link_line(ns, "eth0").expect("eth0");
    let before_tap = ns_link_line(ns, "tap0").expect("tap0");
    let before_host = run(&["ip", "-o", "link", "show", &plan.host_veth]);
    fx.fabric.ensure(&plan).await.expect("ensure twice");
    assert_eq!(
        link_index(&ns_link_line(ns, "eth0").expect("eth0")),
        link_index(&before_eth0)
    );
    assert_eq!(
        link_index(&ns_link_line(ns, "tap0").expect("tap0")),
        link_index(&before_tap)
    );
    assert_eq!(
        link_index(&run(&["ip", "-o", "link", "show", &plan.host_veth])),
        link_index(&before_host)
    );
    assert_eq!(run(&["ip", "-n", ns, "-o", "-4", "addr", "show"]), addrs);
    assert_eq!(run(&["ip", "-n", ns, "route", "show"]), ns_routes);
    expect_complete(&fx.fabric, &plan).await;

    fx.fabric.remove(&plan).await.expect("remove");
    assert_gone(&fx.prefix, &plan);
    assert!(fx.fabric.observe(&plan).await.expect("observe").is_absent());
}

/// A listener inside the namespace on `addr`, answering one connection with "pong".
fn serve_once(netns: &str, addr: SocketAddr) -> std::thread::JoinHandle<()> {
    let file = std::fs::File::open(netns_path(netns)).expect("open ns");
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = TcpListener::bind(addr).expect("bind in ns");
        bound_tx.send(()).expect("signal");
        let (mut conn, _) = listener.accept().expect("accept");
        conn.write_all(b"pong").expect("write");
    });
    bound_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("listener bound");
    handle
}

fn fetch(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_reaches_the_namespace_and_the_guest_network() {
    let fx = Fixture::new();
    let plan = fx.plan(5);
    fx.fabric.ensure(&plan).await.expect("ensure");

    // Over the veth link network.
    let addr = SocketAddr::from((plan.ns_addr, 18080));
    let server = serve_once(&plan.netns, addr);
    assert_eq!(fetch(addr), "pong");
    server.join().expect("server");

    // Through the root namespace's route to the guest network: the gateway address on
    // the tap is in that network, and is reached via the namespace end.
    let addr = SocketAddr::from((plan.gateway, 18081));
    let server = serve_once(&plan.netns, addr);
    assert_eq!(fetch(addr), "pong");
    server.join().expect("server");

    fx.fabric.remove(&plan).await.expect("remove");
    assert_gone(&fx.prefix, &plan);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_cleans_every_half_done_state_and_twice_is_ok() {
    let fx = Fixture::new();

    // Only the namespace, as after a crash right after its creation.
    let plan = fx.plan(1);
    ok(&["ip", "netns", "add", &plan.netns]);
    let seen = fx.fabric.observe(&plan).await.expect("observe");
    assert_eq!(
        seen,
        NetObservation {
            netns: true,
            ..NetObservation::default()
        }
    );
    fx.fabric.remove(&plan).await.expect("remove");
    assert_gone(&fx.prefix, &plan);
    fx.fabric.remove(&plan).await.expect("remove twice");

    // Namespace and veth pair, nothing else: the host end must be gone on return.
    let plan = fx.plan(2);
    ok(&["ip", "netns", "add", &plan.netns]);
    ok(&[
        "ip",
        "link",
        "add",
        &plan.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &plan.netns,
    ]);
    let seen = fx.fabric.observe(&plan).await.expect("observe");
    assert!(
        seen.netns && seen.host_veth && seen.ns_veth && !seen.tap && !seen.is_complete(),
        "{seen:?}"
    );
    fx.fabric.remove(&plan).await.expect("remove");
    assert_gone(&fx.prefix, &plan);

    // A mount point file without a namespace (crash between creating and mounting).
    let plan = fx.plan(3);
    std::fs::write(netns_path(&plan.netns), b"").expect("leftover file");
    assert!(fx.fabric.observe(&plan).await.expect("observe").is_absent());
    fx.fabric.remove(&plan).await.expect("remove");
    assert_gone(&fx.prefix, &plan);

    // Nothing at all.
    let plan = fx.plan(4);
    fx.fabric.remove(&plan).await.expect("remove of nothing");
    assert!(fx.fabric.scan(&fx.prefix).await.expect("scan").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_completes_half_done_states() {
    let fx = Fixture::new();

    // Only the namespace.
    let plan = fx.plan(1);
    ok(&["ip", "netns", "add", &plan.netns]);
    fx.fabric.ensure(&plan).await.expect("ensure");
    expect_complete(&fx.fabric, &plan).await;

    // Veth pair present but down and unaddressed, tap missing.
    let plan = fx.plan(2);
    ok(&["ip", "netns", "add", &plan.netns]);
    ok(&[
        "ip",
        "link",
        "add",
        &plan.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &plan.netns,
    ]);
    let host_before = link_index(&run(&["ip", "-o", "link", "show", &plan.host_veth]));
    fx.fabric.ensure(&plan).await.expect("ensure");
    expect_complete(&fx.fabric, &plan).await;
    assert_eq!(
        link_index(&run(&["ip", "-o", "link", "show", &plan.host_veth])),
        host_before,
        "a right veth pair is kept"
    );

    // A leftover mount point file.
    let plan = fx.plan(3);
    std::fs::write(netns_path(&plan.netns), b"").expect("leftover file");
    fx.fabric
        .ensure(&plan)
        .await
        .expect("ensure over a leftover file");
    expect_complete(&fx.fabric, &plan).await;

    // A host veth whose peer lives in some other namespace that stays alive: replaced.
    let plan = fx.plan(4);
    let other = format!("{}-x", fx.prefix);
    ok(&["ip", "netns", "add", &other]);
    ok(&[
        "ip",
        "link",
        "add",
        &plan.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &other,
    ]);
    fx.fabric
        .ensure(&plan)
        .await
        .expect("ensure replaces a stray host veth");
    expect_complete(&fx.fabric, &plan).await;
    assert!(
        ns_link_line(&other, "eth0").is_none(),
        "the stray pair is gone"
    );
    // The guard removes all of it by prefix.
}

/// Attaches to the tap from inside the namespace, as the VMM does, and keeps it open.
fn attach_tap(netns: &str) -> std::fs::File {
    let ns = std::fs::File::open(netns_path(netns)).expect("open ns");
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open tun");
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..4].copy_from_slice(b"tap0");
        // SAFETY: a valid ifreq for TUNSETIFF on an open tun descriptor.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&tun),
                libc::TUNSETIFF as _,
                &mut req as *mut IfReq,
            )
        };
        assert_eq!(rc, 0, "attach: {}", std::io::Error::last_os_error());
        tun
    })
    .join()
    .expect("attach thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_leaves_a_tap_in_use_alone() {
    let fx = Fixture::new();
    let plan = fx.plan(11);
    fx.fabric.ensure(&plan).await.expect("ensure");
    let vmm = attach_tap(&plan.netns);
    let before = link_index(&ns_link_line(&plan.netns, "tap0").expect("tap0"));
    fx.fabric
        .ensure(&plan)
        .await
        .expect("ensure with the tap in use");
    expect_complete(&fx.fabric, &plan).await;
    assert_eq!(
        link_index(&ns_link_line(&plan.netns, "tap0").expect("tap0")),
        before
    );
    // The VMM still holds the tap (and so the namespace) when the network is removed.
    fx.fabric.remove(&plan).await.expect("remove");
    assert_gone(&fx.prefix, &plan);
    drop(vmm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_ensure_finishes_before_the_next_call() {
    let fx = Fixture::new();
    let plan = fx.plan(12);
    // The first poll hands the job to the worker; then the caller drops the call (an
    // ensure takes milliseconds, so it is still running on the worker).
    let abandoned = fx.fabric.ensure(&plan).now_or_never();
    assert!(
        abandoned.is_none(),
        "the ensure was expected to be running after its first poll"
    );
    // Calls for one namespace run in order: this observe runs after the abandoned ensure
    // and sees it finished, not half done.
    expect_complete(&fx.fabric, &plan).await;
    fx.fabric.remove(&plan).await.expect("remove");
    assert_gone(&fx.prefix, &plan);
    assert!(fx.fabric.scan(&fx.prefix).await.expect("scan").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_then_ensure_at_once_works() {
    let fx = Fixture::new();
    let plan = fx.plan(7);
    for _ in 0..5 {
        fx.fabric.ensure(&plan).await.expect("ensure");
        fx.fabric.remove(&plan).await.expect("remove");
        assert_gone(&fx.prefix, &plan);
    }
    fx.fabric.ensure(&plan).await.expect("ensure");
    expect_complete(&fx.fabric, &plan).await;
    fx.fabric.remove(&plan).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_finishes_a_namespace_something_still_holds() {
    let fx = Fixture::new();
    let plan = fx.plan(9);
    fx.fabric.ensure(&plan).await.expect("ensure");
    // An open handle keeps the namespace (and so the veth pair) alive after unmounting,
    // like a process left inside it would.
    let holder = std::fs::File::open(netns_path(&plan.netns)).expect("hold");
    let started = Instant::now();
    fx.fabric.remove(&plan).await.expect("remove");
    let took = started.elapsed();
    assert_gone(&fx.prefix, &plan);
    assert!(took < Duration::from_secs(2), "{took:?}");
    drop(holder);
    assert!(fx.fabric.scan(&fx.prefix).await.expect("scan").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_sees_exactly_what_is_left() {
    let fx = Fixture::new();
    let a = fx.plan(1);
    let b = fx.plan(2);
    fx.fabric.ensure(&a).await.expect("ensure a");
    fx.fabric.ensure(&b).await.expect("ensure b");

    let mut expected = vec![
        NetResource::Netns {
            name: a.netns.clone(),
            machine_id: Some(a.netns[fx.prefix.len() + 1..].to_string()),
        },
        NetResource::Netns {
            name: b.netns.clone(),
            machine_id: Some(b.netns[fx.prefix.len() + 1..].to_string()),
        },
        NetResource::Link {
            name: a.host_veth.clone(),
            machine_id: a.host_veth[fx.prefix.len()..].to_string(),
        },
        NetResource::Link {
            name: b.host_veth.clone(),
            machine_id: b.host_veth[fx.prefix.len()..].to_string(),
        },
    ];
    expected.sort();
    assert_eq!(fx.fabric.scan(&fx.prefix).await.expect("scan"), expected);
    let shown: Vec<String> = expected.iter().map(ToString::to_string).collect();
    assert!(
        shown.contains(&format!("netns:{}", a.netns))
            && shown.contains(&format!("link:{}", a.host_veth))
    );

    fx.fabric.remove(&a).await.expect("remove a");
    let left = fx.fabric.scan(&fx.prefix).await.expect("scan");
    assert!(
        left.iter()
            .all(|r| r.machine_id() == Some(&b.host_veth[fx.prefix.len()..])),
        "{left:?}"
    );
    assert_eq!(left.len(), 2, "{left:?}");

    // A namespace deleted behind the fabric's back: its host veth is on its way out and
    // must not be reported as a leak.
    ok(&["ip", "netns", "del", &b.netns]);
    assert!(fx.fabric.scan(&fx.prefix).await.expect("scan").is_empty());
    assert_gone(&fx.prefix, &b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_at_once() {
    let fx = Fixture::new();
    let plans: Vec<NetPlan> = (0..12).map(|slot| fx.plan(slot)).collect();
    // Every task is awaited before anything is asserted, so a failure cannot leave a
    // task creating objects after the guard has cleaned up.
    let mut tasks = Vec::new();
    for plan in plans.clone() {
        let fabric = fx.fabric.clone();
        tasks.push(tokio::spawn(async move {
            fabric.ensure(&plan).await?;
            fabric.ensure(&plan).await
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task"));
    }
    for result in results {
        result.expect("ensure");
    }
    for plan in &plans {
        expect_complete(&fx.fabric, plan).await;
    }
    assert_eq!(
        fx.fabric.scan(&fx.prefix).await.expect("scan").len(),
        2 * plans.len()
    );
    let mut tasks = Vec::new();
    for plan in plans.clone() {
        let fabric = fx.fabric.clone();
        tasks.push(tokio::spawn(async move { fabric.remove(&plan).await }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task"));
    }
    for result in results {
        result.expect("remove");
    }
    assert!(fx.fabric.scan(&fx.prefix).await.expect("scan").is_empty());
    for plan in &plans {
        assert_gone(&fx.prefix, plan);
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let rank = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[rank]
}

/// Latency figures: `cargo test --test net_host -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints ensure/remove latency over 50 runs"]
async fn bench_ensure_and_remove() {
    let fx = Fixture::new();
    let mut ensure = Vec::new();
    let mut ensure_again = Vec::new();
    let mut remove = Vec::new();
    let mut remove_settled = Vec::new();
    for slot in 0..50 {
        let plan = fx.plan(slot % 32);
        let t = Instant::now();
        fx.fabric.ensure(&plan).await.expect("ensure");
        ensure.push(t.elapsed());
        let t = Instant::now();
        fx.fabric.ensure(&plan).await.expect("ensure again");
        ensure_again.push(t.elapsed());
        let t = Instant::now();
        fx.fabric.remove(&plan).await.expect("remove");
        remove.push(t.elapsed());
        if slot < 10 {
            fx.fabric.ensure(&plan).await.expect("ensure");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t = Instant::now();
            fx.fabric.remove(&plan).await.expect("remove");
            remove_settled.push(t.elapsed());
        }
    }
    for (name, samples) in [
        ("ensure (new)", &mut ensure),
        ("ensure (no-op)", &mut ensure_again),
        ("remove (at once)", &mut remove),
        ("remove (settled)", &mut remove_settled),
    ] {
        println!(
            "{name:>15}: p50 {:>6.2} ms  p90 {:>6.2} ms  max {:>6.2} ms  (n={})",
            percentile(samples, 0.5).as_secs_f64() * 1e3,
            percentile(samples, 0.9).as_secs_f64() * 1e3,
            percentile(samples, 1.0).as_secs_f64() * 1e3,
            samples.len()
        );
    }
    assert!(fx.fabric.scan(&fx.prefix).await.expect("scan").is_empty());
}

fn policy_config(fx: &Fixture) -> PolicyConfig {
    PolicyConfig {
        prefix: fx.prefix.clone(),
        pool: fx.pool,
        egress: Egress::None,
        machine_to_machine: false,
        host_allow: vec![HostPort::parse("udp/53").expect("allow")],
        guest_dns: Some(resolver_addr(fx)),
        egress_allow: Vec::new(),
    }
}

/// The guest resolver's address of the fixture's pool: the first of its last block.
fn resolver_addr(fx: &Fixture) -> std::net::Ipv4Addr {
    fx.pool
        .resolver_address()
        .expect("a pool of more than one block")
}

/// The addresses on `lo` under `label` (`ip -o addr` lines' fourth field).
fn labelled_addresses(label: &str) -> Vec<String> {
    run(&[
        "ip", "-o", "-4", "addr", "show", "dev", "lo", "label", label,
    ])
    .lines()
    .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
    .collect()
}

/// The guest resolver: its address on `lo` under the daemon's label, guests let through
/// to exactly its port 53; put right when wrong, and removed when guests stop resolving.
#[tokio::test]
async fn the_guest_resolver_address_is_made_repaired_and_removed() {
    let fx = Fixture::new();
    let cfg = policy_config(&fx);
    let label = hearth::net::resolver::label(&fx.prefix);
    let addr = resolver_addr(&fx);
    for _ in 0..2 {
        fx.fabric
            .install_policy(cfg.clone())
            .await
            .expect("install");
    }
    assert_eq!(labelled_addresses(&label), vec![format!("{addr}/32")]);
    let table = nft_table(&fx.prefix);
    for proto in ["udp", "tcp"] {
        let rule = format!("ip daddr {addr} {proto} dport 53 accept");
        assert_eq!(table.matches(&rule).count(), 1, "{rule:?} in:\n{table}");
    }
    // From anywhere but a guest or the host itself, the resolver is not there.
    let outside = format!("iif != \"lo\" ip daddr {addr} drop");
    assert_eq!(
        table.matches(&outside).count(),
        1,
        "{outside:?} in:\n{table}"
    );

    // A stray address under the label (the pool changed) is put right by the next start.
    ok(&[
        "ip",
        "addr",
        "add",
        "192.0.2.7/32",
        "dev",
        "lo",
        "label",
        &label,
    ]);
    fx.fabric
        .install_policy(cfg.clone())
        .await
        .expect("install again");
    assert_eq!(labelled_addresses(&label), vec![format!("{addr}/32")]);

    // Guests that no longer resolve: the address goes, and so do the rules; twice is fine.
    let off = PolicyConfig {
        guest_dns: None,
        ..cfg
    };
    for _ in 0..2 {
        fx.fabric.install_policy(off.clone()).await.expect("off");
    }
    assert!(labelled_addresses(&label).is_empty());
    assert!(!nft_table(&fx.prefix).contains(&format!("ip daddr {addr}")));
}

fn nft_table(prefix: &str) -> String {
    run(&["nft", "list", "table", "inet", &policy::table_name(prefix)])
}

/// The daemon's table and one machine's chains are written through netlink, read back by
/// `nft` itself, rewritten idempotently, and removed to the last object.
#[tokio::test]
async fn a_machine_policy_is_written_and_removed_idempotently() {
    let fx = Fixture::new();
    let cfg = policy_config(&fx);
    fx.fabric
        .install_policy(cfg.clone())
        .await
        .expect("install");
    fx.fabric
        .install_policy(cfg.clone())
        .await
        .expect("install again");
    let plan = fx.plan(1);
    let id = plan.host_veth.trim_start_matches(&fx.prefix).to_string();
    let machine = MachinePolicy {
        id: id.clone(),
        host_veth: plan.host_veth.clone(),
        guest_ip: plan.guest_addr,
        ports: vec![8080, 9090],
    };
    assert!(!NetFabric::policy_present(&fx.prefix, &id).expect("query"));
    for _ in 0..2 {
        fx.fabric
            .ensure_policy(machine.clone())
            .await
            .expect("ensure");
    }
    let table = nft_table(&fx.prefix);
    for needle in [
        format!("chain m{id}_in"),
        format!("chain m{id}_fwd"),
        format!("chain m{id}_to"),
        format!("\"{}\" : jump m{id}_in", plan.host_veth),
        "tcp dport 8080 accept".to_string(),
        "udp dport 53 accept".to_string(),
        format!("ip saddr != {} drop", plan.guest_addr),
        "iifname vmap @from_guest_in".to_string(),
    ] {
        assert!(table.contains(&needle), "{needle:?} missing from:\n{table}");
    }
    // Rewritten, not appended: one rule per port.
    assert_eq!(table.matches("tcp dport 8080 accept").count(), 1, "{table}");
    assert!(NetFabric::policy_present(&fx.prefix, &id).expect("query"));
    assert_eq!(
        fx.fabric.scan_policies(&fx.prefix).await.expect("scan"),
        vec![id.clone()]
    );

    for _ in 0..2 {
        fx.fabric
            .remove_policy(&fx.prefix, &id)
            .await
            .expect("remove");
    }
    let table = nft_table(&fx.prefix);
    assert!(!table.contains(&id), "{table}");
    assert!(!NetFabric::policy_present(&fx.prefix, &id).expect("query"));
    assert!(
        fx.fabric
            .scan_policies(&fx.prefix)
            .await
            .expect("scan")
            .is_empty()
    );
}

/// The namespace's anti-spoofing guard is made with the network and pins the guest's MAC
/// and address on the tap.
#[tokio::test]
async fn the_network_carries_an_anti_spoofing_guard() {
    let fx = Fixture::new();
    let plan = fx.plan(2);
    fx.fabric.ensure(&plan).await.expect("ensure");
    fx.fabric.ensure(&plan).await.expect("ensure again");
    let guard = run(&[
        "ip",
        "netns",
        "exec",
        &plan.netns,
        "nft",
        "list",
        "table",
        "inet",
        policy::GUARD_TABLE,
    ]);
    for needle in [
        format!("ether saddr != {} counter", plan.guest_mac_string()),
        format!("ip saddr != {} counter", plan.guest_addr),
        "iifname \"tap0\"".to_string(),
    ] {
        assert!(guard.contains(&needle), "{needle:?} missing from:\n{guard}");
    }
    assert_eq!(guard.matches("ether saddr").count(), 1, "{guard}");
    fx.fabric.remove(&plan).await.expect("remove");
}
