//! Root filesystem images: sources, ext4 bases cached by content hash, per-machine disks.
//!
//! ```text
//! ImageRef (demo | directory | tar[.gz])          parse + check_available: API admission
//!    |  BaseStore::ensure_base (blocking)
//!    v
//! digest (content + settings) --hit--> <root>/bases/<digest>.ext4  (read-only, shared)
//!    | miss: unpack / lay out demo -> mkfs.ext4 -d -> rename into place
//!    v
//! layout copy:    clone_disk(base, <machine>/rootfs.ext4)   FICLONE reflink, else sparse copy
//! layout overlay: link_base(base, <machine>/base.ext4)      hard link, shared read-only
//!                 make_upper(<machine>/rootfs.ext4)         copy of an empty ext4 template
//! remove_disk(...)                                idempotent undo
//!
//! ImageRef::Oci / ImageRef::Layout (oci:/dir:tag)  pulled or read by `oci`, then
//!    BaseStore::ensure_oci_base                    layers applied, keyed by manifest digest
//! ImageEntry                                      what redb remembers of a base
//! collect::plan (pure)                            which unreferenced bases to collect
//! space::SpacePolicy                              free space checked before pulls and builds
//! ```
//!
//! Architecture invariant: nothing here mounts a file system or needs a loop device;
//! images are made by e2fsprogs from plain directories, so building bases works in any
//! container that can run mkfs. Everything is blocking: callers use `spawn_blocking`.

#![deny(missing_docs)]

mod clone;
pub mod collect;
mod demo;
mod digest;
mod entry;
mod layer;
mod mkfs;
pub mod oci;
mod overlay;
mod reference;
pub mod settings;
pub mod space;
mod store;
mod tarball;

pub use clone::{CloneError, CloneMethod, clone_disk, partial_path, remove_disk, same_content};
pub use demo::{APPLETS, DemoError, INDEX_HTML, LAYOUT_VERSION};
pub use digest::{TreeStats, WalkError, is_valid_digest};
pub use entry::{ImageEntry, now_unix};
pub use layer::{
    Compression, LayerBudget, LayerError, LayerLimits, LayerStats, apply_layer, apply_layer_from,
};
pub use mkfs::{LABEL, MkfsError};
pub use overlay::{
    DEFAULT_UPPER_MIB, OverlayError, STOCK_PER_SIZE, UPPER_LABEL, UpperSource, clear_partials,
    ensure_template, layer_mib, link_base, make_overlay, make_upper, refill_stock, same_file,
    take_upper,
};
pub use reference::{DEMO, ImageDefaults, ImageRef, ImageRefError};
pub use store::{BUILDER_VERSION, Base, BaseError, BaseSettings, BaseStore, DEFAULT_MAX_ENTRIES};
pub use tarball::TarballError;
