//! The store's bounds (`[store]` in the daemon's config) and their defaults.

use serde::Deserialize;

/// The store's bounds (`[store]`): what is kept of a machine's history, and for how long
/// a destroyed machine is remembered.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// A destroyed machine's record, events and request id are kept this long after it
    /// was destroyed, in seconds; then they are compacted away and the request id may be
    /// used again.
    pub retention_secs: u64,
    /// How often compaction runs, in seconds.
    pub compact_interval_secs: u64,
    /// Events kept from the start of a machine's history (its creation and first run).
    pub events_first: u32,
    /// Events kept from the end of a machine's history; those between the first and the
    /// last are dropped as new ones come.
    pub events_last: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            retention_secs: 24 * 3600,
            compact_interval_secs: 60,
            events_first: 16,
            events_last: 256,
        }
    }
}
