//! What a guest can reach, probed from inside real guests with busybox: the host's
//! listeners (through the gateway, the host end of its link and every host address),
//! another guest's declared port with the host forwarding, a spoofed-source UDP packet;
//! and from the host, a guest's declared and undeclared ports. Then egress: a listener in
//! a test-made "outside" namespace is reached with `egress = "nat"` and not with `none`.
//!
//! The tests of this file change the host's IPv4 forwarding, so they run one at a time
//! (a lock) and put the setting back.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth::api::pb;
use support::{Daemon, destroy, wait_for};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Puts the host's IPv4 forwarding back as it was.
struct ForwardingRestored(String);

impl ForwardingRestored {
    fn switch_on() -> ForwardingRestored {
        let before = std::fs::read_to_string(IP_FORWARD).expect("read ip_forward");
        std::fs::write(IP_FORWARD, "1\n").expect("switch forwarding on");
        ForwardingRestored(before)
    }
}

impl Drop for ForwardingRestored {
    fn drop(&mut self) {
        let _ = std::fs::write(IP_FORWARD, &self.0);
    }
}

/// A TCP listener on 0.0.0.0 that answers every connection with "pong".
fn pong_listener() -> u16 {
    let listener = TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"pong\n");
        }
    });
    port
}

/// A UDP socket on 0.0.0.0 that records the source address of every datagram.
fn udp_recorder() -> (u16, Arc<Mutex<Vec<SocketAddr>>>) {
    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind udp");
    let port = socket.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            sink.lock().expect("lock").push(from);
        }
    });
    (port, seen)
}

/// The host's own IPv4 addresses, but loopback and the daemons' links.
fn host_addresses() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let dev = fields.nth(1)?;
            let addr = fields.nth(1)?.split('/').next()?.to_string();
            (dev != "lo" && !dev.starts_with("td")).then_some(addr)
        })
        .collect()
}

/// GET `/` of `ip:port`, or the connection error.
fn try_http(ip: &str, port: u16, timeout: Duration) -> Result<String, String> {
    let addr = SocketAddr::new(ip.parse().map_err(|e| format!("{e}"))?, port);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| e.to_string())?;
    Ok(reply)
}

