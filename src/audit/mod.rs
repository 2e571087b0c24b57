//! The leak invariant: everything on the host that carries hearth's naming (namespaces,
//! root-namespace links, VMM processes, machine directories) and every row of the
//! `leases` and `routes` tables is owned by a machine record that has touched the step
//! making it; and everything a record marks `Done` is there.
//!
//! An audit is a host scan (`scan`, the only I/O) compared with the records (`compare`,
//! pure and table-tested). The same comparison drives the orphan sweep at start
//! (`sweep`), which releases what no record owns.
//!
//! ```text
//!  scan(host, then tables) ─┐
//!                           ├─> compare (pure) ─> AuditReport { leaks, missing }
//!  store.machines() ────────┘                        │
//!                                                    └─> sweep: release leaks whose id
//!                                                        has no live record
//! ```

pub mod compare;
pub mod error;
pub mod finding;
pub mod scan;
pub mod sweep;

use std::time::{Duration, Instant};

pub use compare::compare;
pub use error::AuditError;
pub use finding::{AuditReport, Finding, ResourceKind};
pub use scan::{HostScan, Named, scan};
pub use sweep::{SweepReport, sweep};

use crate::actors::services::Services;

/// One audit's report, with what it looked at and how long it took.
#[derive(Debug, Clone)]
pub struct Audit {
    /// The findings.
    pub report: AuditReport,
    /// Records compared (destroyed tombstones included).
    pub machines: usize,
    /// Scan plus comparison.
    pub elapsed: Duration,
}

/// Scans the host, then reads the records, then compares.
///
/// The order matters: hearth commits a record (and marks a step `Begun`) before any
/// effect, so every object the scan saw already has its record by the time the records
/// are read. A machine that changes while the audit runs can still show up as a
/// transient finding (a release that finished between the scan and the read looks like a
/// leak); an audit of a busy host is a snapshot, and a finding that persists is real.
pub async fn run(services: &Services) -> Result<Audit, AuditError> {
    let started = Instant::now();
    let host = scan(services).await?;
    let records = services.store().machines()?;
    let report = compare(&records, &host, services);
    Ok(Audit {
        report,
        machines: records.len(),
        elapsed: started.elapsed(),
    })
}
