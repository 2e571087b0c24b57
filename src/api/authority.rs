//! Lets any gRPC client call the Unix socket: a request's `:authority` that is not a
//! valid URI authority is rewritten to `localhost` before the HTTP/2 server reads it.
//!
//! Why: gRPC's C core (Python's `grpcio`, Ruby, C++, PHP) sends the socket's path as
//! `:authority` (`tmp%2Fhearth%2Fhearthd.sock`), which is no URI authority, and the HTTP/2
//! layer under tonic answers such a request with RST_STREAM(PROTOCOL_ERROR): every call
//! fails unless the client sets `grpc.default_authority`. On a Unix socket the header
//! names nothing (there is one server behind it), so normalising it loses nothing.
//!
//! How: what the client sends passes through a small HTTP/2 frame reader. The
//! connection preface and every frame but HEADERS and CONTINUATION are streamed on
//! unchanged. A header block is gathered (at most [`MAX_BLOCK`] bytes), decoded with the
//! client's HPACK context, its `:authority` replaced when invalid, and encoded again with
//! a context of our own toward the server (every block goes through both, so both
//! contexts stay in step), as one HEADERS frame and CONTINUATION frames as needed;
//! padding is dropped, priority and END_STREAM kept. What the server sends passes
//! untouched. A connection that does not open with the HTTP/2 preface is passed through
//! as it is. A malformed header block ends the connection, as the server would.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What an invalid authority becomes.
const LOCAL: &[u8] = b"localhost";
/// Largest header block gathered (HEADERS plus CONTINUATION payloads).
pub const MAX_BLOCK: usize = 256 * 1024;
/// Frame payload size the server accepts from any client (HTTP/2's initial maximum).
const FRAME_MAX: usize = 16_384;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A stream from a client whose header blocks are normalised as they are read.
pub struct Normalised<S> {
    inner: S,
    rewriter: Rewriter,
    eof: bool,
}

impl<S> Normalised<S> {
    pub fn new(inner: S) -> Normalised<S> {
        Normalised {
            inner,
            rewriter: Rewriter::default(),
            eof: false,
        }
    }
}

impl<S: Connected> Connected for Normalised<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Normalised<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.rewriter.output.is_empty() {
                let n = buf.remaining().min(this.rewriter.output.len());
                buf.put_slice(&this.rewriter.output[..n]);
                this.rewriter.output.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The client is done: hand on what is left as it is (an unfinished
                // frame the server will see cut short).
                this.eof = true;
                this.rewriter.finish();
                continue;
            }
            this.rewriter.push(read.filled())?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Normalised<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Matching the preface; the bytes matched so far.
    Preface(usize),
    Frames,
    /// Not HTTP/2 with prior knowledge: everything passes unchanged.
    Transparent,
}

/// A header block being gathered.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client-to-server byte stream's state (see the module doc).
pub struct Rewriter {
    phase: Phase,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Payload bytes of the current streamed frame still to copy.
    passthrough: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
}

impl Default for Rewriter {
    fn default() -> Rewriter {
        Rewriter {
            phase: Phase::Preface(0),
            input: Vec::new(),
            output: Vec::new(),
            passthrough: 0,
            block: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
        }
    }
}

fn malformed(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from the client: {why}"),
    )
}

impl Rewriter {
    /// Takes bytes from the client; what may go on to the server is then in `output`.
    pub fn push(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.input.extend_from_slice(bytes);
        self.process()
    }

    /// The client sent its last byte: whatever is left goes on as it is.
    pub fn finish(&mut self) {
        self.output.append(&mut self.input);
    }

