//! Per-registry policy for pulls: which registries may be spoken to over plain HTTP, which
//! credentials go to which registry, how large a layer and an image may be, how many
//! layers an image may have, and how much free space a pull must leave.
//!
//! Plain HTTP is opt-in per `host:port` because a pull over HTTP can be tampered with on
//! the way (digests protect blobs named by a manifest, but not a manifest named by a tag).

use std::fmt;

use crate::image::space::SpacePolicy;

/// The largest layer accepted when nothing else is configured: 4 GiB compressed.
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 4 << 30;

/// The most layers accepted when nothing else is configured. Real images have tens; the
/// distribution registry and Docker stop at 127-128 too.
pub const DEFAULT_MAX_LAYERS: u64 = 128;

/// The largest image accepted when nothing else is configured: 16 GiB (the default of
/// `images.max_image_mib`).
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 16 << 30;

/// How hearth talks to OCI registries. Built from the daemon's configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistrySettings {
    /// Registries (`host:port`, or `host` for the default port) reached over plain HTTP.
    /// Every other registry is reached over HTTPS only.
    pub insecure: Vec<String>,
    /// Basic-auth credentials: `(host:port, user, password)`. Registries not listed are
    /// pulled from anonymously.
    pub auth: Vec<(String, String, String)>,
    /// A layer whose manifest declares more bytes than this is refused before any of it
    /// is downloaded.
    pub max_layer_bytes: u64,
    /// A manifest with more layers than this is refused before any blob is downloaded.
    pub max_layers: u64,
    /// A manifest whose layers declare more bytes together than this is refused before
    /// any blob is downloaded: the image could not unpack within the same limit.
    pub max_image_bytes: u64,
    /// The free space a pull must leave in the blob directory's file system.
    pub space: SpacePolicy,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            insecure: Vec::new(),
            auth: Vec::new(),
            max_layer_bytes: DEFAULT_MAX_LAYER_BYTES,
            max_layers: DEFAULT_MAX_LAYERS,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            space: SpacePolicy::default(),
        }
    }
}

impl RegistrySettings {
    /// Whether `registry` (`host[:port]` as written in a reference) may use plain HTTP.
    /// Host names compare case-insensitively, as DNS does.
    pub fn is_insecure(&self, registry: &str) -> bool {
        self.insecure
            .iter()
            .any(|listed| listed.eq_ignore_ascii_case(registry))
    }

    /// The user and password configured for `registry`, if any.
    pub fn credentials(&self, registry: &str) -> Option<(&str, &str)> {
        self.auth
            .iter()
            .find(|(listed, _, _)| listed.eq_ignore_ascii_case(registry))
            .map(|(_, user, password)| (user.as_str(), password.as_str()))
    }
}

/// Passwords never reach logs: Debug shows only which registries have credentials.
impl fmt::Debug for RegistrySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth: Vec<(&str, &str, &str)> = self
            .auth
            .iter()
            .map(|(registry, user, _)| (registry.as_str(), user.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("RegistrySettings")
            .field("insecure", &self.insecure)
            .field("auth", &auth)
            .field("max_layer_bytes", &self.max_layer_bytes)
            .field("max_layers", &self.max_layers)
            .field("max_image_bytes", &self.max_image_bytes)
            .field("space", &self.space)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_and_credentials_match_host_and_port_exactly() {
        let s = RegistrySettings {
            insecure: vec!["127.0.0.1:5000".into(), "Registry.Local".into()],
            auth: vec![("127.0.0.1:5000".into(), "u".into(), "secret".into())],
            max_layer_bytes: 1,
            ..RegistrySettings::default()
        };
        assert!(s.is_insecure("127.0.0.1:5000"));
        assert!(s.is_insecure("registry.local"));
        assert!(!s.is_insecure("127.0.0.1:5001"));
        assert!(!s.is_insecure("127.0.0.1"));
        assert_eq!(s.credentials("127.0.0.1:5000"), Some(("u", "secret")));
        assert_eq!(s.credentials("127.0.0.1"), None);
        let debug = format!("{s:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }
}
