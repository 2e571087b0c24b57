//! Every error an API call can meet, and the one function that turns it into a
//! `tonic::Status`. Messages name the field or the object.

use tonic::{Code, Status};

use crate::actors::AskError;
use crate::actors::rootfs_cache::ImageError;
use crate::audit::AuditError;
use crate::image::ImageRefError;
use crate::machine::spec::SpecError;
use crate::store::StoreError;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field is missing or malformed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The image reference is malformed or names nothing.
    #[error("spec.image: {0}")]
    Image(ImageRefError),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The machine's run could not be woken (the daemon is shutting down).
    #[error("the machine run could not be woken: {0}")]
    Wake(String),
    /// The host or the store could not be inspected.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// An image call's `image` field is malformed or names nothing.
    #[error("image: {0}")]
    ImageField(ImageRefError),
    /// The image cache refused or failed.
    #[error(transparent)]
    Cache(#[from] ImageError),
    /// A singleton did not answer (it is restarting, or the daemon is stopping).
    #[error(transparent)]
    Ask(#[from] AskError),
    /// The daemon is shutting down: a wait or a stream ends early.
    #[error("the daemon is shutting down (machines keep running); call again once it is back")]
    ShuttingDown,
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let code = match &error {
            ApiError::Spec(_) => Code::InvalidArgument,
            ApiError::Image(e) if e.is_not_found() => Code::NotFound,
            ApiError::Image(_) => Code::InvalidArgument,
            ApiError::Store(StoreError::NotFound(_)) => Code::NotFound,
            ApiError::Store(StoreError::NameTaken { .. }) => Code::AlreadyExists,
            ApiError::Store(StoreError::NoRoom(_)) => Code::ResourceExhausted,
            ApiError::Store(e) if e.is_no_space() => Code::ResourceExhausted,
            ApiError::Store(StoreError::Reopen(_)) => Code::Unavailable,
            ApiError::Store(StoreError::Refused(_) | StoreError::RequestReused { .. }) => {
                Code::FailedPrecondition
            }
            ApiError::Store(
                StoreError::Db(_)
                | StoreError::Codec(_)
                | StoreError::Schema { .. }
                | StoreError::Changed,
            ) => Code::Internal,
            ApiError::Wake(_) => Code::Unavailable,
            ApiError::Audit(_) => Code::Internal,
            ApiError::ImageField(e) if e.is_not_found() => Code::NotFound,
            ApiError::ImageField(_) => Code::InvalidArgument,
            ApiError::Cache(ImageError::NotFound(_)) => Code::NotFound,
            ApiError::Cache(
                ImageError::Build { .. } | ImageError::InUse { .. } | ImageError::Refused { .. },
            ) => Code::FailedPrecondition,
            ApiError::Cache(ImageError::NoSpace { .. }) => Code::ResourceExhausted,
            ApiError::Cache(ImageError::Busy(_)) | ApiError::Ask(_) | ApiError::ShuttingDown => {
                Code::Unavailable
            }
            ApiError::Cache(ImageError::Host(_)) => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}
