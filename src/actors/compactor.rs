//! Compactor: the singleton that forgets destroyed machines once their retention is
//! over (`store.retention_secs`): their records, their events and their request ids go,
//! so the store holds what is alive plus a bounded tail of the past, and a request id may
//! be used again. It only deletes tombstones; it never touches the host (a destroyed
//! machine has nothing left there).

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::machine::now_ms;
use super::services::Services;

/// Messages to the compactor.
pub enum CompactorMsg {
    /// Compact what is due, then look again after the interval.
    Tick,
}

/// The compactor actor.
pub struct Compactor;

impl Actor for Compactor {
    type Msg = CompactorMsg;
    type State = Services;
    type Arguments = Services;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        services: Services,
    ) -> Result<Services, ActorProcessingErr> {
        myself.cast(CompactorMsg::Tick)?;
        Ok(services)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        services: &mut Services,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            CompactorMsg::Tick => {
                let store_config = &services.config().store;
                let retention_ms = store_config.retention_secs.saturating_mul(1000);
                let every = Duration::from_secs(store_config.compact_interval_secs);
                let before = now_ms().saturating_sub(retention_ms);
                let store = services.clone();
                let done =
                    tokio::task::spawn_blocking(move || store.store().compact(before)).await?;
                match done {
                    Ok(compacted) => {
                        if !compacted.machines.is_empty() {
                            tracing::info!(
                                count = compacted.machines.len(),
                                "compacted destroyed machines past their retention"
                            );
                        }
                        if compacted.more {
                            myself.cast(CompactorMsg::Tick)?;
                            return Ok(());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "compaction failed; trying again later"),
                }
                myself.send_after(every, || CompactorMsg::Tick);
            }
        }
        Ok(())
    }
}
