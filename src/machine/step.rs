//! What the step catalogue says, and everything derived from it. The catalogue itself
//! (`machine::steps`, next to the steps' files) has one row per step; from it come the
//! create order, the teardown order (its reverse), what a stop releases, what a prepared
//! machine acquires, which acquires may be abandoned halfway, and which host resources a
//! step owns (what the audit checks and the orphan sweep releases). Fail point names and
//! the audit's ownership come from here too. Nothing else restates an order.
//!
//! Step names are stable: they are stored (by position, see `store`), shown to the control
//! plane, and used in fail-point names. Append new steps; never reorder or remove one.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::steps::ROWS;
pub use super::steps::Step;

/// The kinds of host resource a machine owns, each owned by exactly one step (see
/// [`CATALOGUE`]). The audit reports them; the orphan sweep releases them through the
/// owning step's release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    /// A network namespace `<prefix>-<id>` (step `network`).
    Netns,
    /// A root-namespace link `<prefix><id>` (step `network`).
    Link,
    /// A VMM process carrying the machine's marker (step `vmm`).
    Vmm,
    /// A directory under `<data_dir>/machines` (step `disk`).
    MachineDir,
    /// A row of the `leases` table (step `lease`).
    Lease,
    /// A row of the `routes` table (step `publish`).
    Route,
    /// Chains `m<id>_*` (and their map elements) in the daemon's nftables table (step
    /// `policy`).
    Policy,
    /// Directories `hearth_<prefix>/<id>` in the cgroup hierarchies (step `cgroup`).
    Cgroup,
}

impl ResourceKind {
    /// Every kind.
    pub const ALL: [ResourceKind; 8] = [
        ResourceKind::Netns,
        ResourceKind::Link,
        ResourceKind::Vmm,
        ResourceKind::MachineDir,
        ResourceKind::Lease,
        ResourceKind::Route,
        ResourceKind::Policy,
        ResourceKind::Cgroup,
    ];

    /// Lower-case name, as the CLI prints it.
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::Netns => "netns",
            ResourceKind::Link => "link",
            ResourceKind::Vmm => "vmm",
            ResourceKind::MachineDir => "machine_dir",
            ResourceKind::Lease => "lease",
            ResourceKind::Route => "route",
            ResourceKind::Policy => "policy",
            ResourceKind::Cgroup => "cgroup",
        }
    }

    /// Whether this kind is a row of the store rather than an object on the host.
    pub fn in_store(self) -> bool {
        matches!(self, ResourceKind::Lease | ResourceKind::Route)
    }

    /// The step that owns this kind of resource (from the catalogue).
    pub fn step(self) -> Step {
        CATALOGUE
            .iter()
            .find(|info| info.owns.contains(&self))
            .map(|info| info.step)
            // Not reached: a catalogue test proves every kind has an owner.
            .unwrap_or(Step::Disk)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the catalogue says of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// The step.
    pub step: Step,
    /// Its stable name (API, logs, fail points): its module's name.
    pub name: &'static str,
    /// Its place in the create order (0 first).
    pub create: usize,
    /// Whether an acquire in flight may be abandoned when the machine is no longer
    /// wanted started. Only waits are: abandoning a step that changes the host with
    /// blocking work (a disk clone, a VMM launch) would let its release run while that
    /// work still creates what the release removes; those take milliseconds and finish.
    pub cancellable: bool,
    /// Whether a stop releases it (a stopped machine keeps the rest for a fast start).
    pub stop_releases: bool,
    /// Whether a prepared machine (pool capacity) acquires it before it waits, idle and
    /// paused, for a claim. Only `publish` waits for the claim: nothing routes to a
    /// machine nobody has asked for.
    pub prepared: bool,
    /// Whether the step may be acquired again where it stands, with the steps after it
    /// still up: its effect is independent of theirs (a packet policy does not care
    /// whether the VMM runs). Any other step that must be redone first has everything
    /// built after it released. This is also what lets a daemon upgraded with a new
    /// in-place step give it to running machines without restarting them.
    pub in_place: bool,
    /// The steps whose outcome its acquire uses (a recorded output, a host object it
    /// builds on); each comes earlier in the create order. Within a run, an effect starts
    /// once those of its needs that are part of the run have finished, so independent
    /// effects run at the same time (see `decide::startable`).
    pub needs: &'static [Step],
    /// The host resources the step's acquire makes and its release removes.
    pub owns: &'static [ResourceKind],
}

