//! The orphan sweep at start: resources that carry hearth's naming but that no record
//! owns (left by a crash between acquiring and recording, or by an older daemon) are
//! released, through the same comparison as an audit.
//!
//! **The rule:** a leak is released only when its machine id has no record at all, or
//! its record is settled `destroyed` with nothing touched. The resources of any other
//! record are that machine's run's business: a run may be between the `Begun` commit and
//! its effect right now, and what looks like a leak of a live record (a resource of an
//! untouched step) is reported by the audit and left alone. The owner is read again from
//! the store just before each release, so a record that appeared after the scan is
//! respected. Names that carry the prefix but no machine id are reported and kept: they
//! do not say whose they are.
//!
//! Idempotent: every release is (a missing object is success), and so is the whole
//! sweep; a second sweep finds nothing of what the first released. A sweep interrupted by
//! a crash is finished by the next start's sweep.
//!
//! Releases are the steps' own: for each orphaned id the sweep synthesises a record that
//! marks `Begun` every step owning a leaked resource (`ResourceKind::step`, from the step
//! catalogue) and runs those steps' releases in teardown order, exactly as a destroy
//! would on a half-done machine — routes through the RegistryPublisher (so watchers hear
//! the withdrawal), the VMM's release (which ends any process carrying the machine's
//! marker), the packet policy and the network through the network fabric, the lease
//! in the store, and the directory.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::error::AuditError;
use super::finding::Finding;
use crate::actors::services::Services;
use crate::machine::record::{MachineRecord, MachineState};
use crate::machine::spec::MachineSpec;
use crate::machine::step::{Direction, Mark, Step, TEARDOWN_ORDER};
use crate::machine::steps;

/// What one sweep did.
#[derive(Debug, Clone, Default)]
pub struct SweepReport {
    /// Leaks released.
    pub released: Vec<Finding>,
    /// Leaks left alone, with why (a live record owns the id, or the name has no id).
    pub kept: Vec<(Finding, String)>,
    /// Leaks whose release failed, with the error.
    pub failed: Vec<(Finding, String)>,
    /// The audit plus every release.
    pub elapsed: std::time::Duration,
}

/// Audits once and releases every leak the rule above allows. Fails only when the audit
/// itself cannot be made; each release's outcome is in the report.
///
/// Idempotent (see the module header).
pub async fn sweep(services: &Services) -> Result<SweepReport, AuditError> {
    let started = Instant::now();
    let audit = super::run(services).await?;
    let mut report = SweepReport::default();
    let mut by_id: BTreeMap<String, Vec<Finding>> = BTreeMap::new();
    for leak in audit.report.leaks {
        match leak.machine_id.clone() {
            Some(id) => by_id.entry(id).or_default().push(leak),
            None => report
                .kept
                .push((leak, "the name carries no machine id".to_string())),
        }
    }
    for (id, leaks) in by_id {
        match orphaned(services, &id) {
            Ok(true) => {}
            Ok(false) => {
                let why = "a live record owns the id; its run releases it";
                report
                    .kept
                    .extend(leaks.into_iter().map(|l| (l, why.to_string())));
                continue;
            }
            Err(e) => {
                report
                    .failed
                    .extend(leaks.into_iter().map(|l| (l, e.clone())));
                continue;
            }
        }
        let owners: BTreeSet<Step> = leaks.iter().map(|l| l.kind.step()).collect();
        let rec = orphan_record(&id, &owners);
        for step in TEARDOWN_ORDER.into_iter().filter(|s| owners.contains(s)) {
            let result = steps::run(step, Direction::Release, services, &rec).await;
            for leak in leaks.iter().filter(|l| l.kind.step() == step) {
                match &result {
                    Ok(_) => {
                        tracing::info!(kind = %leak.kind, name = %leak.name, machine = %id, "released an orphan");
                        report.released.push(leak.clone());
                    }
                    Err(e) => {
                        tracing::warn!(kind = %leak.kind, name = %leak.name, machine = %id, error = %e, "could not release an orphan");
                        report.failed.push((leak.clone(), e.to_string()));
                    }
                }
            }
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The record a release of machine `id`'s orphans runs on: nothing recorded but the id,
/// and every owning step `Begun` (its effect may or may not exist), which every release
/// handles.
fn orphan_record(id: &str, owners: &BTreeSet<Step>) -> MachineRecord {
    let mut rec = MachineRecord::new(
        id.to_string(),
        String::new(),
        String::new(),
        MachineSpec::default(),
        0,
    );
    rec.desired = crate::machine::record::Desired::Destroyed;
    for step in owners {
        rec.set_mark(*step, Mark::Begun);
    }
    rec
}

/// True when no record, or only a settled tombstone that holds nothing, has this id:
/// the only case where the sweep may release (read now, not from the audit's snapshot).
fn orphaned(services: &Services, id: &str) -> Result<bool, String> {
    let rec = services
        .store()
        .machine(id)
        .map_err(|e| format!("read the record of {id}: {e}"))?;
    Ok(rec.is_none_or(|r| {
        r.state == MachineState::Destroyed && r.current.is_none() && r.nothing_touched()
    }))
}
