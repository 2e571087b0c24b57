//! The two disks of an overlay root: the image's base, shared read-only by every machine
//! of the image through a hard link in each machine's directory, and the machine's own
//! writable disk, a copy of an empty ext4 template of the machine's size. Neither grows
//! with the image: the link is one directory entry, and the copy visits only the
//! template's few hundred KiB of metadata (the rest is holes).
//!
//! ```text
//! <images>/uppers/upper-v1-<mib>m.ext4   empty ext4, made once per size (mkfs, ~10 ms)
//! <images>/uppers/stock-v1-<mib>m/<n>    ready copies of it, made and synced ahead
//! <machine>/base.ext4                    hard link to <images>/bases/<digest>.ext4
//! <machine>/rootfs.ext4                  a ready copy renamed in (else copied now)
//! ```
//!
//! The stock: copying the template and making the copy durable (two syncs) is most of a
//! layer's cost. So a few ready copies per size wait in a stock directory, each complete
//! and synced before it is renamed in; taking one is a rename and a sync of the machine
//! directory. [`take_upper`] falls back to copying when the stock is empty (the first
//! machine of a size, or a burst), and [`refill_stock`] tops it up off the step's path.
//!
//! Why a hard link: the base's inode is made readable by all (0444) but every path to it
//! stays private: the images directory is root's alone (0700) and a machine directory is
//! its own VMM's (0700), so each VMM reaches its own image's base and no other. The link
//! is never handed over to the VMM's uid (it is the shared inode), and a VMM that is not
//! its owner cannot write or chmod it. The link also keeps the base's blocks alive if the
//! cache ever dropped the base while a machine still used it.
//!
//! Both operations are idempotent, with [`super::remove_disk`] and the removal of the
//! machine directory as their undo.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::clone::{CloneError, CloneMethod, clone_disk, partial_path};
use super::mkfs::{MkfsError, tool};

/// The label of every writable layer's file system.
pub const UPPER_LABEL: &str = "hearth-upper";

/// Bumped whenever the template's mkfs options change, so old templates are not reused.
const TEMPLATE_VERSION: &str = "v1";

/// The writable layer's size when the spec does not name one (`disk_mib = 0`): sparse,
/// so it costs only what the guest writes.
pub const DEFAULT_UPPER_MIB: u32 = 1024;

/// The smallest writable layer made.
const MIN_UPPER_MIB: u32 = 64;

/// The writable layer's size for a spec's `disk_mib`: [`DEFAULT_UPPER_MIB`] for 0, else
/// the next power of two (at least [`MIN_UPPER_MIB`]). At least what was asked for, and
/// one of a few sizes (a dozen up to the spec's 1 TiB limit), so templates and their
/// stock stay few however many sizes callers ask for.
pub fn layer_mib(disk_mib: u32) -> u32 {
    if disk_mib == 0 {
        return DEFAULT_UPPER_MIB;
    }
    disk_mib
        .max(MIN_UPPER_MIB)
        .checked_next_power_of_two()
        .unwrap_or(disk_mib)
}

/// Why an overlay disk could not be made.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// Making the template failed.
    #[error("writable layer template: {0}")]
    Template(#[from] MkfsError),
    /// Copying the template failed.
    #[error("writable layer: {0}")]
    Clone(#[from] CloneError),
    /// A file operation failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file it failed on.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
}

impl OverlayError {
    /// The base and the link would be on different file systems (a hard link cannot
    /// cross them): retrying does not help.
    pub fn is_cross_device(&self) -> bool {
        matches!(self, OverlayError::Io { source, .. } if source.raw_os_error() == Some(libc::EXDEV))
    }
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> OverlayError {
    let path = path.to_path_buf();
    move |source| OverlayError::Io { path, what, source }
}

/// The template of an empty writable layer of `mib` MiB under `dir`, made if missing.
///
/// mkfs writes a temporary file of its own (a unique name per call) that is renamed into
/// place, so a template at its name is always complete; two callers racing each make a
/// whole template and the second rename wins. The inode tables and the journal are left to be initialised lazily, so the
/// template holds only its group metadata (about 0.7 MiB for 1 GiB, the rest holes).
pub fn ensure_template(dir: &Path, mib: u32) -> Result<PathBuf, OverlayError> {
    let path = dir.join(format!("upper-{TEMPLATE_VERSION}-{mib}m.ext4"));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir, "create"))?;
    // Unique per call: two machines of a new size make it at once, and neither may touch
    // the other's file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let partial = dir.join(format!(
        ".upper-{TEMPLATE_VERSION}-{mib}m.{}-{}.partial",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = make_template(&partial, mib);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &path).map_err(io_err(&path, "rename into place"))?;
    Ok(path)
}

