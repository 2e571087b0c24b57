//! Names of images in OCI distribution registries: `host[:port]/repo[/more]:tag` and
//! `host[:port]/repo@sha256:<hex>`, checked without touching the network.
//!
//! The registry host is always explicit: there is no implied Docker Hub, so a reference
//! means the same thing on every worker whatever its defaults. A tag or a digest is
//! required for the same reason (no implied `latest`).

use std::fmt;

use crate::image::is_valid_digest;

/// Longest repository path the distribution specification allows.
const MAX_REPOSITORY_LEN: usize = 255;
/// Longest tag the distribution specification allows.
const MAX_TAG_LEN: usize = 128;

/// A parsed, valid reference to an image in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OciRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

/// Why a registry reference was refused. Each message quotes the input and the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OciRefError {
    /// The reference is the empty string.
    #[error("image reference is empty (expected host[:port]/repository:tag)")]
    Empty,
    /// A URL scheme was written in front of the registry.
    #[error(
        "image reference `{0}` has a URL scheme; write host[:port]/repository:tag (plain HTTP is allowed per registry by the `insecure` registry setting)"
    )]
    Scheme(String),
    /// The first path component is not a registry host.
    #[error(
        "image reference `{0}` does not start with a registry host (expected host[:port]/repository:tag, e.g. registry.example:5000/app:1.0)"
    )]
    MissingRegistry(String),
    /// The registry host is malformed.
    #[error("image reference `{input}`: registry host `{host}` is not a valid host name")]
    BadHost {
        /// The reference as given.
        input: String,
        /// The host part.
        host: String,
    },
    /// The registry port is not a number from 1 to 65535.
    #[error("image reference `{input}`: registry port `{port}` is not a number from 1 to 65535")]
    BadPort {
        /// The reference as given.
        input: String,
        /// The port part.
        port: String,
    },
    /// A repository path component breaks the distribution grammar.
    #[error(
        "image reference `{input}`: repository component `{component}` is invalid (lowercase letters and digits, separated by `.`, `_`, `__` or dashes)"
    )]
    BadRepository {
        /// The reference as given.
        input: String,
        /// The offending path component.
        component: String,
    },
    /// The repository path is longer than the specification allows.
    #[error("image reference `{0}`: repository is longer than 255 characters")]
    RepositoryTooLong(String),
    /// The tag breaks the distribution grammar.
    #[error(
        "image reference `{input}`: tag `{tag}` is invalid (1 to 128 of letters, digits, `_`, `.`, `-`, not starting with `.` or `-`)"
    )]
    BadTag {
        /// The reference as given.
        input: String,
        /// The tag part.
        tag: String,
    },
    /// The digest uses an algorithm other than sha256.
    #[error(
        "image reference `{input}`: digest algorithm `{algorithm}` is not supported (only sha256)"
    )]
    UnsupportedDigest {
        /// The reference as given.
        input: String,
        /// The algorithm part.
        algorithm: String,
    },
    /// The digest is not `sha256:` followed by 64 lowercase hex digits.
    #[error(
        "image reference `{input}`: digest `{digest}` is malformed (expected sha256: and 64 lowercase hex digits)"
    )]
    BadDigest {
        /// The reference as given.
        input: String,
        /// The digest part.
        digest: String,
    },
    /// Neither a tag nor a digest was given.
    #[error("image reference `{0}` names no tag or digest (add e.g. `:latest` or `@sha256:...`)")]
    MissingTag(String),
}

