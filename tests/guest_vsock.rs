//! The guest init's vsock agent path on a real guest kernel, with rust-vmm's
//! `vhost-device-vsock` standing in for Firecracker's vsock bridge (run as root).
//!
//! Why a stand-in: under Firecracker the agent protocol runs over "hybrid vsock" (the
//! guest connects to CID 2 port P, the VMM bridges that to the host Unix socket
//! `<uds_path>_P`), but this host's KVM cannot run a stock guest kernel, so the Firecracker
//! binary cannot boot guests here. `vhost-device-vsock` is a vhost-user vsock backend for
//! QEMU that speaks the same host-side protocol, so QEMU/TCG plus this backend runs
//! `hearth-init` exactly as Firecracker would (`hearth.agent=vsock:1024`,
//! `hearth.halt=reboot`) against hearth's own host end ([`AgentLink::Listen`]).
//!
//! One host connection per guest: when the host closes its end of a stream, this backend
//! never tells the guest (no reset), so the guest would not reconnect after a conversation
//! the host closed. Everything a test asks goes over the one connection it accepts.
//!
//! Needs root, the extracted guest kernel (`deploy/install-guest-kernel.sh`), the static
//! init (`deploy/build-guest-init.sh`), QEMU and `vhost-device-vsock`
//! (`deploy/install-deps.sh`); without them every test here says so loudly and returns.
//! Each guest's processes and files carry test-unique names and are removed by a drop
//! guard even when a test fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hearth::guest::config::{GuestConfig, write_config_disk};
use hearth::guest::kit::GuestKit;
use hearth::guest::protocol::{GuestMessage, GuestState, HostMessage};
use hearth::guest::{AGENT_CMDLINE_KEY, AGENT_VSOCK_PORT, HALT_BY_REBOOT_FLAG};
use hearth::vmm::AgentLink;
use hearth::vmm::agent::{AgentConnection, bind_fresh};
use hearth::vmm::logs::tail;
use hearth::vmm::qemu::{escape, kernel_cmdline, tsc_khz};

use support::guest_fixture::busybox_root_image;
use support::guest_prereqs::QEMU;

const BACKEND: &str = "vhost-device-vsock";
/// Marker prefix of every QEMU these tests start (`-name`), for telling them apart in `ps`.
const NAME_PREFIX: &str = "hearthvsocktest-";
/// Guest memory. The vhost-user backend maps guest memory, so it lives in a shared memfd
/// object of exactly this size.
const MEMORY_MIB: u32 = 256;
/// The guest CID the backend gives the device (QEMU's vhost-user vsock device has none).
const GUEST_CID: u32 = 3;
/// From launching QEMU to the guest's first connection: a whole boot under TCG.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(90);
/// From the first connection to Ready, and for each answer after it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// From the guest's shutdown acknowledgement (or its fatal error) to QEMU's exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the backend may take to create its vhost-user socket.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);
/// The kernel's console line when the guest reboots.
const REBOOT_LINE: &str = "reboot: Restarting system";

/// What every test needs, found once per test binary.
struct Fixture {
    kit: GuestKit,
    busybox: PathBuf,
    backend: PathBuf,
}

/// The backend binary: first on `PATH`, then where `deploy/install-deps.sh` puts it.
fn backend() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(BACKEND))
        .chain(std::iter::once(Path::new("/usr/local/bin").join(BACKEND)))
        .find(|p| p.is_file())
}

/// The fixture, or `None` (after a loud message) when a prerequisite is missing.
fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture).as_ref()
}

fn build_fixture() -> Option<Fixture> {
    let skip = |why: String| {
        support::skipped("guest_vsock tests", &why);
        None
    };
    let prereqs = support::guest_prereqs::guest_prereqs("guest_vsock")?;
    let Some(backend) = backend() else {
        return skip(format!(
            "no {BACKEND} in PATH or /usr/local/bin (run deploy/install-deps.sh)"
        ));
    };
    Some(Fixture {
        kit: prereqs.kit,
        busybox: prereqs.busybox,
        backend,
    })
}

