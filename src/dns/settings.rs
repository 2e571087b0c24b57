//! The embedded DNS server's settings (`[dns]` in the daemon's config) and their
//! defaults.

use serde::Deserialize;

/// The embedded DNS server (`[dns]`): A and SRV records of the published machines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// `IP:port` answering on UDP and TCP; empty turns it off. An address that cannot be
    /// bound is logged and the daemon runs without DNS.
    pub listen: String,
    /// The domain machines are named under: `<name>.<domain>`, `<id>.vm.<domain>`.
    pub domain: String,
    /// Time to live of each answer, in seconds: how long a resolver may keep a name after
    /// its machine is gone.
    pub ttl_secs: u32,
    /// Guests resolve through the same server: it also answers on port 53 of the guest
    /// resolver address (the first address of the pool's last block, which is then never
    /// leased), the guests' resolv.conf names it, and the packet policy lets guests reach
    /// exactly that address and port. Off: guests get no resolver and the whole pool is
    /// leased.
    pub guests: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: "127.0.0.1:8053".to_string(),
            domain: "hearth.internal".to_string(),
            ttl_secs: 5,
            guests: true,
        }
    }
}
