//! A real etcd (Debian's `etcd-server`) on loopback for one test: its own data dir and
//! ports, stopped (and restartable, on the same data and ports) by the test, killed on
//! drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd server.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The etcd binary, or None (the caller reports the skip).
pub fn binary() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Etcd {
    /// Starts a server and waits until it answers; None (with the skip reported) when
    /// there is no etcd binary.
    pub async fn start(test: &str) -> Option<Etcd> {
        if binary().is_none() {
            super::skipped(
                test,
                "no etcd binary (etcd-server; run deploy/install-deps.sh)",
            );
            return None;
        }
        let mut etcd = Etcd {
            child: None,
            dir: tempfile::tempdir().expect("etcd dir"),
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.spawn().await;
        Some(etcd)
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts the process (again) and waits until it answers.
    pub async fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(binary().expect("etcd"))
            .arg("--name=hearth-test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.endpoint()))
            .arg(format!("--advertise-client-urls={}", self.endpoint()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=hearth-test={peer}"))
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.keys("/").await.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not answer within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the process (its data stays).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn client(&self) -> Result<etcd_client::Client, String> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(2));
        etcd_client::Client::connect([self.endpoint()], Some(options))
            .await
            .map_err(|e| e.to_string())
    }

    /// Every key under `prefix`, with its value.
    pub async fn keys(
        &self,
        prefix: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, String> {
        let mut client = self.client().await?;
        let answer = client
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .map_err(|e| e.to_string())?;
        Ok(answer
            .kvs()
            .iter()
            .filter_map(|kv| {
                Some((
                    kv.key_str().ok()?.to_string(),
                    kv.value_str().ok()?.to_string(),
                ))
            })
            .collect())
    }

    /// Writes a key (no lease).
    pub async fn put(&self, key: &str, value: &str) {
        let mut client = self.client().await.expect("etcd client");
        client.put(key, value, None).await.expect("put");
    }

    /// The `[etcd]` table pointing a daemon here, as host `host`.
    pub fn config(&self, host: &str, ttl: u32) -> String {
        format!(
            "[etcd]\nendpoints = [\"{}\"]\nhost = \"{host}\"\nlease_ttl_secs = {ttl}\n",
            self.endpoint()
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