/// The guests of this binary boot one at a time: two TCG guests on a small host slow
/// each other down and the boot figures printed here would mean little.
static ONE_GUEST_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One guest: its directory (disks, sockets, logs), its backend and its QEMU. Dropping it
/// kills both processes and removes the directory, whatever state the test left.
struct Guest {
    name: String,
    backend: Option<Child>,
    qemu: Option<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Guest {
    fn drop(&mut self) {
        for child in [self.qemu.as_mut(), self.backend.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The directory goes with `self.dir`, after this.
    }
}

impl Guest {
    /// A guest directory with a root disk (busybox) and a config disk running `command`,
    /// Ready once `ports` listen.
    fn new(fx: &Fixture, tag: &str, command: &[&str], ports: &[u16]) -> Guest {
        let name = format!("{NAME_PREFIX}{}-{tag}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .expect("guest dir");
        let guest = Guest {
            name: name.clone(),
            backend: None,
            qemu: None,
            dir,
        };
        busybox_root_image(&fx.busybox, &guest.path("rootfs"), &guest.path("root.img"));
        let config = GuestConfig {
            machine_id: name.clone(),
            hostname: tag.to_string(),
            network: None,
            command: command.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            workdir: None,
            ports: ports.to_vec(),
            user: None,
            prepared: false,
            overlay_root: false,
        };
        write_config_disk(&guest.path("config.img"), &config).expect("config disk");
        guest
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Where the backend hands the guest's connections to host port `port`.
    fn host_port_socket(&self, port: u32) -> PathBuf {
        self.path(&format!("vsock.sock_{port}"))
    }

    /// Starts the backend and waits for its vhost-user socket (QEMU must find it).
    fn start_backend(&mut self, fx: &Fixture) {
        let vhost = self.path("vhost.sock");
        let log = std::fs::File::create(self.path("backend.log")).expect("backend log");
        let child = Command::new(&fx.backend)
            .arg("--vm")
            .arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                vhost.display(),
                self.path("vsock.sock").display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("backend log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", fx.backend.display()));
        let backend = self.backend.insert(child);
        let deadline = Instant::now() + BACKEND_TIMEOUT;
        while !vhost.exists() {
            if let Ok(Some(status)) = backend.try_wait() {
                panic!(
                    "{BACKEND} exited ({status}) before creating {}\n{}",
                    vhost.display(),
                    diagnostics(self.dir.path())
                );
            }
            assert!(
                Instant::now() < deadline,
                "{BACKEND} did not create {} within {BACKEND_TIMEOUT:?}",
                vhost.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts QEMU the way the QEMU driver does (microvm, TCG, root and config disks, no
    /// network), but with the vhost-user vsock device instead of the virtio-serial agent
    /// port; `extra` is appended to the kernel command line.
    fn start_qemu(&mut self, fx: &Fixture, extra: &str) {
        let args: Vec<String> = vec![
            "-name".into(),
            self.name.clone(),
            "-M".into(),
            "microvm,memory-backend=mem".into(),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            // The guest ends by rebooting (as under Firecracker): that ends QEMU.
            "-no-reboot".into(),
            "-accel".into(),
            "tcg".into(),
            "-cpu".into(),
            "qemu64".into(),
            "-smp".into(),
            "1".into(),
            "-m".into(),
            MEMORY_MIB.to_string(),
            "-kernel".into(),
            fx.kit.vmlinux.to_string_lossy().into_owned(),
            "-initrd".into(),
            fx.kit.initramfs.to_string_lossy().into_owned(),
            "-append".into(),
            format!("{} {extra}", kernel_cmdline(tsc_khz())),
            "-serial".into(),
            format!("file:{}", escape(&self.path("serial.log"))),
            "-drive".into(),
            format!(
                "if=none,id=root,format=raw,file={}",
                escape(&self.path("root.img"))
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-drive".into(),
            format!(
                "if=none,id=config,format=raw,readonly=on,file={}",
                escape(&self.path("config.img"))
            ),
            "-device".into(),
            "virtio-blk-device,drive=config".into(),
            "-chardev".into(),
            format!("socket,id=vs,path={}", escape(&self.path("vhost.sock"))),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vs".into(),
        ];
        let log = std::fs::File::create(self.path("qemu.log")).expect("qemu log");
        let child = Command::new(QEMU)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("qemu log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{QEMU}: {e}"));
        self.qemu = Some(child);
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.path("serial.log")).unwrap_or_default()
    }
}

/// The tails of the guest's logs, for failure messages.
fn diagnostics(dir: &Path) -> String {
    let part = |file: &str| format!("--- {file}:\n{}\n", tail(&dir.join(file), 3000));
    format!(
        "{}{}{}",
        part("serial.log"),
        part("qemu.log"),
        part("backend.log")
    )
}

/// Waits (polling) until `child` exits or `timeout` passes; its status, if it exited.
async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows the conversation until the guest is Ready, failing on any state that means it
/// never will be. Asks once, then relies on the guest's Ready event (sent to a connected
/// host), so no polling.
async fn until_ready(conn: &mut AgentConnection) -> Result<u64, String> {
    let mut state = conn.status().await.map_err(|e| e.to_string())?;
    loop {
        match state {
            GuestState::Ready { boot_ms } => return Ok(boot_ms),
            GuestState::Starting => {}
            other => return Err(format!("guest state {other:?}")),
        }
        state = match conn.recv().await.map_err(|e| e.to_string())? {
            GuestMessage::Ready { boot_ms } => GuestState::Ready { boot_ms },
            GuestMessage::Status { state } => state,
            GuestMessage::Fatal { error } => GuestState::Failed { error },
            other => return Err(format!("guest message {other:?} before Ready")),
        };
    }
}

/// Sends Shutdown and waits for the acknowledgement, skipping other messages.
async fn shutdown(conn: &mut AgentConnection) -> Result<(), String> {
    conn.send(HostMessage::Shutdown)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match conn.recv().await.map_err(|e| e.to_string())? {
            GuestMessage::ShuttingDown => return Ok(()),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_agent_over_vsock_reaches_ready_and_shuts_down_by_reboot() {
    let Some(fx) = fixture() else { return };
    let _turn = ONE_GUEST_AT_A_TIME.lock().await;
    // Ready waits for the port, which opens only after the file is written: so the
    // file's content on the disk after the shutdown is the workload's doing, not a race.
    let mut guest = Guest::new(
        fx,
        "ready",
        &[
            "/bin/sh",
            "-c",
            "echo hello-over-vsock > /tmp/x && exec httpd -f -p 8080",
        ],
        &[8080],
    );
    let dir = guest.dir.path().to_path_buf();
    guest.start_backend(fx);
    // Listening before QEMU starts, so the guest's first connect finds the host.
    let socket = guest.host_port_socket(AGENT_VSOCK_PORT);
    let mut link = AgentLink::Listen {
        listener: Some(bind_fresh(&socket).expect("bind agent socket")),
        path: socket,
    };

    let launched = Instant::now();
    guest.start_qemu(
        fx,
        &format!("{AGENT_CMDLINE_KEY}=vsock:{AGENT_VSOCK_PORT} {HALT_BY_REBOOT_FLAG}"),
    );
    let qemu = guest.qemu.as_mut().expect("qemu started");
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut conn = tokio::select! {
        conn = link.open(deadline) => conn.unwrap_or_else(|e| panic!("{e}\n{}", diagnostics(&dir))),
        status = wait_exit(qemu, CONNECT_TIMEOUT) => panic!(
            "QEMU exited ({status:?}) before the guest connected\n{}", diagnostics(&dir)
        ),
    };
    let connected = launched.elapsed();

    let boot_ms = tokio::time::timeout(ANSWER_TIMEOUT, until_ready(&mut conn))
        .await
        .unwrap_or_else(|_| panic!("not Ready within {ANSWER_TIMEOUT:?}\n{}", diagnostics(&dir)))
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnostics(&dir)));
    let ready = launched.elapsed();
    assert!(boot_ms > 0 && boot_ms < 60_000, "boot_ms {boot_ms}");
    eprintln!(
        "QEMU launch -> guest connected over vsock: {} ms, -> Ready: {} ms (guest boot_ms {boot_ms})",
        connected.as_millis(),
        ready.as_millis()
    );

    // Still the same conversation: the backend would not let the guest reconnect.
    let asked = Instant::now();
    tokio::time::timeout(ANSWER_TIMEOUT, shutdown(&mut conn))
        .await
        .unwrap_or_else(|_| panic!("no ShuttingDown within {ANSWER_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnostics(&dir)));
    let qemu = guest.qemu.as_mut().expect("qemu started");
    let status = wait_exit(qemu, EXIT_TIMEOUT).await.unwrap_or_else(|| {
        panic!(
            "QEMU still runs {EXIT_TIMEOUT:?} after the guest acknowledged the shutdown\n{}",
            diagnostics(&dir)
        )
    });
    eprintln!(
        "Shutdown sent -> QEMU exited: {} ms ({status})",
        asked.elapsed().as_millis()
    );
    assert!(status.success(), "QEMU: {status}\n{}", diagnostics(&dir));
    let serial = guest.serial();
    assert!(
        serial.contains(REBOOT_LINE),
        "no {REBOOT_LINE:?} on the console\n{}",
        diagnostics(&dir)
    );
    assert!(!serial.contains("hearth-init: fatal"), "{serial}");

    // The workload ran in the root disk, and the shutdown synced what it wrote.
    let out = Command::new("debugfs")
        .args(["-R", "cat /tmp/x"])
        .arg(guest.path("root.img"))
        .output()
        .expect("debugfs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello-over-vsock\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_vsock_agent_setting_is_a_fatal_error_naming_it() {
    let Some(fx) = fixture() else { return };
    let _turn = ONE_GUEST_AT_A_TIME.lock().await;
    let mut guest = Guest::new(fx, "badport", &["/bin/sh", "-c", "exec sleep 1000"], &[]);
    let dir = guest.dir.path().to_path_buf();
    guest.start_backend(fx);

    let launched = Instant::now();
    guest.start_qemu(
        fx,
        &format!("{AGENT_CMDLINE_KEY}=vsock:x1 {HALT_BY_REBOOT_FLAG}"),
    );
    let qemu = guest.qemu.as_mut().expect("qemu started");
    let status = wait_exit(qemu, CONNECT_TIMEOUT).await.unwrap_or_else(|| {
        panic!(
            "QEMU still runs {CONNECT_TIMEOUT:?} after launch\n{}",
            diagnostics(&dir)
        )
    });
    eprintln!(
        "QEMU launch -> exit on a malformed {AGENT_CMDLINE_KEY}: {} ms ({status})",
        launched.elapsed().as_millis()
    );
    let serial = guest.serial();
    let fatal = serial
        .lines()
        .find(|l| l.contains("hearth-init: fatal"))
        .unwrap_or_else(|| panic!("no fatal error on the console\n{}", diagnostics(&dir)));
    assert!(
        fatal.contains(&format!("{AGENT_CMDLINE_KEY}=\"vsock:x1\"")),
        "{fatal}"
    );
    assert!(serial.contains(REBOOT_LINE), "{}", diagnostics(&dir));
}