fn make_template(partial: &Path, mib: u32) -> Result<(), OverlayError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(partial)
        .map_err(io_err(partial, "create"))?;
    file.set_len(u64::from(mib) << 20)
        .map_err(io_err(partial, "set length"))?;
    drop(file);
    let mut cmd = Command::new(tool("mkfs.ext4"));
    cmd.args(["-q", "-F", "-b", "4096", "-m", "0", "-L", UPPER_LABEL])
        .args([
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
        ])
        .arg(partial);
    super::mkfs::run(cmd, "mkfs.ext4", partial)?;
    std::fs::File::open(partial)
        .and_then(|f| f.sync_all())
        .map_err(io_err(partial, "sync"))
}

/// Makes `dest` a fresh writable layer of `mib` MiB: a copy of the size's template (see
/// [`ensure_template`], under `templates`). Idempotent like [`clone_disk`]: an existing
/// `dest` is kept. Undo: [`super::remove_disk`].
pub fn make_upper(templates: &Path, dest: &Path, mib: u32) -> Result<CloneMethod, OverlayError> {
    let template = ensure_template(templates, mib)?;
    Ok(clone_disk(&template, dest, None)?)
}

/// Ready layers kept per size.
pub const STOCK_PER_SIZE: usize = 2;

/// The stock directory of size `mib` under `dir`.
fn stock_dir(dir: &Path, mib: u32) -> PathBuf {
    dir.join(format!("stock-{TEMPLATE_VERSION}-{mib}m"))
}

/// Where a new layer of size `mib` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpperSource {
    /// A ready copy from the stock, renamed in.
    Stock,
    /// Copied from the template now (the stock was empty).
    Copied,
    /// The layer was there already (a rerun).
    AlreadyPresent,
}

/// Makes a machine's overlay disks: `link` to the base `base` (see [`link_base`]) and
/// `layer`, its writable layer of `mib` MiB (see [`take_upper`]). A `layer` that is the
/// base itself (a VMM renamed the base there) is removed first, and a fresh layer taken.
/// Idempotent; undo: removing both (with the machine directory).
pub fn make_overlay(
    base: &Path,
    link: &Path,
    layer: &Path,
    templates: &Path,
    mib: u32,
) -> Result<UpperSource, OverlayError> {
    if same_file(layer, base) {
        super::remove_disk(layer)?;
    }
    link_base(base, link)?;
    take_upper(templates, layer, mib)
}

/// Makes `dest` a fresh writable layer of `mib` MiB: a ready copy from the stock under
/// `templates` when there is one, else a copy of the template made now (see
/// [`make_upper`]). Idempotent: an existing `dest` is kept. A ready copy is complete and
/// synced before it enters the stock, and a rename moves it whole, so `dest` is complete
/// once it exists; the machine directory is synced so the rename lasts. Undo:
/// [`super::remove_disk`].
pub fn take_upper(templates: &Path, dest: &Path, mib: u32) -> Result<UpperSource, OverlayError> {
    match std::fs::symlink_metadata(dest) {
        Ok(meta) if meta.is_file() => return Ok(UpperSource::AlreadyPresent),
        // Anything else there (a VMM's link, FIFO or directory) is not a layer: the name
        // goes, nothing it points to.
        Ok(_) => crate::vmmdir::remove(dest).map_err(io_err(dest, "remove"))?,
        Err(_) => {}
    }
    let stock = stock_dir(templates, mib);
    if let Ok(entries) = std::fs::read_dir(&stock) {
        for entry in entries.flatten() {
            match std::fs::rename(entry.path(), dest) {
                Ok(()) => {
                    super::clone::sync_parent(dest).map_err(io_err(dest, "sync directory of"))?;
                    return Ok(UpperSource::Stock);
                }
                // Taken by another machine between the listing and the rename.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(dest, "take a ready layer")(e)),
            }
        }
    }
    make_upper(templates, dest, mib)?;
    Ok(UpperSource::Copied)
}

