//! The QEMU `microvm` driver.
//!
//! Files in the machine directory:
//! ```text
//! <workdir>/qmp.sock     QMP control socket (QEMU listens)
//! <workdir>/agent.sock   guest agent port, bridged to virtio-serial `hearth.agent`
//! <workdir>/serial.log   the guest's serial console (kernel and init errors)
//! <workdir>/vmm.log      QEMU's own stdout and stderr (appended across launches)
//! ```
//! Why these flags: `microvm` with `-nodefaults` has no PCI, firmware or legacy devices to
//! emulate, and an uncompressed ELF kernel boots through its PVH entry point without
//! firmware. Virtio devices sit on virtio-mmio and are found through ACPI (the Debian
//! kernel cannot take them from the command line). Under TCG the guest needs
//! `tsc_early_khz` (it hangs after "Marking TSC unstable" otherwise); `panic=-1` with
//! `-no-reboot` makes a guest kernel panic end the QEMU process instead of leaving it
//! running. Plain `-M microvm` (without `x-option-roms=off`) works on QEMU 7 and 10 alike.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

use super::accel::{Accel, probe_accel};
use super::agent;
use super::logs::tail;
use super::qmp::Qmp;
use super::spawn::{self, Children, DetachedCommand};
use super::stopping::{self, VmmStage};
use super::{
    ControlError, LaunchError, LaunchSpec, Liveness, RunState, StopError, StopOutcome, VmmProcess,
    pidfd, procfs,
};

use super::{DEFAULT_NAME_PREFIX, SERIAL_SOCKET, VMM_LOG};

/// The QMP socket in the machine directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// The agent socket in the machine directory.
pub const AGENT_SOCKET: &str = "agent.sock";
/// Name recorded in [`VmmProcess::driver`].
pub const DRIVER_NAME: &str = "qemu";

/// How long QEMU may take until QMP answers (measured: ~60 ms).
const CONTROL_DEADLINE: Duration = Duration::from_secs(10);
/// Pause between QMP connection attempts during start.
const CONTROL_RETRY: Duration = Duration::from_millis(5);
/// How long QMP `quit` may take to be sent and answered.
const QUIT_LIMIT: Duration = Duration::from_secs(2);
/// How long QEMU may take to exit after `quit`, and after SIGKILL.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// How much of QEMU's log a launch error carries.
const LOG_TAIL: usize = 2048;

/// The QEMU driver.
pub struct QemuDriver {
    binary: PathBuf,
    cache_dir: PathBuf,
    name_prefix: String,
    /// A fixed accelerator, or none to probe per guest kernel.
    forced_accel: Option<Accel>,
    /// Probe answers by kit id; a tokio mutex so concurrent first launches wait for one
    /// probe instead of booting several.
    probed: tokio::sync::Mutex<HashMap<String, Accel>>,
    /// Processes this daemon started and has not reaped yet.
    children: Children,
}

impl QemuDriver {
    /// A driver running `binary`, caching the accelerator probe in `cache_dir`.
    pub fn new(binary: PathBuf, cache_dir: PathBuf) -> QemuDriver {
        QemuDriver {
            binary,
            cache_dir,
            name_prefix: DEFAULT_NAME_PREFIX.to_string(),
            forced_accel: None,
            probed: tokio::sync::Mutex::new(HashMap::new()),
            children: Children::default(),
        }
    }

    /// Uses another marker prefix (two daemons on one host must not see each other's
    /// VMMs as their own).
    pub fn with_name_prefix(mut self, prefix: &str) -> QemuDriver {
        self.name_prefix = prefix.to_string();
        self
    }

    /// Uses `accel` without probing.
    pub fn with_accel(mut self, accel: Accel) -> QemuDriver {
        self.forced_accel = Some(accel);
        self
    }

    /// The marker prefix.
    pub fn name_prefix(&self) -> &str {
        &self.name_prefix
    }

    /// The accelerator for `kit`: forced, or probed once per kernel (see
    /// [`probe_accel`]).
    pub async fn accel_for(&self, kit: &crate::guest::kit::GuestKit) -> Accel {
        if let Some(a) = self.forced_accel {
            return a;
        }
        let mut probed = self.probed.lock().await;
        if let Some(a) = probed.get(&kit.kernel_version) {
            return *a;
        }
        let a = probe_accel(&self.binary, kit, &self.cache_dir).await;
        probed.insert(kit.kernel_version.clone(), a);
        a
    }

