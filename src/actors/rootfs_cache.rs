//! RootfsCache: the singleton that owns the image bases under `<data>/images`.
//!
//! Building a base is slow (an unpack and a `mkfs.ext4`), so concurrent machines asking
//! for one image share one build: the first request starts it, later ones wait for the
//! same answer (single flight). Builds and clones run on blocking threads; the actor only
//! keeps the bookkeeping, so it stays responsive while a build runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::image::{Base, BaseStore, ImageRef};

/// Requests to the cache.
pub enum RootfsMsg {
    /// The base for an image, built once however many ask at the same time.
    EnsureBase {
        /// The image.
        image: ImageRef,
        /// The base, or why it could not be built.
        reply: RpcReplyPort<Result<Base, String>>,
    },
    /// A build finished (sent by the build task to the actor).
    Built {
        /// The image's key in the in-flight table.
        key: String,
        /// The outcome.
        result: Result<Base, String>,
    },
    /// Counters, for tests and metrics.
    Stats {
        /// The answer.
        reply: RpcReplyPort<RootfsStats>,
    },
}

/// What the cache has done since start.
#[derive(Debug, Clone, Copy, Default)]
pub struct RootfsStats {
    /// Base builds started (cache hits inside `ensure_base` included).
    pub builds: u64,
    /// Requests answered by joining a build in flight.
    pub joined: u64,
}

/// The cache's state.
pub struct RootfsState {
    bases: Arc<BaseStore>,
    in_flight: HashMap<String, Vec<RpcReplyPort<Result<Base, String>>>>,
    stats: RootfsStats,
}

/// The rootfs cache actor.
pub struct RootfsCache;

impl Actor for RootfsCache {
    type Msg = RootfsMsg;
    type State = RootfsState;
    type Arguments = Arc<BaseStore>;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        bases: Arc<BaseStore>,
    ) -> Result<RootfsState, ActorProcessingErr> {
        Ok(RootfsState {
            bases,
            in_flight: HashMap::new(),
            stats: RootfsStats::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut RootfsState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RootfsMsg::EnsureBase { image, reply } => {
                let key = format!("{image:?}");
                if let Some(waiters) = state.in_flight.get_mut(&key) {
                    waiters.push(reply);
                    state.stats.joined += 1;
                    return Ok(());
                }
                state.in_flight.insert(key.clone(), vec![reply]);
                state.stats.builds += 1;
                let bases = state.bases.clone();
                tokio::spawn(async move {
                    let result = tokio::task::spawn_blocking(move || bases.ensure_base(&image))
                        .await
                        .map_err(|e| format!("base build task: {e}"))
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    let _ = myself.cast(RootfsMsg::Built { key, result });
                });
            }
            RootfsMsg::Built { key, result } => {
                for waiter in state.in_flight.remove(&key).unwrap_or_default() {
                    let _ = waiter.send(result.clone());
                }
            }
            RootfsMsg::Stats { reply } => {
                let _ = reply.send(state.stats);
            }
        }
        Ok(())
    }
}

/// Clones `base` to `dest` on a blocking thread (see `image::clone_disk`).
pub async fn clone_disk(base: PathBuf, dest: PathBuf) -> Result<(), String> {
    tokio::task::spawn_blocking(move || crate::image::clone_disk(&base, &dest, None).map(|_| ()))
        .await
        .map_err(|e| format!("clone task: {e}"))?
        .map_err(|e| e.to_string())
}

/// Removes a machine disk on a blocking thread (see `image::remove_disk`).
pub async fn remove_disk(dest: PathBuf) -> Result<(), String> {
    tokio::task::spawn_blocking(move || crate::image::remove_disk(&dest))
        .await
        .map_err(|e| format!("remove task: {e}"))?
        .map_err(|e| e.to_string())
}
