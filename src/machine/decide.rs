//! The lifecycle decision: given the durable record and what was observed on the host,
//! the one next safe step. Pure: no I/O, no clock, no randomness; everything it needs is
//! passed in, so every case is a table row in the tests below.
//!
//! The record's outcome bookkeeping ([`apply_outcome`], [`apply_vmm_lost`]) is pure too, so
//! the actor is left with only I/O: persist, run the effect, persist.

use super::record::{Desired, MachineRecord, MachineState};
use super::step::{
    CREATE_ORDER, Direction, Mark, PREPARE_ORDER, STOP_RELEASES, Step, StepSet, TEARDOWN_ORDER,
};
use super::steps::StepError;

/// What the run saw of the VMM before deciding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmSeen {
    /// The record holds no VMM process.
    NotRecorded,
    /// The recorded process is alive (same pid, start time and boot).
    Running,
    /// The recorded process is gone (exited, killed, or the host rebooted).
    Gone,
}

/// What the run observed on the host: the VMM's liveness, and which finished steps'
/// host objects their probes found gone (see `machine::steps::observe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The VMM.
    pub vmm: VmmSeen,
    /// The steps marked `Done` whose probe found what they made gone (a reboot, an
    /// operator's `ip netns del`, a deleted file, a name the VMM replaced).
    pub gone: StepSet,
    /// The wall clock when the host was observed, ms since the epoch (restart backoff is
    /// measured against it).
    pub now_ms: u64,
}

impl Observed {
    /// The first step, in create order, that the record marks `Done` and whose host
    /// objects are gone: the drift to repair first.
    pub fn lost(&self, rec: &MachineRecord) -> Option<Step> {
        self.gone.iter().find(|s| rec.mark(*s) == Mark::Done)
    }
}

/// Bounds on retries, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Boots tried before the machine fails.
    pub max_boot_attempts: u32,
    /// Consecutive failures of one acquire before the machine fails.
    pub max_step_failures: u32,
    /// Restarts of a guest that was ready and then lost its VMM, within
    /// `restart_window_ms`, before the machine fails.
    pub max_restarts: u32,
    /// The window the restarts are counted in, ms.
    pub restart_window_ms: u64,
    /// Delay before the first restart; each further one within the window doubles it.
    pub restart_backoff_ms: u64,
    /// Longest delay before a restart, ms.
    pub restart_backoff_max_ms: u64,
}

impl Policy {
    /// The crashes of `rec` that count at `now_ms` (those within the window).
    pub fn recent_crashes(&self, rec: &MachineRecord, now_ms: u64) -> usize {
        let since = now_ms.saturating_sub(self.restart_window_ms);
        rec.crashes.iter().filter(|at| **at >= since).count()
    }

    /// When the VMM of a crashed guest may be started again: the last crash plus a delay
    /// that doubles with each crash within the window, capped. None: no crash counts.
    pub fn restart_at(&self, rec: &MachineRecord, now_ms: u64) -> Option<u64> {
        let recent = self.recent_crashes(rec, now_ms);
        let last = *rec.crashes.last()?;
        if recent == 0 {
            return None;
        }
        let doublings = (recent - 1).min(32) as u32;
        let delay = self
            .restart_backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.restart_backoff_max_ms);
        Some(last.saturating_add(delay))
    }
}

/// The next thing the run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Run a step's idempotent effect.
    Acquire(Step),
    /// Run a step's idempotent undo.
    Release(Step),
    /// The VMM the record holds is gone: drop the marks that died with it.
    VmmLost,
    /// A resource a `Done` step made is gone from the host: mark the step to be redone.
    Lost(Step),
    /// Stop trying: record the reason; the run then releases everything.
    GiveUp(String),
    /// Nothing to do before this time (ms since the epoch): a crashed guest's restart
    /// backoff. The run looks again then.
    Wait(u64),
    /// Nothing to do until the desired state changes.
    Settle,
}

/// The decision and the state the control plane sees while it is carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to do.
    pub next: Next,
    /// The visible state.
    pub state: MachineState,
}

/// Where the run is heading, once failure is taken into account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Started,
    Prepared,
    Stopped,
    Destroyed,
    Failed,
}

fn target(rec: &MachineRecord) -> Target {
    match (rec.desired, rec.failure.is_some()) {
        (Desired::Destroyed, _) => Target::Destroyed,
        (_, true) => Target::Failed,
        (Desired::Started, false) => Target::Started,
        (Desired::Prepared, false) => Target::Prepared,
        (Desired::Stopped, false) => Target::Stopped,
    }
}

/// The next safe step for a machine.
pub fn decide(rec: &MachineRecord, seen: &Observed, policy: &Policy) -> Decision {
    let target = target(rec);
    let decision = |next, state| Decision { next, state };

    // Prepared capacity is built like a started machine, up to an idle guest in a paused
    // VMM; its guest dying after that is not repaired but given up, so its pool
    // destroys and replaces it (a prepared machine is used once, never rebooted).
    if target == Target::Prepared
        && rec.mark(Step::Ready) == Mark::Done
        && seen.vmm == VmmSeen::Gone
    {
        return decision(
            Next::GiveUp("the prepared machine's VMM exited".to_string()),
            MachineState::Failed,
        );
    }
    if let Some((order, settled)) = match target {
        Target::Started => Some((&CREATE_ORDER[..], MachineState::Started)),
        Target::Prepared => Some((&PREPARE_ORDER[..], MachineState::Prepared)),
        Target::Stopped | Target::Destroyed | Target::Failed => None,
    } {
        // The host lost the VMM: unpublish the dead guest first, then forget it.
        if rec.touched(Step::Vmm) && seen.vmm == VmmSeen::Gone {
            if rec.touched(Step::Publish) {
                return decision(Next::Release(Step::Publish), MachineState::Starting);
            }
            return decision(Next::VmmLost, MachineState::Starting);
        }
        // Drift: the host lost what a finished step made. Redo it through the normal steps.
        if let Some(step) = seen.lost(rec) {
            return decision(Next::Lost(step), MachineState::Starting);
        }
        if rec.boot_attempts >= policy.max_boot_attempts {
            return decision(
                Next::GiveUp(format!(
                    "the guest did not become ready in {} boot attempts",
                    rec.boot_attempts
                )),
                MachineState::Failed,
            );
        }
        let crashes = policy.recent_crashes(rec, seen.now_ms);
        if crashes > policy.max_restarts as usize {
            return decision(
                Next::GiveUp(format!(
                    "the guest stopped {crashes} times within {} s after it was ready \
                     (guest.max_restarts = {})",
                    policy.restart_window_ms / 1000,
                    policy.max_restarts
                )),
                MachineState::Failed,
            );
        }
        if rec.step_failures >= policy.max_step_failures {
            let last = rec.timings.last();
            let step = last.map_or("a step", |t| t.step.name());
            let why = last.and_then(|t| t.error.clone()).unwrap_or_default();
            return decision(
                Next::GiveUp(format!(
                    "{step} failed {} times in a row: {why}",
                    rec.step_failures
                )),
                MachineState::Failed,
            );
        }
        // A VMM from an earlier boot whose guest never became ready is replaced.
        let stale_vmm = rec
            .resources
            .vmm
            .as_ref()
            .is_some_and(|vmm| vmm.attempt < rec.boot_attempts);
        if rec.touched(Step::Vmm) && rec.mark(Step::Ready) != Mark::Done && stale_vmm {
            return decision(Next::Release(Step::Vmm), MachineState::Starting);
        }
        // A step is only acquired with nothing after it still on the host: what was built
        // on top of a step being redone is released first, latest first (and so is
        // whatever this target does not want at all). A step redone in place (see
        // `StepInfo::in_place`) is the exception: it is acquired where it stands.
        let first_missing = order.iter().copied().find(|s| rec.mark(*s) != Mark::Done);
        if !first_missing.is_some_and(|s| s.info().in_place) {
            let above = first_missing.map_or(CREATE_ORDER.len(), |s| s.create_index() + 1);
            if let Some(later) = CREATE_ORDER
                .iter()
                .enumerate()
                .rev()
                .find(|(i, s)| rec.touched(**s) && (*i >= above || !order.contains(s)))
            {
                return decision(Next::Release(*later.1), MachineState::Starting);
            }
        }
        // A guest that crashed after it was ready is started again after its backoff.
        if first_missing == Some(Step::Vmm)
            && let Some(at) = policy.restart_at(rec, seen.now_ms)
            && at > seen.now_ms
        {
            return decision(Next::Wait(at), MachineState::Starting);
        }
        return match first_missing {
            Some(step) => decision(Next::Acquire(step), MachineState::Starting),
            None => decision(Next::Settle, settled),
        };
    }

    let (releases, busy, settled): (&[Step], _, _) = match target {
        Target::Stopped => (
            &STOP_RELEASES,
            MachineState::Stopping,
            MachineState::Stopped,
        ),
        Target::Destroyed => (
            &TEARDOWN_ORDER,
            MachineState::Destroying,
            MachineState::Destroyed,
        ),
        Target::Failed => (&TEARDOWN_ORDER, MachineState::Failed, MachineState::Failed),
        Target::Started | Target::Prepared => unreachable_target(),
    };
    match releases.iter().find(|s| rec.touched(**s)) {
        Some(step) => decision(Next::Release(*step), busy),
        None => decision(Next::Settle, settled),
    }
}

