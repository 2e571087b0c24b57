//! A machine directory as what it is: its VMM's. The VMM's uid owns it (0700) and can
//! replace any name in it with a link, a FIFO or a directory, at any moment. Root, which
//! still makes, opens, rotates, truncates, renames, connects to and removes names there,
//! does all of it through this type:
//!
//! - the directory is opened once, `O_DIRECTORY | O_NOFOLLOW`, from its path in the
//!   root-owned `machines/` (which no VMM can change), and every name is resolved
//!   against that descriptor (`openat`, `renameat`, `unlinkat`): no path is walked twice;
//! - a name is never followed: `O_NOFOLLOW` on every open, `AT_SYMLINK_NOFOLLOW` on every
//!   stat;
//! - opens never block: `O_NONBLOCK`, so a FIFO the VMM planted returns at once, and is
//!   then refused as not a regular file;
//! - a file root writes must be a regular file with one link (a second link would be an
//!   inode shared with something outside, hard-linked in by the VMM);
//! - sockets are reached through an `O_PATH` descriptor of the name itself (refused
//!   unless it is a socket) and `/proc/self/fd/<n>`, so a link to another machine's
//!   socket is never connected to, and the path's length never matters.
//!
//! A name the VMM replaced comes back as [`replaced`] error (kind `InvalidData`, saying
//! what was found): the caller treats it as drift and removes the name
//! ([`VmmDir::remove`]) or fails the step; nothing outside the directory is touched.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// An open machine directory (see the module header).
#[derive(Debug)]
pub struct VmmDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// The error for a name that is not what root made there.
pub fn replaced(name: &OsStr, found: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is {found}, not the regular file the daemon made: replaced from inside the \
             machine directory",
            name.to_string_lossy()
        ),
    )
}

/// Whether `e` says a name was replaced (a link, FIFO, directory or shared inode).
pub fn is_replaced(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidData
        || e.raw_os_error() == Some(libc::ELOOP)
        || e.raw_os_error() == Some(libc::EISDIR)
        || e.raw_os_error() == Some(libc::ENXIO)
}

fn describe(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice | FileType::BlockDevice => "a device",
        FileType::Unknown => "of an unknown type",
    }
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only; the file must exist.
    Read,
    /// Read and write (to truncate); the file must exist.
    ReadWrite,
    /// Appended to, created (0600) if missing.
    Append,
    /// Created new (0600) and written; an existing name is an error.
    CreateNew,
}

