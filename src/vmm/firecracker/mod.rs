//! The Firecracker driver: the production VMM, behind the same contract as QEMU.
//!
//! A machine's Firecracker is configured entirely through its API socket (never a config
//! file), so every setting hearth makes is one [`api::Request`] whose shape is checked
//! against Firecracker's specification. Files, relative to the directory the VMM sees
//! (the machine directory, or the jail's root in jailer mode, see [`jailer`]):
//! ```text
//! firecracker.sock     API socket (Firecracker listens; a stale one makes it exit)
//! vsock.sock           hybrid vsock: host-initiated connections (Firecracker listens)
//! vsock.sock_1024      guest-initiated connections to port 1024: the guest agent
//!                      (hearth listens, before InstanceStart and whenever it asks)
//! firecracker.log      Firecracker's log (PUT /logger); metrics.json (PUT /metrics)
//! serial.log           the guest's serial console (PUT /serial)
//! vmm.log              Firecracker's stdout and stderr
//! snapshots/<name>/    state + memory of a snapshot
//! ```
//! Start: spawn (own session, inside the machine's network namespace), wait until
//! `GET /` answers, configure (logger, metrics, serial, machine, boot source, drives,
//! network, vsock), bind the agent listener, `InstanceStart`. A process found with the
//! machine's marker (`--id <prefix><machine id>`) is adopted when it has started its
//! guest; one still "Not started" was cut off mid-configuration and is replaced, since
//! what it was told is unknown.
//!
//! Stop: the agent's Shutdown (the guest stops its workload, syncs and reboots, which
//! ends Firecracker with `reboot=k`), then `SendCtrlAltDel` (the init treats it as a
//! shutdown request), then SIGKILL.

pub mod api;
pub mod client;
pub mod jailer;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::time::Instant;

use self::api::{
    ActionType, BootSource, Drive, InstanceActionInfo, InstanceInfo, InstanceState, LogLevel,
    Logger, MachineConfiguration, MemoryBackend, MemoryBackendType, Metrics, NetworkInterface,
    Request, SerialDevice, SnapshotCreateParams, SnapshotLoadParams, SnapshotType, Vm, VmState,
    Vsock, mac_string,
};
use self::client::{ApiClient, ApiError};
use self::jailer::JailerSettings;
use super::agent::{self, AgentLink};
use super::logs::tail;
use super::spawn::{self, Children, DetachedCommand};
use super::stopping::{self, VmmStage};
use super::{
    ControlError, GuestReady, LaunchError, LaunchSpec, Liveness, ReadyError, Snapshot, StopError,
    StopOutcome, VmmProcess, pidfd, procfs,
};
use crate::guest::{AGENT_CMDLINE_KEY, AGENT_VSOCK_PORT, HALT_BY_REBOOT_FLAG};

/// Name recorded in [`VmmProcess::driver`].
pub const DRIVER_NAME: &str = "firecracker";
/// The API socket.
pub const API_SOCKET: &str = "firecracker.sock";
/// The hybrid vsock's host socket.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Firecracker's log file.
pub const FC_LOG: &str = "firecracker.log";
/// Firecracker's metrics file.
pub const METRICS_FILE: &str = "metrics.json";
/// Where snapshots are written, under the VMM's directory.
pub const SNAPSHOT_DIR: &str = "snapshots";
/// The guest's vsock context id (each Firecracker has its own vsock device: one CID for
/// all machines is fine).
pub const GUEST_CID: u32 = 3;
/// The network interface's id.
const IFACE_ID: &str = "eth0";

/// How long Firecracker may take until its API answers (measured: a few ms).
const CONTROL_DEADLINE: Duration = Duration::from_secs(10);
/// Pause between API connection attempts during start.
const CONTROL_RETRY: Duration = Duration::from_millis(2);
/// How long the guest gets to react to Ctrl-Alt-Del.
const CTRL_ALT_DEL_WAIT: Duration = Duration::from_secs(2);
/// How long Firecracker may take to exit after SIGKILL.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// How much of a log an error carries.
const LOG_TAIL: usize = 2048;

