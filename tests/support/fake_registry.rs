//! A hostile registry, played by a test double on loopback: Debian's `docker-registry`
//! serves only honest bodies and speaks only basic auth, so what a hostile or a
//! token-speaking registry sends is played here, over plain HTTP/1.1 written by hand.
//! It counts the bytes it sent, so a test can tell that the client stopped reading.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::registry::TestImage;

/// Most bytes an endless body sends before giving up (the client should stop far
/// sooner).
pub const ENDLESS_BYTES: u64 = 1 << 30;

/// What the double does.
#[derive(Clone)]
pub enum Mode {
    /// Every manifest is an endless body: `{"schemaVersion":2,` then spaces, with no
    /// declared length when `declare` is false, else a declared length of
    /// [`ENDLESS_BYTES`].
    EndlessManifest {
        /// Whether a Content-Length is sent.
        declare: bool,
    },
    /// Every registry request gets a Bearer challenge whose realm answers with an
    /// endless token response.
    EndlessToken,
    /// Every manifest is a 404 whose body is endless.
    EndlessError,
    /// An honest registry behind Bearer tokens: the token endpoint wants basic
    /// credentials when `credentials` is set, and hands out `token`; the registry
    /// serves `image` as `<any repo>:<any tag>` only to that token.
    Tokened {
        /// The image served.
        image: Arc<TestImage>,
        /// The credentials the realm wants, if any (`user`, `password`).
        credentials: Option<(String, String)>,
        /// The token handed out.
        token: String,
    },
}

/// The running double; it stops when the test's runtime ends.
pub struct FakeRegistry {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    sent: Arc<AtomicU64>,
    /// The Authorization headers the realm saw, in order.
    pub realm_saw: Arc<Mutex<Vec<String>>>,
}

impl FakeRegistry {
    /// Starts the double on a free loopback port.
    pub async fn start(mode: Mode) -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let sent = Arc::new(AtomicU64::new(0));
        let realm_saw = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared {
            mode,
            addr: addr.clone(),
            sent: sent.clone(),
            realm_saw: realm_saw.clone(),
        };
        let shared = Arc::new(shared);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = shared.serve(stream).await;
                });
            }
        });
        FakeRegistry {
            addr,
            sent,
            realm_saw,
        }
    }

    /// Body bytes sent so far, all connections together.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// `127.0.0.1:<port>/<repo>:<tag>`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr)
    }
}

struct Shared {
    mode: Mode,
    addr: String,
    sent: Arc<AtomicU64>,
    realm_saw: Arc<Mutex<Vec<String>>>,
}

/// One request's line and the header that matters here.
struct Request {
    path: String,
    authorization: Option<String>,
}

impl Shared {
    async fn serve(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let Some(request) = read_head(&mut stream).await? else {
            return Ok(());
        };
        let challenge = format!(
            "WWW-Authenticate: Bearer realm=\"http://{}/token\",service=\"fake\"\r\n",
            self.addr
        );
        match &self.mode {
            Mode::EndlessManifest { declare } => {
                if !request.path.starts_with("/v2/") || !request.path.contains("/manifests/") {
                    return respond(&mut stream, "404 Not Found", "", b"").await;
                }
                let length = if *declare {
                    format!("Content-Length: {ENDLESS_BYTES}\r\n")
                } else {
                    String::new()
                };
                let head =
                    format!("Content-Type: application/vnd.oci.image.manifest.v1+json\r\n{length}");
                self.endless(&mut stream, "200 OK", &head, b"{\"schemaVersion\":2,")
                    .await
            }
            Mode::EndlessToken => {
                if request.path.starts_with("/token") {
                    return self
                        .endless(&mut stream, "200 OK", "", b"{\"token\":\"")
                        .await;
                }
                respond(&mut stream, "401 Unauthorized", &challenge, b"").await
            }
            Mode::EndlessError => {
                self.endless(&mut stream, "404 Not Found", "", b"{\"errors\":[")
                    .await
            }
            Mode::Tokened {
                image,
                credentials,
                token,
            } => {
                if request.path.starts_with("/token") {
                    let saw = request.authorization.clone().unwrap_or_default();
                    if let Ok(mut seen) = self.realm_saw.lock() {
                        seen.push(saw.clone());
                    }
                    if let Some((user, password)) = credentials
                        && saw != basic(user, password)
                    {
                        return respond(&mut stream, "401 Unauthorized", "", b"").await;
                    }
                    let body = format!("{{\"token\":\"{token}\",\"expires_in\":300}}");
                    return respond(&mut stream, "200 OK", "", body.as_bytes()).await;
                }
                if request.authorization.as_deref() != Some(&format!("Bearer {token}")) {
                    return respond(&mut stream, "401 Unauthorized", &challenge, b"").await;
                }
                let blobs = image
                    .layers
                    .iter()
                    .chain([&image.config])
                    .find(|b| request.path.ends_with(&format!("/blobs/{}", b.digest)));
                if let Some(blob) = blobs {
                    return respond(&mut stream, "200 OK", "", &blob.data).await;
                }
                if request.path.contains("/manifests/") {
                    let head = format!("Content-Type: {}\r\n", image.manifest.media_type);
                    return respond(&mut stream, "200 OK", &head, &image.manifest.data).await;
                }
                respond(&mut stream, "404 Not Found", "", b"").await
            }
        }
    }

    /// Sends `start` and then spaces until [`ENDLESS_BYTES`] or the client hangs up.
    async fn endless(
        &self,
        stream: &mut TcpStream,
        status: &str,
        head: &str,
        start: &[u8],
    ) -> std::io::Result<()> {
        stream
            .write_all(format!("HTTP/1.1 {status}\r\n{head}Connection: close\r\n\r\n").as_bytes())
            .await?;
        stream.write_all(start).await?;
        let spaces = vec![b' '; 64 << 10];
        let mut sent = start.len() as u64;
        while sent < ENDLESS_BYTES {
            stream.write_all(&spaces).await?;
            sent += spaces.len() as u64;
            self.sent.fetch_add(spaces.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn basic(user: &str, password: &str) -> String {
    // Base64 by hand: the test crate has no encoder, and this is a dozen lines.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}");
    let mut out = String::new();
    for chunk in input.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    head: &str,
    body: &[u8],
) -> std::io::Result<()> {
    stream
        .write_all(
            format!(
                "HTTP/1.1 {status}\r\n{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

/// Reads a request head (at most 16 KiB); `None` when the client closed first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 16 << 10 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_string();
    let authorization = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_string())
    });
    Ok(Some(Request {
        path,
        authorization,
    }))
}
