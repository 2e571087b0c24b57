//! What an audit reports: leaks (on the host or in a table, owned by no record) and
//! missing resources (marked `Done` by a record, not there).

pub use crate::machine::step::ResourceKind;

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
