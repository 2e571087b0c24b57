//! Fail points at every step boundary of every operation, and in the shared resources (the
//! singletons, the lease table, the network fabric), for the chaos tests. Built only with the `failpoints` cargo feature; without it every
//! [`hit`] compiles to nothing, so release builds carry none.
//!
//! Names are `<operation>.<step>.<where>` (`create.network.after_effect`) for the machine
//! run and `<owner>.<action>.<where>` for the shared resources. [`all`] enumerates every name
//! the code can hit, from the same enums the code uses to build them, so a harness that
//! iterates [`all`] cannot forget a fail point.
//!
//! Configured at process start from the `FAILPOINTS` environment variable (the `fail`
//! crate's format, `name=action;...`). Besides the crate's actions (`panic`, `1*panic`,
//! `sleep(ms)`, ...), `return(kill)` makes the process SIGKILL itself at that point: the
//! same as a crash or `kill -9` from outside, with no unwinding and no cleanup.

use crate::machine::record::{Desired, MachineRecord, StepTiming};
use crate::machine::step::{
    CREATE_ORDER, Direction, PREPARE_ORDER, STOP_RELEASES, Step, TEARDOWN_ORDER,
};

/// What the run is doing when it crosses a step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Acquiring steps of a machine never stopped before.
    Create,
    /// Acquiring steps again after a stop.
    Start,
    /// Releasing the running part.
    Stop,
    /// Releasing everything (destroy, or a failed machine).
    Destroy,
    /// Acquiring the steps of a pool's prepared machine (a refill).
    Prepare,
    /// Acquiring what a claim leaves to do (`ready` with the workload, `publish`).
    Claim,
}

/// Where at a step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// The step is marked `Begun` durably; its effect has not started.
    BeforeEffect,
    /// The effect finished; its outcome is not recorded yet.
    AfterEffect,
    /// The outcome (and the next step's `Begun` mark) is recorded.
    AfterCommit,
}

impl Operation {
    /// The stable name.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Start => "start",
            Operation::Stop => "stop",
            Operation::Destroy => "destroy",
            Operation::Prepare => "prepare",
            Operation::Claim => "claim",
        }
    }

    /// The operation a step run belongs to. A stopped machine's record holds the timing
    /// of its VMM's release after a launch, which tells a start from a create (a release
    /// of a VMM that was never launched, such as the undo of a run cut short before its
    /// `vmm` step, stops nothing).
    pub fn of(rec: &MachineRecord, direction: Direction) -> Operation {
        match direction {
            Direction::Acquire => {
                let vmm_ok = |t: &StepTiming, way: Direction| {
                    t.step == Step::Vmm && t.direction == way && t.error.is_none()
                };
                let launched = rec
                    .timings
                    .iter()
                    .position(|t| vmm_ok(t, Direction::Acquire));
                let stopped_before = launched.is_some_and(|at| {
                    rec.timings[at..]
                        .iter()
                        .any(|t| vmm_ok(t, Direction::Release))
                });
                if stopped_before {
                    Operation::Start
                } else if rec.pool_owner().is_some() {
                    Operation::Prepare
                } else if rec.claimed() {
                    Operation::Claim
                } else {
                    Operation::Create
                }
            }
            Direction::Release => {
                if rec.desired == Desired::Stopped && rec.failure.is_none() {
                    Operation::Stop
                } else {
                    Operation::Destroy
                }
            }
        }
    }

    /// The steps this operation runs, in order.
    pub fn steps(self) -> Vec<Step> {
        match self {
            Operation::Create => CREATE_ORDER.to_vec(),
            // A start acquires again, in create order, what a stop released.
            Operation::Start => CREATE_ORDER
                .into_iter()
                .filter(|s| STOP_RELEASES.contains(s))
                .collect(),
            Operation::Stop => STOP_RELEASES.to_vec(),
            Operation::Destroy => TEARDOWN_ORDER.to_vec(),
            Operation::Prepare => PREPARE_ORDER.to_vec(),
            // A claim redoes `ready` (now with the workload), then acquires the rest.
            Operation::Claim => CREATE_ORDER
                .into_iter()
                .filter(|s| *s == Step::Ready || !PREPARE_ORDER.contains(s))
                .collect(),
        }
    }
}

impl Boundary {
    /// The stable name.
    pub fn name(self) -> &'static str {
        match self {
            Boundary::BeforeEffect => "before_effect",
            Boundary::AfterEffect => "after_effect",
            Boundary::AfterCommit => "after_commit",
        }
    }
}

/// Every operation.
pub const OPERATIONS: [Operation; 6] = [
    Operation::Create,
    Operation::Start,
    Operation::Stop,
    Operation::Destroy,
    Operation::Prepare,
    Operation::Claim,
];

