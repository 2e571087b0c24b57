//! After boot: runs the workload, reaps every process that ends up as the init's child,
//! serves the agent protocol, and carries out a shutdown.
//!
//! A prepared guest (`GuestConfig::prepared`) enters the same loop `Idle`, with no
//! workload; the first `Claim` it receives while `Idle` sets the clock, the entropy and
//! the hostname ([`crate::claim`]) and starts the claim's workload exactly as a normal boot
//! starts the config's, and the guest goes on as `Starting`. A claim in any other state
//! starts nothing and is answered with the state, so a retried claim never starts a
//! second workload.
//!
//! One `poll` loop over a signalfd (`SIGCHLD`, `SIGIO`, `SIGINT`) and the agent channel.
//! It never blocks on the host: the channel is non-blocking and only polled while a host
//! is there (or, over vsock, while a connect is in flight); without one the loop wakes
//! when the agent asks ([`Agent::wake_in`]: the serial re-check, or the next vsock
//! connect attempt every 50 ms).
//!
//! A shutdown starts on the host's `Shutdown` request or on `SIGINT`, which the kernel
//! sends PID 1 for Ctrl-Alt-Del (see [`boot::take_ctrl_alt_del`]; Firecracker's graceful
//! stop presses it); both are handled alike, and a connected host hears `ShuttingDown`.
//! Every process gets `SIGTERM`; once none is left, or after [`WORKLOAD_STOP_GRACE`],
//! the rest get `SIGKILL`; then filesystems are synced, the root is remounted read-only
//! and the machine halts ([`boot::halt`]: power-off, or reboot where the command line
//! asks for it).

use std::convert::Infallible;
use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth::guest::config::GuestConfig;
use hearth::guest::protocol::{Claim, ExitStatus, GuestMessage, GuestState, HostMessage};
use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::agent::Agent;
use crate::boot;
use crate::claim::{self, ClaimError};

/// Where the workload's stdout and stderr go (on the root disk, not the slow console).
pub const WORKLOAD_LOG: &str = "/var/log/hearth-workload.log";
/// `PATH` for a workload whose config sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long processes get between `SIGTERM` and `SIGKILL` at shutdown.
const WORKLOAD_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long killed processes get to be reaped before the halt goes ahead anyway.
const KILL_REAP_LIMIT: Duration = Duration::from_secs(2);

/// Why the loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("signal setup: {0}")]
    Signals(Errno),
    #[error("{0}")]
    Claim(#[from] ClaimError),
}

/// Where a shutdown stands.
enum Shutdown {
    None,
    /// `SIGTERM` sent; `SIGKILL` at the deadline.
    Terminating(Instant),
    /// `SIGKILL` sent; halt at the deadline even if something is left.
    Killing(Instant),
}

/// Starts the workload (a prepared guest: waits for a claim to bring one), reports Ready
/// once its declared ports listen, and serves until shutdown. Never returns except with a
/// setup error or a claim the guest cannot take.
pub fn run(port: &mut Agent, config: &GuestConfig) -> Result<Infallible, SuperviseError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.add(Signal::SIGIO);
    // Already blocked since boot (a Ctrl-Alt-Del during boot waits here); read it too.
    mask.add(Signal::SIGINT);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(SuperviseError::Signals)?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(SuperviseError::Signals)?;

    // The host may have connected before the port was opened.
    port.refresh();
    let (mut state, mut workload, mut readiness) = if config.prepared {
        (GuestState::Idle, None, Readiness::new(&[]))
    } else {
        let (state, workload) = start(port, config);
        (state, workload, Readiness::new(&config.ports))
    };
    let mut shutdown = Shutdown::None;

    loop {
        if matches!(state, GuestState::Starting) && readiness.check() {
            let boot_ms = boot::uptime_ms();
            state = GuestState::Ready { boot_ms };
            port.send(&GuestMessage::Ready { boot_ms });
        }

        // Wake for: the next readiness check, the shutdown deadline, or what the agent
        // needs while no host is connected; otherwise only for a signal or the channel.
        let mut wait = None;
        if matches!(state, GuestState::Starting) {
            wait = Some(readiness.interval());
        }
        if let Some(agent_wait) = port.wake_in() {
            wait = Some(wait.map_or(agent_wait, |w: Duration| w.min(agent_wait)));
        }
        if let Shutdown::Terminating(at) | Shutdown::Killing(at) = shutdown {
            let left = at.saturating_duration_since(Instant::now());
            wait = Some(wait.map_or(left, |w| w.min(left)));
        }
        let timeout = wait
            .map(|w| PollTimeout::try_from(w).unwrap_or(PollTimeout::MAX))
            .unwrap_or(PollTimeout::NONE);
        {
            let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
            if let Some(fd) = port.poll_fd() {
                fds.push(fd);
            }
            // EINTR and friends: just go round again.
            let _ = poll(&mut fds, timeout);
        }
        let mut stop_requested = false;
        while let Ok(Some(info)) = signals.read_signal() {
            stop_requested |= info.ssi_signo == Signal::SIGINT as u32;
        }

        let (exited, children_left) = reap(workload);
        if let Some(status) = exited {
            workload = None;
            state = match state {
                // Not reached: an Idle guest has no workload whose exit this could be.
                GuestState::Idle => GuestState::Idle,
                GuestState::Starting => GuestState::Exited {
                    boot_ms: None,
                    status,
                },
                GuestState::Ready { boot_ms } => GuestState::Exited {
                    boot_ms: Some(boot_ms),
                    status,
                },
                other @ (GuestState::Exited { .. }
                | GuestState::ShuttingDown
                | GuestState::Failed { .. }) => other,
            };
            port.send(&GuestMessage::Exited { status });
        }

        if port.refresh() {
            port.send_state(&state);
        }
        if stop_requested {
            begin_shutdown(port, &mut state, &mut shutdown);
        }
        for msg in port.receive() {
            match msg {
                HostMessage::Status => port.send_state(&state),
                HostMessage::Shutdown => begin_shutdown(port, &mut state, &mut shutdown),
                HostMessage::Claim(c) => {
                    // Only an Idle guest takes a claim (a Shutdown has left Idle).
                    if matches!(state, GuestState::Idle) {
                        let config = take_claim(&c, config)?;
                        (state, workload) = start(port, &config);
                        readiness = Readiness::new(&config.ports);
                    }
                    port.send_state(&state);
                }
            }
        }
        port.flush();

        let now = Instant::now();
        shutdown = match shutdown {
            Shutdown::None => Shutdown::None,
            _ if !children_left => halt(port),
            Shutdown::Terminating(at) if now >= at => {
                let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
                Shutdown::Killing(now + KILL_REAP_LIMIT)
            }
            Shutdown::Killing(at) if now >= at => halt(port),
            other => other,
        };
    }
}

