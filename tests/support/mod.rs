//! Test support: a real hearthd process on a temporary data dir, with a test-unique
//! resource prefix and address pool, removed (with anything it left on the host) on drop.
//! Shared by the integration tests and the benchmarks.

#![allow(dead_code)]

pub mod etcd;
pub mod fake_registry;
pub mod firecracker_env;
pub mod guest_fixture;
pub mod guest_prereqs;
pub mod host_tools;
pub mod registry;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hearth::api::pb;
use hearth::client::{Client, connect};

static NEXT: AtomicU8 = AtomicU8::new(0);
static BASE: OnceLock<[u8; 2]> = OnceLock::new();

/// A daemon on a temporary data dir, with a test-unique resource prefix and pool.
pub struct Daemon {
    child: Option<Child>,
    /// The scratch directory (data dir, socket, config).
    pub dir: tempfile::TempDir,
    /// Prefix of every host resource it names.
    pub prefix: String,
    config: PathBuf,
    /// Environment every start of the process gets (a test's `spawn_with_env` adds to it).
    pub env: Vec<(String, String)>,
}

impl Daemon {
    /// Where this daemon keeps its files (its `data_dir` and `cache_dir` in `dir`).
    pub fn layout(&self) -> hearth::layout::Layout {
        hearth::layout::Layout::new(self.dir.path().join("data"), self.dir.path().join("cache"))
    }

    /// Starts a daemon with `extra` TOML appended to its config.
    pub fn start_with(extra: &str) -> Daemon {
        let mut daemon = Daemon::prepare(extra);
        daemon.spawn();
        daemon
    }

    /// A daemon's directory and config, not started yet.
    pub fn prepare(extra: &str) -> Daemon {
        Daemon::prepare_with_network("", extra)
    }

    /// Starts a daemon with `network` TOML keys added to its `[network]` section and
    /// `extra` appended to its config.
    pub fn start_with_network(network: &str, extra: &str) -> Daemon {
        let mut daemon = Daemon::prepare_with_network(network, extra);
        daemon.spawn();
        daemon
    }

