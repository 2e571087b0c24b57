//! Admission of network connections from parties the host does not trust (guests, API
//! clients): at most so many open per client address and in all. A connection over
//! either bound is closed at once, and counted in a warning logged at most every
//! [`WARN_EVERY`]; so neither one client nor many can take the daemon's descriptors,
//! which it needs for pidfds, taps and its store.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::text::Throttled;

/// How often a refusal is logged at most (the rest are counted in the next line).
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// The connections open now, per client and in total.
#[derive(Clone)]
pub struct Limits {
    what: &'static str,
    per_client: usize,
    total: Arc<tokio::sync::Semaphore>,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    refused: Arc<Throttled>,
}

impl Limits {
    /// At most `per_client` connections of one address and `total` in all, for the
    /// listener `what` (named in the warning).
    pub fn new(what: &'static str, per_client: usize, total: usize) -> Limits {
        Limits {
            what,
            per_client,
            total: Arc::new(tokio::sync::Semaphore::new(total)),
            open: Arc::default(),
            refused: Arc::new(Throttled::new(WARN_EVERY)),
        }
    }

    /// A place for one more connection of `client`, or none when a bound is reached
    /// (then counted, and now and then logged). The place is given back when the
    /// [`Slot`] is dropped.
    pub fn admit(&self, client: IpAddr) -> Option<Slot> {
        let slot = self.try_admit(client);
        if slot.is_none()
            && let Some(suppressed) = self.refused.allow()
        {
            tracing::warn!(
                listener = self.what,
                %client,
                refused_since_last = suppressed + 1,
                per_client = self.per_client,
                "connections over the limit closed"
            );
        }
        slot
    }

    fn try_admit(&self, client: IpAddr) -> Option<Slot> {
        let permit = Arc::clone(&self.total).try_acquire_owned().ok()?;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(client).or_default();
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(Slot {
            _permit: permit,
            client,
            open: Arc::clone(&self.open),
        })
    }
}

/// One admitted connection's place.
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    client: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// An admitted connection: the stream, holding its place until it is dropped.
pub struct Admitted<S> {
    inner: S,
    _slot: Slot,
}

impl<S> Admitted<S> {
    /// `inner`, holding `slot`.
    pub fn new(inner: S, slot: Slot) -> Admitted<S> {
        Admitted { inner, _slot: slot }
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Admitted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The admitted connections of `listener`, as a stream a server takes: one over the
/// bounds is closed at once and not yielded; an accept error (out of descriptors) is
/// yielded after a short pause, so a full table does not spin.
pub fn incoming(
    listener: tokio::net::TcpListener,
    limits: Limits,
) -> impl futures::Stream<Item = std::io::Result<Admitted<tokio::net::TcpStream>>> {
    futures::stream::unfold((listener, limits), |(listener, limits)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let Some(slot) = limits.admit(peer.ip()) else {
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(Admitted::new(stream, slot)), (listener, limits)));
                }
                Err(e) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Some((Err(e), (listener, limits)));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_per_client_and_in_all_and_places_come_back() {
        let limits = Limits::new("test", 2, 3);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = limits.admit(a).expect("a 1");
        let _second = limits.admit(a).expect("a 2");
        assert!(limits.admit(a).is_none(), "a third of one client");
        let _third = limits.admit(b).expect("b 1");
        assert!(limits.admit(b).is_none(), "a fourth in all");
        drop(first);
        assert!(limits.admit(a).is_some(), "a place came back");
    }
}
