//! PoolManager: the singleton that keeps every prepared-capacity pool at its target.
//!
//! A prepared machine is an ordinary machine record with its own MachineActor, wanted
//! `Prepared` and owned by its pool (`MachineRecord::pooled`): its run does every create
//! step but `publish`, waits for the guest init to report idle, and pauses the VMM. The
//! manager only decides which records exist: it never touches the host. On every tick
//! (and after each claim) it reads the pool's records and
//! - gives up on prepared machines that failed (their run has released everything) and
//!   on those past `max_age_secs`, or built from an image the pool's tag no longer names,
//!   or beyond the pool's size, or of a pool no longer configured: each is destroyed
//!   through its own run (`desired = destroyed`);
//! - records new prepared machines while the pool is short, at most
//!   `pool_refill_parallel` being built at once over every pool, and wakes their runs.
//!
//! A claim is not the manager's: the API claims in one store commit
//! (`Store::claim_prepared`) and only tells the manager, for its counters and to refill.
//! So a crash of the manager never holds up a claim, and a claim never waits on a
//! refill. The counters (claims, misses, last refill, last error) live in memory and
//! start again at zero with the daemon.

use std::collections::HashMap;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::names;
use super::services::Services;
use super::supervisor::SupervisorMsg;
use crate::config::PoolConfig;
use crate::machine::claim;
use crate::machine::decide::apply_desired;
use crate::machine::record::{Desired, MachineRecord, MachineState};
use crate::machine::spec::new_machine_id;

/// How often the pools are looked at without being asked.
const TICK: Duration = Duration::from_millis(500);
/// The longest pause after a failed refill before the next try.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Requests to the manager.
pub enum PoolMsg {
    /// Look at every pool (periodic, and after a claim or a miss).
    Tick,
    /// A create claimed a prepared machine from `pool`.
    Claimed(String),
    /// A create matched `pool` but found nothing ready (it went cold).
    Missed(String),
    /// Every pool's status.
    Status(RpcReplyPort<Vec<PoolStatus>>),
}

/// One pool, as the node reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// The pool's config.
    pub name: String,
    /// Its image reference.
    pub image: String,
    /// Its target.
    pub size: u32,
    /// Prepared machines ready to be claimed.
    pub ready: u32,
    /// Prepared machines being built.
    pub refilling: u32,
    /// Claims served since start.
    pub claims: u64,
    /// Creates that matched and went cold.
    pub misses: u64,
    /// When a prepared machine last became ready (ms since the epoch); 0: never.
    pub last_refill_ms: u64,
    /// The last refill error, if the last refill failed.
    pub last_error: Option<String>,
}

/// What the manager remembers of one pool between ticks.
#[derive(Debug, Default)]
struct PoolMemory {
    claims: u64,
    misses: u64,
    last_refill_ms: u64,
    last_error: Option<String>,
    /// When `last_error` was noted (ms since the epoch).
    error_at_ms: u64,
    /// Consecutive failed refills, for the backoff.
    failures: u32,
    /// No new machine is recorded before this (ms since the epoch).
    paused_until_ms: u64,
}

impl PoolMemory {
    /// A refill failed: remember why, and pause the pool's refills (1 s doubling to a
    /// minute with every failure in a row).
    fn note_error(&mut self, error: String, now_ms: u64) {
        self.failures += 1;
        self.paused_until_ms = now_ms + backoff(self.failures).as_millis() as u64;
        self.last_error = Some(error);
        self.error_at_ms = now_ms;
    }
}

/// The manager's state.
pub struct PoolState {
    services: Services,
    pools: HashMap<String, PoolMemory>,
}

/// The PoolManager actor.
pub struct PoolManager;

/// Where one pool's records stand.
#[derive(Debug, Default)]
struct Census {
    /// Settled `prepared`, oldest first.
    ready: Vec<MachineRecord>,
    /// Being built, newest first.
    building: Vec<MachineRecord>,
    /// Failed (their run released, or is releasing, everything).
    failed: Vec<MachineRecord>,
}

