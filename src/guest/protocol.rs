//! The agent protocol between the daemon and the guest init: newline-delimited JSON over
//! the virtio-serial port named [`AGENT_PORT_NAME`] (a Unix socket on the host side).
//!
//! Why state-based: the daemon may restart and reconnect at any time, and while no host
//! is connected the guest's writes go nowhere. So every event message is only a hint; the
//! truth is the guest's current [`GuestState`], which the host asks for with
//! [`HostMessage::Status`] after every (re)connect and the guest re-sends in full.
//!
//! ```text
//! host -> guest   {"type":"status"}                 guest answers Status{state}
//!                 {"type":"shutdown"}               guest answers ShuttingDown, stops the
//!                                                   workload, syncs, powers off
//!                 {"type":"claim","hostname":..,    an Idle guest sets its clock, entropy
//!                  "command":[..],..}               and hostname and starts the workload;
//!                                                   any guest answers Status{state}
//! guest -> host   {"type":"ready","boot_ms":812}    workload started, its ports listen
//!                 {"type":"exited","status":{"code":7}}
//!                 {"type":"status","state":{...}}   reply to Status and Claim
//!                 {"type":"shutting_down"}          reply to Shutdown
//!                 {"type":"fatal","error":"..."}    init failed; the guest powers off
//! ```
//!
//! Lines are bounded per direction ([`Message::MAX_LINE`]): a claim carries a workload as
//! large as a config disk may ([`MAX_CONFIG_JSON`]), the guest's messages are small.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::config::{GuestConfig, MAX_CONFIG_JSON};

/// Name of the virtio-serial port (`/sys/class/virtio-ports/*/name` in the guest).
pub const AGENT_PORT_NAME: &str = "hearth.agent";
/// Longest host -> guest line: a claim's workload plus room for the claim's own fields.
pub const MAX_HOST_LINE: usize = MAX_CONFIG_JSON + 4 * 1024;
/// Longest guest -> host line.
pub const MAX_GUEST_LINE: usize = 64 * 1024;
/// Random bytes a claim carries for the guest's entropy pool: a guest that idled since its
/// boot must not give its workload only what it gathered then.
pub const CLAIM_ENTROPY_BYTES: usize = 64;

/// A message of one direction, and the longest line its receiver accepts (without the
/// `\n`); a longer one is a protocol error.
pub trait Message: Serialize + DeserializeOwned {
    /// The bound.
    const MAX_LINE: usize;
}

impl Message for HostMessage {
    const MAX_LINE: usize = MAX_HOST_LINE;
}

impl Message for GuestMessage {
    const MAX_LINE: usize = MAX_GUEST_LINE;
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal with this number killed it.
    Signal(i32),
}

/// The guest's state as the init sees it.
///
/// ```text
///   Idle --Claim--> Starting       (prepared guests only; a normal boot begins at Starting)
///   Starting --(declared ports listen)--> Ready --(workload ends)--> Exited
///      |                                                ^
///      +---------(workload ends before ready)-----------+
///   any --Shutdown--> ShuttingDown --> (power off)
///   any --fatal error--> Failed --> (power off)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum GuestState {
    /// A prepared guest: booted, network up, no workload; waiting for a
    /// [`HostMessage::Claim`].
    Idle,
    /// Booted and the workload started, but not all of its declared ports listen yet.
    Starting,
    /// The workload runs and listens on every declared port.
    Ready {
        /// Milliseconds from kernel start to readiness (the kernel's boot clock, the one
        /// behind `/proc/uptime`).
        boot_ms: u64,
    },
    /// The workload has ended.
    Exited {
        /// Readiness time if the guest got ready before the workload ended.
        boot_ms: Option<u64>,
        /// How the workload ended.
        status: ExitStatus,
    },
    /// A shutdown was requested and is in progress.
    ShuttingDown,
    /// The init hit a fatal error and powers off.
    Failed {
        /// What went wrong.
        error: String,
    },
}

impl GuestState {
    /// Readiness time, when the guest got that far.
    pub fn boot_ms(&self) -> Option<u64> {
        match self {
            GuestState::Ready { boot_ms } => Some(*boot_ms),
            GuestState::Exited { boot_ms, .. } => *boot_ms,
            GuestState::Idle
            | GuestState::Starting
            | GuestState::ShuttingDown
            | GuestState::Failed { .. } => None,
        }
    }
}

