//! The machines' network settings (`[network]` in the daemon's config) and their
//! defaults. The packet policy they describe is made by the config, which checks them
//! (`Config::validate`) and names a bad key.

use serde::Deserialize;

/// Network settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// IPv4 CIDR the machines' addresses come from; each machine takes a /29 block.
    pub pool: String,
    /// Prefix of every host resource hearth names (network namespaces, links): 1 to 5
    /// characters of `[a-z0-9]`, starting with a letter. Two daemons on one host need
    /// different prefixes and pools. Also names the daemon's nftables table
    /// (`inet hearth_<prefix>`).
    pub prefix: String,
    /// Where guests may go beyond the host's allow list and their peers: `none` (the
    /// default) or `nat` (out through the host's routes, masqueraded; hearth then
    /// switches IPv4 forwarding on in the root namespace, and logs that it did).
    pub egress: EgressConfig,
    /// Whether guests may reach each other's declared ports (default false).
    pub machine_to_machine: bool,
    /// Host ports guests may reach, as `tcp/<port>` or `udp/<port>`; nothing else on the
    /// host answers them. Default: none.
    pub host_allow: Vec<String>,
    /// With egress `nat`, networks (`a.b.c.d/len`) guests may reach although they lie in
    /// the ranges denied by default (link-local with the cloud metadata address, the
    /// private and shared ranges, loopback, multicast, reserved). Default: none.
    pub egress_allow: Vec<String>,
}

/// `network.egress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressConfig {
    /// Guests reach only the host's allow list (and peers, when allowed).
    None,
    /// Guests also reach the outside, masqueraded.
    Nat,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            pool: "10.213.0.0/16".to_string(),
            prefix: "hth".to_string(),
            egress: EgressConfig::None,
            machine_to_machine: false,
            host_allow: Vec::new(),
            egress_allow: Vec::new(),
        }
    }
}