/// The agent socket of a VMM directory: `<vsock uds>_<port>`.
pub fn agent_socket(dir: &Path) -> PathBuf {
    dir.join(format!("{VSOCK_SOCKET}_{AGENT_VSOCK_PORT}"))
}

/// The kernel command line under Firecracker: serial console, reboot through the
/// keyboard controller (Firecracker exits when the guest reboots), reboot on panic, no
/// PCI probing, quiet console, and the guest init told to use vsock and to halt by
/// reboot.
pub fn kernel_cmdline() -> String {
    format!(
        "console=ttyS0 reboot=k panic=1 pci=off quiet cryptomgr.notests \
         {AGENT_CMDLINE_KEY}=vsock:{AGENT_VSOCK_PORT} {HALT_BY_REBOOT_FLAG}"
    )
}

/// The Firecracker driver.
pub struct FirecrackerDriver {
    binary: PathBuf,
    name_prefix: String,
    jailer: Option<JailerSettings>,
    children: Children,
    /// Agent listeners bound before `InstanceStart`, waiting for the readiness wait.
    agent_listeners: Mutex<HashMap<PathBuf, UnixListener>>,
}

/// Where a VMM's files are: on the host, and as the VMM names them (the same directory
/// without a jail; `/` inside one).
#[derive(Debug, Clone)]
pub struct Layout {
    /// The directory on the host.
    pub host_dir: PathBuf,
    /// The same directory as the VMM sees it.
    pub vmm_dir: PathBuf,
}

impl Layout {
    /// A file's host path.
    pub fn host(&self, name: &str) -> PathBuf {
        self.host_dir.join(name)
    }

    /// A file's path as the VMM is told it.
    pub fn vmm(&self, name: &str) -> String {
        self.vmm_dir.join(name).to_string_lossy().into_owned()
    }
}

impl FirecrackerDriver {
    /// A driver running `binary` directly (no jail).
    pub fn new(binary: PathBuf) -> FirecrackerDriver {
        FirecrackerDriver {
            binary,
            name_prefix: crate::vmm::DEFAULT_NAME_PREFIX.to_string(),
            jailer: None,
            children: Children::default(),
            agent_listeners: Mutex::new(HashMap::new()),
        }
    }

    /// Uses another marker prefix. Firecracker accepts only `[A-Za-z0-9-]` in ids.
    pub fn with_name_prefix(mut self, prefix: &str) -> FirecrackerDriver {
        self.name_prefix = prefix.to_string();
        self
    }

    /// Starts every VMM through the jailer.
    pub fn with_jailer(mut self, jailer: JailerSettings) -> FirecrackerDriver {
        self.jailer = Some(jailer);
        self
    }

    /// The marker prefix.
    pub fn name_prefix(&self) -> &str {
        &self.name_prefix
    }

    /// The instance id of a machine (the marker).
    pub fn instance_id(&self, machine_id: &str) -> String {
        format!("{}{machine_id}", self.name_prefix)
    }

    /// The file layout for a machine directory.
    pub fn layout(&self, spec: &LaunchSpec) -> Layout {
        match &self.jailer {
            Some(j) => Layout {
                host_dir: j.chroot_root(
                    &spec.workdir,
                    &self.binary,
                    &self.instance_id(&spec.machine_id),
                ),
                vmm_dir: PathBuf::from("/"),
            },
            None => Layout {
                host_dir: spec.workdir.clone(),
                vmm_dir: spec.workdir.clone(),
            },
        }
    }

    /// See [`super::VmmDriver::launch`].
    pub async fn launch(&self, spec: &LaunchSpec) -> Result<VmmProcess, LaunchError> {
        let layout = self.layout(spec);
        let setup = self.configuration(spec, &layout);
        let go = Request::Action(InstanceActionInfo {
            action_type: ActionType::InstanceStart,
        });
        self.start(spec, &layout, setup, go).await
    }

