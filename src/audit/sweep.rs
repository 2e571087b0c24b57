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
//! Releases go through the resources' owners: routes through the RegistryPublisher (so
//! route watchers hear the withdrawal), leases through the IpPool, namespaces and links
//! through the TapAllocator. An orphan VMM is SIGKILLed (it owns nothing recorded, so
//! there is nothing to shut down gracefully). The order is the teardown order: route,
//! VMM, network, lease, directory.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::error::AuditError;
use super::finding::{Finding, ResourceKind};
use crate::actors::ip_pool::IpPoolMsg;
use crate::actors::registry::RegistryMsg;
use crate::actors::services::Services;
use crate::actors::tap_allocator::TapMsg;
use crate::actors::{ask, names};
use crate::machine::record::MachineState;
use crate::net::NetPlan;

/// How long a singleton may take to answer one release.
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

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
    pub elapsed: Duration,
}

/// Audits once and releases every leak the rule above allows. Fails only when the audit
/// itself cannot be made; each release's outcome is in the report.
///
/// Idempotent (see the module header).
pub async fn sweep(services: &Services) -> Result<SweepReport, AuditError> {
    let started = Instant::now();
    let audit = super::run(services).await?;
    let mut leaks = audit.report.leaks;
    leaks.sort_by_key(|f| teardown_rank(f.kind));
    let mut report = SweepReport::default();
    // Namespace and link are one release (one plan); VMMs of one id are killed together.
    let mut done: HashSet<(u8, String)> = HashSet::new();
    for leak in leaks {
        let Some(id) = leak.machine_id.clone() else {
            report
                .kept
                .push((leak, "the name carries no machine id".to_string()));
            continue;
        };
        match orphaned(services, &id) {
            Ok(true) => {}
            Ok(false) => {
                report.kept.push((
                    leak,
                    "a live record owns the id; its run releases it".into(),
                ));
                continue;
            }
            Err(e) => {
                report.failed.push((leak, e));
                continue;
            }
        }
        let result = if done.insert((teardown_rank(leak.kind), id.clone())) {
            release(services, leak.kind, &id).await
        } else {
            Ok(())
        };
        match result {
            Ok(()) => {
                tracing::info!(kind = %leak.kind, name = %leak.name, machine = %id, "released an orphan");
                report.released.push(leak);
            }
            Err(e) => {
                tracing::warn!(kind = %leak.kind, name = %leak.name, machine = %id, error = %e, "could not release an orphan");
                report.failed.push((leak, e));
            }
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Position in the teardown order (the reverse of `CREATE_ORDER`).
fn teardown_rank(kind: ResourceKind) -> u8 {
    match kind {
        ResourceKind::Route => 0,
        ResourceKind::Vmm => 1,
        ResourceKind::Netns | ResourceKind::Link => 2,
        ResourceKind::Lease => 3,
        ResourceKind::MachineDir => 4,
    }
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

/// Releases every resource of `kind` that machine `id` has. Idempotent.
async fn release(services: &Services, kind: ResourceKind, id: &str) -> Result<(), String> {
    let machine = id.to_string();
    match kind {
        ResourceKind::Route => ask(
            names::REGISTRY,
            |reply| RegistryMsg::Unpublish { machine, reply },
            ASK_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())?,
        ResourceKind::Lease => ask(
            names::IP_POOL,
            |reply| IpPoolMsg::Release { machine, reply },
            ASK_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())?,
        ResourceKind::Netns | ResourceKind::Link => {
            // Only the names matter for a removal; slot 0 is as good as any.
            let plan = NetPlan::derive(&services.config().network.prefix, id, *services.pool(), 0)
                .map_err(|e| format!("network plan of {id}: {e}"))?;
            ask(
                names::TAP_ALLOCATOR,
                |reply| TapMsg::Remove { plan, reply },
                ASK_TIMEOUT,
            )
            .await
            .map_err(|e| e.to_string())?
        }
        ResourceKind::Vmm => kill_vmms(services, id).await,
        ResourceKind::MachineDir => remove_dir(services, id).await,
    }
}

/// SIGKILLs every VMM of machine `id` that this daemon's data directory names, and waits
/// for each to exit. Idempotent (see [`crate::vmm::marked::kill_unrecorded`]).
async fn kill_vmms(services: &Services, id: &str) -> Result<(), String> {
    let dir = services.config().machine_dir(id);
    crate::vmm::marked::kill_unrecorded(services.vmm().name_prefix(), id, &dir).await
}

/// Removes the machine directory, as the `disk` step's release does. Idempotent.
async fn remove_dir(services: &Services, id: &str) -> Result<(), String> {
    let dir = services.config().machine_dir(id);
    crate::actors::rootfs_cache::remove_disk(dir.join(crate::machine::steps::disk::ROOT_DISK))
        .await?;
    match tokio::fs::remove_dir_all(&dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("remove {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}
