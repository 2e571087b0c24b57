//! The embedded DNS server, asked by a real DNS client (`dig`, from Debian's dnsutils):
//! a started machine resolves by name and by id, its ports as SRV records, over UDP and
//! TCP; unknown names are NXDOMAIN, other domains REFUSED; after destroy the names are
//! gone. (They come from the routes the `publish` step writes, the last step of a start,
//! so they cannot be there before the guest is ready.)

mod support;

use std::process::Command;

use hearth::api::pb;
use support::Daemon;

use support::dig;

fn have_dig() -> bool {
    let ok = Command::new("dig")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        support::skipped("dns", "no dig (dnsutils; run deploy/install-deps.sh)");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_machine_resolves_and_a_destroyed_one_does_not() {
    if support::guest_prereqs::guest_prereqs("dns").is_none() || !have_dig() {
        return;
    }
    let daemon = Daemon::start_with("");
    let mut client = daemon.client().await;
    let server = support::node(&mut client).await.dns_address;
    assert!(server.starts_with("127.0.0.1:"), "{server:?}");

    let mut request = support::demo_request("dns-1", "resolved", &[]);
    if let Some(spec) = request.spec.as_mut() {
        spec.ports = vec![80];
    }
    let created = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    let started = support::wait_for(&mut client, &created.id, pb::MachineState::Started).await;
    let ip = started.guest_ip.clone();

    // The guests' resolver (port 53 of its own address) answers the same, here from the
    // host itself.
    let guests = support::node(&mut client).await.guest_dns_address;
    assert!(guests.ends_with(":53"), "guest resolver {guests:?}");
    for (server, tcp) in [(&server, false), (&server, true), (&guests, false)] {
        let (status, answers) = dig(server, "resolved.hearth.internal", "A", tcp);
        assert_eq!(status, "NOERROR", "{server} tcp={tcp}");
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert!(answers[0].ends_with(&format!("IN A {ip}")), "{answers:?}");
    }
    let (status, answers) = dig(
        &server,
        &format!("{}.vm.hearth.internal", started.id),
        "A",
        false,
    );
    assert_eq!(status, "NOERROR");
    assert!(
        answers.iter().any(|a| a.ends_with(&format!("IN A {ip}"))),
        "{answers:?}"
    );
    let (status, answers) = dig(&server, "_80._tcp.resolved.hearth.internal", "SRV", false);
    assert_eq!(status, "NOERROR");
    assert!(
        answers
            .iter()
            .any(|a| a.ends_with("IN SRV 0 0 80 resolved.hearth.internal.")),
        "{answers:?}"
    );
    let (status, _) = dig(&server, "nobody.hearth.internal", "A", false);
    assert_eq!(status, "NXDOMAIN");
    let (status, _) = dig(&server, "example.com", "A", false);
    assert_eq!(status, "REFUSED");
    println!("resolved.hearth.internal -> {ip}, by id and SRV too");

    support::destroy(&mut client, &started.id).await;
    let (status, _) = dig(&server, "resolved.hearth.internal", "A", false);
    assert_eq!(status, "NXDOMAIN", "after destroy");
    let (status, _) = dig(
        &server,
        &format!("{}.vm.hearth.internal", started.id),
        "A",
        false,
    );
    assert_eq!(status, "NXDOMAIN", "after destroy, by id");
    daemon.assert_no_host_leftovers();
}

/// The guest resolver's address taken before the daemon starts (something else already
/// answers on its port 53): the daemon serves on without it, and leaves no hole for port
/// 53 in its packet policy (nor the address on `lo`), so guests cannot reach whatever
/// holds that port; GetNode shows no guest resolver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_resolver_that_cannot_be_bound_opens_no_port() {
    use std::os::fd::AsRawFd;
    let mut daemon = Daemon::prepare("");
    let config = hearth::config::Config::load(&daemon.dir.path().join("hearthd.toml"))
        .expect("the test daemon's config");
    let resolver = hearth::net::PoolCidr::parse(&config.network.pool)
        .expect("pool")
        .resolver_address()
        .expect("a resolver address");
    // Bound before the address exists anywhere (IP_FREEBIND), as a squatter would.
    let squatter = std::net::UdpSocket::from(
        nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket"),
    );
    nix::sys::socket::setsockopt(&squatter, nix::sys::socket::sockopt::IpFreebind, &true)
        .expect("freebind");
    nix::sys::socket::bind(
        squatter.as_raw_fd(),
        &nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(resolver, 53)),
    )
    .expect("bind the resolver's port first");
    daemon.spawn();
    let mut client = daemon.client().await;
    let node = support::node(&mut client).await;
    assert_eq!(node.guest_dns_address, "", "{node:?}");
    let table = daemon.nft_table();
    assert!(
        table.contains("chain"),
        "the daemon's table is there: {table}"
    );
    assert!(
        !table.contains(&resolver.to_string()),
        "a rule still names the resolver {resolver}: {table}"
    );
    let addresses = Command::new("ip")
        .args(["-4", "addr", "show", "dev", "lo"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&addresses.stdout).contains(&format!("{resolver}/")),
        "the resolver's address is still on lo"
    );
    drop(squatter);
}
