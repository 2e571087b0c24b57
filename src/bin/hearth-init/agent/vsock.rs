//! The agent over a vsock stream the init opens to the host (Firecracker's hybrid vsock).
//!
//! Firecracker bridges a guest connection to CID [`VSOCK_HOST_CID`] port P to the host
//! Unix socket `<uds_path>_P`, and the daemon listens there only while it has something
//! to say (before the first boot, after its own restart, to send a shutdown). So the
//! guest is the one that connects, and keeps trying: while no stream is up it starts a
//! connect at most every [`RETRY_INTERVAL`]; a host that is not listening answers with a
//! reset at once. "A host is connected" means a live stream.
//!
//! The loop never blocks on it: the socket is non-blocking, so `connect` returns
//! `EINPROGRESS` and completion is learned by polling for `POLLOUT` (the kernel reports
//! nothing writable while the connect is in flight, and `POLLOUT`/`POLLERR` once it
//! succeeded or failed). An attempt still in flight after [`CONNECT_LIMIT`] is dropped,
//! so a connect never holds up the retries for the kernel's own 2 s connect timeout.
//! A stream that reaches EOF or an error is closed and the retries start again.
//!
//! No `/dev/vsock` is needed: `AF_VSOCK` sockets come from the `vsock` module; the device
//! node only serves the local-CID ioctl.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use hearth::guest::VSOCK_HOST_CID;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, VsockAddr, connect, getpeername, getsockopt, recv,
    send, socket, sockopt,
};

/// Shortest time between the starts of two connect attempts.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// Longest a connect attempt may stay in flight before it is abandoned. A host bridge
/// answers a connect within milliseconds when someone listens (Firecracker also resets
/// at once when nobody does), but a bridge that never resets (vhost-device-vsock) leaves
/// the attempt hanging until the kernel's 2 s timeout; this bounds how late a host that
/// starts listening is noticed.
pub const CONNECT_LIMIT: Duration = Duration::from_millis(250);

/// Where the stream to the host stands.
enum State {
    /// No stream; the next attempt starts at this time.
    Waiting { next: Instant },
    /// A non-blocking connect started at `started` is in flight.
    Connecting { sock: OwnedFd, started: Instant },
    /// A live stream, from an attempt that started at `started`.
    Connected { sock: OwnedFd, started: Instant },
}

/// The guest's end of the agent stream, connected or on its way to be.
pub struct VsockLink {
    port: u32,
    state: State,
}

/// When the next attempt may start, for an attempt that started at `started` and ended
/// (refused, timed out, or a stream that broke) at `now`: [`RETRY_INTERVAL`] after the
/// previous start, or at once if that is already past. So a host that refuses gets one
/// attempt per interval, and a stream that broke after a long life is replaced at once.
pub fn next_attempt(started: Instant, now: Instant) -> Instant {
    (started + RETRY_INTERVAL).max(now)
}

/// Whether an attempt started at `started` has been in flight too long at `now`.
pub fn connect_expired(started: Instant, now: Instant) -> bool {
    now >= started + CONNECT_LIMIT
}

impl VsockLink {
    /// A link to the host's vsock `port`; the first connect starts at once.
    pub fn new(port: u32) -> VsockLink {
        let mut link = VsockLink {
            port,
            state: State::Waiting {
                next: Instant::now(),
            },
        };
        link.refresh(Instant::now());
        link
    }

    /// Whether a stream is up.
    pub fn connected(&self) -> bool {
        matches!(self.state, State::Connected { .. })
    }

    /// Moves the connection along without blocking: starts an attempt when one is due,
    /// and learns how an attempt in flight ended.
    pub fn refresh(&mut self, now: Instant) {
        let state = std::mem::replace(&mut self.state, State::Waiting { next: now });
        self.state = match state {
            State::Waiting { next } if now >= next => self.start(now),
            State::Connecting { sock, started } => match progress(&sock) {
                Progress::Connected => State::Connected { sock, started },
                Progress::Failed => State::Waiting {
                    next: next_attempt(started, now),
                },
                Progress::InFlight if connect_expired(started, now) => State::Waiting { next: now },
                Progress::InFlight => State::Connecting { sock, started },
            },
            other @ (State::Waiting { .. } | State::Connected { .. }) => other,
        };
    }

