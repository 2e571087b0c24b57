//! MachineActor: the one run of one machine. A thin shell around [`decide`]:
//!
//! ```text
//! Reconcile -> load record -> observe the host -> decide
//!     Acquire/Release(step) -> commit Begun -> spawn the step's effect -> StepDone
//!     StepDone -> commit outcome (+ timing, event) -> Reconcile (or after a backoff)
//!     VmmLost / GiveUp -> commit -> Reconcile
//!     Settle -> commit the settled state -> idle (stop the actor once destroyed)
//! ```
//!
//! The effect runs in a task so the actor keeps reading its mailbox: a `Reconcile` that
//! arrives while an acquire runs and finds the machine no longer wanted started cancels
//! that acquire (its mark stays `Begun`, and the release that follows undoes whatever
//! part of it happened).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use super::decide::{self, Next, Observed, VmmSeen};
use super::record::{Desired, MachineRecord, MachineState, StepTiming};
use super::step::{Direction, Step};
use super::steps::{self, StepOutput};
use crate::actors::services::Services;
use crate::vmm::Liveness;

/// Messages to a MachineActor.
pub enum MachineMsg {
    /// Look at the record and the host, and take the next step. Sent after every API
    /// change, after every step, at daemon start and after a supervisor restart.
    Reconcile,
    /// A step's effect finished.
    StepDone(StepReport),
}

/// The outcome of one step's effect.
pub struct StepReport {
    step: Step,
    direction: Direction,
    started_at_ms: u64,
    elapsed: Duration,
    result: Result<StepOutput, String>,
}

/// The actor's in-memory state; everything durable is in the record.
pub struct RunState {
    id: String,
    services: Services,
    running: Option<Running>,
}

struct Running {
    step: Step,
    direction: Direction,
    task: JoinHandle<()>,
}

/// The MachineActor.
pub struct MachineActor;

/// Wall clock in ms since the epoch (recorded for people, never used to decide).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Delay before retrying a step that failed `failures` times in a row.
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(7);
    Duration::from_millis(100u64 << exp).min(Duration::from_secs(10))
}

impl MachineActor {
    fn observe(services: &Services, rec: &MachineRecord) -> Observed {
        let vmm = match &rec.resources.vmm {
            None => VmmSeen::NotRecorded,
            Some(record) => match services.vmm().liveness(&steps::vmm::process_of(record)) {
                Liveness::Running => VmmSeen::Running,
                Liveness::Gone => VmmSeen::Gone,
            },
        };
        Observed { vmm }
    }

    fn commit<F>(state: &RunState, change: F) -> Result<MachineRecord, ActorProcessingErr>
    where
        F: FnOnce(&mut MachineRecord) -> Option<String>,
    {
        let now = now_ms();
        let (rec, event) = state.services.store().update_machine(&state.id, |rec| {
            let message = change(rec);
            rec.updated_at_ms = now;
            Ok(message)
        })?;
        if let Some(event) = event {
            state.services.emit(event);
        }
        Ok(rec)
    }