/// Starts `config`'s workload: `Starting` with its pid, or `Exited` (told to the host)
/// when it cannot be started.
fn start(port: &mut Agent, config: &GuestConfig) -> (GuestState, Option<Pid>) {
    match spawn_workload(config) {
        Ok(pid) => (GuestState::Starting, pid),
        Err(status) => {
            port.send(&GuestMessage::Exited { status });
            (
                GuestState::Exited {
                    boot_ms: None,
                    status,
                },
                None,
            )
        }
    }
}

/// Makes the guest the claimed machine (clock, entropy, hostname) and returns the config
/// it would have booted with for the claim's workload. What failed without stopping the
/// claim goes to the workload log.
fn take_claim(c: &Claim, prepared: &GuestConfig) -> Result<GuestConfig, ClaimError> {
    let notes = claim::prepare(c)?;
    if !notes.is_empty()
        && let Some(mut log) = open_log()
    {
        for note in notes {
            let _ = writeln!(log, "hearth-init: {note}");
        }
    }
    Ok(c.workload_config(prepared))
}

/// A stop request (the host's `Shutdown`, or Ctrl-Alt-Del): acknowledged with
/// `ShuttingDown` every time; the first one sends `SIGTERM` to every process and starts
/// the grace period.
fn begin_shutdown(port: &mut Agent, state: &mut GuestState, shutdown: &mut Shutdown) {
    port.send(&GuestMessage::ShuttingDown);
    if matches!(shutdown, Shutdown::None) {
        *state = GuestState::ShuttingDown;
        // -1: every process except the init itself.
        let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
        *shutdown = Shutdown::Terminating(Instant::now() + WORKLOAD_STOP_GRACE);
    }
}

/// Whether the workload listens on all its declared ports, checked with a backoff so a
/// workload that never listens does not keep the guest busy.
struct Readiness {
    ports: Vec<u16>,
    interval: Duration,
    since: Instant,
}

impl Readiness {
    const FIRST: Duration = Duration::from_millis(1);
    /// The longest pause between checks while the workload is young: most workloads
    /// listen within their first second, and a claim's latency is mostly this wait.
    const QUICK: Duration = Duration::from_millis(8);
    /// How long the workload counts as young.
    const YOUNG: Duration = Duration::from_secs(2);
    const LONGEST: Duration = Duration::from_millis(250);

    fn new(ports: &[u16]) -> Readiness {
        // Each port once: a claim's list is as long as the host made it.
        let mut ports = ports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        Readiness {
            ports,
            interval: Self::FIRST,
            since: Instant::now(),
        }
    }

    /// True when every declared port has a listener (always true with none declared).
    fn check(&mut self) -> bool {
        if self.ports.is_empty() {
            return true;
        }
        let listening = listening_ports();
        self.ports.iter().all(|p| listening.contains(p))
    }

    /// How long to wait before the next check; grows by half each time, up to
    /// [`Self::QUICK`] while the workload is young and [`Self::LONGEST`] after.
    fn interval(&mut self) -> Duration {
        let now = self.interval;
        let ceiling = if self.since.elapsed() < Self::YOUNG {
            Self::QUICK
        } else {
            Self::LONGEST
        };
        self.interval = (self.interval * 3 / 2).min(ceiling);
        now.min(ceiling)
    }
}

