//! What hearth remembers about each base beyond the file itself: the references it was
//! made from, the blobs it was built from, and when it was built and last used. The
//! base file is the truth of what exists; this record (in redb, table `images`, written
//! only by the RootfsCache) is what listing and collection need to know about it.

use serde::{Deserialize, Serialize};

/// Most references remembered for one base (a tag pushed again and again keeps naming
/// new bases; an old base does not need its whole history).
pub const MAX_NAMES: usize = 16;

/// The durable record of one base, keyed by the base digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageEntry {
    /// The references that resolved to this base, newest first (`demo`, a path,
    /// `host:port/repo:tag`, `oci:/dir:tag`).
    pub names: Vec<String>,
    /// The OCI manifest digest, for registry and layout images.
    pub manifest_digest: Option<String>,
    /// Digests of the pulled blobs (manifest's config and layers) kept in the blob
    /// directory for this base; empty for images read in place.
    pub blobs: Vec<String>,
    /// The config blob's digest (registry images): the workload settings, read again when
    /// the registry cannot be reached and this base is used as it is.
    pub config_digest: Option<String>,
    /// When the base was built (or first seen), seconds since the epoch.
    pub built_unix: u64,
    /// When a machine create or a pull last asked for it, seconds since the epoch.
    pub last_used_unix: u64,
}

impl ImageEntry {
    /// Records a use by `name` at `now`: the name moves to the front.
    pub fn used_as(&mut self, name: &str, now: u64) {
        self.names.retain(|n| n != name);
        self.names.insert(0, name.to_string());
        self.names.truncate(MAX_NAMES);
        self.last_used_unix = self.last_used_unix.max(now);
    }

    /// Whether `wanted` names this base: a name it was made from, its digest, or a
    /// prefix of the digest at least 12 characters long.
    pub fn is_named(&self, digest: &str, wanted: &str) -> bool {
        let bare = wanted.strip_prefix("sha256:").unwrap_or(wanted);
        self.names.iter().any(|n| n == wanted)
            || (bare.len() >= 12 && digest.starts_with(bare))
            || self.manifest_digest.as_deref() == Some(wanted)
    }
}

/// Seconds since the epoch now (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_use_moves_the_name_to_the_front_and_keeps_the_latest_time() {
        let mut e = ImageEntry::default();
        e.used_as("a", 10);
        e.used_as("b", 5);
        e.used_as("a", 7);
        assert_eq!(e.names, ["a", "b"]);
        assert_eq!(e.last_used_unix, 10);
        for i in 0..40 {
            e.used_as(&format!("n{i}"), 11);
        }
        assert_eq!(e.names.len(), MAX_NAMES);
        assert_eq!(e.names[0], "n39");
    }

    #[test]
    fn names_digests_and_long_prefixes_match() {
        let digest = "ab".repeat(32);
        let e = ImageEntry {
            names: vec!["127.0.0.1:5000/app:v1".into()],
            manifest_digest: Some(format!("sha256:{}", "cd".repeat(32))),
            ..ImageEntry::default()
        };
        assert!(e.is_named(&digest, "127.0.0.1:5000/app:v1"));
        assert!(!e.is_named(&digest, "127.0.0.1:5000/app:v2"));
        assert!(e.is_named(&digest, &digest));
        assert!(e.is_named(&digest, "abababababab"));
        assert!(e.is_named(&digest, "sha256:abababababab"));
        assert!(
            !e.is_named(&digest, "ababab"),
            "short prefixes are ambiguous"
        );
        assert!(e.is_named(&digest, &format!("sha256:{}", "cd".repeat(32))));
    }
}
