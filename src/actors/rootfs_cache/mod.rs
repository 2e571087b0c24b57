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
//!
//! The cache also keeps the inventory (table `images`: names, blobs, last use; a use that
//! changes nothing but the time is written at most once a minute per base) and collects bases no machine
//! names, by age and a disk budget (`image::collect` decides; `catalog` removes).
//! Removals run only while no build is in flight, so nothing being built or pulled is
//! ever removed under a build.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

mod build;
mod catalog;

pub use build::{BuildOutcome, Built, RegistryUse};
pub use catalog::{Collected, ImageInfo};

use crate::actors::services::Services;
use crate::image::collect::{self, CollectPolicy};
use crate::image::oci::{Progress, RegistrySettings};
use crate::image::{Base, BaseStore, ImageEntry, ImageRef, now_unix};
use crate::machine::record::ImageWorkload;

/// A use of a base already recorded this recently is not written again (the collection
/// grace is much longer, so a use is never lost to it).
const USE_RECORD_INTERVAL_SECS: u64 = 60;

/// A base and the image's own workload settings (an OCI image's config; none for the
/// other kinds, whose defaults are built in).
#[derive(Debug, Clone)]
pub struct ImageBase {
    /// The ext4 base.
    pub base: Base,
    /// The image's settings.
    pub workload: Option<ImageWorkload>,
}

/// What a build reports while it runs, for a progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// What the build is doing now (`resolving`, `unpacking layer 1/3`, `building ext4`).
    Phase(String),
    /// A registry layer's download progress.
    Layer(Progress),
}

/// Where a caller hears a build's progress.
pub type ProgressSender = tokio::sync::mpsc::UnboundedSender<PullEvent>;

/// Everyone watching one build: the caller that started it and those that joined it.
#[derive(Clone, Default)]
pub struct Watchers(Arc<Mutex<Vec<ProgressSender>>>);

impl Watchers {
    fn add(&self, sender: ProgressSender) {
        if let Ok(mut senders) = self.0.lock() {
            senders.push(sender);
        }
    }

    /// Sends `event` to every watcher still listening.
    pub fn emit(&self, event: PullEvent) {
        if let Ok(mut senders) = self.0.lock() {
            senders.retain(|s| s.send(event.clone()).is_ok());
        }
    }
}

/// Why an image operation of the cache failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImageError {
    /// The image could not be pulled, read or built; the message names the image and
    /// the cause (the registry, the blob, the layer entry, mkfs).
    #[error("{message}")]
    Build {
        /// The image.
        image: String,
        /// What went wrong.
        message: String,
    },
    /// The image breaks a configured limit (its layers, their size, its entries); the
    /// message names the key and the figures. Asking again cannot help until the
    /// configuration changes.
    #[error("{message}")]
    Refused {
        /// The image.
        image: String,
        /// Which limit, and by how much.
        message: String,
    },
    /// The disk has too little free space for the pull or the build; the message gives
    /// the figures. It may succeed once space is freed.
    #[error("{message}")]
    NoSpace {
        /// The image.
        image: String,
        /// Free, needed and kept free.
        message: String,
    },
    /// The image's source, or the image asked to be removed, does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Machines name the base; it stays while they exist.
    #[error("image `{wanted}` is used by machines {machines}; destroy them first")]
    InUse {
        /// The image as asked for.
        wanted: String,
        /// The machines' names, comma separated.
        machines: String,
    },
    /// A build is running; removals wait until none is.
    #[error("the image cache is building {0}; try again when it has finished")]
    Busy(String),
    /// The host or the store failed.
    #[error("image cache: {0}")]
    Host(String),
}

impl ImageError {
    /// True when asking again cannot help a machine: the image does not exist, or breaks
    /// a configured limit. A build that failed for any other reason (a registry outage, a
    /// full disk) may succeed later.
    pub fn is_permanent(&self) -> bool {
        match self {
            ImageError::NotFound(_) | ImageError::Refused { .. } => true,
            ImageError::NoSpace { .. }
            | ImageError::Build { .. }
            | ImageError::InUse { .. }
            | ImageError::Busy(_)
            | ImageError::Host(_) => false,
        }
    }
}

