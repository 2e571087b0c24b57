//! MachineActor: the one run of one machine. A thin shell around
//! [`decide`](crate::machine::decide):
//!
//! ```text
//! Begin(run)  -> (a new machine; the create's commit began its first run) start the
//!                run's effects, as below, if the record is still as that commit left it;
//!                else as on Reconcile
//! Reconcile -> load record -> observe the host -> decide; nothing to do: stop here
//! advance: read the record, [apply the finished run's outcomes], observe the host (after
//!          a run, only its steps' probes and the VMM; on a Reconcile, every probe),
//!          decide, then one commit of it all plus the next move (the Begun marks of the
//!          next run / settled state / VMM lost / give up) — only if the record is still
//!          the one read (else read, observe and decide again)
//!     Acquire(step) -> the run of acquires that can begin with it (decide::run_of: up
//!                      to the first wait); every effect whose needs within the run have
//!                      finished starts at once (decide::startable), on the record as
//!                      the finished ones left it -> StepDone -> what that lets start
//!                      -> once nothing is in flight: advance
//!     Release(step) -> spawn the step's effect -> StepDone -> advance
//!     step failed (retry)   -> nothing more starts; then a Reconcile after a backoff
//!     step failed (permanent) -> the machine fails at once; its run releases everything
//!     VmmLost / GiveUp      -> advance again
//!     effect panicked       -> the run waits for its other effects, then fails as an
//!                              actor; the supervisor restarts it, and it goes on from
//!                              the record
//!     Settle                -> idle (the actor stops once the machine is destroyed)
//! ```
//!
//! A run of several acquires costs two commits, not one per step: its marks are made
//! durable together before its first effect (with its lease, when it has the lease
//! step), and its outcomes are recorded together after its last (see `decide::run_of` for
//! why that is as safe as one step at a time). The begin of a run that leaves nothing on
//! the host is lazy (`decide::lazy_begin`). A run cut short by a failure records what
//! ran, and unmarks the steps it marked that never started. Every step still crosses its
//! own fail points: before its effect, after it, and after the commit that records it.
//!
//! The host is observed outside the store's write transaction, so one machine's probes
//! (`/proc`, `stat`) never hold up another machine's commit. Observing has no effect: the
//! log keeper of a VMM adopted after a restart is started with its exit watch.
//!
//! Effects run in tasks so the actor keeps reading its mailbox: a `Reconcile` that
//! arrives while a wait (`Step::cancellable`, which runs alone) runs and finds the machine
//! no longer wanted started cancels it (its mark stays `Begun`, and the release that follows undoes
//! whatever part of it happened).
//!
//! While a VMM is recorded, a watch task waits on its pidfd and sends `Reconcile` when it
//! exits, so a VMM that dies under a running machine is noticed at once (not at the next
//! API call or daemon start): the decision then unpublishes it and starts it again.

use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::services::Services;
use crate::failpoints::{self, Boundary, Operation};
use crate::machine::decide::{self, Decision, Next, Observed};
use crate::machine::record::{Desired, MachineRecord, MachineState, StepTiming};
use crate::machine::step::{CREATE_ORDER, Direction, Mark, Step, StepSet};
use crate::machine::steps::{self, StepError, StepOutput};
use crate::store::{StoreError, Update};

/// Messages to a MachineActor.
pub enum MachineMsg {
    /// Look at the record and the host, and take the next step. Sent after every API
    /// change, after every step, at daemon start and after a supervisor restart.
    Reconcile,
    /// The create's commit began the new machine's first run (`decide::begin_new`): start
    /// its effects, unless the record has changed since.
    Begin(BegunRun),
    /// A step's effect finished.
    StepDone(StepReport),
    /// A step's effect panicked (a defect, or a fail point): the run fails as an actor
    /// does, and the supervisor restarts it from the record.
    StepPanicked {
        /// The step.
        step: Step,
        /// Its direction.
        direction: Direction,
        /// The panic's message.
        message: String,
    },
}

