//! The unpacking loop shared by plain root file system archives and image layers.
//!
//! The `tar` crate only parses here; creating the files is done by this module, because a
//! root file system needs what a generic unpacker gets wrong or leaves out (device nodes
//! and FIFOs, owners, set-id bits, xattrs, hard links checked against the root). How each
//! path is kept inside the root is in `place`; a layer's whiteouts are in `whiteout`.

use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, FileType, Mode};

use super::meter::{Meter, Metered, Tripped};
use super::place;
use super::whiteout::{self, Whiteout, Written};

/// Whether `.wh.` names are whiteouts (image layers) or ordinary files (plain archives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A root file system archive: every entry is created as written.
    Archive,
    /// An OCI / Docker image layer, applied over the layers below it.
    Layer,
}

/// Why unpacking stopped, before the caller says which archive it was.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// The stream is corrupt or cut short.
    #[error("entry `{entry}`: reading the archive: {source}")]
    Read {
        /// The entry being read, or where between entries.
        entry: String,
        /// The cause.
        source: io::Error,
    },
    /// An entry would land outside the root, or is otherwise not acceptable.
    #[error("entry `{entry}` refused: {reason}")]
    Refused {
        /// The entry's path in the archive.
        entry: String,
        /// Why.
        reason: String,
    },
    /// An entry of a kind a root file system cannot hold.
    #[error("entry `{entry}` has an unsupported type ({kind})")]
    Unsupported {
        /// The entry's path in the archive.
        entry: String,
        /// The tar type, as the crate names it.
        kind: String,
    },
    /// Creating an entry on disk failed.
    #[error("entry `{entry}`: {what} {path}: {source}")]
    Write {
        /// The entry's path in the archive.
        entry: String,
        /// The operation.
        what: &'static str,
        /// The path on disk.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The uncompressed bytes went over the budget while reading this entry.
    #[error("entry `{entry}` goes over the limit of {limit} uncompressed bytes")]
    TooLarge {
        /// The entry being read, or where the reading was.
        entry: String,
        /// The budget, in bytes.
        limit: u64,
    },
    /// The entries (and the directories made for them) went over the budget at this entry.
    #[error("entry `{entry}` goes over the limit of {limit} entries")]
    TooManyEntries {
        /// The entry that went over.
        entry: String,
        /// The budget, in entries.
        limit: u64,
    },
}

/// The running count of entries of one image against its limit: every entry read and
/// every directory created for an entry whose parent was missing, so the tree never has
/// more files than the limit and what unpacking remembers per file stays bounded.
#[derive(Debug)]
pub(crate) struct EntryBudget {
    used: u64,
    limit: u64,
}

impl EntryBudget {
    /// A budget of `limit` entries of which `used` are taken already (earlier layers).
    pub(crate) fn new(used: u64, limit: u64) -> EntryBudget {
        EntryBudget { used, limit }
    }

    /// No limit.
    #[cfg(test)]
    pub(crate) fn unlimited() -> EntryBudget {
        EntryBudget::new(0, u64::MAX)
    }

    /// Entries taken so far, those before this budget was made included.
    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// Takes one entry for `entry`, refused once the limit is reached.
    pub(crate) fn take(&mut self, entry: &str) -> Result<(), Failure> {
        if self.used >= self.limit {
            return Err(Failure::TooManyEntries {
                entry: entry.to_string(),
                limit: self.limit,
            });
        }
        self.used += 1;
        Ok(())
    }
}

/// Most bytes of an entry name quoted in an error: a name may be megabytes long (a GNU
/// long name) and hold control characters, and errors end up in records and terminals.
const MAX_QUOTED_NAME: usize = 512;

impl Failure {
    pub(crate) fn refused(entry: &str, reason: String) -> Failure {
        Failure::Refused {
            entry: entry.to_string(),
            reason,
        }
    }

