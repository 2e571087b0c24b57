//! What of a plan exists on the host right now, in detail: the namespace, each link, the
//! tap, addresses and routes. Read-only. A diagnostic (and what the network tests check
//! their effects with): a machine's run decides from the network step's probe (its
//! namespace and host link exist, two stats), not from this.

use std::net::Ipv4Addr;

use rtnetlink::packet_route::link::{InfoKind, LinkMessage};

use super::error::NetError;
use super::links::{self, Side};
use super::netlink::Rtnl;
use super::netns;
use super::plan::NetPlan;
use super::worker::Worker;

/// Which parts of a plan exist. Each field is checked on its own, so a half-made or
/// half-removed network shows exactly which parts are there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetObservation {
    /// The namespace is mounted at its path.
    pub netns: bool,
    /// A link with the host veth's name exists in the root namespace.
    pub host_veth: bool,
    /// The namespace holds the other end of that veth, under the planned name.
    pub ns_veth: bool,
    /// The tap exists in the namespace.
    pub tap: bool,
    /// Loopback, both veth ends and the tap are administratively up.
    pub links_up: bool,
    /// The host, namespace and gateway addresses are on their links.
    pub addresses: bool,
    /// IPv4 forwarding is on inside the namespace.
    pub forwarding: bool,
    /// The namespace's default route goes via the host end.
    pub default_route: bool,
    /// The root namespace routes the guest network via the namespace end.
    pub host_route: bool,
}

impl NetObservation {
    /// Everything of the plan is in place.
    pub fn is_complete(&self) -> bool {
        self.netns
            && self.host_veth
            && self.ns_veth
            && self.tap
            && self.links_up
            && self.addresses
            && self.forwarding
            && self.default_route
            && self.host_route
    }

    /// Nothing of the plan is visible on the host (the namespace and the host veth, which
    /// carry everything else, are both gone).
    pub fn is_absent(&self) -> bool {
        !self.netns && !self.host_veth
    }
}

/// Looks at the host. Enters the namespace (on the worker thread) to read it from inside.
pub(crate) fn observe(worker: &mut Worker, plan: &NetPlan) -> Result<NetObservation, NetError> {
    let mut seen = NetObservation::default();
    let mut root = Side::root(&mut worker.root);
    let host = root.link(&plan.host_veth)?;
    seen.host_veth = host.is_some();
    if let Some(host) = &host {
        let index = host.header.index;
        seen.host_route = links::has_route(
            &root.main_routes()?,
            plan.guest_network(),
            plan.prefix_len,
            plan.ns_addr,
            index,
        );
    }
    let root_addresses = match &host {
        Some(host) => {
            let all = root.addresses()?;
            links::has_address(&all, host.header.index, plan.host_addr, plan.prefix_len)
        }
        None => false,
    };

    let Some(ns_file) = netns::open(&plan.netns)? else {
        return Ok(seen);
    };
    seen.netns = true;
    netns::enter(&plan.netns, &ns_file)?;
    seen.forwarding = std::fs::read("/proc/sys/net/ipv4/ip_forward")
        .map(|v| v.trim_ascii() == b"1")
        .map_err(|source| NetError::Forwarding {
            netns: plan.netns.clone(),
            source,
        })?;
    let mut ns_rtnl = Rtnl::open().map_err(|source| NetError::Netlink {
        place: super::error::place(Some(&plan.netns)),
        action: "open a netlink socket".to_string(),
        source,
    })?;
    let mut ns = Side::netns(&mut ns_rtnl, &plan.netns);
    let lo = ns.link("lo")?;
    let inside = ns.link(&plan.ns_veth)?;
    let tap = ns
        .link(&plan.tap)?
        .filter(|t| links::kind(t) == Some(&InfoKind::Tun));
    seen.ns_veth = match (&host, &inside) {
        (Some(h), Some(i)) => {
            links::peer_index(h) == Some(i.header.index)
                && links::peer_index(i) == Some(h.header.index)
        }
        _ => false,
    };
    seen.tap = tap.is_some();
    let up = |l: &Option<LinkMessage>| l.as_ref().is_some_and(links::is_up);
    seen.links_up = up(&lo) && up(&host) && up(&inside) && up(&tap);
    let addresses = ns.addresses()?;
    seen.addresses = root_addresses
        && inside.as_ref().is_some_and(|i| {
            links::has_address(&addresses, i.header.index, plan.ns_addr, plan.prefix_len)
        })
        && tap.as_ref().is_some_and(|t| {
            links::has_address(&addresses, t.header.index, plan.gateway, plan.prefix_len)
        });
    if let Some(inside) = &inside {
        seen.default_route = links::has_route(
            &ns.main_routes()?,
            Ipv4Addr::UNSPECIFIED,
            0,
            plan.host_addr,
            inside.header.index,
        );
    }
    Ok(seen)
}
