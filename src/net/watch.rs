//! Waiting for root-namespace links to go away, driven by the kernel's link events.
//!
//! Deleting a namespace returns at once, but the kernel tears it down later, on its own
//! work queue: until then the host end of the machine's veth pair (and its route) is
//! still in the root namespace. Deleting that link ourselves instead is synchronous and
//! costs ~33 ms; the kernel usually finishes in about one millisecond (see
//! `apply::TEARDOWN_WAIT` for when it takes longer). So the fabric subscribes to link
//! events before it deletes a namespace, then re-checks the link each time something
//! happens, until it is gone or a deadline passes.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, SocketAddr};

use super::netlink::{NlError, Rtnl};

/// Multicast group mask of link events (`RTMGRP_LINK`).
const RTMGRP_LINK: u32 = 1;

/// Even without an event the link is re-checked this often, so a missed event (socket
/// buffer overrun) costs at most this much.
const RECHECK: Duration = Duration::from_millis(20);

/// A subscription to link events of the namespace it was opened in.
pub(crate) struct LinkWatch {
    socket: Socket,
    buf: Vec<u8>,
}

impl LinkWatch {
    /// Subscribes. Events that happen after this returns are seen by [`LinkWatch::wait`].
    pub fn open() -> Result<LinkWatch, NlError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NlError::Io)?;
        socket
            .bind(&SocketAddr::new(0, RTMGRP_LINK))
            .map_err(NlError::Io)?;
        socket.set_non_blocking(true).map_err(NlError::Io)?;
        // An overrun only means "look again", which the re-check does anyway.
        socket.set_no_enobufs(true).map_err(NlError::Io)?;
        Ok(LinkWatch {
            socket,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Blocks until a link event arrives or `timeout` passes, then drops every queued
    /// event: callers re-check the state they care about instead of parsing events.
    fn wait(&mut self, timeout: Duration) -> Result<(), NlError> {
        let millis = u16::try_from(timeout.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(NlError::Io(e.into())),
        }
        loop {
            self.buf.clear();
            match self.socket.recv(&mut self.buf, 0) {
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NlError::Io(e)),
            }
        }
    }

    /// Waits until no link with index `index` and name `name` exists in `rtnl`'s
    /// namespace, or `deadline` passes. Returns whether the link is gone.
    pub fn wait_gone(
        &mut self,
        rtnl: &mut Rtnl,
        index: u32,
        name: &str,
        deadline: Instant,
    ) -> Result<bool, NlError> {
        loop {
            if !link_exists(rtnl, index, name)? {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            self.wait((deadline - now).min(RECHECK))?;
        }
    }
}

/// Whether the link `index` still exists under `name`. Both must match: an index is only
/// reused after the kernel cycles through the whole index space, and checking the name
/// too means a reused index never keeps a caller waiting.
fn link_exists(rtnl: &mut Rtnl, index: u32, name: &str) -> Result<bool, NlError> {
    let mut query = LinkMessage::default();
    query.header.index = index;
    match rtnl.get(RouteNetlinkMessage::GetLink(query)) {
        Ok(RouteNetlinkMessage::NewLink(link)) => Ok(link
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))),
        Ok(_) => Err(NlError::Protocol(
            "a link query was answered with something else".to_string(),
        )),
        Err(e) if e.is(libc::ENODEV) => Ok(false),
        Err(e) => Err(e),
    }
}
