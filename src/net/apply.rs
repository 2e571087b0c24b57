//! Making a plan true, and undoing it. Both run on a worker thread (see `worker`).
//!
//! Create order, declared once (each step needs the ones before it):
//! 1. namespace (created, or entered when it exists);
//! 2. inside it: netlink socket, IPv4 forwarding, `lo` up (all bound to the namespace of
//!    the thread that makes them, hence done while inside);
//! 3. veth pair, created whole from the root namespace with the peer placed directly in
//!    the machine namespace (moving a link between namespaces later costs ~36 ms), then
//!    both ends up;
//! 4. tap (ioctl on /dev/net/tun opened inside the namespace), then up;
//! 5. addresses: host end, namespace end, tap;
//! 6. routes: namespace default via the host end; root: guest network via the namespace
//!    end (each needs the address that makes its gateway reachable);
//! 7. the anti-spoofing guard: an nftables table in the namespace that drops what the tap
//!    receives from any MAC or IPv4 source but the guest's (`policy::guard_changes`).
//!
//! Undo is one step: delete the namespace. The kernel destroys what is inside, and
//! destroying the namespace end of the veth takes the host end (and its route) along.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkMessage};
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::error::NetError;
use super::links::{self, Side};
use super::netlink::Rtnl;
use super::nfnl::Nfnl;
use super::plan::NetPlan;
use super::policy;
use super::watch::LinkWatch;
use super::worker::Worker;
use super::{netns, tap};

/// How long `remove` (and `scan`) wait for the kernel to take the host end of the veth
/// away with the namespace before deleting it by hand.
///
/// Measured here: ~1 ms after the unmount when the namespace has been idle; ~15-70 ms
/// right after `ensure` or `observe`, because a netlink socket that was open inside the
/// namespace gives its reference back only after an RCU grace period, and the kernel
/// tears namespaces down one batch at a time. Deleting the link by hand is synchronous
/// and costs ~33 ms, so it is only the fallback, for a namespace that something still
/// holds (a process left inside it, an open tap).
const TEARDOWN_WAIT: Duration = Duration::from_millis(250);

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Makes `plan` true. Idempotent: what exists and is right is kept, what is missing is
/// created, and what is in the way (a host veth whose peer is not in this namespace, a
/// non-tap link called like the tap) is replaced. Undo: [`remove`].
pub(crate) fn ensure(worker: &mut Worker, plan: &NetPlan) -> Result<(), NetError> {
    // 1. The namespace; from here on the thread is inside it.
    let created = match netns::open(&plan.netns)? {
        Some(ns) => {
            netns::enter(&plan.netns, &ns)?;
            false
        }
        None => {
            netns::create_and_enter(&plan.netns)?;
            true
        }
    };
    // 2. What must be made from inside.
    let ns_file = File::open("/proc/thread-self/ns/net").map_err(|source| NetError::Netns {
        name: plan.netns.clone(),
        action: "open from inside",
        source,
    })?;
    let mut ns_rtnl = Rtnl::open().map_err(|source| NetError::Netlink {
        place: super::error::place(Some(&plan.netns)),
        action: "open a netlink socket".to_string(),
        source,
    })?;
    enable_forwarding().map_err(|source| NetError::Forwarding {
        netns: plan.netns.clone(),
        source,
    })?;
    let mut ns = Side::netns(&mut ns_rtnl, &plan.netns);
    let mut root = Side::root(&mut worker.root);
    ns.set_up_by_name("lo")?;

    // 3. The veth pair.
    let (host_index, ns_index) = ensure_veth(&mut root, &mut ns, plan, &ns_file, created)?;

    // 4. The tap.
    let tap_index = ensure_tap(&mut ns, plan, created)?;

    // 5. Addresses.
    root.add_address(host_index, &plan.host_veth, plan.host_addr, plan.prefix_len)?;
    ns.add_address(ns_index, &plan.ns_veth, plan.ns_addr, plan.prefix_len)?;
    ns.add_address(tap_index, &plan.tap, plan.gateway, plan.prefix_len)?;

    // 6. Routes.
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(plan.host_addr)
        .output_interface(ns_index)
        .build();
    ns.replace_route(
        default,
        &format!("default via {} dev {}", plan.host_addr, plan.ns_veth),
    )?;
    let to_guest = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(plan.guest_network(), plan.prefix_len)
        .gateway(plan.ns_addr)
        .output_interface(host_index)
        .build();
    root.replace_route(
        to_guest,
        &format!(
            "{}/{} via {} dev {}",
            plan.guest_network(),
            plan.prefix_len,
            plan.ns_addr,
            plan.host_veth
        ),
    )?;

    // 7. The anti-spoofing guard on the tap (still inside the namespace).
    let place = Some(plan.netns.as_str());
    let mut nft = Nfnl::open().map_err(|source| NetError::Nftables {
        place: super::error::place(place),
        action: "open a netfilter socket".to_string(),
        source,
    })?;
    nft.apply_in(place, &policy::guard_changes(plan))?;
    Ok(())
}

/// Switches IPv4 forwarding on in the calling thread's namespace (the sysctl is per
/// namespace and resolved through the thread's namespace). Written only when off: a write
/// of the same value is harmless, but a read is cheaper. Returns whether it switched.
pub(crate) fn enable_forwarding() -> io::Result<bool> {
    if std::fs::read(IP_FORWARD)?.trim_ascii() == b"1" {
        return Ok(false);
    }
    std::fs::write(IP_FORWARD, b"1\n")?;
    Ok(true)
}