/// Guest -> host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMessage {
    /// The guest is ready: booted, workload started, its declared ports listen.
    Ready {
        /// Milliseconds from kernel start (from `/proc/uptime`).
        boot_ms: u64,
    },
    /// The workload ended.
    Exited {
        /// How.
        status: ExitStatus,
    },
    /// Reply to [`HostMessage::Status`] and [`HostMessage::Claim`], also sent unasked when
    /// a host connects.
    Status {
        /// The current state.
        state: GuestState,
    },
    /// Reply to [`HostMessage::Shutdown`]: the shutdown has begun.
    ShuttingDown,
    /// The init failed and powers off.
    Fatal {
        /// What went wrong.
        error: String,
    },
}

/// Host -> guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    /// Asks for the guest's current state.
    Status,
    /// Asks the guest to stop the workload and power off.
    Shutdown,
    /// Gives a [`GuestState::Idle`] guest its workload. In any other state it starts
    /// nothing (a claim retried after a host crash never starts a second workload); the
    /// guest answers with its state either way.
    Claim(Box<Claim>),
}

/// What a prepared guest is missing to become the machine it is claimed for: the
/// workload fields of a [`GuestConfig`] (see there), which a prepared config leaves
/// empty, and what a guest booted long before its claim cannot know by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// [`GuestConfig::hostname`] (the prepared config's is a placeholder).
    pub hostname: String,
    /// [`GuestConfig::command`].
    pub command: Vec<String>,
    /// [`GuestConfig::env`].
    pub env: Vec<(String, String)>,
    /// [`GuestConfig::workdir`].
    pub workdir: Option<String>,
    /// [`GuestConfig::user`].
    pub user: Option<String>,
    /// [`GuestConfig::ports`].
    pub ports: Vec<u16>,
    /// The host's wall clock (ms since the Unix epoch) when the claim was made: the guest
    /// sets its clock to it, since it may have idled (or been paused) for a long time.
    pub now_unix_ms: u64,
    /// Hex of [`CLAIM_ENTROPY_BYTES`] bytes from the host's `getrandom`, credited to the
    /// guest's entropy pool before the workload starts.
    pub entropy: String,
}

impl Claim {
    /// The claim for the workload `config` describes (what the host would have written
    /// on the config disk of a machine booted for it).
    pub fn from_config(config: &GuestConfig, now_unix_ms: u64, entropy: String) -> Claim {
        Claim {
            hostname: config.hostname.clone(),
            command: config.command.clone(),
            env: config.env.clone(),
            workdir: config.workdir.clone(),
            user: config.user.clone(),
            ports: config.ports.clone(),
            now_unix_ms,
            entropy,
        }
    }

    /// The config the guest would have booted with for this workload: the prepared
    /// `base` (machine id, network) with the claim's hostname and workload.
    pub fn workload_config(&self, base: &GuestConfig) -> GuestConfig {
        GuestConfig {
            machine_id: base.machine_id.clone(),
            hostname: self.hostname.clone(),
            network: base.network.clone(),
            command: self.command.clone(),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            ports: self.ports.clone(),
            user: self.user.clone(),
            prepared: false,
            overlay_root: base.overlay_root,
        }
    }
}

/// Fresh entropy for a [`Claim`]: [`CLAIM_ENTROPY_BYTES`] bytes from the host's
/// `getrandom`, as hex.
pub fn claim_entropy() -> Result<String, getrandom::Error> {
    let mut raw = [0u8; CLAIM_ENTROPY_BYTES];
    getrandom::fill(&mut raw)?;
    Ok(hex::encode(raw))
}