/// TCP ports in LISTEN state, from `/proc/net/tcp` and `/proc/net/tcp6` (the kernel's
/// socket tables for this network namespace).
fn listening_ports() -> Vec<u16> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|t| fs::read_to_string(t).ok())
        .flat_map(|text| parse_listening(&text))
        .collect()
}

/// The LISTEN ports of one `/proc/net/tcp*` table.
fn parse_listening(table: &str) -> Vec<u16> {
    const LISTEN: &str = "0A";
    let mut ports = Vec::new();
    for line in table.lines().skip(1) {
        // sl local_address rem_address st ...; local_address is ADDR:PORT in hex.
        let mut cols = line.split_whitespace();
        let (Some(local), Some(st)) = (cols.nth(1), cols.nth(1)) else {
            continue;
        };
        if st != LISTEN {
            continue;
        }
        if let Some(port) = local
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
        {
            ports.push(port);
        }
    }
    ports
}

/// Reaps every finished child. Returns the workload's status if it was among them, and
/// whether any child is left.
fn reap(workload: Option<Pid>) -> (Option<ExitStatus>, bool) {
    let mut exited = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if Some(pid) == workload => {
                exited = Some(ExitStatus::Code(code));
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if Some(pid) == workload => {
                exited = Some(ExitStatus::Signal(sig as i32));
            }
            Ok(WaitStatus::StillAlive) => return (exited, true),
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            // ECHILD: no children at all.
            Err(_) => return (exited, false),
        }
    }
}

/// Starts the workload in its own process group with its environment and working
/// directory, output appended to [`WORKLOAD_LOG`]. `Ok(None)`: no command configured.
/// A command that cannot be started counts as exited with 127 (not found) or 126 (any
/// other reason), like a shell reports it; the reason goes to the log.
fn spawn_workload(config: &GuestConfig) -> Result<Option<Pid>, ExitStatus> {
    let Some((program, args)) = config.command.split_first() else {
        return Ok(None);
    };
    let mut log = open_log();
    let identity = match config.user.as_deref().map(|u| {
        crate::user::resolve(
            u,
            &fs::read_to_string("/etc/passwd").unwrap_or_default(),
            &fs::read_to_string("/etc/group").unwrap_or_default(),
        )
    }) {
        None => None,
        Some(Ok(identity)) => Some(identity),
        Some(Err(e)) => {
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "hearth-init: cannot start {program:?}: {e}");
            }
            return Err(ExitStatus::Code(126));
        }
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(config.env.iter().map(|(k, v)| (k, v)));
    if !config.env.iter().any(|(k, _)| k == "PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if let Some(id) = identity {
        if let Some(home) = &id.home
            && !config.env.iter().any(|(k, _)| k == "HOME")
        {
            cmd.env("HOME", home);
        }
        let groups: Vec<libc::gid_t> = id.groups.clone();
        // SAFETY: runs in the forked child before exec and only makes the three
        // async-signal-safe calls that drop to the workload's identity, groups first
        // (only root may set them) and the uid last.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(id.gid) != 0
                    || libc::setuid(id.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.current_dir(config.workdir.as_deref().unwrap_or("/"))
        .stdin(Stdio::null())
        .process_group(0);
    match &log {
        Some(f) => {
            let (out, err) = (f.try_clone(), f.try_clone());
            cmd.stdout(out.map(Stdio::from).unwrap_or_else(|_| Stdio::null()))
                .stderr(err.map(Stdio::from).unwrap_or_else(|_| Stdio::null()));
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    match cmd.spawn() {
        // The Child handle is dropped: the loop reaps by pid with waitpid.
        Ok(child) => Ok(Some(Pid::from_raw(child.id() as i32))),
        Err(e) => {
            if let Some(mut f) = log {
                let _ = writeln!(f, "hearth-init: cannot start {program:?}: {e}");
            }
            Err(ExitStatus::Code(
                if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                },
            ))
        }
    }
}

fn open_log() -> Option<fs::File> {
    if let Some(dir) = std::path::Path::new(WORKLOAD_LOG).parent() {
        let _ = fs::create_dir_all(dir);
    }
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(WORKLOAD_LOG)
        .ok()
}

/// Final step of a shutdown: tell the host, flush the disk, halt the machine.
fn halt(port: &mut Agent) -> ! {
    port.drain(Duration::from_millis(100));
    nix::unistd::sync();
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    boot::halt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_ports_come_from_listen_rows_only() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
";
        assert_eq!(parse_listening(tcp), vec![80]);
        let tcp6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 0
";
        assert_eq!(parse_listening(tcp6), vec![8080]);
        assert!(parse_listening("").is_empty());
    }

    #[test]
    fn readiness_backs_off_to_a_ceiling() {
        let mut r = Readiness::new(&[80]);
        let first = r.interval();
        let mut last = first;
        for _ in 0..50 {
            last = r.interval();
        }
        assert_eq!(first, Readiness::FIRST);
        assert_eq!(last, Readiness::QUICK, "a young workload is checked often");
        r.since = Instant::now() - Readiness::YOUNG;
        for _ in 0..50 {
            last = r.interval();
        }
        assert_eq!(last, Readiness::LONGEST);
        assert!(Readiness::new(&[]).check());
    }
}