impl OciRef {
    /// Parses `host[:port]/repo[/more][:tag][@sha256:<hex>]`; a tag or a digest is required.
    /// When both are given the digest is what gets pulled; the tag is kept for display.
    pub fn parse(input: &str) -> Result<OciRef, OciRefError> {
        if input.is_empty() {
            return Err(OciRefError::Empty);
        }
        if input.contains("://") {
            return Err(OciRefError::Scheme(input.to_string()));
        }
        let (name, digest) = match input.split_once('@') {
            Some((name, digest)) => (name, Some(parse_digest(input, digest)?)),
            None => (input, None),
        };
        let (registry, path) = name
            .split_once('/')
            .filter(|(host, _)| looks_like_registry(host))
            .ok_or_else(|| OciRefError::MissingRegistry(input.to_string()))?;
        check_registry(input, registry)?;
        // Path components cannot contain `:`, so a colon after the host is the tag's.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repository, tag)) => (repository, Some(tag)),
            None => (path, None),
        };
        check_repository(input, repository)?;
        if let Some(tag) = tag {
            check_tag(input, tag)?;
        }
        if tag.is_none() && digest.is_none() {
            return Err(OciRefError::MissingTag(input.to_string()));
        }
        Ok(OciRef {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// The registry as written: `host` or `host:port`. This is the key for the insecure
    /// and credential settings.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry, e.g. `team/app`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if one was written.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The manifest digest (`sha256:<hex>`), if one was written.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// What the manifest is asked for by: the digest when one was written (it wins
    /// over the tag), else the tag.
    pub(crate) fn manifest_reference(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest,
            (None, Some(tag)) => tag,
            // `parse` refuses a reference with neither; this arm keeps the type total.
            (None, None) => "latest",
        }
    }
}

impl std::str::FromStr for OciRef {
    type Err = OciRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OciRef::parse(s)
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// The distribution rule for telling a registry from a repository component: a host has
/// a dot or a port, is `localhost`, or is a bracketed IPv6 address.
fn looks_like_registry(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.starts_with('[')
}

fn check_registry(input: &str, registry: &str) -> Result<(), OciRefError> {
    let bad_host = |host: &str| OciRefError::BadHost {
        input: input.to_string(),
        host: host.to_string(),
    };
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(|| bad_host(registry))?;
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err(bad_host(registry));
        }
        match after {
            "" => (registry, None),
            _ => (
                &registry[..registry.len() - after.len()],
                Some(after.strip_prefix(':').ok_or_else(|| bad_host(registry))?),
            ),
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    };
    if !host.starts_with('[') {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if !host.split('.').all(label_ok) {
            return Err(bad_host(host));
        }
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p > 0);
        if !valid {
            return Err(OciRefError::BadPort {
                input: input.to_string(),
                port: port.to_string(),
            });
        }
    }
    Ok(())
}