/// Polls the guest's page until it says `done` (the probes run after it serves).
async fn probe_report(ip: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(page) = try_http(ip, 80, Duration::from_secs(5))
            && page.contains("done")
        {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "the probes of {ip} never finished"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A machine of the demo image running `script` under busybox sh, serving /srv/probe on
/// port 80 (its only declared port). Defined first: `probe NAME IP PORT` (a TCP
/// listener that answers "pong"), `web NAME IP PORT` (an HTTP server), and the derived
/// addresses `$gw` (its gateway), `$hv` (the host end of its link), `$dev`.
async fn create_prober(
    client: &mut hearth::client::Client,
    name: &str,
    script: &str,
) -> pb::Machine {
    let full = format!(
        "mkdir -p /srv/probe; echo pending > /srv/probe/index.html; \
         gw=$(ip route | awk '/default/ {{print $3}}'); \
         dev=$(ip route | awk '/default/ {{print $5}}'); \
         hv=$(echo $gw | awk -F. '{{print $1\".\"$2\".\"$3\".\"$4-4}}'); \
         probe() {{ if echo ping | nc -w 2 $2 $3 2>/dev/null | grep -q pong; then echo \"$1 $2:$3 open\"; else echo \"$1 $2:$3 closed\"; fi; }}; \
         web() {{ if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 $2 $3 2>/dev/null | grep -q HTTP/1; then echo \"$1 $2:$3 open\"; else echo \"$1 $2:$3 closed\"; fi; }}; \
         ( {{ {script}; echo done; }} > /srv/probe/r.tmp 2>&1; mv /srv/probe/r.tmp /srv/probe/index.html ) & \
         exec httpd -f -p 80 -h /srv/probe"
    );
    let request = support::shell_request(name, name, &full);
    let created = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    wait_for(client, &created.id, pb::MachineState::Started).await
}

/// A machine serving HTTP on port 80 (declared) and on port 81 (not declared); its page
/// says whether it reaches its own port 81 (`self81-open`).
async fn create_peer(client: &mut hearth::client::Client) -> pb::Machine {
    let script = "mkdir -p /srv/peer; \
        httpd -p 81 -h /srv/www; \
        if echo x | nc -w 2 127.0.0.1 81 | grep -qi http; then echo self81-open; else echo self81-closed; fi > /srv/peer/index.html; \
        exec httpd -f -p 80 -h /srv/peer";
    let request = support::shell_request("peer", "peer", script);
    let peer = client
        .machines
        .create_machine(request)
        .await
        .expect("create peer")
        .into_inner();
    wait_for(client, &peer.id, pb::MachineState::Started).await
}

#[tokio::test]
async fn a_guest_reaches_only_what_policy_allows() {
    let _serial = SERIAL.lock().await;
    let denied = pong_listener();
    let allowed = pong_listener();
    let (udp, datagrams) = udp_recorder();
    let daemon = Daemon::start_with_network(
        &format!("host_allow = [\"tcp/{allowed}\", \"udp/{udp}\"]"),
        "",
    );
    let mut client = daemon.client().await;
    let _forwarding = ForwardingRestored::switch_on();

    let peer = create_peer(&mut client).await;

    let hosts = host_addresses();
    assert!(!hosts.is_empty(), "the host has no address but loopback");
    let spoofed = "10.99.99.99";
    let script = format!(
        "probe gateway $gw {denied}; \
         for a in $hv {hosts}; do probe host $a {denied}; done; \
         probe allowed $hv {allowed}; \
         web peer {peer_ip} 80; \
         traceroute -n -f 5 -m 5 -q 1 -w 1 -p {base} $hv >/dev/null 2>&1; \
         ip addr add {spoofed}/32 dev $dev; \
         traceroute -n -s {spoofed} -f 5 -m 5 -q 1 -w 1 -p {base} $hv >/dev/null 2>&1; \
         echo udp-sent; \
         mac=$(cat /sys/class/net/$dev/address); \
         ip link set dev $dev address 02:00:00:00:00:01; \
         probe macspoof $hv {allowed}; \
         ip link set dev $dev address $mac",
        hosts = hosts.join(" "),
        peer_ip = peer.guest_ip,
        base = udp - 1,
    );
    let prober = create_prober(&mut client, "prober", &script).await;
    let report = probe_report(&prober.guest_ip).await;
    eprintln!("prober report:\n{report}");

    // The probes themselves work: the allow-listed port is reached.
    assert!(report.contains(&format!(":{allowed} open")), "{report}");
    assert!(report.contains("udp-sent"), "{report}");
    // Nothing else on the host, through any address, nor the peer.
    let lines: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("gateway ") || l.starts_with("host ") || l.starts_with("peer "))
        .collect();
    assert_eq!(lines.len(), 3 + hosts.len(), "{report}");
    for line in lines {
        assert!(line.ends_with("closed"), "reached: {line}\n{report}");
    }
    // With another MAC, even the allowed port is closed, and the namespace's guard says
    // it dropped those frames (its MAC rule counted them).
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("macspoof ") && l.ends_with(&format!(":{allowed} closed"))),
        "{report}"
    );
    let netns = format!("{}-{}", daemon.prefix, prober.id);
    let guard = Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns,
            "nft",
            "list",
            "table",
            "inet",
            "hearth_guard",
        ])
        .output()
        .expect("nft in the namespace");
    let guard = String::from_utf8_lossy(&guard.stdout).into_owned();
    let mac_rule = guard
        .lines()
        .find(|l| l.contains("ether saddr"))
        .unwrap_or_default()
        .to_string();
    let dropped: u64 = mac_rule
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "the MAC guard dropped nothing: {guard}");
    // UDP: the genuine datagram arrived from the guest's address, the spoofed one not.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sources = loop {
        let seen = datagrams.lock().expect("lock").clone();
        if !seen.is_empty() || Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sources: Vec<String> = sources.iter().map(|a| a.ip().to_string()).collect();
    assert!(sources.contains(&prober.guest_ip), "{sources:?}");
    assert!(!sources.iter().any(|s| s == spoofed), "{sources:?}");

    // From the host: the peer's declared port answers, its undeclared one does not,
    // though the peer itself serves it.
    let page = try_http(&peer.guest_ip, 80, Duration::from_secs(10)).expect("declared port");
    assert!(page.contains("self81-open"), "{page}");
    let undeclared = try_http(&peer.guest_ip, 81, Duration::from_secs(2));
    assert!(undeclared.is_err(), "port 81 answered: {undeclared:?}");

    destroy(&mut client, &prober.id).await;
    destroy(&mut client, &peer.id).await;
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}

