//! Prepared capacity, as rules: which pool a create may claim from, which prepared
//! machine a claim takes, and what the claim changes on that machine's record. Pure; the
//! API picks the pool ([`pool_for`]), the store picks and changes the record inside its
//! claim transaction ([`claimable`], [`apply_claim`]).

use super::record::{Desired, MachineRecord, MachineState, Pooled};
use super::spec::{MachineSpec, SpecError};
use super::step::{Mark, Step};

/// What a pool prepares, as far as matching a create goes (the config's pool entry,
/// seen by its shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape<'a> {
    /// The pool's name.
    pub name: &'a str,
    /// The image reference, as a create names it.
    pub image: &'a str,
    /// vCPUs of every prepared machine.
    pub vcpus: u32,
    /// MiB of every prepared machine.
    pub memory_mib: u32,
    /// Root disk size, MiB (0: the image's size).
    pub disk_mib: u32,
}

/// Whether a create of `spec` can be served by `pool`: the same image (named the same
/// way), vCPUs and memory, and a disk no larger than the pool's (a pool of image-sized
/// disks serves only creates that ask for the image's size). Else the first field that
/// differs.
pub fn fits(pool: &PoolShape<'_>, spec: &MachineSpec) -> Result<(), &'static str> {
    if pool.image != spec.image {
        return Err("spec.image");
    }
    if pool.vcpus != spec.vcpus {
        return Err("spec.vcpus");
    }
    if pool.memory_mib != spec.memory_mib {
        return Err("spec.memory_mib");
    }
    let disk_fits = spec.disk_mib == 0 || (pool.disk_mib != 0 && spec.disk_mib <= pool.disk_mib);
    if !disk_fits {
        return Err("spec.disk_mib");
    }
    Ok(())
}

/// The pool a create claims from: the one it names (`wanted`; its shape must fit, else
/// the field that differs is named), else the first that fits; none: a cold create.
pub fn pool_for<'a>(
    pools: &[PoolShape<'a>],
    spec: &MachineSpec,
    wanted: &str,
) -> Result<Option<&'a str>, SpecError> {
    if wanted.is_empty() {
        return Ok(pools.iter().find(|p| fits(p, spec).is_ok()).map(|p| p.name));
    }
    let pool = pools
        .iter()
        .find(|p| p.name == wanted)
        .ok_or_else(|| SpecError::Invalid {
            field: "spec.pool",
            reason: format!("no pool named {wanted:?} is configured"),
        })?;
    fits(pool, spec).map_err(|field| SpecError::Invalid {
        field,
        reason: format!("differs from pool {}'s", pool.name),
    })?;
    Ok(Some(pool.name))
}

/// Whether `rec` is a machine of `pool` that a claim may take: prepared, still wanted
/// prepared, not failed, and with no step in flight. Of several, a claim takes the
/// oldest ([`claims_first`]).
pub fn claimable(rec: &MachineRecord, pool: &str) -> bool {
    rec.pool_owner() == Some(pool)
        && rec.state == MachineState::Prepared
        && rec.desired == Desired::Prepared
        && rec.failure.is_none()
        && rec.current.is_none()
}

/// Whether claimable `rec` is taken before `other`: the one prepared first (it has waited
/// longest, and is the first a pool would recycle).
pub fn claims_first(rec: &MachineRecord, other: &MachineRecord) -> bool {
    rec.created_at_ms < other.created_at_ms
}

/// A new machine for `pool`'s prepared capacity: its shape, wanted prepared, owned by
/// the pool until a claim.
pub fn new_prepared(id: String, pool: &PoolShape<'_>, now_ms: u64) -> MachineRecord {
    let spec = MachineSpec {
        image: pool.image.to_string(),
        vcpus: pool.vcpus,
        memory_mib: pool.memory_mib,
        disk_mib: pool.disk_mib,
        ..MachineSpec::default()
    };
    let mut rec = MachineRecord::new(id, String::new(), String::new(), spec, now_ms);
    rec.desired = Desired::Prepared;
    rec.pooled = Some(Pooled {
        pool: pool.name.to_string(),
        claimed: false,
    });
    rec
}

/// What a claim asks for.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The pool.
    pub pool: String,
    /// The create's request id.
    pub request_id: String,
    /// The machine's name.
    pub name: String,
    /// The create's spec.
    pub spec: MachineSpec,
    /// When, ms since the epoch.
    pub now_ms: u64,
}