impl VmmDir {
    /// Opens the directory at `path`, whose parent must be root's. Fails if `path` is a
    /// link or not a directory.
    pub fn open(path: &Path) -> io::Result<VmmDir> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(VmmDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The directory of `path` (opened as by [`VmmDir::open`]) and the file's name in
    /// it.
    pub fn parent_of(path: &Path) -> io::Result<(VmmDir, std::ffi::OsString)> {
        match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => Ok((VmmDir::open(dir)?, name.to_os_string())),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file in a directory", path.display()),
            )),
        }
    }

    /// The directory's path (for messages; never opened again through it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` in this directory, as a path (for messages).
    pub fn show(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Opens the regular file `name` without following a link or blocking; anything else
    /// there is [`replaced`]. A file opened to write must have one link.
    pub fn open_file(&self, name: impl AsRef<OsStr>, access: Access) -> io::Result<File> {
        let name = checked(name.as_ref())?;
        let base = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
        let flags = match access {
            Access::Read => OFlags::RDONLY,
            Access::ReadWrite => OFlags::RDWR,
            Access::Append => OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE,
            Access::CreateNew => OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        };
        let fd = rustix::fs::openat(&self.fd, name, base | flags, Mode::from_raw_mode(0o600))?;
        let stat = rustix::fs::fstat(&fd)?;
        let kind = FileType::from_raw_mode(stat.st_mode);
        if kind != FileType::RegularFile {
            return Err(replaced(name, describe(kind)));
        }
        if access != Access::Read && stat.st_nlink > 1 {
            return Err(replaced(name, "a file with another link"));
        }
        // Writes and reads block as usual from here (a regular file never blocks anyway).
        rustix::fs::fcntl_setfl(&fd, rustix::fs::fcntl_getfl(&fd)? - OFlags::NONBLOCK)?;
        Ok(File::from(fd))
    }

    /// What `name` is, without following it; none when missing.
    pub fn kind(&self, name: impl AsRef<OsStr>) -> io::Result<Option<FileType>> {
        let name = checked(name.as_ref())?;
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(FileType::from_raw_mode(stat.st_mode))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The size of the regular file `name`; none when missing; [`replaced`] when it is
    /// anything else.
    pub fn file_len(&self, name: impl AsRef<OsStr>) -> io::Result<Option<u64>> {
        let name = checked(name.as_ref())?;
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => {
                let kind = FileType::from_raw_mode(stat.st_mode);
                if kind == FileType::RegularFile {
                    Ok(Some(stat.st_size as u64))
                } else {
                    Err(replaced(name, describe(kind)))
                }
            }
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `from` to `to` inside the directory: whatever is at `to` is replaced, not
    /// followed (a directory there, which a rename cannot replace, is removed first).
    pub fn rename(&self, from: impl AsRef<OsStr>, to: impl AsRef<OsStr>) -> io::Result<()> {
        let (from, to) = (checked(from.as_ref())?, checked(to.as_ref())?);
        if self.kind(to)? == Some(FileType::Directory) {
            self.remove(to)?;
        }
        rustix::fs::renameat(&self.fd, from, &self.fd, to)?;
        Ok(())
    }

    /// Removes `name`, whatever it is (a directory with everything in it, never following
    /// a link inside). A missing name is fine. Idempotent.
    pub fn remove(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        let name = checked(name.as_ref())?;
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {
                // std's remove_dir_all opens each level without following links.
                match std::fs::remove_dir_all(self.path.join(name)) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The directory `name` in this one, made (0700) if missing, opened without following
    /// a link: something else there is [`replaced`]. Idempotent.
    pub fn make_dir(&self, name: impl AsRef<OsStr>) -> io::Result<VmmDir> {
        let name = checked(name.as_ref())?;
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                replaced(name, "not a directory")
            }
            e => e.into(),
        })?;
        Ok(VmmDir {
            fd,
            path: self.path.join(name),
        })
    }

    /// Gives this directory itself to `uid:gid` (through its descriptor). Idempotent.
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        rustix::fs::fchown(
            &self.fd,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )?;
        Ok(())
    }

    /// The owner (uid, gid) of this directory.
    pub fn owner(&self) -> io::Result<(u32, u32)> {
        let stat = rustix::fs::fstat(&self.fd)?;
        Ok((stat.st_uid, stat.st_gid))
    }

    /// Writes `data` as the file `name`, whole or not at all: written and synced under a
    /// fresh temporary name, then renamed over whatever `name` is. Idempotent.
    pub fn replace_file(&self, name: impl AsRef<OsStr>, data: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let name = checked(name.as_ref())?;
        let mut tmp = name.to_os_string();
        tmp.push(".tmp");
        self.remove(&tmp)?;
        let mut file = self.open_file(&tmp, Access::CreateNew)?;
        file.write_all(data)?;
        file.sync_all()?;
        self.rename(&tmp, name)
    }

    /// Connects to the Unix socket `name`, refusing anything that is not a socket (a
    /// link to another machine's socket included).
    pub async fn connect(&self, name: impl AsRef<OsStr>) -> io::Result<tokio::net::UnixStream> {
        let (fd, path) = self.socket_path(name.as_ref())?;
        let stream = tokio::net::UnixStream::connect(&path).await;
        drop(fd);
        stream
    }

    /// An `O_PATH` descriptor of the socket `name` and the `/proc` path that reaches it.
    fn socket_path(&self, name: &OsStr) -> io::Result<(OwnedFd, PathBuf)> {
        let name = checked(name)?;
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
        if kind != FileType::Socket {
            return Err(replaced(name, describe(kind)));
        }
        let path = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd())
        ));
        Ok((fd, path))
    }
}

/// Connects to the Unix socket at `path`, in a directory a VMM can write, as
/// [`VmmDir::connect`] does: a link there (to another machine's socket, say) is refused.
pub async fn connect(path: &Path) -> io::Result<tokio::net::UnixStream> {
    let (dir, name) = VmmDir::parent_of(path)?;
    dir.connect(&name).await
}