/// Why a line is not a message, or a message cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Longer than the receiver accepts ([`Message::MAX_LINE`]).
    #[error("agent line of {len} bytes, more than the {max} accepted")]
    LineTooLong {
        /// The line's length (for a line still arriving: what had arrived).
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Not valid JSON for the expected message type.
    #[error("agent message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes one message as a line (JSON plus `\n`). Meant for messages whose size the
/// sender controls; [`encode_line_checked`] for one that may exceed the bound.
pub fn encode_line<T: Message>(msg: &T) -> Vec<u8> {
    // These types hold only strings and integers: serialisation cannot fail, and if it
    // ever did the peer would see an empty line and ignore it.
    let mut line = serde_json::to_vec(msg).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Encodes one message as a line, refusing one longer than its receiver accepts.
pub fn encode_line_checked<T: Message>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let line = encode_line(msg);
    // Without the newline, as the receiver counts.
    let len = line.len() - 1;
    if len > T::MAX_LINE {
        return Err(ProtocolError::LineTooLong {
            len,
            max: T::MAX_LINE,
        });
    }
    Ok(line)
}

/// Decodes one line (with or without its `\n`).
pub fn decode_line<T: Message>(line: &[u8]) -> Result<T, ProtocolError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.len() > T::MAX_LINE {
        return Err(ProtocolError::LineTooLong {
            len: line.len(),
            max: T::MAX_LINE,
        });
    }
    Ok(serde_json::from_slice(line)?)
}

/// Splits a byte stream into lines of at most `max` bytes. Used by the guest, which
/// reads a non-blocking port without a buffered reader.
///
/// Memory is bounded by `max`: a longer line is dropped as it arrives, reported once,
/// and the rest of it, up to its `\n`, skipped.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
    /// How much of `buf` is known to hold no `\n` (a large line arrives in many reads:
    /// each is searched once).
    scanned: usize,
    /// Inside an oversized line: bytes are dropped up to the next `\n`.
    skipping: bool,
}