/// A namespace standing for a network beyond the host: a veth pair to the root namespace
/// and busybox httpd on `<net>.<n>.2:7000` (`net` the first two octets, `tag` one letter
/// naming it among the test's others). Removed on drop.
struct Outside {
    netns: String,
    link: String,
    addr: String,
    server: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Outside {
    fn start(net: &str, tag: char) -> Outside {
        let mut raw = [0u8; 1];
        getrandom::fill(&mut raw).expect("random");
        let n = raw[0];
        let netns = format!("hout{n:02x}{tag}");
        let link = format!("hout{n:02x}{tag}r");
        let run = |args: &[&str]| {
            let status = Command::new(args[0])
                .args(&args[1..])
                .status()
                .expect("run");
            assert!(status.success(), "{args:?}");
        };
        let _ = Command::new("ip").args(["netns", "del", &netns]).status();
        let _ = Command::new("ip").args(["link", "del", &link]).status();
        run(&["ip", "netns", "add", &netns]);
        run(&[
            "ip", "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        let host = format!("{net}.{n}.1/30");
        let addr = format!("{net}.{n}.2");
        run(&["ip", "addr", "add", &host, "dev", &link]);
        run(&["ip", "link", "set", &link, "up"]);
        run(&[
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            "eth0",
        ]);
        run(&["ip", "-n", &netns, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("index.html"), "outside-pong\n").expect("page");
        let server = Command::new("ip")
            .args([
                "netns", "exec", &netns, "busybox", "httpd", "-f", "-p", "7000", "-h",
            ])
            .arg(dir.path())
            .spawn()
            .expect("httpd");
        Outside {
            netns,
            link,
            addr,
            server,
            _dir: dir,
        }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// With `machine_to_machine = true` a guest reaches another guest's declared port, and
/// still not its undeclared one nor the host. It finds the other guest by name: its
/// resolv.conf names the embedded DNS server, which answers the short name (through the
/// search domain), the full name and the id name.
#[tokio::test]
async fn machine_to_machine_opens_only_declared_ports() {
    let _serial = SERIAL.lock().await;
    let denied = pong_listener();
    let daemon = Daemon::start_with_network("machine_to_machine = true", "");
    let mut client = daemon.client().await;
    let _forwarding = ForwardingRestored::switch_on();
    let peer = create_peer(&mut client).await;
    let node = client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .expect("node")
        .into_inner();
    let resolver = node
        .guest_dns_address
        .strip_suffix(":53")
        .unwrap_or_else(|| panic!("guest resolver {:?}", node.guest_dns_address))
        .to_string();
    // `lookup <label> <name>`: the last address nslookup prints for <name>.
    let script = format!(
        "lookup() {{ a=$(nslookup $2 2>&1 | awk '/^Name:/ {{n=1}} n && /^Address/ {{print $NF}}' | head -n 1); echo \"resolved $1 ${{a:-none}}\"; }}; \
         grep -q '^nameserver {resolver}$' /etc/resolv.conf && echo resolv-conf-ok; \
         lookup short peer; lookup full peer.hearth.internal; lookup id {id}.vm.hearth.internal; \
         lookup missing nobody.hearth.internal; \
         web byname peer 80; \
         web declared {ip} 80; web undeclared {ip} 81; probe host $hv {denied}",
        ip = peer.guest_ip,
        id = peer.id,
    );
    let prober = create_prober(&mut client, "m2m", &script).await;
    let report = probe_report(&prober.guest_ip).await;
    for expected in [
        "resolv-conf-ok".to_string(),
        format!("resolved short {}\n", peer.guest_ip),
        format!("resolved full {}\n", peer.guest_ip),
        format!("resolved id {}\n", peer.guest_ip),
        "resolved missing none\n".to_string(),
        "byname peer:80 open".to_string(),
        format!("declared {}:80 open", peer.guest_ip),
        format!("undeclared {}:81 closed", peer.guest_ip),
        format!(":{denied} closed"),
    ] {
        assert!(report.contains(&expected), "{expected:?} not in {report}");
    }
    destroy(&mut client, &prober.id).await;
    destroy(&mut client, &peer.id).await;
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}

/// Egress `nat` reaches the outside, but not link-local (the cloud metadata range) nor
/// private networks unless `network.egress_allow` lists them; `none` reaches nothing.
/// Each network is a namespace of the test's: a private one listed in `egress_allow`
/// (standing for the outside), a private one not listed, and a link-local one.
#[tokio::test]
async fn egress_nat_reaches_the_outside_and_none_does_not() {
    let _serial = SERIAL.lock().await;
    let before = std::fs::read_to_string(IP_FORWARD).expect("read ip_forward");
    let _restore = ForwardingRestored(before);
    // Off to start with, so the `nat` daemon is seen switching it on; the `none` daemon
    // runs after, with forwarding on: only its rules stop the guest.
    std::fs::write(IP_FORWARD, "0\n").expect("switch forwarding off");
    let listed = Outside::start("10.250", 'a');
    let private = Outside::start("10.251", 'b');
    let link_local = Outside::start("169.254", 'c');
    let probe = |addr: &str, name: &str| {
        format!(
            "if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {addr} 7000 | grep -q outside-pong; then echo {name}-open; else echo {name}-closed; fi"
        )
    };
    let script = [
        probe(&listed.addr, "listed"),
        probe(&private.addr, "private"),
        probe(&link_local.addr, "linklocal"),
    ]
    .join("; ");
    let allow = format!("{}.0/30", listed.addr.rsplit_once('.').expect("a.b.c.d").0);
    for (network, expected) in [
        (
            format!("egress = \"nat\"\negress_allow = [\"{allow}\"]"),
            ["listed-open", "private-closed", "linklocal-closed"],
        ),
        (
            "egress = \"none\"".to_string(),
            ["listed-closed", "private-closed", "linklocal-closed"],
        ),
    ] {
        let daemon = Daemon::start_with_network(&network, "");
        let mut client = daemon.client().await;
        let forwarding = std::fs::read_to_string(IP_FORWARD).expect("read");
        assert_eq!(forwarding.trim(), "1", "{network}: forwarding");
        let prober = create_prober(&mut client, "egress", &script).await;
        let report = probe_report(&prober.guest_ip).await;
        for word in expected {
            assert!(report.contains(word), "{network}: {word}: {report}");
        }
        destroy(&mut client, &prober.id).await;
        support::assert_audit_clean(&mut client).await;
        daemon.assert_no_host_leftovers();
    }
}

/// The QEMU of a machine runs as its own non-root uid, under seccomp, inside the
/// machine's cgroup with the CPU quota of its vCPUs and the memory limit of its memory
/// plus the stated overhead; the cgroup goes with the machine.
#[tokio::test]
async fn the_vmm_runs_unprivileged_sandboxed_and_limited() {
    use hearth::vmm::cgroup::{Cgroups, Hierarchy};
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start_with("[vmm]\nkind = \"qemu\"\nmemory_overhead_mib = 96\n");
    let mut client = daemon.client().await;
    let mut request = support::demo_request("limited", "limited", &[]);
    if let Some(spec) = request.spec.as_mut() {
        spec.vcpus = 2;
        spec.memory_mib = 160;
    }
    let created = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    let machine = wait_for(&mut client, &created.id, pb::MachineState::Started).await;
    let pids = daemon.processes();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let uids = field("Uid:");
    assert_eq!(uids.len(), 4, "{status}");
    assert!(
        uids.iter().all(|u| *u != "0"),
        "QEMU runs as root: {uids:?}"
    );
    assert_eq!(field("Seccomp:"), vec!["2"], "{status}");
    assert!(
        field("CapEff:")
            .iter()
            .all(|c| c.trim_start_matches('0').is_empty()),
        "{status}"
    );

    let cgroups = Cgroups::detect(&daemon.prefix).expect("cgroups");
    let membership = std::fs::read_to_string(format!("/proc/{}/cgroup", pids[0])).expect("cgroup");
    let inside = format!("/hearth_{}/{}", daemon.prefix, machine.id);
    assert!(membership.contains(&inside), "{membership}");
    let read = |dir: &std::path::Path, file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
            .trim()
            .to_string()
    };
    let dirs = cgroups.dirs(&machine.id);
    let memory = ((160 + 96) << 20).to_string();
    let pids_max = hearth::vmm::cgroup::pids_max(2).to_string();
    match cgroups.hierarchy() {
        Hierarchy::V2(_) => {
            assert_eq!(read(&dirs[0], "cpu.max"), "200000 100000");
            assert_eq!(read(&dirs[0], "memory.max"), memory);
            if dirs[0].join("pids.max").exists() {
                assert_eq!(read(&dirs[0], "pids.max"), pids_max);
            } else {
                support::skipped("isolation: pids.max", "cgroup2 here has no pids controller");
            }
        }
        Hierarchy::V1 {
            pids: pids_root, ..
        } => {
            assert_eq!(read(&dirs[0], "cpu.cfs_quota_us"), "200000");
            assert_eq!(read(&dirs[0], "cpu.cfs_period_us"), "100000");
            assert_eq!(read(&dirs[1], "memory.limit_in_bytes"), memory);
            assert!(
                pids_root.is_some(),
                "this host mounts the v1 pids controller"
            );
            assert_eq!(read(&dirs[2], "pids.max"), pids_max);
            assert!(
                read(&dirs[2], "cgroup.procs").contains(&pids[0].to_string()),
                "the VMM is not in its pids cgroup"
            );
        }
    }
    assert!(
        read(&dirs[0], "cgroup.procs").contains(&pids[0].to_string()),
        "the VMM is not in its cgroup"
    );
    support::http_get(&machine.guest_ip, 80);

    // As the VMM's own uid and gid: its machine directory is open to it, the daemon's
    // store, the image bases and the other machines' directories are not.
    let gids = field("Gid:");
    let as_vmm = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid",
                uids[0],
                "--regid",
                gids[0],
                "--clear-groups",
                "--",
            ])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("setpriv")
            .success()
    };
    let layout = daemon.layout();
    let path = |p: std::path::PathBuf| p.display().to_string();
    assert!(as_vmm(&["ls", &path(layout.machine_dir(&machine.id))]));
    assert!(
        !as_vmm(&["cat", &path(layout.store())]),
        "the store is readable"
    );
    assert!(
        !as_vmm(&["ls", &path(layout.machines())]),
        "machines are listable"
    );
    assert!(
        !as_vmm(&["ls", &path(layout.images())]),
        "bases are listable"
    );

    destroy(&mut client, &machine.id).await;
    for dir in &dirs {
        assert!(!dir.exists(), "{} left after destroy", dir.display());
    }
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}

/// A guest that writes to its console without end: its serial log stays under the cap
/// (one rotated file beside it), while the daemon and another machine carry on.
#[tokio::test]
async fn a_console_flood_stays_under_the_log_cap() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start_with("[vmm]\nkind = \"qemu\"\nlog_max_mib = 1\n");
    let mut client = daemon.client().await;
    let flood = "yes 0123456789abcdef-flooding-the-console > /dev/ttyS0 & \
                 exec httpd -f -p 80 -h /srv/www";
    let request = support::shell_request("flood", "flood", flood);
    let flooder = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    let flooder = wait_for(&mut client, &flooder.id, pb::MachineState::Started).await;
    let calm = client
        .machines
        .create_machine(support::demo_request("calm", "calm", &[]))
        .await
        .expect("create calm")
        .into_inner();
    let calm = wait_for(&mut client, &calm.id, pb::MachineState::Started).await;

    let dir = daemon.layout().machine_dir(&flooder.id);
    let log = dir.join("serial.log");
    let old = dir.join("serial.log.1");
    let cap = 1u64 << 20;
    // Until the log has rotated twice over (more than three caps written), every look
    // finds both files within the cap.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut rotations = 0;
    let mut last_old_len = 0;
    let mut last_mtime = None;
    while rotations < 3 {
        let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let old_meta = std::fs::metadata(&old).ok();
        let old_len = old_meta.as_ref().map_or(0, |m| m.len());
        assert!(size <= cap, "serial.log is {size} bytes");
        assert!(old_len <= cap, "serial.log.1 is {old_len} bytes");
        let mtime = old_meta.and_then(|m| m.modified().ok());
        if mtime.is_some() && mtime != last_mtime {
            rotations += 1;
            last_mtime = mtime;
            last_old_len = old_len;
        }
        assert!(
            Instant::now() < deadline,
            "the console wrote too little to rotate ({rotations} rotations, {size} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        last_old_len > cap / 2,
        "rotated file of {last_old_len} bytes"
    );
    let text = support::http_get(&calm.guest_ip, 80);
    assert!(text.contains("hearth demo"), "{text}");
    assert_eq!(support::all_machines(&mut client).await.len(), 2);
    destroy(&mut client, &flooder.id).await;
    destroy(&mut client, &calm.id).await;
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}

/// A guest that writes terminal escapes to its console and crashes: the failure quotes
/// its console, and `hearth machine get` shows that text without a single control
/// character reaching the terminal.
#[tokio::test]
async fn guest_text_reaches_the_operator_inert() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start_with("[vmm]\nkind = \"qemu\"\n[guest]\nboot_attempts = 1\n");
    let mut client = daemon.client().await;
    let hostile = "printf 'before\\033]0;owned\\007\\033[2J\\rafter\\n' > /dev/ttyS0; \
                   sleep 1; echo o > /proc/sysrq-trigger";
    let request = support::shell_request("hostile", "hostile", hostile);
    let created = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    let failed = wait_for(&mut client, &created.id, pb::MachineState::Failed).await;
    assert!(failed.failure.len() <= 4096, "{}", failed.failure.len());
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .arg("--socket")
        .arg(daemon.dir.path().join("api.sock"))
        .args(["machine", "get", &created.id])
        .output()
        .expect("run hearth");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{shown}");
    assert!(
        !shown
            .bytes()
            .any(|b| b.is_ascii_control() && b != b'\n' && b != b'\t'),
        "a control character reached the terminal: {shown:?}"
    );
    // The guest's text is there, made visible.
    assert!(shown.contains("\\u{1b}]0;owned"), "{shown}");
    destroy(&mut client, &created.id).await;
    daemon.assert_no_host_leftovers();
}

/// Firecracker is jailed by default, and the jailer can only run a static binary: a
/// dynamically linked one is refused when the daemon starts, naming the key, instead of
/// failing every machine later.
#[tokio::test]
async fn a_dynamically_linked_firecracker_is_refused_at_start() {
    let dynamic = ["/usr/bin/true", "/bin/true"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("a true binary");
    let daemon = Daemon::prepare(&format!(
        "[vmm]\nkind = \"firecracker\"\nfirecracker_binary = \"{dynamic}\"\n"
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_hearthd"))
        .arg("--config")
        .arg(daemon.dir.path().join("hearthd.toml"))
        .output()
        .expect("run hearthd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "hearthd started: {stderr}");
    assert!(stderr.contains("vmm.firecracker_binary"), "{stderr}");
    assert!(stderr.contains("dynamically linked"), "{stderr}");
}