/// Makes prepared machine `rec` the claimant's: its request id, name and spec (the disk
/// keeps the pool's size, which the spec asked for at most), wanted started, tied to
/// the pool as claimed for good, and its readiness to be redone (the claim hands the
/// guest its workload).
pub fn apply_claim(rec: &mut MachineRecord, claim: &Claim) {
    rec.request_id = claim.request_id.clone();
    rec.name = claim.name.clone();
    let disk_mib = rec.spec.disk_mib;
    rec.spec = claim.spec.clone();
    rec.spec.disk_mib = disk_mib;
    rec.desired = Desired::Started;
    rec.state = MachineState::Starting;
    rec.pooled = Some(Pooled {
        pool: claim.pool.clone(),
        claimed: true,
    });
    rec.set_mark(Step::Ready, Mark::Untouched);
    rec.updated_at_ms = claim.now_ms;
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: PoolShape<'static> = PoolShape {
        name: "small",
        image: "demo",
        vcpus: 1,
        memory_mib: 128,
        disk_mib: 512,
    };
    const WHOLE_IMAGE: PoolShape<'static> = PoolShape {
        name: "whole",
        disk_mib: 0,
        ..POOL
    };

    fn spec(image: &str, vcpus: u32, memory_mib: u32, disk_mib: u32) -> MachineSpec {
        MachineSpec {
            image: image.into(),
            vcpus,
            memory_mib,
            disk_mib,
            ..MachineSpec::default()
        }
    }

    #[test]
    fn a_create_fits_a_pool_of_its_shape() {
        let rows = [
            (POOL, spec("demo", 1, 128, 0), Ok(())),
            (POOL, spec("demo", 1, 128, 512), Ok(())),
            (POOL, spec("demo", 1, 128, 513), Err("spec.disk_mib")),
            (POOL, spec("other", 1, 128, 0), Err("spec.image")),
            (POOL, spec("demo", 2, 128, 0), Err("spec.vcpus")),
            (POOL, spec("demo", 1, 256, 0), Err("spec.memory_mib")),
            (WHOLE_IMAGE, spec("demo", 1, 128, 0), Ok(())),
            (WHOLE_IMAGE, spec("demo", 1, 128, 64), Err("spec.disk_mib")),
        ];
        for (pool, spec, want) in rows {
            assert_eq!(fits(&pool, &spec), want, "{pool:?} {spec:?}");
        }
    }

    #[test]
    fn the_pool_is_the_named_one_or_the_first_that_fits() {
        let big = PoolShape {
            name: "big",
            vcpus: 2,
            ..POOL
        };
        let pools = [big, POOL, WHOLE_IMAGE];
        let small = spec("demo", 1, 128, 0);
        assert_eq!(pool_for(&pools, &small, ""), Ok(Some("small")));
        assert_eq!(pool_for(&pools, &small, "whole"), Ok(Some("whole")));
        assert_eq!(pool_for(&pools, &spec("x", 1, 128, 0), ""), Ok(None));
        assert_eq!(pool_for(&[], &small, ""), Ok(None));
        assert_eq!(
            pool_for(&pools, &small, "big"),
            Err(SpecError::Invalid {
                field: "spec.vcpus",
                reason: "differs from pool big's".into()
            })
        );
        assert_eq!(
            pool_for(&pools, &small, "none"),
            Err(SpecError::Invalid {
                field: "spec.pool",
                reason: "no pool named \"none\" is configured".into()
            })
        );
    }

    fn prepared(pool: &str, created_at_ms: u64) -> MachineRecord {
        let shape = PoolShape { name: pool, ..POOL };
        let mut rec = new_prepared("0123456789".into(), &shape, created_at_ms);
        assert_eq!(rec.pool_owner(), Some(pool));
        assert_eq!(rec.spec, spec("demo", 1, 128, 512));
        rec.state = MachineState::Prepared;
        rec.set_mark(Step::Ready, Mark::Done);
        rec
    }

    #[test]
    fn only_an_idle_prepared_machine_of_the_pool_is_claimable() {
        let ready = prepared("small", 1);
        assert!(claimable(&ready, "small"));
        assert!(!claimable(&ready, "big"));
        let mut changed: Vec<(&str, MachineRecord)> = Vec::new();
        let mut rec = ready.clone();
        rec.state = MachineState::Starting;
        changed.push(("still being prepared", rec));
        let mut rec = ready.clone();
        rec.desired = Desired::Destroyed;
        changed.push(("being retired", rec));
        let mut rec = ready.clone();
        rec.failure = Some("x".into());
        changed.push(("failed", rec));
        let mut rec = ready.clone();
        rec.current = Some((Step::Ready, crate::machine::step::Direction::Acquire));
        changed.push(("a step in flight", rec));
        let mut rec = ready.clone();
        rec.pooled = Some(Pooled {
            pool: "small".into(),
            claimed: true,
        });
        changed.push(("claimed already", rec));
        for (why, rec) in changed {
            assert!(!claimable(&rec, "small"), "{why}");
        }
        assert!(claims_first(&prepared("small", 1), &prepared("small", 2)));
        assert!(!claims_first(&prepared("small", 2), &prepared("small", 2)));
    }

    #[test]
    fn a_claim_makes_the_machine_the_claimants_and_redoes_readiness() {
        let mut rec = prepared("small", 1);
        let claim = Claim {
            pool: "small".into(),
            request_id: "req-1".into(),
            name: "web".into(),
            spec: spec("demo", 1, 128, 0),
            now_ms: 42,
        };
        apply_claim(&mut rec, &claim);
        assert_eq!(
            (rec.name.as_str(), rec.request_id.as_str()),
            ("web", "req-1")
        );
        assert_eq!(rec.spec.disk_mib, 512, "the disk keeps the pool's size");
        assert_eq!(rec.desired, Desired::Started);
        assert_eq!(rec.state, MachineState::Starting);
        assert!(rec.claimed() && rec.pool_owner().is_none());
        assert_eq!(rec.mark(Step::Ready), Mark::Untouched);
        assert_eq!(rec.updated_at_ms, 42);
        assert!(!claimable(&rec, "small"));
    }
}