impl LineSplitter {
    /// A splitter for lines of at most `max` bytes.
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter {
            buf: Vec::new(),
            max,
            scanned: 0,
            skipping: false,
        }
    }

    /// A splitter for the lines of message type `T`.
    pub fn for_messages<T: Message>() -> LineSplitter {
        LineSplitter::new(T::MAX_LINE)
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        let mut bytes = bytes;
        if self.skipping {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.skipping = false;
                    bytes = &bytes[i + 1..];
                }
                None => return,
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next complete line (without `\n`). A line over the bound is dropped and
    /// reported once as an error.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, ProtocolError>> {
        let found = self.buf[self.scanned..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| self.scanned + i);
        match found {
            Some(i) => {
                self.scanned = 0;
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.len() > self.max {
                    return Some(Err(ProtocolError::LineTooLong {
                        len: line.len(),
                        max: self.max,
                    }));
                }
                Some(Ok(line))
            }
            None if self.buf.len() > self.max => {
                let len = self.buf.len();
                self.buf = Vec::new();
                self.scanned = 0;
                self.skipping = true;
                Some(Err(ProtocolError::LineTooLong { len, max: self.max }))
            }
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// Forgets a partial line (the peer went away mid-line).
    pub fn clear(&mut self) {
        self.buf = Vec::new();
        self.scanned = 0;
        self.skipping = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> Claim {
        Claim {
            hostname: "web-1".into(),
            command: vec!["httpd".into(), "-f".into()],
            env: vec![("A".into(), "b c".into())],
            workdir: Some("/srv".into()),
            user: Some("app".into()),
            ports: vec![80],
            now_unix_ms: 1_700_000_000_123,
            entropy: "00ff".into(),
        }
    }

    #[test]
    fn wire_format_is_stable() {
        assert_eq!(
            encode_line(&HostMessage::Status),
            b"{\"type\":\"status\"}\n"
        );
        assert_eq!(
            encode_line(&GuestMessage::Exited {
                status: ExitStatus::Code(7)
            }),
            b"{\"type\":\"exited\",\"status\":{\"code\":7}}\n"
        );
        assert_eq!(
            encode_line(&GuestMessage::Status {
                state: GuestState::Ready { boot_ms: 5 }
            }),
            b"{\"type\":\"status\",\"state\":{\"phase\":\"ready\",\"boot_ms\":5}}\n"
        );
        assert_eq!(
            encode_line(&GuestMessage::Status {
                state: GuestState::Idle
            }),
            b"{\"type\":\"status\",\"state\":{\"phase\":\"idle\"}}\n"
        );
        assert_eq!(
            String::from_utf8(encode_line(&HostMessage::Claim(Box::new(claim())))).unwrap(),
            "{\"type\":\"claim\",\"hostname\":\"web-1\",\"command\":[\"httpd\",\"-f\"],\
             \"env\":[[\"A\",\"b c\"]],\"workdir\":\"/srv\",\"user\":\"app\",\"ports\":[80],\
             \"now_unix_ms\":1700000000123,\"entropy\":\"00ff\"}\n"
        );
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            GuestMessage::Ready { boot_ms: 812 },
            GuestMessage::Exited {
                status: ExitStatus::Signal(9),
            },
            GuestMessage::Status {
                state: GuestState::Exited {
                    boot_ms: Some(1),
                    status: ExitStatus::Code(0),
                },
            },
            GuestMessage::Status {
                state: GuestState::Failed { error: "x".into() },
            },
            GuestMessage::Status {
                state: GuestState::Starting,
            },
            GuestMessage::Status {
                state: GuestState::Idle,
            },
            GuestMessage::Status {
                state: GuestState::Exited {
                    boot_ms: None,
                    status: ExitStatus::Code(1),
                },
            },
            GuestMessage::ShuttingDown,
            GuestMessage::Fatal {
                error: "no root disk".into(),
            },
        ];
        for m in msgs {
            assert_eq!(decode_line::<GuestMessage>(&encode_line(&m)).unwrap(), m);
        }
        for m in [
            HostMessage::Status,
            HostMessage::Shutdown,
            HostMessage::Claim(Box::new(claim())),
        ] {
            assert_eq!(decode_line::<HostMessage>(&encode_line(&m)).unwrap(), m);
        }
    }

    #[test]
    fn a_claim_carries_the_workload_of_a_config_and_gives_it_back() {
        let base = GuestConfig {
            machine_id: "m-1".into(),
            hostname: "prepared-placeholder".into(),
            network: None,
            command: vec![],
            env: vec![],
            workdir: None,
            ports: vec![],
            user: None,
            prepared: true,
            overlay_root: false,
        };
        let wanted = GuestConfig {
            hostname: "web-1".into(),
            command: vec!["httpd".into(), "-f".into()],
            env: vec![("A".into(), "b c".into())],
            workdir: Some("/srv".into()),
            ports: vec![80],
            user: Some("app".into()),
            prepared: false,
            overlay_root: false,
            ..base.clone()
        };
        let c = Claim::from_config(&wanted, 1_700_000_000_123, "00ff".into());
        assert_eq!(c, claim());
        assert_eq!(c.workload_config(&base), wanted);
    }

    #[test]
    fn claim_entropy_is_fresh_hex_of_the_declared_size() {
        let a = claim_entropy().unwrap();
        let b = claim_entropy().unwrap();
        assert_eq!(hex::decode(&a).unwrap().len(), CLAIM_ENTROPY_BYTES);
        assert_ne!(a, b);
    }

    #[test]
    fn lines_are_bounded_per_direction() {
        // A claim as large as a config disk may be goes through; the guest's lines stay
        // small.
        let mut big = claim();
        big.env = vec![("BIG".into(), "x".repeat(MAX_CONFIG_JSON - 1024))];
        let line = encode_line_checked(&HostMessage::Claim(Box::new(big.clone()))).unwrap();
        assert!(line.len() > MAX_GUEST_LINE);
        assert_eq!(
            decode_line::<HostMessage>(&line).unwrap(),
            HostMessage::Claim(Box::new(big.clone()))
        );
        assert!(matches!(
            decode_line::<GuestMessage>(&line),
            Err(ProtocolError::LineTooLong {
                max: MAX_GUEST_LINE,
                ..
            })
        ));

        // One byte over the host bound is refused before sending, naming its size.
        let overhead = encode_line(&HostMessage::Claim(Box::new(Claim {
            env: vec![("BIG".into(), String::new())],
            ..claim()
        })))
        .len()
            - 1;
        big.env = vec![("BIG".into(), "x".repeat(MAX_HOST_LINE - overhead + 1))];
        let err = encode_line_checked(&HostMessage::Claim(Box::new(big))).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::LineTooLong { len, max: MAX_HOST_LINE } if len == MAX_HOST_LINE + 1
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(&(MAX_HOST_LINE + 1).to_string()));
    }

    #[test]
    fn splitter_handles_partial_and_oversized_lines() {
        let mut s = LineSplitter::for_messages::<HostMessage>();
        s.push(b"{\"type\":\"sta");
        assert!(s.next_line().is_none());
        s.push(b"tus\"}\n{\"type\":\"shutdown\"}\n");
        let a = s.next_line().unwrap().unwrap();
        assert_eq!(decode_line::<HostMessage>(&a).unwrap(), HostMessage::Status);
        let b = s.next_line().unwrap().unwrap();
        assert_eq!(
            decode_line::<HostMessage>(&b).unwrap(),
            HostMessage::Shutdown
        );
        assert!(s.next_line().is_none());

        // An oversized line is reported once; its tail, arriving later, is skipped up to
        // its newline, and the next line comes through whole.
        let mut s = LineSplitter::new(20);
        s.push(&[b'x'; 21]);
        assert!(matches!(
            s.next_line(),
            Some(Err(ProtocolError::LineTooLong { len: 21, max: 20 }))
        ));
        assert!(s.next_line().is_none());
        s.push(b"xxxx");
        assert!(s.next_line().is_none());
        s.push(b"xx\n{\"type\":\"status\"}\n");
        assert_eq!(s.next_line().unwrap().unwrap(), b"{\"type\":\"status\"}");
        assert!(s.next_line().is_none());

        // A line that arrives whole but too long is an error too; what follows is kept.
        s.push(b"0123456789abcdefghijk\nok\n");
        assert!(matches!(
            s.next_line(),
            Some(Err(ProtocolError::LineTooLong { len: 21, max: 20 }))
        ));
        assert_eq!(s.next_line().unwrap().unwrap(), b"ok");
    }

    #[test]
    fn a_large_line_arriving_in_pieces_is_searched_once() {
        let mut s = LineSplitter::for_messages::<HostMessage>();
        let line = encode_line(&HostMessage::Claim(Box::new(Claim {
            env: vec![("BIG".into(), "y".repeat(MAX_CONFIG_JSON / 2))],
            ..claim()
        })));
        for chunk in line.chunks(4096) {
            s.push(chunk);
            if chunk.last() != Some(&b'\n') {
                assert!(s.next_line().is_none());
                assert_eq!(s.scanned, s.buf.len());
            }
        }
        let got = s.next_line().unwrap().unwrap();
        assert_eq!(got.len() + 1, line.len());
        assert!(matches!(
            decode_line::<HostMessage>(&got).unwrap(),
            HostMessage::Claim(_)
        ));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_line::<HostMessage>(b"hello").is_err());
        assert!(decode_line::<HostMessage>(b"{\"type\":\"reboot\"}").is_err());
        assert!(decode_line::<HostMessage>(b"{\"type\":\"claim\"}").is_err());
    }
}

