//! The cache's inventory and its removals: which bases exist (the files are the truth),
//! what the `images` table says about them, which machines name them, which blobs each
//! needs; and removing bases with the blobs no remaining base needs.
//!
//! Removal order is files first, then the table rows, so a crash in between leaves rows
//! without a base, which the next survey reports as stale and the next removal drops.
//! Blobs of the blob directory are shared between images (a common base layer), so a
//! blob goes only when no surviving base lists it; blobs no base lists at all (a pull
//! whose build failed, a refused image) go with every collection. Callers run this only
//! while no build is in flight, so no pull is writing blobs meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::ImageError;
use crate::image::collect::Reason;
use crate::image::{BaseStore, ImageEntry, oci};
use crate::store::Store;

/// One base as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The base digest.
    pub digest: String,
    /// What the store remembers of it (or what its description says, when unrecorded).
    pub entry: ImageEntry,
    /// The file system's size (the base file's length).
    pub size_bytes: u64,
    /// Bytes the base file takes on disk (allocated blocks; it is sparse).
    pub disk_bytes: u64,
    /// Names of the machines (not destroyed) whose records name it.
    pub machines: Vec<String>,
}

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// The bases removed, with why.
    pub removed: Vec<(ImageInfo, Reason)>,
    /// Bytes freed (bases and blobs).
    pub bytes_freed: u64,
    /// Blobs removed from the blob directory.
    pub blobs_removed: usize,
    /// Bytes the cache stays over its budget (everything left is in use or recent).
    pub still_over_bytes: u64,
}

/// The inventory at one moment.
#[derive(Debug, Clone, Default)]
pub struct Survey {
    /// Every base on disk, by digest.
    pub images: Vec<ImageInfo>,
    /// Every blob of the blob directory (`sha256:<hex>`) and its allocated bytes.
    pub blob_bytes: BTreeMap<String, u64>,
    /// Rows of the `images` table whose base file is gone.
    pub stale_entries: Vec<String>,
}

fn host(what: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Host(format!("{what}: {e}"))
}

/// Reads the inventory. Blocking (directory reads and one read transaction).
pub fn survey(bases: &BaseStore, blob_dir: &Path, store: &Store) -> Result<Survey, ImageError> {
    let mut entries = store.images().map_err(|e| host("reading images", e))?;
    let references = store
        .base_references()
        .map_err(|e| host("reading machine references", e))?;
    let mut images = Vec::new();
    for base in bases.list().map_err(|e| host("listing bases", e))? {
        let disk_bytes = std::fs::metadata(&base.path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        let entry = entries.remove(&base.digest).unwrap_or_else(|| {
            // A base built before its row was written: its description says enough.
            let (source, built) = bases.described(&base.digest).unwrap_or_default();
            ImageEntry {
                names: if source.is_empty() {
                    Vec::new()
                } else {
                    vec![source]
                },
                built_unix: built,
                last_used_unix: built,
                ..ImageEntry::default()
            }
        });
        images.push(ImageInfo {
            machines: references.get(&base.digest).cloned().unwrap_or_default(),
            digest: base.digest,
            entry,
            size_bytes: base.size_bytes,
            disk_bytes,
        });
    }
    Ok(Survey {
        images,
        blob_bytes: blobs_on_disk(blob_dir),
        stale_entries: entries.into_keys().collect(),
    })
}

/// The verified blobs of the blob directory; temporaries (dot files) are the pull's.
fn blobs_on_disk(blob_dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(blob_dir.join("sha256")) else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(hex) = name.to_str() else { continue };
        if !crate::image::is_valid_digest(hex) {
            continue;
        }
        let bytes = entry.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
        out.insert(format!("sha256:{hex}"), bytes);
    }
    out
}

impl Survey {
    /// Bytes the bases and blobs take together.
    pub fn total_bytes(&self) -> u64 {
        self.images.iter().map(|i| i.disk_bytes).sum::<u64>()
            + self.blob_bytes.values().sum::<u64>()
    }

    /// Blobs only the bases in `leaving` need (present on disk).
    fn blobs_freed_by(&self, leaving: &BTreeSet<&str>) -> BTreeSet<String> {
        let kept: BTreeSet<&str> = self
            .images
            .iter()
            .filter(|i| !leaving.contains(i.digest.as_str()))
            .flat_map(|i| i.entry.blobs.iter().map(String::as_str))
            .collect();
        self.images
            .iter()
            .filter(|i| leaving.contains(i.digest.as_str()))
            .flat_map(|i| i.entry.blobs.iter())
            .filter(|b| !kept.contains(b.as_str()) && self.blob_bytes.contains_key(*b))
            .cloned()
            .collect()
    }

    /// Bytes removing the base `digest` alone would free.
    pub fn freed_by(&self, digest: &str) -> u64 {
        let base = self
            .images
            .iter()
            .find(|i| i.digest == digest)
            .map_or(0, |i| i.disk_bytes);
        let leaving = BTreeSet::from([digest]);
        base + self
            .blobs_freed_by(&leaving)
            .iter()
            .map(|b| self.blob_bytes.get(b).copied().unwrap_or(0))
            .sum::<u64>()
    }

    /// Blobs no base lists.
    fn orphan_blobs(&self) -> Vec<String> {
        let listed: BTreeSet<&str> = self
            .images
            .iter()
            .flat_map(|i| i.entry.blobs.iter().map(String::as_str))
            .collect();
        self.blob_bytes
            .keys()
            .filter(|b| !listed.contains(b.as_str()))
            .cloned()
            .collect()
    }
}

