//! Conversions between the domain types and the protobuf messages.

use super::pb;
use crate::audit::{Audit, Finding, ResourceKind};
use crate::machine::record::{Desired, MachineEvent, MachineRecord, MachineState};
use crate::machine::spec::{MachineSpec, RawSpec};
use crate::route::{Route, RouteChange};

/// The protobuf state of a domain state.
pub fn state(state: MachineState) -> pb::MachineState {
    match state {
        MachineState::Created => pb::MachineState::Created,
        MachineState::Starting => pb::MachineState::Starting,
        MachineState::Started => pb::MachineState::Started,
        MachineState::Stopping => pb::MachineState::Stopping,
        MachineState::Stopped => pb::MachineState::Stopped,
        MachineState::Destroying => pb::MachineState::Destroying,
        MachineState::Destroyed => pb::MachineState::Destroyed,
        MachineState::Failed => pb::MachineState::Failed,
        MachineState::Prepared => pb::MachineState::Prepared,
    }
}

/// The domain state of a protobuf state (`None` for unspecified).
pub fn state_from(value: i32) -> Option<MachineState> {
    Some(match pb::MachineState::try_from(value).ok()? {
        pb::MachineState::Unspecified => return None,
        pb::MachineState::Created => MachineState::Created,
        pb::MachineState::Starting => MachineState::Starting,
        pb::MachineState::Started => MachineState::Started,
        pb::MachineState::Stopping => MachineState::Stopping,
        pb::MachineState::Stopped => MachineState::Stopped,
        pb::MachineState::Destroying => MachineState::Destroying,
        pb::MachineState::Destroyed => MachineState::Destroyed,
        pb::MachineState::Failed => MachineState::Failed,
        pb::MachineState::Prepared => MachineState::Prepared,
    })
}

fn desired(desired: Desired) -> pb::DesiredState {
    match desired {
        Desired::Started => pb::DesiredState::Started,
        Desired::Stopped => pb::DesiredState::Stopped,
        Desired::Destroyed => pb::DesiredState::Destroyed,
        Desired::Prepared => pb::DesiredState::Prepared,
    }
}

/// The raw fields of a request's spec.
pub fn raw_spec(spec: Option<pb::MachineSpec>) -> RawSpec {
    let spec = spec.unwrap_or_default();
    RawSpec {
        image: spec.image,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        command: spec.command,
        env: spec.env.into_iter().collect(),
        ports: spec.ports,
        entrypoint: spec.entrypoint,
        workdir: spec.workdir,
        user: spec.user,
        disk_mib: spec.disk_mib,
    }
}

fn spec(spec: &MachineSpec) -> pb::MachineSpec {
    pb::MachineSpec {
        image: spec.image.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        command: spec.command.clone(),
        env: spec.env.iter().cloned().collect(),
        ports: spec.ports.iter().map(|p| u32::from(*p)).collect(),
        entrypoint: spec.entrypoint.clone(),
        workdir: spec.workdir.clone().unwrap_or_default(),
        user: spec.user.clone().unwrap_or_default(),
        disk_mib: spec.disk_mib,
        pool: String::new(),
    }
}

/// A machine as the API shows it.
pub fn machine(rec: &MachineRecord) -> pb::Machine {
    pb::Machine {
        id: rec.id.clone(),
        name: rec.name.clone(),
        request_id: rec.request_id.clone(),
        spec: Some(spec(&rec.spec)),
        state: state(rec.state) as i32,
        desired: desired(rec.desired) as i32,
        current_step: rec
            .current
            .map(|(step, dir)| format!("{}:{}", dir.name(), step.name()))
            .unwrap_or_default(),
        guest_ip: rec
            .resources
            .guest_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        vmm_pid: rec.resources.vmm.as_ref().map_or(0, |v| v.pid as u32),
        failure: rec.failure.clone().unwrap_or_default(),
        timings: rec
            .timings
            .iter()
            .map(|t| pb::StepTiming {
                step: t.step.name().to_string(),
                direction: t.direction.name().to_string(),
                started_at_ms: t.started_at_ms,
                duration_us: t.duration_us,
                outcome: t.error.clone().unwrap_or_else(|| "ok".to_string()),
            })
            .collect(),
        created_at_ms: rec.created_at_ms,
        updated_at_ms: rec.updated_at_ms,
        boot_attempts: rec.boot_attempts,
        pool: rec
            .pooled
            .as_ref()
            .map(|p| p.pool.clone())
            .unwrap_or_default(),
        claimed: rec.claimed(),
        // Filled by the calls that show it (GetMachine, ListMachines).
        pending_sinks: Vec::new(),
        disk_layout: rec.disk_layout.name().to_string(),
    }
}

