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
    image: String,
    vcpus: u32,
    memory_mib: u32,
    command: Vec<String>,
    env: Vec<(String, String)>,
    ports: Vec<u16>,
}

/// `Resources` as V1 stored it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct ResourcesV1 {
    base_digest: Option<String>,
    base_path: Option<PathBuf>,
    lease_slot: Option<u32>,
    guest_ip: Option<Ipv4Addr>,
    vmm: Option<VmmRecord>,
}

/// `MachineRecord` as V1 stored it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct MachineRecordV1 {
    id: String,
    name: String,
    request_id: String,
    spec: MachineSpecV1,
    desired: Desired,
    state: MachineState,
    current: Option<(Step, Direction)>,
    marks: BTreeMap<Step, Mark>,
    resources: ResourcesV1,
    boot_attempts: u32,
    step_failures: u32,
    failure: Option<String>,
    timings: Vec<StepTiming>,
    created_at_ms: u64,
    updated_at_ms: u64,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::codec::Persisted;

    /// The envelope as V1 wrote it: variant 0.
    #[derive(serde::Serialize)]
    enum StoredV1 {
        V1(MachineRecordV1),
    }

    #[test]
    fn a_version_1_record_reads_as_the_current_record() {
        let v1 = MachineRecordV1 {
            id: "0123456789".into(),
            name: "web".into(),
            request_id: "r1".into(),
            spec: MachineSpecV1 {
                image: "demo".into(),
                vcpus: 2,
                memory_mib: 256,
                command: vec!["/bin/app".into()],
                env: vec![("A".into(), "1".into())],
                ports: vec![80],
            },
            desired: Desired::Started,
            state: MachineState::Started,
            current: None,
            marks: BTreeMap::new(),
            resources: ResourcesV1 {
                base_digest: Some("ab".into()),
                base_path: None,
                lease_slot: Some(3),
                guest_ip: Some(Ipv4Addr::new(10, 0, 0, 2)),
                vmm: None,
            },
            boot_attempts: 1,
            step_failures: 0,
            failure: None,
            timings: Vec::new(),
            created_at_ms: 5,
            updated_at_ms: 6,
        };
        let bytes = postcard::to_stdvec(&StoredV1::V1(v1)).unwrap();
        let rec = MachineRecord::decode(&bytes).unwrap();
        assert_eq!(rec.spec.command, vec!["/bin/app".to_string()]);
        assert_eq!(rec.spec.ports, vec![80]);
        assert_eq!(rec.spec.entrypoint, Vec::<String>::new());
        assert_eq!(
            (
                rec.spec.workdir.clone(),
                rec.spec.user.clone(),
                rec.spec.disk_mib
            ),
            (None, None, 0)
        );
        assert_eq!(rec.resources.lease_slot, Some(3));
        assert_eq!(rec.resources.image_workload, None);
        assert_eq!(rec.updated_at_ms, 6);
        // Written again, it is version 2 and reads back equal.
        let again = MachineRecord::decode(&rec.encode().unwrap()).unwrap();
        assert_eq!(again, rec);
    }
}
