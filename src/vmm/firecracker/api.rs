//! The part of Firecracker's HTTP API hearth uses: every request as a value with its
//! method, path and JSON body, and the answers it reads.
//!
//! Why a closed [`Request`] enum: each endpoint's method, path and body shape sit in one
//! place, so the shape tests below can walk every request hearth can send and check it
//! against the published API specification (`firecracker.yaml`, swagger 2.0, v1.x).
//! Optional fields are left out of the body when unset: Firecracker rejects unknown
//! fields, and older releases do not know every newer optional one.

use serde::{Deserialize, Serialize};

/// `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineConfiguration {
    /// vCPUs (1..=32).
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (x86 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking, needed for diff snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootSource {
    /// The guest kernel (an uncompressed ELF on x86_64).
    pub kernel_image_path: String,
    /// The initramfs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// The kernel command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /drives/{drive_id}` (a virtio-block drive backed by a host file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drive {
    /// The drive's id (also in the path).
    pub drive_id: String,
    /// The backing file.
    pub path_on_host: String,
    /// Whether the kernel boots from it (hearth's init finds disks itself: always false).
    pub is_root_device: bool,
    /// Read-only to the guest.
    pub is_read_only: bool,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkInterface {
    /// The interface's id (also in the path).
    pub iface_id: String,
    /// The tap device, in the namespace Firecracker runs in.
    pub host_dev_name: String,
    /// The guest's MAC, `aa:bb:cc:dd:ee:ff`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vsock {
    /// The guest's context id (>= 3).
    pub guest_cid: u32,
    /// Host socket for host-initiated connections; guest-initiated ones to port P reach
    /// `<uds_path>_<P>`.
    pub uds_path: String,
}

/// Firecracker's log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warning,
    /// Informational.
    Info,
    /// Debugging.
    Debug,
}

/// `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Logger {
    /// The log file (must exist: Firecracker opens it, it does not create it).
    pub log_path: String,
    /// Level.
    pub level: LogLevel,
    /// Prefix lines with their level.
    pub show_level: bool,
    /// Prefix lines with their source location.
    pub show_log_origin: bool,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// The metrics file (must exist, like the log).
    pub metrics_path: String,
}

/// `PUT /serial`: where the guest's serial console goes (else to Firecracker's stdout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SerialDevice {
    /// The file that receives the console.
    pub serial_out_path: String,
}

/// `PUT /actions` action types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ActionType {
    /// Boot the configured machine.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the guest's keyboard controller (a graceful stop request).
    SendCtrlAltDel,
    /// Write the metrics file now.
    FlushMetrics,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// `PATCH /vm` states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Run them again.
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vm {
    /// The state wanted.
    pub state: VmState,
}

/// Snapshot kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SnapshotType {
    /// All of guest memory.
    Full,
    /// Only memory dirtied since the last snapshot (needs dirty page tracking).
    Diff,
}

/// `PUT /snapshot/create` (the machine must be paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotCreateParams {
    /// The file for the machine state.
    pub snapshot_path: String,
    /// The file for guest memory.
    pub mem_file_path: String,
    /// Full or diff.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// Where a loaded snapshot's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MemoryBackendType {
    /// A memory file, mapped privately.
    File,
    /// A userfaultfd handler listening on a Unix socket.
    Uffd,
}

/// The memory backend of a snapshot load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryBackend {
    /// File or userfaultfd.
    pub backend_type: MemoryBackendType,
    /// The memory file or the handler's socket.
    pub backend_path: String,
}

/// A tap replacing the one an interface had when the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// The new tap.
    pub host_dev_name: String,
}

/// A vsock socket path replacing the snapshot's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockOverride {
    /// The new `uds_path`.
    pub uds_path: String,
}

/// `PUT /snapshot/load` (only on a fresh process, before any configuration but the
/// logger and metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotLoadParams {
    /// The machine state file.
    pub snapshot_path: String,
    /// Where memory comes from.
    pub mem_backend: MemoryBackend,
    /// Resume right after loading.
    pub resume_vm: bool,
    /// Taps to use instead of the snapshot's (left out when empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// A vsock path to use instead of the snapshot's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

/// `GET /` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceInfo {
    /// "Firecracker".
    pub app_name: String,
    /// The instance id it was started with.
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: InstanceState,
    /// Its version.
    pub vmm_version: String,
}

