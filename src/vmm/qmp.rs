//! A minimal QMP (QEMU Machine Protocol) client: enough to know QEMU is up and to ask it
//! to quit. QMP is line-delimited JSON on the control socket: a greeting, then
//! `qmp_capabilities`, then commands; asynchronous events may arrive between replies and
//! are skipped.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// The control socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// QEMU closed the connection before answering.
    #[error("QMP socket {path}: closed by QEMU before the reply to {command}")]
    Closed {
        /// The control socket.
        path: PathBuf,
        /// The command in flight.
        command: String,
    },
    /// QEMU answered with an error or something that is not QMP.
    #[error("QMP {command} on {path}: {message}")]
    Protocol {
        /// The control socket.
        path: PathBuf,
        /// The command in flight.
        command: String,
        /// QEMU's error description, or what was wrong with the reply.
        message: String,
    },
}

/// A QMP session in command mode.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = crate::vmmdir::connect(path)
            .await
            .map_err(|source| QmpError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol("greeting", format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    /// Runs a command without arguments and returns its `return` value.
    pub async fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = json!({ "execute": command }).to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let msg = self.read_message(command).await?;
            if msg.get("event").is_some() {
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            let desc = msg
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("unexpected reply {msg}"));
            return Err(self.protocol(command, desc));
        }
    }

    async fn read_message(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed {
                path: self.path.clone(),
                command: command.to_string(),
            });
        }
        serde_json::from_str(&line).map_err(|e| self.protocol(command, format!("bad JSON: {e}")))
    }

    fn protocol(&self, command: &str, message: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            command: command.to_string(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QMP server speaking the real handshake, with an event between replies.
    #[tokio::test]
    async fn handshake_skips_events_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            assert!(
                lines
                    .next_line()
                    .await
                    .unwrap()
                    .unwrap()
                    .contains("qmp_capabilities")
            );
            w.write_all(b"{\"return\": {}}\n").await.unwrap();
            assert!(
                lines
                    .next_line()
                    .await
                    .unwrap()
                    .unwrap()
                    .contains("query-status")
            );
            w.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\n{\"return\": {\"status\": \"running\", \"running\": true}}\n").await.unwrap();
            assert!(lines.next_line().await.unwrap().unwrap().contains("nope"));
            w.write_all(b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\n").await.unwrap();
        });
        let mut qmp = Qmp::connect(&sock).await.unwrap();
        let status = qmp.execute("query-status").await.unwrap();
        assert_eq!(status["status"], "running");
        let err = qmp.execute("nope").await.unwrap_err();
        assert!(err.to_string().contains("has not been found"), "{err}");
        server.await.unwrap();
    }
}
