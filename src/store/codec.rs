//! Stored values: postcard inside a versioned enum per type.
//!
//! postcard writes no field names, so a record type that changes would misread old bytes.
//! Each stored type therefore has an envelope enum whose variants are only ever appended:
//! `V1(MachineRecord)` today; a changed record becomes `V2(..)` and `V1` is converted on
//! read.

use serde::{Deserialize, Serialize};

use crate::machine::record::{DiskLayout, MachineEvent, MachineRecord};
use crate::route::{Route, RouteChange};

/// A value could not be turned into bytes or back.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct CodecError {
    what: &'static str,
    source: postcard::Error,
}

/// A type the store persists.
pub trait Persisted: Sized {
    /// The bytes of the newest envelope version.
    fn encode(&self) -> Result<Vec<u8>, CodecError>;
    /// Reads any envelope version.
    fn decode(bytes: &[u8]) -> Result<Self, CodecError>;
}

macro_rules! versioned {
    ($ty:ty, $owned:ident, $borrowed:ident, $what:literal) => {
        #[derive(Deserialize)]
        enum $owned {
            V1($ty),
        }
        #[derive(Serialize)]
        enum $borrowed<'a> {
            V1(&'a $ty),
        }
        impl Persisted for $ty {
            fn encode(&self) -> Result<Vec<u8>, CodecError> {
                postcard::to_stdvec(&$borrowed::V1(self)).map_err(|source| CodecError {
                    what: $what,
                    source,
                })
            }
            fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
                match postcard::from_bytes::<$owned>(bytes).map_err(|source| CodecError {
                    what: $what,
                    source,
                })? {
                    $owned::V1(value) => Ok(value),
                }
            }
        }
    };
}

/// The machine record's envelope: V1 (frozen, see `machine::record_v1`) is converted on
/// read; V2 is the record's own shape; V3 is the V2 shape followed by an extension with
/// what was added since (the pool tie); V4 has a larger extension (the pool
/// tie and the crash history); V5, written now, adds the disk layout. Fields added to the record later go into a new extension
/// variant the same way, so the record's shape stays V2's and no frozen copy of it is
/// needed.
#[derive(Deserialize)]
enum StoredMachine {
    V1(crate::machine::record_v1::MachineRecordV1),
    V2(MachineRecord),
    V3(MachineRecord, RecordExtV3),
    V4(MachineRecord, RecordExtV4),
    V5(MachineRecord, RecordExtV5),
}

#[derive(Serialize)]
enum StoredMachineRef<'a> {
    #[allow(dead_code)]
    V1(std::marker::PhantomData<&'a ()>),
    #[allow(dead_code)]
    V2(&'a MachineRecord),
    #[allow(dead_code)]
    V3(&'a MachineRecord, &'a RecordExtV3),
    #[allow(dead_code)]
    V4(&'a MachineRecord, &'a RecordExtV4),
    V5(&'a MachineRecord, &'a RecordExtV5),
}

/// What V3 adds to the record (the fields the record skips when serialised).
#[derive(Serialize, Deserialize)]
struct RecordExtV3 {
    pooled: Option<crate::machine::record::Pooled>,
}

/// What V4 adds to the record: V3's extension and the crash history.
#[derive(Serialize, Deserialize)]
struct RecordExtV4 {
    pooled: Option<crate::machine::record::Pooled>,
    crashes: Vec<u64>,
}

/// What V5 adds to the record: V4's extension and the disk layout. Records before it all
/// had full copies ([`DiskLayout::Copy`]).
#[derive(Serialize, Deserialize)]
struct RecordExtV5 {
    pooled: Option<crate::machine::record::Pooled>,
    crashes: Vec<u64>,
    disk_layout: DiskLayout,
}

impl Persisted for MachineRecord {
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let ext = RecordExtV5 {
            pooled: self.pooled.clone(),
            crashes: self.crashes.clone(),
            disk_layout: self.disk_layout,
        };
        postcard::to_stdvec(&StoredMachineRef::V5(self, &ext)).map_err(|source| CodecError {
            what: "machine record",
            source,
        })
    }
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        match postcard::from_bytes::<StoredMachine>(bytes).map_err(|source| CodecError {
            what: "machine record",
            source,
        })? {
            StoredMachine::V1(v1) => Ok(copied(v1.into())),
            StoredMachine::V2(rec) => Ok(copied(rec)),
            StoredMachine::V3(mut rec, ext) => {
                rec.pooled = ext.pooled;
                Ok(copied(rec))
            }
            StoredMachine::V4(mut rec, ext) => {
                rec.pooled = ext.pooled;
                rec.crashes = ext.crashes;
                Ok(copied(rec))
            }
            StoredMachine::V5(mut rec, ext) => {
                rec.pooled = ext.pooled;
                rec.crashes = ext.crashes;
                rec.disk_layout = ext.disk_layout;
                Ok(rec)
            }
        }
    }
}
/// A record written before V5: its disk is a full copy.
fn copied(mut rec: MachineRecord) -> MachineRecord {
    rec.disk_layout = DiskLayout::Copy;
    rec
}

versioned!(MachineEvent, StoredEvent, StoredEventRef, "machine event");
versioned!(Route, StoredRoute, StoredRouteRef, "route");
versioned!(
    crate::image::ImageEntry,
    StoredImage,
    StoredImageRef,
    "image entry"
);
versioned!(
    RouteChange,
    StoredRouteChange,
    StoredRouteChangeRef,
    "route change"
);

pub(super) fn encode<T: Persisted>(value: &T) -> Result<Vec<u8>, CodecError> {
    value.encode()
}

pub(super) fn decode<T: Persisted>(bytes: &[u8]) -> Result<T, CodecError> {
    T::decode(bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use super::Persisted;
    use crate::machine::record::{Desired, MachineRecord, MachineState};
    use crate::machine::record_v1::{MachineRecordV1, MachineSpecV1, ResourcesV1};

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
