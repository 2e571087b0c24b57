//! A machine's route: where the rest of the platform (proxy, DNS) reaches a ready guest.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// One published machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The machine.
    pub machine_id: String,
    /// Its name (a DNS label).
    pub name: String,
    /// The guest's address.
    pub ip: Ipv4Addr,
    /// TCP ports the workload serves.
    pub ports: Vec<u16>,
}

/// A change the registry publisher delivers to its sinks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteChange {
    /// The route is reachable.
    Published(Route),
    /// The route must no longer be used.
    Unpublished(Route),
}
