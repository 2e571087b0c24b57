//! The guest resolver's address on the host: one /32 on the root namespace's `lo`,
//! labelled `lo:hearth-<prefix>`, so that guests reach it through their usual route (the
//! host end of their veth) and the DNS server can bind it. One per daemon, made at start
//! with the daemon's part of the policy; a machine's network never touches it. (`lo`
//! rather than a link of its own: every kernel has it, while dummy links need a module.)
//!
//! [`ensure`] is idempotent: the right address is kept; an address under the label that is
//! not it (the pool changed) is removed. Its undo, [`remove`], deletes every address under
//! the label; none there is fine. Like the table, the address outlives the daemon: guests
//! keep their resolver across a restart.

use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};

use super::error::NetError;
use super::links::Side;
use super::worker::Worker;

const LOOPBACK: &str = "lo";

/// The label of the resolver address of the daemon with `prefix`: `lo:hearth-<prefix>`
/// (at most 15 bytes, the kernel's limit, with a prefix of at most 5).
pub fn label(prefix: &str) -> String {
    format!("{LOOPBACK}:hearth-{prefix}")
}

/// Puts `addr/32` on `lo` under `label`, and nothing else under it.
pub(crate) fn ensure(worker: &mut Worker, label: &str, addr: Ipv4Addr) -> Result<(), NetError> {
    let mut root = Side::root(&mut worker.root);
    let index = loopback_index(&mut root)?;
    let mut present = false;
    for (message, found) in labelled(&mut root, label)? {
        if found == addr && message.header.prefix_len == 32 {
            present = true;
        } else {
            root.delete_address(message, &format!("{found} ({label})"))?;
        }
    }
    if present {
        return Ok(());
    }
    root.add_labelled_address(index, label, addr, 32)
}

/// Deletes every address under `label`.
pub(crate) fn remove(worker: &mut Worker, label: &str) -> Result<(), NetError> {
    let mut root = Side::root(&mut worker.root);
    for (message, found) in labelled(&mut root, label)? {
        root.delete_address(message, &format!("{found} ({label})"))?;
    }
    Ok(())
}

fn loopback_index(root: &mut Side<'_>) -> Result<u32, NetError> {
    let link = root.link(LOOPBACK)?.ok_or_else(|| {
        root.fail("find lo")(super::netlink::NlError::Protocol(
            "the root namespace has no loopback link".to_string(),
        ))
    })?;
    Ok(link.header.index)
}

/// The IPv4 addresses carrying `label`, with their messages (what a delete sends back).
fn labelled(root: &mut Side<'_>, label: &str) -> Result<Vec<(AddressMessage, Ipv4Addr)>, NetError> {
    Ok(root
        .addresses()?
        .into_iter()
        .filter(|a| {
            a.attributes
                .iter()
                .any(|attr| matches!(attr, AddressAttribute::Label(l) if l == label))
        })
        .filter_map(|a| {
            let local = a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Local(IpAddr::V4(v)) => Some(*v),
                _ => None,
            })?;
            Some((a, local))
        })
        .collect())
}
