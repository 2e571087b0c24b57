//! A small blocking nftables client over netfilter netlink: one atomic batch of changes,
//! and the two queries the policy needs (does a chain exist, which chains does a table
//! hold). Messages are built and parsed with `netlink-packet-netfilter`'s types; this
//! file only frames a batch, sends it and reads the kernel's answers.
//!
//! A batch is all or nothing: the kernel applies every message between `BATCH_BEGIN` and
//! `BATCH_END` in one transaction, or none of them. Every message asks for an
//! acknowledgement, so the answer to a batch is one ack or error per message; the first
//! error names the message it belongs to.

use std::io;
use std::time::Duration;

use netlink_packet_netfilter::nftables::{ChainAttribute, ChainMessage, NfTablesMessage};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::sys::Socket;
use rtnetlink::sys::protocols::NETLINK_NETFILTER;

use super::error::NetError;
use super::netlink::{NlError, recv_messages};

/// `NFNL_SUBSYS_NFTABLES`: the subsystem a batch is addressed to.
const SUBSYS_NFTABLES: u16 = 10;

/// Receive buffer: larger than any datagram the kernel builds for a dump.
const RECV_BUFFER: usize = 64 * 1024;

/// How long a read may wait for the kernel. Answers come in microseconds; this only
/// bounds a wait for an answer that will never come.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

/// One change of a batch: the family its table lives in, the message, its create flags.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    /// `inet` for every table hearth makes.
    pub family: NetfilterProtoFamily,
    /// The message.
    pub message: NfTablesMessage,
    /// Extra netlink flags (`NLM_F_CREATE`, `NLM_F_APPEND`).
    pub flags: u16,
    /// What this change does, for the error that names it.
    pub what: String,
}

/// An nftables socket of the network namespace the calling thread was in when it was
/// opened.
pub(crate) struct Nfnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// A batch was refused: which change, and the kernel's reason.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub(crate) struct BatchError {
    /// The change the kernel refused (or "the batch" when the socket failed).
    pub what: String,
    /// The kernel's answer or the transport failure.
    #[source]
    pub source: NlError,
}