    /// See [`super::VmmDriver::launch`].
    pub async fn launch(&self, spec: &LaunchSpec) -> Result<VmmProcess, LaunchError> {
        let workdir = &spec.workdir;
        let workdir_err = |path: &Path| {
            let machine_id = spec.machine_id.clone();
            let path = path.to_path_buf();
            move |source| LaunchError::Workdir {
                machine_id,
                path,
                source,
            }
        };
        // Adopt a VMM that already runs for this machine (a crash after the spawn, or a
        // launch repeated after a daemon restart).
        if let Some(process) = self.adoptable(spec) {
            self.wait_control(spec, &process).await?;
            return Ok(process);
        }

        fs::create_dir_all(workdir).map_err(workdir_err(workdir))?;
        for stale in [QMP_SOCKET, AGENT_SOCKET, SERIAL_SOCKET] {
            spawn::remove_stale(&spec.machine_id, &workdir.join(stale))?;
        }
        let accel = self.accel_for(&spec.kit).await;
        let args = build_args(spec, accel, tsc_khz(), &self.name_prefix);
        if let Some(id) = spec.confine.run_as {
            spawn::hand_over(
                &spec.machine_id,
                workdir,
                spec.base_disk.as_deref(),
                id.uid,
                id.gid,
            )?;
        }
        let pid = self.children.spawn(DetachedCommand {
            machine_id: &spec.machine_id,
            binary: &self.binary,
            args,
            workdir,
            netns: spec.netns.as_deref(),
            log: workdir.join(VMM_LOG),
            confine: &spec.confine,
            // Handed over as a descriptor: an unprivileged QEMU cannot attach by name.
            tap: spec.tap.as_ref().map(|t| t.name.as_str()),
        })?;
        let process = VmmProcess {
            driver: DRIVER_NAME.to_string(),
            pid,
            start_time: procfs::stat(pid).map(|s| s.start_time).unwrap_or(0),
            boot_id: procfs::boot_id(),
            control_socket: workdir.join(QMP_SOCKET),
            agent_socket: workdir.join(AGENT_SOCKET),
        };
        self.wait_control(spec, &process).await?;
        Ok(process)
    }

    /// The running VMM of this machine, if any (the oldest, should there be several).
    fn adoptable(&self, spec: &LaunchSpec) -> Option<VmmProcess> {
        VmmProcess::find_running(
            &self.name_prefix,
            &spec.machine_id,
            DRIVER_NAME,
            spec.workdir.join(QMP_SOCKET),
            spec.workdir.join(AGENT_SOCKET),
        )
    }

    /// Waits until QMP answers `query-status`, failing early if the process ends.
    async fn wait_control(
        &self,
        spec: &LaunchSpec,
        process: &VmmProcess,
    ) -> Result<(), LaunchError> {
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
                    log: tail(&spec.workdir.join(VMM_LOG), LOG_TAIL),
                });
            }
            let attempt = tokio::time::timeout(CONTROL_DEADLINE, async {
                let mut qmp = Qmp::connect(&process.control_socket).await?;
                qmp.execute("query-status").await
            })
            .await;
            let last_error = match attempt {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no reply".to_string(),
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

    /// See [`super::VmmDriver::run_state`] (QMP `query-status`).
    pub async fn run_state(&self, process: &VmmProcess) -> Result<RunState, ControlError> {
        let reply = self.qmp(process, "query-status").await?;
        let status = reply
            .get("status")
            .and_then(|s| s.as_str())
            .unwrap_or_default();
        Ok(match status {
            "running" => RunState::Running,
            "prelaunch" => RunState::NotStarted,
            _ => RunState::Paused,
        })
    }

    /// Pauses (QMP `stop`) or resumes (`cont`). Idempotent.
    pub async fn set_running(
        &self,
        process: &VmmProcess,
        running: bool,
    ) -> Result<(), ControlError> {
        self.qmp(process, if running { "cont" } else { "stop" })
            .await
            .map(|_| ())
    }

    async fn qmp(
        &self,
        process: &VmmProcess,
        command: &str,
    ) -> Result<serde_json::Value, ControlError> {
        let fail = |e: String| ControlError::Api {
            message: format!("QMP {command} on {}: {e}", process.control_socket.display()),
        };
        let run = async {
            let mut qmp = Qmp::connect(&process.control_socket).await?;
            qmp.execute(command).await
        };
        match tokio::time::timeout(QUIT_LIMIT, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(fail("no answer".into())),
        }
    }

    /// See [`super::VmmDriver::stop`].
    pub async fn stop(
        &self,
        process: &VmmProcess,
        grace: Duration,
    ) -> Result<StopOutcome, StopError> {
        // QEMU's own way is `quit`: the guest gets no say; its disk sees what it had
        // written.
        let quit = async {
            let _ = tokio::time::timeout(QUIT_LIMIT, async {
                let mut qmp = Qmp::connect(&process.control_socket).await?;
                qmp.execute("quit").await
            })
            .await;
        };
        stopping::stop(
            process,
            grace,
            agent::AgentLink::for_process(process),
            &self.children,
            VmmStage {
                request: quit,
                wait: EXIT_WAIT,
                graceful: false,
            },
        )
        .await
    }
}