    /// The process of this machine, adopted when its guest runs; else a fresh one that
    /// gets `setup`, then the agent's listener, then `go` (`InstanceStart` or a snapshot
    /// load). A process that was cut off before `go` (still "Not started") is replaced:
    /// what it was told is unknown. A fresh process that fails any of it is killed, so a
    /// retry starts clean.
    async fn start(
        &self,
        spec: &LaunchSpec,
        layout: &Layout,
        setup: Vec<Request>,
        go: Request,
    ) -> Result<VmmProcess, LaunchError> {
        if let Some(process) = self.adoptable(spec, layout) {
            let api = ApiClient::new(&process.control_socket);
            match self.wait_api(spec, &process, &api).await {
                Ok(info) if info.state != InstanceState::NotStarted => return Ok(process),
                _ => self.kill(&process).await,
            }
        }
        let process = self.spawn_fresh(spec, layout)?;
        let api = ApiClient::new(&process.control_socket);
        let started = async {
            self.wait_api(spec, &process, &api).await?;
            for req in setup {
                self.call(spec, &api, req).await?;
            }
            // The agent listens before the guest can run (see the module header).
            let listener = agent::bind_fresh(&process.agent_socket).map_err(|source| {
                LaunchError::Workdir {
                    machine_id: spec.machine_id.clone(),
                    path: process.agent_socket.clone(),
                    source,
                }
            })?;
            lock(&self.agent_listeners).insert(process.agent_socket.clone(), listener);
            self.call(spec, &api, go).await
        };
        match started.await {
            Ok(_) => Ok(process),
            Err(e) => {
                self.kill(&process).await;
                lock(&self.agent_listeners).remove(&process.agent_socket);
                Err(e)
            }
        }
    }

    /// Starts a fresh process (stale sockets removed first).
    fn spawn_fresh(&self, spec: &LaunchSpec, layout: &Layout) -> Result<VmmProcess, LaunchError> {
        let workdir_err = |path: &Path| {
            let machine_id = spec.machine_id.clone();
            let path = path.to_path_buf();
            move |source| LaunchError::Workdir {
                machine_id,
                path,
                source,
            }
        };
        fs::create_dir_all(&spec.workdir).map_err(workdir_err(&spec.workdir))?;
        let id = self.instance_id(&spec.machine_id);
        let (binary, args, netns) = match &self.jailer {
            Some(j) => {
                j.prepare(spec, layout, &self.binary, &id)?;
                (
                    j.binary.clone(),
                    j.args(spec, &self.binary, &id, API_SOCKET),
                    None,
                )
            }
            None => {
                fs::create_dir_all(&layout.host_dir).map_err(workdir_err(&layout.host_dir))?;
                (
                    self.binary.clone(),
                    vec![
                        OsString::from("--api-sock"),
                        layout.host(API_SOCKET).into_os_string(),
                        OsString::from("--id"),
                        OsString::from(&id),
                    ],
                    spec.netns.as_deref(),
                )
            }
        };
        for stale in [API_SOCKET, VSOCK_SOCKET] {
            spawn::remove_stale(&spec.machine_id, &layout.host(stale))?;
        }
        spawn::remove_stale(&spec.machine_id, &agent_socket(&layout.host_dir))?;
        // Firecracker opens its log and metrics files, it does not create them.
        for file in [FC_LOG, METRICS_FILE, crate::vmm::SERIAL_LOG] {
            let path = layout.host(file);
            // In the jail, which its VMM can write: nothing there is followed.
            crate::vmmdir::VmmDir::parent_of(&path)
                .and_then(|(dir, name)| super::logs::open_append(&dir, &name))
                .map_err(workdir_err(&path))?;
            if let Some(j) = &self.jailer {
                j.give(spec, &path)?;
            }
        }
        // The cgroup is joined before exec; the identity is the jailer's business (it
        // drops to its uid after building the jail), and Firecracker opens its tap by
        // name.
        let confine = crate::vmm::Confinement {
            cgroup_procs: spec.confine.cgroup_procs.clone(),
            cgroup_path: spec.confine.cgroup_path.clone(),
            run_as: None,
        };
        let pid = self.children.spawn(DetachedCommand {
            machine_id: &spec.machine_id,
            binary: &binary,
            args,
            workdir: &spec.workdir,
            netns,
            log: spec.workdir.join(crate::vmm::VMM_LOG),
            confine: &confine,
            tap: None,
        })?;
        Ok(VmmProcess {
            driver: DRIVER_NAME.to_string(),
            pid,
            start_time: procfs::stat(pid).map(|s| s.start_time).unwrap_or(0),
            boot_id: procfs::boot_id(),
            control_socket: layout.host(API_SOCKET),
            agent_socket: agent_socket(&layout.host_dir),
        })
    }

