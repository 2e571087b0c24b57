//! IpPool: the singleton that owns the `leases` table. Serialising allocations through one
//! actor keeps "lowest free slot" simple; the store makes each allocation one commit and
//! idempotent per machine, so a crash between allocating and recording loses nothing.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::services::Services;

/// Requests to the pool.
pub enum IpPoolMsg {
    /// The slot `machine` holds, allocating one if it holds none.
    Lease {
        /// The machine.
        machine: String,
        /// The slot, or why none could be had.
        reply: RpcReplyPort<Result<u32, String>>,
    },
    /// Frees whatever `machine` holds. Idempotent.
    Release {
        /// The machine.
        machine: String,
        /// Done, or why not.
        reply: RpcReplyPort<Result<(), String>>,
    },
}

/// The IP lease pool actor.
pub struct IpPool;

impl Actor for IpPool {
    type Msg = IpPoolMsg;
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
            IpPoolMsg::Lease { machine, reply } => {
                let slots = services.lease_slots();
                let result = services
                    .store()
                    .lease(&machine, slots)
                    .map_err(|e| e.to_string());
                crate::failpoints::hit("ip_pool.lease.after_commit");
                let _ = reply.send(result);
            }
            IpPoolMsg::Release { machine, reply } => {
                let result = services
                    .store()
                    .release_lease(&machine)
                    .map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
        }
        Ok(())
    }
}
