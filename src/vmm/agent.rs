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
//! A claim is asked the same way: the guest answers a `Claim` with its state, and starts
//! the claim's workload only when it was `Idle`, so the claim is simply sent again on
//! every (re)connect.
//!
//! The guest is untrusted, and so is every byte it sends. A line is read up to
//! [`MAX_GUEST_LINE`] and the rest of a longer one discarded as it arrives; lines that
//! are not messages are counted ([`Rejected`]) and shown only as a short escaped sample;
//! a wait follows states, never events alone, and asks for the state at most once while
//! a question is open, so no sequence of messages makes the host buffer or write without
//! bound.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;

use super::{GuestReady, ReadyError, VmmProcess, pidfd};
use crate::guest::protocol::{
    Claim, GuestMessage, GuestState, HostMessage, MAX_GUEST_LINE, ProtocolError, decode_line,
    encode_line, encode_line_checked,
};

/// Pause between connection attempts while QEMU has not created the socket yet.
const RECONNECT: Duration = Duration::from_millis(5);
/// Most characters of a rejected guest line kept as its sample (escaped) for logs and
/// errors.
const REJECT_SAMPLE: usize = 120;
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
            let _ = crate::vmmdir::remove(path);
        }
    }
}

/// Binds a listener at `path`, removing a stale socket file (or whatever else is there)
/// first.
pub fn bind_fresh(path: &Path) -> std::io::Result<UnixListener> {
    crate::vmmdir::remove(path)?;
    UnixListener::bind(path)
}

/// One connection to the guest agent.
pub struct AgentConnection {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: Vec<u8>,
    rejected: Rejected,
}

/// What the guest sent that was not a message: counted, with the first one kept as a
/// short escaped sample. A guest is untrusted; its noise must cost the host a bounded
/// amount of memory and log, and still be visible when a wait fails.
#[derive(Debug, Default, Clone)]
pub struct Rejected {
    /// Lines that did not decode (garbage, unknown messages).
    pub lines: u64,
    /// Lines longer than [`MAX_GUEST_LINE`], dropped unread past the bound.
    pub too_long: u64,
    /// Bytes in all rejected lines.
    pub bytes: u64,
    /// The first rejected line (its start), bounded and with control characters escaped.
    pub first: Option<String>,
}

impl Rejected {
    /// Nothing was rejected.
    pub fn is_empty(&self) -> bool {
        self.lines == 0 && self.too_long == 0
    }

    /// Counts one rejected line of `len` bytes starting with `start`; logs the first one
    /// and then each time the count reaches a power of ten, so a flood writes a handful
    /// of log lines.
    fn note(&mut self, path: &Path, start: &[u8], len: u64, too_long: bool, why: &str) {
        if too_long {
            self.too_long += 1;
        } else {
            self.lines += 1;
        }
        self.bytes += len;
        let count = self.lines + self.too_long;
        let log = is_power_of_ten(count);
        if !log && self.first.is_some() {
            return;
        }
        let sample = sample(start);
        if log {
            tracing::warn!(
                socket = %path.display(),
                rejected = count,
                bytes = self.bytes,
                len,
                why,
                sample = %sample,
                "the guest sent lines that are not agent messages"
            );
        }
        if self.first.is_none() {
            self.first = Some(sample);
        }
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} lines from the guest were not agent messages and {} were longer than {} bytes ({} bytes in all)",
            self.lines, self.too_long, MAX_GUEST_LINE, self.bytes
        )?;
        if let Some(first) = &self.first {
            write!(f, "; the first began: {first}")?;
        }
        Ok(())
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

/// The start of an untrusted line as inert text: at most [`REJECT_SAMPLE`] bytes, invalid
/// UTF-8 replaced, control characters escaped.
fn sample(line: &[u8]) -> String {
    let start = &line[..line.len().min(REJECT_SAMPLE)];
    crate::text::bounded_printable(&String::from_utf8_lossy(start), REJECT_SAMPLE)
}