fn census(records: &[MachineRecord], pool: &str) -> Census {
    let mut out = Census::default();
    for rec in records {
        if rec.pool_owner() != Some(pool) || rec.desired != Desired::Prepared {
            continue;
        }
        if rec.failure.is_some() {
            out.failed.push(rec.clone());
        } else if rec.state == MachineState::Prepared && rec.current.is_none() {
            out.ready.push(rec.clone());
        } else {
            out.building.push(rec.clone());
        }
    }
    out.ready.sort_by_key(|r| r.created_at_ms);
    out.building
        .sort_by_key(|r| std::cmp::Reverse(r.created_at_ms));
    out
}

impl PoolState {
    fn memory(&mut self, pool: &str) -> &mut PoolMemory {
        self.pools.entry(pool.to_string()).or_default()
    }

    /// Asks the machine's run to destroy it (it releases everything through its steps).
    fn retire(&self, rec: &MachineRecord, why: &str) {
        let now = super::machine::now_ms();
        let retired = self.services.store().update_machine(&rec.id, |r| {
            if r.desired == Desired::Destroyed || r.claimed() {
                return Ok(Vec::new());
            }
            apply_desired(r, Desired::Destroyed);
            r.updated_at_ms = now;
            Ok(vec![format!("retired by its pool: {why}")])
        });
        match retired {
            Ok((_, events)) => {
                events.into_iter().for_each(|e| self.services.emit(e));
                wake(&rec.id);
            }
            Err(e) => {
                tracing::warn!(machine = %rec.id, error = %e, "could not retire a prepared machine")
            }
        }
    }

