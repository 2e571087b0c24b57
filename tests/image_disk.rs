//! Image bases and machine disks on the real file system: the demo base is a valid ext4
//! holding the page, a second ensure is a cache hit, a changed directory is a new base,
//! and a machine disk is a sparse (or reflinked) copy that can be removed twice.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use hearth::image::{BaseSettings, BaseStore, CloneMethod, ImageRef, clone_disk, remove_disk};

fn store(dir: &std::path::Path) -> BaseStore {
    BaseStore::open(&dir.join("images"), BaseSettings::default()).expect("open")
}

#[test]
fn demo_base_is_valid_cached_and_cloned_sparsely() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bases = store(dir.path());
    let base = bases.ensure_base(&ImageRef::Demo).expect("demo base");
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&base.path)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let page = Command::new("debugfs")
        .args(["-R", "cat /srv/www/index.html"])
        .arg(&base.path)
        .output()
        .expect("debugfs");
    assert!(String::from_utf8_lossy(&page.stdout).contains("hearth demo"));

    let mtime = std::fs::metadata(&base.path).expect("stat").mtime();
    let again = bases.ensure_base(&ImageRef::Demo).expect("cached");
    assert_eq!(again, base);
    assert_eq!(std::fs::metadata(&base.path).expect("stat").mtime(), mtime);

    let disk = dir.path().join("m/rootfs.ext4");
    std::fs::create_dir_all(disk.parent().expect("parent")).expect("mkdir");
    let method = clone_disk(&base.path, &disk, None).expect("clone");
    assert!(matches!(
        method,
        CloneMethod::SparseCopy | CloneMethod::Reflink
    ));
    assert_eq!(
        std::fs::read(&disk).expect("read"),
        std::fs::read(&base.path).expect("read")
    );
    let meta = std::fs::metadata(&disk).expect("stat");
    assert!(
        meta.blocks() * 512 < meta.len() / 2,
        "the copy materialised its holes"
    );
    assert_eq!(
        clone_disk(&base.path, &disk, None).expect("again"),
        CloneMethod::Existing
    );
    remove_disk(&disk).expect("remove");
    remove_disk(&disk).expect("remove twice");
    assert!(!disk.exists());
}

#[test]
fn a_changed_directory_is_a_new_base() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bases = store(dir.path());
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    std::fs::write(root.join("etc/hostname"), "a\n").expect("write");
    let image = ImageRef::parse(root.to_str().expect("utf8")).expect("parse");
    let first = bases.ensure_base(&image).expect("first");
    std::fs::write(root.join("etc/hostname"), "b\n").expect("write");
    let second = bases.ensure_base(&image).expect("second");
    assert_ne!(first.digest, second.digest);
    assert_eq!(bases.list().expect("list").len(), 2);
}
