//! The host end of the guest agent (see [`crate::guest::protocol`]), over either link a
//! VMM offers:
//! - QEMU bridges the guest's virtio-serial port `hearth.agent` to a Unix socket that
//!   QEMU listens on: the host dials it ([`AgentLink::Dial`]).
//! - Firecracker bridges a guest-initiated vsock connection to host port P onto the Unix
//!   socket `<uds_path>_<P>`, where the host must listen; the guest keeps reconnecting
//!   while nobody listens ([`AgentLink::Listen`]).
//!
//! Either way there is one conversation at a time and the daemon may go away at any
//! moment, so every operation opens its own connection, asks the guest for its state, and
//! relies only on the answer (never on an event it may have missed while disconnected).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;

use super::{GuestReady, ReadyError, VmmProcess, pidfd};
use crate::guest::protocol::{
    GuestMessage, GuestState, HostMessage, MAX_LINE, decode_line, encode_line,
};

/// Pause between connection attempts while QEMU has not created the socket yet.
const RECONNECT: Duration = Duration::from_millis(5);
/// How much of the serial console log an error carries.
const CONSOLE_TAIL: usize = 2048;

/// Why talking to the guest agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket could not be reached in time.
    #[error("agent socket {path}: no connection within {after:?}: {last_error}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// How long was tried.
        after: Duration,
        /// The last connect error.
        last_error: String,
    },
    /// The connection broke.
    #[error("agent socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The VMM closed the connection.
    #[error("agent socket {path}: closed")]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// No answer in time.
    #[error("agent socket {path}: no answer within {after:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long was waited.
        after: Duration,
    },
}

/// How the host reaches a machine's guest agent.
pub enum AgentLink {
    /// Connect to a socket the VMM listens on (QEMU's chardev).
    Dial(PathBuf),
    /// Listen on a socket the VMM connects to when the guest connects (Firecracker's
    /// `<uds_path>_<port>`). The listener is bound on first use (replacing a stale file)
    /// unless one bound earlier is handed over, and its file is removed on drop.
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The bound listener.
        listener: Option<UnixListener>,
    },
}

impl AgentLink {
    /// The link for a recorded VMM process.
    pub fn for_process(process: &VmmProcess) -> AgentLink {
        if process.driver == super::firecracker::DRIVER_NAME {
            AgentLink::Listen {
                path: process.agent_socket.clone(),
                listener: None,
            }
        } else {
            AgentLink::Dial(process.agent_socket.clone())
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        match self {
            AgentLink::Dial(p) => p,
            AgentLink::Listen { path, .. } => path,
        }
    }

    /// Opens a conversation, trying until `deadline`.
    pub async fn open(&mut self, deadline: Instant) -> Result<AgentConnection, AgentError> {
        match self {
            AgentLink::Dial(path) => AgentConnection::connect(path, deadline).await,
            AgentLink::Listen { path, listener } => {
                let start = Instant::now();
                let connect_err = |last_error: String| AgentError::Connect {
                    path: path.clone(),
                    after: start.elapsed(),
                    last_error,
                };
                if listener.is_none() {
                    *listener = Some(bind_fresh(path).map_err(|e| connect_err(e.to_string()))?);
                }
                let Some(l) = listener.as_ref() else {
                    return Err(connect_err("no listener".into()));
                };
                match tokio::time::timeout_at(deadline, l.accept()).await {
                    Ok(Ok((stream, _))) => Ok(AgentConnection::from_stream(path, stream)),
                    Ok(Err(e)) => Err(connect_err(e.to_string())),
                    Err(_) => Err(connect_err("the guest did not connect".into())),
                }
            }
        }
    }
}

impl Drop for AgentLink {
    fn drop(&mut self) {
        if let AgentLink::Listen {
            path,
            listener: Some(_),
        } = self
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds a listener at `path`, removing a stale socket file first.
pub fn bind_fresh(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// One connection to the guest agent.
pub struct AgentConnection {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: Vec<u8>,
}

impl AgentConnection {
    /// Connects, retrying until `deadline` while the socket does not exist or refuses.
    pub async fn connect(path: &Path, deadline: Instant) -> Result<AgentConnection, AgentError> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path).await {
                Ok(stream) => return Ok(AgentConnection::from_stream(path, stream)),
                Err(e) if Instant::now() + RECONNECT >= deadline => {
                    return Err(AgentError::Connect {
                        path: path.to_path_buf(),
                        after: start.elapsed(),
                        last_error: e.to_string(),
                    });
                }
                Err(_) => tokio::time::sleep(RECONNECT).await,
            }
        }
    }