/// The instance states `GET /` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum InstanceState {
    /// Configuration phase: nothing runs yet.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs run.
    Running,
    /// Paused by `PATCH /vm`.
    Paused,
}

/// `GET /version` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FirecrackerVersion {
    /// e.g. "1.13.1".
    pub firecracker_version: String,
}

/// An error answer: `{"fault_message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Fault {
    /// What Firecracker says went wrong.
    #[serde(default)]
    pub fault_message: String,
}

/// HTTP methods the API is called with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Read.
    Get,
    /// Create or replace.
    Put,
    /// Partial update.
    Patch,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }
}

/// Every request hearth sends to Firecracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET /`.
    DescribeInstance,
    /// `GET /version`.
    Version,
    /// `PUT /machine-config`.
    MachineConfig(MachineConfiguration),
    /// `PUT /boot-source`.
    BootSource(BootSource),
    /// `PUT /drives/{drive_id}`.
    Drive(Drive),
    /// `PUT /network-interfaces/{iface_id}`.
    NetworkInterface(NetworkInterface),
    /// `PUT /vsock`.
    Vsock(Vsock),
    /// `PUT /logger`.
    Logger(Logger),
    /// `PUT /metrics`.
    Metrics(Metrics),
    /// `PUT /serial`.
    Serial(SerialDevice),
    /// `PUT /actions`.
    Action(InstanceActionInfo),
    /// `PATCH /vm`.
    Vm(Vm),
    /// `PUT /snapshot/create`.
    SnapshotCreate(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    SnapshotLoad(SnapshotLoadParams),
}

impl Request {
    /// The HTTP method.
    pub fn method(&self) -> Method {
        match self {
            Request::DescribeInstance | Request::Version => Method::Get,
            Request::Vm(_) => Method::Patch,
            _ => Method::Put,
        }
    }

    /// The path (ids in paths are hearth's own, made of `[a-z0-9-]`: no escaping needed).
    pub fn path(&self) -> String {
        match self {
            Request::DescribeInstance => "/".into(),
            Request::Version => "/version".into(),
            Request::MachineConfig(_) => "/machine-config".into(),
            Request::BootSource(_) => "/boot-source".into(),
            Request::Drive(d) => format!("/drives/{}", d.drive_id),
            Request::NetworkInterface(n) => format!("/network-interfaces/{}", n.iface_id),
            Request::Vsock(_) => "/vsock".into(),
            Request::Logger(_) => "/logger".into(),
            Request::Metrics(_) => "/metrics".into(),
            Request::Serial(_) => "/serial".into(),
            Request::Action(_) => "/actions".into(),
            Request::Vm(_) => "/vm".into(),
            Request::SnapshotCreate(_) => "/snapshot/create".into(),
            Request::SnapshotLoad(_) => "/snapshot/load".into(),
        }
    }

    /// The JSON body; none for reads.
    pub fn body(&self) -> Option<serde_json::Value> {
        let v = match self {
            Request::DescribeInstance | Request::Version => return None,
            Request::MachineConfig(b) => serde_json::to_value(b),
            Request::BootSource(b) => serde_json::to_value(b),
            Request::Drive(b) => serde_json::to_value(b),
            Request::NetworkInterface(b) => serde_json::to_value(b),
            Request::Vsock(b) => serde_json::to_value(b),
            Request::Logger(b) => serde_json::to_value(b),
            Request::Metrics(b) => serde_json::to_value(b),
            Request::Serial(b) => serde_json::to_value(b),
            Request::Action(b) => serde_json::to_value(b),
            Request::Vm(b) => serde_json::to_value(b),
            Request::SnapshotCreate(b) => serde_json::to_value(b),
            Request::SnapshotLoad(b) => serde_json::to_value(b),
        };
        // These types hold only strings, numbers, booleans and unit enums: they always
        // serialise.
        Some(v.unwrap_or(serde_json::Value::Null))
    }

    /// A short name for errors and events ("PUT /drives/root").
    pub fn describe(&self) -> String {
        format!("{} {}", self.method().as_str(), self.path())
    }
}

/// A MAC address as Firecracker writes it.
pub fn mac_string(mac: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

#[cfg(test)]
#[path = "api_shapes.rs"]
mod shapes;
