//! A real etcd (Debian's `etcd-server`) on loopback for one test: its own data dir and
//! ports, stopped (and restartable, on the same data and ports) by the test, killed on
//! drop. Plain HTTP, or HTTPS requiring a client certificate (`start_tls`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd server.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Certificates (server, and the CA clients must be signed by) when serving TLS.
    tls: Option<PathBuf>,
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
        Etcd::start_with(test, None).await
    }

    /// Like [`Etcd::start`], serving HTTPS with `pki`'s server certificate and requiring
    /// a client certificate of its CA.
    pub async fn start_tls(test: &str, pki: &super::tls::Pki) -> Option<Etcd> {
        Etcd::start_with(test, Some(pki.dir.clone())).await
    }

    async fn start_with(test: &str, tls: Option<PathBuf>) -> Option<Etcd> {
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
            tls,
        };
        etcd.spawn().await;
        Some(etcd)
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Starts the process (again) and waits until it answers.
    pub async fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(binary().expect("etcd"));
        if let Some(dir) = &self.tls {
            command
                .arg(format!("--cert-file={}", dir.join("server.pem").display()))
                .arg(format!("--key-file={}", dir.join("server.key").display()))
                .arg(format!(
                    "--trusted-ca-file={}",
                    dir.join("ca.pem").display()
                ))
                .arg("--client-cert-auth");
        }
        let child = command
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
        self.client_as(true).await
    }

    /// A client; over TLS it presents the client certificate only when `certified`.
    async fn client_as(&self, certified: bool) -> Result<etcd_client::Client, String> {
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(2));
        if let Some(dir) = &self.tls {
            let read = |name: &str| std::fs::read(dir.join(name)).expect("read a pki file");
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")));
            if certified {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    read("client.pem"),
                    read("client.key"),
                ));
            }
            options = options.with_tls(tls);
        }
        etcd_client::Client::connect([self.endpoint()], Some(options))
            .await
            .map_err(|e| e.to_string())
    }

    /// Every key under `prefix`, with its value.
    pub async fn keys(
        &self,
        prefix: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, String> {
        self.keys_as(prefix, true).await
    }

    /// [`Etcd::keys`], as a client with or without the client certificate.
    pub async fn keys_as(
        &self,
        prefix: &str,
        certified: bool,
    ) -> Result<std::collections::BTreeMap<String, String>, String> {
        let mut client = self.client_as(certified).await?;
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
        let mut text = format!(
            "[etcd]\nendpoints = [\"{}\"]\nhost = \"{host}\"\nlease_ttl_secs = {ttl}\n",
            self.endpoint()
        );
        if let Some(dir) = &self.tls {
            for (key, file) in [
                ("tls_ca", "ca.pem"),
                ("tls_cert", "client.pem"),
                ("tls_key", "client.key"),
            ] {
                text.push_str(&format!("{key} = \"{}\"\n", dir.join(file).display()));
            }
        }
        text
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
