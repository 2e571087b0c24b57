//! The machine record as stored by envelope version 1, frozen, and its conversion to the
//! current record.
//!
//! Why frozen copies: postcard writes no field names, so the bytes of a V1 record can
//! only be read with exactly the types that wrote them. Version 2 added the workload
//! overrides and the disk size to the spec (`entrypoint`, `workdir`, `user`,
//! `disk_mib`) and the image's own workload settings to the resources; a V1 record reads
//! as a spec without overrides at the image's disk size, from an image without settings.
//! These types never change again.

use std::collections::BTreeMap;

use serde::Deserialize;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::record::{Desired, MachineRecord, MachineState, Resources, StepTiming, VmmRecord};
use super::spec::MachineSpec;
use super::step::Mark;
use super::step::{Direction, Step};

/// `MachineSpec` as V1 stored it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct MachineSpecV1 {
    pub(crate) image: String,
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u32,
    pub(crate) command: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) ports: Vec<u16>,
}

/// `Resources` as V1 stored it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct ResourcesV1 {
    pub(crate) base_digest: Option<String>,
    pub(crate) base_path: Option<PathBuf>,
    pub(crate) lease_slot: Option<u32>,
    pub(crate) guest_ip: Option<Ipv4Addr>,
    pub(crate) vmm: Option<VmmRecord>,
}

/// `MachineRecord` as V1 stored it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct MachineRecordV1 {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) request_id: String,
    pub(crate) spec: MachineSpecV1,
    pub(crate) desired: Desired,
    pub(crate) state: MachineState,
    pub(crate) current: Option<(Step, Direction)>,
    pub(crate) marks: BTreeMap<Step, Mark>,
    pub(crate) resources: ResourcesV1,
    pub(crate) boot_attempts: u32,
    pub(crate) step_failures: u32,
    pub(crate) failure: Option<String>,
    pub(crate) timings: Vec<StepTiming>,
    pub(crate) created_at_ms: u64,
    pub(crate) updated_at_ms: u64,
}

impl From<MachineRecordV1> for MachineRecord {
    fn from(v1: MachineRecordV1) -> MachineRecord {
        MachineRecord {
            id: v1.id,
            name: v1.name,
            request_id: v1.request_id,
            spec: MachineSpec {
                image: v1.spec.image,
                vcpus: v1.spec.vcpus,
                memory_mib: v1.spec.memory_mib,
                command: v1.spec.command,
                env: v1.spec.env,
                ports: v1.spec.ports,
                entrypoint: Vec::new(),
                workdir: None,
                user: None,
                disk_mib: 0,
            },
            desired: v1.desired,
            state: v1.state,
            current: v1.current,
            marks: v1.marks,
            resources: Resources {
                base_digest: v1.resources.base_digest,
                base_path: v1.resources.base_path,
                lease_slot: v1.resources.lease_slot,
                guest_ip: v1.resources.guest_ip,
                vmm: v1.resources.vmm,
                image_workload: None,
            },
            boot_attempts: v1.boot_attempts,
            step_failures: v1.step_failures,
            failure: v1.failure,
            timings: v1.timings,
            created_at_ms: v1.created_at_ms,
            updated_at_ms: v1.updated_at_ms,
            pooled: None,
            crashes: Vec::new(),
            // Every disk of that time was a full copy.
            disk_layout: super::record::DiskLayout::Copy,
        }
    }
}