/// Every boundary.
pub const BOUNDARIES: [Boundary; 3] = [
    Boundary::BeforeEffect,
    Boundary::AfterEffect,
    Boundary::AfterCommit,
];

/// Fail points in the shared resources (the singletons, and the lease table and network
/// fabric the steps reach directly): between a durable write or a host change and what
/// follows.
pub const SHARED_POINTS: [&str; 9] = [
    "fabric.ensure.before_effect",
    "leases.lease.after_commit",
    "pools.claim.after_commit",
    "pools.refill.after_commit",
    "registry.publish.after_commit",
    "registry.unpublish.after_commit",
    "etcd_sink.write.before_effect",
    "etcd_sink.write.after_effect",
    "rootfs_cache.build.after_effect",
];

/// The name of a step-boundary fail point.
pub fn step_point(operation: Operation, step: Step, boundary: Boundary) -> String {
    format!("{}.{}.{}", operation.name(), step.name(), boundary.name())
}

/// Every fail point the code can hit.
pub fn all() -> Vec<String> {
    let mut out = Vec::new();
    for operation in OPERATIONS {
        for step in operation.steps() {
            for boundary in BOUNDARIES {
                out.push(step_point(operation, step, boundary));
            }
        }
    }
    out.extend(SHARED_POINTS.iter().map(|s| s.to_string()));
    out
}

/// Crosses a fail point.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    fail::fail_point!(name, |arg: Option<String>| {
        if arg.as_deref() == Some("kill") {
            // What a crash does: no unwinding, no destructors, no flushing.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    });
}

/// Crosses a fail point (compiled out: the `failpoints` feature is off).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// Crosses a step-boundary fail point (the name is only built in `failpoints` builds).
pub fn hit_step(operation: Operation, step: Step, boundary: Boundary) {
    if cfg!(feature = "failpoints") {
        hit(&step_point(operation, step, boundary));
    }
}

/// Loads `FAILPOINTS` from the environment; call once at process start. Returns a guard
/// that must live as long as the process.
#[cfg(feature = "failpoints")]
pub fn setup() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_is_told_from_a_create_by_a_vmm_that_ran_and_was_released() {
        use crate::machine::spec::MachineSpec;
        let timing = |direction, error: Option<&str>| StepTiming {
            step: Step::Vmm,
            direction,
            started_at_ms: 0,
            duration_us: 0,
            error: error.map(str::to_string),
        };
        let rows: [(Vec<StepTiming>, Operation); 4] = [
            (vec![], Operation::Create),
            // The undo of a run cut short before its VMM was launched stops nothing.
            (vec![timing(Direction::Release, None)], Operation::Create),
            (
                vec![
                    timing(Direction::Acquire, Some("no")),
                    timing(Direction::Release, None),
                ],
                Operation::Create,
            ),
            (
                vec![
                    timing(Direction::Acquire, None),
                    timing(Direction::Release, None),
                ],
                Operation::Start,
            ),
        ];
        for (timings, want) in rows {
            let mut rec = MachineRecord::new(
                "0123456789".into(),
                "m".into(),
                "r".into(),
                MachineSpec::default(),
                0,
            );
            rec.timings = timings;
            assert_eq!(
                Operation::of(&rec, Direction::Acquire),
                want,
                "{:?}",
                rec.timings
            );
        }
    }

    #[test]
    fn names_are_unique_and_well_formed() {
        let all = all();
        let mut unique = all.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), all.len());
        assert!(all.contains(&"create.network.after_effect".to_string()));
        assert!(all.contains(&"stop.vmm.before_effect".to_string()));
        assert!(!all.contains(&"stop.disk.before_effect".to_string()));
        assert!(all.iter().all(|n| n.split('.').count() == 3), "{all:?}");
        // create 10 steps, start 4, stop 4, destroy 10, prepare 8, claim 3; three
        // boundaries each; the shared resources' points.
        assert_eq!(
            all.len(),
            (10 + 4 + 4 + 10 + 8 + 3) * 3 + SHARED_POINTS.len()
        );
        assert!(all.contains(&"etcd_sink.write.before_effect".to_string()));
        assert!(all.contains(&"stop.cgroup.before_effect".to_string()));
        assert!(all.contains(&"claim.policy.after_effect".to_string()));
        assert!(!all.contains(&"prepare.policy.before_effect".to_string()));
        assert!(all.contains(&"claim.ready.before_effect".to_string()));
        assert!(all.contains(&"prepare.ready.after_commit".to_string()));
        assert!(!all.contains(&"prepare.publish.before_effect".to_string()));
    }
}
