//! Why an audit or a sweep could not look at the host or the store.

use std::path::PathBuf;

use crate::net::NetError;
use crate::store::StoreError;

/// Why an audit could not be made. A sweep's individual releases do not fail the sweep;
/// they are reported in its [`super::SweepReport`].
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading the records, leases or routes failed.
    #[error("audit: read the store: {0}")]
    Store(#[from] StoreError),
    /// Listing namespaces and links failed.
    #[error("audit: scan the host network: {0}")]
    Net(#[from] NetError),
    /// Listing the machine directories failed.
    #[error("audit: list {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Listing the machines' cgroups failed.
    #[error("audit: scan the cgroups: {0}")]
    Cgroup(#[from] crate::vmm::cgroup::CgroupError),
    /// The blocking scan task did not finish.
    #[error("audit: scan task: {0}")]
    Task(String),
}