    pub(crate) fn write(
        entry: &str,
        what: &'static str,
        path: &Path,
        source: io::Error,
    ) -> Failure {
        Failure::Write {
            entry: entry.to_string(),
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What one archive did to the tree.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) entries: u64,
    pub(crate) file_bytes: u64,
    pub(crate) whiteouts: u64,
    pub(crate) opaque_dirs: u64,
}

/// A directory whose mode and time are set once everything inside it is written: a
/// read-only directory must still take its children, and creating children would reset
/// its modification time.
struct PendingDir {
    path: PathBuf,
    entry: String,
    mode: u32,
    mtime: u64,
}

/// Unpacks the (decompressed) tar stream `reader` into `root`, counting every byte read
/// through `meter`, whose limit stops a bomb, and every entry against `budget`, whose
/// limit stops a flood of tiny files. Reads the stream to its end so the meter's digest
/// covers all of it. On error `root` holds a partial tree.
pub(crate) fn unpack(
    reader: impl Read,
    root: &Path,
    kind: Kind,
    meter: &Meter,
    budget: &mut EntryBudget,
) -> Result<Counts, Failure> {
    let mut archive = tar::Archive::new(Metered::new(reader, meter));
    let mut counts = Counts::default();
    let mut cx = Placing {
        root,
        kind,
        meter,
        budget,
        written: Written::default(),
        dirs: Vec::new(),
    };
    let mut previous: Option<String> = None;
    // Where a failure in the parser's own reads happened: between entries.
    let between = |previous: &Option<String>| match previous {
        Some(name) => format!("(header after {name})"),
        None => "(first header)".to_string(),
    };
    let mut entries = archive
        .entries()
        .map_err(|e| read_failure(meter, between(&previous), e))?;
    loop {
        meter.reading_header(true);
        let next = entries.next();
        meter.reading_header(false);
        let Some(entry) = next else { break };
        let mut entry = entry.map_err(|e| read_failure(meter, between(&previous), e))?;
        let name = crate::text::bounded_printable(
            &entry
                .path()
                .map_err(|e| read_failure(meter, between(&previous), e))?
                .display()
                .to_string(),
            MAX_QUOTED_NAME,
        );
        cx.budget.take(&name)?;
        let placed = place_entry(&mut entry, &name, &mut cx).map_err(|e| match e {
            Step::Read(source) => read_failure(meter, name.clone(), source),
            Step::Failed(failure) => failure,
        })?;
        counts.entries += 1;
        match placed {
            Placed::File(bytes) => counts.file_bytes += bytes,
            Placed::Whiteout => counts.whiteouts += 1,
            Placed::Opaque => counts.opaque_dirs += 1,
            Placed::Other => {}
        }
        // Data an entry type does not use is still read here rather than skipped by the
        // parser, so that the header cap only ever sees header records.
        io::copy(&mut entry, &mut io::sink()).map_err(|e| read_failure(meter, name.clone(), e))?;
        previous = Some(name);
    }
    // Children first, so setting a parent's time is the last change inside it.
    for dir in cx.dirs.into_iter().rev() {
        // A later entry of the same archive may have replaced the directory.
        match std::fs::symlink_metadata(&dir.path) {
            Ok(meta) if meta.is_dir() => {}
            _ => continue,
        }
        place::set_mode(&dir.path, dir.mode)
            .map_err(|source| Failure::write(&dir.entry, "chmod", &dir.path, source))?;
        place::set_mtime(&dir.path, dir.mtime)
            .map_err(|source| Failure::write(&dir.entry, "set time", &dir.path, source))?;
    }
    // What follows the end-of-archive blocks (record padding, a gzip or zstd trailer with
    // its checksum) is read too: the digest is of the whole stream.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink())
        .map_err(|e| read_failure(meter, "(after the end of the archive)".into(), e))?;
    Ok(counts)
}

/// A failed read, told apart by what the meter saw: a budget or header cap refusal, or the
/// stream itself. `entry` is the entry being read, or where between entries.
fn read_failure(meter: &Meter, entry: String, source: io::Error) -> Failure {
    match meter.tripped() {
        Some(Tripped::Budget) => Failure::TooLarge {
            entry,
            limit: meter.limit(),
        },
        Some(Tripped::Metadata) => Failure::Refused {
            entry,
            reason: format!(
                "its header records are over {} bytes",
                super::meter::MAX_ENTRY_METADATA
            ),
        },
        None => Failure::Read { entry, source },
    }
}

/// What an entry became.
enum Placed {
    File(u64),
    Whiteout,
    Opaque,
    Other,
}

/// Why placing an entry stopped: reading the stream (classified by the caller, which knows
/// the meter) or anything else.
enum Step {
    Read(io::Error),
    Failed(Failure),
}

impl From<Failure> for Step {
    fn from(failure: Failure) -> Step {
        Step::Failed(failure)
    }
}

/// What placing an entry needs besides the entry: where and how, and what the archive
/// has done so far.
struct Placing<'a> {
    root: &'a Path,
    kind: Kind,
    meter: &'a Meter,
    budget: &'a mut EntryBudget,
    written: Written,
    dirs: Vec<PendingDir>,
}

