//! Netlink requests on one namespace, each one idempotent on its own ("already exists"
//! and "already gone" count as success), with errors that say where and what.

use std::net::Ipv4Addr;

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::{AddressMessageBuilder, LinkUnspec};

use super::error::{NetError, place};
use super::netlink::{NlError, Rtnl};

/// A netlink socket together with the name of its namespace (`None`: root), so every
/// error names the place it happened.
pub(crate) struct Side<'a> {
    pub rtnl: &'a mut Rtnl,
    netns: Option<&'a str>,
}

impl<'a> Side<'a> {
    /// The root namespace, through the worker's root socket.
    pub fn root(rtnl: &'a mut Rtnl) -> Side<'a> {
        Side { rtnl, netns: None }
    }

    /// Namespace `name`, through a socket opened inside it.
    pub fn netns(rtnl: &'a mut Rtnl, name: &'a str) -> Side<'a> {
        Side {
            rtnl,
            netns: Some(name),
        }
    }

    /// Wraps a netlink failure of `action` here.
    pub fn fail<A: Into<String>>(&self, action: A) -> impl FnOnce(NlError) -> NetError + use<A> {
        let place = place(self.netns);
        let action: String = action.into();
        move |source| NetError::Netlink {
            place,
            action,
            source,
        }
    }

    /// The link called `name`, if there is one.
    pub fn link(&mut self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut query = LinkMessage::default();
        query
            .attributes
            .push(LinkAttribute::IfName(name.to_string()));
        match self.rtnl.get(RouteNetlinkMessage::GetLink(query)) {
            Ok(RouteNetlinkMessage::NewLink(link)) => Ok(Some(link)),
            Ok(_) => Err(self.fail(format!("look up link {name}"))(
                NlError::Protocol("the answer is not a link".to_string()),
            )),
            Err(e) if e.is(libc::ENODEV) => Ok(None),
            Err(e) => Err(self.fail(format!("look up link {name}"))(e)),
        }
    }

