//! Image bases and machine disks against the real tools: mkfs.ext4, e2fsck, debugfs,
//! resize2fs, and a loop-mounted XFS for reflink clones (root only).
//!
//! Run with `--nocapture` to see the measured figures.

mod support;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use hearth::image::{
    BaseError, BaseSettings, BaseStore, CloneMethod, ImageRef, TarballError, clone_disk,
    remove_disk, same_content,
};

use support::host_tools::{LoopXfs, run};

const MIB: u64 = 1 << 20;

fn debugfs(image: &Path, request: &str) -> String {
    run("debugfs", &["-R", request, image.to_str().unwrap()])
}

fn fsck_clean(image: &Path) {
    run("e2fsck", &["-fn", image.to_str().unwrap()]);
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn store(root: &Path, headroom_mib: u64) -> BaseStore {
    BaseStore::open(
        root,
        BaseSettings {
            headroom_mib,
            ..BaseSettings::default()
        },
    )
    .unwrap()
}

fn tmp_entries(store: &BaseStore) -> Vec<PathBuf> {
    std::fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

#[test]
fn demo_base_is_a_valid_ext4_and_a_second_ensure_is_a_cache_hit() {
    let dir = tempfile::tempdir().unwrap();
    let bases = store(&dir.path().join("images"), 64);
    let t = Instant::now();
    let base = bases.ensure_base(&ImageRef::Demo).unwrap();
    let cold = ms(t);
    fsck_clean(&base.path);
    let page = debugfs(&base.path, "cat /srv/www/index.html");
    assert!(page.contains("hearth demo"), "{page}");
    let sh = debugfs(&base.path, "stat /bin/sh");
    assert!(
        sh.contains("Type: symlink") && sh.contains("\"busybox\""),
        "{sh}"
    );
    let tmp = debugfs(&base.path, "stat /tmp");
    assert!(tmp.contains("Mode:  01777"), "{tmp}");
    let busybox = debugfs(&base.path, "stat /bin/busybox");
    assert!(busybox.contains("User:     0   Group:     0"), "{busybox}");
    assert!(run("dumpe2fs", &["-h", base.path.to_str().unwrap()]).contains("hearth-root"));
    assert_eq!(std::fs::metadata(&base.path).unwrap().mode() & 0o777, 0o444);
    let mtime = std::fs::metadata(&base.path).unwrap().modified().unwrap();

    let t = Instant::now();
    let again = bases.ensure_base(&ImageRef::Demo).unwrap();
    let cached = ms(t);
    assert_eq!(again, base);
    assert_eq!(
        std::fs::metadata(&base.path).unwrap().modified().unwrap(),
        mtime
    );
    assert_eq!(bases.list().unwrap(), vec![base.clone()]);
    assert!(tmp_entries(&bases).is_empty());
    // A reopened store finds the same base.
    let reopened = store(&dir.path().join("images"), 64);
    assert_eq!(reopened.ensure_base(&ImageRef::Demo).unwrap(), base);
    println!(
        "demo base: cold ensure {cold:.0} ms, cached ensure {cached:.1} ms, size {} MiB, allocated {} KiB",
        base.size_bytes / MIB,
        allocated(&base.path) / 1024
    );
}

#[test]
fn a_changed_directory_gives_a_new_digest() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::create_dir_all(tree.join("data")).unwrap();
    std::fs::write(tree.join("etc/motd"), b"first\n").unwrap();
    // Many small files and one large one: the sizing must fit them with no headroom.
    for i in 0..3000 {
        std::fs::write(tree.join(format!("data/f{i}")), format!("file {i}\n")).unwrap();
    }
    std::fs::write(tree.join("data/big"), vec![0x5au8; 20 << 20]).unwrap();
    let bases = store(&dir.path().join("images"), 0);
    let image = ImageRef::parse(tree.to_str().unwrap()).unwrap();
    let first = bases.ensure_base(&image).unwrap();
    fsck_clean(&first.path);
    assert!(debugfs(&first.path, "cat /etc/motd").contains("first"));
    assert!(debugfs(&first.path, "cat /data/f2999").contains("file 2999"));

    std::fs::write(tree.join("etc/motd"), b"second\n").unwrap();
    let second = bases.ensure_base(&image).unwrap();
    assert_ne!(second.digest, first.digest);
    assert!(debugfs(&second.path, "cat /etc/motd").contains("second"));
    assert_eq!(bases.list().unwrap().len(), 2);

    assert!(bases.remove(&first.digest).unwrap(), "the base was there");
    assert!(!bases.remove(&first.digest).unwrap(), "already gone");
    assert_eq!(bases.list().unwrap(), vec![second]);
}

/// A tar whose entries are written raw, so names the `tar` crate's builder refuses
/// (`../evil`, absolute paths) can be made.
struct RawTar(tar::Builder<Vec<u8>>);

impl RawTar {
    fn new() -> Self {
        RawTar(tar::Builder::new(Vec::new()))
    }

    fn entry(mut self, name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Self {
        let mut header = tar::Header::new_gnu();
        {
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(link) = link {
                gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
        }
        header.set_entry_type(kind);
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_uid(1234);
        header.set_gid(4321);
        header.set_mtime(1_700_000_000);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.0.append(&header, data).unwrap();
        self
    }

    fn device(mut self, name: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
        let mut header = tar::Header::new_ustar();
        header.set_path(name).unwrap();
        header.set_entry_type(kind);
        header.set_mode(0o666);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(0);
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
        header.set_cksum();
        self.0.append(&header, &[][..]).unwrap();
        self
    }

    fn write(self, path: &Path) {
        std::fs::write(path, self.0.into_inner().unwrap()).unwrap();
    }
}

#[test]
fn a_tarball_with_escaping_entries_is_refused_naming_the_entry() {
    use tar::EntryType::{Directory, Regular, Symlink};
    let dir = tempfile::tempdir().unwrap();
    let bases = store(&dir.path().join("images"), 16);
    let cases: Vec<(&str, RawTar)> = vec![
        (
            "../evil",
            RawTar::new()
                .entry("etc/", Directory, None, b"")
                .entry("etc/ok", Regular, None, b"fine")
                .entry("../evil", Regular, None, b"pwned"),
        ),
        ("/abs", RawTar::new().entry("/abs", Regular, None, b"x")),
        (
            "lib/evil",
            RawTar::new()
                .entry("lib", Symlink, Some("/etc"), b"")
                .entry("lib/evil", Regular, None, b"x"),
        ),
        (
            "up",
            RawTar::new().entry("up", Symlink, Some("../../etc/passwd"), b""),
        ),
        (
            "hard",
            RawTar::new().entry("hard", tar::EntryType::Link, Some("../etc/passwd"), b""),
        ),
    ];
    for (i, (entry, tar)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.tar"));
        tar.write(&path);
        let err = bases
            .ensure_base(&ImageRef::parse(path.to_str().unwrap()).unwrap())
            .unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(
                err,
                BaseError::Unpack {
                    source: TarballError::Escapes { .. },
                    ..
                }
            ),
            "{entry}: {message}"
        );
        assert!(
            message.contains(&format!("`{entry}`")),
            "{entry}: {message}"
        );
        assert!(tmp_entries(&bases).is_empty(), "{entry}: temporaries left");
    }
    assert!(!dir.path().join("evil").exists());
    assert!(bases.list().unwrap().is_empty());
}

#[test]
fn a_gzipped_tarball_unpacks_owners_links_and_devices() {
    use tar::EntryType::{Directory, Fifo, Link, Regular, Symlink};
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("root.tar");
    RawTar::new()
        .entry("./", Directory, None, b"")
        .entry("./usr/bin/", Directory, None, b"")
        .entry("./usr/bin/tool", Regular, None, b"#!/bin/sh\necho tool\n")
        .entry("./usr/bin/tool2", Link, Some("./usr/bin/tool"), b"")
        .entry("./bin", Symlink, Some("usr/bin"), b"")
        .entry("./etc/motd", Regular, None, b"from a tarball\n")
        .entry("./run/fifo", Fifo, None, b"")
        .device("./dev/null", tar::EntryType::Char, 1, 3)
        .write(&plain);
    let gz = dir.path().join("root.tar.gz");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, &std::fs::read(&plain).unwrap()).unwrap();
    std::fs::write(&gz, encoder.finish().unwrap()).unwrap();

    let bases = store(&dir.path().join("images"), 16);
    let base = bases
        .ensure_base(&ImageRef::parse(gz.to_str().unwrap()).unwrap())
        .unwrap();
    fsck_clean(&base.path);
    assert!(debugfs(&base.path, "cat /etc/motd").contains("from a tarball"));
    let tool = debugfs(&base.path, "stat /usr/bin/tool");
    assert!(tool.contains("User:  1234   Group:  4321"), "{tool}");
    assert!(tool.contains("Links: 2"), "{tool}");
    assert!(debugfs(&base.path, "stat /bin").contains("Type: symlink"));
    assert!(debugfs(&base.path, "stat /run/fifo").contains("Type: FIFO"));
    let null = debugfs(&base.path, "stat /dev/null");
    assert!(
        null.contains("Type: character special") && null.contains("Mode:  0666"),
        "{null}"
    );
    assert!(
        null.contains("major 1, minor 3") || null.contains("Device major/minor number: 01:03"),
        "{null}"
    );
    assert!(tmp_entries(&bases).is_empty());
    // The plain tar is a different source, so a different base.
    let other = bases
        .ensure_base(&ImageRef::parse(plain.to_str().unwrap()).unwrap())
        .unwrap();
    assert_ne!(other.digest, base.digest);
}

/// True when `path` is on ext4 (no reflink): the clone must then be a sparse copy.
fn on_ext4(path: &Path) -> bool {
    rustix::fs::statfs(path)
        .map(|s| s.f_type == 0xEF53)
        .unwrap_or(false)
}

#[test]
fn sparse_clone_of_a_1gib_base_keeps_content_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    // A demo base with ~1 GiB of headroom is a 1 GiB file system holding a few MiB.
    let bases = store(&dir.path().join("images"), 1000);
    let base = bases.ensure_base(&ImageRef::Demo).unwrap();
    assert!(base.size_bytes >= 1000 * MIB, "{base:?}");
    let disk = dir.path().join("machine/rootfs.ext4");
    std::fs::create_dir(disk.parent().unwrap()).unwrap();

    let t = Instant::now();
    let method = clone_disk(&base.path, &disk, None).unwrap();
    let clone_ms = ms(t);
    if on_ext4(dir.path()) {
        assert_eq!(method, CloneMethod::SparseCopy);
    }
    assert!(same_content(&base.path, &disk).unwrap());
    let used = allocated(&disk);
    assert!(
        used < base.size_bytes / 20,
        "disk allocates {used} bytes of {}",
        base.size_bytes
    );
    assert_eq!(
        clone_disk(&base.path, &disk, None).unwrap(),
        CloneMethod::AlreadyPresent
    );
    fsck_clean(&disk);
    println!(
        "clone of a {} MiB base by {method:?}: {clone_ms:.1} ms, disk allocates {} KiB (base {} KiB)",
        base.size_bytes / MIB,
        used / 1024,
        allocated(&base.path) / 1024
    );

    // Growing: the file system fills the larger file and stays clean.
    let grown = dir.path().join("machine/grown.ext4");
    let t = Instant::now();
    clone_disk(&base.path, &grown, Some(base.size_bytes + 512 * MIB)).unwrap();
    let grow_ms = ms(t);
    assert_eq!(
        std::fs::metadata(&grown).unwrap().len(),
        base.size_bytes + 512 * MIB
    );
    fsck_clean(&grown);
    let header = run("dumpe2fs", &["-h", grown.to_str().unwrap()]);
    let blocks: u64 = header
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(blocks * 4096, base.size_bytes + 512 * MIB);
    println!("clone + grow by 512 MiB: {grow_ms:.0} ms");

    for _ in 0..2 {
        remove_disk(&disk).unwrap();
        remove_disk(&grown).unwrap();
    }
    assert!(!disk.exists() && !grown.exists());
    assert_eq!(
        std::fs::read_dir(disk.parent().unwrap()).unwrap().count(),
        0
    );
}

