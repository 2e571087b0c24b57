//! The guest's settings (`[guest]` in the daemon's config: the kit and the lifecycle's
//! deadlines) and their defaults.

use std::path::PathBuf;

use serde::Deserialize;

/// Guest kit and deadlines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    /// The extracted `linux-image-*-cloud-amd64` package (holds `boot/` and `lib/modules/`).
    pub kernel_dir: PathBuf,
    /// The static `hearth-init`; empty means `hearth-init-static` beside the hearthd binary.
    pub init_binary: PathBuf,
    /// How long one boot may take to signal readiness, in seconds.
    pub ready_timeout_secs: u64,
    /// Boots tried before the machine fails.
    pub boot_attempts: u32,
    /// How long a graceful stop may take before the VMM is killed, in seconds.
    pub stop_grace_secs: u64,
    /// Restarts of a guest that was ready and then stopped by itself (its VMM exited),
    /// within `restart_window_secs`, before the machine fails. At most 63.
    pub max_restarts: u32,
    /// The window restarts are counted in, in seconds.
    pub restart_window_secs: u64,
    /// Delay before restarting a crashed guest, in ms; it doubles with each further crash
    /// within the window.
    pub restart_backoff_ms: u64,
    /// Longest delay before a restart, in ms.
    pub restart_backoff_max_ms: u64,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            kernel_dir: PathBuf::from("/usr/local/lib/hearth/kernel"),
            init_binary: PathBuf::new(),
            ready_timeout_secs: 60,
            boot_attempts: 3,
            stop_grace_secs: 10,
            max_restarts: 10,
            restart_window_secs: 600,
            restart_backoff_ms: 1000,
            restart_backoff_max_ms: 60_000,
        }
    }
}
