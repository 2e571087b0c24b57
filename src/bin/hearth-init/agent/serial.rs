//! The agent over a virtio-serial port named `hearth.agent` (QEMU).
//!
//! What the kernel does while no host is connected to the port's chardev: `poll` reports
//! `POLLHUP` at once, a blocking `write` blocks until a host connects and a `read` returns
//! 0. So the port is opened non-blocking and only polled while a host is connected;
//! connection changes are learned from `SIGIO` (the driver signals the owner of an
//! `O_ASYNC` port when the host side opens or closes), with a periodic re-check
//! ([`RECHECK`]) as a safety net.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth::guest::protocol::AGENT_PORT_NAME;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::AgentError;

/// Re-check of the host connection while none is seen, in case a `SIGIO` was missed.
const RECHECK: Duration = Duration::from_secs(1);

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

/// The open port and whether a host is on its other side.
pub struct SerialPort {
    file: fs::File,
    connected: bool,
}

impl SerialPort {
    /// Opens the port non-blocking with `SIGIO` delivery to this process.
    pub fn open(path: &Path) -> Result<SerialPort, AgentError> {
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
        let mut port = SerialPort {
            file,
            connected: false,
        };
        port.connected = port.host_connected();
        Ok(port)
    }

    /// Whether a host was connected at the last check.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Whether a host is connected now (no `POLLHUP`).
    pub fn host_connected(&self) -> bool {
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => !fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
            Err(_) => self.connected,
        }
    }

    /// Re-checks the connection.
    pub fn refresh(&mut self) {
        self.connected = self.host_connected();
    }

    /// The host is gone (EOF or a failed write); the next [`SerialPort::refresh`]
    /// finds out whether another one is there.
    pub fn lose(&mut self) {
        self.connected = false;
    }

    /// The port, while a host is connected (without one it would report `POLLHUP` at
    /// once, forever).
    pub fn pollable(&self) -> Option<BorrowedFd<'_>> {
        self.connected.then(|| self.file.as_fd())
    }

    /// The periodic re-check while no host is seen.
    pub fn wake_in(&self) -> Option<Duration> {
        (!self.connected).then_some(RECHECK)
    }

    /// One non-blocking read.
    pub fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// One non-blocking write.
    pub fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
}