/// A path as a QEMU option value: commas are doubled (QEMU's escape inside `a=b,c=d`).
pub fn escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// How QEMU names `path`: relative to its working directory (the machine directory,
/// entered by the daemon as root before QEMU takes its own uid) when the file lies in
/// it, so the VMM never needs to search the machine directory's ancestors. A data dir
/// under a private parent (`mktemp -d`, a home directory) works as any other.
pub fn vmm_path(workdir: &Path, path: &Path) -> String {
    match path.strip_prefix(workdir) {
        Ok(rest) if !rest.as_os_str().is_empty() => escape(&Path::new(".").join(rest)),
        _ => escape(path),
    }
}

/// The host's TSC frequency in kHz, for the guest's `tsc_early_khz` (read once).
pub fn tsc_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
        parse_cpu_khz(&cpuinfo)
    })
}

/// The first "cpu MHz" of `/proc/cpuinfo`, in kHz.
fn parse_cpu_khz(cpuinfo: &str) -> Option<u64> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|mhz| *mhz > 0.0)
        .map(|mhz| (mhz * 1000.0).round() as u64)
}

/// The kernel command line: serial console, exit on panic, little console output (each
/// console line costs milliseconds under TCG), no crypto self-tests at algorithm
/// registration (they cost ~0.3 s of a ~1.3 s kernel boot under TCG and only re-check the
/// kernel's own implementations), and the TSC frequency.
pub fn kernel_cmdline(tsc_khz: Option<u64>) -> String {
    let mut line = String::from("console=ttyS0 panic=-1 quiet cryptomgr.notests");
    if let Some(khz) = tsc_khz {
        line.push_str(&format!(" tsc_early_khz={khz}"));
    }
    line
}