// `Target::Started` and `Target::Prepared` return early above; this keeps the match exhaustive without a
// wildcard arm, so a new target cannot be forgotten.
fn unreachable_target() -> (&'static [Step], MachineState, MachineState) {
    (&[], MachineState::Starting, MachineState::Starting)
}

/// Records that a step's effect is about to run. Persisted before the effect, so that a
/// crash during the effect leaves a `Begun` mark and the undo runs even for a half-done
/// effect.
pub fn apply_begin(rec: &mut MachineRecord, step: Step, direction: Direction, state: MachineState) {
    if direction == Direction::Acquire && rec.mark(step) == Mark::Untouched {
        rec.set_mark(step, Mark::Begun);
    }
    rec.current = Some((step, direction));
    rec.state = state;
}

/// The run of acquires that can begin together with `first` (the decision's
/// `Acquire(first)`): `first`, then each step `decide` would pick next were the ones
/// before it done, as long as none of those is a wait (`Step::cancellable`). A wait may
/// only lead a run: a `Reconcile` cancels it while nothing of the run has finished.
///
/// The run is marked `Begun` in one commit ([`apply_begin_run`]), its effects run one
/// after the other, and one commit records their outcomes. That is as crash-safe as one
/// step at a time: every effect still starts only after its mark is durable, and the undo
/// of a marked step whose effect never ran is an undo of nothing (every release is
/// idempotent and works from names).
pub fn run_of(rec: &MachineRecord, seen: &Observed, policy: &Policy, first: Step) -> Vec<Step> {
    let mut run = vec![first];
    let mut ahead = rec.clone();
    let mut seen = *seen;
    let mut step = first;
    loop {
        let state = ahead.state;
        apply_begin(&mut ahead, step, Direction::Acquire, state);
        apply_outcome(&mut ahead, step, Direction::Acquire, None);
        seen.gone.remove(step);
        match decide(&ahead, &seen, policy).next {
            Next::Acquire(next) if !next.cancellable() && !run.contains(&next) => {
                run.push(next);
                step = next;
            }
            _ => return run,
        }
    }
}

/// Whether the commit that begins `run` takes the machine's lease too: the lease is a row
/// of the store, so the commit that marks a run with the `lease` step holds the block in
/// the same transaction (row and mark are durable together), and the step's effect finds
/// it with a read. Should the run end before the lease's effect starts, the commit that
/// records that gives the block back ([`frees_lease`]).
pub fn takes_lease(run: &[Step]) -> bool {
    run.contains(&Step::Lease)
}

/// Whether the commit that records a run's end frees the machine's lease: the run's begin
/// marked the `lease` step (and so took the block), and its effect never started, so the
/// mark goes back to untouched ([`apply_not_run`]) and the row goes with it. A lease
/// marked before the run keeps its mark and its row; its release frees them.
pub fn frees_lease(not_run: &[Step], marked: StepSet) -> bool {
    not_run.contains(&Step::Lease) && marked.contains(Step::Lease)
}

/// The first move of a new record, made on it before its first commit: a record that has
/// never touched the host needs no look at the host (nothing is recorded, so nothing can
/// be gone), so the create's own commit carries the first run's `Begun` marks and the
/// run starts without a commit of its own. Returns the run, the steps it marked and the
/// events of its begin; `None`, with the record untouched, when the first move is not an
/// acquire (a machine created stopped settles in its own commit).
pub fn begin_new(
    rec: &mut MachineRecord,
    policy: &Policy,
    now_ms: u64,
) -> Option<(Vec<Step>, StepSet, Vec<String>)> {
    if !rec.nothing_touched() {
        return None;
    }
    let seen = Observed {
        vmm: VmmSeen::NotRecorded,
        gone: StepSet::EMPTY,
        now_ms,
    };
    let decision = decide(rec, &seen, policy);
    let Next::Acquire(first) = decision.next else {
        return None;
    };
    let run = run_of(rec, &seen, policy, first);
    let (messages, marked) = apply_decision(rec, &decision, &run);
    Some((run, marked, messages))
}

/// The effects of `run` (from [`run_of`]) that may start now, in create order: those not
/// `started` yet whose needs within the run (`Step::needs`) have all `finished` well.
/// Independent effects (the disk, the network, the cgroup) so run at the same time, each
/// on the record as its needs left it. A wait leading the run comes first and alone: a
/// `Reconcile` may still cancel it while nothing else of the run has started.
pub fn startable(run: &[Step], started: StepSet, finished: StepSet) -> Vec<Step> {
    if let Some(&lead) = run.first()
        && lead.cancellable()
        && !finished.contains(lead)
    {
        return if started.contains(lead) {
            Vec::new()
        } else {
            vec![lead]
        };
    }
    run.iter()
        .copied()
        .filter(|step| !started.contains(*step))
        .filter(|step| {
            step.needs()
                .iter()
                .all(|need| !run.contains(need) || finished.contains(*need))
        })
        .collect()
}