    /// Everything before `InstanceStart`, in Firecracker's order of dependence.
    pub fn configuration(&self, spec: &LaunchSpec, layout: &Layout) -> Vec<Request> {
        let (kernel, initrd, root, config, base) = match &self.jailer {
            Some(_) => (
                layout.vmm(jailer::KERNEL),
                layout.vmm(jailer::INITRD),
                layout.vmm(jailer::ROOT_DISK),
                layout.vmm(jailer::CONFIG_DISK),
                spec.base_disk
                    .as_ref()
                    .map(|_| layout.vmm(jailer::BASE_DISK)),
            ),
            None => (
                path_string(&spec.kit.vmlinux),
                path_string(&spec.kit.initramfs),
                path_string(&spec.root_disk),
                path_string(&spec.config_disk),
                spec.base_disk.as_deref().map(path_string),
            ),
        };
        let mut requests = observability(layout);
        requests.extend([
            Request::Serial(SerialDevice {
                serial_out_path: layout.vmm(crate::vmm::SERIAL_LOG),
            }),
            Request::MachineConfig(MachineConfiguration {
                vcpu_count: spec.vcpus.max(1),
                mem_size_mib: spec.memory_mib,
                smt: None,
                track_dirty_pages: None,
            }),
            Request::BootSource(BootSource {
                kernel_image_path: kernel,
                initrd_path: Some(initrd),
                boot_args: Some(kernel_cmdline()),
            }),
            Request::Drive(Drive {
                drive_id: "root".into(),
                path_on_host: root,
                is_root_device: false,
                is_read_only: false,
            }),
            Request::Drive(Drive {
                drive_id: "config".into(),
                path_on_host: config,
                is_root_device: false,
                is_read_only: true,
            }),
        ]);
        // The shared base, read-only (the guest tells it from the writable layer so).
        if let Some(base) = base {
            requests.push(Request::Drive(Drive {
                drive_id: "base".into(),
                path_on_host: base,
                is_root_device: false,
                is_read_only: true,
            }));
        }
        if let Some(tap) = &spec.tap {
            requests.push(Request::NetworkInterface(NetworkInterface {
                iface_id: IFACE_ID.into(),
                host_dev_name: tap.name.clone(),
                guest_mac: Some(mac_string(tap.mac)),
            }));
        }
        requests.push(Request::Vsock(Vsock {
            guest_cid: GUEST_CID,
            uds_path: layout.vmm(VSOCK_SOCKET),
        }));
        requests
    }

    /// One API call during start; a refusal becomes a launch error with Firecracker's
    /// `fault_message`.
    async fn call(
        &self,
        spec: &LaunchSpec,
        api: &ApiClient,
        req: Request,
    ) -> Result<hyper::body::Bytes, LaunchError> {
        api.send(&req).await.map_err(|source| LaunchError::Api {
            machine_id: spec.machine_id.clone(),
            message: source.to_string(),
        })
    }