/// Every step's row, in create order (each row's `create`).
pub const CATALOGUE: [StepInfo; ROWS.len()] = {
    let mut out = [ROWS[0]; ROWS.len()];
    let mut i = 0;
    while i < ROWS.len() {
        let mut j = 0;
        while j < ROWS.len() {
            if ROWS[j].create == i {
                out[i] = ROWS[j];
            }
            j += 1;
        }
        i += 1;
    }
    out
};

/// The order in which a machine is brought up: the catalogue's order.
pub const CREATE_ORDER: [Step; CATALOGUE.len()] = {
    let mut out = [Step::Image; CATALOGUE.len()];
    let mut i = 0;
    while i < CATALOGUE.len() {
        out[i] = CATALOGUE[i].step;
        i += 1;
    }
    out
};

/// The order in which a machine is torn down: the create order reversed.
pub const TEARDOWN_ORDER: [Step; CATALOGUE.len()] = {
    let mut out = CREATE_ORDER;
    let mut i = 0;
    while i < out.len() {
        out[i] = CREATE_ORDER[CREATE_ORDER.len() - 1 - i];
        i += 1;
    }
    out
};

const PREPARED_COUNT: usize = {
    let mut n = 0;
    let mut i = 0;
    while i < CATALOGUE.len() {
        if CATALOGUE[i].prepared {
            n += 1;
        }
        i += 1;
    }
    n
};

/// What a prepared machine acquires, in create order, before it settles `prepared`; a
/// claim acquires the rest (and the `ready` step again, now with the workload).
pub const PREPARE_ORDER: [Step; PREPARED_COUNT] = {
    let mut out = [Step::Image; PREPARED_COUNT];
    let mut n = 0;
    let mut i = 0;
    while i < CATALOGUE.len() {
        if CATALOGUE[i].prepared {
            out[n] = CATALOGUE[i].step;
            n += 1;
        }
        i += 1;
    }
    out
};

const STOP_COUNT: usize = {
    let mut n = 0;
    let mut i = 0;
    while i < CATALOGUE.len() {
        if CATALOGUE[i].stop_releases {
            n += 1;
        }
        i += 1;
    }
    n
};

/// What a stop releases, in teardown order. A start acquires the same steps again.
pub const STOP_RELEASES: [Step; STOP_COUNT] = {
    let mut out = [Step::Image; STOP_COUNT];
    let mut n = 0;
    let mut i = 0;
    while i < TEARDOWN_ORDER.len() {
        if TEARDOWN_ORDER[i].info().stop_releases {
            out[n] = TEARDOWN_ORDER[i];
            n += 1;
        }
        i += 1;
    }
    out
};

impl Step {
    /// The step's catalogue entry.
    pub const fn info(self) -> &'static StepInfo {
        &CATALOGUE[self.create_index()]
    }

    /// The step's position in the create order. (Declaration order is storage order,
    /// append-only; the catalogue's order is the create order.)
    pub const fn create_index(self) -> usize {
        let mut i = 0;
        while i < CATALOGUE.len() {
            if CATALOGUE[i].step as usize == self as usize {
                return i;
            }
            i += 1;
        }
        // Not reached: a test proves every step has a catalogue row.
        0
    }

    /// See [`StepInfo::cancellable`].
    pub fn cancellable(self) -> bool {
        self.info().cancellable
    }

    /// See [`StepInfo::needs`].
    pub fn needs(self) -> &'static [Step] {
        self.info().needs
    }

    /// See [`StepInfo::owns`].
    pub fn owns(self) -> &'static [ResourceKind] {
        self.info().owns
    }

    /// Whether its acquire leaves nothing on the host for a release to find: it owns
    /// only rows of the store (which its own commits write), or nothing (a wait; the
    /// image cache's base belongs to the cache).
    pub fn leaves_nothing_on_host(self) -> bool {
        self.owns().iter().all(|kind| kind.in_store())
    }

    /// The stable name shown in the API and logs.
    pub fn name(self) -> &'static str {
        self.info().name
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of steps, by declaration index (at most 16 steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct StepSet(u16);

impl StepSet {
    /// No step.
    pub const EMPTY: StepSet = StepSet(0);

    /// The set of `steps`.
    pub const fn of(steps: &[Step]) -> StepSet {
        let mut bits = 0u16;
        let mut i = 0;
        while i < steps.len() {
            bits |= 1 << steps[i] as usize;
            i += 1;
        }
        StepSet(bits)
    }

    /// Adds `step`.
    pub fn insert(&mut self, step: Step) {
        self.0 |= 1 << step as usize;
    }

    /// Takes `step` out.
    pub fn remove(&mut self, step: Step) {
        self.0 &= !(1 << step as usize);
    }

    /// Whether `step` is in the set.
    pub fn contains(self, step: Step) -> bool {
        self.0 & (1 << step as usize) != 0
    }

    /// Whether the set has no step.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The steps in the set, in create order.
    pub fn iter(self) -> impl Iterator<Item = Step> {
        CREATE_ORDER.into_iter().filter(move |s| self.contains(*s))
    }
}

/// Which way a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// Bring the resource into being.
    Acquire,
    /// Release it.
    Release,
}