    /// Bytes ready for the server.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.phase {
                Phase::Transparent => {
                    self.output.append(&mut self.input);
                    return Ok(());
                }
                Phase::Preface(matched) => {
                    let want = &PREFACE[matched..];
                    let n = want.len().min(self.input.len());
                    if self.input[..n] != want[..n] {
                        self.phase = Phase::Transparent;
                        continue;
                    }
                    self.output.extend(self.input.drain(..n));
                    self.phase = if matched + n == PREFACE.len() {
                        Phase::Frames
                    } else {
                        Phase::Preface(matched + n)
                    };
                    if self.phase != Phase::Frames {
                        return Ok(());
                    }
                }
                Phase::Frames => {
                    if self.passthrough > 0 {
                        let n = self.passthrough.min(self.input.len());
                        if n == 0 {
                            return Ok(());
                        }
                        self.output.extend(self.input.drain(..n));
                        self.passthrough -= n;
                        continue;
                    }
                    if self.input.len() < 9 {
                        return Ok(());
                    }
                    let len = usize::from(self.input[0]) << 16
                        | usize::from(self.input[1]) << 8
                        | usize::from(self.input[2]);
                    let kind = self.input[3];
                    let flags = self.input[4];
                    let stream = u32::from_be_bytes([
                        self.input[5],
                        self.input[6],
                        self.input[7],
                        self.input[8],
                    ]) & 0x7fff_ffff;
                    let header_frame = kind == HEADERS || kind == CONTINUATION;
                    if !header_frame {
                        if self.block.is_some() {
                            return Err(malformed("a frame inside a header block"));
                        }
                        self.output.extend(self.input.drain(..9));
                        self.passthrough = len;
                        continue;
                    }
                    if len > MAX_BLOCK {
                        return Err(malformed("a header frame over the bound"));
                    }
                    if self.input.len() < 9 + len {
                        return Ok(());
                    }
                    let payload: Vec<u8> = self.input.drain(..9 + len).skip(9).collect();
                    self.header_frame(kind, flags, stream, &payload)?;
                }
            }
        }
    }

    fn header_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> io::Result<()> {
        if kind == HEADERS {
            if self.block.is_some() {
                return Err(malformed("HEADERS inside a header block"));
            }
            let mut body = payload;
            let mut pad = 0usize;
            if flags & PADDED != 0 {
                let (&p, rest) = body
                    .split_first()
                    .ok_or_else(|| malformed("padded HEADERS without a pad length"))?;
                pad = usize::from(p);
                body = rest;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                if body.len() < 5 {
                    return Err(malformed("HEADERS too short for its priority"));
                }
                let mut fields = [0u8; 5];
                fields.copy_from_slice(&body[..5]);
                priority = Some(fields);
                body = &body[5..];
            }
            if pad > body.len() {
                return Err(malformed("HEADERS padding longer than the frame"));
            }
            self.block = Some(Block {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: body[..body.len() - pad].to_vec(),
            });
        } else {
            let block = self
                .block
                .as_mut()
                .filter(|b| b.stream == stream)
                .ok_or_else(|| malformed("CONTINUATION without its HEADERS"))?;
            if block.fragment.len() + payload.len() > MAX_BLOCK {
                return Err(malformed("a header block over the bound"));
            }
            block.fragment.extend_from_slice(payload);
        }
        if flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.emit(block)?;
        }
        Ok(())
    }

    /// Decodes the block, normalises `:authority`, and writes it out again.
    fn emit(&mut self, block: Block) -> io::Result<()> {
        let mut headers = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| malformed(&format!("header block: {e:?}")))?;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority" && !valid_authority(value) {
                *value = LOCAL.to_vec();
            }
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let first_room = FRAME_MAX - if block.priority.is_some() { 5 } else { 0 };
        let (first, mut rest) = encoded.split_at(first_room.min(encoded.len()));
        let mut flags = 0u8;
        if block.end_stream {
            flags |= END_STREAM;
        }
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        let priority = block.priority.as_ref().map(|p| p.as_slice()).unwrap_or(&[]);
        self.frame(HEADERS, flags, block.stream, &[priority, first]);
        while !rest.is_empty() {
            let (piece, after) = rest.split_at(FRAME_MAX.min(rest.len()));
            let flags = if after.is_empty() { END_HEADERS } else { 0 };
            self.frame(CONTINUATION, flags, block.stream, &[piece]);
            rest = after;
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        // At most FRAME_MAX: three bytes hold it.
        self.output
            .extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        self.output.push(kind);
        self.output.push(flags);
        self.output.extend_from_slice(&stream.to_be_bytes());
        for p in parts {
            self.output.extend_from_slice(p);
        }
    }
}