/// A pool's status as the node API shows it.
pub fn pool(status: &crate::actors::pools::PoolStatus) -> pb::PoolStatus {
    pb::PoolStatus {
        name: status.name.clone(),
        image: status.image.clone(),
        size: status.size,
        ready: status.ready,
        refilling: status.refilling,
        claims: status.claims,
        misses: status.misses,
        last_refill_ms: status.last_refill_ms,
        last_error: status.last_error.clone().unwrap_or_default(),
    }
}

/// An event as the API shows it.
pub fn event(event: &MachineEvent) -> pb::MachineEvent {
    pb::MachineEvent {
        seq: event.seq,
        machine_id: event.machine_id.clone(),
        at_ms: event.at_ms,
        state: state(event.state) as i32,
        message: event.message.clone(),
    }
}

/// A route as the API shows it.
pub fn route(route: &Route) -> pb::Route {
    pb::Route {
        machine_id: route.machine_id.clone(),
        name: route.name.clone(),
        ip: route.ip.to_string(),
        ports: route.ports.iter().map(|p| u32::from(*p)).collect(),
        pending_sinks: Vec::new(),
    }
}

/// A route sink's state as the API shows it.
pub fn sink(status: &crate::actors::etcd_sink::SinkStatus) -> pb::SinkStatus {
    pb::SinkStatus {
        name: status.name.clone(),
        endpoints: status.endpoints.clone(),
        in_sync: status.in_sync,
        pending: status.pending.len() as u32,
        last_error: status.last_error.clone().unwrap_or_default(),
        last_sync_ms: status.last_sync_ms,
        lag_ms: status.lag_ms,
    }
}

/// A route change as the API shows it.
pub fn route_change(change: &RouteChange) -> pb::RouteChange {
    let (kind, r) = match change {
        RouteChange::Published(r) => (pb::route_change::Kind::Published, r),
        RouteChange::Unpublished(r) => (pb::route_change::Kind::Unpublished, r),
    };
    pb::RouteChange {
        kind: kind as i32,
        route: Some(route(r)),
    }
}

fn resource_kind(kind: ResourceKind) -> pb::ResourceKind {
    match kind {
        ResourceKind::Netns => pb::ResourceKind::Netns,
        ResourceKind::Link => pb::ResourceKind::Link,
        ResourceKind::Vmm => pb::ResourceKind::Vmm,
        ResourceKind::MachineDir => pb::ResourceKind::MachineDir,
        ResourceKind::Lease => pb::ResourceKind::Lease,
        ResourceKind::Route => pb::ResourceKind::Route,
        ResourceKind::Policy => pb::ResourceKind::Policy,
        ResourceKind::Cgroup => pb::ResourceKind::Cgroup,
    }
}

fn finding(f: &Finding) -> pb::AuditFinding {
    pb::AuditFinding {
        kind: resource_kind(f.kind) as i32,
        name: f.name.clone(),
        machine_id: f.machine_id.clone().unwrap_or_default(),
        why: f.why.clone(),
    }
}

/// The protobuf report of an audit.
pub fn audit(audit: &Audit) -> pb::AuditReport {
    pb::AuditReport {
        leaks: audit.report.leaks.iter().map(finding).collect(),
        missing: audit.report.missing.iter().map(finding).collect(),
        machines: u32::try_from(audit.machines).unwrap_or(u32::MAX),
        duration_us: u64::try_from(audit.elapsed.as_micros()).unwrap_or(u64::MAX),
    }
}

/// A base of the image cache.
pub fn image(info: &crate::actors::rootfs_cache::ImageInfo) -> pb::Image {
    pb::Image {
        digest: info.digest.clone(),
        names: info.entry.names.clone(),
        manifest_digest: info.entry.manifest_digest.clone().unwrap_or_default(),
        size_bytes: info.size_bytes,
        disk_bytes: info.disk_bytes,
        built_unix: info.entry.built_unix,
        last_used_unix: info.entry.last_used_unix,
        machines: info.machines.clone(),
        blobs: u32::try_from(info.entry.blobs.len()).unwrap_or(u32::MAX),
    }
}

/// A pull's progress event.
pub fn pull_event(event: crate::actors::rootfs_cache::PullEvent) -> pb::PullImageProgress {
    use crate::actors::rootfs_cache::PullEvent;
    use pb::pull_image_progress::Event;
    pb::PullImageProgress {
        event: Some(match event {
            PullEvent::Phase(phase) => Event::Phase(phase),
            PullEvent::Layer(p) => Event::Layer(pb::LayerProgress {
                digest: p.digest,
                done_bytes: p.done,
                total_bytes: p.total,
                cached: p.cached,
            }),
        }),
    }
}