/// Whether the commit that begins `run` (the decision's next move is its acquire) may be
/// lazy: carried to disk by the next durable commit instead of its own flush. It may when
/// no step of the run leaves anything on the host (a wait, a store row: see
/// `Step::leaves_nothing_on_host`). A crash before the next durable commit then loses
/// this commit, and everything committed after it, which is always safe to lose: the
/// record goes back to the last durable one, whose `Begun` marks cover everything on the
/// host (an earlier run's effects included: their outcomes are redone after an undo), and
/// a store row written by a step of this run is lost with it. Nothing is told outside
/// the store in between: the state a client waits for comes with a durable commit.
///
/// Seen from a cold create: the commit that records the VMM and begins the readiness
/// wait is lazy; the wait is most of the create, and the commit that publishes the route
/// and records `started` carries it.
pub fn lazy_begin(decision: &Decision, run: &[Step]) -> bool {
    matches!(decision.next, Next::Acquire(_))
        && !run.is_empty()
        && run.iter().all(|step| step.leaves_nothing_on_host())
}

/// Records that the effects of `run` (from [`run_of`]) are about to run: each untouched
/// step is marked `Begun`, and the first is the one in flight. Returns the steps this
/// marked, which go back to untouched if the run ends before their effect starts
/// ([`apply_not_run`]).
pub fn apply_begin_run(rec: &mut MachineRecord, run: &[Step], state: MachineState) -> StepSet {
    let mut marked = StepSet::EMPTY;
    for step in run.iter().rev() {
        if rec.mark(*step) == Mark::Untouched {
            marked.insert(*step);
        }
        apply_begin(rec, *step, Direction::Acquire, state);
    }
    marked
}

/// A run ended (a step failed) before the effects of `not_run` started: those of them
/// that its begin marked (`marked`) go back to untouched, as nothing of them was made. A
/// step marked before the run began keeps its mark: an earlier effect may have left part
/// of it on the host.
pub fn apply_not_run(rec: &mut MachineRecord, not_run: &[Step], marked: StepSet) {
    for step in not_run {
        if marked.contains(*step) && rec.mark(*step) == Mark::Begun {
            rec.set_mark(*step, Mark::Untouched);
        }
    }
}

/// Records the decision's next move on the record (`run`: the run an acquire begins,
/// from [`run_of`]). Returns the event messages and the steps whose `Begun` mark this
/// made.
pub fn apply_decision(
    rec: &mut MachineRecord,
    decision: &Decision,
    run: &[Step],
) -> (Vec<String>, StepSet) {
    let mut messages = Vec::new();
    let mut marked = StepSet::EMPTY;
    let changed = rec.state != decision.state;
    match &decision.next {
        Next::Settle | Next::Wait(_) => {
            rec.state = decision.state;
            rec.current = None;
        }
        Next::VmmLost => {
            let crashed = rec.mark(Step::Ready) == Mark::Done;
            apply_vmm_lost(rec, rec.updated_at_ms);
            rec.state = decision.state;
            messages.push(if crashed {
                format!(
                    "the VMM is gone after the guest was ready (crash {} on record)",
                    rec.crashes.len()
                )
            } else {
                "the VMM is gone; it will be started again".to_string()
            });
        }
        Next::Lost(step) => {
            apply_lost(rec, *step);
            rec.state = decision.state;
            messages.push(format!(
                "{step} is gone from the host; it will be made again"
            ));
        }
        Next::GiveUp(reason) => {
            apply_give_up(rec, reason.clone());
            messages.push(format!("failed: {reason}"));
        }
        Next::Acquire(_) => marked = apply_begin_run(rec, run, decision.state),
        Next::Release(step) => apply_begin(rec, *step, Direction::Release, decision.state),
    }
    if changed && !matches!(decision.next, Next::GiveUp(_)) {
        messages.push(decision.state.name().to_string());
    }
    (messages, marked)
}

/// Applies a step's outcome (`None`: it succeeded) to the record. A permanent acquire
/// failure fails the machine at once, naming the step and the cause; the run then
/// releases everything. A release is always retried: what it removes must go.
pub fn apply_outcome(
    rec: &mut MachineRecord,
    step: Step,
    direction: Direction,
    error: Option<&StepError>,
) {
    rec.current = None;
    let ok = error.is_none();
    if direction == Direction::Acquire
        && let Some(StepError::Permanent(cause)) = error
    {
        rec.step_failures += 1;
        apply_give_up(rec, format!("{step}: {cause}"));
        return;
    }
    match (direction, ok) {
        (Direction::Acquire, true) => {
            rec.set_mark(step, Mark::Done);
            rec.step_failures = 0;
            if step == Step::Ready {
                rec.boot_attempts = 0;
                if let Some(vmm) = rec.resources.vmm.as_mut() {
                    vmm.attempt = 0;
                }
            }
        }
        (Direction::Acquire, false) if step == Step::Ready => {
            // A guest that did not become ready costs a boot attempt; its VMM is now stale
            // and gets replaced (see `decide`).
            rec.boot_attempts += 1;
        }
        (Direction::Acquire, false) | (Direction::Release, false) => {
            rec.step_failures += 1;
        }
        (Direction::Release, true) => {
            rec.set_mark(step, Mark::Untouched);
            rec.step_failures = 0;
            super::steps::forget(step, rec);
        }
    }
}

/// The VMM died under a machine that should run: forget the VMM and the readiness that
/// died with it. A guest that died before it was ready costs a boot attempt; one that
/// died after it was ready is a crash, recorded at `now_ms` (the restart backoff and
/// give-up are decided from these, see [`Policy::restart_at`]).
pub fn apply_vmm_lost(rec: &mut MachineRecord, now_ms: u64) {
    // A VMM from an attempt already counted as failed (its readiness wait failed first)
    // is not counted twice.
    let already_counted = rec
        .resources
        .vmm
        .as_ref()
        .is_some_and(|vmm| vmm.attempt < rec.boot_attempts);
    if rec.mark(Step::Ready) != Mark::Done && !already_counted {
        rec.boot_attempts += 1;
    }
    if rec.mark(Step::Ready) == Mark::Done {
        rec.crashes.push(now_ms);
        if rec.crashes.len() > super::record::CRASHES_KEPT {
            let excess = rec.crashes.len() - super::record::CRASHES_KEPT;
            rec.crashes.drain(..excess);
        }
    }
    rec.set_mark(Step::Vmm, Mark::Untouched);
    rec.set_mark(Step::Ready, Mark::Untouched);
    rec.resources.vmm = None;
}

/// The host lost what `step` made: the step is to be done again (its mark goes back to
/// `Begun`, so it is acquired again after whatever was built on it is released).
pub fn apply_lost(rec: &mut MachineRecord, step: Step) {
    rec.set_mark(step, Mark::Begun);
}

/// Gives up on the machine: the run releases everything and settles `failed`.
pub fn apply_give_up(rec: &mut MachineRecord, reason: String) {
    rec.failure = Some(reason);
    rec.state = MachineState::Failed;
}