/// True when `value` is a URI authority the HTTP/2 server accepts.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;
    /// A frame's kind, flags and payload.
    type Frame = (u8, u8, Vec<u8>);

    fn request(authority: &str) -> HeaderList {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/hearth.v1.NodeService/GetNode"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    /// A client's bytes: preface, SETTINGS, then per request a padded HEADERS frame
    /// split across a CONTINUATION, and a DATA frame.
    fn client_stream(authorities: &[&str]) -> Vec<u8> {
        let mut encoder = loona_hpack::Encoder::new();
        let mut out = PREFACE.to_vec();
        out.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        for (i, authority) in authorities.iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            let headers = request(authority);
            let block = encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            let (a, b) = block.split_at(block.len() / 2);
            let mut padded = vec![3u8];
            padded.extend_from_slice(a);
            padded.extend_from_slice(&[0, 0, 0]);
            out.extend(frame(HEADERS, PADDED, stream, &padded));
            out.extend(frame(CONTINUATION, END_HEADERS, stream, b));
            out.extend(frame(0x0, END_STREAM, stream, b"\0\0\0\0\0"));
        }
        out
    }

    /// The header lists and the other frames (kind, flags, payload) a server would read.
    fn server_reads(bytes: &[u8]) -> (Vec<HeaderList>, Vec<Frame>) {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut decoder = loona_hpack::Decoder::new();
        let (mut lists, mut others, mut block) = (Vec::new(), Vec::new(), Vec::new());
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let payload = &rest[9..9 + len];
            match kind {
                HEADERS | CONTINUATION => {
                    assert_eq!(flags & PADDED, 0);
                    block.extend_from_slice(payload);
                    if flags & END_HEADERS != 0 {
                        lists.push(decoder.decode(&block).expect("a valid block"));
                        block.clear();
                    }
                }
                _ => others.push((kind, flags, payload.to_vec())),
            }
            rest = &rest[9 + len..];
        }
        (lists, others)
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_and_the_rest_is_kept() {
        let input = client_stream(&[
            "tmp%2Fhearth%2Fhearthd.sock",
            "hearth.example:443",
            "/bad/path",
        ]);
        let mut whole = Rewriter::default();
        whole.push(&input).unwrap();
        let once = whole.take_output();
        // Fed a byte at a time, the result is the same.
        let mut bytewise = Rewriter::default();
        let mut out = Vec::new();
        for b in &input {
            bytewise.push(std::slice::from_ref(b)).unwrap();
            out.extend(bytewise.take_output());
        }
        assert_eq!(out, once);

        let (lists, others) = server_reads(&once);
        assert_eq!(lists.len(), 3);
        assert_eq!(lists[0], request("localhost"));
        assert_eq!(
            lists[1],
            request("hearth.example:443"),
            "a valid one is kept"
        );
        assert_eq!(lists[2], request("localhost"));
        // SETTINGS and the DATA frames pass unchanged.
        assert_eq!(others.len(), 4);
        assert_eq!(others[0], (0x4, 0, vec![0, 3, 0, 0, 0, 100]));
        assert!(
            others[1..]
                .iter()
                .all(|f| *f == (0x0, END_STREAM, b"\0\0\0\0\0".to_vec()))
        );
    }

    #[test]
    fn what_is_not_http2_passes_unchanged() {
        let mut rw = Rewriter::default();
        rw.push(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(rw.take_output(), b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn a_malformed_or_oversized_block_ends_the_connection() {
        let mut rw = Rewriter::default();
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]));
        assert!(rw.push(&input).is_err());

        let mut rw = Rewriter::default();
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..(MAX_BLOCK / FRAME_MAX + 1) {
            input.extend(frame(CONTINUATION, 0, 1, &[0u8; FRAME_MAX]));
        }
        assert!(rw.push(&input).is_err());

        let mut rw = Rewriter::default();
        let mut input = PREFACE.to_vec();
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x82]));
        assert!(rw.push(&input).is_err(), "CONTINUATION alone");
    }
}