    async fn reconcile(
        myself: &ActorRef<MachineMsg>,
        state: &mut RunState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(rec) = state.services.store().machine(&state.id)? else {
            myself.stop(None);
            return Ok(());
        };
        if let Some(running) = &state.running {
            // A step is in flight. An acquire is pointless once the machine is no longer
            // wanted started: cancel it and decide again. Anything else finishes first.
            let wanted = rec.desired == Desired::Started && rec.failure.is_none();
            if running.direction == Direction::Acquire && !wanted {
                running.task.abort();
                let step = running.step;
                state.running = None;
                Self::commit(state, |rec| {
                    rec.current = None;
                    Some(format!(
                        "{step} cancelled: the machine is no longer wanted started"
                    ))
                })?;
            } else {
                return Ok(());
            }
        }
        let seen = Self::observe(&state.services, &rec);
        let decision = decide::decide(&rec, &seen, &state.services.policy());
        match decision.next {
            Next::Settle => {
                if rec.state != decision.state || rec.current.is_some() {
                    let settled = decision.state;
                    Self::commit(state, |rec| {
                        rec.state = settled;
                        rec.current = None;
                        Some(settled.name().to_string())
                    })?;
                }
                if decision.state == MachineState::Destroyed {
                    myself.stop(None);
                }
            }
            Next::VmmLost => {
                Self::commit(state, |rec| {
                    decide::apply_vmm_lost(rec);
                    rec.state = decision.state;
                    Some("the VMM is gone; it will be started again".to_string())
                })?;
                myself.cast(MachineMsg::Reconcile)?;
            }
            Next::GiveUp(reason) => {
                Self::commit(state, |rec| {
                    decide::apply_give_up(rec, reason.clone());
                    Some(format!("failed: {reason}"))
                })?;
                myself.cast(MachineMsg::Reconcile)?;
            }
            Next::Acquire(step) => {
                Self::begin(myself, state, step, Direction::Acquire, decision.state)?
            }
            Next::Release(step) => {
                Self::begin(myself, state, step, Direction::Release, decision.state)?
            }
        }
        Ok(())
    }

    fn begin(
        myself: &ActorRef<MachineMsg>,
        state: &mut RunState,
        step: Step,
        direction: Direction,
        visible: MachineState,
    ) -> Result<(), ActorProcessingErr> {
        let rec = Self::commit(state, |rec| {
            let changed = rec.state != visible;
            decide::apply_begin(rec, step, direction, visible);
            changed.then(|| visible.name().to_string())
        })?;
        let services = state.services.clone();
        let me = myself.clone();
        let task = tokio::spawn(async move {
            let started_at_ms = now_ms();
            let clock = Instant::now();
            let result = steps::run(step, direction, &services, &rec).await;
            let report = StepReport {
                step,
                direction,
                started_at_ms,
                elapsed: clock.elapsed(),
                result: result.map_err(|e| e.to_string()),
            };
            let _ = me.cast(MachineMsg::StepDone(report));
        });
        state.running = Some(Running {
            step,
            direction,
            task,
        });
        Ok(())
    }

    fn finish(
        myself: &ActorRef<MachineMsg>,
        state: &mut RunState,
        report: StepReport,
    ) -> Result<(), ActorProcessingErr> {
        let matches_running = state
            .running
            .as_ref()
            .is_some_and(|r| r.step == report.step && r.direction == report.direction);
        if !matches_running {
            // The step was cancelled; its late report changes nothing.
            return Ok(());
        }
        state.running = None;
        let StepReport {
            step,
            direction,
            started_at_ms,
            elapsed,
            result,
        } = report;
        let ok = result.is_ok();
        let error = result.as_ref().err().cloned();
        let rec = Self::commit(state, |rec| {
            if let Ok(output) = &result {
                steps::apply_output(rec, output);
            }
            decide::apply_outcome(rec, step, direction, ok);
            rec.push_timing(StepTiming {
                step,
                direction,
                started_at_ms,
                duration_us: elapsed.as_micros() as u64,
                error: error.clone(),
            });
            let took = format!("{:.1} ms", elapsed.as_secs_f64() * 1000.0);
            Some(match &error {
                None => format!("{} {step}: ok in {took}", direction.name()),
                Some(e) => format!("{} {step}: failed after {took}: {e}", direction.name()),
            })
        })?;
        if ok || step == Step::Ready {
            myself.cast(MachineMsg::Reconcile)?;
        } else {
            myself.send_after(backoff(rec.step_failures), || MachineMsg::Reconcile);
        }
        Ok(())
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
            running: None,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut RunState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(running) = state.running.take() {
            running.task.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut RunState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MachineMsg::Reconcile => Self::reconcile(&myself, state).await,
            MachineMsg::StepDone(report) => Self::finish(&myself, state, report),
        }
    }
}