/// The two ends are one pair: each names the other's index as its peer, and both are
/// veths. (Indexes are per namespace, so each check alone could match by chance; a
/// namespace end only ever has a peer in the root namespace because only this code makes
/// it, so the two checks together pin the pair.)
fn paired(host: &LinkMessage, inside: &LinkMessage) -> bool {
    links::kind(host) == Some(&InfoKind::Veth)
        && links::kind(inside) == Some(&InfoKind::Veth)
        && links::peer_index(host) == Some(inside.header.index)
        && links::peer_index(inside) == Some(host.header.index)
}

/// Returns the (host, namespace) indexes of a veth pair that is up on both ends.
fn ensure_veth(
    root: &mut Side<'_>,
    ns: &mut Side<'_>,
    plan: &NetPlan,
    ns_file: &File,
    fresh_namespace: bool,
) -> Result<(u32, u32), NetError> {
    let host = root.link(&plan.host_veth)?;
    let inside = if fresh_namespace {
        None
    } else {
        ns.link(&plan.ns_veth)?
    };
    match (host, inside) {
        (Some(host), Some(inside)) if paired(&host, &inside) => {
            if !links::is_up(&host) {
                root.set_up(host.header.index, &plan.host_veth)?;
            }
            if !links::is_up(&inside) {
                ns.set_up(inside.header.index, &plan.ns_veth)?;
            }
            Ok((host.header.index, inside.header.index))
        }
        (host, inside) => {
            // Whatever is there is not our pair: a host end whose peer died with an
            // earlier namespace (or lives in one something still holds), or a stray
            // link called like the namespace end. Clear the names, then make the pair.
            if let Some(host) = host {
                root.delete_link(host.header.index, &plan.host_veth)?;
            }
            if let Some(inside) = inside {
                ns.delete_link(inside.header.index, &plan.ns_veth)?;
            }
            // The peer cannot be created up: the kernel configures it before linking the
            // two ends, and a veth without a peer refuses to open (ENOTCONN). The host end
            // is configured after linking, so it can.
            let peer = LinkUnspec::new_with_name(&plan.ns_veth)
                .setns_by_fd(ns_file.as_raw_fd())
                .build();
            let pair = LinkVeth::new(&plan.host_veth, &plan.ns_veth)
                .up()
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            root.create_link(
                pair,
                &format!(
                    "veth pair {} <-> {}/{}",
                    plan.host_veth, plan.netns, plan.ns_veth
                ),
            )?;
            let host = created(root, &plan.host_veth)?;
            let inside = created(ns, &plan.ns_veth)?;
            ns.set_up(inside.header.index, &plan.ns_veth)?;
            Ok((host.header.index, inside.header.index))
        }
    }
}

/// Looks up a link that was just created.
pub(crate) fn created(side: &mut Side<'_>, name: &str) -> Result<LinkMessage, NetError> {
    side.link(name)?.ok_or_else(|| {
        side.fail(format!("find link {name}"))(super::netlink::NlError::Protocol(
            "missing right after it was created".to_string(),
        ))
    })
}

/// Returns the index of the tap, up. The calling thread is inside the namespace.
fn ensure_tap(ns: &mut Side<'_>, plan: &NetPlan, fresh_namespace: bool) -> Result<u32, NetError> {
    let existing = if fresh_namespace {
        None
    } else {
        ns.link(&plan.tap)?
    };
    let tap = match existing {
        Some(link) if links::kind(&link) == Some(&InfoKind::Tun) => link,
        other => {
            if let Some(link) = other {
                ns.delete_link(link.header.index, &plan.tap)?;
            }
            tap::create_persistent(&plan.tap).map_err(|source| NetError::Tap {
                netns: plan.netns.clone(),
                tap: plan.tap.clone(),
                source,
            })?;
            created(ns, &plan.tap)?
        }
    };
    if !links::is_up(&tap) {
        ns.set_up(tap.header.index, &plan.tap)?;
    }
    Ok(tap.header.index)
}

/// Removes whatever of `plan` exists. Idempotent, and works on any partial state (only
/// the namespace, only a host veth, nothing at all).
///
/// When this returns Ok nothing of the plan is left in the root namespace: the namespace
/// is unmounted and the host end of the veth (with its route) is gone, so `ensure` of the
/// same plan can follow at once and a leak check sees nothing. What the kernel still
/// tears down afterwards lives only inside the dead namespace, where nothing can see it.
pub(crate) fn remove(worker: &mut Worker, plan: &NetPlan) -> Result<(), NetError> {
    // Subscribe before deleting, so the host end's removal cannot be missed.
    let mut watch = LinkWatch::open().map_err(|source| NetError::Netlink {
        place: super::error::place(None),
        action: "subscribe to link events".to_string(),
        source,
    })?;
    let mut root = Side::root(&mut worker.root);
    let host = root.link(&plan.host_veth)?;
    netns::delete(&plan.netns)?;
    if let Some(host) = host {
        let index = host.header.index;
        let gone = watch
            .wait_gone(
                root.rtnl,
                index,
                &plan.host_veth,
                Instant::now() + TEARDOWN_WAIT,
            )
            .map_err(root.fail(format!("wait for link {} to go", plan.host_veth)))?;
        if !gone {
            root.delete_link(index, &plan.host_veth)?;
        }
    }
    Ok(())
}
