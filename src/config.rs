//! Daemon configuration: one TOML file, every key optional, defaults that work on a fresh
//! Debian machine. A bad file fails the start with the key and the reason, never later.
//!
//! This file keeps the file's shape ([`Config`]), the checks across keys and sections
//! ([`Config::validate`]), the naming of a bad key ([`ConfigError`]), and the sections of
//! the layers above it (`[api]`, `[log]`, `[[pools]]`). Each other section's type and its
//! defaults belong to the module it configures (`net::settings`, `image::settings`,
//! `vmm::settings`, ...) and are re-exported here; no module below imports this one.
//!
//! `deploy/hearthd.toml` is the documented example; keep it in step with this file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::dns::settings::DnsConfig;
pub use crate::guest::settings::GuestConfig;
pub use crate::image::settings::{ImagesConfig, RegistryAuth};
pub use crate::layout::Layout;
pub use crate::machine::admission::CapacityConfig;
pub use crate::metrics::MetricsConfig;
pub use crate::net::settings::{EgressConfig, NetworkConfig};
pub use crate::sinks::settings::EtcdConfig;
pub use crate::store::settings::StoreConfig;
pub use crate::vmm::settings::{JailerConfig, VmmConfig, VmmKind};

/// Why a configuration could not be used. Each message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown key or a value of the wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// Dotted key path (`pools[1].image` for a table in an array).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Durable state: the redb file, machine directories, image bases.
    pub data_dir: PathBuf,
    /// Rebuildable caches shared by daemons on this host: the guest kit and the KVM probe.
    pub cache_dir: PathBuf,
    /// Where the API listens.
    pub api: ApiConfig,
    /// The machines' network.
    pub network: NetworkConfig,
    /// The VMM.
    pub vmm: VmmConfig,
    /// The guest kit and the guest's lifecycle deadlines.
    pub guest: GuestConfig,
    /// What this host admits.
    pub capacity: CapacityConfig,
    /// Root filesystem images.
    pub images: ImagesConfig,
    /// Prepared-capacity pools: machines booted ahead of time, claimed by creates.
    pub pools: Vec<PoolConfig>,
    /// How many prepared machines are built at once, over every pool.
    pub pool_refill_parallel: u32,
    /// How much history the store keeps.
    pub store: StoreConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// The daemon's own log.
    pub log: LogConfig,
    /// The embedded DNS server.
    pub dns: DnsConfig,
    /// The etcd sink, for a fleet's proxies and resolvers.
    pub etcd: EtcdConfig,
}

/// How the daemon logs (`[log]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (for a terminal) or `json` (one object per line, for a log pipeline). Either
    /// way, every line of a machine's run names the machine and the step.
    pub format: LogFormat,
}

/// The log's line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the spans' fields.
    Json,
}

/// One prepared-capacity pool (`[[pools]]`): `size` machines of one image and shape,
/// booted with their guest idle and their VMM paused, waiting for a create to claim one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Unique among pools: a DNS label.
    pub name: String,
    /// The image reference, as a create names it (a create claims from the pool only
    /// when it names the image the same way).
    pub image: String,
    /// vCPUs of every prepared machine.
    pub vcpus: u32,
    /// MiB of every prepared machine.
    pub memory_mib: u32,
    /// Root disk size in MiB (0: the image's size); a create asking for at most this
    /// much can claim.
    #[serde(default)]
    pub disk_mib: u32,
    /// How many prepared machines the pool keeps (0: none; the pool only reports).
    pub size: u32,
    /// Prepared machines idle (ready, unclaimed) longer than this are recycled (0: never).
    #[serde(default)]
    pub max_age_secs: u64,
}

impl PoolConfig {
    /// The pool as a create is matched against it (see `machine::claim`).
    pub fn shape(&self) -> crate::machine::claim::PoolShape<'_> {
        crate::machine::claim::PoolShape {
            name: &self.name,
            image: &self.image,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
        }
    }
}

