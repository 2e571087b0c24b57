//! What a machine spec's `image` string may name, checked before anything is recorded.
//!
//! Parsing is pure (no file system access) so the API can reject a malformed reference
//! with the reason; whether the named directory or archive exists is a separate question
//! (`check_available`) because the answer changes over time and maps to NOT_FOUND.

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// The name of the built-in image.
pub const DEMO: &str = "demo";

/// Archive suffixes hearth unpacks, longest first so `.tar.gz` wins over `.gz`.
const TAR_SUFFIXES: &[&str] = &[".tar.gz", ".tgz", ".tar"];

/// Suffixes that look like an archive or a disk image hearth cannot read. Anything else is
/// taken as a directory, because directory names may contain dots (`/srv/app-1.2`).
const UNSUPPORTED_SUFFIXES: &[&str] = &[
    ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst", ".tzst", ".tar.lz4", ".gz", ".xz", ".bz2",
    ".zst", ".zip", ".7z", ".rar", ".img", ".ext4", ".qcow2", ".iso",
];

/// A root filesystem source a machine can be created from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageRef {
    /// The built-in image: busybox and a web page, built by hearth itself.
    Demo,
    /// A directory on this host holding the root filesystem tree.
    Directory(PathBuf),
    /// A tar archive on this host, `.tar` or gzip-compressed `.tar.gz` / `.tgz`.
    Tarball(PathBuf),
    /// An image in an OCI distribution registry: `host[:port]/repo:tag` or `...@sha256:..`.
    Oci(super::oci::OciRef),
    /// An image in an OCI layout directory on this host: `oci:/dir[:tag]` or
    /// `oci:/dir@sha256:...` (skopeo's spelling); the tag defaults to `latest`.
    Layout {
        /// The layout directory (holds `oci-layout` and `index.json`).
        dir: PathBuf,
        /// A tag of `index.json`, or a `sha256:` manifest or index digest.
        reference: String,
    },
}

/// The prefix of an OCI layout reference.
pub const LAYOUT_PREFIX: &str = "oci:";

/// The tag a layout reference without one names.
const DEFAULT_TAG: &str = "latest";

/// Why an image reference was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageRefError {
    /// The reference is the empty string.
    #[error("image reference is empty (expected \"demo\" or an absolute path)")]
    Empty,
    /// Neither a registry reference nor an absolute path.
    #[error(
        "image reference `{input}` is neither a registry reference (host[:port]/repo:tag or @sha256:...: {why}) nor an absolute path"
    )]
    Relative {
        /// The reference as given.
        input: String,
        /// Why it is no registry reference.
        why: String,
    },
    /// An `oci:` reference whose tag or digest is malformed.
    #[error(
        "image reference `{input}`: `{reference}` is neither a tag ([A-Za-z0-9_][A-Za-z0-9._-]*, at most 128) nor sha256:<64 hex>"
    )]
    LayoutReference {
        /// The reference as given.
        input: String,
        /// The part after the directory.
        reference: String,
    },
    /// An `oci:` reference whose directory is not absolute.
    #[error("image reference `{0}`: the layout directory after `oci:` must be an absolute path")]
    LayoutRelative(String),
    /// A path with a `..` component, which hides where it really points.
    #[error("image reference `{0}` has a `..` component")]
    ParentComponent(String),
    /// The host's own root directory, which is never an image.
    #[error("image reference `/` names the host's root directory")]
    HostRoot,
    /// A path containing a NUL byte, which no system call accepts.
    #[error("image reference `{0}` contains a NUL byte")]
    Nul(String),
    /// An archive or disk format hearth does not read.
    #[error(
        "image reference `{input}` has the unsupported suffix `{suffix}` (supported: a directory, .tar, .tar.gz, .tgz)"
    )]
    UnsupportedSuffix {
        /// The reference as given.
        input: String,
        /// The suffix that was recognised.
        suffix: &'static str,
    },
    /// The named directory or archive does not exist.
    #[error("image {0} does not exist")]
    NotFound(PathBuf),
    /// A directory reference names something that is not a directory.
    #[error("image {0} is not a directory")]
    NotADirectory(PathBuf),
    /// An archive reference names something that is not a regular file.
    #[error("image {0} is not a regular file")]
    NotAFile(PathBuf),
    /// A host path outside every directory the operator opened to images.
    #[error(
        "image reference `{input}`: host paths are images only under images.local_roots \
         ({roots}); the operator lists the directories callers may build images from there"
    )]
    OutsideLocalRoots {
        /// The reference as given.
        input: String,
        /// The configured roots, as text (`none` when empty).
        roots: String,
    },
    /// The path exists but cannot be read.
    #[error("image {path}: {source}")]
    Inaccessible {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl ImageRefError {
    /// Whether the image is simply absent (the API answers NOT_FOUND), as opposed to a
    /// malformed reference (INVALID_ARGUMENT) or a host problem.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ImageRefError::NotFound(_))
    }
}