#[test]
fn reflink_clone_on_a_loop_mounted_xfs() {
    if !support::loop_devices("reflink_clone_on_a_loop_mounted_xfs") {
        return;
    }
    let xfs = LoopXfs::new(3 << 30);
    let bases = store(&xfs.mount_point().join("images"), 1000);
    let base = bases.ensure_base(&ImageRef::Demo).unwrap();
    let disk = xfs.mount_point().join("rootfs.ext4");

    let t = Instant::now();
    let method = clone_disk(&base.path, &disk, None).unwrap();
    let clone_ms = ms(t);
    assert_eq!(method, CloneMethod::Reflink);
    assert!(same_content(&base.path, &disk).unwrap());
    fsck_clean(&disk);

    // Copy on write: a write to the disk leaves the base as it was.
    let at = base.size_bytes / 2;
    let mut before = vec![0u8; 4096];
    std::fs::File::open(&base.path)
        .unwrap()
        .read_exact_at(&mut before, at)
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&[0xa5; 4096], at)
        .unwrap();
    let mut after = vec![0u8; 4096];
    std::fs::File::open(&base.path)
        .unwrap()
        .read_exact_at(&mut after, at)
        .unwrap();
    assert_eq!(before, after);

    remove_disk(&disk).unwrap();
    remove_disk(&disk).unwrap();
    println!(
        "clone of a {} MiB base by reflink on XFS: {clone_ms:.2} ms",
        base.size_bytes / MIB
    );
}

#[test]
fn unusable_sources_are_reported_without_leaving_anything() {
    let dir = tempfile::tempdir().unwrap();
    let bases = store(&dir.path().join("images"), 16);
    let missing = ImageRef::parse(dir.path().join("gone").to_str().unwrap()).unwrap();
    let err = bases.ensure_base(&missing).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let dynamic = BaseStore::open(
        &dir.path().join("images"),
        BaseSettings {
            busybox: PathBuf::from("/usr/bin/ls"),
            ..BaseSettings::default()
        },
    )
    .unwrap();
    let err = dynamic.ensure_base(&ImageRef::Demo).unwrap_err();
    assert!(!err.is_not_found());
    assert!(
        err.to_string().contains("/usr/bin/ls") && err.to_string().contains("dynamically linked"),
        "{err}"
    );
    let corrupt = dir.path().join("corrupt.tar.gz");
    std::fs::write(&corrupt, b"not gzip at all").unwrap();
    let err = bases
        .ensure_base(&ImageRef::parse(corrupt.to_str().unwrap()).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("corrupt.tar.gz"), "{err}");
    assert!(tmp_entries(&bases).is_empty());
    assert!(bases.list().unwrap().is_empty());
}