/// API listener settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Unix socket path; created with mode 0600.
    pub socket: PathBuf,
    /// `IP:port` of a TCP listener for remote control planes, always with mutual TLS;
    /// empty (the default) serves the socket only.
    pub listen: String,
    /// The server's certificate chain (PEM), for `listen`.
    pub tls_cert: PathBuf,
    /// The server's private key (PEM), for `listen`.
    pub tls_key: PathBuf,
    /// The CA (PEM) that client certificates must chain to; a client without one is
    /// refused during the handshake.
    pub tls_client_ca: PathBuf,
}

impl NetworkConfig {
    /// The packet policy this section describes. Call after [`Config::validate`].
    /// The daemon-wide packet policy. `guests_resolve` is `dns.guests`: it reserves the
    /// pool's last block for the guest resolver.
    pub fn policy(
        &self,
        guests_resolve: bool,
    ) -> Result<crate::net::policy::PolicyConfig, ConfigError> {
        use crate::net::policy::{Egress, HostPort, PolicyConfig};
        let pool = crate::net::PoolCidr::parse(&self.pool)
            .map_err(|e| invalid("network.pool", e.to_string()))?;
        let mut host_allow = Vec::with_capacity(self.host_allow.len());
        for (i, entry) in self.host_allow.iter().enumerate() {
            host_allow.push(
                HostPort::parse(entry)
                    .map_err(|e| invalid(format!("network.host_allow[{i}]"), e))?,
            );
        }
        let mut egress_allow = Vec::with_capacity(self.egress_allow.len());
        for (i, entry) in self.egress_allow.iter().enumerate() {
            egress_allow.push(
                crate::net::policy::Cidr::parse(entry)
                    .map_err(|e| invalid(format!("network.egress_allow[{i}]"), e))?,
            );
        }
        if !egress_allow.is_empty() && self.egress != EgressConfig::Nat {
            return Err(invalid(
                "network.egress_allow",
                "opens networks only with egress = \"nat\"".into(),
            ));
        }
        Ok(PolicyConfig {
            egress_allow,
            prefix: self.prefix.clone(),
            guest_dns: guest_resolver(guests_resolve, pool)?,
            pool,
            egress: match self.egress {
                EgressConfig::None => Egress::None,
                EgressConfig::Nat => Egress::Nat,
            },
            machine_to_machine: self.machine_to_machine,
            host_allow,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/hearth"),
            cache_dir: PathBuf::from("/var/cache/hearth"),
            api: ApiConfig::default(),
            network: NetworkConfig::default(),
            vmm: VmmConfig::default(),
            guest: GuestConfig::default(),
            capacity: CapacityConfig::default(),
            images: ImagesConfig::default(),
            pools: Vec::new(),
            pool_refill_parallel: 2,
            store: StoreConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            dns: DnsConfig::default(),
            etcd: EtcdConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: PathBuf::from("/run/hearth/hearthd.sock"),
            listen: String::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_client_ca: PathBuf::new(),
        }
    }
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: value ranges and shapes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, dir) in [("data_dir", &self.data_dir), ("cache_dir", &self.cache_dir)] {
            if !dir.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
        }
        if !self.api.socket.is_absolute() {
            return Err(invalid(
                "api.socket",
                "must be an absolute path".to_string(),
            ));
        }
        self.validate_listeners()?;
        crate::net::PoolCidr::parse(&self.network.pool)
            .map_err(|e| invalid("network.pool", e.to_string()))?;
        let prefix = &self.network.prefix;
        let shape_ok = (1..=5).contains(&prefix.len())
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !shape_ok {
            return Err(invalid(
                "network.prefix",
                format!("{prefix:?} must be 1-5 characters of [a-z0-9] starting with a letter"),
            ));
        }
        self.network.policy(self.dns.guests)?;
        if self.guest.ready_timeout_secs == 0 {
            return Err(invalid(
                "guest.ready_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        if self.guest.boot_attempts == 0 {
            return Err(invalid("guest.boot_attempts", "must be at least 1".into()));
        }
        if self.guest.max_restarts as usize >= crate::machine::record::CRASHES_KEPT {
            return Err(invalid(
                "guest.max_restarts",
                format!("must be below {}", crate::machine::record::CRASHES_KEPT),
            ));
        }
        if self.guest.restart_backoff_max_ms < self.guest.restart_backoff_ms {
            return Err(invalid(
                "guest.restart_backoff_max_ms",
                "is smaller than guest.restart_backoff_ms".into(),
            ));
        }
        if self.store.events_first + self.store.events_last < 2 {
            return Err(invalid(
                "store.events_last",
                "with store.events_first, must keep at least 2 events".into(),
            ));
        }
        if self.store.compact_interval_secs == 0 {
            return Err(invalid(
                "store.compact_interval_secs",
                "must be at least 1".into(),
            ));
        }
        let cap = &self.capacity;
        if cap.max_vcpus_per_machine == 0 {
            return Err(invalid(
                "capacity.max_vcpus_per_machine",
                "must be at least 1".into(),
            ));
        }
        if cap.min_memory_mib_per_machine > cap.max_memory_mib_per_machine {
            return Err(invalid(
                "capacity.min_memory_mib_per_machine",
                "is larger than capacity.max_memory_mib_per_machine".into(),
            ));
        }
        for (key, value) in [
            ("images.max_layers", self.images.max_layers),
            ("images.max_entries", self.images.max_entries),
            ("images.max_layer_mib", self.images.max_layer_mib),
            ("images.max_image_mib", self.images.max_image_mib),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        self.validate_vmm_ids()?;
        for (i, root) in self.images.local_roots.iter().enumerate() {
            if !root.is_absolute()
                || root
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(invalid(
                    format!("images.local_roots[{i}]"),
                    format!("{} is not an absolute path without `..`", root.display()),
                ));
            }
        }
        if self.pool_refill_parallel == 0 {
            return Err(invalid("pool_refill_parallel", "must be at least 1".into()));
        }
        self.validate_pools()
    }

    /// The VMMs' uids: `vmm.uid_base + slot` for every lease slot of the pool must be a
    /// real uid other than root's (0, or past `u32::MAX - 1`, which `setresuid` reads as
    /// "unchanged", would leave a VMM as root); the jailer's fallback likewise.
    fn validate_vmm_ids(&self) -> Result<(), ConfigError> {
        let vmm = &self.vmm;
        if vmm.unprivileged {
            if vmm.uid_base == 0 {
                return Err(invalid(
                    "vmm.uid_base",
                    "0 is root's uid; VMMs need uids of their own (default 900000)".into(),
                ));
            }
            let slots = crate::net::PoolCidr::parse(&self.network.pool)
                .map(|p| p.slot_count())
                .unwrap_or(0);
            let last = u64::from(vmm.uid_base) + u64::from(slots);
            if last >= u64::from(u32::MAX) {
                return Err(invalid(
                    "vmm.uid_base",
                    format!(
                        "{} plus the pool's {slots} slots passes the largest uid ({})",
                        vmm.uid_base,
                        u32::MAX - 1
                    ),
                ));
            }
        }
        for (key, id) in [
            ("vmm.jailer.uid", vmm.jailer.uid),
            ("vmm.jailer.gid", vmm.jailer.gid),
        ] {
            if id == 0 || id == u32::MAX {
                return Err(invalid(key, format!("{id} is not an unprivileged id")));
            }
        }
        Ok(())
    }

    /// Each pool's name is unique and a DNS label, its image parses, and its shape is one
    /// this host admits (the same limits a create's spec meets).
    fn validate_pools(&self) -> Result<(), ConfigError> {
        let cap = &self.capacity;
        let limits = crate::machine::spec::Limits {
            max_vcpus: cap.max_vcpus_per_machine,
            min_memory_mib: cap.min_memory_mib_per_machine,
            max_memory_mib: cap.max_memory_mib_per_machine,
        };
        let mut seen = std::collections::HashSet::new();
        for (i, pool) in self.pools.iter().enumerate() {
            let key = |field: &str| format!("pools[{i}].{field}");
            crate::machine::spec::check_name(&pool.name)
                .map_err(|e| invalid(key("name"), e.to_string()))?;
            if !seen.insert(pool.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("{:?} names two pools", pool.name),
                ));
            }
            crate::image::ImageRef::parse(&pool.image)
                .and_then(|image| image.check_local_roots(&self.images.local_roots))
                .map_err(|e| invalid(key("image"), e.to_string()))?;
            let raw = crate::machine::spec::RawSpec {
                image: pool.image.clone(),
                vcpus: pool.vcpus,
                memory_mib: pool.memory_mib,
                disk_mib: pool.disk_mib,
                ..crate::machine::spec::RawSpec::default()
            };
            crate::machine::spec::check_spec(raw, &limits).map_err(|e| {
                let field = e.field().trim_start_matches("spec.");
                invalid(key(field), e.to_string())
            })?;
        }
        Ok(())
    }

    /// The TCP listener needs all three TLS files; both addresses must parse.
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let address = |key: &str, text: &str| {
            text.parse::<std::net::SocketAddr>()
                .map(|_| ())
                .map_err(|e| invalid(key, format!("{text:?} is not IP:port ({e})")))
        };
        if !self.metrics.listen.is_empty() {
            address("metrics.listen", &self.metrics.listen)?;
        }
        if !self.dns.listen.is_empty() {
            address("dns.listen", &self.dns.listen)?;
        }
        for (i, endpoint) in self.etcd.endpoints.iter().enumerate() {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(invalid(
                    format!("etcd.endpoints[{i}]"),
                    format!("{endpoint:?} must start with http:// or https://"),
                ));
            }
        }
        if !self.etcd.host.is_empty() {
            crate::machine::spec::check_name(&self.etcd.host)
                .map_err(|e| invalid("etcd.host", e.to_string()))?;
        }
        if self.etcd.lease_ttl_secs < 3 {
            return Err(invalid("etcd.lease_ttl_secs", "must be at least 3".into()));
        }
        let etcd_tls = [
            ("etcd.tls_ca", &self.etcd.tls_ca),
            ("etcd.tls_cert", &self.etcd.tls_cert),
            ("etcd.tls_key", &self.etcd.tls_key),
        ];
        for (key, path) in etcd_tls {
            if !path.as_os_str().is_empty() && !path.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        let https = self
            .etcd
            .endpoints
            .iter()
            .any(|e| e.starts_with("https://"));
        if https && self.etcd.tls_ca.as_os_str().is_empty() {
            return Err(invalid(
                "etcd.tls_ca",
                "is required with an https:// endpoint".into(),
            ));
        }
        if self.etcd.tls_cert.as_os_str().is_empty() != self.etcd.tls_key.as_os_str().is_empty() {
            return Err(invalid(
                "etcd.tls_key",
                "etcd.tls_cert and etcd.tls_key go together".into(),
            ));
        }
        if !self.etcd.tls_cert.as_os_str().is_empty() && self.etcd.tls_ca.as_os_str().is_empty() {
            return Err(invalid(
                "etcd.tls_ca",
                "is required with etcd.tls_cert".into(),
            ));
        }
        let domain = self.dns.domain.trim_end_matches('.');
        let labels_ok = !domain.is_empty()
            && domain.len() <= 200
            && domain
                .split('.')
                .all(|label| crate::machine::spec::check_name(label).is_ok());
        if !labels_ok {
            return Err(invalid(
                "dns.domain",
                format!("{domain:?} must be dot-separated DNS labels (a-z, 0-9, -)"),
            ));
        }
        if self.api.listen.is_empty() {
            return Ok(());
        }
        address("api.listen", &self.api.listen)?;
        for (key, path) in [
            ("api.tls_cert", &self.api.tls_cert),
            ("api.tls_key", &self.api.tls_key),
            ("api.tls_client_ca", &self.api.tls_client_ca),
        ] {
            if path.as_os_str().is_empty() {
                return Err(invalid(
                    key,
                    "is required with api.listen (TCP is served only with mutual TLS)".into(),
                ));
            }
            if !path.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        Ok(())
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The static guest init: the configured path, else `hearth-init-static` beside the
    /// running executable.
    pub fn init_binary(&self) -> PathBuf {
        if !self.guest.init_binary.as_os_str().is_empty() {
            return self.guest.init_binary.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("hearth-init-static")))
            .unwrap_or_else(|| PathBuf::from("hearth-init-static"))
    }

    /// The readiness deadline of one boot.
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_secs(self.guest.ready_timeout_secs)
    }

    /// The graceful part of a stop.
    pub fn stop_grace(&self) -> Duration {
        Duration::from_secs(self.guest.stop_grace_secs)
    }

    /// Where the daemon's files live.
    pub fn layout(&self) -> Layout {
        Layout::new(&self.data_dir, &self.cache_dir)
    }

    /// Where the overlay disks' writable layer templates and their stock are kept.
    pub fn uppers_dir(&self) -> PathBuf {
        self.layout().uppers()
    }

    /// The redb file.
    pub fn store_path(&self) -> PathBuf {
        self.layout().store()
    }

    /// Where machine `id` keeps its disk, config, sockets and logs.
    pub fn machine_dir(&self, id: &str) -> PathBuf {
        self.layout().machine_dir(id)
    }

    /// Where the static guest init and the kernel are found, for the guest kit.
    pub fn kit_source(&self) -> crate::guest::kit::KitSource {
        crate::guest::kit::KitSource {
            kernel_dir: self.guest.kernel_dir.clone(),
            init_binary: self.init_binary(),
        }
    }
}