fn place_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    name: &str,
    cx: &mut Placing<'_>,
) -> Result<Placed, Step> {
    let (root, kind, meter) = (cx.root, cx.kind, cx.meter);
    let tar_kind = entry.header().entry_type();
    if tar_kind.is_pax_global_extensions() || tar_kind.is_pax_local_extensions() {
        return Ok(Placed::Other);
    }
    let raw = entry.path().map_err(Step::Read)?.into_owned();
    let Some(rel) = place::relative_path(&raw).map_err(|reason| Failure::refused(name, reason))?
    else {
        // `./` itself: the root, whose attributes mkfs sets.
        return Ok(Placed::Other);
    };
    if kind == Kind::Layer {
        match whiteout::classify(&rel).map_err(|reason| Failure::refused(name, reason))? {
            None => {}
            Some(Whiteout::Remove(target)) => {
                whiteout::remove(root, &target, &cx.written, name)?;
                return Ok(Placed::Whiteout);
            }
            Some(Whiteout::Opaque(dir)) => {
                whiteout::make_opaque(root, &dir, &mut cx.written, name, cx.budget)?;
                return Ok(Placed::Opaque);
            }
            Some(Whiteout::Reserved) => return Ok(Placed::Other),
        }
    }
    let header = entry.header();
    let mode = header.mode().map_err(Step::Read)? & 0o7777;
    let uid = header.uid().map_err(Step::Read)?;
    let gid = header.gid().map_err(Step::Read)?;
    let mtime = header.mtime().map_err(Step::Read)?;
    let link = entry
        .link_name()
        .map_err(Step::Read)?
        .map(|l| l.into_owned());
    let xattrs = xattrs(entry).map_err(Step::Read)?;
    place::ensure_parent(root, &rel, name, cx.budget)?;
    cx.written.insert(&rel);
    let dst = root.join(&rel);
    let w = |what: &'static str| {
        let dst = dst.clone();
        move |source| Step::Failed(Failure::write(name, what, &dst, source))
    };
    place::clear_place(&dst, tar_kind.is_dir()).map_err(w("replace"))?;
    let mut placed = Placed::Other;
    match tar_kind {
        tar::EntryType::Directory => {
            if !dst.is_dir() {
                std::fs::create_dir(&dst).map_err(w("create directory"))?;
            }
            place::set_owner(&dst, uid, gid).map_err(w("chown"))?;
            place::set_xattrs(&dst, &xattrs).map_err(w("set xattr"))?;
            cx.dirs.push(PendingDir {
                path: dst,
                entry: name.to_string(),
                mode,
                mtime,
            });
            return Ok(placed);
        }
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&dst)
                .map_err(w("create"))?;
            placed = Placed::File(copy(entry, &mut out, &dst, name, meter)?);
        }
        tar::EntryType::Symlink => {
            let target =
                link.ok_or_else(|| Failure::refused(name, "symlink without a target".into()))?;
            place::check_symlink_target(&rel, &target)
                .map_err(|reason| Failure::refused(name, reason))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(w("symlink"))?;
            place::set_owner(&dst, uid, gid).map_err(w("chown"))?;
            place::set_xattrs(&dst, &xattrs).map_err(w("set xattr"))?;
            place::set_mtime(&dst, mtime).map_err(w("set time"))?;
            return Ok(placed);
        }
        tar::EntryType::Link => {
            let target =
                link.ok_or_else(|| Failure::refused(name, "hard link without a target".into()))?;
            let src = place::existing_inside(root, &target).map_err(|reason| {
                Failure::refused(
                    name,
                    format!(
                        "hard link target `{}`: {reason}",
                        crate::text::bounded_printable(
                            &target.display().to_string(),
                            MAX_QUOTED_NAME
                        )
                    ),
                )
            })?;
            std::fs::hard_link(&src, &dst).map_err(w("hard link"))?;
            // The link shares its target's inode: owner, mode, xattrs and time are the
            // target's.
            return Ok(placed);
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            // Device numbers are read only for devices: writers leave other entries'
            // fields blank or junk.
            let dev = if tar_kind == tar::EntryType::Fifo {
                0
            } else {
                let header = entry.header();
                rustix::fs::makedev(
                    header.device_major().map_err(Step::Read)?.unwrap_or(0),
                    header.device_minor().map_err(Step::Read)?.unwrap_or(0),
                )
            };
            let file_type = match tar_kind {
                tar::EntryType::Char => FileType::CharacterDevice,
                tar::EntryType::Block => FileType::BlockDevice,
                _ => FileType::Fifo,
            };
            rustix::fs::mknodat(CWD, &dst, file_type, Mode::from_raw_mode(0o600), dev)
                .map_err(io::Error::from)
                .map_err(w("mknod"))?;
        }
        other => {
            return Err(Step::Failed(Failure::Unsupported {
                entry: name.to_string(),
                kind: format!("{other:?}"),
            }));
        }
    }
    // Owner before mode: chown clears the set-id bits. Xattrs after chown, which drops
    // `security.capability`.
    place::set_owner(&dst, uid, gid).map_err(w("chown"))?;
    place::set_mode(&dst, mode).map_err(w("chmod"))?;
    place::set_xattrs(&dst, &xattrs).map_err(w("set xattr"))?;
    place::set_mtime(&dst, mtime).map_err(w("set time"))?;
    Ok(placed)
}

