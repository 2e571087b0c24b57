//! NetFabric: makes a [`NetPlan`] true on the host, and undoes it.
//!
//! The veth pair is created from inside the machine's namespace with its peer placed
//! directly in the root namespace (moving an existing link between namespaces is an order
//! of magnitude slower). The in-namespace part runs on a short-lived OS thread with its
//! own netlink socket and a current-thread runtime; the root-namespace part uses the
//! fabric's long-lived handle.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::netns;
use super::plan::NetPlan;
use super::tap;

/// A network operation failed. The message names the object and the operation.
#[derive(Debug, thiserror::Error)]
#[error("network {op} {target}: {message}")]
pub struct NetError {
    op: &'static str,
    target: String,
    message: String,
}

fn err(op: &'static str, target: &str, e: impl std::fmt::Display) -> NetError {
    NetError {
        op,
        target: target.to_string(),
        message: e.to_string(),
    }
}

fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

fn not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV || m.raw_code() == -libc::ENOENT)
}

/// The host network of all machines.
#[derive(Clone)]
pub struct NetFabric {
    handle: Handle,
    root_ns: Arc<File>,
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn add_address(
    handle: &Handle,
    index: u32,
    addr: Ipv4Addr,
    len: u8,
) -> Result<(), rtnetlink::Error> {
    match handle
        .address()
        .add(index, IpAddr::V4(addr), len)
        .execute()
        .await
    {
        Err(e) if !exists(&e) => Err(e),
        _ => Ok(()),
    }
}

async fn set_up(handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
}

/// The part of a plan that lives inside the namespace. Runs on the namespace thread.
async fn ensure_inside(plan: &NetPlan, root_ns: i32) -> Result<(), NetError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| err("connect", &plan.netns, e))?;
    tokio::spawn(connection);
    let lo = link_index(&handle, "lo")
        .await
        .map_err(|e| err("find", "lo", e))?;
    if let Some(lo) = lo {
        set_up(&handle, lo).await.map_err(|e| err("up", "lo", e))?;
    }
    let veth = match link_index(&handle, &plan.ns_veth)
        .await
        .map_err(|e| err("find", &plan.ns_veth, e))?
    {
        Some(index) => index,
        None => {
            let peer = LinkUnspec::new_with_name(&plan.host_veth)
                .setns_by_fd(root_ns)
                .build();
            let message = LinkVeth::new(&plan.ns_veth, &plan.host_veth)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(|e| err("create veth", &plan.host_veth, e))?;
            link_index(&handle, &plan.ns_veth)
                .await
                .map_err(|e| err("find", &plan.ns_veth, e))?
                .ok_or_else(|| err("find", &plan.ns_veth, "missing right after creation"))?
        }
    };
    add_address(&handle, veth, plan.ns_addr, plan.prefix_len)
        .await
        .map_err(|e| err("address", &plan.ns_veth, e))?;
    set_up(&handle, veth)
        .await
        .map_err(|e| err("up", &plan.ns_veth, e))?;

    tap::ensure_persistent(&plan.tap).map_err(|e| err("create tap", &plan.tap, e))?;
    let tap = link_index(&handle, &plan.tap)
        .await
        .map_err(|e| err("find", &plan.tap, e))?
        .ok_or_else(|| err("find", &plan.tap, "missing right after creation"))?;
    add_address(&handle, tap, plan.gateway, plan.prefix_len)
        .await
        .map_err(|e| err("address", &plan.tap, e))?;
    set_up(&handle, tap)
        .await
        .map_err(|e| err("up", &plan.tap, e))?;

    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(plan.host_addr)
        .build();
    if let Err(e) = handle.route().add(default).replace().execute().await {
        return Err(err("default route", &plan.netns, e));
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
        .map_err(|e| err("enable forwarding", &plan.netns, e))?;
    Ok(())
}

impl NetFabric {
    /// Opens the root-namespace netlink handle. Must be called inside a tokio runtime.
    pub fn start() -> Result<NetFabric, NetError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| err("connect", "root", e))?;
        tokio::spawn(connection);
        let root_ns =
            File::open("/proc/thread-self/ns/net").map_err(|e| err("open", "root namespace", e))?;
        Ok(NetFabric {
            handle,
            root_ns: Arc::new(root_ns),
        })
    }

    /// Makes the plan true. Idempotent: whatever exists is kept, whatever is missing is
    /// created, so it also completes a half-done earlier call. Undo: [`NetFabric::remove`].
    pub async fn ensure(&self, plan: &NetPlan) -> Result<(), NetError> {
        let name = plan.netns.clone();
        tokio::task::spawn_blocking(move || netns::create(&name))
            .await
            .map_err(|e| err("create namespace", &plan.netns, e))?
            .map_err(|e| err("create namespace", &plan.netns, e))?;

        let inside = plan.clone();
        let root_fd = self.root_ns.clone();
        let ns_name = plan.netns.clone();
        let result = tokio::task::spawn_blocking(move || {
            netns::run_in(&ns_name, move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime
                    .block_on(ensure_inside(&inside, root_fd.as_raw_fd()))
                    .map_err(io::Error::other)
            })
        })
        .await
        .map_err(|e| err("configure namespace", &plan.netns, e))?;
        result.map_err(|e| err("configure namespace", &plan.netns, e))?;

        let host = link_index(&self.handle, &plan.host_veth)
            .await
            .map_err(|e| err("find", &plan.host_veth, e))?
            .ok_or_else(|| {
                err(
                    "find",
                    &plan.host_veth,
                    "host end of the veth pair is missing",
                )
            })?;
        add_address(&self.handle, host, plan.host_addr, plan.prefix_len)
            .await
            .map_err(|e| err("address", &plan.host_veth, e))?;
        set_up(&self.handle, host)
            .await
            .map_err(|e| err("up", &plan.host_veth, e))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(plan.guest_network(), plan.prefix_len)
            .gateway(plan.ns_addr)
            .output_interface(host)
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| err("route", &plan.host_veth, e))?;
        Ok(())
    }

    /// Removes whatever of the plan exists. Idempotent, and works on any partial state:
    /// the host end of the veth is deleted explicitly (so it is gone when this returns,
    /// taking its route with it), then the namespace, which takes the tap along.
    pub async fn remove(&self, plan: &NetPlan) -> Result<(), NetError> {
        if let Some(index) = link_index(&self.handle, &plan.host_veth)
            .await
            .map_err(|e| err("find", &plan.host_veth, e))?
        {
            match self.handle.link().del(index).execute().await {
                Err(e) if !not_found(&e) => return Err(err("delete", &plan.host_veth, e)),
                _ => {}
            }
        }
        let name = plan.netns.clone();
        tokio::task::spawn_blocking(move || netns::delete(&name))
            .await
            .map_err(|e| err("delete namespace", &plan.netns, e))?
            .map_err(|e| err("delete namespace", &plan.netns, e))
    }

    /// Every namespace and root-namespace link whose name starts with `prefix`: what a
    /// leak check or an orphan sweep compares with the records.
    pub async fn scan(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        let mut found: Vec<String> = netns::list(&format!("{prefix}-"))
            .map_err(|e| err("list", "/run/netns", e))?
            .into_iter()
            .map(|n| format!("netns:{n}"))
            .collect();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links
            .try_next()
            .await
            .map_err(|e| err("list", "links", e))?
        {
            for attr in link.attributes {
                if let LinkAttribute::IfName(name) = attr
                    && name.starts_with(prefix)
                {
                    found.push(format!("link:{name}"));
                }
            }
        }
        found.sort();
        Ok(found)
    }
}