    /// One pass over every pool and every record a pool owns.
    fn reconcile(&mut self) -> Result<(), ActorProcessingErr> {
        let records = self.services.store().machines()?;
        let now = super::machine::now_ms();
        let services = self.services.clone();
        let config = services.config();
        // Machines of pools that are no longer configured go.
        for rec in &records {
            if let Some(pool) = rec.pool_owner()
                && config.pool(pool).is_none()
                && rec.desired == Desired::Prepared
            {
                self.retire(rec, "the pool is no longer configured");
            }
        }
        let censuses: Vec<Census> = config
            .pools
            .iter()
            .map(|p| census(&records, &p.name))
            .collect();
        let mut building_total: u32 = censuses.iter().map(|c| c.building.len() as u32).sum();
        for (pool, seen) in config.pools.iter().zip(censuses) {
            // A record whose run never began (the manager crashed between recording it and
            // waking it) is woken; a run that began moves it out of `created` itself.
            for rec in seen
                .building
                .iter()
                .filter(|r| r.state == MachineState::Created)
            {
                wake(&rec.id);
            }
            for rec in &seen.failed {
                let why = rec.failure.clone().unwrap_or_default();
                self.memory(&pool.name).note_error(why.clone(), now);
                self.retire(rec, &format!("it failed: {why}"));
            }
            // The newest base the pool's image resolved to; older ones are recycled.
            let newest_base = seen
                .ready
                .iter()
                .chain(seen.building.iter())
                .filter(|r| r.resources.base_digest.is_some())
                .max_by_key(|r| r.created_at_ms)
                .and_then(|r| r.resources.base_digest.clone());
            let mut keep = Vec::new();
            for rec in seen.ready {
                // Age counts from when it became ready (its last commit): how long its
                // guest has sat idle.
                let too_old = pool.max_age_secs > 0
                    && now.saturating_sub(rec.updated_at_ms) > pool.max_age_secs * 1000;
                let stale = newest_base.is_some() && rec.resources.base_digest != newest_base;
                if too_old {
                    self.retire(&rec, "idle longer than max_age_secs");
                } else if stale {
                    self.retire(&rec, "its image tag now names another manifest");
                } else {
                    keep.push(rec);
                }
            }
            // A machine that became ready after the last error means refills work again.
            if let Some(newest) = keep.iter().map(|r| r.updated_at_ms).max() {
                let memory = self.memory(&pool.name);
                memory.last_refill_ms = memory.last_refill_ms.max(newest);
                if newest > memory.error_at_ms {
                    memory.failures = 0;
                    memory.last_error = None;
                }
            }
            // Over the target (the pool shrank): the ones still booting go first.
            let mut have = keep.len() + seen.building.len();
            let target = pool.size as usize;
            for rec in seen.building.iter().chain(keep.iter().rev()) {
                if have <= target {
                    break;
                }
                self.retire(rec, "the pool is over its size");
                have -= 1;
            }
            // Under the target: record new ones, within the refill parallelism.
            let paused = self.memory(&pool.name).paused_until_ms > now;
            while have < target && !paused && building_total < config.pool_refill_parallel {
                match self.prepare_one(pool, now) {
                    Ok(()) => {
                        have += 1;
                        building_total += 1;
                    }
                    Err(e) => {
                        self.memory(&pool.name).note_error(e, now);
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Records one new prepared machine for `pool` and wakes its run.
    fn prepare_one(&self, pool: &PoolConfig, now: u64) -> Result<(), String> {
        let id = new_machine_id().map_err(|e| format!("no randomness: {e}"))?;
        let mut rec = claim::new_prepared(id, &pool.shape(), now);
        rec.disk_layout = self.services.config().images.disk_layout;
        let (rec, event) = self
            .services
            .store()
            .create_prepared(rec, self.services.room())
            .map_err(|e| e.to_string())?;
        crate::failpoints::hit("pools.refill.after_commit");
        self.services.emit(event);
        wake(&rec.id);
        Ok(())
    }

    fn status(&mut self) -> Vec<PoolStatus> {
        let records = self.services.store().machines().unwrap_or_default();
        let pools = self.services.config().pools.clone();
        pools
            .iter()
            .map(|pool| {
                let seen = census(&records, &pool.name);
                let memory = self.memory(&pool.name);
                PoolStatus {
                    name: pool.name.clone(),
                    image: pool.image.clone(),
                    size: pool.size,
                    ready: seen.ready.len() as u32,
                    refilling: seen.building.len() as u32,
                    claims: memory.claims,
                    misses: memory.misses,
                    last_refill_ms: memory.last_refill_ms,
                    last_error: memory.last_error.clone(),
                }
            })
            .collect()
    }
}

/// Pause after `failures` failed refills in a row: 1 s doubling to a minute.
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    Duration::from_secs(1u64 << exp).min(MAX_BACKOFF)
}

/// Wakes a machine's run through the Supervisor (found by name, so a restarted one is
/// found too).
fn wake(id: &str) {
    if let Some(supervisor) = ractor::registry::where_is(names::SUPERVISOR) {
        let supervisor: ActorRef<SupervisorMsg> = supervisor.into();
        let _ = supervisor.cast(SupervisorMsg::Wake(id.to_string()));
    }
}

impl Actor for PoolManager {
    type Msg = PoolMsg;
    type State = PoolState;
    type Arguments = Services;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        services: Services,
    ) -> Result<PoolState, ActorProcessingErr> {
        if services.config().pools.is_empty() {
            // Once, for the machines of pools removed from the config.
            myself.cast(PoolMsg::Tick)?;
        } else {
            myself.send_interval(TICK, || PoolMsg::Tick);
        }
        Ok(PoolState {
            services,
            pools: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut PoolState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PoolMsg::Tick => state.reconcile()?,
            PoolMsg::Claimed(pool) => {
                state.memory(&pool).claims += 1;
                state.reconcile()?;
            }
            PoolMsg::Missed(pool) => state.memory(&pool).misses += 1,
            PoolMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
        }
        Ok(())
    }
}