/// Property tests of the decoders ("fuzzing" on the stable toolchain): arbitrary bytes,
/// arbitrary splits of a stream, huge lines, invalid UTF-8, and valid messages with
/// mutated bytes. `HEARTH_FUZZ_CASES` sets the cases per property (a small default keeps
/// CI fast; a long local run sets it high).
#[cfg(test)]
pub(crate) mod fuzz {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    /// Cases per property: `HEARTH_FUZZ_CASES`, else 256.
    pub(crate) fn cases() -> u32 {
        std::env::var("HEARTH_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256)
    }

    pub(crate) fn config() -> ProptestConfig {
        ProptestConfig {
            cases: cases(),
            // A failure is worth shrinking, but not for minutes.
            max_shrink_iters: 2048,
            ..ProptestConfig::default()
        }
    }

    fn exit_status() -> impl Strategy<Value = ExitStatus> {
        prop_oneof![
            any::<i32>().prop_map(ExitStatus::Code),
            any::<i32>().prop_map(ExitStatus::Signal),
        ]
    }

    fn guest_state() -> impl Strategy<Value = GuestState> {
        prop_oneof![
            Just(GuestState::Idle),
            Just(GuestState::Starting),
            any::<u64>().prop_map(|boot_ms| GuestState::Ready { boot_ms }),
            (proptest::option::of(any::<u64>()), exit_status())
                .prop_map(|(boot_ms, status)| GuestState::Exited { boot_ms, status }),
            Just(GuestState::ShuttingDown),
            any::<String>().prop_map(|error| GuestState::Failed { error }),
        ]
    }

    /// Any guest message, with any field values.
    pub(crate) fn guest_message() -> impl Strategy<Value = GuestMessage> {
        prop_oneof![
            any::<u64>().prop_map(|boot_ms| GuestMessage::Ready { boot_ms }),
            exit_status().prop_map(|status| GuestMessage::Exited { status }),
            guest_state().prop_map(|state| GuestMessage::Status { state }),
            Just(GuestMessage::ShuttingDown),
            any::<String>().prop_map(|error| GuestMessage::Fatal { error }),
        ]
    }

    fn claim() -> impl Strategy<Value = Claim> {
        (
            any::<String>(),
            vec(any::<String>(), 0..4),
            vec((any::<String>(), any::<String>()), 0..4),
            proptest::option::of(any::<String>()),
            proptest::option::of(any::<String>()),
            vec(any::<u16>(), 0..4),
            any::<u64>(),
            "[0-9a-f]{0,128}",
        )
            .prop_map(
                |(hostname, command, env, workdir, user, ports, now_unix_ms, entropy)| Claim {
                    hostname,
                    command,
                    env,
                    workdir,
                    user,
                    ports,
                    now_unix_ms,
                    entropy,
                },
            )
    }

    fn host_message() -> impl Strategy<Value = HostMessage> {
        prop_oneof![
            Just(HostMessage::Status),
            Just(HostMessage::Shutdown),
            claim().prop_map(|c| HostMessage::Claim(Box::new(c))),
        ]
    }

    /// One change to an encoded line: a byte replaced, inserted or removed.
    #[derive(Debug, Clone)]
    enum Mutation {
        Replace(usize, u8),
        Insert(usize, u8),
        Remove(usize),
    }

    fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
        vec(
            prop_oneof![
                (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i, b)),
                (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
                any::<usize>().prop_map(Mutation::Remove),
            ],
            1..6,
        )
    }

