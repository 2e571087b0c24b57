//! Host networking for machines: a network namespace per machine, a veth pair to the
//! root namespace, a tap device for the VMM inside the namespace, addresses, forwarding
//! and routes. Everything goes through netlink and ioctls; no `ip` processes.
//!
//! ```text
//!  root namespace                    namespace <prefix>-<id>            guest
//!  <prefix><id>  block+1/30 <-veth-> eth0 block+2/30
//!  route block+4/30 via block+2      tap0 block+5/30 (gateway) <-tap-> block+6/30
//!                                    default via block+1, forwarding on
//! ```
//! The host reaches the guest without NAT; the guest's replies go back the same way.
//!
//! Code map: `pool` and `plan` are pure (names and addresses from an id and a slot);
//! `fabric` is the async API; `worker` owns the only threads that change namespace;
//! `apply`, `observe` and `scan` are the jobs those threads run; `netns`, `tap`, `links`,
//! `netlink` and `watch` are the kernel interfaces they use.
//!
//! **Architecture invariant:** no tokio thread ever calls `setns` or `unshare`; only the
//! fabric's worker threads do, and they are back in the root namespace between jobs.

mod apply;
mod error;
mod fabric;
mod links;
mod netlink;
mod netns;
mod nfnl;
mod observe;
mod plan;
pub mod policy;
mod pool;
pub mod resolver;
mod scan;
pub mod settings;
mod tap;
mod watch;
mod worker;

pub use error::NetError;
pub use fabric::NetFabric;
pub use netlink::NlError;
pub use netns::netns_path;
pub use observe::NetObservation;
pub use plan::{NetPlan, PlanError};
pub use pool::{PoolCidr, PoolError};
pub use scan::NetResource;