    /// The running Firecracker of this machine, if any (the oldest, should there be
    /// several).
    fn adoptable(&self, spec: &LaunchSpec, layout: &Layout) -> Option<VmmProcess> {
        VmmProcess::find_running(
            &self.name_prefix,
            &spec.machine_id,
            DRIVER_NAME,
            layout.host(API_SOCKET),
            agent_socket(&layout.host_dir),
        )
    }

    /// Waits until `GET /` answers, failing early if the process ends.
    async fn wait_api(
        &self,
        spec: &LaunchSpec,
        process: &VmmProcess,
        api: &ApiClient,
    ) -> Result<InstanceInfo, LaunchError> {
        let start = Instant::now();
        loop {
            if pidfd::liveness(process) == Liveness::Gone {
                self.children.reaped(process.pid).await;
                return Err(LaunchError::Exited {
                    machine_id: spec.machine_id.clone(),
                    status: self
                        .children
                        .exit_of(process.pid)
                        .unwrap_or_else(|| "exit status unknown".to_string()),
                    log: tail(&spec.workdir.join(crate::vmm::VMM_LOG), LOG_TAIL),
                });
            }
            let last_error = match api.get::<InstanceInfo>(&Request::DescribeInstance).await {
                Ok(info) => return Ok(info),
                Err(e) => e.to_string(),
            };
            if start.elapsed() >= CONTROL_DEADLINE {
                return Err(LaunchError::ControlTimeout {
                    machine_id: spec.machine_id.clone(),
                    path: process.control_socket.clone(),
                    after: CONTROL_DEADLINE,
                    last_error,
                });
            }
            tokio::time::sleep(CONTROL_RETRY).await;
        }
    }

    /// SIGKILLs a process and waits for it to go. Idempotent.
    async fn kill(&self, process: &VmmProcess) {
        if let Some(fd) = pidfd::open_verified(process)
            && let Ok(fd) = pidfd::watch(fd)
        {
            let _ = pidfd::kill(&fd);
            let _ = pidfd::exited_within(&fd, EXIT_WAIT).await;
        }
        self.children.reaped(process.pid).await;
    }

    /// The agent link of a process: the listener bound at launch if it is still waiting,
    /// else a fresh one.
    pub fn agent_link(&self, process: &VmmProcess) -> AgentLink {
        let listener = lock(&self.agent_listeners).remove(&process.agent_socket);
        AgentLink::Listen {
            path: process.agent_socket.clone(),
            listener,
        }
    }

    /// See [`super::VmmDriver::wait_ready`].
    pub async fn wait_ready(
        &self,
        process: &VmmProcess,
        timeout: Duration,
    ) -> Result<GuestReady, ReadyError> {
        agent::wait_ready(process, self.agent_link(process), timeout).await
    }

    /// The instance state (`GET /`).
    pub async fn instance_state(
        &self,
        process: &VmmProcess,
    ) -> Result<InstanceState, ControlError> {
        let info: InstanceInfo = ApiClient::new(&process.control_socket)
            .get(&Request::DescribeInstance)
            .await
            .map_err(control_error)?;
        Ok(info.state)
    }

    /// Pauses (`PATCH /vm` Paused). Idempotent: pausing a paused machine succeeds.
    pub async fn pause(&self, process: &VmmProcess) -> Result<(), ControlError> {
        self.set_vm_state(process, VmState::Paused).await
    }

    /// Resumes (`PATCH /vm` Resumed). Idempotent.
    pub async fn resume(&self, process: &VmmProcess) -> Result<(), ControlError> {
        self.set_vm_state(process, VmState::Resumed).await
    }

    async fn set_vm_state(&self, process: &VmmProcess, state: VmState) -> Result<(), ControlError> {
        ApiClient::new(&process.control_socket)
            .send(&Request::Vm(Vm { state }))
            .await
            .map(|_| ())
            .map_err(control_error)
    }

