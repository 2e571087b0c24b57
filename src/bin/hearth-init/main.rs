//! hearth-init: PID 1 of every hearth guest.
//!
//! It turns a bare kernel into a machine running its workload: takes over Ctrl-Alt-Del,
//! mounts the kernel filesystems, loads the virtio modules from the initramfs, opens the
//! agent channel the kernel command line names (virtio-serial port, or vsock), finds the
//! config disk and the root disk, switches into the root disk, sets the hostname and the
//! network, reports Ready to the host and runs the workload, then serves the agent
//! protocol until the host asks it to shut down (or Ctrl-Alt-Del is pressed). A prepared
//! guest (`GuestConfig::prepared`) stops after the network, reports Idle and runs the
//! workload a host's claim brings ([`claim`], [`supervise`]).
//!
//! **Invariant: it never exits.** PID 1 exiting panics the kernel. Every error, and every
//! panic, ends in [`fatal`]: the error goes to the agent channel (if open) and the
//! console, then the machine halts (power-off, or a reboot when the command line says
//! so: see [`boot::halt`]). Console writes cost milliseconds under TCG, so the console is
//! used for fatal errors only.
//!
//! Deliberately small: no async runtime, one `poll` loop ([`supervise`]).

mod agent;
mod boot;
mod claim;
mod cmdline;
mod console;
mod disks;
mod net;
mod supervise;
mod user;

use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use hearth::guest::{INITRAMFS_MODULE_DIR, PROBE_CMDLINE_FLAG, PROBE_READY_LINE};

/// How long the devices the host attached may take to appear after their modules load.
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// Most characters of a fatal error shown on the console and sent to the host (it may
/// quote what the host sent).
const MAX_ERROR_CHARS: usize = 4096;

fn main() {
    let mut port: Option<agent::Agent> = None;
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| run(&mut port)));
    let error = match outcome {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(never)) => match never {},
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            format!("panic: {what}")
        }
    };
    fatal(port.as_mut(), &error)
}

/// Why the boot failed; each variant names the step.
#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error("early mounts: {0}")]
    Mount(#[from] boot::BootError),
    #[error("{0}")]
    Cmdline(#[from] cmdline::CmdlineError),
    #[error("agent channel: {0}")]
    Agent(#[from] agent::AgentError),
    #[error("disks: {0}")]
    Disks(#[from] disks::DiskError),
    #[error("network: {0}")]
    Net(#[from] net::NetError),
    #[error("supervisor: {0}")]
    Supervise(#[from] supervise::SuperviseError),
    #[error("hostname {hostname}: {source}")]
    Hostname {
        hostname: String,
        source: nix::errno::Errno,
    },
}

/// The boot, in order; returns only by error (the last step never returns).
fn run(port: &mut Option<agent::Agent>) -> Result<std::convert::Infallible, InitError> {
    boot::take_ctrl_alt_del()?;
    boot::mount_early()?;
    if boot::cmdline_has(PROBE_CMDLINE_FLAG) {
        console::line(PROBE_READY_LINE);
        boot::halt();
    }
    let transport = cmdline::agent_transport(&boot::cmdline().unwrap_or_default())?;
    boot::load_modules(&std::path::Path::new("/").join(INITRAMFS_MODULE_DIR))?;
    let deadline = Instant::now() + DEVICE_WAIT;
    // The agent channel first, so that every later failure reaches the host.
    let port = port.insert(agent::Agent::open(transport, deadline)?);
    let found = disks::find(deadline)?;
    boot::switch_root(&found.root)?;
    let config = found.config;
    // A prepared guest's is a placeholder until its claim names the machine.
    nix::unistd::sethostname(&config.hostname).map_err(|source| InitError::Hostname {
        hostname: console::shown(&config.hostname),
        source,
    })?;
    net::configure(config.network.as_ref(), deadline)?;
    Ok(supervise::run(port, &config)?)
}

/// Reports a fatal error wherever it can be seen, then halts the machine.
fn fatal(port: Option<&mut agent::Agent>, error: &str) -> ! {
    let error = console::bounded(error, MAX_ERROR_CHARS);
    console::line(&format!("hearth-init: fatal: {error}"));
    if let Some(port) = port {
        port.report_fatal(&error);
    }
    boot::halt()
}
