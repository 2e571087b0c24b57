//! The guest end of the agent protocol, over either transport the host may offer:
//! a virtio-serial port named `hearth.agent` (QEMU, [`serial`]) or a vsock stream the
//! init opens to the host (Firecracker, [`vsock`]); the kernel command line chooses
//! (see [`crate::cmdline::agent_transport`]).
//!
//! Both behave the same above this module: "a host is connected" means the serial
//! port's host side is open, or a vsock stream is up. Nothing is queued for an absent
//! host: the host asks for the full state after every connect, and the init also sends
//! it unasked once per connection ([`Agent::refresh`] says when). Neither transport ever
//! blocks the init's poll loop: the descriptors are non-blocking, and while no host is
//! there the loop only wakes at [`Agent::wake_in`] (the serial re-check, or the next
//! vsock connect attempt).

mod serial;
mod vsock;

use std::io::ErrorKind;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hearth::guest::protocol::{
    AGENT_PORT_NAME, GuestMessage, GuestState, HostMessage, LineSplitter, decode_line, encode_line,
};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::cmdline::AgentTransport;

/// Most bytes kept for a host that does not read; beyond it the oldest are dropped (the
/// host re-asks for the state anyway).
const MAX_OUTBOX: usize = 64 * 1024;
/// How long a fatal report waits for a vsock host to accept a stream: the daemon
/// listens during boot, so a failing boot is usually heard.
const FATAL_CONNECT_WAIT: Duration = Duration::from_millis(300);

/// Why the agent channel could not be opened.
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

/// The channel under the protocol.
enum Link {
    Serial(serial::SerialPort),
    Vsock(vsock::VsockLink),
}

/// The agent channel and what is known about the host's side.
pub struct Agent {
    link: Link,
    /// Whether the current connection has been told the state (see [`Agent::refresh`]).
    greeted: bool,
    lines: LineSplitter,
    outbox: Vec<u8>,
}

impl Agent {
    /// Opens the channel the command line chose. Serial: waits until `deadline` for the
    /// port to appear and opens it non-blocking with `SIGIO` delivery to this process.
    /// Vsock: starts the first connect and returns at once.
    pub fn open(transport: AgentTransport, deadline: Instant) -> Result<Agent, AgentError> {
        let link = match transport {
            AgentTransport::Serial => {
                Link::Serial(serial::SerialPort::open(&serial::find_port(deadline)?)?)
            }
            AgentTransport::Vsock { port } => Link::Vsock(vsock::VsockLink::new(port)),
        };
        Ok(Agent {
            link,
            greeted: false,
            lines: LineSplitter::for_messages::<HostMessage>(),
            outbox: Vec::new(),
        })
    }

    fn connected(&self) -> bool {
        match &self.link {
            Link::Serial(s) => s.connected(),
            Link::Vsock(v) => v.connected(),
        }
    }