    /// Starts one connect attempt.
    fn start(&self, now: Instant) -> State {
        let retry = State::Waiting {
            next: next_attempt(now, now),
        };
        let Ok(sock) = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        ) else {
            return retry;
        };
        match connect(sock.as_raw_fd(), &VsockAddr::new(VSOCK_HOST_CID, self.port)) {
            Ok(()) => State::Connected { sock, started: now },
            Err(Errno::EINPROGRESS) => State::Connecting { sock, started: now },
            // ECONNRESET/ECONNREFUSED: nobody listens; ENODEV: no vsock device yet.
            Err(_) => retry,
        }
    }

    /// The stream broke: it is closed and the retries start again.
    pub fn lose(&mut self, now: Instant) {
        if let State::Connected { started, .. } = self.state {
            self.state = State::Waiting {
                next: next_attempt(started, now),
            };
        }
    }

    /// The socket and what to poll it for: `POLLOUT` for a connect in flight, `POLLIN`
    /// (plus `POLLOUT` if `want_write`) for a live stream; nothing while waiting.
    pub fn pollable(&self, want_write: bool) -> Option<(BorrowedFd<'_>, PollFlags)> {
        match &self.state {
            State::Waiting { .. } => None,
            State::Connecting { sock, .. } => Some((sock.as_fd(), PollFlags::POLLOUT)),
            State::Connected { sock, .. } => Some((
                sock.as_fd(),
                if want_write {
                    PollFlags::POLLIN | PollFlags::POLLOUT
                } else {
                    PollFlags::POLLIN
                },
            )),
        }
    }

    /// How long the loop may sleep before [`VsockLink::refresh`] has work to do on its
    /// own: the next attempt, or the give-up time of the one in flight.
    pub fn wake_in(&self, now: Instant) -> Option<Duration> {
        match &self.state {
            State::Waiting { next } => Some(next.saturating_duration_since(now)),
            State::Connecting { started, .. } => {
                Some((*started + CONNECT_LIMIT).saturating_duration_since(now))
            }
            State::Connected { .. } => None,
        }
    }

    /// One non-blocking read of the stream.
    pub fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &self.state {
            State::Connected { sock, .. } => Ok(recv(sock.as_raw_fd(), buf, MsgFlags::empty())?),
            State::Waiting { .. } | State::Connecting { .. } => Err(Errno::ENOTCONN.into()),
        }
    }

    /// One non-blocking write to the stream. `MSG_NOSIGNAL`: a broken stream is an
    /// error to handle, not a `SIGPIPE`.
    pub fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.state {
            State::Connected { sock, .. } => {
                Ok(send(sock.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL)?)
            }
            State::Waiting { .. } | State::Connecting { .. } => Err(Errno::ENOTCONN.into()),
        }
    }
}

/// How a connect in flight stands.
enum Progress {
    InFlight,
    Connected,
    Failed,
}

/// Looks, without waiting, at a connect in flight. Once the socket polls ready, the
/// pending error says how it ended; a socket that polls ready with no error but no peer
/// either is treated as failed, so that a ready socket is never polled again in a loop.
fn progress(sock: &OwnedFd) -> Progress {
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) | Err(Errno::EINTR) => return Progress::InFlight,
        Ok(_) => {}
        Err(_) => return Progress::Failed,
    }
    match getsockopt(sock, sockopt::SocketError) {
        Ok(0) => {}
        _ => return Progress::Failed,
    }
    match getpeername::<VsockAddr>(sock.as_raw_fd()) {
        Ok(_) => Progress::Connected,
        Err(_) => Progress::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_start_at_most_once_per_interval() {
        let t0 = Instant::now();
        // Refused at once: wait out the rest of the interval.
        assert_eq!(next_attempt(t0, t0), t0 + RETRY_INTERVAL);
        assert_eq!(
            next_attempt(t0, t0 + Duration::from_millis(10)),
            t0 + RETRY_INTERVAL
        );
        // Ended after the interval (a slow refusal, or a stream that lived long): now.
        let late = t0 + Duration::from_secs(30);
        assert_eq!(next_attempt(t0, late), late);
    }

    #[test]
    fn an_attempt_in_flight_expires_after_the_limit() {
        let t0 = Instant::now();
        assert!(!connect_expired(t0, t0));
        assert!(!connect_expired(
            t0,
            t0 + CONNECT_LIMIT - Duration::from_millis(1)
        ));
        assert!(connect_expired(t0, t0 + CONNECT_LIMIT));
        // Well inside the kernel's own 2 s connect timeout.
        assert!(CONNECT_LIMIT < Duration::from_secs(2));
    }

    #[test]
    fn waiting_link_wakes_for_its_next_attempt_and_polls_nothing() {
        let t0 = Instant::now();
        let link = VsockLink {
            port: 1024,
            state: State::Waiting {
                next: t0 + RETRY_INTERVAL,
            },
        };
        assert!(!link.connected());
        assert!(link.pollable(true).is_none());
        assert_eq!(link.wake_in(t0), Some(RETRY_INTERVAL));
        assert_eq!(link.wake_in(t0 + RETRY_INTERVAL * 2), Some(Duration::ZERO));
    }

    #[test]
    fn connecting_where_nobody_listens_never_blocks() {
        // Outside a guest: no vsock at all (EAFNOSUPPORT/ENODEV), or a host transport
        // with no listener on this port; either way each step must return at once.
        let mut link = VsockLink::new(0x7ffe_1234);
        let start = Instant::now();
        for _ in 0..20 {
            let t = Instant::now();
            link.refresh(Instant::now());
            assert!(t.elapsed() < Duration::from_millis(20), "{:?}", t.elapsed());
            assert!(!link.connected());
            match link.pollable(false) {
                None => assert!(link.wake_in(Instant::now()).is_some()),
                Some((_, flags)) => assert_eq!(flags, PollFlags::POLLOUT),
            }
        }
        assert!(start.elapsed() < Duration::from_millis(400));
    }
}