/// Tops the stock of size `mib` up to [`STOCK_PER_SIZE`] ready layers: each copied from
/// the template under a temporary name beside the stock, synced, then renamed in.
/// Copies a crashed run left half made are removed first. Safe to run concurrently with
/// takes and with itself (at worst the stock holds a copy too many for a while). Returns
/// how many it added.
pub fn refill_stock(templates: &Path, mib: u32) -> Result<usize, OverlayError> {
    // One refill per stock at a time: the others would only race it to the same count.
    static REFILLING: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let stock = stock_dir(templates, mib);
    {
        let mut busy = REFILLING.lock().unwrap_or_else(|e| e.into_inner());
        if busy.contains(&stock) {
            return Ok(0);
        }
        busy.push(stock.clone());
    }
    let result = fill(templates, &stock, mib);
    REFILLING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|s| s != &stock);
    result
}

fn fill(templates: &Path, stock: &Path, mib: u32) -> Result<usize, OverlayError> {
    std::fs::create_dir_all(stock).map_err(io_err(stock, "create"))?;
    let have = std::fs::read_dir(stock)
        .map_err(io_err(stock, "list"))?
        .count();
    let template = ensure_template(templates, mib)?;
    let mut added = 0;
    for _ in have..STOCK_PER_SIZE {
        let name = format!(
            "{}-{}-{added}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        // Built outside the stock (clone_disk works under `<name>.partial` and renames),
        // so the stock only ever holds complete, synced layers.
        let ready = templates.join(format!(".ready-{TEMPLATE_VERSION}-{mib}m-{name}"));
        clone_disk(&template, &ready, None)?;
        let placed = stock.join(&name);
        std::fs::rename(&ready, &placed).map_err(io_err(&placed, "rename into the stock"))?;
        added += 1;
    }
    Ok(added)
}

/// Removes what an interrupted [`refill_stock`] or [`ensure_template`] left under
/// `templates` (half-made copies and templates). Run once at start, before any refill.
pub fn clear_partials(templates: &Path) -> Result<usize, OverlayError> {
    let entries = match std::fs::read_dir(templates) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(templates, "list")(e)),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".ready-") || name.starts_with(".upper-") {
            std::fs::remove_file(entry.path()).map_err(io_err(&entry.path(), "remove"))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether `a` and `b` name the same file (inode); false when either is missing.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Makes `link` a hard link to the base `base`, and the base readable by the VMMs that
/// can reach a link to it (0444; see the module's notes). Idempotent: a link already to
/// the same file is kept; anything else at `link` is replaced. `link` must be on the
/// base's file system. Undo: removing `link` (with the machine directory).
pub fn link_base(base: &Path, link: &Path) -> Result<(), OverlayError> {
    let meta = std::fs::metadata(base).map_err(io_err(base, "stat base"))?;
    if meta.permissions().mode() & 0o777 != 0o444 {
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o444))
            .map_err(io_err(base, "chmod 0444"))?;
    }
    match std::fs::symlink_metadata(link) {
        Ok(seen) if seen.dev() == meta.dev() && seen.ino() == meta.ino() => return Ok(()),
        Ok(_) | Err(_) => {}
    }
    // Linked under a temporary name and renamed over whatever is there, so the name never
    // points at nothing and a rerun finds either the old file or the new link.
    // Both names are in the machine directory, which its VMM can write: whatever it left
    // at them is removed or renamed over, never followed (see `crate::vmmdir`).
    let partial = partial_path(link)?;
    crate::vmmdir::remove(&partial).map_err(io_err(&partial, "remove"))?;
    std::fs::hard_link(base, &partial).map_err(io_err(&partial, "hard link the base"))?;
    let (dir, name) =
        crate::vmmdir::VmmDir::parent_of(link).map_err(io_err(link, "open the directory of"))?;
    let partial_name = partial.file_name().unwrap_or_default();
    dir.rename(partial_name, &name)
        .map_err(io_err(link, "rename into place"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_is_made_once_and_copied_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let templates = dir.path().join("uppers");
        let first = ensure_template(&templates, 64).expect("template");
        let made = std::fs::metadata(&first).unwrap();
        assert_eq!(made.len(), 64 << 20);
        // Mostly holes: the metadata of an empty 64 MiB ext4 is well under 2 MiB.
        assert!(made.blocks() * 512 < 2 << 20, "{} blocks", made.blocks());
        let again = ensure_template(&templates, 64).expect("again");
        assert_eq!(again, first);
        assert_eq!(std::fs::metadata(&again).unwrap().ino(), made.ino());

        let upper = dir.path().join("rootfs.ext4");
        make_upper(&templates, &upper, 64).expect("upper");
        assert!(super::super::same_content(&first, &upper).unwrap());
        assert_eq!(
            make_upper(&templates, &upper, 64).expect("again"),
            CloneMethod::AlreadyPresent
        );
        let dump = Command::new(tool("dumpe2fs"))
            .args(["-h"])
            .arg(&upper)
            .output()
            .expect("dumpe2fs");
        let header = String::from_utf8_lossy(&dump.stdout);
        assert!(header.contains(UPPER_LABEL), "{header}");
    }

    #[test]
    fn layer_sizes_round_up_to_a_few_classes() {
        assert_eq!(layer_mib(0), DEFAULT_UPPER_MIB);
        assert_eq!(layer_mib(1), 64);
        assert_eq!(layer_mib(256), 256);
        assert_eq!(layer_mib(257), 512);
        assert_eq!(layer_mib(1 << 20), 1 << 20);
        let classes: std::collections::BTreeSet<u32> =
            (1..=(1u32 << 20)).step_by(997).map(layer_mib).collect();
        assert!(classes.len() <= 16, "{classes:?}");
        assert!((1..5000).all(|n| layer_mib(n) >= n));
    }

    #[test]
    fn layers_come_from_the_stock_when_it_has_some() {
        let dir = tempfile::tempdir().unwrap();
        let templates = dir.path().join("uppers");
        // Empty stock: copied now.
        let first = dir.path().join("m1/rootfs.ext4");
        std::fs::create_dir_all(first.parent().unwrap()).unwrap();
        assert_eq!(
            take_upper(&templates, &first, 64).unwrap(),
            UpperSource::Copied
        );
        assert_eq!(
            take_upper(&templates, &first, 64).unwrap(),
            UpperSource::AlreadyPresent
        );
        // Filled: taken from it, the same bytes as the template, and the stock shrinks.
        assert_eq!(refill_stock(&templates, 64).unwrap(), STOCK_PER_SIZE);
        assert_eq!(refill_stock(&templates, 64).unwrap(), 0, "already full");
        let second = dir.path().join("m2/rootfs.ext4");
        std::fs::create_dir_all(second.parent().unwrap()).unwrap();
        assert_eq!(
            take_upper(&templates, &second, 64).unwrap(),
            UpperSource::Stock
        );
        let template = ensure_template(&templates, 64).unwrap();
        assert!(super::super::same_content(&template, &second).unwrap());
        let left = std::fs::read_dir(stock_dir(&templates, 64))
            .unwrap()
            .count();
        assert_eq!(left, STOCK_PER_SIZE - 1);
        // Another size has its own stock.
        let third = dir.path().join("m3/rootfs.ext4");
        std::fs::create_dir_all(third.parent().unwrap()).unwrap();
        assert_eq!(
            take_upper(&templates, &third, 32).unwrap(),
            UpperSource::Copied
        );
        assert_eq!(std::fs::metadata(&third).unwrap().len(), 32 << 20);
        // What an interrupted refill left is cleared; complete ones stay.
        std::fs::write(templates.join(".ready-v1-64m-x.partial"), b"half").unwrap();
        assert_eq!(clear_partials(&templates).unwrap(), 1);
        assert!(template.exists());
    }

    #[test]
    fn the_base_link_is_the_same_file_and_replaces_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, b"base").unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("m/base.ext4");
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::fs::write(&link, b"stale").unwrap();
        for _ in 0..2 {
            link_base(&base, &link).expect("link");
            let (b, l) = (
                std::fs::metadata(&base).unwrap(),
                std::fs::metadata(&link).unwrap(),
            );
            assert_eq!((b.dev(), b.ino()), (l.dev(), l.ino()));
            assert_eq!(b.permissions().mode() & 0o777, 0o444);
            assert_eq!(b.nlink(), 2);
        }
        assert!(!partial_path(&link).unwrap().exists());
        // What a VMM could leave at the two names: a directory at the temporary one, a
        // directory at the link. Both are replaced; the base is the link's inode again.
        std::fs::remove_file(&link).unwrap();
        std::fs::create_dir_all(link.join("inside")).unwrap();
        std::fs::create_dir_all(partial_path(&link).unwrap().join("inside")).unwrap();
        link_base(&base, &link).expect("link over directories");
        assert_eq!(
            std::fs::metadata(&link).unwrap().ino(),
            std::fs::metadata(&base).unwrap().ino()
        );
        // A layer name holding a directory is not a layer: a fresh one is taken.
        let templates = dir.path().join("uppers");
        let layer = dir.path().join("m/rootfs.ext4");
        std::fs::create_dir_all(layer.join("inside")).unwrap();
        take_upper(&templates, &layer, 64).expect("layer over a directory");
        assert!(std::fs::symlink_metadata(&layer).unwrap().is_file());
    }
}
