//! The leak audit and the orphan sweep against a real daemon (root, QEMU): a machine's
//! whole life audits clean; orphans planted while the daemon was down (a namespace and a
//! link, a machine directory, a lease and a route, a process carrying the VMM marker) are
//! released at the next start, and the machine that kept running is not touched.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth::api::pb;
use hearth::client::Client;
use hearth::machine::spec::new_machine_id;
use support::{Daemon, destroy, wait_for};

async fn create(client: &mut Client, request_id: &str, name: &str) -> pb::Machine {
    client
        .machines
        .create_machine(pb::CreateMachineRequest {
            request_id: request_id.into(),
            name: name.into(),
            spec: Some(pb::MachineSpec {
                image: "demo".into(),
                vcpus: 1,
                memory_mib: 128,
                ports: vec![80],
                ..Default::default()
            }),
            start: None,
        })
        .await
        .expect("create")
        .into_inner()
}

fn assert_clean(report: &pb::AuditReport) {
    assert!(
        report.leaks.is_empty() && report.missing.is_empty(),
        "{report:#?}"
    );
}

/// Runs `hearth --json node audit` against the daemon: (exit code, parsed output).
fn cli_audit(daemon: &Daemon) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .arg("--socket")
        .arg(daemon.dir.path().join("api.sock"))
        .args(["--json", "node", "audit"])
        .output()
        .expect("run hearth");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_audits_clean_through_its_life() {
    let daemon = Daemon::start_with("");
    let mut client = daemon.client().await;
    assert_clean(&support::audit(&mut client).await);

    let machine = create(&mut client, "audit-life", "life").await;
    wait_for(&mut client, &machine.id, pb::MachineState::Started).await;
    let report = support::audit(&mut client).await;
    assert_clean(&report);
    assert_eq!(report.machines, 1);
    eprintln!(
        "audit of 1 started machine: {:.2} ms",
        report.duration_us as f64 / 1000.0
    );
    assert_eq!(cli_audit(&daemon).0, 0);

    destroy(&mut client, &machine.id).await;
    assert_clean(&support::audit(&mut client).await);

    // Something in the machines directory that is not a machine: a leak the CLI reports
    // with status 1, and that no sweep removes (its name says nothing of its owner).
    let stray = daemon.layout().machines().join("stray.tmp");
    std::fs::write(&stray, b"").expect("plant");
    let (code, json) = cli_audit(&daemon);
    assert_eq!(code, 1, "{json}");
    assert_eq!(json["leaks"][0]["kind"], "machine_dir", "{json}");
    assert_eq!(json["leaks"][0]["machine_id"], "", "{json}");
    assert_eq!(
        json["leaks"][0]["name"],
        stray.display().to_string(),
        "{json}"
    );
    std::fs::remove_file(&stray).expect("unplant");
    assert_eq!(cli_audit(&daemon).0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_left_while_the_daemon_was_down_are_swept_at_start() {
    let mut daemon = Daemon::start_with("");
    let mut client = daemon.client().await;
    let live = create(&mut client, "audit-live", "live").await;
    let started = wait_for(&mut client, &live.id, pb::MachineState::Started).await;
    // A tombstone: destroyed at once, before it ever boots.
    let gone = create(&mut client, "audit-gone", "gone").await;
    destroy(&mut client, &gone.id).await;
    assert_clean(&support::audit(&mut client).await);
    daemon.kill();

    let layout = daemon.layout();
    let machines = layout.machines();
    let prefix = daemon.prefix.clone();
    // A network of an id nobody knows (a namespace and a veth pair into it), as a crash
    // between acquiring and recording leaves it.
    let net_orphan = new_machine_id().expect("id");
    ip(&["netns", "add", &format!("{prefix}-{net_orphan}")]);
    ip(&[
        "link",
        "add",
        &format!("{prefix}{net_orphan}"),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &format!("{prefix}-{net_orphan}"),
    ]);
    // A directory of the destroyed machine (its tombstone holds nothing).
    std::fs::create_dir_all(machines.join(&gone.id)).expect("mkdir");
    std::fs::write(machines.join(&gone.id).join("rootfs.ext4"), b"x").expect("write");
    // A lease and a route of an id nobody knows.
    let table_orphan = new_machine_id().expect("id");
    {
        let store = hearth::store::Store::open(&layout.store()).expect("open store");
        store.lease(&table_orphan, 32).expect("lease");
        store
            .publish_route(&hearth::route::Route {
                machine_id: table_orphan.clone(),
                name: "orphan".into(),
                ip: "10.0.0.6".parse().expect("ip"),
                ports: vec![80],
            })
            .expect("route");
    }
    // A cgroup and a policy chain of an id nobody knows.
    let host_orphan = new_machine_id().expect("id");
    let cgroups = hearth::vmm::cgroup::Cgroups::detect(&prefix).expect("cgroups");
    cgroups
        .ensure(
            &host_orphan,
            hearth::vmm::cgroup::Limits {
                vcpus: 1,
                memory_bytes: 64 << 20,
            },
        )
        .expect("orphan cgroup");
    let chain = Command::new("nft")
        .args([
            "add",
            "chain",
            "inet",
            &format!("hearth_{prefix}"),
            &format!("m{host_orphan}_in"),
        ])
        .status()
        .expect("nft");
    assert!(chain.success());
    // A process carrying the VMM marker and running in a machine directory of this
    // daemon, as VMMs do. `read` is a shell builtin: the process waits on its stdin and
    // has no child.
    let vmm_orphan = new_machine_id().expect("id");
    let vmm_dir = machines.join(&vmm_orphan);
    std::fs::create_dir_all(&vmm_dir).expect("mkdir");
    let mut fake_vmm = Command::new("/bin/sh")
        .args(["-c", "read line", "-name"])
        .arg(format!("hearth-{vmm_orphan}"))
        .arg("file:./serial.log")
        .current_dir(&vmm_dir)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn the fake VMM");

    daemon.spawn();
    let mut client = daemon.client().await;
    let ready = Instant::now();
    let deadline = ready + Duration::from_secs(60);
    let report = loop {
        let report = support::audit(&mut client).await;
        if report.leaks.is_empty() {
            break report;
        }
        assert!(Instant::now() < deadline, "orphans not swept: {report:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "orphans gone {:.0} ms after the API answered; audit {:.2} ms",
        ready.elapsed().as_secs_f64() * 1000.0,
        report.duration_us as f64 / 1000.0
    );
    assert!(report.missing.is_empty(), "{report:#?}");

    // Every orphan is gone, by its own evidence.
    let status = fake_vmm.wait().expect("wait for the fake VMM");
    assert_eq!(status.signal(), Some(9), "{status:?}");
    let mut left = daemon.host_leftovers();
    left.sort();
    let mut expected: Vec<String> = cgroups
        .dirs(&live.id)
        .iter()
        .map(|d| format!("cgroup {}", d.display()))
        .collect();
    expected.extend([
        format!("link {prefix}{}", live.id),
        format!("netns {prefix}-{}", live.id),
        format!("policy m{}_*", live.id),
    ]);
    expected.sort();
    assert_eq!(left, expected);
    let mut dirs: Vec<String> = std::fs::read_dir(&machines)
        .expect("machines dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(dirs, vec![live.id.clone()]);
    let routes = client
        .registry
        .list_routes(pb::ListRoutesRequest {})
        .await
        .expect("routes")
        .into_inner()
        .routes;
    assert_eq!(
        routes
            .iter()
            .map(|r| r.machine_id.as_str())
            .collect::<Vec<_>>(),
        vec![live.id.as_str()]
    );
    let node = client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .expect("node")
        .into_inner();
    assert_eq!(node.ip_slots_used, 1);

    // The machine that kept running was not touched: same VMM, still started.
    let after = wait_for(&mut client, &live.id, pb::MachineState::Started).await;
    assert_eq!(after.vmm_pid, started.vmm_pid);
    assert_eq!(after.guest_ip, started.guest_ip);

    destroy(&mut client, &live.id).await;
    assert_clean(&support::audit(&mut client).await);
    daemon.assert_no_host_leftovers();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_stops_quietly_when_its_output_pipe_closes() {
    let daemon = Daemon::start_with("");
    let _ = daemon.client().await;
    // `hearth node audit | head -0`: the reader is gone before the first line.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .arg("--socket")
        .arg(daemon.dir.path().join("api.sock"))
        .args(["node", "audit"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run hearth");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{:?} {:?}: {stderr}",
        out.status.code(),
        out.status.signal()
    );
    assert!(stderr.is_empty(), "quiet, not a panic: {stderr}");
}

/// Runs `hearth --json doctor --config <config>`: (exit code, verdict and fix by check).
fn doctor(config: &std::path::Path) -> (i32, Vec<(String, String, String)>) {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["--json", "doctor", "--config"])
        .arg(config)
        .output()
        .expect("run hearth doctor");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let checks = json
        .as_array()
        .expect("a list")
        .iter()
        .map(|c| {
            let field = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (field("check"), field("verdict"), field("fix"))
        })
        .collect();
    (out.status.code().unwrap_or(-1), checks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_gives_each_prerequisite_a_verdict_and_a_fix() {
    let daemon = Daemon::start_with("");
    let _ = daemon.client().await;
    let config = daemon.dir.path().join("hearthd.toml");
    let (code, checks) = doctor(&config);
    let names: Vec<&str> = checks.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "root",
            "kvm",
            "vmm",
            "nftables",
            "cgroups",
            "guest kernel",
            "guest init",
            "vmm layout",
            "free space",
            "socket"
        ]
    );
    let verdict = |name: &str| {
        checks
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, f)| (v.clone(), f.clone()))
            .expect("the check")
    };
    // The daemon this test started answers on the config's socket.
    assert_eq!(verdict("socket").0, "ok", "{checks:?}");
    assert_eq!(verdict("nftables").0, "ok", "{checks:?}");
    assert_eq!(verdict("vmm layout").0, "ok", "{checks:?}");
    assert_eq!(code, 0, "{checks:?}");

    // A kernel directory with no kernel: that check fails, naming the fix, and so does
    // the command.
    let empty = tempfile::tempdir().expect("tempdir");
    let broken = daemon.dir.path().join("broken.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let text = if text.contains("[guest]") {
        text.replace(
            "[guest]",
            &format!("[guest]\nkernel_dir = \"{}\"", empty.path().display()),
        )
    } else {
        format!(
            "{text}\n[guest]\nkernel_dir = \"{}\"\n",
            empty.path().display()
        )
    };
    std::fs::write(&broken, text).expect("write");
    let (code, checks) = doctor(&broken);
    let (kernel, fix) = checks
        .iter()
        .find(|(n, _, _)| n == "guest kernel")
        .map(|(_, v, f)| (v.clone(), f.clone()))
        .expect("the kernel check");
    assert_eq!(kernel, "FAIL", "{checks:?}");
    assert!(fix.contains("install-guest-kernel.sh"), "{fix}");
    assert_eq!(code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_without_follow_print_the_history_and_end() {
    let daemon = Daemon::start_with("");
    let mut client = daemon.client().await;
    // Created stopped: its history is short and settles without a guest.
    let created = client
        .machines
        .create_machine(pb::CreateMachineRequest {
            start: Some(false),
            ..support::demo_request("hist-1", "hist", &[])
        })
        .await
        .expect("create")
        .into_inner();
    wait_for(&mut client, &created.id, pb::MachineState::Stopped).await;
    let mut history = client
        .machines
        .watch_events(pb::WatchEventsRequest {
            machine_id: created.id.clone(),
            after_seq: 0,
            history_only: true,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), history.message())
        .await
        .expect("the history ends by itself")
        .expect("stream")
    {
        seen.push(event.message);
    }
    assert_eq!(
        seen.first().map(String::as_str),
        Some("created"),
        "{seen:?}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .arg("--socket")
        .arg(daemon.dir.path().join("api.sock"))
        .args(["machine", "events", &created.id])
        .output()
        .expect("run hearth");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("created"), "{printed}");
    destroy(&mut client, &created.id).await;
}

/// A `cache_dir` whose parent the VMMs cannot search (the guest kernel is opened there by
/// path): hearthd refuses to start, naming the key, the directory and its mode, before
/// touching the host; `hearth doctor` fails the same check. (A data dir under a private
/// parent is served: deploy/run-demo.sh, which CI runs, keeps it under `mktemp -d`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_the_vmms_cannot_use_is_refused_at_start_naming_the_key() {
    use std::os::unix::fs::PermissionsExt;
    let mut daemon = Daemon::prepare("");
    let private = daemon.dir.path().join("private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let d = daemon.dir.path().display().to_string();
    daemon.rewrite_config(|text| {
        text.replace(
            &format!("cache_dir = \"{d}/cache\""),
            &format!("cache_dir = \"{d}/private/cache\""),
        )
    });
    let log = daemon.dir.path().join("hearthd.log");
    daemon.spawn_logging(&log);
    assert!(
        daemon.wait_exit(std::time::Duration::from_secs(20)).await,
        "hearthd started with a cache its VMMs cannot reach"
    );
    let said = std::fs::read_to_string(&log).expect("log");
    assert!(said.contains("cache_dir: "), "{said}");
    assert!(said.contains(&private.display().to_string()), "{said}");
    assert!(said.contains("mode 0700"), "{said}");
    assert!(
        !daemon.dir.path().join("api.sock").exists(),
        "the API was served"
    );
    let (code, checks) = doctor(&daemon.dir.path().join("hearthd.toml"));
    let layout = checks
        .iter()
        .find(|(n, _, _)| n == "vmm layout")
        .expect("the layout check");
    assert_eq!(layout.1, "FAIL", "{checks:?}");
    assert_eq!(code, 1);
}
