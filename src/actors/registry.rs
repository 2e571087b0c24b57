//! RegistryPublisher: the singleton that owns the `routes` table and the durable outbox.
//!
//! Publishing is one commit that writes the route (the embedded registry) and queues the
//! change; delivery to the sinks happens after, from the outbox, and an entry is dropped
//! only once every sink has it. A crash between the two leaves the entry queued, and it is
//! delivered again on restart (sinks must accept a change twice).
//!
//! It also keeps the in-memory mirror of the table (`Services::routes_view`, read by the
//! embedded DNS), changed after each commit and before the step is answered.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::services::Services;
use crate::route::Route;

/// Requests to the publisher.
pub enum RegistryMsg {
    /// Make the route reachable (idempotent).
    Publish {
        /// The route.
        route: Route,
        /// Done, or why not.
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Withdraw the machine's route (idempotent).
    Unpublish {
        /// The machine.
        machine: String,
        /// Done, or why not.
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Deliver what is queued.
    Drain,
}

/// The registry publisher actor.
pub struct RegistryPublisher;

impl RegistryPublisher {
    /// After a failed commit, the mirror is read again from the table (when the store
    /// answers at all; otherwise it keeps what it had, which the next commit corrects).
    fn reload_view(services: &Services) {
        if let Ok(routes) = services.store().routes() {
            services.routes_view().reset(routes);
        }
    }

    /// Delivers every queued change to the sinks, then drops it from the outbox. The
    /// embedded registry's sink is its watchers; the routes table itself was written in
    /// the publishing commit.
    fn drain(services: &Services) -> Result<(), ActorProcessingErr> {
        let queued = services.store().outbox()?;
        let Some(last) = queued.last().map(|(seq, _)| *seq) else {
            return Ok(());
        };
        for (_, change) in queued {
            services.emit_route(change);
        }
        services.store().ack_outbox(last)?;
        Ok(())
    }
}

impl Actor for RegistryPublisher {
    type Msg = RegistryMsg;
    type State = Services;
    type Arguments = Services;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        services: Services,
    ) -> Result<Services, ActorProcessingErr> {
        // The in-memory mirror starts as the table is (also after a restart of this
        // actor); whatever a previous run queued but did not deliver goes out first.
        services.routes_view().reset(services.store().routes()?);
        let _ = myself.cast(RegistryMsg::Drain);
        Ok(services)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        message: Self::Msg,
        services: &mut Services,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RegistryMsg::Publish { route, reply } => {
                let result = services.store().publish_route(&route).map(|_| ());
                match &result {
                    Ok(()) => services.routes_view().insert(route),
                    Err(_) => Self::reload_view(services),
                }
                crate::failpoints::hit("registry.publish.after_commit");
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            RegistryMsg::Unpublish { machine, reply } => {
                let result = services.store().unpublish_route(&machine).map(|_| ());
                match &result {
                    Ok(()) => services.routes_view().remove(&machine),
                    Err(_) => Self::reload_view(services),
                }
                crate::failpoints::hit("registry.unpublish.after_commit");
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            RegistryMsg::Drain => {}
        }
        Self::drain(services)
    }
}