/// Removes the bases `digests` (which the caller checked are unreferenced), the blobs no
/// remaining base needs, orphan blobs and stale rows. Returns the bytes freed and the
/// blobs removed.
///
/// Idempotent: a base or blob already gone is skipped; rows go last, in one commit.
pub fn remove(
    bases: &BaseStore,
    blob_dir: &Path,
    store: &Store,
    survey: &Survey,
    digests: &[String],
) -> Result<(u64, usize), ImageError> {
    let leaving: BTreeSet<&str> = digests.iter().map(String::as_str).collect();
    let mut freed = 0;
    for info in survey
        .images
        .iter()
        .filter(|i| leaving.contains(i.digest.as_str()))
    {
        let was_there = bases
            .remove(&info.digest)
            .map_err(|e| host("removing a base", e))?;
        if was_there {
            freed += info.disk_bytes;
        }
    }
    let mut blobs: Vec<String> = survey.blobs_freed_by(&leaving).into_iter().collect();
    blobs.extend(survey.orphan_blobs());
    let mut removed = 0;
    for blob in &blobs {
        let Ok(path) = oci::blob_path(blob_dir, blob) else {
            continue;
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {
                removed += 1;
                freed += survey.blob_bytes.get(blob).copied().unwrap_or(0);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(host(&format!("removing blob {blob}"), e)),
        }
    }
    let mut rows: Vec<String> = digests.to_vec();
    rows.extend(survey.stale_entries.iter().cloned());
    store
        .remove_images(&rows)
        .map_err(|e| host("removing image rows", e))?;
    Ok((freed, removed))
}

/// The survey's facts as the pure planner's candidates.
pub fn candidates(survey: &Survey) -> Vec<crate::image::collect::Candidate> {
    survey
        .images
        .iter()
        .map(|i| crate::image::collect::Candidate {
            digest: i.digest.clone(),
            freed_bytes: survey.freed_by(&i.digest),
            last_used_unix: i.entry.last_used_unix,
            machines: i.machines.len(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{BaseSettings, ImageRef};

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    fn put_blob(dir: &Path, digest: &str) {
        let path = oci::blob_path(dir, digest).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![7u8; 8192]).unwrap();
    }

    /// A base built from a one-file tree (needs mkfs.ext4, as every base does).
    fn base(bases: &BaseStore, root: &Path, content: &str) -> String {
        let tree = root.join(content);
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("f"), content).unwrap();
        bases
            .ensure_base(&ImageRef::Directory(tree))
            .unwrap()
            .digest
    }

    #[test]
    fn unrecorded_bases_stale_rows_and_shared_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hearth.redb")).unwrap();
        let bases = BaseStore::open(&dir.path().join("images"), BaseSettings::default()).unwrap();
        let blobs = dir.path().join("blobs");
        let kept = base(&bases, dir.path(), "kept");
        let leaving = base(&bases, dir.path(), "leaving");
        let unrecorded = base(&bases, dir.path(), "unrecorded");
        let row = |names: &[&str], blobs: &[&str]| ImageEntry {
            names: names.iter().map(|n| n.to_string()).collect(),
            blobs: blobs.iter().map(|b| b.to_string()).collect(),
            last_used_unix: 5,
            ..ImageEntry::default()
        };
        store.put_image(&kept, &row(&["kept"], &[A])).unwrap();
        store
            .put_image(&leaving, &row(&["leaving"], &[A, B]))
            .unwrap();
        store.put_image("gone", &row(&["gone"], &[])).unwrap();
        for blob in [A, B, C] {
            put_blob(&blobs, blob);
        }

        let survey = survey(&bases, &blobs, &store).unwrap();
        assert_eq!(survey.images.len(), 3);
        assert_eq!(survey.stale_entries, ["gone"]);
        // Described, not recorded: its source names it, its build time is its last use.
        let described = survey
            .images
            .iter()
            .find(|i| i.digest == unrecorded)
            .unwrap();
        assert!(described.entry.names[0].ends_with("/unrecorded"));
        assert!(described.entry.last_used_unix > 1_000_000_000);
        // Removing `leaving` frees its base and B, not A (kept needs it).
        let base_bytes = survey
            .images
            .iter()
            .find(|i| i.digest == leaving)
            .unwrap()
            .disk_bytes;
        assert!(base_bytes > 0);
        assert_eq!(survey.freed_by(&leaving), base_bytes + survey.blob_bytes[B]);

        let (_, removed_blobs) = remove(
            &bases,
            &blobs,
            &store,
            &survey,
            std::slice::from_ref(&leaving),
        )
        .unwrap();
        // B goes with its base; C, which no base lists, goes too; A stays.
        assert_eq!(removed_blobs, 2);
        assert_eq!(blobs_on_disk(&blobs).into_keys().collect::<Vec<_>>(), [A]);
        assert_eq!(bases.get(&leaving).unwrap(), None);
        let rows = store.images().unwrap();
        assert_eq!(
            rows.into_keys().collect::<Vec<_>>(),
            std::slice::from_ref(&kept)
        );
        // Idempotent: the same removal again changes nothing and fails nothing.
        assert_eq!(
            remove(
                &bases,
                &blobs,
                &store,
                &survey,
                std::slice::from_ref(&leaving)
            )
            .unwrap(),
            (0, 0)
        );
        assert!(bases.get(&kept).unwrap().is_some());
    }
}
