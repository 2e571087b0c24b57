//! Root filesystem images: where an image comes from ([`ImageRef`]), its ext4 base cached
//! by content hash ([`BaseStore`]), and each machine's own copy ([`clone_disk`]).

mod base;
mod clone;
mod demo;
mod reference;

pub use base::{Base, BaseError, BaseSettings, BaseStore};
pub use clone::{CloneError, CloneMethod, clone_disk, remove_disk};
pub use reference::{ImageDefaults, ImageRef, ImageRefError};