    /// What the poll loop must watch: the port or stream while a host is connected
    /// (for writing too while something is queued), a vsock connect in flight; nothing
    /// otherwise (an absent serial host would report `POLLHUP` at once, forever).
    pub fn poll_fd(&self) -> Option<PollFd<'_>> {
        let want_write = !self.outbox.is_empty();
        match &self.link {
            Link::Serial(s) => s.pollable().map(|fd| {
                let flags = if want_write {
                    PollFlags::POLLIN | PollFlags::POLLOUT
                } else {
                    PollFlags::POLLIN
                };
                PollFd::new(fd, flags)
            }),
            Link::Vsock(v) => v
                .pollable(want_write)
                .map(|(fd, flags)| PollFd::new(fd, flags)),
        }
    }

    /// How long the poll loop may sleep at most for the sake of the connection; `None`
    /// while a host is connected (then the descriptor wakes it).
    pub fn wake_in(&self) -> Option<Duration> {
        match &self.link {
            Link::Serial(s) => s.wake_in(),
            Link::Vsock(v) => v.wake_in(Instant::now()),
        }
    }

    /// Brings the connection up to date without blocking (serial: re-checks the host
    /// side; vsock: starts a due connect attempt or learns how one ended). Returns true
    /// once per connection, the first time it is seen up: the caller then sends the state
    /// unasked.
    pub fn refresh(&mut self) -> bool {
        match &mut self.link {
            Link::Serial(s) => s.refresh(),
            Link::Vsock(v) => v.refresh(Instant::now()),
        }
        if !self.connected() {
            self.forget_host();
            return false;
        }
        !std::mem::replace(&mut self.greeted, true)
    }

    /// The host is gone: its stream is closed (vsock) and whatever was half read or
    /// still queued is dropped.
    fn lost_host(&mut self) {
        match &mut self.link {
            Link::Serial(s) => s.lose(),
            Link::Vsock(v) => v.lose(Instant::now()),
        }
        self.forget_host();
    }

    fn forget_host(&mut self) {
        self.greeted = false;
        self.lines.clear();
        self.outbox.clear();
    }

    /// Queues a message for the connected host and tries to write it at once. Without a
    /// host the message is dropped.
    pub fn send(&mut self, msg: &GuestMessage) {
        if !self.connected() {
            return;
        }
        self.outbox.extend_from_slice(&encode_line(msg));
        if self.outbox.len() > MAX_OUTBOX {
            let excess = self.outbox.len() - MAX_OUTBOX;
            self.outbox.drain(..excess);
        }
        self.flush();
    }

    /// Writes as much of the outbox as the channel takes without blocking.
    pub fn flush(&mut self) {
        while self.connected() && !self.outbox.is_empty() {
            let written = match &mut self.link {
                Link::Serial(s) => s.write(&self.outbox),
                Link::Vsock(v) => v.write(&self.outbox),
            };
            match written {
                Ok(0) => break,
                Ok(n) => {
                    self.outbox.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // Full queue, or (serial) the host just left: find out which. A
                    // vsock stream that broke shows up as EOF or an error on read.
                    if let Link::Serial(s) = &self.link
                        && !s.host_connected()
                    {
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
        while self.connected() {
            let read = match &mut self.link {
                Link::Serial(s) => s.read(&mut buf),
                Link::Vsock(v) => v.read(&mut buf),
            };
            match read {
                // EOF: the host side closed.
                Ok(0) => self.lost_host(),
                Ok(n) => self.lines.push(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // A serial port's other errors leave the host to the next re-check; a
                // vsock stream with an error is dead.
                Err(_) => match self.link {
                    Link::Serial(_) => break,
                    Link::Vsock(_) => self.lost_host(),
                },
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

    /// Pushes out what is queued, waiting at most `limit` for the channel to take it.
    /// Used right before the machine halts.
    pub fn drain(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        while self.connected() && !self.outbox.is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::ZERO);
            {
                let Some(fd) = self.poll_fd() else { break };
                if poll(&mut [fd], timeout).is_err() {
                    break;
                }
            }
            self.flush();
        }
    }

    /// Waits at most `limit` for a connection to come up (a vsock connect that is due or
    /// in flight); the serial port is only re-checked once.
    fn await_host(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        loop {
            self.refresh();
            if self.connected() || matches!(self.link, Link::Serial(_)) {
                return;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let wait = self.wake_in().map_or(left, |w| w.min(left));
            let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::ZERO);
            match self.poll_fd() {
                Some(fd) => {
                    let _ = poll(&mut [fd], timeout);
                }
                None => std::thread::sleep(wait),
            }
        }
    }

    /// Best-effort report of a fatal error: a `Fatal` message and the `Failed` state.
    pub fn report_fatal(&mut self, error: &str) {
        self.await_host(FATAL_CONNECT_WAIT);
        self.send(&GuestMessage::Fatal {
            error: error.to_string(),
        });
        self.send_state(&GuestState::Failed {
            error: error.to_string(),
        });
        self.drain(Duration::from_millis(200));
    }
}
