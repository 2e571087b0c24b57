//! The Supervisor: spawns the singletons and one MachineActor per machine, restarts any
//! child that fails, and hands every (re)started MachineActor the same `Reconcile`
//! message a process restart gives it. There is no second recovery path.
//!
//! Restart intensity: a child that fails more than [`MAX_RESTARTS`] times within
//! [`RESTART_WINDOW`] is not restarted at once. For a machine, the failure is recorded
//! on the machine (it goes `failed` and its run releases what it holds); a singleton is
//! restarted after a pause, since the daemon cannot work without it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::compactor::Compactor;
use super::etcd_sink::EtcdSink;
use super::machine::{BegunRun, MachineActor, MachineMsg};
use super::names;
use super::pools::PoolManager;
use super::registry::RegistryPublisher;
use super::rootfs_cache::{RootfsArgs, RootfsCache};
use super::services::Services;
use crate::image::BaseStore;
use crate::machine::record::MachineState;

/// Restarts allowed per child within [`RESTART_WINDOW`].
pub const MAX_RESTARTS: usize = 5;
/// Machine runs woken between two yields of `WakeAll`.
const WAKE_BATCH: usize = 32;

/// The window of the restart intensity limit.
pub const RESTART_WINDOW: Duration = Duration::from_secs(30);
/// Pause before a singleton over its limit is restarted again.
const SINGLETON_BACKOFF: Duration = Duration::from_secs(1);

/// Messages to the Supervisor.
pub enum SupervisorMsg {
    /// Make sure machine `id` has a running actor and tell it to reconcile. Sent by the
    /// API after every committed change, and at start for every machine.
    Wake(String),
    /// Wake new machine `id` with the run its create's commit began (its first message is
    /// [`MachineMsg::Begin`] instead of `Reconcile`).
    Begin(String, BegunRun),
    /// Load every machine from the store and wake it (once, at start).
    WakeAll,
    /// Restart a singleton (after a backoff).
    RestartSingleton(Singleton),
    /// Try a wake again that failed (the machine's previous actor was still stopping).
    RetryWake(String, u32),
}

/// Tries of a failed wake before the Supervisor gives up on it (the next API change or
/// daemon start wakes the machine again).
const WAKE_TRIES: u32 = 5;
/// Pause between them.
const WAKE_RETRY: Duration = Duration::from_millis(200);

/// The singletons the Supervisor owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Singleton {
    /// Image bases.
    RootfsCache,
    /// Routes and outbox.
    Registry,
    /// Prepared-capacity pools.
    Pools,
    /// Forgets destroyed machines past their retention.
    Compactor,
    /// Writes the routes to etcd.
    EtcdSink,
}

impl Singleton {
    const ALL: [Singleton; 5] = [
        Singleton::RootfsCache,
        Singleton::Registry,
        Singleton::Pools,
        Singleton::Compactor,
        Singleton::EtcdSink,
    ];