    fn from_stream(path: &Path, stream: UnixStream) -> AgentConnection {
        let (r, w) = stream.into_split();
        AgentConnection {
            path: path.to_path_buf(),
            reader: BufReader::new(r),
            writer: w,
            line: Vec::new(),
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: HostMessage) -> Result<(), AgentError> {
        self.writer
            .write_all(&encode_line(&msg))
            .await
            .map_err(|source| AgentError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Receives the next message; lines that are not messages are skipped.
    pub async fn recv(&mut self) -> Result<GuestMessage, AgentError> {
        loop {
            self.line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(|source| AgentError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(AgentError::Closed {
                    path: self.path.clone(),
                });
            }
            if let Ok(msg) = decode_line::<GuestMessage>(&self.line) {
                return Ok(msg);
            }
        }
    }

    /// Asks for the state and returns the reply (events that arrive first are skipped).
    pub async fn status(&mut self) -> Result<GuestState, AgentError> {
        self.send(HostMessage::Status).await?;
        loop {
            if let GuestMessage::Status { state } = self.recv().await? {
                return Ok(state);
            }
        }
    }
}

/// Connects and asks the guest for its state, all within `timeout`.
pub async fn guest_state(mut link: AgentLink, timeout: Duration) -> Result<GuestState, AgentError> {
    let deadline = Instant::now() + timeout;
    let path = link.path().to_path_buf();
    let ask = async {
        let mut conn = link.open(deadline).await?;
        conn.status().await
    };
    tokio::time::timeout_at(deadline, ask)
        .await
        .map_err(|_| AgentError::Timeout {
            path: path.clone(),
            after: timeout,
        })?
}

/// Sends Shutdown and waits (within `timeout`) for the guest to acknowledge it.
pub async fn request_shutdown(mut link: AgentLink, timeout: Duration) -> Result<(), AgentError> {
    let deadline = Instant::now() + timeout;
    let path = link.path().to_path_buf();
    let ask = async {
        let mut conn = link.open(deadline).await?;
        conn.send(HostMessage::Shutdown).await?;
        loop {
            match conn.recv().await {
                Ok(GuestMessage::ShuttingDown) => return Ok(()),
                Ok(_) => {}
                // The guest powered off before the acknowledgement got out.
                Err(AgentError::Closed { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    };
    tokio::time::timeout_at(deadline, ask)
        .await
        .map_err(|_| AgentError::Timeout {
            path: path.clone(),
            after: timeout,
        })?
}

/// What a state means for a readiness wait: done, failed, or keep waiting.
fn judge(state: &GuestState) -> Option<Result<GuestReady, ReadyError>> {
    match state {
        GuestState::Ready { boot_ms } => Some(Ok(GuestReady {
            boot_ms: *boot_ms,
            state: state.clone(),
        })),
        GuestState::Exited {
            boot_ms: Some(boot_ms),
            ..
        } => Some(Ok(GuestReady {
            boot_ms: *boot_ms,
            state: state.clone(),
        })),
        GuestState::Exited {
            boot_ms: None,
            status,
        } => Some(Err(ReadyError::WorkloadExited { status: *status })),
        GuestState::Failed { error } => Some(Err(ReadyError::GuestFailed {
            error: error.clone(),
        })),
        GuestState::ShuttingDown => Some(Err(ReadyError::ShuttingDown)),
        GuestState::Starting => None,
    }
}

/// Waits for readiness; see [`super::VmmDriver::wait_ready`].
pub async fn wait_ready(
    process: &VmmProcess,
    mut link: AgentLink,
    timeout: Duration,
) -> Result<GuestReady, ReadyError> {
    let deadline = Instant::now() + timeout;
    let exited = || ReadyError::VmmExited {
        pid: process.pid,
        console: console_tail(process),
    };
    let Some(fd) = pidfd::open_verified(process) else {
        return Err(exited());
    };
    let fd = pidfd::watch(fd).map_err(|_| exited())?;
    let mut last_state = String::from("no answer from the guest agent");
    tokio::select! {
        _ = pidfd::wait_exit(&fd) => Err(exited()),
        r = tokio::time::timeout_at(deadline, poll_ready(&mut link, deadline, &mut last_state)) => match r {
            Ok(r) => r,
            Err(_) => Err(ReadyError::Timeout { after: timeout, last_state: last_state.clone() }),
        },
    }
}

/// The agent side of [`wait_ready`]: (re)connects, asks for the state, and follows the
/// messages until the state decides the wait.
async fn poll_ready(
    link: &mut AgentLink,
    deadline: Instant,
    last_state: &mut String,
) -> Result<GuestReady, ReadyError> {
    loop {
        let mut conn = match link.open(deadline).await {
            Ok(conn) => conn,
            Err(e) => {
                // Connect gives up only at the deadline, where the caller's timeout ends
                // the wait with this as the last thing known.
                *last_state = e.to_string();
                return std::future::pending().await;
            }
        };
        if conn.send(HostMessage::Status).await.is_err() {
            tokio::time::sleep(RECONNECT).await;
            continue;
        }
        loop {
            let msg = match conn.recv().await {
                Ok(m) => m,
                Err(_) => break,
            };
            let state = match msg {
                GuestMessage::Status { state } => state,
                GuestMessage::Ready { boot_ms } => GuestState::Ready { boot_ms },
                GuestMessage::Fatal { error } => GuestState::Failed { error },
                // An exit may or may not follow readiness: ask for the full state.
                GuestMessage::Exited { .. } => {
                    if conn.send(HostMessage::Status).await.is_err() {
                        break;
                    }
                    continue;
                }
                GuestMessage::ShuttingDown => GuestState::ShuttingDown,
            };
            *last_state = format!("{state:?}");
            if let Some(done) = judge(&state) {
                return done;
            }
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// The last bytes of the machine's serial console log, for error messages.
pub fn console_tail(process: &VmmProcess) -> String {
    let Some(dir) = process.workdir() else {
        return String::new();
    };
    tail(&dir.join(super::qemu::SERIAL_LOG), CONSOLE_TAIL)
}

/// The last `max` bytes of a file, lossily decoded; empty if unreadable.
pub fn tail(path: &Path, max: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}
