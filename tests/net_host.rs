//! The host network of a machine, on real kernel objects (root required): namespace,
//! veth pair, tap, addresses, routes; idempotent ensure and remove; traffic from the host
//! into the namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use hearth::net::{NetFabric, NetPlan, PoolCidr, netns_path};

/// A test-unique prefix and pool, and a guard that removes the plan even on failure.
struct Fixture {
    fabric: NetFabric,
    plan: NetPlan,
    prefix: String,
}

impl Fixture {
    fn new(tag: u8) -> Fixture {
        let mut raw = [0u8; 2];
        getrandom::fill(&mut raw).expect("random");
        let prefix = format!("tn{:x}", raw[0] & 0x0f);
        let pool = PoolCidr::parse(&format!("10.215.{}.0/24", (raw[1] / 2) * 2 + (tag & 1)))
            .expect("pool");
        let id = format!("{:02x}{:02x}00beef", raw[0], raw[1]);
        let plan = NetPlan::derive(&prefix, &id, &pool, 3).expect("plan");
        Fixture {
            fabric: NetFabric::start().expect("fabric"),
            plan,
            prefix,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.plan.host_veth])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.plan.netns])
            .status();
    }
}

fn in_ns(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_is_idempotent_and_carries_traffic_and_remove_leaves_nothing() {
    let fx = Fixture::new(0);
    let plan = &fx.plan;
    fx.fabric.ensure(plan).await.expect("ensure");
    fx.fabric
        .ensure(plan)
        .await
        .expect("ensure twice is a no-op");

    assert!(netns_path(&plan.netns).exists());
    let links = in_ns(&plan.netns, &["ip", "-o", "addr"]);
    assert!(links.contains(&format!("{}/30", plan.gateway)), "{links}");
    assert!(links.contains(&format!("{}/30", plan.ns_addr)), "{links}");
    let routes = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["route", "show", "dev", &plan.host_veth])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned();
    assert!(
        routes.contains(&format!("{}/30 via {}", plan.guest_network(), plan.ns_addr)),
        "{routes}"
    );

    // A listener inside the namespace, reached from the host through the veth pair.
    let ns = plan.netns.clone();
    let addr = SocketAddr::from((plan.ns_addr, 18080));
    let server = std::thread::spawn(move || {
        let file = std::fs::File::open(netns_path(&ns)).expect("open ns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = TcpListener::bind(addr).expect("bind in ns");
        let (mut conn, _) = listener.accept().expect("accept");
        conn.write_all(b"pong").expect("write");
    });
    let mut reply = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(mut stream) => {
                stream.read_to_string(&mut reply).expect("read");
                break;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect to {addr}: {e}"),
        }
    }
    server.join().expect("server");
    assert_eq!(reply, "pong");

    let found = fx.fabric.scan(&fx.prefix).await.expect("scan");
    assert!(
        found.contains(&format!("netns:{}", plan.netns)),
        "{found:?}"
    );
    assert!(
        found.contains(&format!("link:{}", plan.host_veth)),
        "{found:?}"
    );

    fx.fabric.remove(plan).await.expect("remove");
    fx.fabric.remove(plan).await.expect("remove twice");
    let found = fx.fabric.scan(&fx.prefix).await.expect("scan");
    assert!(
        !found
            .iter()
            .any(|f| f.contains(&plan.host_veth) || f.contains(&plan.netns)),
        "{found:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_cleans_a_half_done_ensure() {
    let fx = Fixture::new(1);
    let plan = &fx.plan;
    // Only the namespace exists, as after a crash in the middle of ensure.
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &plan.netns])
        .status()
        .expect("ip");
    assert!(status.success());
    fx.fabric.remove(plan).await.expect("remove");
    assert!(!netns_path(&plan.netns).exists());
    // And ensure completes a half-done state.
    std::process::Command::new("ip")
        .args(["netns", "add", &plan.netns])
        .status()
        .expect("ip");
    fx.fabric.ensure(plan).await.expect("ensure completes");
    let links = in_ns(&plan.netns, &["ip", "-o", "link"]);
    assert!(links.contains("tap0") && links.contains("eth0"), "{links}");
    fx.fabric.remove(plan).await.expect("remove");
}
