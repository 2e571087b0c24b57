//! RootfsCache: the singleton that owns the image bases under `<data>/images`.
//!
//! Building a base is slow (an unpack and a `mkfs.ext4`), so concurrent machines asking
//! for one image share one build: the first request starts it, later ones wait for the
//! same answer (single flight). Builds and clones run on blocking threads; the actor only
//! keeps the bookkeeping, so it stays responsive while a build runs.
//!
//! Even a cache hit costs a content hash (milliseconds for the demo's busybox). The actor
//! remembers the base it answered for an image together with the identity of the source
//! file (device, inode, size, mtime); while that identity and the base file stay, the
//! answer is given from memory. Directory images have no such cheap identity and are
//! hashed every time.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::image::oci::RegistrySettings;
use crate::image::{Base, BaseStore, ImageRef};
use crate::machine::record::ImageWorkload;

/// A base and the image's own workload settings (an OCI image's config; none for the
/// other kinds, whose defaults are built in).
#[derive(Debug, Clone)]
pub struct ImageBase {
    /// The ext4 base.
    pub base: Base,
    /// The image's settings.
    pub workload: Option<ImageWorkload>,
}

/// A finished build: the image, what identified its source when it was read (local
/// files only), and the base with the image's settings.
pub type BuildOutcome = Result<(ImageRef, Option<SourceIdentity>, ImageBase), String>;

/// What the cache needs besides the bases.
pub struct RootfsArgs {
    /// The base store.
    pub bases: Arc<BaseStore>,
    /// How registries are reached.
    pub registry: RegistrySettings,
    /// Where pulled blobs are kept (`<dir>/sha256/<hex>`).
    pub blob_dir: PathBuf,
    /// Most bytes one image's layers may unpack to.
    pub max_image_bytes: u64,
}

/// Requests to the cache.
pub enum RootfsMsg {
    /// The base for an image, built once however many ask at the same time.
    EnsureBase {
        /// The image.
        image: ImageRef,
        /// The base, or why it could not be built.
        reply: RpcReplyPort<Result<ImageBase, String>>,
    },
    /// A build finished (sent by the build task to the actor).
    Built {
        /// The image's key in the in-flight table.
        key: String,
        /// The outcome, with what identified the source when it was read.
        result: Box<BuildOutcome>,
        /// Whether a registry pull ran.
        pulled: bool,
        /// Whether an ext4 base was made.
        built: bool,
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
    /// Requests answered from memory (source unchanged, base present).
    pub remembered: u64,
    /// Registry pulls run.
    pub pulls: u64,
    /// Registry image bases made (not found cached).
    pub oci_bases_built: u64,
}

/// The cache's state.
pub struct RootfsState {
    args: Arc<RootfsArgs>,
    known: HashMap<ImageRef, (SourceIdentity, Base)>,
    in_flight: HashMap<String, Vec<RpcReplyPort<Result<ImageBase, String>>>>,
    stats: RootfsStats,
}

/// The rootfs cache actor.
pub struct RootfsCache;

impl Actor for RootfsCache {
    type Msg = RootfsMsg;
    type State = RootfsState;
    type Arguments = Arc<RootfsArgs>;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: Arc<RootfsArgs>,
    ) -> Result<RootfsState, ActorProcessingErr> {
        Ok(RootfsState {
            args,
            in_flight: HashMap::new(),
            known: HashMap::new(),
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
                if let Some((identity, base)) = state.known.get(&image)
                    && source_identity(&state.args.bases, &image).as_ref() == Some(identity)
                    && base.path.exists()
                {
                    state.stats.remembered += 1;
                    let _ = reply.send(Ok(ImageBase {
                        base: base.clone(),
                        workload: None,
                    }));
                    return Ok(());
                }
                let key = format!("{image:?}");
                if let Some(waiters) = state.in_flight.get_mut(&key) {
                    waiters.push(reply);
                    state.stats.joined += 1;
                    return Ok(());
                }
                state.in_flight.insert(key.clone(), vec![reply]);
                state.stats.builds += 1;
                let args = state.args.clone();
                tokio::spawn(async move {
                    let (result, pulled, built) = match image {
                        ImageRef::Oci(reference) => build_oci(args, reference).await,
                        image => (build_local(args, image).await, false, false),
                    };
                    let _ = myself.cast(RootfsMsg::Built {
                        key,
                        result: Box::new(result),
                        pulled,
                        built,
                    });
                });
            }
            RootfsMsg::Built {
                key,
                result,
                pulled,
                built,
            } => {
                crate::failpoints::hit("rootfs_cache.build.after_effect");
                state.stats.pulls += u64::from(pulled);
                state.stats.oci_bases_built += u64::from(built);
                let answer = (*result).map(|(image, identity, image_base)| {
                    if let Some(identity) = identity {
                        state
                            .known
                            .insert(image, (identity, image_base.base.clone()));
                    }
                    image_base
                });
                for waiter in state.in_flight.remove(&key).unwrap_or_default() {
                    let _ = waiter.send(answer.clone());
                }
            }
            RootfsMsg::Stats { reply } => {
                let _ = reply.send(state.stats);
            }
        }
        Ok(())
    }
}