/// What a machine runs when its spec names no command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    /// The workload's argv; empty means the image has no default and the spec must give one.
    pub command: Vec<String>,
    /// Environment for the workload, sorted by name; the spec's entries override these.
    pub env: Vec<(String, String)>,
}

impl ImageRef {
    /// Parses a spec's `image` string: `demo`; an absolute path to a directory; an
    /// absolute path to a `.tar`, `.tar.gz` or `.tgz` file. Pure: existence is checked by
    /// [`ImageRef::check_available`]. `.` components and repeated slashes are normalised away.
    pub fn parse(s: &str) -> Result<ImageRef, ImageRefError> {
        if s.is_empty() {
            return Err(ImageRefError::Empty);
        }
        if s == DEMO {
            return Ok(ImageRef::Demo);
        }
        if s.contains('\0') {
            return Err(ImageRefError::Nul(s.to_string()));
        }
        if let Some(rest) = s.strip_prefix(LAYOUT_PREFIX) {
            return parse_layout(s, rest);
        }
        let raw = Path::new(s);
        if !raw.is_absolute() {
            return super::oci::OciRef::parse(s)
                .map(ImageRef::Oci)
                .map_err(|e| ImageRefError::Relative {
                    input: s.to_string(),
                    why: e.to_string(),
                });
        }
        let path = clean_absolute(s, raw)?;
        let lower = path.to_string_lossy().to_ascii_lowercase();
        if TAR_SUFFIXES.iter().any(|suffix| lower.ends_with(suffix)) {
            return Ok(ImageRef::Tarball(path));
        }
        if let Some(suffix) = UNSUPPORTED_SUFFIXES
            .iter()
            .find(|suffix| lower.ends_with(*suffix))
        {
            return Err(ImageRefError::UnsupportedSuffix {
                input: s.to_string(),
                suffix,
            });
        }
        Ok(ImageRef::Directory(path))
    }

    /// The path on this host the image is read from: a directory, an archive or an OCI
    /// layout; none for the demo and registry images.
    pub fn host_path(&self) -> Option<&Path> {
        match self {
            ImageRef::Demo | ImageRef::Oci(_) => None,
            ImageRef::Directory(path)
            | ImageRef::Tarball(path)
            | ImageRef::Layout { dir: path, .. } => Some(path),
        }
    }