/// The guest resolver's address when guests resolve: the first address of the pool's last
/// block. A pool of one block has none to spare.
fn guest_resolver(
    on: bool,
    pool: crate::net::PoolCidr,
) -> Result<Option<std::net::Ipv4Addr>, ConfigError> {
    if !on {
        return Ok(None);
    }
    match pool.resolver_address() {
        Some(address) => Ok(Some(address)),
        None => Err(invalid(
            "dns.guests",
            format!(
                "network.pool {pool} has one block, and the guest resolver takes the last one; \
                 give a larger pool or set dns.guests = false"
            ),
        )),
    }
}

fn invalid(key: impl Into<String>, reason: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let config = parse("").expect("defaults are valid");
        assert_eq!(config.network.pool, "10.213.0.0/16");
        assert_eq!(config.vmm.kind, VmmKind::Auto);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[network]\npoool = \"10.0.0.0/8\"\n").unwrap_err();
        assert!(err.to_string().contains("poool"), "{err}");
    }

    #[test]
    fn bad_pools_name_the_key() {
        let pool = |body: &str| {
            format!(
                "[[pools]]\nname = \"web\"\nimage = \"demo\"\nvcpus = 1\nmemory_mib = 128\nsize = 2\n{body}"
            )
        };
        let cases = [
            (pool("").replace("\"web\"", "\"Web!\""), "pools[0].name"),
            (pool("").replace("\"demo\"", "\"\""), "pools[0].image"),
            (pool("").replace("vcpus = 1", "vcpus = 0"), "pools[0].vcpus"),
            (
                pool("").replace("memory_mib = 128", "memory_mib = 1"),
                "pools[0].memory_mib",
            ),
            (format!("{}\n{}", pool(""), pool("")), "pools[1].name"),
            (pool("colour = 1"), "colour"),
            (
                "pool_refill_parallel = 0".to_string(),
                "pool_refill_parallel",
            ),
        ];
        for (text, key) in cases {
            let err = parse(&text).expect_err(&text);
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let ok = parse(&pool("disk_mib = 512\nmax_age_secs = 60")).expect("valid pool");
        assert_eq!(ok.pools[0].size, 2);
        assert_eq!(ok.pool("web").map(|p| p.disk_mib), Some(512));
    }

    #[test]
    fn listeners_name_their_key() {
        let cases = [
            ("[api]\nlisten = \"7443\"", "api.listen"),
            ("[api]\nlisten = \"127.0.0.1:7443\"", "api.tls_cert"),
            (
                "[api]\nlisten = \"127.0.0.1:7443\"\ntls_cert = \"/c\"\ntls_key = \"k\"",
                "api.tls_key",
            ),
            (
                "[api]\nlisten = \"127.0.0.1:7443\"\ntls_cert = \"/c\"\ntls_key = \"/k\"",
                "api.tls_client_ca",
            ),
            ("[metrics]\nlisten = \"localhost\"", "metrics.listen"),
            ("[dns]\nlisten = \"53\"", "dns.listen"),
            ("[dns]\ndomain = \"Hearth..internal\"", "dns.domain"),
            ("[network]\npool = \"10.9.0.0/29\"", "dns.guests"),
            (
                "[etcd]\nendpoints = [\"127.0.0.1:2379\"]",
                "etcd.endpoints[0]",
            ),
            ("[etcd]\nhost = \"Worker_1\"", "etcd.host"),
            ("[etcd]\nlease_ttl_secs = 2", "etcd.lease_ttl_secs"),
            ("[etcd]\nendpoints = [\"https://e:2379\"]", "etcd.tls_ca"),
            (
                "[etcd]\ntls_ca = \"/ca\"\ntls_cert = \"/c\"",
                "etcd.tls_key",
            ),
            ("[log]\nformat = \"xml\"", "xml"),
        ];
        for (text, key) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let ok = parse(
            "[api]\nlisten = \"[::1]:7443\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\ntls_client_ca = \"/ca\"\n[metrics]\nlisten = \"\"\n[log]\nformat = \"json\"",
        )
        .expect("valid listeners");
        assert_eq!(ok.log.format, LogFormat::Json);
        assert!(ok.metrics.listen.is_empty());
        assert_eq!(
            parse("").expect("defaults").metrics.listen,
            "127.0.0.1:9464"
        );
    }

    #[test]
    fn the_guest_resolver_takes_the_pools_last_block() {
        let on = parse("[network]\npool = \"10.9.0.0/24\"").expect("defaults");
        let policy = on.network.policy(on.dns.guests).expect("policy");
        assert_eq!(
            policy.guest_dns,
            Some(std::net::Ipv4Addr::new(10, 9, 0, 249))
        );
        let off = parse("[network]\npool = \"10.9.0.0/29\"\n[dns]\nguests = false")
            .expect("a one-block pool without guest DNS");
        assert_eq!(
            off.network
                .policy(off.dns.guests)
                .expect("policy")
                .guest_dns,
            None
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[network]\npool = \"10.0.0.1/16\"", "network.pool"),
            ("[network]\npool = \"nonsense\"", "network.pool"),
            ("[network]\nprefix = \"toolong\"", "network.prefix"),
            ("[network]\nprefix = \"1ab\"", "network.prefix"),
            (
                "[network]\nhost_allow = [\"udp/53\", \"icmp/1\"]",
                "network.host_allow[1]",
            ),
            (
                "[network]\nhost_allow = [\"tcp/0\"]",
                "network.host_allow[0]",
            ),
            ("[network]\negress = \"open\"", "egress"),
            (
                "[network]\negress = \"nat\"\negress_allow = [\"10.0.0.1/8\"]",
                "network.egress_allow[0]",
            ),
            (
                "[network]\negress_allow = [\"10.0.0.0/8\"]",
                "network.egress_allow",
            ),
            ("data_dir = \"relative\"", "data_dir"),
            ("[guest]\nboot_attempts = 0", "guest.boot_attempts"),
            ("[guest]\nmax_restarts = 64", "guest.max_restarts"),
            (
                "[guest]\nrestart_backoff_ms = 5000\nrestart_backoff_max_ms = 10",
                "guest.restart_backoff_max_ms",
            ),
            (
                "[store]\nevents_first = 0\nevents_last = 1",
                "store.events_last",
            ),
            (
                "[store]\ncompact_interval_secs = 0",
                "store.compact_interval_secs",
            ),
            ("[images]\nmax_layers = 0", "images.max_layers"),
            ("[images]\nmax_entries = 0", "images.max_entries"),
            ("[vmm]\nuid_base = 0", "vmm.uid_base"),
            ("[images]\nlocal_roots = [\"srv\"]", "images.local_roots[0]"),
            (
                "[[pools]]\nname = \"p\"\nimage = \"/srv/img\"\nvcpus = 1\nmemory_mib = 128\nsize = 1",
                "images.local_roots",
            ),
            ("[vmm]\nuid_base = 4294967200", "vmm.uid_base"),
            ("[vmm.jailer]\nuid = 0", "vmm.jailer.uid"),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn wrong_type_is_reported() {
        let err = parse("[vmm]\nkind = \"vmware\"").unwrap_err();
        assert!(err.to_string().contains("vmware") || err.to_string().contains("kind"));
    }

    #[test]
    fn the_documented_example_is_valid_and_matches_the_defaults() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/hearthd.toml"));
        let example = Config::load(path).expect("deploy/hearthd.toml parses");
        let defaults = Config::default();
        assert_eq!(example.network.pool, defaults.network.pool);
        assert_eq!(example.api.socket, defaults.api.socket);
        assert_eq!(example.guest.boot_attempts, defaults.guest.boot_attempts);
        assert_eq!(example.vmm.kind, defaults.vmm.kind);
        assert_eq!(
            example.vmm.firecracker_binary,
            defaults.vmm.firecracker_binary
        );
        assert_eq!(example.vmm.jailer.uid, defaults.vmm.jailer.uid);
        assert_eq!(example.vmm.jailer.enabled, defaults.vmm.jailer.enabled);
        assert_eq!(example.pool_refill_parallel, defaults.pool_refill_parallel);
        assert_eq!(example.guest.max_restarts, defaults.guest.max_restarts);
        assert_eq!(
            example.guest.restart_backoff_max_ms,
            defaults.guest.restart_backoff_max_ms
        );
        assert_eq!(example.store.retention_secs, defaults.store.retention_secs);
        assert_eq!(example.store.events_last, defaults.store.events_last);
        assert_eq!(
            example.capacity.min_free_mib,
            defaults.capacity.min_free_mib
        );
        assert!(example.pools.is_empty());
        let (example, defaults) = (&example.images, &defaults.images);
        assert_eq!(example.max_layer_mib, defaults.max_layer_mib);
        assert_eq!(example.max_image_mib, defaults.max_image_mib);
        assert_eq!(example.max_layers, defaults.max_layers);
        assert_eq!(example.max_entries, defaults.max_entries);
        assert_eq!(example.min_free_mib, defaults.min_free_mib);
    }

    #[test]
    fn the_firecracker_example_is_valid() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/hearthd-firecracker.toml"
        ));
        let c = Config::load(path).expect("deploy/hearthd-firecracker.toml parses");
        assert_eq!(c.vmm.kind, VmmKind::Auto);
        assert_eq!(
            c.vmm.firecracker_binary,
            PathBuf::from("/usr/local/bin/firecracker")
        );
    }

    #[test]
    fn firecracker_settings_parse() {
        let c = parse(
            "[vmm]\nkind = \"firecracker\"\nfirecracker_binary = \"/opt/fc/firecracker\"\n\
             [vmm.jailer]\nenabled = true\nuid = 1000\ncgroups = [\"cpu.max=50000 100000\"]",
        )
        .unwrap();
        assert_eq!(c.vmm.kind, VmmKind::Firecracker);
        assert!(c.vmm.jailer.enabled);
        assert_eq!(c.vmm.jailer.uid, 1000);
        assert_eq!(c.vmm.jailer.gid, 65534);
        let err = parse("[vmm.jailer]\nchroot = \"/srv\"").unwrap_err();
        assert!(err.to_string().contains("chroot"), "{err}");
    }
}
