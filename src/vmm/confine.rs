//! What confines a VMM on this host, resolved once at start: the cgroup layout, the
//! VMMs' group and the group of `/dev/kvm`. A machine's [`Confinement`] is derived from
//! it and the machine's lease slot (its uid).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::cgroup::Cgroups;
use super::{Confinement, RunAs};
use crate::config::Config;

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
    pub fn detect(config: &Config) -> Result<VmmHost, String> {
        let cgroups = Cgroups::detect(&config.network.prefix)?;
        let vmm = &config.vmm;
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
pub fn private_files(config: &Config) -> Result<(), String> {
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
    set(&config.data_dir, 0o711, false)?;
    set(&config.store_path(), 0o600, false)?;
    set(&config.data_dir.join("machines"), 0o711, true)?;
    set(&config.data_dir.join("images"), 0o700, true)?;
    set(&config.cache_dir, 0o711, false)?;
    set(&config.cache_dir.join("blobs"), 0o700, true)?;
    Ok(())
}