/// A run the create's commit began.
pub struct BegunRun {
    /// The run, from `decide::run_of`.
    pub run: Vec<Step>,
    /// The steps whose `Begun` mark its begin made.
    pub marked: StepSet,
}

/// The outcome of one step's effect.
pub struct StepReport {
    step: Step,
    direction: Direction,
    started_at_ms: u64,
    elapsed: Duration,
    result: Result<StepOutput, StepError>,
}

/// The actor's in-memory state; everything durable is in the record.
pub struct RunState {
    id: String,
    services: Services,
    /// Whether this run has looked at the host yet.
    observed: bool,
    running: Option<Running>,
    /// The watch on the recorded VMM's exit, and which process it watches.
    vmm_watch: Option<VmmWatch>,
}

struct VmmWatch {
    pid: i32,
    start_time: u64,
    task: JoinHandle<()>,
}

/// A run whose effects are under way: one release, or a run of acquires.
struct Running {
    direction: Direction,
    /// For fail point names only.
    operation: Operation,
    /// The effects in flight, each in its task.
    in_flight: Vec<(Step, JoinHandle<()>)>,
    /// The run they are part of.
    run: RunAhead,
}

/// What a run has done so far and what is left of it.
struct RunAhead {
    /// The record as the finished effects left it (their outputs applied), not yet
    /// committed; each effect is given it as it stands when the effect starts.
    rec: MachineRecord,
    /// The whole run, in create order.
    steps: Vec<Step>,
    /// The steps whose effect has started.
    started: StepSet,
    /// The steps whose effect finished well.
    finished: StepSet,
    /// Whether an effect failed: nothing more starts, and the run ends once the effects
    /// in flight have finished.
    failed: bool,
    /// The reports of the finished effects, in the order they finished.
    done: Vec<StepReport>,
    /// The steps whose `Begun` mark the run's begin made (see `decide::apply_not_run`).
    marked: StepSet,
}

impl RunAhead {
    fn new(rec: MachineRecord, steps: Vec<Step>, marked: StepSet) -> RunAhead {
        RunAhead {
            rec,
            steps,
            started: StepSet::EMPTY,
            finished: StepSet::EMPTY,
            failed: false,
            done: Vec::new(),
            marked,
        }
    }

    /// The steps whose effect never started.
    fn not_run(&self) -> Vec<Step> {
        self.steps
            .iter()
            .copied()
            .filter(|s| !self.started.contains(*s))
            .collect()
    }
}

/// How long a run that fails as an actor (a panicking effect or fail point) waits for
/// its other effects in flight before the supervisor restarts it: the restarted run's
/// releases must not race an acquire still making what they remove.
const SETTLE_PATIENCE: Duration = Duration::from_secs(60);

/// What a finished run hands to the next commit.
struct Outcome {
    /// The reports of the effects that ran, in order; the last may be a failure.
    reports: Vec<StepReport>,
    /// The steps of the run whose effect never started (after a failure).
    not_run: Vec<Step>,
    /// See [`RunAhead::marked`].
    marked: StepSet,
    /// For fail point names only.
    operation: Operation,
}

/// One `advance`: the committed record, the decision (none: a failed step pauses the
/// run), and the run it began (empty unless the decision is an acquire).
struct Advanced {
    rec: MachineRecord,
    decision: Option<Decision>,
    run: Vec<Step>,
    marked: StepSet,
}

/// The MachineActor.
pub struct MachineActor;

pub use crate::machine::now_ms;

/// Delay before retrying a step that failed `failures` times in a row.
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(7);
    Duration::from_millis(100u64 << exp).min(Duration::from_secs(10))
}

impl MachineActor {
    /// Every finished step's probe (see `steps::observe`).
    fn observe(services: &Services, rec: &MachineRecord) -> Observed {
        steps::observe(services, rec, CREATE_ORDER)
    }

