//! Host networking for machines: a network namespace per machine, a veth pair to the
//! host, a tap device for the VMM inside the namespace, addresses and routes. Everything
//! goes through netlink and ioctls; no `ip` processes.
//!
//! ```text
//!  root namespace                 namespace <prefix>-<id>            guest
//!  <prefix><id> base+1/30 <-veth-> eth0 base+2/30
//!  route base+4/30 via base+2      tap0 base+5/30 (gateway)  <-tap->  eth0 base+6/30
//!                                  default via base+1, forwarding on
//! ```
//! The host reaches the guest without NAT; the guest's replies go back the same way.

mod fabric;
mod netns;
mod plan;
mod tap;

pub use fabric::{NetError, NetFabric};
pub use netns::netns_path;
pub use plan::{NetPlan, PoolCidr};