/// What the cache needs besides the bases.
pub struct RootfsArgs {
    /// The base store.
    pub bases: Arc<BaseStore>,
    /// The services (the store, for the `images` table and machine references).
    pub services: Services,
    /// How registries are reached.
    pub registry: RegistrySettings,
    /// Where pulled blobs are kept (`<dir>/sha256/<hex>`).
    pub blob_dir: PathBuf,
    /// Most bytes one image's layers may unpack to.
    pub max_image_bytes: u64,
    /// When bases are collected.
    pub policy: CollectPolicy,
    /// How often a collection runs by itself (`None`: only when asked).
    pub collect_every: Option<Duration>,
}

/// Requests to the cache.
pub enum RootfsMsg {
    /// The base for an image, built once however many ask at the same time.
    EnsureBase {
        /// The image.
        image: ImageRef,
        /// Where to report the build's progress, if anyone watches.
        progress: Option<ProgressSender>,
        /// The base, or why it could not be built.
        reply: RpcReplyPort<Result<ImageBase, ImageError>>,
    },
    /// A build finished (sent by the build task to the actor).
    Built {
        /// The image's key in the in-flight table.
        key: String,
        /// The outcome.
        result: Box<BuildOutcome>,
    },
    /// Counters, for tests and metrics.
    Stats {
        /// The answer.
        reply: RpcReplyPort<RootfsStats>,
    },
    /// Every base, with its names, size, last use and the machines naming it.
    List {
        /// The answer.
        reply: RpcReplyPort<Result<Vec<ImageInfo>, ImageError>>,
    },
    /// Removes the bases `wanted` names (a reference as listed, a digest or a 12+
    /// character prefix) and the blobs only they need; refused while machines name one.
    Remove {
        /// The image.
        wanted: String,
        /// The bases removed.
        reply: RpcReplyPort<Result<Vec<ImageInfo>, ImageError>>,
    },
    /// Collects by the configured policy now (periodic when no one asks).
    Collect {
        /// The answer, when asked by the API.
        reply: Option<RpcReplyPort<Result<Collected, ImageError>>>,
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
    /// Registry pulls that fetched (or verified) layers.
    pub pulls: u64,
    /// Registry resolutions that found the base already built and fetched no layer.
    pub checks: u64,
    /// Registry image bases made (not found cached).
    pub oci_bases_built: u64,
    /// Bases removed by collections and removals.
    pub bases_removed: u64,
}

/// A build in flight and who waits for it.
struct Flight {
    waiters: Vec<RpcReplyPort<Result<ImageBase, ImageError>>>,
    watchers: Watchers,
}

/// The cache's state.
pub struct RootfsState {
    args: Arc<RootfsArgs>,
    known: HashMap<ImageRef, (SourceIdentity, Base)>,
    in_flight: HashMap<String, Flight>,
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
        myself: ActorRef<Self::Msg>,
        args: Arc<RootfsArgs>,
    ) -> Result<RootfsState, ActorProcessingErr> {
        if let Some(every) = args.collect_every {
            myself.send_interval(every, || RootfsMsg::Collect { reply: None });
        }
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
            RootfsMsg::EnsureBase {
                image,
                progress,
                reply,
            } => state.ensure_base(myself, image, progress, reply),
            RootfsMsg::Built { key, result } => {
                crate::failpoints::hit("rootfs_cache.build.after_effect");
                let answer = match *result {
                    Ok(built) => {
                        match built.registry {
                            RegistryUse::Pulled => state.stats.pulls += 1,
                            RegistryUse::Checked => state.stats.checks += 1,
                            RegistryUse::None => {}
                        }
                        state.stats.oci_bases_built += u64::from(built.made);
                        if let Some(identity) = built.identity.clone() {
                            state
                                .known
                                .insert(built.image.clone(), (identity, built.found.base.clone()));
                        }
                        Ok(built)
                    }
                    Err(e) => Err(e),
                };
                let flight = state.in_flight.remove(&key);
                for waiter in flight.map(|f| f.waiters).unwrap_or_default() {
                    let _ = waiter.send(answer.clone().map(|b| b.found));
                }
                // Recorded after the answers: the waiting creates go on meanwhile.
                if let Ok(built) = &answer {
                    state.note_use(&built.found.base, &built.image.to_string(), Some(built));
                }
            }
            RootfsMsg::Stats { reply } => {
                let _ = reply.send(state.stats);
            }
            RootfsMsg::List { reply } => {
                let _ = reply.send(state.survey().map(|s| s.images));
            }
            RootfsMsg::Remove { wanted, reply } => {
                let _ = reply.send(state.remove(&wanted));
            }
            RootfsMsg::Collect { reply } => {
                let outcome = state.collect();
                match reply {
                    Some(reply) => {
                        let _ = reply.send(outcome);
                    }
                    None => {
                        if let Err(e) = outcome
                            && !matches!(e, ImageError::Busy(_))
                        {
                            tracing::warn!(error = %e, "image collection failed");
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl RootfsState {
    fn ensure_base(
        &mut self,
        myself: ActorRef<RootfsMsg>,
        image: ImageRef,
        progress: Option<ProgressSender>,
        reply: RpcReplyPort<Result<ImageBase, ImageError>>,
    ) {
        if let Some((identity, base)) = self.known.get(&image)
            && source_identity(&self.args.bases, &image).as_ref() == Some(identity)
            && base.path.exists()
        {
            self.stats.remembered += 1;
            let base = base.clone();
            let _ = reply.send(Ok(ImageBase {
                base: base.clone(),
                workload: None,
            }));
            self.note_use(&base, &image.to_string(), None);
            return;
        }
        let key = format!("{image:?}");
        if let Some(flight) = self.in_flight.get_mut(&key) {
            flight.waiters.push(reply);
            if let Some(progress) = progress {
                flight.watchers.add(progress);
            }
            self.stats.joined += 1;
            return;
        }
        let watchers = Watchers::default();
        if let Some(progress) = progress {
            watchers.add(progress);
        }
        self.in_flight.insert(
            key.clone(),
            Flight {
                waiters: vec![reply],
                watchers: watchers.clone(),
            },
        );
        self.stats.builds += 1;
        let args = self.args.clone();
        tokio::spawn(async move {
            let result = build::run(args, image, watchers).await;
            let _ = myself.cast(RootfsMsg::Built {
                key,
                result: Box::new(result),
            });
        });
    }

    /// Records that `name` used `base` now, with what a build learnt. No commit when only
    /// the last-use time moved, by less than a minute.
    fn note_use(&self, base: &Base, name: &str, built: Option<&Built>) {
        let now = now_unix();
        let store = self.args.services.store();
        let old = match store.image(&base.digest) {
            Ok(old) => old,
            Err(e) => {
                tracing::warn!(digest = %base.digest, error = %e, "could not read an image row");
                return;
            }
        };
        let mut entry = old.clone().unwrap_or_else(|| ImageEntry {
            built_unix: now,
            ..ImageEntry::default()
        });
        entry.used_as(name, now);
        if let Some(built) = built {
            if built.manifest_digest.is_some() {
                entry.manifest_digest = built.manifest_digest.clone();
            }
            if !built.blobs.is_empty() {
                entry.blobs = built.blobs.clone();
            }
            if built.config_digest.is_some() {
                entry.config_digest = built.config_digest.clone();
            }
        }
        if let Some(old) = &old {
            let recent = now.saturating_sub(old.last_used_unix) < USE_RECORD_INTERVAL_SECS;
            let unchanged = ImageEntry {
                last_used_unix: old.last_used_unix,
                ..entry.clone()
            } == *old;
            if recent && unchanged {
                return;
            }
        }
        if let Err(e) = store.put_image(&base.digest, &entry) {
            tracing::warn!(digest = %base.digest, error = %e, "could not record an image use");
        }
    }

    fn survey(&self) -> Result<catalog::Survey, ImageError> {
        catalog::survey(
            &self.args.bases,
            &self.args.blob_dir,
            self.args.services.store(),
        )
    }

    /// Fails while a build is in flight: it may be writing blobs or about to answer with
    /// a base.
    fn check_idle(&self) -> Result<(), ImageError> {
        match self.in_flight.keys().next() {
            Some(key) => Err(ImageError::Busy(key.clone())),
            None => Ok(()),
        }
    }

    fn remove(&mut self, wanted: &str) -> Result<Vec<ImageInfo>, ImageError> {
        self.check_idle()?;
        // A reference is matched as the cache prints it (`oci:/d` is `oci:/d:latest`).
        let canonical = ImageRef::parse(wanted)
            .map(|r| r.to_string())
            .unwrap_or_else(|_| wanted.to_string());
        let survey = self.survey()?;
        let matched: Vec<ImageInfo> = survey
            .images
            .iter()
            .filter(|i| {
                i.entry.is_named(&i.digest, wanted) || i.entry.is_named(&i.digest, &canonical)
            })
            .cloned()
            .collect();
        if matched.is_empty() {
            return Err(ImageError::NotFound(format!(
                "no image is named `{wanted}` (give a name as `hearth image list` shows it, a base digest, or 12+ characters of one)"
            )));
        }
        let users: Vec<&str> = matched
            .iter()
            .flat_map(|i| i.machines.iter().map(String::as_str))
            .collect();
        if !users.is_empty() {
            return Err(ImageError::InUse {
                wanted: wanted.to_string(),
                machines: users.join(", "),
            });
        }
        let digests: Vec<String> = matched.iter().map(|i| i.digest.clone()).collect();
        let (freed, blobs) = self.remove_bases(&survey, &digests)?;
        tracing::info!(
            image = wanted,
            bases = digests.len(),
            blobs,
            freed,
            "images removed"
        );
        Ok(matched)
    }

    fn collect(&mut self) -> Result<Collected, ImageError> {
        self.check_idle()?;
        let survey = self.survey()?;
        let plan = collect::plan(
            &catalog::candidates(&survey),
            survey.total_bytes(),
            now_unix(),
            self.args.policy,
        );
        let digests: Vec<String> = plan.remove.iter().map(|(d, _)| d.clone()).collect();
        let (bytes_freed, blobs_removed) = self.remove_bases(&survey, &digests)?;
        let removed: Vec<(ImageInfo, collect::Reason)> = plan
            .remove
            .iter()
            .filter_map(|(digest, reason)| {
                let info = survey.images.iter().find(|i| &i.digest == digest)?;
                tracing::info!(%digest, names = ?info.entry.names, reason = reason.as_str(), "base collected");
                Some((info.clone(), *reason))
            })
            .collect();
        if plan.still_over_bytes > 0 {
            tracing::warn!(
                over = plan.still_over_bytes,
                "image cache over its budget; the rest is in use or recently used"
            );
        }
        Ok(Collected {
            removed,
            bytes_freed,
            blobs_removed,
            still_over_bytes: plan.still_over_bytes,
        })
    }

    /// Removes the bases (see `catalog::remove`) and what memory says about them.
    fn remove_bases(
        &mut self,
        survey: &catalog::Survey,
        digests: &[String],
    ) -> Result<(u64, usize), ImageError> {
        let removed = catalog::remove(
            &self.args.bases,
            &self.args.blob_dir,
            self.args.services.store(),
            survey,
            digests,
        )?;
        self.stats.bases_removed += digests.len() as u64;
        self.known
            .retain(|_, (_, base)| !digests.contains(&base.digest));
        Ok(removed)
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
        ImageRef::Directory(_) | ImageRef::Oci(_) | ImageRef::Layout { .. } => None,
    }
}
