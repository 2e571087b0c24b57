//! TapAllocator: the singleton that owns the host network of every machine (namespaces,
//! veth pairs, taps, routes). Every network change goes through it, so one actor is the
//! only user of the fabric's namespace threads. It does not wait for a change to finish:
//! the fabric runs changes of one namespace in order and of different machines in
//! parallel, and a slow teardown (the kernel frees a namespace after an RCU grace period)
//! must not hold up another machine's create.

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
        let net = services.net().clone();
        match message {
            TapMsg::Ensure { plan, reply } => {
                crate::failpoints::hit("tap_allocator.ensure.before_effect");
                tokio::spawn(async move {
                    let _ = reply.send(net.ensure(&plan).await.map_err(|e| e.to_string()));
                });
            }
            TapMsg::Remove { plan, reply } => {
                tokio::spawn(async move {
                    let _ = reply.send(net.remove(&plan).await.map_err(|e| e.to_string()));
                });
            }
        }
        Ok(())
    }
}