/// Builds (or finds) the base of a local image on a blocking thread.
async fn build_local(args: Arc<RootfsArgs>, image: ImageRef) -> BuildOutcome {
    tokio::task::spawn_blocking(move || {
        // The identity is taken before hashing: a source changed while it is hashed is
        // seen as changed next time.
        let identity = source_identity(&args.bases, &image);
        args.bases.ensure_base(&image).map(|base| {
            (
                image,
                identity,
                ImageBase {
                    base,
                    workload: None,
                },
            )
        })
    })
    .await
    .map_err(|e| format!("base build task: {e}"))
    .and_then(|r| r.map_err(|e| e.to_string()))
}

/// Pulls a registry image (blobs already in the blob directory are verified, not
/// fetched again) and builds its base unless one exists for its manifest. Returns the
/// outcome, and whether a pull ran and a base was made.
async fn build_oci(
    args: Arc<RootfsArgs>,
    reference: crate::image::oci::OciRef,
) -> (BuildOutcome, bool, bool) {
    let pulled =
        match crate::image::oci::pull(&reference, &args.registry, &args.blob_dir, &|_| {}).await {
            Ok(p) => p,
            Err(e) => return (Err(e.to_string()), true, false),
        };
    let name = reference.to_string();
    let task_args = args.clone();
    let built = tokio::task::spawn_blocking(move || {
        task_args
            .bases
            .ensure_oci_base(&name, &pulled, task_args.max_image_bytes)
            .map(|(base, built)| (base, built, pulled.config))
    })
    .await;
    match built {
        Ok(Ok((base, built, config))) => (
            Ok((
                ImageRef::Oci(reference),
                None,
                ImageBase {
                    base,
                    workload: Some(ImageWorkload {
                        entrypoint: config.entrypoint,
                        cmd: config.cmd,
                        env: config.env,
                        working_dir: config.working_dir,
                        user: config.user,
                    }),
                },
            )),
            true,
            built,
        ),
        Ok(Err(e)) => (Err(e.to_string()), true, false),
        Err(e) => (Err(format!("base build task: {e}")), true, false),
    }
}

/// What identifies an image's source file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

fn identity_of(path: &Path) -> Option<SourceIdentity> {
    let meta = std::fs::metadata(path).ok()?;
    Some(SourceIdentity {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    })
}

/// The source's identity, for the images that have a single source file.
fn source_identity(bases: &BaseStore, image: &ImageRef) -> Option<SourceIdentity> {
    match image {
        ImageRef::Demo => identity_of(&bases.settings().busybox),
        ImageRef::Tarball(path) => identity_of(path),
        ImageRef::Directory(_) | ImageRef::Oci(_) => None,
    }
}

/// Clones `base` to `dest` on a blocking thread (see `image::clone_disk`).
pub async fn clone_disk(
    base: PathBuf,
    dest: PathBuf,
    size_bytes: Option<u64>,
) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        crate::image::clone_disk(&base, &dest, size_bytes).map(|_| ())
    })
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
