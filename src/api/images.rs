//! ImageService: pull ahead with progress, list, remove and prune the image cache. Every
//! call is a question to the RootfsCache, which owns the bases and the `images` table;
//! the handlers only translate.

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::convert;
use super::machines::async_stream;
use super::pb::{self, image_service_server::ImageService};
use super::status::ApiError;
use crate::actors::rootfs_cache::{ImageInfo, RootfsMsg};
use crate::actors::{ask, names};
use crate::image::ImageRef;
use crate::machine::spec::SpecError;

/// A pull of a large image over a slow link may take long; the stream shows it moving.
const PULL_TIMEOUT: Duration = Duration::from_secs(3600);

/// Listing, removing and collecting read directories and one table: quick.
const CATALOG_TIMEOUT: Duration = Duration::from_secs(30);

/// The image API.
pub struct Images {
    /// Turns true when the daemon stops (ends pull progress streams).
    stopping: tokio::sync::watch::Receiver<bool>,
    /// `images.local_roots`: where host paths may be images.
    local_roots: Vec<std::path::PathBuf>,
}

impl Images {
    pub fn new(
        stopping: tokio::sync::watch::Receiver<bool>,
        local_roots: Vec<std::path::PathBuf>,
    ) -> Images {
        Images {
            stopping,
            local_roots,
        }
    }
}

type PullStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::PullImageProgress, Status>> + Send>>;

async fn list() -> Result<Vec<ImageInfo>, ApiError> {
    Ok(ask(
        names::ROOTFS_CACHE,
        |reply| RootfsMsg::List { reply },
        CATALOG_TIMEOUT,
    )
    .await??)
}

#[tonic::async_trait]
impl ImageService for Images {
    type PullImageStream = PullStream;

    async fn pull_image(
        &self,
        request: Request<pb::PullImageRequest>,
    ) -> Result<Response<PullStream>, Status> {
        let field = request.into_inner().image;
        crate::machine::spec::check_image_field("image", &field).map_err(ApiError::Spec)?;
        let image = ImageRef::parse(&field).map_err(ApiError::ImageField)?;
        image
            .check_local_roots(&self.local_roots)
            .map_err(ApiError::ImageField)?;
        image.check_available().map_err(ApiError::ImageField)?;
        let stream = async_stream(self.stopping.clone(), move |tx| async move {
            let (progress, mut events) = tokio::sync::mpsc::unbounded_channel();
            let build = tokio::spawn(ask(
                names::ROOTFS_CACHE,
                move |reply| RootfsMsg::EnsureBase {
                    image,
                    progress: Some(progress),
                    reply,
                },
                PULL_TIMEOUT,
            ));
            // Ends when the build is over (every sender is dropped with it). A client
            // that went away stops hearing; the build goes on for whoever else waits.
            let mut listening = true;
            while let Some(event) = events.recv().await {
                if listening && tx.send(Ok(convert::pull_event(event))).await.is_err() {
                    listening = false;
                }
            }
            let outcome: Result<pb::Image, ApiError> = async {
                let found = build
                    .await
                    .map_err(|e| ApiError::Wake(format!("pull task: {e}")))???;
                // Asked after the build's answer, so the cache's record of it is written.
                let info = list()
                    .await?
                    .into_iter()
                    .find(|i| i.digest == found.base.digest);
                Ok(match info {
                    Some(info) => convert::image(&info),
                    None => pb::Image {
                        digest: found.base.digest,
                        size_bytes: found.base.size_bytes,
                        ..pb::Image::default()
                    },
                })
            }
            .await;
            let last = outcome
                .map_err(Status::from)
                .map(|image| pb::PullImageProgress {
                    event: Some(pb::pull_image_progress::Event::Image(image)),
                });
            let _ = tx.send(last).await;
        });
        Ok(Response::new(stream))
    }

    async fn list_images(
        &self,
        _: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let mut images = list().await?;
        images.sort_by_key(|i| std::cmp::Reverse(i.entry.last_used_unix));
        Ok(Response::new(pb::ListImagesResponse {
            images: images.iter().map(convert::image).collect(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<pb::RemoveImageRequest>,
    ) -> Result<Response<pb::RemoveImageResponse>, Status> {
        let wanted = request.into_inner().image;
        if wanted.is_empty() {
            return Err(ApiError::Spec(SpecError::Invalid {
                field: "image",
                reason: "empty (give a name as ListImages shows it, or a base digest)".into(),
            })
            .into());
        }
        crate::machine::spec::check_image_field("image", &wanted).map_err(ApiError::Spec)?;
        let removed = ask(
            names::ROOTFS_CACHE,
            |reply| RootfsMsg::Remove { wanted, reply },
            CATALOG_TIMEOUT,
        )
        .await
        .map_err(ApiError::from)?
        .map_err(ApiError::from)?;
        Ok(Response::new(pb::RemoveImageResponse {
            removed: removed.iter().map(convert::image).collect(),
        }))
    }

    async fn prune_images(
        &self,
        _: Request<pb::PruneImagesRequest>,
    ) -> Result<Response<pb::PruneImagesResponse>, Status> {
        let collected = ask(
            names::ROOTFS_CACHE,
            |reply| RootfsMsg::Collect { reply: Some(reply) },
            CATALOG_TIMEOUT,
        )
        .await
        .map_err(ApiError::from)?
        .map_err(ApiError::from)?;
        Ok(Response::new(pb::PruneImagesResponse {
            removed: collected
                .removed
                .iter()
                .map(|(info, _)| convert::image(info))
                .collect(),
            reasons: collected
                .removed
                .iter()
                .map(|(_, reason)| reason.as_str().to_string())
                .collect(),
            bytes_freed: collected.bytes_freed,
            blobs_removed: u32::try_from(collected.blobs_removed).unwrap_or(u32::MAX),
            still_over_bytes: collected.still_over_bytes,
        }))
    }
}
