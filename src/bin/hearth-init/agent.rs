//! The guest end of the agent port (a virtio-serial port named `hearth.agent`).
//!
//! What the kernel does while no host is connected to the port's chardev: `poll` reports
//! `POLLHUP` at once, a blocking `write` blocks until a host connects and a `read` returns
//! 0. So the port is opened non-blocking and only polled while a host is connected;
//! connection changes are learned from `SIGIO` (the driver signals the owner of an
//! `O_ASYNC` port when the host side opens or closes), with a periodic re-check as a
//! safety net. Nothing is queued for an absent host: the host asks for the full state
//! after every connect, and the init also sends it unasked when it sees a host arrive.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth::guest::protocol::{
    AGENT_PORT_NAME, GuestMessage, GuestState, HostMessage, LineSplitter, decode_line, encode_line,
};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Most bytes kept for a host that does not read; beyond it the oldest are dropped (the
/// host re-asks for the state anyway).
const MAX_OUTBOX: usize = 64 * 1024;

/// Why the agent port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no virtio-serial port named {AGENT_PORT_NAME} appeared")]
    NotFound,
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: fcntl {what}: {source}")]
    Fcntl {
        path: PathBuf,
        what: &'static str,
        source: Errno,
    },
}

/// Waits for the port named [`AGENT_PORT_NAME`] and returns its device node. The name
/// arrives from the host in a control message after the port itself, so the port can
/// exist briefly without one.
pub fn find_port(deadline: Instant) -> Result<PathBuf, AgentError> {
    loop {
        if let Ok(rd) = fs::read_dir("/sys/class/virtio-ports") {
            for ent in rd.flatten() {
                let name = fs::read_to_string(ent.path().join("name")).unwrap_or_default();
                let dev = Path::new("/dev").join(ent.file_name());
                if name.trim_end() == AGENT_PORT_NAME && dev.exists() {
                    return Ok(dev);
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(AgentError::NotFound);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The open port and what is known about the host's side.
pub struct Agent {
    file: fs::File,
    connected: bool,
    lines: LineSplitter,
    outbox: Vec<u8>,
}

impl Agent {
    /// Opens the port non-blocking with `SIGIO` delivery to this process.
    pub fn open(path: &Path) -> Result<Agent, AgentError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| AgentError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let fcntl_err = |what| {
            let path = path.to_path_buf();
            move |source| AgentError::Fcntl { path, what, source }
        };
        // SAFETY: F_SETOWN takes an integer argument and touches no memory.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETOWN, libc::getpid()) };
        Errno::result(r).map_err(fcntl_err("F_SETOWN"))?;
        let flags = fcntl(&file, FcntlArg::F_GETFL).map_err(fcntl_err("F_GETFL"))?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK | OFlag::O_ASYNC;
        fcntl(&file, FcntlArg::F_SETFL(flags)).map_err(fcntl_err("F_SETFL"))?;
        let mut agent = Agent {
            file,
            connected: false,
            lines: LineSplitter::default(),
            outbox: Vec::new(),
        };
        agent.connected = agent.host_connected();
        Ok(agent)
    }

    /// The port's descriptor, for the poll loop.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// What to poll the port for; none while no host is connected (it would report
    /// `POLLHUP` at once, forever).
    pub fn interest(&self) -> Option<PollFlags> {
        self.connected.then(|| {
            if self.outbox.is_empty() {
                PollFlags::POLLIN
            } else {
                PollFlags::POLLIN | PollFlags::POLLOUT
            }
        })
    }

    /// Whether a host is connected now (no `POLLHUP`).
    fn host_connected(&self) -> bool {
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => !fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
            Err(_) => self.connected,
        }
    }

    /// Whether a host is connected; re-checked. Returns true when one has just connected
    /// (the caller then sends the state unasked).
    pub fn refresh(&mut self) -> bool {
        let now = self.host_connected();
        let arrived = now && !self.connected;
        if !now {
            self.lost_host();
        }
        self.connected = now;
        arrived
    }

    fn lost_host(&mut self) {
        self.connected = false;
        self.lines.clear();
        self.outbox.clear();
    }

    /// Queues a message for the connected host and tries to write it at once. Without a
    /// host the message is dropped.
    pub fn send(&mut self, msg: &GuestMessage) {
        if !self.connected {
            return;
        }
        self.outbox.extend_from_slice(&encode_line(msg));
        if self.outbox.len() > MAX_OUTBOX {
            let excess = self.outbox.len() - MAX_OUTBOX;
            self.outbox.drain(..excess);
        }
        self.flush();
    }

    /// Writes as much of the outbox as the port takes without blocking.
    pub fn flush(&mut self) {
        while self.connected && !self.outbox.is_empty() {
            match self.file.write(&self.outbox) {
                Ok(0) => break,
                Ok(n) => {
                    self.outbox.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // Full queue, or the host just left: find out which.
                    if !self.host_connected() {
                        self.lost_host();
                    }
                    break;
                }
                Err(_) => {
                    self.lost_host();
                    break;
                }
            }
        }
    }

    /// Reads what the host sent; messages that do not parse are ignored (the host
    /// retries what it needs).
    pub fn receive(&mut self) -> Vec<HostMessage> {
        let mut buf = [0u8; 4096];
        while self.connected {
            match self.file.read(&mut buf) {
                // EOF: the host side closed.
                Ok(0) => self.lost_host(),
                Ok(n) => self.lines.push(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let mut msgs = Vec::new();
        while let Some(line) = self.lines.next_line() {
            if let Ok(Ok(msg)) = line.map(|l| decode_line::<HostMessage>(&l)) {
                msgs.push(msg);
            }
        }
        msgs
    }

    /// Sends the state as a `Status` message.
    pub fn send_state(&mut self, state: &GuestState) {
        self.send(&GuestMessage::Status {
            state: state.clone(),
        });
    }

    /// Pushes out what is queued, waiting at most `limit` for the port to take it. Used
    /// right before power-off.
    pub fn drain(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        while self.connected && !self.outbox.is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::ZERO);
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLOUT)];
            if poll(&mut fds, timeout).is_err() {
                break;
            }
            self.flush();
        }
    }

    /// Best-effort report of a fatal error: a `Fatal` message and the `Failed` state.
    pub fn report_fatal(&mut self, error: &str) {
        self.connected = self.host_connected();
        self.send(&GuestMessage::Fatal {
            error: error.to_string(),
        });
        self.send_state(&GuestState::Failed {
            error: error.to_string(),
        });
        self.drain(Duration::from_millis(200));
    }
}
