//! Image references as a caller writes them, and the checks the API runs before anything
//! is recorded: the shape of the reference, and whether it names something that exists.

use std::path::{Component, Path, PathBuf};

/// Where a machine's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageRef {
    /// The built-in demo image (busybox and a web page).
    Demo,
    /// A root filesystem directory on the host.
    Directory(PathBuf),
    /// A tar archive of a root filesystem on the host.
    Tarball(PathBuf),
}

/// An image reference that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    /// The reference is not of a supported shape.
    #[error(
        "{0:?} is not an image reference (\"demo\", or an absolute path to a directory or a .tar file)"
    )]
    Malformed(String),
    /// The path has `..` components.
    #[error("{0:?} must not contain `..`")]
    Traversal(String),
    /// Nothing is at the path.
    #[error("image {0} not found")]
    NotFound(String),
}

impl ImageRefError {
    /// True when the reference is well formed but names nothing.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ImageRefError::NotFound(_))
    }
}

/// What a machine runs when its spec gives no command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    /// The command.
    pub command: Vec<String>,
    /// The environment.
    pub env: Vec<(String, String)>,
}

impl ImageRef {
    /// Parses `demo`, `/abs/dir` or `/abs/file.tar`.
    pub fn parse(text: &str) -> Result<ImageRef, ImageRefError> {
        if text == "demo" {
            return Ok(ImageRef::Demo);
        }
        let path = Path::new(text);
        if !path.is_absolute() {
            return Err(ImageRefError::Malformed(text.to_string()));
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(ImageRefError::Traversal(text.to_string()));
        }
        if text.ends_with(".tar") {
            Ok(ImageRef::Tarball(path.to_path_buf()))
        } else {
            Ok(ImageRef::Directory(path.to_path_buf()))
        }
    }

    /// Checks that the reference names something on this host.
    pub fn check_available(&self) -> Result<(), ImageRefError> {
        let ok = match self {
            ImageRef::Demo => true,
            ImageRef::Directory(path) => path.is_dir(),
            ImageRef::Tarball(path) => path.is_file(),
        };
        if ok {
            Ok(())
        } else {
            Err(ImageRefError::NotFound(self.to_string()))
        }
    }

    /// The command and environment used when the spec gives none.
    pub fn defaults(&self) -> ImageDefaults {
        match self {
            ImageRef::Demo => ImageDefaults {
                command: super::demo::COMMAND.iter().map(|s| s.to_string()).collect(),
                env: vec![("PATH".into(), "/bin".into())],
            },
            ImageRef::Directory(_) | ImageRef::Tarball(_) => ImageDefaults::default(),
        }
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Demo => f.write_str("demo"),
            ImageRef::Directory(p) | ImageRef::Tarball(p) => write!(f, "{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        assert_eq!(ImageRef::parse("demo"), Ok(ImageRef::Demo));
        assert_eq!(
            ImageRef::parse("/srv/root"),
            Ok(ImageRef::Directory("/srv/root".into()))
        );
        assert_eq!(
            ImageRef::parse("/srv/root.tar"),
            Ok(ImageRef::Tarball("/srv/root.tar".into()))
        );
        assert!(matches!(
            ImageRef::parse("relative"),
            Err(ImageRefError::Malformed(_))
        ));
        assert!(matches!(
            ImageRef::parse("/a/../etc"),
            Err(ImageRefError::Traversal(_))
        ));
        assert!(
            ImageRef::parse("/nonexistent/x")
                .expect("parse")
                .check_available()
                .unwrap_err()
                .is_not_found()
        );
        assert!(ImageRef::Demo.check_available().is_ok());
        assert!(!ImageRef::Demo.defaults().command.is_empty());
    }
}
