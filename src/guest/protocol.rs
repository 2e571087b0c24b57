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
//! guest -> host   {"type":"ready","boot_ms":812}    workload started, its ports listen
//!                 {"type":"exited","status":{"code":7}}
//!                 {"type":"status","state":{...}}   reply to Status
//!                 {"type":"shutting_down"}          reply to Shutdown
//!                 {"type":"fatal","error":"..."}    init failed; the guest powers off
//! ```

use serde::{Deserialize, Serialize};

/// Name of the virtio-serial port (`/sys/class/virtio-ports/*/name` in the guest).
pub const AGENT_PORT_NAME: &str = "hearth.agent";
/// Longest line either side accepts; a longer one is a protocol error.
pub const MAX_LINE: usize = 64 * 1024;

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
///   Starting --(declared ports listen)--> Ready --(workload ends)--> Exited
///      |                                                ^
///      +---------(workload ends before ready)-----------+
///   any --Shutdown--> ShuttingDown --> (power off)
///   any --fatal error--> Failed --> (power off)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum GuestState {
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
            GuestState::Starting | GuestState::ShuttingDown | GuestState::Failed { .. } => None,
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
    /// Reply to [`HostMessage::Status`], also sent unasked when a host connects.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    /// Asks for the guest's current state.
    Status,
    /// Asks the guest to stop the workload and power off.
    Shutdown,
}

/// Why a line is not a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Longer than [`MAX_LINE`].
    #[error("agent line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// Not valid JSON for the expected message type.
    #[error("agent message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes one message as a line (JSON plus `\n`).
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    // These types hold only strings and integers: serialisation cannot fail, and if it
    // ever did the peer would see an empty line and ignore it.
    let mut line = serde_json::to_vec(msg).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Decodes one line (with or without its `\n`).
pub fn decode_line<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, ProtocolError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.len() > MAX_LINE {
        return Err(ProtocolError::LineTooLong);
    }
    Ok(serde_json::from_slice(line)?)
}

/// Splits a byte stream into lines. Used by the guest, which reads a non-blocking port
/// without a buffered reader.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next complete line (without `\n`). A line over [`MAX_LINE`] is dropped
    /// and reported once as an error.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, ProtocolError>> {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.len() > MAX_LINE {
                    return Some(Err(ProtocolError::LineTooLong));
                }
                Some(Ok(line))
            }
            None if self.buf.len() > MAX_LINE => {
                self.buf.clear();
                Some(Err(ProtocolError::LineTooLong))
            }
            None => None,
        }
    }

    /// Forgets a partial line (the peer went away mid-line).
    pub fn clear(&mut self) {
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for m in [HostMessage::Status, HostMessage::Shutdown] {
            assert_eq!(decode_line::<HostMessage>(&encode_line(&m)).unwrap(), m);
        }
    }

    #[test]
    fn splitter_handles_partial_and_oversized_lines() {
        let mut s = LineSplitter::default();
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
        s.push(&vec![b'x'; MAX_LINE + 1]);
        assert!(matches!(
            s.next_line(),
            Some(Err(ProtocolError::LineTooLong))
        ));
        assert!(s.next_line().is_none());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_line::<HostMessage>(b"hello").is_err());
        assert!(decode_line::<HostMessage>(b"{\"type\":\"reboot\"}").is_err());
    }
}
