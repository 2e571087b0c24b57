//! What confines a VMM on this host, resolved once at start: the cgroup layout, the
//! VMMs' group and the group of `/dev/kvm`. A machine's [`Confinement`] is derived from
//! it and the machine's lease slot (its uid).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::cgroup::Cgroups;
use super::settings::VmmConfig;
use super::{Confinement, RunAs};
use crate::layout::Layout;

/// The host's means of confining VMMs.
#[derive(Debug, Clone)]
pub struct VmmHost {
    /// The machines' cgroups.
    pub cgroups: Cgroups,
    /// `vmm.uid_base`; none when VMMs run as root (`vmm.unprivileged = false`).
    uid_base: Option<u32>,
    /// The gid of `vmm.group`.
    gid: u32,
    /// The group of `/dev/kvm`, if there is one.
    kvm_gid: Option<u32>,
}

impl VmmHost {
    /// Resolves the config against the host. Fails, naming the key, when the group does
    /// not exist or no usable cgroup hierarchy is mounted.
    pub fn detect(prefix: &str, vmm: &VmmConfig) -> Result<VmmHost, String> {
        let cgroups = Cgroups::detect(prefix)?;
        let gid = if vmm.unprivileged {
            nix::unistd::Group::from_name(&vmm.group)
                .map_err(|e| format!("vmm.group: look up {:?}: {e}", vmm.group))?
                .ok_or_else(|| {
                    format!(
                        "vmm.group: no group {:?} on this host (deploy/install-deps.sh creates it)",
                        vmm.group
                    )
                })?
                .gid
                .as_raw()
        } else {
            0
        };
        let kvm_gid = std::fs::metadata("/dev/kvm").ok().map(|m| m.gid());
        Ok(VmmHost {
            cgroups,
            uid_base: vmm.unprivileged.then_some(vmm.uid_base),
            gid,
            kvm_gid,
        })
    }

    /// How machine `id`, holding lease slot `slot`, has its VMM confined.
    pub fn confinement(&self, id: &str, slot: u32) -> Confinement {
        Confinement {
            cgroup_procs: self.cgroups.procs_files(id),
            cgroup_path: self.cgroups.relative(id),
            run_as: self.uid_base.map(|base| RunAs {
                uid: base.saturating_add(slot),
                gid: self.gid,
                kvm_gid: self.kvm_gid,
            }),
        }
    }
}

/// Narrows what an unprivileged VMM can see of the daemon's files to the way to its own
/// machine directory (mode 0700, its uid's) and the guest kit: the data and cache
/// directories can be crossed but not listed (0711), and the store, the image bases and
/// the pulled blobs are private to root. Idempotent; run at every start, after the
/// store and the image store are opened.
pub fn private_files(layout: &Layout) -> Result<(), String> {
    let set = |path: &Path, mode: u32, create: bool| -> Result<(), String> {
        if create {
            std::fs::create_dir_all(path).map_err(|e| format!("create {}: {e}", path.display()))?;
        }
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("chmod {:o} {}: {e}", mode, path.display())),
        }
    };
    set(layout.data_dir(), 0o711, false)?;
    set(&layout.store(), 0o600, false)?;
    set(&layout.machines(), 0o711, true)?;
    set(&layout.images(), 0o700, true)?;
    set(layout.cache_dir(), 0o711, false)?;
    set(&layout.blobs(), 0o700, true)?;
    Ok(())
}

