//! The one error type of the host network. Each variant says which kind of host object
//! failed, and every message names the object (namespace, interface, address, route) and
//! where it lives, so a failed step in a machine's history can be acted on by reading it.

use std::io;

use super::netlink::NlError;

/// A host network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The dedicated namespace threads could not be started, are gone, or a job on them
    /// could not run safely (for example the thread could not return to the root
    /// namespace).
    #[error("network worker thread: {0}")]
    Worker(String),
    /// A named network namespace could not be created, opened, entered, deleted or listed.
    #[error("network namespace {name}: {action}: {source}")]
    Netns {
        /// The namespace name (or the directory, when listing).
        name: String,
        /// What was being done.
        action: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A netlink request was refused or failed.
    #[error("{action} in {place}: {source}")]
    Netlink {
        /// `root namespace` or `namespace <name>`.
        place: String,
        /// What was being done, naming the link, address or route.
        action: String,
        /// The kernel's answer or the transport failure.
        #[source]
        source: NlError,
    },
    /// The tap device could not be created or made persistent.
    #[error("tap {tap} in namespace {netns}: {source}")]
    Tap {
        /// The namespace.
        netns: String,
        /// The tap name.
        tap: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// An nftables change or query was refused or failed.
    #[error("nftables in {place}: {action}: {source}")]
    Nftables {
        /// `root namespace` or `namespace <name>`.
        place: String,
        /// The change or query, naming its table and chain.
        action: String,
        /// The kernel's answer or the transport failure.
        #[source]
        source: NlError,
    },
    /// The policy was used before the daemon installed its table.
    #[error("the packet policy is not installed")]
    PolicyNotInstalled,
    /// IPv4 forwarding could not be read or switched on inside the namespace.
    #[error("IPv4 forwarding in namespace {netns}: {source}")]
    Forwarding {
        /// The namespace.
        netns: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

/// Where a netlink request went, for messages.
pub(crate) fn place(netns: Option<&str>) -> String {
    match netns {
        None => "root namespace".to_string(),
        Some(name) => format!("namespace {name}"),
    }
}
