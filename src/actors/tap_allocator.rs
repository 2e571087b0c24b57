//! TapAllocator: the singleton that owns the host network of every machine (namespaces,
//! veth pairs, taps, routes). Network changes go through one actor so that two machines
//! never race on the host's routing table, and so that the dedicated setns thread of the
//! fabric has one user.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::services::Services;
use crate::net::NetPlan;

/// Requests to the allocator.
pub enum TapMsg {
    /// Make the plan true on the host (idempotent).
    Ensure {
        /// What to create.
        plan: NetPlan,
        /// Done, or why not.
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Remove whatever of the plan exists (idempotent, works on partial state).
    Remove {
        /// What to remove.
        plan: NetPlan,
        /// Done, or why not.
        reply: RpcReplyPort<Result<(), String>>,
    },
}

/// The tap allocator actor.
pub struct TapAllocator;

impl Actor for TapAllocator {
    type Msg = TapMsg;
    type State = Services;
    type Arguments = Services;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        services: Services,
    ) -> Result<Services, ActorProcessingErr> {
        Ok(services)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        message: Self::Msg,
        services: &mut Services,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TapMsg::Ensure { plan, reply } => {
                let result = services
                    .net()
                    .ensure(&plan)
                    .await
                    .map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            TapMsg::Remove { plan, reply } => {
                let result = services
                    .net()
                    .remove(&plan)
                    .await
                    .map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
        }
        Ok(())
    }
}