fn check_repository(input: &str, repository: &str) -> Result<(), OciRefError> {
    if repository.len() > MAX_REPOSITORY_LEN {
        return Err(OciRefError::RepositoryTooLong(input.to_string()));
    }
    for component in repository.split('/') {
        if !valid_component(component) {
            return Err(OciRefError::BadRepository {
                input: input.to_string(),
                component: component.to_string(),
            });
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, written out instead of pulling in a regex.
fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator run: one `.`, one or two `_`, or any number of `-`.
        let run = bytes[i..].iter().take_while(|&&c| c == b).count();
        let ok = match b {
            b'.' => run == 1,
            b'_' => run <= 2,
            b'-' => true,
            _ => false,
        };
        if !ok {
            return false;
        }
        i += run;
    }
    true
}

fn check_tag(input: &str, tag: &str) -> Result<(), OciRefError> {
    let valid = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && !tag.starts_with(['.', '-'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(OciRefError::BadTag {
            input: input.to_string(),
            tag: tag.to_string(),
        })
    }
}

fn parse_digest(input: &str, digest: &str) -> Result<String, OciRefError> {
    let bad = || OciRefError::BadDigest {
        input: input.to_string(),
        digest: digest.to_string(),
    };
    let (algorithm, hex) = digest.split_once(':').ok_or_else(bad)?;
    if algorithm != "sha256" {
        if algorithm.is_empty() || hex.is_empty() {
            return Err(bad());
        }
        return Err(OciRefError::UnsupportedDigest {
            input: input.to_string(),
            algorithm: algorithm.to_string(),
        });
    }
    if !is_valid_digest(hex) {
        return Err(bad());
    }
    Ok(digest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ok(s: &str) -> OciRef {
        match OciRef::parse(s) {
            Ok(r) => r,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn err(s: &str) -> OciRefError {
        match OciRef::parse(s) {
            Ok(r) => panic!("{s} parsed as {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn tag_references_split_into_parts() {
        let r = ok("127.0.0.1:5000/app:v1");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "app");
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.digest(), None);
        assert_eq!(r.to_string(), "127.0.0.1:5000/app:v1");

        let r = ok("registry.example.com/team/sub/app-x_y.z:1.2.3-rc_1");
        assert_eq!(r.registry(), "registry.example.com");
        assert_eq!(r.repository(), "team/sub/app-x_y.z");
        assert_eq!(r.tag(), Some("1.2.3-rc_1"));

        let r = ok("localhost/app:latest");
        assert_eq!(r.registry(), "localhost");
        let r = ok("[::1]:5000/app:latest");
        assert_eq!(r.registry(), "[::1]:5000");
        assert_eq!(r.repository(), "app");
        assert_eq!(ok("r.example/a__b---c:y").repository(), "a__b---c");
    }

    #[test]
    fn digest_references_pin_the_manifest() {
        let s = format!("127.0.0.1:5000/app@sha256:{HEX}");
        let r = ok(&s);
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(format!("sha256:{HEX}").as_str()));
        assert_eq!(r.to_string(), s);
        assert_eq!(r.manifest_reference(), format!("sha256:{HEX}"));
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "app");

        let s = format!("127.0.0.1:5000/app:v1@sha256:{HEX}");
        let r = ok(&s);
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.to_string(), s);
        assert_eq!(r.manifest_reference(), format!("sha256:{HEX}"));
        assert_eq!(ok("127.0.0.1:5000/app:v1").manifest_reference(), "v1");
    }

    #[test]
    fn errors_name_the_wrong_part() {
        assert_eq!(err(""), OciRefError::Empty);
        assert!(matches!(
            err("http://127.0.0.1:5000/app:v1"),
            OciRefError::Scheme(_)
        ));
        assert!(matches!(
            err("library/ubuntu:22.04"),
            OciRefError::MissingRegistry(_)
        ));
        assert!(matches!(
            err("ubuntu:22.04"),
            OciRefError::MissingRegistry(_)
        ));
        assert!(matches!(
            err("127.0.0.1:5000"),
            OciRefError::MissingRegistry(_)
        ));
        assert_eq!(
            err("bad_host.example/app:v1"),
            OciRefError::BadHost {
                input: "bad_host.example/app:v1".into(),
                host: "bad_host.example".into()
            }
        );
        assert_eq!(
            err("127.0.0.1:99999/app:v1"),
            OciRefError::BadPort {
                input: "127.0.0.1:99999/app:v1".into(),
                port: "99999".into()
            }
        );
        assert!(matches!(
            err("127.0.0.1:/app:v1"),
            OciRefError::BadPort { .. }
        ));
        assert!(matches!(
            err("127.0.0.1:0/app:v1"),
            OciRefError::BadPort { .. }
        ));
        for (input, component) in [
            ("r.example/App:v1", "App"),
            ("r.example/a//b:v1", ""),
            ("r.example/a..b:v1", "a..b"),
            ("r.example/a___b:v1", "a___b"),
            ("r.example/-a:v1", "-a"),
            ("r.example/ok/a.:v1", "a."),
        ] {
            assert_eq!(
                err(input),
                OciRefError::BadRepository {
                    input: input.into(),
                    component: component.into()
                },
                "{input}"
            );
        }
        assert!(matches!(
            err(&format!("r.example/{}:v1", "a".repeat(256))),
            OciRefError::RepositoryTooLong(_)
        ));
        for tag in ["", ".x", "-x", "a+b", &"t".repeat(129)] {
            let input = format!("r.example/app:{tag}");
            assert_eq!(
                err(&input),
                OciRefError::BadTag {
                    input: input.clone(),
                    tag: tag.to_string()
                }
            );
        }
        assert_eq!(
            err("r.example/app@sha512:abcd"),
            OciRefError::UnsupportedDigest {
                input: "r.example/app@sha512:abcd".into(),
                algorithm: "sha512".into()
            }
        );
        for digest in [
            "sha256:abc",
            "sha256",
            &format!("sha256:{}", HEX.to_uppercase()),
        ] {
            let input = format!("r.example/app@{digest}");
            assert_eq!(
                err(&input),
                OciRefError::BadDigest {
                    input: input.clone(),
                    digest: digest.to_string()
                }
            );
        }
        assert!(matches!(err("r.example/app"), OciRefError::MissingTag(_)));
        let message = err("r.example/app").to_string();
        assert!(
            message.contains("r.example/app") && message.contains("tag"),
            "{message}"
        );
    }
}
