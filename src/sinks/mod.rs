//! Where published routes go beyond this daemon: the sinks a fleet's proxies and
//! resolvers read. `layout` says what a route looks like in a key-value store (the SkyDNS
//! layout CoreDNS's etcd plugin reads, and hearth's own route records) and what to change
//! so that a store holds exactly a host's routes; it is pure, so the etcd sink only moves
//! bytes.

pub mod layout;
pub mod settings;