    /// Writes a full snapshot of a paused machine to `snapshots/<name>/` in its VMM
    /// directory. Idempotent: the files are rewritten.
    pub async fn snapshot(
        &self,
        process: &VmmProcess,
        name: &str,
    ) -> Result<Snapshot, ControlError> {
        let Some(host_dir) = process.workdir() else {
            return Err(ControlError::Unsupported {
                driver: DRIVER_NAME.into(),
                operation: "snapshot of a process without a directory".into(),
            });
        };
        let jailed = self.jailer.is_some();
        let layout = Layout {
            host_dir: host_dir.to_path_buf(),
            vmm_dir: if jailed {
                PathBuf::from("/")
            } else {
                host_dir.to_path_buf()
            },
        };
        let rel = Path::new(SNAPSHOT_DIR).join(name);
        // In the VMM's directory: made without following anything there, and in jailer
        // mode handed to the jail's identity.
        let io = |path: PathBuf| move |source| ControlError::Io { path, source };
        let top =
            crate::vmmdir::VmmDir::open(&layout.host_dir).map_err(io(layout.host_dir.clone()))?;
        match &self.jailer {
            Some(j) => {
                let snapshots = j.give_dir(&top, SNAPSHOT_DIR)?;
                j.give_dir(&snapshots, name)?;
            }
            None => {
                top.make_dir(SNAPSHOT_DIR)
                    .and_then(|s| s.make_dir(name))
                    .map_err(io(layout.host_dir.join(&rel)))?;
            }
        }
        let state = rel.join("state");
        let memory = rel.join("memory");
        ApiClient::new(&process.control_socket)
            .send(&Request::SnapshotCreate(SnapshotCreateParams {
                snapshot_path: layout.vmm(&state.to_string_lossy()),
                mem_file_path: layout.vmm(&memory.to_string_lossy()),
                snapshot_type: Some(SnapshotType::Full),
            }))
            .await
            .map_err(control_error)?;
        Ok(Snapshot {
            state: layout.host_dir.join(state),
            memory: layout.host_dir.join(memory),
        })
    }

    /// Starts a fresh process for `spec` and loads `snapshot` into it (paused unless
    /// `resume`). The snapshot must come from this machine's directory: the disks and
    /// sockets it names are this machine's. Idempotent like [`FirecrackerDriver::launch`]:
    /// a process of this machine that already runs a guest is adopted.
    pub async fn restore(
        &self,
        spec: &LaunchSpec,
        snapshot: &Snapshot,
        resume: bool,
    ) -> Result<VmmProcess, LaunchError> {
        let layout = self.layout(spec);
        let vmm_path = |p: &Path| match p.strip_prefix(&layout.host_dir) {
            Ok(rel) => layout.vmm(&rel.to_string_lossy()),
            Err(_) => path_string(p),
        };
        // Only the logger and metrics may precede a load.
        let go = Request::SnapshotLoad(SnapshotLoadParams {
            snapshot_path: vmm_path(&snapshot.state),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: vmm_path(&snapshot.memory),
            },
            resume_vm: resume,
            network_overrides: Vec::new(),
            vsock_override: None,
        });
        self.start(spec, &layout, observability(&layout), go).await
    }

    /// See [`super::VmmDriver::stop`].
    pub async fn stop(
        &self,
        process: &VmmProcess,
        grace: Duration,
    ) -> Result<StopOutcome, StopError> {
        let outcome = self.stop_process(process, grace).await;
        if outcome.is_ok() {
            self.forget(process);
        }
        outcome
    }

    async fn stop_process(
        &self,
        process: &VmmProcess,
        grace: Duration,
    ) -> Result<StopOutcome, StopError> {
        // Firecracker's own way is Ctrl-Alt-Del: the init takes it as a shutdown request.
        let ctrl_alt_del = async {
            let _ = ApiClient::new(&process.control_socket)
                .send(&Request::Action(InstanceActionInfo {
                    action_type: ActionType::SendCtrlAltDel,
                }))
                .await;
        };
        stopping::stop(
            process,
            grace,
            self.agent_link(process),
            &self.children,
            VmmStage {
                request: ctrl_alt_del,
                wait: CTRL_ALT_DEL_WAIT.min(grace),
                graceful: true,
            },
        )
        .await
    }

    /// Removes what a stopped process leaves: its sockets, and in jailer mode its
    /// cgroup. Idempotent. (The machine directory, jail included, is the disk step's.)
    fn forget(&self, process: &VmmProcess) {
        lock(&self.agent_listeners).remove(&process.agent_socket);
        if let Some(dir) = process.workdir() {
            for name in [API_SOCKET, VSOCK_SOCKET] {
                let _ = crate::vmmdir::remove(&dir.join(name));
            }
            let _ = crate::vmmdir::remove(&process.agent_socket);
        }
        if let Some(j) = &self.jailer
            && let Some(id) = instance_id_of(process, &self.name_prefix)
        {
            j.remove_cgroup(&id);
        }
    }
}