/// Removes whatever is at `path`, in a directory a VMM can write, as [`VmmDir::remove`]
/// does: the name only. A missing name or directory is fine. Idempotent.
pub fn remove(path: &Path) -> io::Result<()> {
    match VmmDir::parent_of(path).and_then(|(dir, name)| dir.remove(name)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `name` must be one plain name: no `/`, not `.` or `..`, not empty.
fn checked(name: &OsStr) -> io::Result<&OsStr> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} is not a plain file name", name),
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn dir() -> (tempfile::TempDir, VmmDir) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = VmmDir::open(tmp.path()).expect("open");
        (tmp, dir)
    }

    #[test]
    fn links_fifos_and_directories_are_refused_and_the_target_untouched() {
        let (tmp, dir) = dir();
        let outside = tempfile::NamedTempFile::new().expect("outside");
        std::fs::write(outside.path(), b"canary").expect("write");
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("link")).expect("symlink");
        nix::unistd::mkfifo(&tmp.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU)
            .expect("mkfifo");
        std::fs::create_dir(tmp.path().join("sub")).expect("mkdir");
        std::fs::hard_link(outside.path(), tmp.path().join("hard")).expect("hard link");
        for name in ["link", "fifo", "sub", "hard"] {
            for access in [Access::Append, Access::ReadWrite, Access::CreateNew] {
                let e = dir.open_file(name, access).expect_err(name);
                assert!(
                    is_replaced(&e) || e.kind() == io::ErrorKind::AlreadyExists,
                    "{name}: {e}"
                );
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for name in ["link", "fifo", "sub"] {
            let e = dir.open_file(name, Access::Read).expect_err(name);
            assert!(is_replaced(&e), "{name}: {e}");
            assert!(runtime.block_on(dir.connect(name)).is_err(), "{name}");
        }
        assert_eq!(std::fs::read(outside.path()).expect("read"), b"canary");
        // Removing each removes the name only.
        for name in ["link", "fifo", "sub", "hard"] {
            dir.remove(name).expect(name);
            assert!(dir.kind(name).expect("stat").is_none(), "{name}");
        }
        assert_eq!(std::fs::read(outside.path()).expect("read"), b"canary");
    }

    #[test]
    fn files_are_made_appended_replaced_and_renamed() {
        let (tmp, dir) = dir();
        dir.open_file("log", Access::Append)
            .expect("append")
            .write_all(b"one ")
            .expect("write");
        dir.open_file("log", Access::Append)
            .expect("append")
            .write_all(b"two")
            .expect("write");
        let mut text = String::new();
        dir.open_file("log", Access::Read)
            .expect("read")
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "one two");
        assert_eq!(dir.file_len("log").expect("len"), Some(7));
        dir.rename("log", "log.1").expect("rename");
        assert_eq!(dir.file_len("log").expect("len"), None);
        // A planted link at the target name is replaced, not followed.
        let outside = tempfile::NamedTempFile::new().expect("outside");
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("disk")).expect("symlink");
        dir.replace_file("disk", b"config").expect("replace");
        assert_eq!(
            std::fs::read(tmp.path().join("disk")).expect("read"),
            b"config"
        );
        assert_eq!(std::fs::read(outside.path()).expect("read"), b"");
        assert!(dir.open_file("../x", Access::Read).is_err());
        // A directory is made once; a link where one should be is refused.
        let sub = dir.make_dir("snapshots").expect("make");
        assert_eq!(sub.path(), tmp.path().join("snapshots"));
        dir.make_dir("snapshots").expect("again");
        let elsewhere = tempfile::tempdir().expect("elsewhere");
        std::os::unix::fs::symlink(elsewhere.path(), tmp.path().join("away")).expect("symlink");
        let e = dir.make_dir("away").expect_err("a link");
        assert!(is_replaced(&e), "{e}");
    }

    #[tokio::test]
    async fn sockets_are_reached_through_their_own_descriptor() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tmp, dir) = dir();
        let listener = tokio::net::UnixListener::bind(tmp.path().join("s.sock")).expect("bind");
        let mut stream = dir.connect("s.sock").await.expect("connect");
        let (mut accepted, _) = listener.accept().await.expect("accept");
        stream.write_all(b"x").await.expect("write");
        let mut byte = [0u8; 1];
        accepted.read_exact(&mut byte).await.expect("read");
        assert_eq!(&byte, b"x");
        std::os::unix::fs::symlink(tmp.path().join("s.sock"), tmp.path().join("l.sock"))
            .expect("symlink");
        let e = dir.connect("l.sock").await.expect_err("a link to a socket");
        assert!(is_replaced(&e), "{e}");
    }
}