/// A new desired state from the API. Starting a failed machine clears the failure and
/// the counters, so it gets a fresh set of attempts.
pub fn apply_desired(rec: &mut MachineRecord, desired: Desired) {
    if desired == Desired::Started && rec.desired != Desired::Destroyed {
        rec.failure = None;
        rec.boot_attempts = 0;
        rec.step_failures = 0;
        rec.crashes.clear();
    }
    rec.desired = desired;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::record::VmmRecord;
    use crate::machine::spec::MachineSpec;
    use crate::machine::steps::Cause;
    use crate::machine::workload::NothingToRun;
    use std::path::PathBuf;

    fn retry() -> StepError {
        StepError::Retry(Cause::Service("try again".into()))
    }

    const POLICY: Policy = Policy {
        max_boot_attempts: 3,
        max_step_failures: 5,
        max_restarts: 3,
        restart_window_ms: 60_000,
        restart_backoff_ms: 1_000,
        restart_backoff_max_ms: 3_000,
    };
    const RUNNING: Observed = Observed {
        vmm: VmmSeen::Running,
        gone: StepSet::EMPTY,
        now_ms: 0,
    };
    const GONE: Observed = Observed {
        vmm: VmmSeen::Gone,
        gone: StepSet::EMPTY,
        now_ms: 0,
    };
    const NONE: Observed = Observed {
        vmm: VmmSeen::NotRecorded,
        gone: StepSet::EMPTY,
        now_ms: 0,
    };

    fn record(desired: Desired, marks: &[(Step, Mark)]) -> MachineRecord {
        let spec = MachineSpec {
            image: "demo".into(),
            vcpus: 1,
            memory_mib: 128,
            command: vec![],
            env: vec![],
            ports: vec![],
            ..MachineSpec::default()
        };
        let mut rec = MachineRecord::new("0123456789".into(), "m".into(), "r".into(), spec, 0);
        rec.desired = desired;
        for (step, mark) in marks {
            rec.set_mark(*step, *mark);
        }
        if rec.touched(Step::Vmm) {
            rec.resources.vmm = Some(VmmRecord {
                driver: "qemu".into(),
                pid: 1,
                start_time: 1,
                boot_id: "b".into(),
                control_socket: PathBuf::new(),
                agent_socket: PathBuf::new(),
                attempt: 0,
            });
        }
        rec
    }

    fn done_through(last: Step) -> Vec<(Step, Mark)> {
        let end = CREATE_ORDER
            .iter()
            .position(|s| *s == last)
            .map_or(0, |i| i + 1);
        CREATE_ORDER[..end]
            .iter()
            .map(|s| (*s, Mark::Done))
            .collect()
    }

    fn all_done() -> Vec<(Step, Mark)> {
        done_through(Step::Publish)
    }

    fn with(mut marks: Vec<(Step, Mark)>, step: Step, mark: Mark) -> Vec<(Step, Mark)> {
        marks.push((step, mark));
        marks
    }

    type Marks = Vec<(Step, Mark)>;
    type Row = (Marks, Observed, Next, MachineState);

    /// One row: a record, what was seen, and the expected decision.
    fn check(rec: &MachineRecord, seen: Observed, next: Next, state: MachineState) {
        let got = decide(rec, &seen, &POLICY);
        assert_eq!(
            got,
            Decision { next, state },
            "desired {:?}, marks {:?}, seen {:?}",
            rec.desired,
            rec.marks,
            seen
        );
    }

    #[test]
    fn towards_started() {
        use Desired::Started;
        let rows: Vec<(Marks, Observed, Next)> = vec![
            (vec![], NONE, Next::Acquire(Step::Image)),
            (
                vec![(Step::Image, Mark::Begun)],
                NONE,
                Next::Acquire(Step::Image),
            ),
            (done_through(Step::Image), NONE, Next::Acquire(Step::Disk)),
            (
                done_through(Step::Lease),
                NONE,
                Next::Acquire(Step::Network),
            ),
            (
                done_through(Step::Network),
                NONE,
                Next::Acquire(Step::Policy),
            ),
            (
                with(done_through(Step::Policy), Step::VmConfig, Mark::Begun),
                NONE,
                Next::Acquire(Step::VmConfig),
            ),
            (
                done_through(Step::VmConfig),
                NONE,
                Next::Acquire(Step::Cgroup),
            ),
            (done_through(Step::Cgroup), NONE, Next::Acquire(Step::Vmm)),
            (done_through(Step::Vmm), RUNNING, Next::Acquire(Step::Ready)),
            (
                done_through(Step::Ready),
                RUNNING,
                Next::Acquire(Step::Publish),
            ),
            (all_done(), RUNNING, Next::Settle),
            // The VMM died under a running machine: unpublish, then forget it.
            (all_done(), GONE, Next::Release(Step::Publish)),
            (done_through(Step::Ready), GONE, Next::VmmLost),
            (done_through(Step::Vmm), GONE, Next::VmmLost),
            (
                with(done_through(Step::Cgroup), Step::Vmm, Mark::Begun),
                GONE,
                Next::VmmLost,
            ),
        ];
        for (marks, seen, next) in rows {
            let state = if next == Next::Settle {
                MachineState::Started
            } else {
                MachineState::Starting
            };
            check(&record(Started, &marks), seen, next, state);
        }
    }

    #[test]
    fn towards_stopped_releases_only_the_running_part() {
        use Desired::Stopped;
        let rows: Vec<Row> = vec![
            (
                all_done(),
                RUNNING,
                Next::Release(Step::Publish),
                MachineState::Stopping,
            ),
            (
                done_through(Step::Ready),
                RUNNING,
                Next::Release(Step::Ready),
                MachineState::Stopping,
            ),
            (
                done_through(Step::Vmm),
                RUNNING,
                Next::Release(Step::Vmm),
                MachineState::Stopping,
            ),
            (
                done_through(Step::Vmm),
                GONE,
                Next::Release(Step::Vmm),
                MachineState::Stopping,
            ),
            (
                done_through(Step::VmConfig),
                NONE,
                Next::Settle,
                MachineState::Stopped,
            ),
            (vec![], NONE, Next::Settle, MachineState::Stopped),
        ];
        for (marks, seen, next, state) in rows {
            check(&record(Stopped, &marks), seen, next, state);
        }
    }

    #[test]
    fn towards_destroyed_releases_everything_touched_in_reverse() {
        use Desired::Destroyed;
        let rows: Vec<Row> = vec![
            (
                all_done(),
                RUNNING,
                Next::Release(Step::Publish),
                MachineState::Destroying,
            ),
            (
                done_through(Step::Vmm),
                GONE,
                Next::Release(Step::Vmm),
                MachineState::Destroying,
            ),
            (
                done_through(Step::Network),
                NONE,
                Next::Release(Step::Network),
                MachineState::Destroying,
            ),
            // A half-done step is released even though it never finished.
            (
                with(done_through(Step::Lease), Step::Network, Mark::Begun),
                NONE,
                Next::Release(Step::Network),
                MachineState::Destroying,
            ),
            (
                vec![(Step::Image, Mark::Begun)],
                NONE,
                Next::Release(Step::Image),
                MachineState::Destroying,
            ),
            (vec![], NONE, Next::Settle, MachineState::Destroyed),
        ];
        for (marks, seen, next, state) in rows {
            check(&record(Destroyed, &marks), seen, next, state);
        }
    }

    #[test]
    fn failed_machines_release_everything_and_settle_failed() {
        for desired in [Desired::Started, Desired::Stopped] {
            let mut rec = record(desired, &done_through(Step::Vmm));
            rec.failure = Some("boom".into());
            check(
                &rec,
                RUNNING,
                Next::Release(Step::Vmm),
                MachineState::Failed,
            );
            let mut rec = record(desired, &[]);
            rec.failure = Some("boom".into());
            check(&rec, NONE, Next::Settle, MachineState::Failed);
        }
        // Destroy wins over failure.
        let mut rec = record(Desired::Destroyed, &[]);
        rec.failure = Some("boom".into());
        check(&rec, NONE, Next::Settle, MachineState::Destroyed);
    }

    #[test]
    fn boot_attempts_are_bounded() {
        let mut rec = record(Desired::Started, &done_through(Step::Vmm));
        // The guest did not become ready: the failed Ready costs an attempt...
        apply_outcome(&mut rec, Step::Ready, Direction::Acquire, Some(&retry()));
        assert_eq!(rec.boot_attempts, 1);
        // ...and the stale VMM is replaced before trying again.
        check(
            &rec,
            RUNNING,
            Next::Release(Step::Vmm),
            MachineState::Starting,
        );
        apply_outcome(&mut rec, Step::Vmm, Direction::Release, None);
        check(&rec, NONE, Next::Acquire(Step::Vmm), MachineState::Starting);

        rec.boot_attempts = POLICY.max_boot_attempts;
        let got = decide(&rec, &NONE, &POLICY);
        assert!(matches!(got.next, Next::GiveUp(_)), "{got:?}");
        apply_give_up(&mut rec, "x".into());
        check(
            &rec,
            NONE,
            Next::Release(Step::Cgroup),
            MachineState::Failed,
        );
    }

    #[test]
    fn repeated_step_failures_give_up() {
        let mut rec = record(Desired::Started, &[(Step::Image, Mark::Begun)]);
        for _ in 0..POLICY.max_step_failures {
            apply_outcome(&mut rec, Step::Image, Direction::Acquire, Some(&retry()));
        }
        assert!(matches!(decide(&rec, &NONE, &POLICY).next, Next::GiveUp(_)));
    }

    #[test]
    fn a_permanent_failure_fails_at_once_and_releases_everything() {
        let mut rec = record(
            Desired::Started,
            &with(done_through(Step::Network), Step::VmConfig, Mark::Begun),
        );
        let cause = StepError::Permanent(Cause::Workload(NothingToRun));
        apply_outcome(&mut rec, Step::VmConfig, Direction::Acquire, Some(&cause));
        assert_eq!(rec.state, MachineState::Failed);
        let failure = rec.failure.clone().unwrap_or_default();
        assert_eq!(failure, format!("vm_config: {NothingToRun}"));
        // The half-done step is released first, then the rest in teardown order.
        check(
            &rec,
            NONE,
            Next::Release(Step::VmConfig),
            MachineState::Failed,
        );
        // A permanent release failure is still retried: what it removes must go.
        let mut rec = record(Desired::Destroyed, &done_through(Step::Disk));
        apply_outcome(&mut rec, Step::Disk, Direction::Release, Some(&cause));
        assert!(rec.failure.is_none());
        check(
            &rec,
            NONE,
            Next::Release(Step::Disk),
            MachineState::Destroying,
        );
    }

    #[test]
    fn prepared_capacity_stops_before_publish_and_a_claim_redoes_ready() {
        // What a prepared machine acquires, through `last`.
        let prepared_through = |last: Step| -> Vec<(Step, Mark)> {
            done_through(last)
                .into_iter()
                .filter(|(s, _)| s.info().prepared)
                .collect()
        };
        let prepared = record(Desired::Prepared, &prepared_through(Step::Vmm));
        check(
            &prepared,
            RUNNING,
            Next::Acquire(Step::Ready),
            MachineState::Starting,
        );
        let idle = record(Desired::Prepared, &prepared_through(Step::Ready));
        check(&idle, RUNNING, Next::Settle, MachineState::Prepared);
        // Its guest died after it was idle: given up, so the pool replaces it.
        let got = decide(&idle, &GONE, &POLICY);
        assert!(matches!(got.next, Next::GiveUp(_)), "{got:?}");
        // A claim wants it started with `ready` to do again (now with the workload):
        // first its policy, in place, with the workload's ports.
        let mut claimed = idle.clone();
        claimed.desired = Desired::Started;
        claimed.set_mark(Step::Ready, Mark::Untouched);
        check(
            &claimed,
            RUNNING,
            Next::Acquire(Step::Policy),
            MachineState::Starting,
        );
        apply_outcome(&mut claimed, Step::Policy, Direction::Acquire, None);
        check(
            &claimed,
            RUNNING,
            Next::Acquire(Step::Ready),
            MachineState::Starting,
        );
    }

    #[test]
    fn vmm_lost_before_ready_costs_an_attempt_after_ready_does_not() {
        let mut rec = record(Desired::Started, &done_through(Step::Vmm));
        apply_vmm_lost(&mut rec, 0);
        assert_eq!(rec.boot_attempts, 1);
        assert!(!rec.touched(Step::Vmm));
        let mut rec = record(Desired::Started, &done_through(Step::Ready));
        apply_vmm_lost(&mut rec, 0);
        assert_eq!(rec.boot_attempts, 0);
        assert!(!rec.touched(Step::Ready));
        assert!(rec.resources.vmm.is_none());
    }

    #[test]
    fn a_crash_looping_guest_is_restarted_with_backoff_then_given_up() {
        let at = |now_ms| Observed { now_ms, ..GONE };
        let none_at = |now_ms| Observed { now_ms, ..NONE };
        let mut rec = record(Desired::Started, &all_done());
        let mut now = 100_000;
        // Crashes 1..=3 are restarted after 1 s, 2 s, then 3 s (capped); the 4th within
        // the window gives up.
        for (crash, delay) in [(1, 1_000), (2, 2_000), (3, 3_000)] {
            check(
                &rec,
                at(now),
                Next::Release(Step::Publish),
                MachineState::Starting,
            );
            apply_outcome(&mut rec, Step::Publish, Direction::Release, None);
            check(&rec, at(now), Next::VmmLost, MachineState::Starting);
            apply_vmm_lost(&mut rec, now);
            assert_eq!(rec.crashes.len(), crash);
            assert_eq!(
                rec.boot_attempts, 0,
                "a crash after ready is not a boot attempt"
            );
            // Waits until the backoff is over, then starts the VMM again.
            check(
                &rec,
                none_at(now),
                Next::Wait(now + delay),
                MachineState::Starting,
            );
            check(
                &rec,
                none_at(now + delay - 1),
                Next::Wait(now + delay),
                MachineState::Starting,
            );
            check(
                &rec,
                none_at(now + delay),
                Next::Acquire(Step::Vmm),
                MachineState::Starting,
            );
            for step in [Step::Vmm, Step::Ready, Step::Publish] {
                apply_outcome(&mut rec, step, Direction::Acquire, None);
            }
            check(
                &rec,
                none_at(now + delay),
                Next::Settle,
                MachineState::Started,
            );
            now += delay + 500;
        }
        check(
            &rec,
            at(now),
            Next::Release(Step::Publish),
            MachineState::Starting,
        );
        apply_outcome(&mut rec, Step::Publish, Direction::Release, None);
        apply_vmm_lost(&mut rec, now);
        let decided = decide(&rec, &none_at(now), &POLICY);
        assert!(
            matches!(&decided.next, Next::GiveUp(why) if why.contains("4 times") && why.contains("guest.max_restarts")),
            "{decided:?}"
        );
        // Crashes older than the window no longer count: a restart, at once.
        let later = now + POLICY.restart_window_ms + 1;
        check(
            &rec,
            none_at(later),
            Next::Acquire(Step::Vmm),
            MachineState::Starting,
        );
        // Starting a failed machine again clears the history.
        apply_give_up(&mut rec, "x".into());
        apply_desired(&mut rec, Desired::Started);
        assert!(rec.crashes.is_empty());
    }

    #[test]
    fn a_failed_boot_is_counted_once_whether_ready_or_liveness_notices_first() {
        let mut rec = record(Desired::Started, &done_through(Step::Vmm));
        // The readiness wait fails because the VMM exited...
        apply_outcome(&mut rec, Step::Ready, Direction::Acquire, Some(&retry()));
        // ...and the next decision sees the VMM gone.
        check(&rec, GONE, Next::VmmLost, MachineState::Starting);
        apply_vmm_lost(&mut rec, 0);
        assert_eq!(rec.boot_attempts, 1);
    }

    #[test]
    fn a_lost_network_is_rebuilt_after_what_stands_on_it_is_released() {
        let mut rec = record(Desired::Started, &all_done());
        let no_network = Observed {
            gone: StepSet::of(&[Step::Network]),
            ..RUNNING
        };
        check(
            &rec,
            no_network,
            Next::Lost(Step::Network),
            MachineState::Starting,
        );
        apply_lost(&mut rec, Step::Network);
        // Everything built on the network goes first, latest first...
        for later in [
            Step::Publish,
            Step::Ready,
            Step::Vmm,
            Step::Cgroup,
            Step::VmConfig,
            Step::Policy,
        ] {
            check(&rec, RUNNING, Next::Release(later), MachineState::Starting);
            apply_outcome(&mut rec, later, Direction::Release, None);
        }
        // ...then the network is built again, and the rest after it.
        check(
            &rec,
            NONE,
            Next::Acquire(Step::Network),
            MachineState::Starting,
        );
        apply_outcome(&mut rec, Step::Network, Direction::Acquire, None);
        check(
            &rec,
            NONE,
            Next::Acquire(Step::Policy),
            MachineState::Starting,
        );
    }

    #[test]
    fn a_lost_policy_is_written_again_in_place_with_the_vmm_left_running() {
        let mut rec = record(Desired::Started, &all_done());
        let no_policy = Observed {
            gone: StepSet::of(&[Step::Policy]),
            ..RUNNING
        };
        check(
            &rec,
            no_policy,
            Next::Lost(Step::Policy),
            MachineState::Starting,
        );
        apply_lost(&mut rec, Step::Policy);
        check(
            &rec,
            RUNNING,
            Next::Acquire(Step::Policy),
            MachineState::Starting,
        );
        apply_outcome(&mut rec, Step::Policy, Direction::Acquire, None);
        check(&rec, RUNNING, Next::Settle, MachineState::Started);
    }

    #[test]
    fn a_machine_from_before_the_policy_step_gets_it_without_a_restart() {
        let marks: Vec<(Step, Mark)> = all_done()
            .into_iter()
            .filter(|(s, _)| *s != Step::Policy)
            .collect();
        let mut rec = record(Desired::Started, &marks);
        check(
            &rec,
            RUNNING,
            Next::Acquire(Step::Policy),
            MachineState::Starting,
        );
        apply_outcome(&mut rec, Step::Policy, Direction::Acquire, None);
        check(&rec, RUNNING, Next::Settle, MachineState::Started);
    }

    #[test]
    fn a_lost_disk_is_noticed_first_and_only_towards_started() {
        let rec = record(Desired::Started, &all_done());
        let nothing = Observed {
            vmm: VmmSeen::Running,
            gone: StepSet::of(&[
                Step::Network,
                Step::Disk,
                Step::VmConfig,
                Step::Policy,
                Step::Cgroup,
            ]),
            now_ms: 0,
        };
        check(
            &rec,
            nothing,
            Next::Lost(Step::Disk),
            MachineState::Starting,
        );
        // A config disk its VMM removed or replaced is written again, the rest kept.
        let config_gone = Observed {
            gone: StepSet::of(&[Step::VmConfig]),
            ..RUNNING
        };
        check(
            &rec,
            config_gone,
            Next::Lost(Step::VmConfig),
            MachineState::Starting,
        );
        // A machine being destroyed just releases; drift does not matter there.
        let rec = record(Desired::Destroyed, &all_done());
        check(
            &rec,
            nothing,
            Next::Release(Step::Publish),
            MachineState::Destroying,
        );
    }

    #[test]
    fn begin_marks_acquires_only() {
        let mut rec = record(Desired::Started, &[]);
        apply_begin(
            &mut rec,
            Step::Image,
            Direction::Acquire,
            MachineState::Starting,
        );
        assert_eq!(rec.mark(Step::Image), Mark::Begun);
        let mut rec = record(Desired::Destroyed, &done_through(Step::Image));
        apply_begin(
            &mut rec,
            Step::Image,
            Direction::Release,
            MachineState::Destroying,
        );
        assert_eq!(rec.mark(Step::Image), Mark::Done);
        apply_outcome(&mut rec, Step::Image, Direction::Release, None);
        assert!(rec.nothing_touched());
    }

    #[test]
    fn a_run_begins_every_acquire_up_to_the_next_wait() {
        use Step::*;
        let to_vmm = vec![Image, Disk, Lease, Network, Policy, VmConfig, Cgroup, Vmm];
        let rows: Vec<(Desired, Marks, Observed, Step, Vec<Step>)> = vec![
            // A fresh create: the image (a wait, leading), then everything up to the next
            // wait; then the readiness wait and the route.
            (Desired::Started, vec![], NONE, Image, to_vmm.clone()),
            (
                Desired::Started,
                done_through(Vmm),
                RUNNING,
                Ready,
                vec![Ready, Publish],
            ),
            (
                Desired::Started,
                done_through(Ready),
                RUNNING,
                Publish,
                vec![Publish],
            ),
            // Prepared capacity has no policy and no route.
            (
                Desired::Prepared,
                vec![],
                NONE,
                Image,
                vec![Image, Disk, Lease, Network, VmConfig, Cgroup, Vmm],
            ),
            (
                Desired::Prepared,
                done_through(Vmm)
                    .into_iter()
                    .filter(|(s, _)| *s != Policy)
                    .collect(),
                RUNNING,
                Ready,
                vec![Ready],
            ),
            // Part way (a retry after a failed lease).
            (
                Desired::Started,
                with(done_through(Disk), Lease, Mark::Begun),
                NONE,
                Lease,
                to_vmm[2..].to_vec(),
            ),
            // A policy written again in place under a running VMM: the run stops there,
            // as the next decision is to settle.
            (
                Desired::Started,
                with(
                    all_done()
                        .into_iter()
                        .filter(|(s, _)| *s != Policy)
                        .collect(),
                    Policy,
                    Mark::Begun,
                ),
                RUNNING,
                Policy,
                vec![Policy],
            ),
            // A lost network, rebuilt once what stood on it is released: the steps above
            // it follow in the same run.
            (
                Desired::Started,
                with(done_through(Lease), Network, Mark::Begun),
                Observed {
                    gone: StepSet::of(&[Network]),
                    ..NONE
                },
                Network,
                to_vmm[3..].to_vec(),
            ),
        ];
        for (desired, marks, seen, first, want) in rows {
            let rec = record(desired, &marks);
            assert_eq!(
                decide(&rec, &seen, &POLICY).next,
                Next::Acquire(first),
                "the row must start from the decision: {marks:?}"
            );
            let run = run_of(&rec, &seen, &POLICY, first);
            assert_eq!(run, want, "{marks:?}");
            assert!(run[1..].iter().all(|s| !s.cancellable()), "{run:?}");
        }
    }

    #[test]
    fn a_run_starts_what_its_needs_allow_with_a_leading_wait_alone() {
        use Step::*;
        let cold = [Image, Disk, Lease, Network, Policy, VmConfig, Cgroup, Vmm];
        let set = StepSet::of;
        // The run, what started, what finished well, and what may start now.
        type Row<'a> = (&'a [Step], &'a [Step], &'a [Step], Vec<Step>);
        let rows: Vec<Row> = vec![
            // The image (a wait) leads alone.
            (&cold, &[], &[], vec![Image]),
            (&cold, &[Image], &[], vec![]),
            // Then everything that needs only it, or nothing.
            (&cold, &[Image], &[Image], vec![Disk, Lease, Cgroup]),
            // The lease done: the network, the policy and the config (which needs the
            // lease's address, not the disk).
            (
                &cold,
                &[Image, Disk, Lease, Cgroup],
                &[Image, Lease],
                vec![Network, Policy, VmConfig],
            ),
            (
                &cold,
                &[Image, Disk, Lease, Cgroup, Network, Policy, VmConfig],
                &[Image, Lease, Cgroup],
                vec![],
            ),
            // The VMM waits for all of them.
            (
                &cold,
                &[Image, Disk, Lease, Cgroup, Network, Policy, VmConfig],
                &[Image, Lease, Disk, Cgroup, Network, VmConfig],
                vec![],
            ),
            (
                &cold,
                &[Image, Disk, Lease, Cgroup, Network, Policy, VmConfig],
                &[Image, Lease, Disk, Cgroup, Network, VmConfig, Policy],
                vec![Vmm],
            ),
            // A need outside the run is done already.
            (
                &[Network, Policy, VmConfig],
                &[],
                &[],
                vec![Network, Policy, VmConfig],
            ),
            (&[Vmm], &[], &[], vec![Vmm]),
            // The readiness wait leads; the route follows it.
            (&[Ready, Publish], &[], &[], vec![Ready]),
            (&[Ready, Publish], &[Ready], &[Ready], vec![Publish]),
        ];
        for (run, started, finished, want) in rows {
            assert_eq!(
                startable(run, set(started), set(finished)),
                want,
                "{run:?} started {started:?} finished {finished:?}"
            );
        }
    }

    #[test]
    fn the_disk_always_starts_before_the_config_that_shares_its_directory() {
        // vm_config makes the machine directory when it finds none, but the directory is
        // the disk step's, which must be marked (started) so its release removes it. Every
        // order in which a cold run's effects can finish keeps that.
        use Step::*;
        let run = [Image, Disk, Lease, Network, Policy, VmConfig, Cgroup, Vmm];
        let mut seen = std::collections::HashSet::new();
        let mut todo = vec![(StepSet::EMPTY, StepSet::EMPTY)];
        while let Some((mut started, finished)) = todo.pop() {
            for step in startable(&run, started, finished) {
                assert!(
                    step != VmConfig || started.contains(Disk),
                    "vm_config starts before the disk: {started:?}"
                );
                started.insert(step);
            }
            for step in started.iter().filter(|s| !finished.contains(*s)) {
                let mut finished = finished;
                finished.insert(step);
                if seen.insert((started, finished)) {
                    todo.push((started, finished));
                }
            }
        }
        assert!(seen.len() > 10, "the walk covers the run: {}", seen.len());
    }

    #[test]
    fn a_run_gives_back_the_lease_it_took_when_the_lease_never_ran() {
        use Step::*;
        let run = [Image, Disk, Lease, Network];
        assert!(takes_lease(&run) && !takes_lease(&[Ready, Publish]));
        // The image (leading) failed: the lease this run marked never ran.
        assert!(frees_lease(&run[1..], StepSet::of(&run)));
        // It ran (its own outcome is recorded, whatever it was).
        assert!(!frees_lease(&run[3..], StepSet::of(&run)));
        // Marked before this run: the mark and the row stay, for the release.
        assert!(!frees_lease(&run[1..], StepSet::of(&[Disk, Network])));
    }

    #[test]
    fn a_new_record_begins_its_first_run_before_its_first_commit() {
        use Step::*;
        let mut rec = record(Desired::Started, &[]);
        let (run, marked, messages) = begin_new(&mut rec, &POLICY, 1).expect("a run");
        assert_eq!(
            run,
            [Image, Disk, Lease, Network, Policy, VmConfig, Cgroup, Vmm]
        );
        assert_eq!(marked, StepSet::of(&run));
        assert!(run.iter().all(|s| rec.mark(*s) == Mark::Begun));
        assert_eq!(rec.state, MachineState::Starting);
        assert_eq!(messages, ["starting"]);
        // What the actor would have begun from the same record.
        let mut by_actor = record(Desired::Started, &[]);
        let decision = decide(&by_actor, &NONE, &POLICY);
        let want = run_of(&by_actor, &NONE, &POLICY, Image);
        apply_decision(&mut by_actor, &decision, &want);
        assert_eq!(rec, by_actor);
        // Created stopped: nothing begins, the record is untouched.
        let mut stopped = record(Desired::Stopped, &[]);
        let before = stopped.clone();
        assert!(begin_new(&mut stopped, &POLICY, 1).is_none());
        assert_eq!(stopped, before);
        // Only a new record.
        let mut touched = record(Desired::Started, &[(Image, Mark::Done)]);
        assert!(begin_new(&mut touched, &POLICY, 1).is_none());
    }

    #[test]
    fn only_a_run_that_leaves_nothing_on_the_host_begins_lazily() {
        use Step::*;
        let acquire = |step| Decision {
            state: MachineState::Starting,
            next: Next::Acquire(step),
        };
        let rows: Vec<(Decision, Vec<Step>, bool)> = vec![
            // The readiness wait and the route: a wait and a store row.
            (acquire(Ready), vec![Ready, Publish], true),
            (acquire(Ready), vec![Ready], true),
            (acquire(Publish), vec![Publish], true),
            // Anything that makes a host object needs its mark on disk first.
            (
                acquire(Image),
                vec![Image, Disk, Lease, Network, Policy, VmConfig, Cgroup, Vmm],
                false,
            ),
            (acquire(Vmm), vec![Vmm], false),
            (acquire(Policy), vec![Policy], false),
            // Only the begin of an acquire: a release, a settle, a give-up are durable.
            (
                Decision {
                    state: MachineState::Stopping,
                    next: Next::Release(Publish),
                },
                vec![],
                false,
            ),
            (
                Decision {
                    state: MachineState::Started,
                    next: Next::Settle,
                },
                vec![],
                false,
            ),
        ];
        for (decision, run, want) in rows {
            assert_eq!(lazy_begin(&decision, &run), want, "{decision:?} {run:?}");
        }
    }

    #[test]
    fn a_run_cut_short_unmarks_only_what_it_marked() {
        use Step::*;
        // A fresh run: the disk fails, and what came after it never ran.
        let mut rec = record(Desired::Started, &[]);
        let run = run_of(&rec, &NONE, &POLICY, Image);
        let marked = apply_begin_run(&mut rec, &run, MachineState::Starting);
        assert_eq!(rec.current, Some((Image, Direction::Acquire)));
        assert!(run.iter().all(|s| rec.mark(*s) == Mark::Begun));
        assert_eq!(marked, StepSet::of(&run));
        apply_outcome(&mut rec, Image, Direction::Acquire, None);
        apply_outcome(&mut rec, Disk, Direction::Acquire, Some(&retry()));
        apply_not_run(&mut rec, &run[2..], marked);
        assert_eq!(rec.mark(Image), Mark::Done);
        assert_eq!(rec.mark(Disk), Mark::Begun);
        assert!(run[2..].iter().all(|s| !rec.touched(*s)));
        // The next decision is what it was one step at a time: the disk again.
        assert_eq!(decide(&rec, &NONE, &POLICY).next, Next::Acquire(Disk));

        // A crash left the VMM's launch half done (Begun) and the cgroup, redone in
        // place, Begun: the cgroup leads a run that passes through the VMM again.
        let marks = with(
            with(done_through(VmConfig), Cgroup, Mark::Begun),
            Vmm,
            Mark::Begun,
        );
        let mut rec = record(Desired::Started, &marks);
        assert_eq!(decide(&rec, &NONE, &POLICY).next, Next::Acquire(Cgroup));
        let run = run_of(&rec, &NONE, &POLICY, Cgroup);
        assert_eq!(run, [Cgroup, Vmm]);
        let marked = apply_begin_run(&mut rec, &run, MachineState::Starting);
        assert!(marked.is_empty());
        // The cgroup fails: the half-launched VMM keeps its mark, so its undo still runs.
        apply_outcome(&mut rec, Cgroup, Direction::Acquire, Some(&retry()));
        apply_not_run(&mut rec, &run[1..], marked);
        assert_eq!(rec.mark(Vmm), Mark::Begun);
    }

    #[test]
    fn start_clears_failure_but_destroy_is_final() {
        let mut rec = record(Desired::Started, &[]);
        rec.failure = Some("x".into());
        rec.boot_attempts = 3;
        apply_desired(&mut rec, Desired::Started);
        assert!(rec.failure.is_none());
        assert_eq!(rec.boot_attempts, 0);
        apply_desired(&mut rec, Desired::Destroyed);
        rec.failure = Some("y".into());
        apply_desired(&mut rec, Desired::Started);
        assert_eq!(rec.failure.as_deref(), Some("y"));
    }

    #[test]
    fn every_state_and_desired_state_has_a_decision() {
        // Exhaustive sweep: every mark pattern along the create order (prefix of Done,
        // then the next Begun), every desired state, every observation. The decision must
        // never acquire while the target is not `started`, never release while it is
        // (except the dead-VMM and stale-VMM cases), and always name a step that makes
        // progress.
        for desired in [
            Desired::Started,
            Desired::Prepared,
            Desired::Stopped,
            Desired::Destroyed,
        ] {
            for done in 0..=CREATE_ORDER.len() {
                for begun in [false, true] {
                    let mut marks: Vec<(Step, Mark)> = CREATE_ORDER[..done]
                        .iter()
                        .map(|s| (*s, Mark::Done))
                        .collect();
                    if begun && done < CREATE_ORDER.len() {
                        marks.push((CREATE_ORDER[done], Mark::Begun));
                    }
                    for seen in [NONE, RUNNING, GONE] {
                        let rec = record(desired, &marks);
                        let got = decide(&rec, &seen, &POLICY);
                        match (&got.next, desired) {
                            (Next::Acquire(step), Desired::Started) => {
                                assert_ne!(rec.mark(*step), Mark::Done)
                            }
                            (Next::Acquire(step), Desired::Prepared) => {
                                assert_ne!(rec.mark(*step), Mark::Done);
                                assert!(PREPARE_ORDER.contains(step), "{step} when prepared");
                            }
                            (Next::Acquire(_), _) => panic!("acquire towards {desired:?}"),
                            (Next::Release(step), _) => assert!(rec.touched(*step)),
                            (Next::VmmLost, Desired::Started | Desired::Prepared) => {
                                assert!(rec.touched(Step::Vmm))
                            }
                            (Next::VmmLost, _) => panic!("VmmLost towards {desired:?}"),
                            (Next::Lost(step), _) => panic!("{step} reported lost though present"),
                            (Next::GiveUp(_), Desired::Prepared) => {
                                // Only a prepared guest that died after it was idle.
                                assert_eq!(rec.mark(Step::Ready), Mark::Done);
                                assert_eq!(seen, GONE);
                            }
                            (Next::GiveUp(_), _) => panic!("no failures were recorded"),
                            (Next::Settle, Desired::Started) => {
                                assert_eq!(got.state, MachineState::Started)
                            }
                            (Next::Settle, Desired::Prepared) => {
                                assert_eq!(got.state, MachineState::Prepared);
                                assert!(!rec.touched(Step::Publish));
                            }
                            (Next::Settle, Desired::Stopped) => {
                                assert!(STOP_RELEASES.iter().all(|s| !rec.touched(*s)))
                            }
                            (Next::Settle, Desired::Destroyed) => assert!(rec.nothing_touched()),
                            (Next::Wait(_), _) => panic!("no crash was recorded"),
                        }
                    }
                }
            }
        }
    }
}