    /// A host path is an image only under one of `roots` (`images.local_roots`): by its
    /// name and, when it exists, by where its links really lead. The demo and registry
    /// images need no root. Checked before [`ImageRef::check_available`], so a caller
    /// learns nothing of paths outside the roots, not even whether they exist.
    pub fn check_local_roots(&self, roots: &[PathBuf]) -> Result<(), ImageRefError> {
        let Some(path) = self.host_path() else {
            return Ok(());
        };
        let real = std::fs::canonicalize(path).ok();
        let inside = roots.iter().any(|root| {
            let real_root = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
            path.starts_with(root)
                && real
                    .as_ref()
                    .is_none_or(|real| real.starts_with(&real_root) && real != Path::new("/"))
        });
        if inside {
            return Ok(());
        }
        let roots = if roots.is_empty() {
            "none".to_string()
        } else {
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(ImageRefError::OutsideLocalRoots {
            input: self.to_string(),
            roots,
        })
    }

    /// Checks that the named directory or archive exists and has the right kind. The demo
    /// image is always available here; its busybox is checked by
    /// `BaseStore::check_available`, which knows the configured path.
    pub fn check_available(&self) -> Result<(), ImageRefError> {
        let (path, want_dir) = match self {
            // Registries are asked when the image is pulled.
            ImageRef::Demo | ImageRef::Oci(_) => return Ok(()),
            ImageRef::Directory(path) | ImageRef::Layout { dir: path, .. } => (path, true),
            ImageRef::Tarball(path) => (path, false),
        };
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageRefError::NotFound(path.clone()));
            }
            Err(source) => {
                return Err(ImageRefError::Inaccessible {
                    path: path.clone(),
                    source,
                });
            }
        };
        match (want_dir, meta.is_dir(), meta.is_file()) {
            (true, true, _) => std::fs::read_dir(path).map(|_| ()),
            (true, false, _) => return Err(ImageRefError::NotADirectory(path.clone())),
            (false, _, true) => std::fs::File::open(path).map(|_| ()),
            (false, _, false) => return Err(ImageRefError::NotAFile(path.clone())),
        }
        .map_err(|source| ImageRefError::Inaccessible {
            path: path.clone(),
            source,
        })
    }

    /// The command and environment a machine gets when its spec gives none. The demo image
    /// serves `/srv/www` with busybox httpd on port 80, in the foreground so the workload's
    /// life is the server's; directories and archives carry no metadata, so they have none.
    pub fn defaults(&self) -> ImageDefaults {
        match self {
            ImageRef::Demo => ImageDefaults {
                command: ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/srv/www"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                env: vec![("PATH".to_string(), "/bin".to_string())],
            },
            // An OCI image's settings come from its config, read when it is pulled.
            ImageRef::Directory(_)
            | ImageRef::Tarball(_)
            | ImageRef::Oci(_)
            | ImageRef::Layout { .. } => ImageDefaults::default(),
        }
    }

    /// Whether the image is an OCI image (registry or layout), whose workload settings
    /// come from its config.
    pub fn is_oci(&self) -> bool {
        matches!(self, ImageRef::Oci(_) | ImageRef::Layout { .. })
    }

    /// Whether a tarball is gzip-compressed (by its suffix, as parsed).
    pub(crate) fn is_gzip(path: &Path) -> bool {
        let lower = path.to_string_lossy().to_ascii_lowercase();
        lower.ends_with(".gz") || lower.ends_with(".tgz")
    }
}

impl fmt::Display for ImageRef {
    /// The canonical reference string: `parse(x.to_string()) == x`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Demo => f.write_str(DEMO),
            ImageRef::Directory(path) | ImageRef::Tarball(path) => write!(f, "{}", path.display()),
            ImageRef::Oci(reference) => write!(f, "{reference}"),
            ImageRef::Layout { dir, reference } if reference.starts_with("sha256:") => {
                write!(f, "{LAYOUT_PREFIX}{}@{reference}", dir.display())
            }
            ImageRef::Layout { dir, reference } => {
                write!(f, "{LAYOUT_PREFIX}{}:{reference}", dir.display())
            }
        }
    }
}

/// An absolute path without `..`, normalised; never the host's root.
fn clean_absolute(input: &str, raw: &Path) -> Result<PathBuf, ImageRefError> {
    if raw.components().any(|c| c == Component::ParentDir) {
        return Err(ImageRefError::ParentComponent(input.to_string()));
    }
    let path: PathBuf = raw.components().collect();
    if path.file_name().is_none() {
        // Only `/` itself has no file name.
        return Err(ImageRefError::HostRoot);
    }
    Ok(path)
}

/// `oci:/dir`, `oci:/dir:tag` or `oci:/dir@sha256:<hex>`. A `:` counts as the tag's
/// separator only in the last path component, so directories may contain colons.
fn parse_layout(input: &str, rest: &str) -> Result<ImageRef, ImageRefError> {
    let (dir, reference) = if let Some((dir, digest)) = rest.rsplit_once('@') {
        (dir, digest.to_string())
    } else {
        let last_slash = rest.rfind('/').unwrap_or(0);
        match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                rest[last_slash + i + 1..].to_string(),
            ),
            None => (rest, DEFAULT_TAG.to_string()),
        }
    };
    let valid = if let Some(hex) = reference.strip_prefix("sha256:") {
        super::is_valid_digest(hex)
    } else {
        is_valid_tag(&reference)
    };
    if !valid {
        return Err(ImageRefError::LayoutReference {
            input: input.to_string(),
            reference,
        });
    }
    let raw = Path::new(dir);
    if !raw.is_absolute() {
        return Err(ImageRefError::LayoutRelative(input.to_string()));
    }
    Ok(ImageRef::Layout {
        dir: clean_absolute(input, raw)?,
        reference,
    })
}