impl AgentConnection {
    /// Connects, retrying until `deadline` while the socket does not exist or refuses.
    pub async fn connect(path: &Path, deadline: Instant) -> Result<AgentConnection, AgentError> {
        let start = Instant::now();
        loop {
            match crate::vmmdir::connect(path).await {
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
            rejected: Rejected::default(),
        }
    }

    /// What this connection rejected so far.
    pub fn rejected(&self) -> &Rejected {
        &self.rejected
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: HostMessage) -> Result<(), AgentError> {
        self.send_line(&encode_line(&msg)).await
    }

    /// Sends one encoded message (a claim is encoded, and its size checked, once).
    async fn send_line(&mut self, line: &[u8]) -> Result<(), AgentError> {
        self.writer
            .write_all(line)
            .await
            .map_err(|source| AgentError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Receives the next message. Lines that are not messages are skipped and counted
    /// ([`AgentConnection::rejected`]). A line longer than [`MAX_GUEST_LINE`] is never
    /// held whole: its first bytes are read, the rest is discarded as it arrives up to its
    /// newline, and nothing in it counts as a message (a message hidden at its end is not
    /// believed).
    pub async fn recv(&mut self) -> Result<GuestMessage, AgentError> {
        let mut rejected = std::mem::take(&mut self.rejected);
        let got = self.recv_noting(&mut rejected).await;
        self.rejected = rejected;
        got
    }

    /// [`AgentConnection::recv`], counting rejected lines in `rejected` (which outlives
    /// the connection, and a cancelled receive).
    async fn recv_noting(&mut self, rejected: &mut Rejected) -> Result<GuestMessage, AgentError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AgentError::Io { path, source }
        };
        loop {
            self.line.clear();
            let n = (&mut self.reader)
                .take(MAX_GUEST_LINE as u64 + 1)
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(io(&self.path))?;
            if n == 0 {
                return Err(AgentError::Closed {
                    path: self.path.clone(),
                });
            }
            if self.line.last() != Some(&b'\n') && n > MAX_GUEST_LINE {
                // Counted now, not at its end: a line that never ends must show too.
                rejected.note(&self.path, &self.line, n as u64, true, "line too long");
                self.line = Vec::new();
                self.skip_line(rejected).await.map_err(io(&self.path))?;
                continue;
            }
            match decode_line::<GuestMessage>(&self.line) {
                Ok(msg) => return Ok(msg),
                Err(e) => {
                    let why = e.to_string();
                    rejected.note(&self.path, &self.line, n as u64, false, &why);
                    // A flood of long garbage lines must not keep the largest buffer.
                    if self.line.capacity() > 4096 {
                        self.line = Vec::new();
                    }
                }
            }
        }
    }

    /// Discards what is buffered and arrives up to and including the next newline (or the
    /// end of the stream), adding its length to `rejected`. Holds no more than the
    /// reader's buffer.
    async fn skip_line(&mut self, rejected: &mut Rejected) -> std::io::Result<()> {
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                return Ok(());
            }
            let (used, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            self.reader.consume(used);
            rejected.bytes += used as u64;
            if done {
                return Ok(());
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

/// What a state means for a wait: done, failed, or keep waiting (`None`).
type Judge<T> = fn(&GuestState) -> Option<Result<T, ReadyError>>;

/// What a state means for a readiness wait.
fn judge_ready(state: &GuestState) -> Option<Result<GuestReady, ReadyError>> {
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
        // Without a claim it never will be.
        GuestState::Idle => Some(Err(ReadyError::Unclaimed)),
        GuestState::Starting => None,
    }
}

/// What a state means for a claim's wait: as for readiness, except that `Idle` is the
/// guest's word from before it read the claim (sent unasked on connect).
fn judge_claimed(state: &GuestState) -> Option<Result<GuestReady, ReadyError>> {
    match state {
        GuestState::Idle => None,
        other => judge_ready(other),
    }
}

/// What a state means for a prepared guest's boot: `Idle` is done; a workload, claimed or
/// not, means this is not an idle prepared guest.
fn judge_idle(state: &GuestState) -> Option<Result<(), ReadyError>> {
    match state {
        GuestState::Idle => Some(Ok(())),
        GuestState::Starting | GuestState::Ready { .. } | GuestState::Exited { .. } => {
            Some(Err(ReadyError::NotIdle {
                state: format!("{state:?}"),
            }))
        }
        GuestState::Failed { error } => Some(Err(ReadyError::GuestFailed {
            error: error.clone(),
        })),
        GuestState::ShuttingDown => Some(Err(ReadyError::ShuttingDown)),
    }
}

/// Waits for readiness; see [`super::VmmDriver::wait_ready`].
pub async fn wait_ready(
    process: &VmmProcess,
    link: AgentLink,
    timeout: Duration,
) -> Result<GuestReady, ReadyError> {
    let status = encode_line(&HostMessage::Status);
    wait_for(process, link, timeout, &status, judge_ready).await
}

/// Waits for a prepared guest to be idle; see [`super::VmmDriver::wait_idle`].
pub async fn wait_idle(
    process: &VmmProcess,
    link: AgentLink,
    timeout: Duration,
) -> Result<(), ReadyError> {
    let status = encode_line(&HostMessage::Status);
    wait_for(process, link, timeout, &status, judge_idle).await
}

/// Claims a prepared guest and waits for readiness; see [`super::VmmDriver::claim`].
pub async fn claim(
    process: &VmmProcess,
    link: AgentLink,
    claim: &Claim,
    timeout: Duration,
) -> Result<GuestReady, ReadyError> {
    let line =
        encode_line_checked(&HostMessage::Claim(Box::new(claim.clone()))).map_err(|e| match e {
            ProtocolError::LineTooLong { len, max } => ReadyError::ClaimTooLarge { len, max },
            // Encoding does not parse: only a too long line can be refused.
            ProtocolError::Json(e) => ReadyError::GuestFailed {
                error: format!("claim not encodable: {e}"),
            },
        })?;
    wait_for(process, link, timeout, &line, judge_claimed).await
}

/// The wait shared by readiness, idleness and claims: sends `hello` on every connection
/// and follows the guest's state until `judge` decides, the VMM exits, or `timeout`
/// passes.
async fn wait_for<T>(
    process: &VmmProcess,
    mut link: AgentLink,
    timeout: Duration,
    hello: &[u8],
    judge: Judge<T>,
) -> Result<T, ReadyError> {
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
    let mut rejected = Rejected::default();
    let follow = follow(
        &mut link,
        deadline,
        hello,
        judge,
        &mut last_state,
        &mut rejected,
    );
    let outcome = tokio::select! {
        _ = pidfd::wait_exit(&fd) => Err(exited()),
        r = tokio::time::timeout_at(deadline, follow) => match r {
            Ok(r) => r,
            Err(_) => Err(ReadyError::Timeout { after: timeout, last_state: String::new() }),
        },
    };
    match outcome {
        Err(ReadyError::Timeout { after, .. }) => Err(ReadyError::Timeout {
            after,
            last_state: if rejected.is_empty() {
                last_state
            } else {
                format!("{last_state}; {rejected}")
            },
        }),
        other => other,
    }
}

/// The agent side of [`wait_for`]: (re)connects, sends `hello` (a `Status`, or the
/// claim, which the guest answers with its state too), and follows the messages until
/// the state decides the wait. Only a state decides: an `Exited` event is a hint to ask
/// for the state, asked at most once until a state arrives, so a guest repeating it
/// cannot make the host write without bound.
async fn follow<T>(
    link: &mut AgentLink,
    deadline: Instant,
    hello: &[u8],
    judge: Judge<T>,
    last_state: &mut String,
    rejected: &mut Rejected,
) -> Result<T, ReadyError> {
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
        if conn.send_line(hello).await.is_err() {
            tokio::time::sleep(RECONNECT).await;
            continue;
        }
        // Whether a state has been asked for and not heard since.
        let mut asked = true;
        loop {
            let msg = match conn.recv_noting(rejected).await {
                Ok(m) => m,
                Err(_) => break,
            };
            if matches!(msg, GuestMessage::Status { .. }) {
                asked = false;
            }
            let state = match msg {
                GuestMessage::Status { state } => match state {
                    GuestState::Failed { error } => GuestState::Failed {
                        error: crate::text::bounded_printable(&error, crate::text::MAX_GUEST_ERROR),
                    },
                    other => other,
                },
                GuestMessage::Ready { boot_ms } => GuestState::Ready { boot_ms },
                GuestMessage::Fatal { error } => GuestState::Failed {
                    error: crate::text::bounded_printable(&error, crate::text::MAX_GUEST_ERROR),
                },
                // An exit may or may not follow readiness: ask for the full state.
                GuestMessage::Exited { .. } => {
                    if !asked {
                        if conn.send(HostMessage::Status).await.is_err() {
                            break;
                        }
                        asked = true;
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
    crate::text::printable(&super::logs::tail(
        &dir.join(crate::vmm::SERIAL_LOG),
        CONSOLE_TAIL,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::protocol::fuzz;
    use crate::guest::protocol::{CLAIM_ENTROPY_BYTES, ExitStatus, MAX_HOST_LINE};
    use crate::vmm::procfs;

    /// This test process, recorded like a VMM: the waits watch its pidfd.
    fn this_process(agent_socket: PathBuf) -> VmmProcess {
        let pid = std::process::id() as i32;
        VmmProcess {
            driver: "qemu".into(),
            pid,
            start_time: procfs::stat(pid).unwrap().start_time,
            boot_id: procfs::boot_id(),
            control_socket: agent_socket.with_file_name("qmp.sock"),
            agent_socket,
        }
    }

    fn claim() -> Claim {
        Claim {
            hostname: "web-1".into(),
            command: vec!["httpd".into()],
            env: vec![],
            workdir: None,
            user: None,
            ports: vec![80],
            now_unix_ms: 1,
            entropy: "00".repeat(CLAIM_ENTROPY_BYTES),
        }
    }

    #[test]
    fn idle_means_waiting_for_a_claim_and_done_for_a_prepared_boot() {
        assert!(judge_claimed(&GuestState::Idle).is_none());
        assert!(judge_claimed(&GuestState::Starting).is_none());
        assert!(matches!(
            judge_claimed(&GuestState::Ready { boot_ms: 3 }),
            Some(Ok(GuestReady { boot_ms: 3, .. }))
        ));
        assert!(matches!(
            judge_ready(&GuestState::Idle),
            Some(Err(ReadyError::Unclaimed))
        ));
        assert!(matches!(judge_idle(&GuestState::Idle), Some(Ok(()))));
        for busy in [
            GuestState::Starting,
            GuestState::Ready { boot_ms: 1 },
            GuestState::Exited {
                boot_ms: None,
                status: ExitStatus::Code(0),
            },
        ] {
            assert!(
                matches!(judge_idle(&busy), Some(Err(ReadyError::NotIdle { .. }))),
                "{busy:?}"
            );
        }
        assert!(matches!(
            judge_idle(&GuestState::ShuttingDown),
            Some(Err(ReadyError::ShuttingDown))
        ));
        assert!(matches!(
            judge_idle(&GuestState::Failed { error: "x".into() }),
            Some(Err(ReadyError::GuestFailed { .. }))
        ));
    }

    #[tokio::test]
    async fn an_oversized_claim_is_refused_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        // Nobody listens there: a claim that tried to send would wait out its timeout.
        let process = this_process(dir.path().join("agent.sock"));
        let mut big = claim();
        big.env = vec![("BIG".into(), "x".repeat(MAX_HOST_LINE))];
        let t = std::time::Instant::now();
        let err = super::claim(
            &process,
            AgentLink::for_process(&process),
            &big,
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        match err {
            ReadyError::ClaimTooLarge { len, max } => {
                assert!(len > MAX_HOST_LINE);
                assert_eq!(max, MAX_HOST_LINE);
                assert!(err.to_string().contains(&len.to_string()), "{err}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A stand-in for the guest init's side of a claim: greets with its state, starts a
    /// workload only from Idle, answers every claim with its state, and becomes Ready.
    /// The first connection breaks right after the claim arrives (before any answer).
    /// Returns how many claims arrived and how many workloads started.
    async fn fake_guest(listener: UnixListener, connections: usize) -> (usize, usize) {
        let mut state = GuestState::Idle;
        let (mut claims, mut starts) = (0, 0);
        for n in 0..connections {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            let greet = GuestMessage::Status {
                state: state.clone(),
            };
            w.write_all(&encode_line(&greet)).await.unwrap();
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).await.unwrap();
            let HostMessage::Claim(_) = decode_line::<HostMessage>(&line).unwrap() else {
                panic!("expected a claim");
            };
            claims += 1;
            if state == GuestState::Idle {
                starts += 1;
                state = GuestState::Starting;
            }
            if n == 0 {
                continue;
            }
            // A host that already knows (the greeting said Ready) may be gone: the
            // answers are best effort, as the init's are.
            let answer = GuestMessage::Status {
                state: state.clone(),
            };
            let _ = w.write_all(&encode_line(&answer)).await;
            state = GuestState::Ready { boot_ms: 42 };
            let _ = w
                .write_all(&encode_line(&GuestMessage::Ready { boot_ms: 42 }))
                .await;
            // Keep the connection until the host has read and gone.
            let _ = r.read_until(b'\n', &mut line).await;
        }
        (claims, starts)
    }

    #[tokio::test]
    async fn a_claim_is_resent_on_reconnect_and_a_retry_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let process = this_process(sock);
        let guest = tokio::spawn(fake_guest(listener, 3));
        let link = || AgentLink::for_process(&process);
        let first = super::claim(&process, link(), &claim(), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(first.boot_ms, 42);
        // A retry (a host that lost the first answer) finds the guest Ready.
        let again = super::claim(&process, link(), &claim(), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(again, first);
        let (claims, starts) = guest.await.unwrap();
        assert_eq!((claims, starts), (3, 1));
    }

    #[test]
    fn rejected_lines_are_logged_a_handful_of_times() {
        let logged: Vec<u64> = (1..=100_000u64).filter(|&n| is_power_of_ten(n)).collect();
        assert_eq!(logged, vec![1, 10, 100, 1000, 10_000, 100_000]);
        assert!(!is_power_of_ten(0) && !is_power_of_ten(20) && !is_power_of_ten(11));
    }

    #[tokio::test]
    async fn a_message_hidden_at_the_end_of_an_over_long_line_is_not_believed() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = AgentConnection::from_stream(Path::new("test"), a);
        let guest = tokio::spawn(async move {
            let mut line = vec![b' '; 3 * MAX_GUEST_LINE + 17];
            line.extend(encode_line(&GuestMessage::Ready { boot_ms: 1 }));
            b.write_all(&line).await.unwrap();
            b.write_all(b"\x1b[2Jnot json\n").await.unwrap();
            let honest = GuestMessage::Status {
                state: GuestState::Starting,
            };
            b.write_all(&encode_line(&honest)).await.unwrap();
            honest
        });
        let got = conn.recv().await.unwrap();
        assert_eq!(got, guest.await.unwrap());
        let r = conn.rejected();
        assert_eq!((r.too_long, r.lines), (1, 1), "{r:?}");
        let shown = r.to_string();
        assert!(
            shown.contains("1 lines from the guest were not agent messages"),
            "{shown}"
        );
        assert!(!shown.contains('\x1b'), "{shown}");
        assert!(conn.line.capacity() <= 2 * (MAX_GUEST_LINE + 1));
    }

    /// A guest that sends Exited events and never answers: the host asks for the state
    /// once (the hello), not once per event.
    #[tokio::test]
    async fn exit_events_do_not_make_the_host_ask_again_while_a_question_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let process = this_process(sock);
        let guest = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            for code in 0..500 {
                let hint = GuestMessage::Exited {
                    status: ExitStatus::Code(code),
                };
                w.write_all(&encode_line(&hint)).await.unwrap();
            }
            // Then answers: one Status, read what the host sent meanwhile.
            let ready = GuestMessage::Status {
                state: GuestState::Ready { boot_ms: 9 },
            };
            w.write_all(&encode_line(&ready)).await.unwrap();
            let mut asked = 0;
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if decode_line::<HostMessage>(line.as_bytes()).ok() == Some(HostMessage::Status) {
                    asked += 1;
                }
            }
            asked
        });
        let ready = super::wait_ready(
            &process,
            AgentLink::for_process(&process),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(ready.boot_ms, 9);
        assert_eq!(guest.await.unwrap(), 1);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: (fuzz::cases() / 4).max(8),
            ..fuzz::config()
        })]

        /// The host's decoder over a real socket, fed a hostile stream cut anywhere:
        /// it hears exactly the whole lines within the bound that are messages, in
        /// order, never one from inside an over-long line, and holds a bounded buffer.
        #[test]
        fn the_host_hears_exactly_the_whole_messages_within_the_bound(
            pieces in proptest::collection::vec(fuzz::piece(), 0..12),
            cuts in proptest::collection::vec(proptest::prelude::any::<usize>(), 0..20),
        ) {
            let stream: Vec<u8> = pieces.iter().flat_map(|p| p.bytes()).collect();
            let want = fuzz::expected_messages(&stream);
            let chunks = fuzz::chunks(&stream, &cuts);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (got, biggest) = rt.block_on(async move {
                let (a, mut b) = UnixStream::pair().unwrap();
                let writer = tokio::spawn(async move {
                    for c in chunks {
                        b.write_all(&c).await.unwrap();
                    }
                });
                let mut conn = AgentConnection::from_stream(Path::new("test"), a);
                let mut got = Vec::new();
                let mut biggest = 0;
                loop {
                    let next = conn.recv().await;
                    biggest = biggest.max(conn.line.capacity());
                    match next {
                        Ok(m) => got.push(m),
                        Err(AgentError::Closed { .. }) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                writer.await.unwrap();
                (got, biggest)
            });
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert!(biggest <= 2 * (MAX_GUEST_LINE + 1), "{}", biggest);
        }
    }
}
