//! HTTP/1.1 to Firecracker's API socket, through hyper.
//!
//! One connection per request: Firecracker's API server is single-threaded and the
//! requests hearth makes are few (about ten per machine start), so a fresh connection
//! costs nothing measurable and a half-broken keep-alive connection can never be reused
//! by mistake. Successful writes answer 204 with no body; errors answer 4xx/5xx with
//! `{"fault_message": "..."}`, which the error carries verbatim so it reaches the
//! machine's events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::api::{Fault, Request};

/// How long one request may take (Firecracker answers config requests in well under a
/// millisecond; a snapshot of a large guest takes longer, see [`SLOW_REQUEST`]).
pub const REQUEST_LIMIT: Duration = Duration::from_secs(5);
/// Limit for snapshot create and load, which write or map all of guest memory.
pub const SLOW_REQUEST: Duration = Duration::from_secs(120);

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be reached.
    #[error("{request}: connect {socket}: {source}")]
    Connect {
        /// "PUT /drives/root".
        request: String,
        /// The API socket.
        socket: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTP exchange broke.
    #[error("{request}: {socket}: {message}")]
    Http {
        /// The request.
        request: String,
        /// The API socket.
        socket: PathBuf,
        /// What hyper said.
        message: String,
    },
    /// Firecracker refused the request.
    #[error("{request}: Firecracker answered {status}: {fault_message}")]
    Fault {
        /// The request.
        request: String,
        /// HTTP status.
        status: u16,
        /// Firecracker's `fault_message` (or the raw body if it had none).
        fault_message: String,
    },
    /// The answer did not have the expected shape.
    #[error("{request}: unexpected answer: {message}")]
    Decode {
        /// The request.
        request: String,
        /// What was wrong.
        message: String,
    },
    /// No answer in time.
    #[error("{request}: no answer from {socket} within {after:?}")]
    Timeout {
        /// The request.
        request: String,
        /// The API socket.
        socket: PathBuf,
        /// How long was waited.
        after: Duration,
    },
}

impl ApiError {
    /// Whether the socket was not there or refused (the process is not serving yet, or is
    /// gone), as opposed to an answer.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ApiError::Connect { .. })
    }
}

/// A client of one Firecracker process's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// A client for the API socket at `socket`.
    pub fn new(socket: &Path) -> ApiClient {
        ApiClient {
            socket: socket.to_path_buf(),
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `req` and returns the answer body (empty for 204).
    pub async fn send(&self, req: &Request) -> Result<Bytes, ApiError> {
        let limit = match req {
            Request::SnapshotCreate(_) | Request::SnapshotLoad(_) => SLOW_REQUEST,
            _ => REQUEST_LIMIT,
        };
        let request = req.describe();
        tokio::time::timeout(limit, self.exchange(req))
            .await
            .map_err(|_| ApiError::Timeout {
                request,
                socket: self.socket.clone(),
                after: limit,
            })?
    }

    /// Sends `req` and decodes a JSON answer.
    pub async fn get<T: serde::de::DeserializeOwned>(&self, req: &Request) -> Result<T, ApiError> {
        let body = self.send(req).await?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Decode {
            request: req.describe(),
            message: format!("{e}: {}", String::from_utf8_lossy(&body)),
        })
    }

    async fn exchange(&self, req: &Request) -> Result<Bytes, ApiError> {
        let describe = req.describe();
        let http_err = |message: String| ApiError::Http {
            request: describe.clone(),
            socket: self.socket.clone(),
            message,
        };
        let stream = crate::vmmdir::connect(&self.socket)
            .await
            .map_err(|source| ApiError::Connect {
                request: describe.clone(),
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http_err(e.to_string()))?;
        // The connection task ends when the exchange is over and `sender` is dropped.
        tokio::spawn(async move {
            let _ = connection.await;
        });

        let body = match req.body() {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let mut builder = hyper::Request::builder()
            .method(req.method().as_str())
            .uri(req.path())
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if !body.is_empty() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| http_err(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http_err(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| http_err(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let fault_message = serde_json::from_slice::<Fault>(&bytes)
            .map(|f| f.fault_message)
            .ok()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
        Err(ApiError::Fault {
            request: describe,
            status: status.as_u16(),
            fault_message,
        })
    }
}

#[cfg(test)]
mod tests {
    //! Against a minimal HTTP responder on a Unix socket: what goes over the wire and how
    //! answers become results.

    use super::super::api::{ActionType, InstanceActionInfo, InstanceInfo, InstanceState};
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// Answers one connection with `response` and returns what was received.
    async fn serve_once(listener: UnixListener, response: &'static str) -> String {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let len = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if got.len() >= head_end + 4 + len {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        s.write_all(response.as_bytes()).await.unwrap();
        String::from_utf8_lossy(&got).to_string()
    }

    #[tokio::test]
    async fn a_write_sends_json_and_accepts_204() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve_once(listener, "HTTP/1.1 204 No Content\r\n\r\n"));
        let client = ApiClient::new(&sock);
        let body = client
            .send(&Request::Action(InstanceActionInfo {
                action_type: ActionType::InstanceStart,
            }))
            .await
            .unwrap();
        assert!(body.is_empty());
        let wire = server.await.unwrap();
        assert!(wire.starts_with("PUT /actions HTTP/1.1\r\n"), "{wire}");
        assert!(wire.contains("content-type: application/json"), "{wire}");
        assert!(
            wire.ends_with(r#"{"action_type":"InstanceStart"}"#),
            "{wire}"
        );
    }

    #[tokio::test]
    async fn a_fault_carries_firecrackers_message() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let body = r#"{"fault_message":"Invalid kernel path"}"#;
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let server = tokio::spawn(serve_once(listener, response));
        let err = ApiClient::new(&sock)
            .send(&Request::Version)
            .await
            .unwrap_err();
        server.await.unwrap();
        match &err {
            ApiError::Fault {
                status,
                fault_message,
                ..
            } => {
                assert_eq!(*status, 400);
                assert_eq!(fault_message, "Invalid kernel path");
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("GET /version"), "{err}");
    }

    #[tokio::test]
    async fn a_read_decodes_and_a_missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let body = r#"{"app_name":"Firecracker","id":"hearth-1","state":"Running","vmm_version":"1.13.1"}"#;
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let server = tokio::spawn(serve_once(listener, response));
        let info: InstanceInfo = ApiClient::new(&sock)
            .get(&Request::DescribeInstance)
            .await
            .unwrap();
        server.await.unwrap();
        assert_eq!(info.state, InstanceState::Running);

        let err = ApiClient::new(&dir.path().join("absent.sock"))
            .send(&Request::Version)
            .await
            .unwrap_err();
        assert!(err.is_unreachable(), "{err}");
    }
}