/// The entry's xattrs, from its PAX `SCHILY.xattr.<name>` records (what GNU tar, Go's
/// archive/tar and so every image builder write).
fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut found = Vec::new();
    let Some(records) = entry.pax_extensions()? else {
        return Ok(found);
    };
    for record in records {
        let record = record?;
        if let Some(name) = record.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            found.push((name.to_vec(), record.value_bytes().to_vec()));
        }
    }
    Ok(found)
}

/// Copies a file entry's data, telling read failures (the stream) from write failures
/// (the disk). The byte count.
///
/// The holes of a GNU sparse entry come out of the parser as zeros that were never in the
/// stream, so the meter would not see them: whatever a read produces beyond what it took
/// from the stream is charged to the budget here, or a tiny sparse entry declaring a huge
/// size would fill the disk.
fn copy(
    entry: &mut impl Read,
    out: &mut std::fs::File,
    dst: &Path,
    name: &str,
    meter: &Meter,
) -> Result<u64, Step> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let before = meter.used();
        let n = match entry.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Step::Read(e)),
        };
        let from_stream = meter.used() - before;
        meter
            .charge((n as u64).saturating_sub(from_stream))
            .map_err(Step::Read)?;
        out.write_all(&buf[..n])
            .map_err(|source| Step::Failed(Failure::write(name, "write", dst, source)))?;
        total += n as u64;
    }
}