impl Direction {
    /// "acquire" or "release".
    pub fn name(self) -> &'static str {
        match self {
            Direction::Acquire => "acquire",
            Direction::Release => "release",
        }
    }
}

/// What the record knows of one step's effect on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Mark {
    /// Never started, or released.
    #[default]
    Untouched,
    /// The effect may have started (recorded before it runs); it may be partial.
    Begun,
    /// The effect finished and is recorded.
    Done,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_has_every_step_once_and_derives_the_orders() {
        let mut places: Vec<usize> = ROWS.iter().map(|r| r.create).collect();
        places.sort_unstable();
        assert_eq!(places, (0..ROWS.len()).collect::<Vec<_>>(), "create places");
        for (i, row) in ROWS.iter().enumerate() {
            assert_eq!(row.step as usize, i, "{} out of storage order", row.name);
        }
        for (i, info) in CATALOGUE.iter().enumerate() {
            assert_eq!(info.step.create_index(), i, "{} out of place", info.name);
            assert_eq!(info.step.name(), info.name);
        }
        let mut declared: Vec<usize> = CATALOGUE.iter().map(|i| i.step as usize).collect();
        declared.sort_unstable();
        assert_eq!(declared, (0..CATALOGUE.len()).collect::<Vec<_>>());
        assert_eq!(CREATE_ORDER[0], Step::Image);
        assert_eq!(TEARDOWN_ORDER[0], Step::Publish);
        assert_eq!(
            STOP_RELEASES,
            [Step::Publish, Step::Ready, Step::Vmm, Step::Cgroup]
        );
        assert_eq!(
            PREPARE_ORDER,
            [
                Step::Image,
                Step::Disk,
                Step::Lease,
                Step::Network,
                Step::VmConfig,
                Step::Cgroup,
                Step::Vmm,
                Step::Ready
            ]
        );
        let names: Vec<&str> = CREATE_ORDER.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "image",
                "disk",
                "lease",
                "network",
                "policy",
                "vm_config",
                "cgroup",
                "vmm",
                "ready",
                "publish"
            ]
        );
    }

    #[test]
    fn every_need_comes_earlier_in_the_create_order() {
        // So the create order is one order the needs allow, and the teardown (its
        // reverse) releases a step before anything it was built on.
        for info in CATALOGUE {
            for need in info.needs {
                assert!(
                    need.create_index() < info.step.create_index(),
                    "{} needs {need}, which comes later",
                    info.name
                );
            }
        }
        // The VMM starts on everything below it; the route waits for the guest.
        assert_eq!(Step::Vmm.needs().len(), Step::Vmm.create_index());
        assert_eq!(Step::Publish.needs(), [Step::Ready]);
    }

    #[test]
    fn a_step_set_holds_what_was_put_in_and_lists_it_in_create_order() {
        const _: () = assert!(CATALOGUE.len() <= 16, "StepSet holds 16 steps");
        let mut set = StepSet::of(&[Step::Cgroup, Step::Disk]);
        assert!(set.contains(Step::Disk) && set.contains(Step::Cgroup));
        assert!(!set.contains(Step::Policy));
        set.insert(Step::Policy);
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            [Step::Disk, Step::Policy, Step::Cgroup]
        );
        assert!(StepSet::EMPTY.is_empty() && !set.is_empty());
    }

    #[test]
    fn every_resource_kind_has_exactly_one_owning_step() {
        for kind in ResourceKind::ALL {
            let owners: Vec<Step> = CATALOGUE
                .iter()
                .filter(|i| i.owns.contains(&kind))
                .map(|i| i.step)
                .collect();
            assert_eq!(owners.len(), 1, "{kind}: {owners:?}");
            assert_eq!(kind.step(), owners[0]);
        }
    }
}
