//! The actor tree: a Supervisor, one MachineActor per machine, and singleton actors, each
//! owning a shared resource it serialises (shared parts already serialised below, such
//! as the leases and the host network, have none). See `actors.md` for the tree, the
//! messages, who owns what, and the rule for a singleton.
//!
//! Singletons are found by their registered name, not by a stored reference: after the
//! Supervisor restarts one, the next call reaches the new actor.

pub mod compactor;
pub mod context;
pub mod etcd_sink;
pub mod machine;
pub mod pools;
pub mod registry;
pub mod rootfs_cache;
pub mod services;
pub mod supervisor;

use std::time::Duration;

use ractor::{ActorRef, Message, RpcReplyPort, rpc::CallResult};

/// A call to a singleton did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// No actor is registered under the name (it is being restarted).
    #[error("actor {0} is not running")]
    NotRunning(&'static str),
    /// The actor did not answer in time.
    #[error("actor {0} did not answer within {1:?}")]
    Timeout(&'static str, Duration),
    /// The actor stopped before answering.
    #[error("actor {0} stopped before answering")]
    Dropped(&'static str),
}

/// Sends a request to the singleton registered as `name` and waits for its answer.
pub async fn ask<M, R, F>(name: &'static str, build: F, timeout: Duration) -> Result<R, AskError>
where
    M: Message,
    R: Send + 'static,
    F: FnOnce(RpcReplyPort<R>) -> M,
{
    let actor: ActorRef<M> = ActorRef::where_is(name).ok_or(AskError::NotRunning(name))?;
    match actor.call(build, Some(timeout)).await {
        Ok(CallResult::Success(reply)) => Ok(reply),
        Ok(CallResult::Timeout) => Err(AskError::Timeout(name, timeout)),
        Ok(CallResult::SenderError) | Err(_) => Err(AskError::Dropped(name)),
    }
}

/// Registered names of the singletons.
pub mod names {
    /// The Supervisor.
    pub const SUPERVISOR: &str = "supervisor";
    /// The rootfs cache.
    pub const ROOTFS_CACHE: &str = "rootfs_cache";
    /// The registry publisher.
    pub const REGISTRY: &str = "registry_publisher";
    /// The prepared-capacity pool manager.
    pub const POOLS: &str = "pools";
    /// The store compactor.
    pub const COMPACTOR: &str = "compactor";
    /// The etcd sink (idle unless `etcd.endpoints` is set).
    pub const ETCD_SINK: &str = "etcd_sink";
    /// Prefix of MachineActor names; the machine id follows.
    pub const MACHINE_PREFIX: &str = "machine:";
}