    fn mutate(mut line: Vec<u8>, changes: &[Mutation]) -> Vec<u8> {
        for m in changes {
            match *m {
                Mutation::Replace(i, b) if !line.is_empty() => {
                    let i = i % line.len();
                    line[i] = b;
                }
                Mutation::Insert(i, b) => {
                    let i = i % (line.len() + 1);
                    line.insert(i, b);
                }
                Mutation::Remove(i) if !line.is_empty() => {
                    let i = i % line.len();
                    line.remove(i);
                }
                _ => {}
            }
        }
        line
    }

    /// A decoded message is one the encoder gives back: whatever the decoder accepts
    /// means one thing.
    fn decodes_consistently<T: Message + PartialEq + std::fmt::Debug>(line: &[u8]) {
        if let Ok(msg) = decode_line::<T>(line) {
            let again = encode_line(&msg);
            assert_eq!(decode_line::<T>(&again).ok().as_ref(), Some(&msg));
        }
    }

    /// Pieces of a hostile stream: messages, garbage, over-long lines hiding a message.
    #[derive(Debug, Clone)]
    pub(crate) enum Piece {
        Message(GuestMessage),
        Bytes(Vec<u8>),
        /// `n` spaces then a Ready, with no newline between: one line over the bound
        /// when `n` is large.
        Padded(usize),
    }

    pub(crate) fn piece() -> impl Strategy<Value = Piece> {
        prop_oneof![
            4 => guest_message().prop_map(Piece::Message),
            4 => vec(any::<u8>(), 0..300).prop_map(Piece::Bytes),
            1 => (MAX_GUEST_LINE - 40..MAX_GUEST_LINE * 3).prop_map(Piece::Padded),
        ]
    }

    impl Piece {
        pub(crate) fn bytes(&self) -> Vec<u8> {
            match self {
                Piece::Message(m) => encode_line(m),
                Piece::Bytes(b) => b.clone(),
                Piece::Padded(n) => {
                    let mut line = vec![b' '; *n];
                    line.extend(encode_line(&GuestMessage::Ready { boot_ms: 1 }));
                    line
                }
            }
        }
    }

    /// What a correct receiver makes of a stream: every complete line within the bound
    /// that decodes, in order; nothing from a longer line, nor from an unfinished one.
    pub(crate) fn expected_messages(stream: &[u8]) -> Vec<GuestMessage> {
        let mut lines: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
        // The last piece has no newline after it: an unfinished line.
        lines.pop();
        lines
            .into_iter()
            .filter(|l| l.len() <= MAX_GUEST_LINE)
            .filter_map(|l| decode_line::<GuestMessage>(l).ok())
            .collect()
    }

