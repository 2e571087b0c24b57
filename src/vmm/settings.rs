//! The `[vmm]` section of the configuration: which VMM runs the machines, how it is
//! confined, and their defaults. Owned here, next to what it configures; the config file
//! (`config`) only places it and checks it against the other sections.

use std::path::PathBuf;

use serde::Deserialize;

/// Which VMM runs the machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// Firecracker when a binary is configured and KVM can boot the guest kernel, else
    /// QEMU `microvm`.
    Auto,
    /// QEMU `microvm`.
    Qemu,
    /// Firecracker (needs `firecracker_binary` and a KVM that boots the guest kernel).
    Firecracker,
}

/// VMM settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmmConfig {
    /// `auto`, `qemu` or `firecracker`.
    pub kind: VmmKind,
    /// The QEMU binary.
    pub qemu_binary: PathBuf,
    /// The Firecracker binary; empty: none (auto then picks QEMU).
    pub firecracker_binary: PathBuf,
    /// Start Firecracker through its jailer.
    pub jailer: JailerConfig,
    /// Memory a VMM may use beyond its guest's, in MiB: the machine's cgroup limit is
    /// the guest memory plus this (QEMU's own heap and TCG's code cache live here).
    pub memory_overhead_mib: u32,
    /// Run each QEMU unprivileged: as its own uid `uid_base + <lease slot>` and group
    /// `group`, under a seccomp sandbox. Off only for debugging.
    pub unprivileged: bool,
    /// First uid of the per-machine range (no account is needed for these uids).
    pub uid_base: u32,
    /// The group every VMM runs as (`deploy/install-deps.sh` creates `hearth-vmm`).
    pub group: String,
    /// Cap of each VMM log file (the serial console, the VMM's own output), in MiB; one
    /// rotated file (`<name>.1`) is kept beside it.
    pub log_max_mib: u32,
}

/// Jailer settings (Firecracker only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailerConfig {
    /// Jail every Firecracker (the default: without the jailer Firecracker runs as root,
    /// unconfined).
    pub enabled: bool,
    /// The jailer binary; empty: `jailer` beside the Firecracker binary.
    pub binary: PathBuf,
    /// The uid Firecracker runs as inside the jail.
    pub uid: u32,
    /// The gid Firecracker runs as inside the jail.
    pub gid: u32,
    /// cgroup limits, `<file>=<value>` (e.g. `"cpu.max=50000 100000"` in v2,
    /// `"cpu.shares=512"` in v1); empty: no cgroup.
    pub cgroups: Vec<String>,
    /// The cgroup version the limits are for: 1 or 2 (the hierarchy must be mounted).
    pub cgroup_version: u8,
    /// The cgroup every machine's cgroup is placed in.
    pub parent_cgroup: String,
}

impl Default for JailerConfig {
    fn default() -> Self {
        JailerConfig {
            enabled: true,
            binary: PathBuf::new(),
            uid: 65534,
            gid: 65534,
            cgroups: Vec::new(),
            cgroup_version: 2,
            parent_cgroup: "hearth".to_string(),
        }
    }
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            kind: VmmKind::Auto,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            firecracker_binary: PathBuf::new(),
            jailer: JailerConfig::default(),
            memory_overhead_mib: 128,
            unprivileged: true,
            uid_base: 900_000,
            group: "hearth-vmm".to_string(),
            log_max_mib: 8,
        }
    }
}