    /// One commit that records a finished run's outcomes (when given) and, unless the
    /// last asks for a pause, the next move the decision picks: the `Begun` marks of the
    /// next run, the settled state, a lost VMM or giving up. Recording "run N done" and
    /// "run N+1 begun" together halves the commits again without weakening the
    /// invariant: an effect still starts only after its mark is durable.
    ///
    /// The host is observed before the write transaction, on the record as it will be
    /// after the outcome; the commit goes ahead only if the stored record is still the
    /// one that was read (an API call may have changed it meanwhile), else it is all done
    /// again on the new record.
    fn advance(
        state: &RunState,
        outcome: Option<&Outcome>,
    ) -> Result<Advanced, ActorProcessingErr> {
        let services = &state.services;
        let policy = services.policy();
        loop {
            let read = services
                .store()
                .machine(&state.id)?
                .ok_or_else(|| StoreError::NotFound(state.id.clone()))?;
            let mut rec = read.clone();
            rec.updated_at_ms = now_ms();
            let mut messages = Vec::new();
            let mut decided = None;
            let mut run = Vec::new();
            let mut marked = StepSet::EMPTY;
            let mut update = Update::default();
            // A retryable failure pauses the run (a backoff, then Reconcile); a failed
            // readiness wait is a boot attempt, decided at once, and so is a permanent
            // failure (the machine fails and its run releases everything).
            let pause = outcome
                .and_then(|o| o.reports.last())
                .is_some_and(|report| {
                    report
                        .result
                        .as_ref()
                        .is_err_and(|e| !e.is_permanent() && report.step != Step::Ready)
                });
            if let Some(outcome) = outcome {
                for report in &outcome.reports {
                    messages.push(apply_report(&mut rec, report));
                }
                decide::apply_not_run(&mut rec, &outcome.not_run, outcome.marked);
                update.free_lease = decide::frees_lease(&outcome.not_run, outcome.marked);
            }
            if !pause {
                // After a run, only its steps' probes are asked (plus the VMM's
                // liveness): the rest was looked at when the run began, and a later
                // Reconcile (a wake, a restart, a VMM's exit) looks at everything again.
                let seen = match outcome {
                    Some(o) => steps::observe(services, &rec, o.reports.iter().map(|r| r.step)),
                    None => Self::observe(services, &rec),
                };
                let decision = decide::decide(&rec, &seen, &policy);
                if let Next::Acquire(first) = decision.next {
                    run = decide::run_of(&rec, &seen, &policy, first);
                }
                let (said, began) = decide::apply_decision(&mut rec, &decision, &run);
                messages.extend(said);
                marked = began;
                update.lazy = decide::lazy_begin(&decision, &run);
                if decide::takes_lease(&run) {
                    update.lease_slots = Some(services.lease_slots());
                }
                decided = Some(decision);
            }
            let clock = Instant::now();
            let committed = services
                .store()
                .update_machine_with(&state.id, update, |stored| {
                    if *stored != read {
                        return Err(StoreError::Changed);
                    }
                    *stored = rec.clone();
                    Ok(messages.clone())
                });
            match committed {
                Ok((rec, events)) => {
                    tracing::debug!(
                        commit_ms = clock.elapsed().as_secs_f64() * 1000.0,
                        lazy = update.lazy,
                        run = ?run,
                        state = ?rec.state,
                        "run recorded"
                    );
                    for event in events {
                        services.emit(event);
                    }
                    return Ok(Advanced {
                        rec,
                        decision: decided,
                        run,
                        marked,
                    });
                }
                Err(StoreError::Changed) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Keeps one exit watch on the VMM `rec` records, and none when it records none.
    /// Idempotent: a watch on the same process is kept; a stale one is cancelled.
    fn watch_vmm(myself: &ActorRef<MachineMsg>, state: &mut RunState, rec: &MachineRecord) {
        let recorded = rec.resources.vmm.as_ref();
        let same =
            |w: &VmmWatch| recorded.is_some_and(|v| v.pid == w.pid && v.start_time == w.start_time);
        // A watch that has fired stays: one exit is one Reconcile (the record still names
        // the process until the decision forgets it, and a second watch would fire at
        // once, again and again).
        if state.vmm_watch.as_ref().is_some_and(same) {
            return;
        }
        if let Some(stale) = state.vmm_watch.take() {
            stale.task.abort();
        }
        let Some(record) = recorded else {
            return;
        };
        let process = steps::vmm::process_of(record);
        // A VMM adopted after a restart gets its log keeper back (idempotent; the keeper
        // ends by itself with a VMM that is gone).
        state.services.keep_logs(&rec.id, &process);
        let services = state.services.clone();
        let me = myself.clone();
        let task = tokio::spawn(async move {
            services.vmm().exited(&process).await;
            let _ = me.cast(MachineMsg::Reconcile);
        });
        state.vmm_watch = Some(VmmWatch {
            pid: record.pid,
            start_time: record.start_time,
            task,
        });
    }

    /// Advances the run until it starts a step's effect, settles, or pauses.
    fn drive(
        myself: &ActorRef<MachineMsg>,
        state: &mut RunState,
        mut outcome: Option<Outcome>,
    ) -> Result<(), ActorProcessingErr> {
        loop {
            let Advanced {
                rec,
                decision,
                run,
                marked,
            } = Self::advance(state, outcome.as_ref())?;
            Self::watch_vmm(myself, state, &rec);
            if let Some(outcome) = &outcome {
                for report in &outcome.reports {
                    failpoints::hit_step(outcome.operation, report.step, Boundary::AfterCommit);
                }
            }
            let Some(decision) = decision else {
                // A failed step: try again after a backoff.
                myself.send_after(backoff(rec.step_failures), || MachineMsg::Reconcile);
                return Ok(());
            };
            outcome = None;
            match decision.next {
                Next::Settle => {
                    if decision.state == MachineState::Destroyed {
                        myself.stop(None);
                    }
                    return Ok(());
                }
                Next::VmmLost | Next::Lost(_) | Next::GiveUp(_) => continue,
                Next::Wait(until_ms) => {
                    tracing::debug!(until_ms, "waiting before a restart");
                    Self::wake_at(myself, until_ms);
                    return Ok(());
                }
                Next::Acquire(_) => {
                    let operation = Operation::of(&rec, Direction::Acquire);
                    state.running = Some(Running {
                        direction: Direction::Acquire,
                        operation,
                        in_flight: Vec::new(),
                        run: RunAhead::new(rec, run, marked),
                    });
                    return Self::start_what_can(myself, state);
                }
                Next::Release(step) => {
                    let operation = Operation::of(&rec, Direction::Release);
                    state.running = Some(Running {
                        direction: Direction::Release,
                        operation,
                        in_flight: Vec::new(),
                        run: RunAhead::new(rec, vec![step], StepSet::EMPTY),
                    });
                    return Self::start_what_can(myself, state);
                }
            }
        }
    }

    async fn reconcile(
        myself: &ActorRef<MachineMsg>,
        state: &mut RunState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(rec) = state.services.store().machine(&state.id)? else {
            myself.stop(None);
            return Ok(());
        };
        Self::watch_vmm(myself, state, &rec);
        if let Some(running) = &state.running {
            // A step is in flight. A wait is pointless once the machine is no longer
            // wanted started: cancel it and decide again. Anything else (a release, an
            // acquire changing the host) finishes first; see `Step::cancellable`.
            let wanted = matches!(rec.desired, Desired::Started | Desired::Prepared)
                && rec.failure.is_none();
            // A wait only leads a run (`decide::run_of`) and starts alone
            // (`decide::startable`): while it is in flight nothing else of the run started.
            let lone_wait = match running.in_flight.as_slice() {
                [(step, _)] => step.cancellable() && running.run.done.is_empty(),
                _ => false,
            };
            if running.direction == Direction::Acquire && lone_wait && !wanted {
                let Some(Running { in_flight, run, .. }) = state.running.take() else {
                    return Ok(());
                };
                let mut step = Step::Image;
                for (waiting, task) in in_flight {
                    task.abort();
                    step = waiting;
                }
                let (not_run, marked) = (run.not_run(), run.marked);
                let update = Update {
                    free_lease: decide::frees_lease(&not_run, marked),
                    ..Update::default()
                };
                let (_, events) =
                    state
                        .services
                        .store()
                        .update_machine_with(&state.id, update, |rec| {
                            rec.current = None;
                            decide::apply_not_run(rec, &not_run, marked);
                            Ok(Some(format!(
                                "{step} cancelled: the machine is no longer wanted started"
                            )))
                        })?;
                events
                    .into_iter()
                    .for_each(|event| state.services.emit(event));
            } else {
                return Ok(());
            }
        }
        // Nothing to write when the machine is settled where it should be.
        let seen = Self::observe(&state.services, &rec);
        if !state.observed {
            state.observed = true;
            state.services.note_run_observed();
        }
        let decision = decide::decide(&rec, &seen, &state.services.policy());
        if rec.state == decision.state && rec.current.is_none() {
            match decision.next {
                Next::Settle => {
                    if decision.state == MachineState::Destroyed {
                        myself.stop(None);
                    }
                    return Ok(());
                }
                Next::Wait(until_ms) => {
                    Self::wake_at(myself, until_ms);
                    return Ok(());
                }
                _ => {}
            }
        }
        Self::drive(myself, state, None)
    }

    /// Starts the effects of the run the create's commit began, when the record is still
    /// as that commit left it (the run's first step in flight, each of its steps `Begun`,
    /// the machine wanted started); else it reconciles as after any change. Only the
    /// create's own wake brings this: after a crash between that commit and this, the
    /// restarted run finds `Begun` marks and undoes them like any run cut short.
    async fn begin(
        myself: &ActorRef<MachineMsg>,
        state: &mut RunState,
        begun: BegunRun,
    ) -> Result<(), ActorProcessingErr> {
        let rec = state.services.store().machine(&state.id)?;
        let as_begun = rec.as_ref().is_some_and(|rec| {
            state.running.is_none()
                && rec.desired == Desired::Started
                && rec.failure.is_none()
                && rec.current == begun.run.first().map(|s| (*s, Direction::Acquire))
                && begun.run.iter().all(|s| rec.mark(*s) == Mark::Begun)
        });
        let Some(rec) = rec.filter(|_| as_begun) else {
            return Self::reconcile(myself, state).await;
        };
        // A record that never touched the host has nothing to look at.
        if !state.observed {
            state.observed = true;
            state.services.note_run_observed();
        }
        let operation = Operation::of(&rec, Direction::Acquire);
        state.running = Some(Running {
            direction: Direction::Acquire,
            operation,
            in_flight: Vec::new(),
            run: RunAhead::new(rec, begun.run, begun.marked),
        });
        Self::start_what_can(myself, state)
    }

    /// A Reconcile at `until_ms` (the decision waits until then). A Reconcile that comes
    /// earlier decides again and finds the same wait, so extra wake-ups are harmless.
    fn wake_at(myself: &ActorRef<MachineMsg>, until_ms: u64) {
        let delay = Duration::from_millis(until_ms.saturating_sub(now_ms()));
        myself.send_after(delay, || MachineMsg::Reconcile);
    }

    /// Starts every effect of the running run that may start now (`decide::startable`;
    /// nothing once one failed). When none is in flight and none can start, the run is
    /// over: its outcomes go to the next commit.
    fn start_what_can(
        myself: &ActorRef<MachineMsg>,
        state: &mut RunState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(running) = state.running.as_mut() else {
            return Ok(());
        };
        if !running.run.failed {
            let run = &running.run;
            let next = match running.direction {
                Direction::Acquire => decide::startable(&run.steps, run.started, run.finished),
                Direction::Release => run.not_run(),
            };
            for step in next {
                Self::spawn_effect(myself, &state.services, running, step);
            }
        }
        if !running.in_flight.is_empty() {
            return Ok(());
        }
        let Some(running) = state.running.take() else {
            return Ok(());
        };
        let outcome = Outcome {
            not_run: running.run.not_run(),
            reports: running.run.done,
            marked: running.run.marked,
            operation: running.operation,
        };
        Self::drive(myself, state, Some(outcome))
    }

    /// Starts `step`'s effect in a task, on the record as the run so far left it
    /// (`running.run.rec`).
    fn spawn_effect(
        myself: &ActorRef<MachineMsg>,
        services: &Services,
        running: &mut Running,
        step: Step,
    ) {
        let (direction, operation) = (running.direction, running.operation);
        failpoints::hit_step(operation, step, Boundary::BeforeEffect);
        let services = services.clone();
        let me = myself.clone();
        let rec = running.run.rec.clone();
        // Every line the effect logs names the machine and the step (the `log.format`
        // either way).
        let span = tracing::info_span!(
            "step",
            machine = %rec.id,
            step = step.name(),
            direction = direction.name()
        );
        let task = tokio::spawn(async move {
            let started_at_ms = now_ms();
            let clock = Instant::now();
            let ran = async {
                let ran = AssertUnwindSafe(steps::run(step, direction, &services, &rec))
                    .catch_unwind()
                    .await;
                let result = match ran {
                    Ok(result) => result,
                    Err(payload) => return Err(panic_message(payload.as_ref())),
                };
                let took_ms = clock.elapsed().as_secs_f64() * 1000.0;
                match &result {
                    Ok(_) => tracing::info!(took_ms, "step done"),
                    Err(e) => tracing::warn!(
                        took_ms,
                        permanent = e.is_permanent(),
                        error = %e,
                        "step failed"
                    ),
                }
                Ok(result)
            }
            .instrument(span)
            .await;
            let result = match ran {
                Ok(result) => result,
                Err(message) => {
                    let _ = me.cast(MachineMsg::StepPanicked {
                        step,
                        direction,
                        message,
                    });
                    return;
                }
            };
            let took = clock.elapsed();
            crate::metrics::step_finished(
                step,
                direction,
                took,
                result.as_ref().err().map(StepError::is_permanent),
            );
            let report = StepReport {
                step,
                direction,
                started_at_ms,
                elapsed: clock.elapsed(),
                result,
            };
            let _ = me.cast(MachineMsg::StepDone(report));
        });
        running.run.started.insert(step);
        running.in_flight.push((step, task));
    }

    /// A step's effect finished: its outcome joins the run's (its output applied to the
    /// record the next effects are given), and whatever it held back starts; once
    /// nothing is in flight, the run's outcomes are committed.
    fn finish(
        myself: &ActorRef<MachineMsg>,
        state: &mut RunState,
        report: StepReport,
    ) -> Result<(), ActorProcessingErr> {
        let Some(running) = state.running.as_mut() else {
            return Ok(());
        };
        let Some(at) = running
            .in_flight
            .iter()
            .position(|(step, _)| *step == report.step)
            .filter(|_| running.direction == report.direction)
        else {
            // The step was cancelled; its late report changes nothing.
            return Ok(());
        };
        running.in_flight.remove(at);
        failpoints::hit_step(running.operation, report.step, Boundary::AfterEffect);
        match &report.result {
            Ok(output) => {
                steps::apply_output(&mut running.run.rec, output);
                running.run.finished.insert(report.step);
            }
            Err(_) => running.run.failed = true,
        }
        running.run.done.push(report);
        Self::start_what_can(myself, state)
    }

    /// After the run failed as an actor: the effects still in flight are waited for
    /// (a wait is abandoned), so the restarted run's releases never race an acquire that
    /// is still making what they remove.
    async fn settle_in_flight(state: &mut RunState) {
        let Some(running) = state.running.take() else {
            return;
        };
        for (step, mut task) in running.in_flight {
            if step.cancellable() {
                task.abort();
                continue;
            }
            if tokio::time::timeout(SETTLE_PATIENCE, &mut task)
                .await
                .is_err()
            {
                tracing::warn!(%step, "an effect still runs after the run failed; left to finish");
                task.abort();
            }
        }
    }
}

/// What a panic said, cut to a line's length (it is our own code's message, or a fail
/// point's).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string());
    let cut: String = text.chars().take(200).collect();
    format!("the effect panicked: {cut}")
}

/// Records a step's outcome: its output, its mark, its timing. Returns the event message.
fn apply_report(rec: &mut MachineRecord, report: &StepReport) -> String {
    let StepReport {
        step,
        direction,
        started_at_ms,
        elapsed,
        result,
    } = report;
    if let Ok(output) = result {
        steps::apply_output(rec, output);
    }
    decide::apply_outcome(rec, *step, *direction, result.as_ref().err());
    rec.push_timing(StepTiming {
        step: *step,
        direction: *direction,
        started_at_ms: *started_at_ms,
        duration_us: elapsed.as_micros() as u64,
        error: result.as_ref().err().map(|e| e.to_string()),
    });
    let took = format!("{:.1} ms", elapsed.as_secs_f64() * 1000.0);
    match result {
        Ok(_) => format!("{} {step}: ok in {took}", direction.name()),
        Err(e) if e.is_permanent() => format!(
            "{} {step}: failed after {took}, permanently: {e}",
            direction.name()
        ),
        Err(e) => format!("{} {step}: failed after {took}: {e}", direction.name()),
    }
}

impl Actor for MachineActor {
    type Msg = MachineMsg;
    type State = RunState;
    type Arguments = (String, Services);

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        (id, services): (String, Services),
    ) -> Result<RunState, ActorProcessingErr> {
        Ok(RunState {
            id,
            services,
            observed: false,
            running: None,
            vmm_watch: None,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut RunState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(running) = state.running.take() {
            for (_, task) in running.in_flight {
                task.abort();
            }
        }
        if let Some(watch) = state.vmm_watch.take() {
            watch.task.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut RunState,
    ) -> Result<(), ActorProcessingErr> {
        // Every line of the run names the machine.
        let span = tracing::info_span!("machine", machine = %state.id);
        let handled = AssertUnwindSafe(
            async {
                match message {
                    MachineMsg::Reconcile => Self::reconcile(&myself, state).await,
                    MachineMsg::Begin(begun) => Self::begin(&myself, state, begun).await,
                    MachineMsg::StepDone(report) => Self::finish(&myself, state, report),
                    MachineMsg::StepPanicked {
                        step,
                        direction,
                        message,
                    } => {
                        let Some(running) = state.running.as_mut() else {
                            return Ok(());
                        };
                        let Some(at) = running
                            .in_flight
                            .iter()
                            .position(|(s, _)| *s == step)
                            .filter(|_| running.direction == direction)
                        else {
                            return Ok(());
                        };
                        running.in_flight.remove(at);
                        Err(format!("{} {step}: {message}", direction.name()).into())
                    }
                }
            }
            .instrument(span),
        )
        .catch_unwind()
        .await;
        // The run fails as an actor (the supervisor restarts it from the record): its
        // other effects finish first.
        if !matches!(handled, Ok(Ok(()))) {
            Self::settle_in_flight(state).await;
        }
        match handled {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}