    /// Every link.
    pub fn links(&mut self) -> Result<Vec<LinkMessage>, NetError> {
        let mut query = LinkMessage::default();
        query.attributes.push(skip_stats());
        let answers = self
            .rtnl
            .dump(RouteNetlinkMessage::GetLink(query))
            .map_err(self.fail("list links"))?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .collect())
    }

    /// Creates a link from a complete `RTM_NEWLINK` message. Fails if the name is taken.
    pub fn create_link(&mut self, message: LinkMessage, what: &str) -> Result<(), NetError> {
        self.rtnl
            .ack(
                RouteNetlinkMessage::NewLink(message),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .map_err(self.fail(format!("create {what}")))
    }

    /// Sets link `name` (index `index`) up. Idempotent.
    pub fn set_up(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        let message = LinkUnspec::new_with_index(index).up().build();
        self.rtnl
            .ack(RouteNetlinkMessage::SetLink(message), 0)
            .map_err(self.fail(format!("set link {name} up")))
    }

    /// Sets link `name` up, looked up by name (saves a round trip when the index is not
    /// needed, as for `lo`). Idempotent.
    pub fn set_up_by_name(&mut self, name: &str) -> Result<(), NetError> {
        let message = LinkUnspec::new_with_name(name).up().build();
        self.rtnl
            .ack(RouteNetlinkMessage::SetLink(message), 0)
            .map_err(self.fail(format!("set link {name} up")))
    }

    /// Deletes link `index` (`name`). Idempotent: a link already gone is fine.
    pub fn delete_link(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        let message = LinkUnspec::new_with_index(index).build();
        match self.rtnl.ack(RouteNetlinkMessage::DelLink(message), 0) {
            Err(e) if !e.is(libc::ENODEV) => Err(self.fail(format!("delete link {name}"))(e)),
            _ => Ok(()),
        }
    }

    /// Adds `addr/len` to link `index` (`name`). Idempotent: an address already there is
    /// fine; other addresses on the link are left alone.
    pub fn add_address(
        &mut self,
        index: u32,
        name: &str,
        addr: Ipv4Addr,
        len: u8,
    ) -> Result<(), NetError> {
        let message = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(addr, len)
            .build();
        match self.rtnl.ack(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if !e.is(libc::EEXIST) => {
                Err(self.fail(format!("add address {addr}/{len} to {name}"))(e))
            }
            _ => Ok(()),
        }
    }

    /// Adds `addr/len` to link `index` under `label` (an alias name, `lo:<something>`).
    /// Idempotent: the address already there is fine.
    pub fn add_labelled_address(
        &mut self,
        index: u32,
        label: &str,
        addr: Ipv4Addr,
        len: u8,
    ) -> Result<(), NetError> {
        let mut message = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(addr, len)
            .build();
        message
            .attributes
            .push(AddressAttribute::Label(label.to_string()));
        match self.rtnl.ack(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if !e.is(libc::EEXIST) => {
                Err(self.fail(format!("add address {addr}/{len} as {label}"))(e))
            }
            _ => Ok(()),
        }
    }

    /// Deletes the address `message` describes (as a dump returned it). Idempotent: an
    /// address already gone is fine.
    pub fn delete_address(&mut self, message: AddressMessage, what: &str) -> Result<(), NetError> {
        match self.rtnl.ack(RouteNetlinkMessage::DelAddress(message), 0) {
            Err(e) if !e.is(libc::EADDRNOTAVAIL) => {
                Err(self.fail(format!("delete address {what}"))(e))
            }
            _ => Ok(()),
        }
    }

    /// Every IPv4 address.
    pub fn addresses(&mut self) -> Result<Vec<AddressMessage>, NetError> {
        let answers = self
            .rtnl
            .dump(RouteNetlinkMessage::GetAddress(
                AddressMessageBuilder::<Ipv4Addr>::new().build(),
            ))
            .map_err(self.fail("list addresses"))?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .collect())
    }

    /// Creates the route, or replaces the route with the same destination in its table.
    /// Idempotent: replacing a route by itself changes nothing.
    pub fn replace_route(&mut self, route: RouteMessage, what: &str) -> Result<(), NetError> {
        self.rtnl
            .ack(
                RouteNetlinkMessage::NewRoute(route),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .map_err(self.fail(format!("set route {what}")))
    }

    /// Routes of the main IPv4 table.
    pub fn main_routes(&mut self) -> Result<Vec<RouteMessage>, NetError> {
        let mut query = RouteMessage::default();
        query.header.address_family = rtnetlink::packet_route::AddressFamily::Inet;
        let answers = self
            .rtnl
            .dump(RouteNetlinkMessage::GetRoute(query))
            .map_err(self.fail("list routes"))?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if table(&r) == u32::from(RouteHeader::RT_TABLE_MAIN) =>
                {
                    Some(r)
                }
                _ => None,
            })
            .collect())
    }
}

/// Asks the kernel to leave the counters out of link answers: nothing here reads them,
/// and they are most of each answer's size.
fn skip_stats() -> LinkAttribute {
    LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats])
}

/// The link's name.
pub(crate) fn name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Whether the link is administratively up.
pub(crate) fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

/// The link's kind (`veth`, `tun`, ...), when it has one.
pub(crate) fn kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

/// For a veth end: the index of its peer (in the peer's namespace).
pub(crate) fn peer_index(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

/// Whether `addresses` holds `addr/len` on link `index`.
pub(crate) fn has_address(
    addresses: &[AddressMessage],
    index: u32,
    addr: Ipv4Addr,
    len: u8,
) -> bool {
    addresses.iter().any(|a| {
        a.header.index == index
            && a.header.prefix_len == len
            && a.attributes
                .iter()
                .any(|attr| matches!(attr, AddressAttribute::Local(std::net::IpAddr::V4(v)) if *v == addr))
    })
}

/// A route's table (the attribute wins over the header byte, which caps at 255).
fn table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// Whether `routes` holds `destination/len via gateway` out of link `oif`.
pub(crate) fn has_route(
    routes: &[RouteMessage],
    destination: Ipv4Addr,
    len: u8,
    gateway: Ipv4Addr,
    oif: u32,
) -> bool {
    routes.iter().any(|r| {
        let dst = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                _ => None,
            })
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        r.header.destination_prefix_length == len
            && dst == destination
            && r.attributes.iter().any(
                |a| matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(g)) if *g == gateway),
            )
            && r.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(o) if *o == oif))
    })
}
