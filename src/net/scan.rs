//! Everything on the host that carries a name prefix: what an orphan sweep compares with
//! the records, and what a leak check expects to be empty.
//!
//! A host veth whose namespace was just deleted stays visible while the kernel tears the
//! namespace down (a millisecond when idle, longer under load). A scan that reported it
//! would call a removal in progress a leak, so links without a namespace are given a
//! grace and only reported if they outlive it (then something really holds their
//! namespace).

use std::fmt;
use std::time::{Duration, Instant};

use super::error::NetError;
use super::links::{self, Side};
use super::netns;
use super::plan::parse_machine_id;
use super::watch::LinkWatch;
use super::worker::Worker;

/// How long a scan waits for a host veth whose namespace is gone to be taken away by the
/// kernel before reporting it. Longer than `remove`'s wait (which falls back to deleting
/// the link): a scan cannot delete, and the kernel tears namespaces down in batches that
/// take seconds on a loaded host; reporting a link the kernel is about to remove would
/// be a false leak. It costs time only when such a link exists.
const ORPHAN_LINK_GRACE: Duration = Duration::from_secs(2);

/// One host object carrying the prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NetResource {
    /// A namespace under /run/netns named `<prefix>-...` (mounted, or a leftover mount
    /// point file).
    Netns {
        /// Its name.
        name: String,
        /// The machine id in the name, when the name has the `<prefix>-<id>` shape.
        machine_id: Option<String>,
    },
    /// A link in the root namespace named `<prefix><machine id>`: a host veth.
    Link {
        /// Its name.
        name: String,
        /// The machine id in the name.
        machine_id: String,
    },
}

impl NetResource {
    /// The machine this object belongs to, when its name says.
    pub fn machine_id(&self) -> Option<&str> {
        match self {
            NetResource::Netns { machine_id, .. } => machine_id.as_deref(),
            NetResource::Link { machine_id, .. } => Some(machine_id),
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        match self {
            NetResource::Netns { name, .. } | NetResource::Link { name, .. } => name,
        }
    }
}

impl fmt::Display for NetResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetResource::Netns { name, .. } => write!(f, "netns:{name}"),
            NetResource::Link { name, .. } => write!(f, "link:{name}"),
        }
    }
}

/// Lists the prefix's namespaces and root-namespace links, sorted (namespaces first).
pub(crate) fn scan(worker: &mut Worker, prefix: &str) -> Result<Vec<NetResource>, NetError> {
    let mut watch = LinkWatch::open().map_err(|source| NetError::Netlink {
        place: super::error::place(None),
        action: "subscribe to link events".to_string(),
        source,
    })?;
    // Links first, namespaces second: a namespace is always made before its veth, so a
    // link seen here whose namespace is then missing really lost it.
    let mut root = Side::root(&mut worker.root);
    let mut links_found = Vec::new();
    for link in root.links()? {
        let Some(name) = links::name(&link) else {
            continue;
        };
        if let Some(id) = name
            .strip_prefix(prefix)
            .filter(|id| parse_machine_id(id).is_some())
        {
            links_found.push((
                link.header.index,
                NetResource::Link {
                    name: name.to_string(),
                    machine_id: id.to_string(),
                },
            ));
        }
    }
    let ns_prefix = format!("{prefix}-");
    let mut found: Vec<NetResource> = netns::list(&ns_prefix)?
        .into_iter()
        .map(|name| {
            let machine_id = name
                .strip_prefix(&ns_prefix)
                .filter(|id| parse_machine_id(id).is_some())
                .map(str::to_string);
            NetResource::Netns { name, machine_id }
        })
        .collect();
    let mut orphans = Vec::new();
    for (index, link) in links_found {
        let has_netns = found.iter().any(|r| {
            matches!(r, NetResource::Netns { machine_id: Some(m), .. } if Some(m.as_str()) == link.machine_id())
        });
        if has_netns {
            found.push(link);
        } else {
            orphans.push((index, link));
        }
    }
    let deadline = Instant::now() + ORPHAN_LINK_GRACE;
    for (index, resource) in orphans {
        let gone = watch
            .wait_gone(root.rtnl, index, resource.name(), deadline)
            .map_err(root.fail(format!("wait for link {} to go", resource.name())))?;
        if !gone {
            found.push(resource);
        }
    }
    found.sort();
    Ok(found)
}