    fn prepare_with_network(network: &str, extra: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        // Daemons of one test binary run at the same time: a counter keeps their prefixes
        // and pools apart, a random start (drawn once per binary) keeps binaries run one
        // after another apart.
        let base = *BASE.get_or_init(|| {
            let mut raw = [0u8; 2];
            getrandom::fill(&mut raw).expect("random");
            raw
        });
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let raw = [base[0].wrapping_add(n), base[1].wrapping_add(n)];
        let prefix = format!("td{:02x}", raw[0]);
        let config = dir.path().join("hearthd.toml");
        // HEARTH_E2E_VMM=firecracker (with HEARTH_FIRECRACKER) runs every daemon test on
        // Firecracker, for hosts whose KVM boots the guest kernel; tests that choose
        // their VMM themselves keep their choice.
        let vmm = match (
            std::env::var("HEARTH_E2E_VMM").as_deref(),
            std::env::var("HEARTH_FIRECRACKER"),
        ) {
            (Ok("firecracker"), Ok(binary)) if !extra.contains("[vmm]") => {
                format!("[vmm]\nkind = \"firecracker\"\nfirecracker_binary = \"{binary}\"\n")
            }
            _ => String::new(),
        };
        let extra = format!("{vmm}{extra}");
        // Tests build images from their own temporary directories: those are the
        // daemon's local roots (a test of the refusal sets its own).
        let roots = format!("local_roots = [\"{}\"]\n", std::env::temp_dir().display());
        let extra = if extra.contains("local_roots") {
            extra
        } else if extra.contains("[images]\n") {
            extra.replacen("[images]\n", &format!("[images]\n{roots}"), 1)
        } else {
            format!("{extra}\n[images]\n{roots}")
        };
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{d}/data\"\ncache_dir = \"{d}/cache\"\n[api]\nsocket = \"{d}/api.sock\"\n[network]\nprefix = \"{prefix}\"\npool = \"10.216.{net}.0/24\"\n{network}\n[metrics]\nlisten = \"127.0.0.1:0\"\n[dns]\nlisten = \"127.0.0.1:0\"\n{extra}\n",
                d = dir.path().display(),
                net = raw[1],
                extra = extra,
            ),
        )
        .expect("config");
        Daemon {
            child: None,
            dir,
            prefix,
            config,
            env: Vec::new(),
        }
    }

    /// Changes the config file (for the next start): `change` gets its text.
    pub fn rewrite_config(&self, change: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config).expect("read config");
        std::fs::write(&self.config, change(text)).expect("write config");
    }

    /// Starts the process (again).
    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// Starts the process (again) with extra environment (e.g. `FAILPOINTS`).
    pub fn spawn_with_env(&mut self, env: &[(&str, &str)]) {
        let mut command = self.command("warn");
        for (key, value) in env {
            command.env(key, value);
        }
        self.child = Some(command.spawn().expect("spawn hearthd"));
    }

    /// Starts the process (again) logging at `info` into `log` (its stderr).
    pub fn spawn_logging(&mut self, log: &Path) {
        let file = std::fs::File::create(log).expect("log file");
        let mut command = self.command("info");
        command.stderr(file);
        self.child = Some(command.spawn().expect("spawn hearthd"));
    }

    /// Starts the process (again) with the daemon's own default log filter (no
    /// HEARTH_LOG, as an operator runs it), its stderr into `log`.
    #[allow(dead_code)]
    pub fn spawn_default_logging(&mut self, log: &Path) {
        let file = std::fs::File::create(log).expect("log file");
        let mut command = self.command("info");
        command.env_remove("HEARTH_LOG").stderr(file);
        self.child = Some(command.spawn().expect("spawn hearthd"));
    }

    /// hearthd on this daemon's config, logging at `level` (or at `HEARTH_TEST_LOG`, a
    /// filter in `HEARTH_LOG`'s syntax, when that is set: to look into one run).
    fn command(&self, level: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hearthd"));
        let level = std::env::var("HEARTH_TEST_LOG").unwrap_or_else(|_| level.to_string());
        command
            .arg("--config")
            .arg(&self.config)
            .env("HEARTH_LOG", level);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command
    }

    /// SIGKILLs the process and starts it again: the client, and the milliseconds from
    /// the start to the API answering and to `runs` machine runs having looked at the host
    /// (every machine re-adopted or repaired).
    pub async fn kill_and_restart_timed(&mut self, runs: usize) -> (Client, f64, f64) {
        let socket = self.dir.path().join("api.sock");
        self.kill();
        let clock = Instant::now();
        self.spawn();
        let mut client = loop {
            if let Ok(mut c) = connect(&socket).await
                && c.node.get_node(pb::GetNodeRequest {}).await.is_ok()
            {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let api_ms = clock.elapsed().as_secs_f64() * 1000.0;
        loop {
            let node = node(&mut client).await;
            if node.runs_observed >= runs as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (client, api_ms, clock.elapsed().as_secs_f64() * 1000.0)
    }

    /// Waits until the process exits by itself (a crash); false when it is still running
    /// at the deadline.
    pub async fn wait_exit(&mut self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        loop {
            match self.child.as_mut().map(|c| c.try_wait()) {
                None => return true,
                Some(Ok(Some(_))) => {
                    self.child = None;
                    return true;
                }
                Some(Ok(None)) if Instant::now() < end => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(_) => return false,
            }
        }
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// The daemon's resident memory in KiB (`VmRSS`), while it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid()?)
    }

    /// The daemon's peak resident memory in KiB (`VmHWM`), while it runs.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        status_kib(self.pid()?, "VmHWM")
    }

    /// SIGKILLs the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A client, once the API answers.
    pub async fn client(&self) -> Client {
        let socket = self.dir.path().join("api.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut client) = connect(&socket).await
                && client.node.get_node(pb::GetNodeRequest {}).await.is_ok()
            {
                return client;
            }
            assert!(
                Instant::now() < deadline,
                "hearthd did not answer on {}",
                socket.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails the test, listing them, when namespaces or links with this daemon's prefix
    /// are left on the host.
    pub fn assert_no_host_leftovers(&self) {
        let left = self.host_leftovers();
        assert!(left.is_empty(), "{left:?}");
    }

    /// `nft list table` of this daemon's table; empty when there is none.
    pub fn nft_table(&self) -> String {
        Command::new("nft")
            .args([
                "list",
                "table",
                "inet",
                &hearth::net::policy::table_name(&self.prefix),
            ])
            .stderr(std::process::Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Open descriptors of the daemon's process (0 when it does not run).
    #[allow(dead_code)]
    pub fn open_fds(&self) -> usize {
        self.pid()
            .and_then(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
            .map_or(0, |d| d.count())
    }

    /// Namespaces and links on the host that carry this daemon's prefix.
    pub fn host_leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{}-", self.prefix)) {
                    found.push(format!("netns {name}"));
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.prefix) {
                    found.push(format!("link {name}"));
                }
            }
        }
        // A machine's packet policy: chains m<id>_* in the daemon's table.
        let table = self.nft_table();
        for line in table.lines() {
            if let Some(chain) = line.trim().strip_prefix("chain m")
                && let Some((id, _)) = chain.split_once('_')
            {
                found.push(format!("policy m{id}_*"));
            }
        }
        found.dedup();
        if let Ok(cgroups) = hearth::vmm::cgroup::Cgroups::detect(&self.prefix) {
            for (path, _) in cgroups.scan().unwrap_or_default() {
                found.push(format!("cgroup {path}"));
            }
        }
        found
    }
}

impl Daemon {
    /// Processes (VMMs) whose command line mentions this daemon's scratch directory or
    /// that run in a directory under it (QEMU runs in its machine directory and names
    /// its files relative to it).
    pub fn processes(&self) -> Vec<i32> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if Some(pid) == self.child.as_ref().map(|c| c.id() as i32) {
                continue;
            }
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle)
                || cwd.starts_with(self.dir.path())
            {
                found.push(pid);
            }
        }
        found
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        for pid in self.processes() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        for leftover in self.host_leftovers() {
            let mut parts = leftover.split(' ');
            match (parts.next(), parts.next()) {
                (Some("netns"), Some(name)) => {
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
                (Some("link"), Some(name)) => {
                    let _ = Command::new("ip").args(["link", "del", name]).status();
                }
                _ => {}
            }
        }
        // The daemon's parent cgroups, and what a failed test left in them.
        if let Ok(cgroups) = hearth::vmm::cgroup::Cgroups::detect(&self.prefix) {
            for (_, name) in cgroups.scan().unwrap_or_default() {
                let _ = cgroups.remove(&name);
            }
            for dir in cgroups.dirs("") {
                let _ = std::fs::remove_dir(dir);
            }
        }
        // The daemon's table and guest resolver address outlive the daemon (machines that
        // outlive it keep their policy and resolver); a test's daemon takes them along.
        let _ = Command::new("ip")
            .args([
                "-4",
                "addr",
                "flush",
                "label",
                &hearth::net::resolver::label(&self.prefix),
            ])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("nft")
            .args([
                "delete",
                "table",
                "inet",
                &hearth::net::policy::table_name(&self.prefix),
            ])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Waits (up to 240 s) until the machine reaches `state`; fails the test otherwise.
pub async fn wait_for(client: &mut Client, id: &str, state: pb::MachineState) -> pb::Machine {
    let reply = client
        .machines
        .wait_machine(pb::WaitMachineRequest {
            id: id.into(),
            state: state as i32,
            timeout_ms: 240_000,
        })
        .await
        .expect("wait")
        .into_inner();
    let machine = reply.machine.expect("machine");
    assert!(reply.reached, "did not reach {state:?}: {machine:#?}");
    machine
}

/// Destroys a machine and waits until it is destroyed.
pub async fn destroy(client: &mut Client, id: &str) {
    client
        .machines
        .destroy_machine(pb::MachineRef { id: id.into() })
        .await
        .expect("destroy");
    wait_for(client, id, pb::MachineState::Destroyed).await;
}

/// A create request for a demo machine (1 vCPU, 128 MiB, serving port 80); an empty
/// `command` runs the image's default.
pub fn demo_request(request_id: &str, name: &str, command: &[&str]) -> pb::CreateMachineRequest {
    pb::CreateMachineRequest {
        request_id: request_id.into(),
        name: name.into(),
        spec: Some(pb::MachineSpec {
            image: "demo".into(),
            vcpus: 1,
            memory_mib: 128,
            ports: vec![80],
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        start: None,
    }
}

/// [`demo_request`] whose command is one busybox `sh -c` script.
pub fn shell_request(request_id: &str, name: &str, script: &str) -> pb::CreateMachineRequest {
    let mut request = demo_request(request_id, name, &[script]);
    if let Some(spec) = request.spec.as_mut() {
        spec.entrypoint = vec!["/bin/busybox".into(), "sh".into(), "-c".into()];
    }
    request
}

/// Reports a test that cannot run here: loudly on stderr (seen with `--nocapture` or when
/// it fails) and in the file `HEARTH_SKIP_LOG` names, which the test command lists at
/// its end.
pub fn skipped(test: &str, why: &str) {
    eprintln!("\n*** SKIPPING {test}: {why} ***\n");
    if let Some(log) = std::env::var_os("HEARTH_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(file, "{test}: {why}");
        }
    }
}

/// True when this host can attach and mount loop devices (root, `/dev/loop-control`);
/// otherwise reports `test` skipped.
pub fn loop_devices(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        skipped(test, "needs root for a loop device and a mount");
        return false;
    }
    if !std::path::Path::new("/dev/loop-control").exists() {
        skipped(test, "no /dev/loop-control on this host");
        return false;
    }
    true
}

/// The daemon's node report (capacity, counters).
pub async fn node(client: &mut Client) -> pb::Node {
    client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .expect("node")
        .into_inner()
}

/// The daemon's leak audit.
pub async fn audit(client: &mut Client) -> pb::AuditReport {
    client
        .node
        .audit(pb::AuditRequest {})
        .await
        .expect("audit")
        .into_inner()
}

/// Fails the test unless the audit finds no leak and nothing missing.
pub async fn assert_audit_clean(client: &mut Client) {
    let report = audit(client).await;
    assert!(
        report.leaks.is_empty() && report.missing.is_empty(),
        "{report:?}"
    );
}

/// One machine, as the API shows it.
pub async fn get_machine(client: &mut Client, id: &str) -> pb::Machine {
    client
        .machines
        .get_machine(pb::MachineRef { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

/// Every published route, as ListRoutes shows it.
pub async fn routes(client: &mut Client) -> Vec<pb::Route> {
    client
        .registry
        .list_routes(pb::ListRoutesRequest {})
        .await
        .expect("routes")
        .into_inner()
        .routes
}

/// The status a pull ends with, whether the call refuses it at once or its stream ends
/// with it; panics when the pull succeeds.
pub async fn pull_error(client: &mut Client, image: &str) -> tonic::Status {
    let mut stream = match client
        .images
        .pull_image(pb::PullImageRequest {
            image: image.into(),
        })
        .await
    {
        Ok(stream) => stream.into_inner(),
        Err(refused) => return refused,
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("{image}: the pull succeeded"),
            Err(e) => return e,
        }
    }
}

/// A `[[pools]]` table for the demo image in [`demo_request`]'s shape.
pub fn demo_pool(name: &str, size: u32) -> String {
    format!(
        "[[pools]]\nname = \"{name}\"\nimage = \"demo\"\nvcpus = 1\nmemory_mib = 128\nsize = {size}\n"
    )
}

/// The status of pool `name`, as GetNode reports it.
pub async fn pool_status(client: &mut Client, name: &str) -> pb::PoolStatus {
    node(client)
        .await
        .pools
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no pool {name} in GetNode"))
}

/// Waits (up to `limit`) until pool `name` has `ready` prepared machines and none being
/// built; fails the test otherwise.
pub async fn wait_pool(
    client: &mut Client,
    name: &str,
    ready: u32,
    limit: Duration,
) -> pb::PoolStatus {
    wait_pool_until(client, name, limit, |s| {
        s.ready == ready && s.refilling == 0
    })
    .await
}

/// Waits (up to `limit`) until pool `name`'s status satisfies `done`, re-reading it after
/// every machine event (a pool's machines record each change with one); fails the test
/// otherwise.
pub async fn wait_pool_until(
    client: &mut Client,
    name: &str,
    limit: Duration,
    done: impl Fn(&pb::PoolStatus) -> bool,
) -> pb::PoolStatus {
    let mut events = watch_all(client).await;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let status = pool_status(client, name).await;
        if done(&status) {
            return status;
        }
        next_event(&mut events, deadline, &status).await;
    }
}

/// Waits (up to `limit`) until machine `id` satisfies `done`, re-reading it after every
/// machine event; fails the test otherwise. Unlike WaitMachine it does not stop at a state
/// the machine cannot leave by itself (a pool's failed machine is retired by its pool).
pub async fn wait_machine_until(
    client: &mut Client,
    id: &str,
    limit: Duration,
    done: impl Fn(&pb::Machine) -> bool,
) -> pb::Machine {
    let mut events = watch_all(client).await;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let machine = get_machine(client, id).await;
        if done(&machine) {
            return machine;
        }
        next_event(&mut events, deadline, &machine).await;
    }
}

async fn watch_all(client: &mut Client) -> tonic::Streaming<pb::MachineEvent> {
    watch_machine(client, "", 0).await
}

/// The events of machine `id` (of every machine when empty) after `after_seq`, then live.
pub async fn watch_machine(
    client: &mut Client,
    id: &str,
    after_seq: u64,
) -> tonic::Streaming<pb::MachineEvent> {
    client
        .machines
        .watch_events(pb::WatchEventsRequest {
            machine_id: id.into(),
            after_seq,
            history_only: false,
        })
        .await
        .expect("watch events")
        .into_inner()
}

/// The next machine event, or the test fails at `deadline` showing `waiting_on`.
async fn next_event(
    events: &mut tonic::Streaming<pb::MachineEvent>,
    deadline: tokio::time::Instant,
    waiting_on: &(dyn std::fmt::Debug + Sync),
) {
    match tokio::time::timeout_at(deadline, events.message()).await {
        Ok(Ok(Some(_))) => {}
        Ok(other) => panic!("event stream ended: {other:?}"),
        Err(_) => panic!("timed out waiting on {waiting_on:#?}"),
    }
}

/// Every machine record, prepared capacity and destroyed ones included.
pub async fn all_machines(client: &mut Client) -> Vec<pb::Machine> {
    client
        .machines
        .list_machines(pb::ListMachinesRequest {
            include_destroyed: true,
            include_prepared: true,
        })
        .await
        .expect("list")
        .into_inner()
        .machines
}

/// An HTTP GET to the guest from the host side of its network.
pub fn http_get(ip: &str, port: u16) -> String {
    use std::io::{Read, Write};
    let ip: std::net::Ipv4Addr = ip.parse().expect("guest ip");
    let addr = std::net::SocketAddr::from((ip, port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .expect("connect to the guest");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
        .expect("send request");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read reply");
    reply
}

/// The machine's events after `after_seq`, up to and including the first in `state`.
pub async fn events_until(
    client: &mut Client,
    id: &str,
    after_seq: u64,
    state: pb::MachineState,
) -> Vec<pb::MachineEvent> {
    let mut events = watch_machine(client, id, after_seq).await;
    let mut log = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(120), events.message())
            .await
            .unwrap_or_else(|_| panic!("no {state:?} event in time: {log:?}"))
            .expect("event stream")
            .unwrap_or_else(|| panic!("the stream ended before {state:?}: {log:?}"));
        let reached = event.state == state as i32;
        log.push(event);
        if reached {
            return log;
        }
    }
}

/// The machine's first event after `after_seq` whose message starts with `prefix`
/// (waits up to 120 s).
pub async fn wait_event(
    client: &mut Client,
    id: &str,
    after_seq: u64,
    prefix: &str,
) -> pb::MachineEvent {
    let mut events = watch_machine(client, id, after_seq).await;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(120), events.message())
            .await
            .unwrap_or_else(|_| panic!("no {prefix:?} event in time"))
            .expect("event stream")
            .expect("stream open");
        if event.message.starts_with(prefix) {
            return event;
        }
    }
}

/// Restarts the daemon without its pools, so their prepared machines are destroyed by
/// their own runs, and waits (up to 240 s each) until every one is; returns the client of
/// the restarted daemon.
pub async fn drain_pools(daemon: &mut Daemon) -> Client {
    daemon.kill();
    daemon.rewrite_config(|text| {
        text.split("[[pools]]")
            .next()
            .unwrap_or_default()
            .to_string()
    });
    daemon.spawn();
    let mut client = daemon.client().await;
    for m in all_machines(&mut client).await {
        if m.pool.is_empty() || m.claimed {
            continue;
        }
        wait_machine_until(&mut client, &m.id, Duration::from_secs(240), |m| {
            m.state == pb::MachineState::Destroyed as i32
        })
        .await;
    }
    client
}

/// The `p` quantile (0..=1, nearest rank) of sorted samples; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

/// Creates `request`, waits for `started`, destroys it; returns the time to `started`
/// and the machine as it started.
pub async fn create_started(
    client: &mut Client,
    request: pb::CreateMachineRequest,
) -> (f64, pb::Machine) {
    let clock = std::time::Instant::now();
    let machine = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    let reply = client
        .machines
        .wait_machine(pb::WaitMachineRequest {
            id: machine.id.clone(),
            state: pb::MachineState::Started as i32,
            timeout_ms: 240_000,
        })
        .await
        .expect("wait")
        .into_inner();
    let ms = clock.elapsed().as_secs_f64() * 1000.0;
    let started = reply.machine.expect("machine");
    assert!(reply.reached, "did not start: {}", started.failure);
    destroy(client, &machine.id).await;
    (ms, started)
}

/// The resident memory of process `pid` in KiB (`VmRSS`), while it runs.
#[allow(dead_code)]
pub fn rss_kib(pid: i32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// A `<field>: <n> kB` line of process `pid`'s `/proc/<pid>/status`, while it runs.
fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `GET /metrics` at `address` (the daemon's `metrics_address`), the body; fails the test
/// on anything but a 200 in the text format.
pub fn scrape(address: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: hearth\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    body.to_string()
}

/// The value of the sample `series` (name and labels exactly as exported, e.g.
/// `hearth_sink_in_sync{sink="etcd"}`) in a scrape's body.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// `dig` at the daemon's DNS address: (status, answer lines).
pub fn dig(server: &str, name: &str, kind: &str, tcp: bool) -> (String, Vec<String>) {
    let (host, port) = server.rsplit_once(':').expect("host:port");
    let mut command = Command::new("dig");
    command.arg(format!("@{host}")).args([
        "-p",
        port,
        name,
        kind,
        "+norecurse",
        "+time=5",
        "+tries=1",
    ]);
    if tcp {
        command.arg("+tcp");
    }
    let out = command.output().expect("run dig");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("none")
        .to_string();
    let answers = text
        .split(";; ANSWER SECTION:")
        .nth(1)
        .map(|section| {
            section
                .lines()
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect()
        })
        .unwrap_or_default();
    (status, answers)
}