/// QEMU's arguments for `spec`.
pub fn build_args(
    spec: &LaunchSpec,
    accel: Accel,
    tsc_khz: Option<u64>,
    name_prefix: &str,
) -> Vec<OsString> {
    let workdir = &spec.workdir;
    let mut a: Vec<String> = vec![
        procfs::MARKER_FLAG.into(),
        format!("{name_prefix}{}", spec.machine_id),
        "-M".into(),
        "microvm".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        // seccomp: no spawning, no privilege changes, no obsolete or scheduling calls.
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-accel".into(),
        accel.qemu_name().into(),
        "-cpu".into(),
        match accel {
            Accel::Kvm => "host".into(),
            Accel::Tcg => "qemu64".into(),
        },
        "-smp".into(),
        spec.vcpus.max(1).to_string(),
        "-m".into(),
        spec.memory_mib.to_string(),
        "-kernel".into(),
        spec.kit.vmlinux.to_string_lossy().into_owned(),
        "-initrd".into(),
        spec.kit.initramfs.to_string_lossy().into_owned(),
        "-append".into(),
        kernel_cmdline(tsc_khz),
        // The console goes to a socket, drained by the daemon into a capped log; while
        // nobody drains it, QEMU drops the output (see `vmm::logs`).
        "-chardev".into(),
        format!(
            "socket,id=console,path={},server=on,wait=off",
            vmm_path(workdir, &workdir.join(SERIAL_SOCKET))
        ),
        "-serial".into(),
        "chardev:console".into(),
        "-drive".into(),
        format!(
            "if=none,id=root,format=raw,file={}",
            vmm_path(workdir, &spec.root_disk)
        ),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
        "-drive".into(),
        format!(
            "if=none,id=config,format=raw,readonly=on,file={}",
            vmm_path(workdir, &spec.config_disk)
        ),
        "-device".into(),
        "virtio-blk-device,drive=config".into(),
    ];
    // The shared base: read-only to QEMU (opened O_RDONLY, shared lock) and to the guest
    // (the device says so, which is how the guest tells it from the writable layer).
    if let Some(base) = &spec.base_disk {
        a.extend([
            "-drive".into(),
            format!(
                "if=none,id=base,format=raw,readonly=on,file={}",
                vmm_path(workdir, base)
            ),
            "-device".into(),
            "virtio-blk-device,drive=base".into(),
        ]);
    }
    if let Some(tap) = &spec.tap {
        let m = tap.mac;
        a.extend([
            "-netdev".into(),
            format!("tap,id=net0,fd={},vhost=off", spawn::TAP_FD),
            "-device".into(),
            format!(
                "virtio-net-device,netdev=net0,mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
        ]);
    }
    a.extend([
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            vmm_path(workdir, &workdir.join(AGENT_SOCKET))
        ),
        "-device".into(),
        format!(
            "virtserialport,chardev=agent,name={}",
            crate::guest::protocol::AGENT_PORT_NAME
        ),
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            vmm_path(workdir, &workdir.join(QMP_SOCKET))
        ),
    ]);
    a.into_iter().map(OsString::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::kit::GuestKit;
    use crate::vmm::TapSpec;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            machine_id: "m1".into(),
            workdir: "/var/lib/hearth/machines/m1".into(),
            netns: Some("hth-m1".into()),
            tap: Some(TapSpec {
                name: "tap0".into(),
                mac: [0x52, 0x54, 0, 0xab, 0x0c, 1],
            }),
            vcpus: 1,
            memory_mib: 128,
            kit: GuestKit {
                vmlinux: "/cache/k/vmlinux".into(),
                initramfs: "/cache/k/initramfs.cpio".into(),
                kernel_version: "6.1".into(),
                id: "k".into(),
            },
            root_disk: "/var/lib/hearth/machines/m1/root,1.img".into(),
            base_disk: None,
            config_disk: "/var/lib/hearth/machines/m1/config.img".into(),
            confine: Default::default(),
        }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn an_overlay_root_attaches_the_base_read_only() {
        let line = joined(&build_args(&spec(), Accel::Tcg, None, "hearth-"));
        assert!(!line.contains("id=base"), "{line}");
        let mut overlay = spec();
        overlay.base_disk = Some("/var/lib/hearth/machines/m1/base.ext4".into());
        let line = joined(&build_args(&overlay, Accel::Tcg, None, "hearth-"));
        assert!(
            line.contains("-drive if=none,id=base,format=raw,readonly=on,file=./base.ext4 -device virtio-blk-device,drive=base"),
            "{line}"
        );
        assert!(
            line.contains("id=root,format=raw,file=./root,,1.img"),
            "{line}"
        );
    }

    #[test]
    fn args_carry_marker_devices_and_escaped_paths() {
        let args = build_args(&spec(), Accel::Tcg, Some(2_596_126), "hearth-");
        let line = joined(&args);
        assert!(line.starts_with("-name hearth-m1 -M microvm"), "{line}");
        assert!(line.contains("-accel tcg -cpu qemu64"), "{line}");
        assert!(line.contains("tsc_early_khz=2596126"), "{line}");
        assert!(line.contains("panic=-1"), "{line}");
        assert!(line.contains("cryptomgr.notests"), "{line}");
        assert!(line.contains("file=./root,,1.img"), "{line}");
        assert!(line.contains("readonly=on,file=./config.img"), "{line}");
        // Nothing of the machine directory is named by its absolute path: QEMU, as its
        // own uid, never searches the data dir's ancestors.
        assert!(!line.contains("/var/lib/hearth"), "{line}");
        assert!(line.contains("path=./serial.sock,server=on"), "{line}");
        assert!(line.contains("tap,id=net0,fd=3,vhost=off"), "{line}");
        assert!(
            line.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{line}"
        );
        assert!(line.contains("mac=52:54:00:ab:0c:01"), "{line}");
        assert!(line.contains("name=hearth.agent"), "{line}");
        assert!(
            line.contains("unix:./qmp.sock,server=on,wait=off"),
            "{line}"
        );
        // The marker is one whole argument, which is what the process scan matches.
        let strings: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(procfs::marker_id(&strings, "hearth-"), Some("m1"));
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_no_tap_means_no_nic() {
        let mut s = spec();
        s.tap = None;
        let line = joined(&build_args(&s, Accel::Kvm, None, "x-"));
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
        assert!(!line.contains("-netdev"), "{line}");
        assert!(!line.contains("tsc_early_khz"), "{line}");
    }

    #[test]
    fn cpu_khz_parses_cpuinfo() {
        assert_eq!(
            parse_cpu_khz("processor\t: 0\ncpu MHz\t\t: 2596.126\n"),
            Some(2_596_126)
        );
        assert_eq!(parse_cpu_khz("processor\t: 0\n"), None);
    }
}