    /// Cuts `stream` into chunks at the given (arbitrary) offsets.
    pub(crate) fn chunks(stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        at.push(0);
        at.push(stream.len());
        at.sort_unstable();
        at.dedup();
        at.windows(2).map(|w| stream[w[0]..w[1]].to_vec()).collect()
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in vec(any::<u8>(), 0..2048)) {
            decodes_consistently::<GuestMessage>(&bytes);
            decodes_consistently::<HostMessage>(&bytes);
        }

        #[test]
        fn text_that_looks_like_json_never_panics_the_decoders(
            text in r#"[{}\[\]":,0-9a-z_ \\-]{0,200}"#,
        ) {
            decodes_consistently::<GuestMessage>(text.as_bytes());
            decodes_consistently::<HostMessage>(text.as_bytes());
        }

        #[test]
        fn every_message_round_trips(g in guest_message(), h in host_message()) {
            prop_assert_eq!(decode_line::<GuestMessage>(&encode_line(&g)).ok(), Some(g));
            prop_assert_eq!(decode_line::<HostMessage>(&encode_line(&h)).ok(), Some(h));
        }

        #[test]
        fn mutated_messages_never_panic_the_decoders(
            g in guest_message(),
            h in host_message(),
            changes in mutations(),
        ) {
            decodes_consistently::<GuestMessage>(&mutate(encode_line(&g), &changes));
            decodes_consistently::<HostMessage>(&mutate(encode_line(&h), &changes));
        }

        #[test]
        fn a_line_over_the_bound_is_refused_whatever_it_holds(
            pad in 1..4096usize,
            g in guest_message(),
        ) {
            let mut line = vec![b' '; MAX_GUEST_LINE + pad];
            line.extend(encode_line(&g));
            let refused = matches!(
                decode_line::<GuestMessage>(&line),
                Err(ProtocolError::LineTooLong { max: MAX_GUEST_LINE, .. })
            );
            prop_assert!(refused);
        }

        /// The guest's splitter (for host lines, and any bound): any stream cut anywhere
        /// gives the lines a whole read would, over-long ones reported once each as
        /// errors, and never holds more than the bound between reads.
        #[test]
        fn the_splitter_is_bounded_and_agrees_with_a_whole_read(
            max in 1..400usize,
            pieces in vec(prop_oneof![
                vec(any::<u8>(), 0..100),
                (0..1000usize).prop_map(|n| vec![b'x'; n]),
                Just(b"\n".to_vec()),
            ], 0..30),
            cuts in vec(any::<usize>(), 0..40),
        ) {
            let stream: Vec<u8> = pieces.concat();
            let mut want: Vec<Result<Vec<u8>, usize>> = Vec::new();
            let mut parts: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
            let unfinished = parts.pop().unwrap_or_default();
            for l in parts {
                want.push(if l.len() <= max { Ok(l.to_vec()) } else { Err(l.len()) });
            }
            if unfinished.len() > max {
                want.push(Err(unfinished.len()));
            }
            let mut s = LineSplitter::new(max);
            let mut got: Vec<Result<Vec<u8>, usize>> = Vec::new();
            for chunk in chunks(&stream, &cuts) {
                s.push(&chunk);
                while let Some(line) = s.next_line() {
                    got.push(line.map_err(|e| match e {
                        ProtocolError::LineTooLong { len, .. } => len,
                        ProtocolError::Json(_) => usize::MAX,
                    }));
                }
                prop_assert!(s.buf.len() <= max, "{} buffered, bound {}", s.buf.len(), max);
            }
            // Lengths of over-long lines are what had arrived when refused: compare the
            // kinds and the good lines.
            let shape = |v: &[Result<Vec<u8>, usize>]| {
                v.iter()
                    .map(|r| r.clone().map_err(|_| ()))
                    .collect::<Vec<_>>()
            };
            prop_assert_eq!(shape(&got), shape(&want));
            for (g, w) in got.iter().zip(&want) {
                if let (Err(g), Err(_)) = (g, w) {
                    prop_assert!(*g > max);
                }
            }
        }
    }
}