/// An OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn is_valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && tag.len() <= 128
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind() {
        assert_eq!(ImageRef::parse("demo").unwrap(), ImageRef::Demo);
        assert_eq!(
            ImageRef::parse("/srv/rootfs").unwrap(),
            ImageRef::Directory(PathBuf::from("/srv/rootfs"))
        );
        assert_eq!(
            ImageRef::parse("/srv/app-1.2/").unwrap(),
            ImageRef::Directory(PathBuf::from("/srv/app-1.2"))
        );
        assert_eq!(
            ImageRef::parse("/srv/./img.tar").unwrap(),
            ImageRef::Tarball(PathBuf::from("/srv/img.tar"))
        );
        assert_eq!(
            ImageRef::parse("//srv/img.TAR.GZ").unwrap(),
            ImageRef::Tarball(PathBuf::from("/srv/img.TAR.GZ"))
        );
        assert_eq!(
            ImageRef::parse("/srv/img.tgz").unwrap(),
            ImageRef::Tarball(PathBuf::from("/srv/img.tgz"))
        );
    }

    #[test]
    fn registry_references_parse_and_print_back() {
        for text in [
            "127.0.0.1:5000/app:v1",
            "registry.example/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            let image = ImageRef::parse(text).unwrap();
            assert!(matches!(image, ImageRef::Oci(_)), "{text}");
            assert_eq!(image.to_string(), text);
            assert!(image.check_available().is_ok());
        }
        let err = ImageRef::parse("app").unwrap_err().to_string();
        assert!(
            err.contains("registry reference") && err.contains("absolute path"),
            "{err}"
        );
    }

    #[test]
    fn refuses_bad_references_with_the_reason() {
        assert!(matches!(ImageRef::parse(""), Err(ImageRefError::Empty)));
        assert!(matches!(
            ImageRef::parse("Demo"),
            Err(ImageRefError::Relative { .. })
        ));
        assert!(matches!(
            ImageRef::parse("srv/img.tar"),
            Err(ImageRefError::Relative { .. })
        ));
        assert!(matches!(
            ImageRef::parse("./x"),
            Err(ImageRefError::Relative { .. })
        ));
        assert!(matches!(
            ImageRef::parse("/srv/../etc"),
            Err(ImageRefError::ParentComponent(_))
        ));
        assert!(matches!(
            ImageRef::parse("/srv/a\0b"),
            Err(ImageRefError::Nul(_))
        ));
        assert!(matches!(ImageRef::parse("/"), Err(ImageRefError::HostRoot)));
        assert!(matches!(
            ImageRef::parse("//./"),
            Err(ImageRefError::HostRoot)
        ));
        let err = ImageRef::parse("/srv/img.tar.xz").unwrap_err();
        assert!(matches!(
            err,
            ImageRefError::UnsupportedSuffix {
                suffix: ".tar.xz",
                ..
            }
        ));
        let message = err.to_string();
        assert!(
            message.contains("/srv/img.tar.xz") && message.contains(".tar.xz"),
            "{message}"
        );
        assert!(matches!(
            ImageRef::parse("/srv/img.zip"),
            Err(ImageRefError::UnsupportedSuffix { suffix: ".zip", .. })
        ));
    }

    #[test]
    fn layout_references_parse_with_tag_digest_or_the_default() {
        let digest = format!("sha256:{}", "a".repeat(64));
        for (text, dir, reference, printed) in [
            ("oci:/srv/app", "/srv/app", "latest", "oci:/srv/app:latest"),
            ("oci:/srv/app:v1.2", "/srv/app", "v1.2", "oci:/srv/app:v1.2"),
            (
                "oci:/srv/a:b/app:v1",
                "/srv/a:b/app",
                "v1",
                "oci:/srv/a:b/app:v1",
            ),
            (
                "oci:/srv/a:b/app",
                "/srv/a:b/app",
                "latest",
                "oci:/srv/a:b/app:latest",
            ),
        ] {
            let image = ImageRef::parse(text).unwrap();
            assert_eq!(
                image,
                ImageRef::Layout {
                    dir: PathBuf::from(dir),
                    reference: reference.into()
                },
                "{text}"
            );
            assert!(image.is_oci());
            assert_eq!(image.to_string(), printed);
            assert_eq!(ImageRef::parse(printed).unwrap(), image);
        }
        let by_digest = format!("oci:/srv/app@{digest}");
        let image = ImageRef::parse(&by_digest).unwrap();
        assert_eq!(image.to_string(), by_digest);
        for (bad, says) in [
            ("oci:srv/app", "absolute"),
            ("oci:/srv/app:", "neither a tag"),
            ("oci:/srv/app:-x", "neither a tag"),
            ("oci:/srv/app@sha256:abc", "neither a tag"),
            ("oci:/srv/../app", "`..`"),
            ("oci:/:v1", "root"),
        ] {
            let err = ImageRef::parse(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["demo", "/srv/rootfs", "/srv/img.tar.gz"] {
            let parsed = ImageRef::parse(s).unwrap();
            assert_eq!(parsed.to_string(), s);
            assert_eq!(ImageRef::parse(&parsed.to_string()).unwrap(), parsed);
        }
    }

    #[test]
    fn availability_distinguishes_missing_from_wrong_kind() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("img.tar");
        std::fs::write(&file, b"").unwrap();
        assert!(ImageRef::Demo.check_available().is_ok());
        // Host paths only under the operator's roots, by name and by where links lead.
        let roots = vec![dir.path().to_path_buf()];
        assert!(
            ImageRef::Directory(dir.path().join("x"))
                .check_local_roots(&roots)
                .is_ok()
        );
        assert!(ImageRef::Demo.check_local_roots(&[]).is_ok());
        let outside = ImageRef::parse("/etc")
            .unwrap()
            .check_local_roots(&roots)
            .unwrap_err();
        assert!(
            outside.to_string().contains("images.local_roots"),
            "{outside}"
        );
        let none = ImageRef::parse("/etc")
            .unwrap()
            .check_local_roots(&[])
            .unwrap_err();
        assert!(none.to_string().contains("(none)"), "{none}");
        std::os::unix::fs::symlink("/etc", dir.path().join("escape")).unwrap();
        let linked = ImageRef::Directory(dir.path().join("escape"));
        assert!(
            linked.check_local_roots(&roots).is_err(),
            "a link out of the root"
        );
        assert!(
            ImageRef::Directory(dir.path().to_path_buf())
                .check_available()
                .is_ok()
        );
        assert!(ImageRef::Tarball(file.clone()).check_available().is_ok());
        let missing = ImageRef::Directory(dir.path().join("nope"))
            .check_available()
            .unwrap_err();
        assert!(missing.is_not_found(), "{missing}");
        let wrong = ImageRef::Directory(file).check_available().unwrap_err();
        assert!(matches!(wrong, ImageRefError::NotADirectory(_)) && !wrong.is_not_found());
        let wrong = ImageRef::Tarball(dir.path().to_path_buf())
            .check_available()
            .unwrap_err();
        assert!(matches!(wrong, ImageRefError::NotAFile(_)));
    }

    #[test]
    fn only_demo_has_a_default_command() {
        let demo = ImageRef::Demo.defaults();
        assert_eq!(
            demo.command[..2],
            ["/bin/busybox".to_string(), "httpd".to_string()]
        );
        assert!(
            demo.command.contains(&"-f".to_string()) && demo.command.contains(&"80".to_string())
        );
        assert!(
            ImageRef::Directory(PathBuf::from("/x"))
                .defaults()
                .command
                .is_empty()
        );
        assert!(
            ImageRef::Tarball(PathBuf::from("/x.tar"))
                .defaults()
                .command
                .is_empty()
        );
    }
}