    fn name(self) -> &'static str {
        match self {
            Singleton::RootfsCache => names::ROOTFS_CACHE,
            Singleton::Registry => names::REGISTRY,
            Singleton::Pools => names::POOLS,
            Singleton::Compactor => names::COMPACTOR,
            Singleton::EtcdSink => names::ETCD_SINK,
        }
    }

    fn from_name(name: &str) -> Option<Singleton> {
        Singleton::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// Arguments of the Supervisor.
pub struct SupervisorArgs {
    /// Shared services.
    pub services: Services,
    /// The image bases (owned by the RootfsCache).
    pub bases: Arc<BaseStore>,
}

/// The Supervisor's state.
pub struct SupervisorState {
    services: Services,
    bases: Arc<BaseStore>,
    machines: HashMap<String, ActorRef<MachineMsg>>,
    restarts: HashMap<String, VecDeque<Instant>>,
}

/// The Supervisor actor.
pub struct Supervisor;

impl Supervisor {
    async fn spawn_singleton(
        myself: &ActorRef<SupervisorMsg>,
        state: &SupervisorState,
        which: Singleton,
    ) -> Result<(), ActorProcessingErr> {
        let name = Some(which.name().to_string());
        let cell = myself.get_cell();
        let services = state.services.clone();
        match which {
            Singleton::RootfsCache => {
                let config = services.config();
                let args = Arc::new(RootfsArgs {
                    bases: state.bases.clone(),
                    registry: config.images.registry_settings(),
                    blob_dir: config.layout().blobs(),
                    max_image_bytes: config.images.max_image_mib << 20,
                    policy: config.images.collect_policy(),
                    collect_every: config.images.collect_every(),
                    services: services.clone(),
                });
                RootfsCache::spawn_linked(name, RootfsCache, args, cell).await?;
            }
            Singleton::Registry => {
                RegistryPublisher::spawn_linked(name, RegistryPublisher, services, cell).await?;
            }
            Singleton::Pools => {
                PoolManager::spawn_linked(name, PoolManager, services, cell).await?;
            }
            Singleton::Compactor => {
                Compactor::spawn_linked(name, Compactor, services, cell).await?;
            }
            Singleton::EtcdSink => {
                EtcdSink::spawn_linked(name, EtcdSink, services, cell).await?;
            }
        }
        Ok(())
    }

    async fn wake(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        id: String,
    ) -> Result<(), ActorProcessingErr> {
        Self::wake_with(myself, state, id, MachineMsg::Reconcile).await
    }

    /// Makes sure machine `id` has a running actor, and sends it `first`.
    async fn wake_with(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        id: String,
        first: MachineMsg,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(actor) = state.machines.get(&id) {
            if actor.cast(MachineMsg::Reconcile).is_ok() {
                return Ok(());
            }
            state.machines.remove(&id);
        }
        let name = format!("{}{id}", names::MACHINE_PREFIX);
        let (actor, _) = MachineActor::spawn_linked(
            Some(name),
            MachineActor,
            (id.clone(), state.services.clone()),
            myself.get_cell(),
        )
        .await?;
        actor.cast(first)?;
        state.machines.insert(id, actor);
        Ok(())
    }

    /// Wakes a machine; a failure (its previous actor still holds the name while it stops)
    /// is tried again shortly, a bounded number of times. The Supervisor itself never
    /// fails because of one machine.
    async fn wake_or_retry(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        id: String,
        attempt: u32,
    ) {
        if let Err(e) = Self::wake(myself, state, id.clone()).await {
            if attempt < WAKE_TRIES {
                tracing::debug!(machine = %id, error = %e, attempt, "wake failed; trying again");
                myself.send_after(WAKE_RETRY, move || {
                    SupervisorMsg::RetryWake(id, attempt + 1)
                });
            } else {
                tracing::error!(machine = %id, error = %e, "machine run could not be started");
            }
        }
    }

    /// Counts a restart of `key`; false when it is over the intensity limit.
    fn within_intensity(state: &mut SupervisorState, key: &str) -> bool {
        let now = Instant::now();
        let history = state.restarts.entry(key.to_string()).or_default();
        while history
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            history.pop_front();
        }
        history.push_back(now);
        history.len() <= MAX_RESTARTS
    }

    async fn child_exited(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        cell: ActorCell,
        failure: Option<String>,
    ) -> Result<(), ActorProcessingErr> {
        let Some(name) = cell.get_name() else {
            return Ok(());
        };
        if let Some(id) = name.strip_prefix(names::MACHINE_PREFIX) {
            let id = id.to_string();
            state.machines.remove(&id);
            let Some(reason) = failure else {
                // A MachineActor stops by itself once its machine is destroyed.
                return Ok(());
            };
            tracing::warn!(machine = %id, %reason, "machine actor failed; restarting");
            crate::metrics::actor_restarted("machine");
            let now = super::machine::now_ms();
            let noted = state.services.store().update_machine(&id, |rec| {
                rec.updated_at_ms = now;
                Ok(Some(format!("run restarted after a crash: {reason}")))
            });
            if let Ok((_, events)) = noted {
                events
                    .into_iter()
                    .for_each(|event| state.services.emit(event));
            }
            if !Self::within_intensity(state, &name) {
                let why = format!(
                    "machine actor crashed {MAX_RESTARTS} times within {RESTART_WINDOW:?}: {reason}"
                );
                let now = super::machine::now_ms();
                let outcome = state.services.store().update_machine(&id, |rec| {
                    if rec.state == MachineState::Destroyed {
                        return Ok(None::<String>);
                    }
                    crate::machine::decide::apply_give_up(rec, why.clone());
                    rec.updated_at_ms = now;
                    Ok(Some(format!("failed: {why}")))
                });
                if let Ok((_, events)) = outcome {
                    events
                        .into_iter()
                        .for_each(|event| state.services.emit(event));
                }
                state.restarts.remove(&name);
            }
            Self::wake_or_retry(myself, state, id, 1).await;
            return Ok(());
        }
        if let Some(which) = Singleton::from_name(&name) {
            tracing::warn!(actor = %name, reason = ?failure, "singleton exited; restarting");
            if failure.is_some() {
                state.services.note_singleton_restart();
                crate::metrics::actor_restarted(&name);
            }
            if Self::within_intensity(state, &name) {
                myself.cast(SupervisorMsg::RestartSingleton(which))?;
            } else {
                myself.send_after(SINGLETON_BACKOFF, move || {
                    SupervisorMsg::RestartSingleton(which)
                });
            }
        }
        Ok(())
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let state = SupervisorState {
            services: args.services,
            bases: args.bases,
            machines: HashMap::new(),
            restarts: HashMap::new(),
        };
        // Every restart counter exists from the start, at zero.
        crate::metrics::restarts_known("machine");
        for which in Singleton::ALL {
            crate::metrics::restarts_known(which.name());
            Self::spawn_singleton(&myself, &state, which).await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Wake(id) => Self::wake_or_retry(&myself, state, id, 1).await,
            SupervisorMsg::Begin(id, begun) => {
                // A failed wake is tried again as a plain wake (the run then finds its
                // marks and undoes them before it begins again).
                if Self::wake_with(&myself, state, id.clone(), MachineMsg::Begin(begun))
                    .await
                    .is_err()
                {
                    Self::wake_or_retry(&myself, state, id, 1).await;
                }
            }
            SupervisorMsg::RetryWake(id, attempt) => {
                Self::wake_or_retry(&myself, state, id, attempt).await
            }
            SupervisorMsg::WakeAll => {
                let mut records = state.services.store().machines()?;
                // Machines with a VMM first: they are re-adopted (and their exits watched)
                // before the records that only need a look.
                records.sort_by_key(|rec| rec.resources.vmm.is_none());
                for (i, rec) in records.into_iter().enumerate() {
                    let settled = rec.state == MachineState::Destroyed && rec.nothing_touched();
                    if !settled {
                        Self::wake_or_retry(&myself, state, rec.id, 1).await;
                    }
                    // Thousands of runs wake at once after a restart; let the API answer
                    // between batches.
                    if i % WAKE_BATCH == WAKE_BATCH - 1 {
                        tokio::task::yield_now().await;
                    }
                }
            }
            SupervisorMsg::RestartSingleton(which) => {
                if ractor::registry::where_is(which.name()).is_none()
                    && let Err(e) = Self::spawn_singleton(&myself, state, which).await
                {
                    tracing::error!(actor = which.name(), error = %e, "singleton did not start; retrying");
                    myself.send_after(SINGLETON_BACKOFF, move || {
                        SupervisorMsg::RestartSingleton(which)
                    });
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                Self::child_exited(&myself, state, cell, Some(err.to_string())).await?;
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                // A clean stop: a MachineActor whose machine is destroyed.
                Self::child_exited(&myself, state, cell, None).await?;
            }
            SupervisionEvent::ActorStarted(_) | SupervisionEvent::ProcessGroupChanged(_) => {}
        }
        Ok(())
    }
}