/// The logger and metrics requests (the only ones allowed before a snapshot load).
fn observability(layout: &Layout) -> Vec<Request> {
    vec![
        Request::Logger(Logger {
            log_path: layout.vmm(FC_LOG),
            level: LogLevel::Warning,
            show_level: true,
            show_log_origin: false,
        }),
        Request::Metrics(Metrics {
            metrics_path: layout.vmm(METRICS_FILE),
        }),
    ]
}

/// The instance id a recorded process was started with, from its jail path
/// (`.../<exec name>/<id>/root/firecracker.sock`).
fn instance_id_of(process: &VmmProcess, prefix: &str) -> Option<String> {
    let root = process.control_socket.parent()?;
    let id = root.parent()?.file_name()?.to_str()?;
    id.starts_with(prefix).then(|| id.to_string())
}

fn control_error(e: ApiError) -> ControlError {
    ControlError::Api {
        message: e.to_string(),
    }
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single inserts and removes: a poisoned map is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_line_selects_vsock_and_reboot() {
        let line = kernel_cmdline();
        assert!(line.contains("hearth.agent=vsock:1024"), "{line}");
        assert!(line.contains("hearth.halt=reboot"), "{line}");
        assert!(line.contains("reboot=k"), "{line}");
        assert!(!line.contains("tsc_early_khz"), "{line}");
    }

    fn spec(dir: &Path) -> LaunchSpec {
        LaunchSpec {
            machine_id: "abc".into(),
            workdir: dir.to_path_buf(),
            netns: Some("hth-abc".into()),
            tap: Some(crate::vmm::TapSpec {
                name: "tap0".into(),
                mac: [6, 0, 0xac, 0x10, 0, 2],
            }),
            vcpus: 2,
            memory_mib: 256,
            kit: crate::guest::kit::GuestKit {
                vmlinux: "/cache/vmlinux".into(),
                initramfs: "/cache/initramfs.cpio".into(),
                kernel_version: "6.1".into(),
                id: "k".into(),
            },
            root_disk: dir.join("root.img"),
            base_disk: None,
            config_disk: dir.join("config.img"),
            confine: Default::default(),
        }
    }

    #[test]
    fn the_configuration_comes_in_dependence_order_with_host_paths() {
        let d = FirecrackerDriver::new("/opt/firecracker".into());
        let sp = spec(Path::new("/m/abc"));
        let reqs = d.configuration(&sp, &d.layout(&sp));
        let order: Vec<String> = reqs.iter().map(Request::describe).collect();
        assert_eq!(
            order,
            [
                "PUT /logger",
                "PUT /metrics",
                "PUT /serial",
                "PUT /machine-config",
                "PUT /boot-source",
                "PUT /drives/root",
                "PUT /drives/config",
                "PUT /network-interfaces/eth0",
                "PUT /vsock",
            ]
        );
        let boot = reqs[4].body().unwrap();
        assert_eq!(boot["kernel_image_path"], "/cache/vmlinux");
        assert!(
            boot["boot_args"]
                .as_str()
                .unwrap()
                .contains("hearth.agent=vsock:1024")
        );
        assert_eq!(reqs[7].body().unwrap()["guest_mac"], "06:00:ac:10:00:02");
        assert_eq!(reqs[8].body().unwrap()["uds_path"], "/m/abc/vsock.sock");
        assert_eq!(reqs[6].body().unwrap()["is_read_only"], true);
    }

    #[test]
    fn an_overlay_root_adds_the_base_as_a_read_only_drive() {
        let d = FirecrackerDriver::new("/opt/firecracker".into());
        let mut sp = spec(Path::new("/m/abc"));
        sp.base_disk = Some(PathBuf::from("/m/abc/base.ext4"));
        let reqs = d.configuration(&sp, &d.layout(&sp));
        let base = reqs
            .iter()
            .find(|r| r.describe() == "PUT /drives/base")
            .expect("a base drive");
        let body = base.body().unwrap();
        assert_eq!(body["path_on_host"], "/m/abc/base.ext4");
        assert_eq!(body["is_read_only"], true);
        assert_eq!(body["is_root_device"], false);
        // Jailed, it is the link inside the jail.
        let jailed =
            FirecrackerDriver::new("/opt/firecracker".into()).with_jailer(JailerSettings {
                binary: "/opt/jailer".into(),
                uid: 1,
                gid: 1,
                cgroups: vec![],
                cgroup_version: 2,
                parent_cgroup: "hearth".into(),
                release_cgroup: true,
            });
        let reqs = jailed.configuration(&sp, &jailed.layout(&sp));
        let base = reqs
            .iter()
            .find(|r| r.describe() == "PUT /drives/base")
            .expect("a jailed base drive");
        assert_eq!(base.body().unwrap()["path_on_host"], "/base.img");
    }

    #[test]
    fn a_jailed_configuration_names_paths_inside_the_jail() {
        let d = FirecrackerDriver::new("/opt/firecracker".into()).with_jailer(JailerSettings {
            binary: "/opt/jailer".into(),
            uid: 1,
            gid: 1,
            cgroups: vec![],
            cgroup_version: 2,
            parent_cgroup: "hearth".into(),
            release_cgroup: true,
        });
        let sp = spec(Path::new("/m/abc"));
        let layout = d.layout(&sp);
        assert_eq!(
            layout.host_dir,
            PathBuf::from("/m/abc/jail/firecracker/hearth-abc/root")
        );
        let reqs = d.configuration(&sp, &layout);
        assert_eq!(reqs[0].body().unwrap()["log_path"], "/firecracker.log");
        assert_eq!(reqs[4].body().unwrap()["kernel_image_path"], "/vmlinux");
        assert_eq!(reqs[5].body().unwrap()["path_on_host"], "/root.img");
        assert_eq!(reqs[8].body().unwrap()["uds_path"], "/vsock.sock");
    }

    #[test]
    fn the_agent_socket_is_the_vsock_path_and_port() {
        assert_eq!(
            agent_socket(Path::new("/m/1")),
            PathBuf::from("/m/1/vsock.sock_1024")
        );
    }

    #[test]
    fn the_instance_id_is_found_in_a_jail_path() {
        let p = VmmProcess {
            driver: DRIVER_NAME.into(),
            pid: 1,
            start_time: 1,
            boot_id: String::new(),
            control_socket: "/m/jail/firecracker/hearth-abc/root/firecracker.sock".into(),
            agent_socket: "/m/jail/firecracker/hearth-abc/root/vsock.sock_1024".into(),
        };
        assert_eq!(instance_id_of(&p, "hearth-").as_deref(), Some("hearth-abc"));
        assert_eq!(instance_id_of(&p, "other-"), None);
    }
}
