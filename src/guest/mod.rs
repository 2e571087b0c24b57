//! What the host knows about the guest: the guest kit (kernel + initramfs), the config the
//! guest init reads at boot, and the host<->guest agent protocol.
//!
//! The guest init (`src/bin/hearth-init`) is built from this same crate and uses
//! [`config`] and [`protocol`] directly, so the two sides of every format are one code.
//!
//! **Architecture invariant:** nothing here starts a process or talks to a VMM; booting is
//! the job of [`crate::vmm`]. This module only builds files and defines formats.

pub mod bzimage;
pub mod config;
pub mod initramfs;
pub mod kit;
pub mod protocol;
pub mod settings;

/// Where the initramfs holds the kernel modules the init loads, relative to its root.
/// Files in it are named `NN-<module>.ko`; the init loads them in file-name order.
pub const INITRAMFS_MODULE_DIR: &str = "lib/hearth/modules";

/// Kernel command-line flag that makes the init print [`PROBE_READY_LINE`] on the console
/// and power off at once, without looking for disks: used by the accelerator probe.
pub const PROBE_CMDLINE_FLAG: &str = "hearth.probe=1";

/// The console line of a probe boot that reached userspace.
pub const PROBE_READY_LINE: &str = "hearth-init: probe ready";

/// Kernel command-line key naming the agent's transport. Absent: the virtio-serial port
/// [`protocol::AGENT_PORT_NAME`] (QEMU). `hearth.agent=vsock:<port>`: the guest connects
/// to the host (CID [`VSOCK_HOST_CID`]) on that vsock port and keeps reconnecting while
/// no host listens (Firecracker's hybrid vsock: the host listens on `<uds_path>_<port>`).
pub const AGENT_CMDLINE_KEY: &str = "hearth.agent";

/// The vsock port the agent uses when the transport is vsock.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The host's vsock context id (`VMADDR_CID_HOST`).
pub const VSOCK_HOST_CID: u32 = 2;

/// Kernel command-line flag telling the init to end the machine with a reboot instead of
/// a power-off: Firecracker has no power-off device and exits when the guest reboots
/// (with `reboot=k`).
pub const HALT_BY_REBOOT_FLAG: &str = "hearth.halt=reboot";