impl Nfnl {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> Result<Nfnl, NlError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NlError::Io)?;
        socket.bind_auto().map_err(NlError::Io)?;
        set_recv_timeout(&socket)?;
        Ok(Nfnl {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Applies `changes` in one transaction, naming `place` in an error.
    pub fn apply_in(&mut self, place: Option<&str>, changes: &[Change]) -> Result<(), NetError> {
        self.apply(changes).map_err(|e| NetError::Nftables {
            place: super::error::place(place),
            action: e.what,
            source: e.source,
        })
    }

    /// Applies `changes` in one transaction: all of them, or none.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), BatchError> {
        if changes.is_empty() {
            return Ok(());
        }
        let socket_error = |source| BatchError {
            what: "the batch".to_string(),
            source,
        };
        let mut bytes = Vec::new();
        let control = |message: ControlMessage| {
            NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, SUBSYS_NFTABLES),
                message,
            )
        };
        let begin = self.next_seq();
        frame(
            &mut bytes,
            control(ControlMessage::BatchBegin),
            NLM_F_REQUEST,
            begin,
        );
        let first = begin.wrapping_add(1);
        for change in changes {
            let seq = self.next_seq();
            let message = NetfilterMessage::new(
                NetfilterHeader::new(change.family, 0, 0),
                NetfilterMessageInner::NfTables(change.message.clone()),
            );
            frame(
                &mut bytes,
                message,
                NLM_F_REQUEST | NLM_F_ACK | change.flags,
                seq,
            );
        }
        let end = self.next_seq();
        frame(
            &mut bytes,
            control(ControlMessage::BatchEnd),
            NLM_F_REQUEST,
            end,
        );
        self.socket
            .send(&bytes, 0)
            .map_err(|e| socket_error(NlError::Io(e)))?;

        // One answer per change. The kernel reports every change it refused; the first
        // refusal is the cause, the rest follow from it.
        let mut answered = 0;
        let mut refused: Option<BatchError> = None;
        while answered < changes.len() {
            let answers = match self.receive() {
                Ok(answers) => answers,
                // The kernel may stop answering after a refusal; what it said is enough.
                Err(NlError::Io(e)) if refused.is_some() && is_timeout(&e) => break,
                Err(e) => return Err(socket_error(e)),
            };
            for (seq, payload) in answers {
                let index = seq.wrapping_sub(first) as usize;
                if index >= changes.len() {
                    continue;
                }
                if let NetlinkPayload::Error(e) = payload {
                    answered += 1;
                    if e.code.is_some() && refused.is_none() {
                        refused = Some(BatchError {
                            what: changes[index].what.clone(),
                            source: NlError::Kernel(e.to_io()),
                        });
                    }
                }
            }
        }
        match refused {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// The names of the chains of table `table` (family `inet`); empty when the table
    /// does not exist.
    pub fn chains(&mut self, table: &str) -> Result<Vec<String>, NlError> {
        let seq = self.next_seq();
        let query = NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            NetfilterMessageInner::NfTables(NfTablesMessage::GetChain(ChainMessage {
                attributes: vec![ChainAttribute::Table(table.to_string())],
            })),
        );
        let mut bytes = Vec::new();
        frame(&mut bytes, query, NLM_F_REQUEST | NLM_F_DUMP, seq);
        self.socket.send(&bytes, 0).map_err(NlError::Io)?;
        let mut names = Vec::new();
        loop {
            for (answer_seq, payload) in self.receive()? {
                if answer_seq != seq {
                    continue;
                }
                match payload {
                    NetlinkPayload::Done(_) => return Ok(names),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        let error = e.to_io();
                        if error.raw_os_error() == Some(libc::ENOENT) {
                            return Ok(Vec::new());
                        }
                        return Err(NlError::Kernel(error));
                    }
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewChain(chain)),
                        ..
                    }) => {
                        let in_table = chain
                            .attributes
                            .iter()
                            .any(|a| matches!(a, ChainAttribute::Table(t) if t == table));
                        let name = chain.attributes.iter().find_map(|a| match a {
                            ChainAttribute::Name(name) => Some(name.clone()),
                            _ => None,
                        });
                        if let (true, Some(name)) = (in_table, name) {
                            names.push(name);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Whether table `table` (family `inet`) holds chain `chain`.
    pub fn has_chain(&mut self, table: &str, chain: &str) -> Result<bool, NlError> {
        let seq = self.next_seq();
        let query = NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            NetfilterMessageInner::NfTables(NfTablesMessage::GetChain(ChainMessage {
                attributes: vec![
                    ChainAttribute::Table(table.to_string()),
                    ChainAttribute::Name(chain.to_string()),
                ],
            })),
        );
        let mut bytes = Vec::new();
        frame(&mut bytes, query, NLM_F_REQUEST | NLM_F_ACK, seq);
        self.socket.send(&bytes, 0).map_err(NlError::Io)?;
        let mut found = false;
        loop {
            for (answer_seq, payload) in self.receive()? {
                if answer_seq != seq {
                    continue;
                }
                match payload {
                    NetlinkPayload::InnerMessage(_) => found = true,
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(found),
                            Some(_) => {
                                let error = e.to_io();
                                if error.raw_os_error() == Some(libc::ENOENT) {
                                    Ok(false)
                                } else {
                                    Err(NlError::Kernel(error))
                                }
                            }
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// Reads one datagram and decodes every message in it, with its sequence number.
    fn receive(&mut self) -> Result<Vec<(u32, NetlinkPayload<NetfilterMessage>)>, NlError> {
        let mut out = Vec::new();
        for (seq, bytes) in recv_messages(&self.socket, &mut self.buf)? {
            let message = NetlinkMessage::<NetfilterMessage>::deserialize(bytes)
                .map_err(|e| NlError::Protocol(e.to_string()))?;
            out.push((seq, message.payload));
        }
        Ok(out)
    }
}

/// Appends one framed message to `bytes`.
fn frame(bytes: &mut Vec<u8>, message: NetfilterMessage, flags: u16, seq: u32) {
    let mut packet = NetlinkMessage::from(message);
    packet.header.flags = flags;
    packet.header.sequence_number = seq;
    packet.finalize();
    let start = bytes.len();
    bytes.resize(start + packet.buffer_len(), 0);
    packet.serialize(&mut bytes[start..]);
}

fn set_recv_timeout(socket: &Socket) -> Result<(), NlError> {
    use std::os::fd::AsRawFd;
    let timeout = libc::timeval {
        tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: a valid socket and a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(NlError::Io(io::Error::last_os_error()));
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