/// Whether this host can serve the configured directories to unprivileged VMMs, checked
/// at start before anything touches the host (and by `hearth doctor`). A VMM reaches its
/// machine directory through its working directory, entered as root before it takes its
/// own uid, so the data dir's ancestors never matter to it. What does:
/// - `data_dir` must hold files owned by a VMM's uid (`chown`; a root-squashing NFS or a
///   FAT file system cannot);
/// - the guest kit under `cache_dir` is opened by path, so every directory above
///   `cache_dir` must be searchable by the VMMs: by others, or by `vmm.group`.
///
/// The error names the key, what blocks it and the fix. Nothing to check when VMMs run
/// as root.
pub fn check_layout(layout: &Layout, vmm: &VmmConfig) -> Result<(), String> {
    if !vmm.unprivileged {
        return Ok(());
    }
    let gid = nix::unistd::Group::from_name(&vmm.group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    if let Some((dir, meta)) = unsearchable_ancestor(layout.cache_dir(), gid)? {
        return Err(format!(
            "cache_dir: {} (mode {:04o}, owner uid {}, group {}) keeps the VMMs (uid {}+, \
             group {:?}) from the guest kernel under {}; make it searchable (chmod o+x {}) \
             or choose a cache_dir whose parent directories others can search",
            dir.display(),
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            vmm.uid_base,
            vmm.group,
            layout.cache_dir().display(),
            dir.display(),
        ));
    }
    probe_chown(&layout.machines(), vmm.uid_base, gid.unwrap_or(0)).map_err(|e| {
        format!(
            "data_dir: {} cannot hold files owned by the VMMs' uids ({e}); choose a \
                 data_dir on a local file system that keeps owners (ext4, xfs, btrfs)",
            layout.data_dir().display()
        )
    })
}

/// The first directory above `path` (from `/` down) that neither others nor group `gid`
/// may search, with its metadata. Directories that do not exist yet are made by the
/// daemon, searchable.
fn unsearchable_ancestor(
    path: &Path,
    gid: Option<u32>,
) -> Result<Option<(std::path::PathBuf, std::fs::Metadata)>, String> {
    // The nearest directory that exists: it and everything above it must be
    // searchable (what is missing below it, the daemon makes searchable).
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return Ok(None);
    };
    let real = std::fs::canonicalize(existing)
        .map_err(|e| format!("resolve {}: {e}", existing.display()))?;
    let skip = usize::from(existing == path);
    let mut above: Vec<&Path> = real.ancestors().skip(skip).collect();
    above.reverse();
    for dir in above {
        let meta = std::fs::metadata(dir).map_err(|e| format!("stat {}: {e}", dir.display()))?;
        let mode = meta.mode();
        let searchable = mode & 0o001 != 0 || (Some(meta.gid()) == gid && mode & 0o010 != 0);
        if !searchable {
            return Ok(Some((dir.to_path_buf(), meta)));
        }
    }
    Ok(None)
}

/// Makes a file in `dir`, gives it to `uid:gid` and removes it. Idempotent (a probe left
/// by a crash is replaced).
fn probe_chown(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".owner-probe-{}", std::process::id()));
    let _ = std::fs::remove_file(&probe);
    std::fs::File::create(&probe)?;
    let owned = std::os::unix::fs::chown(&probe, Some(uid), Some(gid));
    let removed = std::fs::remove_file(&probe);
    owned.and(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run as root (as the suite is).
    #[test]
    fn a_private_parent_of_the_cache_is_named_and_the_data_dir_is_free() {
        let top = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let vmm = VmmConfig {
            group: "root".into(),
            ..VmmConfig::default()
        };
        // The data dir may sit under a private directory: VMMs never search above it.
        let layout = Layout::new(top.path().join("data"), top.path().join("cache"));
        let err = check_layout(&layout, &vmm).expect_err("the cache's parent is private");
        assert!(err.starts_with("cache_dir: "), "{err}");
        assert!(err.contains(&top.path().display().to_string()), "{err}");
        assert!(err.contains("mode 0700"), "{err}");
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        check_layout(&layout, &vmm).expect("searchable now");
        // Searchable by the VMMs' group only is enough.
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o710))
            .expect("chmod");
        check_layout(&layout, &vmm).expect("searchable by the group");
        let data = layout.machines();
        assert_eq!(
            std::fs::read_dir(&data).expect("made").count(),
            0,
            "no probe left"
        );
    }
}
