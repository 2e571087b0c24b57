//! The etcd sink's settings (`[etcd]` in the daemon's config) and their defaults.

use std::path::PathBuf;

use serde::Deserialize;

/// The etcd sink (`[etcd]`): every published route is written to etcd in the SkyDNS
/// layout (for CoreDNS) and as a route record, under a lease this daemon keeps alive.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port` endpoints; empty (the default) turns the
    /// sink off.
    pub endpoints: Vec<String>,
    /// This host's name in keys (a DNS label); empty: the machine's host name.
    pub host: String,
    /// The lease's time to live: a host that dies takes its records with it after this.
    pub lease_ttl_secs: u32,
    /// The CA (PEM) of etcd's server certificates, for `https` endpoints.
    pub tls_ca: PathBuf,
    /// This client's certificate (PEM), when etcd asks for one.
    pub tls_cert: PathBuf,
    /// This client's key (PEM).
    pub tls_key: PathBuf,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            host: String::new(),
            lease_ttl_secs: 10,
            tls_ca: PathBuf::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
        }
    }
}

impl EtcdConfig {
    /// This host's name in keys: `host`, else the machine's host name (lower-cased,
    /// anything but a-z, 0-9 and - made a -).
    pub fn host_name(&self) -> String {
        if !self.host.is_empty() {
            return self.host.clone();
        }
        let raw = nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_else(|| "host".to_string());
        let label: String = raw
            .split('.')
            .next()
            .unwrap_or("host")
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(63)
            .collect();
        let label = label.trim_matches('-').to_string();
        if label.is_empty() {
            "host".to_string()
        } else {
            label
        }
    }
}
