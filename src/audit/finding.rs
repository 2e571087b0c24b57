//! What an audit reports: leaks (on the host or in a table, owned by no record) and
//! missing resources (marked `Done` by a record, not there).

use std::fmt;

/// The kinds of resource a machine owns, one per owning step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    /// A network namespace `<prefix>-<id>` (step `network`).
    Netns,
    /// A root-namespace link `<prefix><id>` (step `network`).
    Link,
    /// A VMM process carrying the machine's marker (step `vmm`).
    Vmm,
    /// A directory under `<data_dir>/machines` (step `disk`).
    MachineDir,
    /// A row of the `leases` table (step `lease`).
    Lease,
    /// A row of the `routes` table (step `publish`).
    Route,
}

impl ResourceKind {
    /// Lower-case name, as the CLI prints it.
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::Netns => "netns",
            ResourceKind::Link => "link",
            ResourceKind::Vmm => "vmm",
            ResourceKind::MachineDir => "machine_dir",
            ResourceKind::Lease => "lease",
            ResourceKind::Route => "route",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One leaked or missing resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Finding {
    /// What it is.
    pub kind: ResourceKind,
    /// Its name on the host: namespace or link name, `pid N`, directory path, `slot N`,
    /// or the route's machine id.
    pub name: String,
    /// The machine its name says it belongs to; none when the name carries hearth's
    /// prefix but no machine id.
    pub machine_id: Option<String>,
    /// Why it is a finding, for a person.
    pub why: String,
}

/// The result of comparing the host with the records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// On the host (or in a table) and owned by no record.
    pub leaks: Vec<Finding>,
    /// Marked `Done` by a record and not there.
    pub missing: Vec<Finding>,
}

impl AuditReport {
    /// True when there is nothing to report.
    pub fn is_clean(&self) -> bool {
        self.leaks.is_empty() && self.missing.is_empty()
    }
}
