//! A small blocking route-netlink client, used only on the fabric's own worker threads.
//!
//! Why not rtnetlink's async `Handle`: a netlink socket belongs to the namespace it was
//! opened in, so every machine namespace needs its own socket; with the async client that
//! means a connection task per namespace and per call, and an extra channel hop for every
//! request. The worker threads run one request at a time anyway (the kernel serialises
//! link changes under one lock), so a plain socket with send, then read until the answer
//! with the same sequence number, is both simpler and faster. Messages are still built
//! and parsed with rtnetlink's packet types.

use std::io;

use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::Socket;
use rtnetlink::sys::protocols::NETLINK_ROUTE;

/// How often a dump that the kernel flagged as interrupted is retried before its last
/// result is used as is.
const DUMP_ATTEMPTS: usize = 3;

/// Receive buffer: larger than the biggest datagram the kernel builds for a dump (32 KiB).
const RECV_BUFFER: usize = 64 * 1024;

/// A netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// The kernel answered with an error code.
    #[error("{0}")]
    Kernel(io::Error),
    /// The socket itself failed (open, send, receive).
    #[error("netlink socket: {0}")]
    Io(#[source] io::Error),
    /// The answer could not be decoded or did not fit the request.
    #[error("netlink answer: {0}")]
    Protocol(String),
}

impl NlError {
    /// The kernel's error number, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Kernel(e) => e.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the kernel answered with `errno`.
    pub fn is(&self, errno: i32) -> bool {
        self.errno() == Some(errno)
    }
}

/// A route-netlink socket of the namespace the calling thread was in when it was opened.
pub(crate) struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> Result<Rtnl, NlError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NlError::Io)?;
        socket.bind_auto().map_err(NlError::Io)?;
        Ok(Rtnl {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<u32, NlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut packet = NetlinkMessage::from(message);
        packet.header.flags = flags;
        packet.header.sequence_number = self.seq;
        packet.finalize();
        let mut bytes = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map_err(NlError::Io)?;
        Ok(self.seq)
    }

    /// Reads one datagram and decodes the messages in it that answer `seq`. Messages with
    /// another sequence number are the tail of an earlier request that failed half way;
    /// they are dropped.
    fn receive(&mut self, seq: u32) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>, NlError> {
        let mut out = Vec::new();
        for (answer_seq, bytes) in recv_messages(&self.socket, &mut self.buf)? {
            if answer_seq == seq {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| NlError::Protocol(e.to_string()))?;
                out.push(message);
            }
        }
        Ok(out)
    }

    /// Sends a change request and waits for the kernel's acknowledgement.
    pub fn ack(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<(), NlError> {
        let seq = self.send(message, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        loop {
            for answer in self.receive(seq)? {
                if let NetlinkPayload::Error(e) = answer.payload {
                    return match e.code {
                        None => Ok(()),
                        Some(_) => Err(NlError::Kernel(e.to_io())),
                    };
                }
            }
        }
    }

    /// Sends a query for one object and returns the kernel's single answer.
    pub fn get(&mut self, message: RouteNetlinkMessage) -> Result<RouteNetlinkMessage, NlError> {
        let seq = self.send(message, NLM_F_REQUEST)?;
        loop {
            for answer in self.receive(seq)? {
                match answer.payload {
                    NetlinkPayload::InnerMessage(inner) => return Ok(inner),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(NlError::Kernel(e.to_io()));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Dumps a table. A dump the kernel flags as interrupted by a concurrent change is
    /// retried a few times, so the answer is a consistent snapshot whenever one can be had.
    pub fn dump(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (items, interrupted) = self.dump_once(message.clone())?;
            if !interrupted || attempt >= DUMP_ATTEMPTS {
                return Ok(items);
            }
        }
    }

    fn dump_once(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool), NlError> {
        let seq = self.send(message, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut items = Vec::new();
        let mut interrupted = false;
        loop {
            for answer in self.receive(seq)? {
                interrupted |= answer.header.flags & NLM_F_DUMP_INTR != 0;
                match answer.payload {
                    NetlinkPayload::InnerMessage(inner) => items.push(inner),
                    NetlinkPayload::Done(_) => return Ok((items, interrupted)),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(NlError::Kernel(e.to_io()));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Reads one datagram from `socket` into `buf` and splits it into its messages: (sequence
/// number, bytes of the whole message). Shared by the route and netfilter clients.
pub(crate) fn recv_messages<'b>(
    socket: &Socket,
    buf: &'b mut Vec<u8>,
) -> Result<Vec<(u32, &'b [u8])>, NlError> {
    buf.clear();
    let size = loop {
        match socket.recv(buf, libc::MSG_TRUNC) {
            Ok(size) => break size,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NlError::Io(e)),
        }
    };
    if size > buf.len() {
        return Err(NlError::Protocol(format!(
            "a {size}-byte datagram did not fit the {}-byte buffer",
            buf.len()
        )));
    }
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < size {
        let rest = &buf[offset..size];
        let header =
            NetlinkBuffer::new_checked(rest).map_err(|e| NlError::Protocol(e.to_string()))?;
        let length = header.length() as usize;
        if length == 0 || length > rest.len() {
            return Err(NlError::Protocol(format!(
                "message length {length} at offset {offset} of a {size}-byte datagram"
            )));
        }
        out.push((header.sequence_number(), &rest[..length]));
        offset += (length + 3) & !3;
    }
    Ok(out)
}
