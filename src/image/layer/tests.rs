//! Layers built here with the `tar` crate (and hand-written headers where the crate refuses
//! a hostile name), compressed with flate2 or ruzstd, applied onto a temporary root.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;

const GIB: u64 = 1 << 30;

/// A layer under construction.
struct Layer {
    tar: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Layer {
        Layer {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h
    }

    fn dir(mut self, path: &str) -> Layer {
        let mut h = Self::header(tar::EntryType::Directory, 0o755);
        self.tar.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    fn file(mut self, path: &str, content: &str) -> Layer {
        let mut h = Self::header(tar::EntryType::Regular, 0o644);
        h.set_size(content.len() as u64);
        self.tar
            .append_data(&mut h, path, content.as_bytes())
            .unwrap();
        self
    }

    fn with(mut self, mut h: tar::Header, path: &str, content: &[u8]) -> Layer {
        h.set_size(content.len() as u64);
        self.tar.append_data(&mut h, path, content).unwrap();
        self
    }

    fn symlink(mut self, path: &str, target: &str) -> Layer {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    fn hard_link(mut self, path: &str, target: &str) -> Layer {
        let mut h = Self::header(tar::EntryType::Link, 0o644);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    /// An entry whose name and link name are written as given, bypassing the crate's
    /// checks (which refuse `..` and absolute names, as they should).
    fn raw(mut self, kind: tar::EntryType, path: &str, link: &str) -> Layer {
        let mut h = Self::header(kind, 0o644);
        let old = h.as_old_mut();
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        self.tar.append(&h, &[][..]).unwrap();
        self
    }

    /// PAX records for the next entry.
    fn pax(mut self, records: &[(&str, &[u8])]) -> Layer {
        let mut data = Vec::new();
        for (key, value) in records {
            // "<len> <key>=<value>\n", the length counting its own digits.
            let rest = key.len() + value.len() + 3;
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut h = Self::header(tar::EntryType::XHeader, 0o644);
        h.set_size(data.len() as u64);
        self.tar
            .append_data(&mut h, "PaxHeaders/x", &data[..])
            .unwrap();
        self
    }

    fn tar(self) -> Vec<u8> {
        self.tar.into_inner().unwrap()
    }

    fn gzip(self) -> Vec<u8> {
        gzip(&self.tar())
    }

    fn zstd(self) -> Vec<u8> {
        zstd(&self.tar())
    }
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).unwrap();
    gz.finish().unwrap()
}

fn zstd(tar: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(tar, ruzstd::encoding::CompressionLevel::Fastest)
}

/// A root to apply layers onto, next to a directory standing for the rest of the host.
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    blobs: PathBuf,
    budget: LayerBudget,
    applied: usize,
}

impl Scratch {
    fn new() -> Scratch {
        Self::with_limit(GIB)
    }

    fn with_limit(max_bytes: u64) -> Scratch {
        Self::with_limits(LayerLimits {
            max_bytes,
            max_entries: 1_000_000,
        })
    }

    fn with_limits(limits: LayerLimits) -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        let blobs = dir.path().join("blobs");
        for d in [&root, &outside, &blobs] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(outside.join("victim"), "host file").unwrap();
        Scratch {
            _dir: dir,
            root,
            outside,
            blobs,
            budget: LayerBudget::new(limits),
            applied: 0,
        }
    }

    fn apply(&mut self, blob: &[u8], compression: Compression) -> Result<LayerStats, LayerError> {
        self.applied += 1;
        let path = self.blobs.join(format!("layer{}", self.applied));
        std::fs::write(&path, blob).unwrap();
        let label = format!("sha256:layer{}", self.applied);
        apply_layer(&path, &label, compression, &self.root, &mut self.budget)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }

    fn exists(&self, rel: &str) -> bool {
        std::fs::symlink_metadata(self.path(rel)).is_ok()
    }

    /// The host side is as the test made it.
    fn assert_outside_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("victim")]);
        assert_eq!(
            std::fs::read_to_string(self.outside.join("victim")).unwrap(),
            "host file"
        );
    }
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn refused(err: &LayerError) -> (&str, &str) {
    match err {
        LayerError::Refused { entry, reason, .. } => (entry, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn media_types_map_to_compressions() {
    let cases = [
        ("application/vnd.oci.image.layer.v1.tar", Compression::None),
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Gzip,
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::Zstd,
        ),
        (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Compression::Gzip,
        ),
    ];
    for (media_type, compression) in cases {
        assert_eq!(
            Compression::from_media_type(media_type),
            Some(compression),
            "{media_type}"
        );
    }
    assert_eq!(
        Compression::from_media_type("application/vnd.oci.image.config.v1+json"),
        None
    );
    assert_eq!(
        Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip+encrypted"),
        None
    );
}

#[test]
fn layers_apply_in_order_and_replace_lower_entries() {
    let mut s = Scratch::new();
    let base = Layer::new()
        .dir("etc")
        .file("etc/hostname", "one")
        .file("etc/motd", "welcome")
        .dir("usr/share/doc")
        .file("usr/share/doc/readme", "lower")
        .file("opt", "a file that becomes a directory")
        .symlink("run", "/var/run")
        .tar();
    let stats = s.apply(&base, Compression::None).unwrap();
    assert_eq!(stats.entries, 7);
    assert_eq!(stats.uncompressed_bytes, base.len() as u64);
    assert_eq!(stats.diff_id, sha256(&base));
    assert_eq!(s.read("etc/hostname"), "one");

    let second = Layer::new()
        .file("etc/hostname", "two")
        // A file over a directory tree, a directory over a file, a file over a symlink.
        .file("usr/share/doc", "now a file")
        .dir("opt")
        .file("opt/tool", "x")
        .file("run", "no longer a link")
        .tar();
    let stats2 = s.apply(&gzip(&second), Compression::Gzip).unwrap();
    assert_eq!(stats2.entries, 5);
    assert_eq!(stats2.file_bytes, 3 + 10 + 1 + 16);
    assert_eq!(stats2.diff_id, sha256(&second));
    assert_eq!(s.read("etc/hostname"), "two");
    assert_eq!(s.read("etc/motd"), "welcome", "lower files stay");
    assert_eq!(s.read("usr/share/doc"), "now a file");
    assert_eq!(s.read("opt/tool"), "x");
    assert!(std::fs::symlink_metadata(s.path("run")).unwrap().is_file());

    // Zstd, and a symlink over a file.
    let third = Layer::new()
        .symlink("etc/hostname", "motd")
        .dir("usr/share")
        .tar();
    let stats3 = s.apply(&zstd(&third), Compression::Zstd).unwrap();
    assert_eq!(stats3.diff_id, sha256(&third));
    assert_eq!(
        std::fs::read_link(s.path("etc/hostname")).unwrap(),
        Path::new("motd")
    );
    assert_eq!(s.read("etc/hostname"), "welcome");
    assert!(s.exists("usr/share/doc"), "a directory entry merges");
    assert_eq!(
        s.budget.used(),
        (base.len() + second.len() + third.len()) as u64
    );
}

#[test]
fn whiteouts_remove_files_and_trees_from_lower_layers() {
    let mut s = Scratch::new();
    let base = Layer::new()
        .file("etc/passwd", "root")
        .file("etc/shadow", "secret")
        .file("var/cache/apt/a", "1")
        .file("var/cache/apt/b/c", "2")
        .symlink("link", "/etc");
    s.apply(&base.gzip(), Compression::Gzip).unwrap();
    let upper = Layer::new()
        .file("etc/.wh.shadow", "")
        .file("var/cache/.wh.apt", "")
        // The symlink itself goes, not what it points to.
        .file(".wh.link", "")
        // Nothing to remove: not an error.
        .file("nothing/here/.wh.x", "")
        .file("etc/.wh.none", "");
    let stats = s.apply(&upper.zstd(), Compression::Zstd).unwrap();
    assert_eq!(stats.whiteouts, 5);
    assert!(!s.exists("etc/shadow"));
    assert_eq!(s.read("etc/passwd"), "root");
    assert!(!s.exists("var/cache/apt"));
    assert!(s.exists("var/cache"));
    assert!(!s.exists("link"));
    assert!(!s.exists("nothing"), "a whiteout creates nothing");
    assert!(!s.exists("etc/.wh.shadow"), "whiteouts are not created");
}

#[test]
fn a_whiteout_spares_what_its_own_layer_wrote() {
    let mut s = Scratch::new();
    s.apply(
        &Layer::new().file("srv/old", "lower").tar(),
        Compression::None,
    )
    .unwrap();
    let upper = Layer::new()
        .file("srv/new", "same layer")
        .file(".wh.srv", "")
        .file("x", "1")
        .file(".wh.x", "");
    s.apply(&upper.tar(), Compression::None).unwrap();
    assert!(!s.exists("srv/old"), "lower content is removed");
    assert_eq!(s.read("srv/new"), "same layer");
    assert_eq!(s.read("x"), "1");
}

#[test]
fn opaque_directories_hide_lower_content_only() {
    for marker_first in [true, false] {
        let mut s = Scratch::new();
        let base = Layer::new()
            .file("opt/a", "lower")
            .file("opt/sub/b", "lower")
            .file("opt/sub/c", "lower")
            .symlink("opt/lnk", "/etc")
            .file("keep/me", "elsewhere");
        s.apply(&base.tar(), Compression::None).unwrap();
        let mut upper = Layer::new().dir("opt");
        if marker_first {
            upper = upper.file("opt/.wh..wh..opq", "");
        }
        upper = upper
            .file("opt/kept", "same layer")
            .file("opt/sub/new", "same layer");
        if !marker_first {
            upper = upper.file("opt/.wh..wh..opq", "");
        }
        upper = upper.file("opt/after", "after the marker");
        let stats = s.apply(&upper.gzip(), Compression::Gzip).unwrap();
        assert_eq!(stats.opaque_dirs, 1);
        for gone in ["opt/a", "opt/sub/b", "opt/sub/c", "opt/lnk"] {
            assert!(!s.exists(gone), "{gone} (marker first: {marker_first})");
        }
        for kept in ["opt/kept", "opt/sub/new", "opt/after"] {
            assert!(s.exists(kept), "{kept} (marker first: {marker_first})");
        }
        assert!(!s.exists("opt/.wh..wh..opq"));
        assert_eq!(s.read("keep/me"), "elsewhere");
    }
}

#[test]
fn symlinks_and_hard_links_are_made_inside_the_root() {
    let mut s = Scratch::new();
    let base = Layer::new()
        .file("bin/busybox", "#!busybox")
        .symlink("bin/sh", "busybox")
        .symlink("etc/mtab", "/proc/self/mounts")
        .symlink("usr/lib64", "../lib")
        .hard_link("bin/ls", "bin/busybox");
    s.apply(&base.tar(), Compression::None).unwrap();
    assert_eq!(
        std::fs::read_link(s.path("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        std::fs::read_link(s.path("etc/mtab")).unwrap(),
        Path::new("/proc/self/mounts")
    );
    let root = s.root.clone();
    let ino = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap().ino();
    assert_eq!(ino("bin/ls"), ino("bin/busybox"));
    // A hard link to a file of a lower layer.
    s.apply(
        &Layer::new().hard_link("bin/cat", "bin/busybox").tar(),
        Compression::None,
    )
    .unwrap();
    assert_eq!(ino("bin/cat"), ino("bin/busybox"));
    assert_eq!(
        std::fs::symlink_metadata(s.path("bin/busybox"))
            .unwrap()
            .nlink(),
        3
    );
}

#[test]
fn device_nodes_and_fifos_are_created() {
    let mut s = Scratch::new();
    let mut null = Layer::header(tar::EntryType::Char, 0o666);
    null.set_device_major(1).unwrap();
    null.set_device_minor(3).unwrap();
    let mut sda = Layer::header(tar::EntryType::Block, 0o660);
    sda.set_device_major(8).unwrap();
    sda.set_device_minor(0).unwrap();
    sda.set_gid(6);
    let layer = Layer::new()
        .with(null, "dev/null", b"")
        .with(sda, "dev/sda", b"")
        .with(
            Layer::header(tar::EntryType::Fifo, 0o600),
            "run/initctl",
            b"",
        );
    s.apply(&layer.gzip(), Compression::Gzip).unwrap();
    let meta = |p: &str| std::fs::symlink_metadata(s.path(p)).unwrap();
    assert!(meta("dev/null").file_type().is_char_device());
    assert_eq!(meta("dev/null").rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(meta("dev/null").mode() & 0o7777, 0o666);
    assert!(meta("dev/sda").file_type().is_block_device());
    assert_eq!(meta("dev/sda").rdev(), rustix::fs::makedev(8, 0));
    assert_eq!(meta("dev/sda").gid(), 6);
    assert!(meta("run/initctl").file_type().is_fifo());
}

#[test]
fn modes_owners_times_and_xattrs_are_kept() {
    let mut s = Scratch::new();
    let mut suid = Layer::header(tar::EntryType::Regular, 0o4755);
    suid.set_uid(1000);
    suid.set_gid(1001);
    let mut tmp = Layer::header(tar::EntryType::Directory, 0o1777);
    tmp.set_mtime(1_600_000_000);
    let mut sgid_dir = Layer::header(tar::EntryType::Directory, 0o2750);
    sgid_dir.set_uid(7);
    // struct vfs_cap_data, revision 2, effective, permitted CAP_NET_BIND_SERVICE (bit 10).
    let mut cap = vec![0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00];
    cap.resize(20, 0);
    let mut ping = Layer::header(tar::EntryType::Regular, 0o755);
    ping.set_uid(0);
    let layer = Layer::new()
        .with(tmp, "tmp", b"")
        .with(sgid_dir, "srv", b"")
        .pax(&[("SCHILY.xattr.user.origin", b"layer one")])
        .with(suid, "usr/bin/su", b"su")
        .pax(&[
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.user.second", b"2"),
        ])
        .with(ping, "usr/bin/ping", b"ping")
        .pax(&[("SCHILY.xattr.user.dir", b"d")])
        .dir("var");
    s.apply(&layer.gzip(), Compression::Gzip).unwrap();
    let meta = |p: &str| std::fs::symlink_metadata(s.path(p)).unwrap();
    let su = meta("usr/bin/su");
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
    assert_eq!((su.uid(), su.gid()), (1000, 1001));
    assert_eq!(su.mtime(), 1_700_000_000);
    assert_eq!(meta("tmp").permissions().mode() & 0o7777, 0o1777);
    assert_eq!(meta("tmp").mtime(), 1_600_000_000);
    assert_eq!(meta("srv").permissions().mode() & 0o7777, 0o2750);
    assert_eq!(meta("srv").uid(), 7);
    let xattr = |p: &str, name: &str| {
        let mut buf = [0u8; 256];
        let n = rustix::fs::lgetxattr(s.path(p), name, &mut buf[..]).unwrap();
        buf[..n].to_vec()
    };
    assert_eq!(xattr("usr/bin/su", "user.origin"), b"layer one");
    assert_eq!(xattr("usr/bin/ping", "security.capability"), cap);
    assert_eq!(xattr("usr/bin/ping", "user.second"), b"2");
    assert_eq!(xattr("var", "user.dir"), b"d");
}

#[test]
fn hostile_paths_are_refused_naming_the_entry() {
    let cases = [
        (tar::EntryType::Regular, "../x", "", "../x", ".."),
        (tar::EntryType::Regular, "/abs", "", "/abs", "absolute"),
        (tar::EntryType::Regular, "a/../../x", "", "a/../../x", ".."),
        (
            tar::EntryType::Symlink,
            "evil",
            "../../..",
            "evil",
            "outside the image",
        ),
        (
            tar::EntryType::Symlink,
            "a/b/evil",
            "../../../x",
            "a/b/evil",
            "outside the image",
        ),
        (
            tar::EntryType::Link,
            "hard",
            "../outside/victim",
            "hard",
            "..",
        ),
        (
            tar::EntryType::Link,
            "hard",
            "/etc/passwd",
            "hard",
            "absolute",
        ),
        (
            tar::EntryType::Regular,
            "a/.wh..",
            "",
            "a/.wh..",
            "names no file",
        ),
    ];
    for (kind, path, link, entry, why) in cases {
        let mut s = Scratch::new();
        let blob = Layer::new().raw(kind, path, link).gzip();
        let err = s.apply(&blob, Compression::Gzip).unwrap_err();
        let (got_entry, reason) = refused(&err);
        assert_eq!(got_entry, entry, "{err}");
        assert!(reason.contains(why), "{path}: {err}");
        let message = err.to_string();
        assert!(
            message.starts_with("layer sha256:layer1: entry `") && message.contains(entry),
            "{message}"
        );
        s.assert_outside_untouched();
    }
}

#[test]
fn nothing_is_written_or_removed_through_a_planted_symlink() {
    let mut s = Scratch::new();
    let outside = s.outside.display().to_string();
    // An absolute target is allowed (the guest resolves it in its own root); on the host it
    // points out of the root, so nothing may ever go through it.
    let plant = Layer::new().symlink("lib", &outside).tar();
    s.apply(&plant, Compression::None).unwrap();
    for (layer, entry) in [
        (Layer::new().file("lib/passwd", "owned"), "lib/passwd"),
        (Layer::new().file("lib/.wh.victim", ""), "lib/.wh.victim"),
        (
            Layer::new().file("lib/.wh..wh..opq", ""),
            "lib/.wh..wh..opq",
        ),
        (Layer::new().dir("lib/sub"), "lib/sub"),
        (Layer::new().hard_link("x", "lib/victim"), "x"),
    ] {
        let err = s.apply(&layer.tar(), Compression::None).unwrap_err();
        let (got, reason) = refused(&err);
        assert_eq!(got, entry, "{err}");
        assert!(
            reason.contains("symlink") || reason.contains("not a directory"),
            "{err}"
        );
        s.assert_outside_untouched();
    }
    // The same within one layer.
    let mut s = Scratch::new();
    let layer = Layer::new()
        .symlink("lib", &outside)
        .file("lib/passwd", "owned");
    let err = s.apply(&layer.tar(), Compression::None).unwrap_err();
    assert_eq!(refused(&err).0, "lib/passwd");
    s.assert_outside_untouched();
}

#[test]
fn a_compression_bomb_stops_at_the_limit_naming_the_entry() {
    let mut s = Scratch::with_limit(1 << 20);
    // 64 MiB of zeros: about 64 KiB of gzip.
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let mut h = Layer::header(tar::EntryType::Regular, 0o644);
    h.set_size(64 << 20);
    tar.append_data(&mut h, "usr/lib/bomb", std::io::repeat(0).take(64 << 20))
        .unwrap();
    let blob = tar.into_inner().unwrap().finish().unwrap();
    assert!(blob.len() < 1 << 20, "the bomb is small: {}", blob.len());
    let err = s.apply(&blob, Compression::Gzip).unwrap_err();
    match &err {
        LayerError::TooLarge {
            layer,
            entry,
            limit,
        } => {
            assert_eq!(layer, "sha256:layer1");
            assert_eq!(entry, "usr/lib/bomb");
            assert_eq!(*limit, 1 << 20);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(err.to_string().contains("usr/lib/bomb"), "{err}");
    assert!(s.budget.used() <= 1 << 20);
    let written = std::fs::metadata(s.path("usr/lib/bomb")).unwrap().len();
    assert!(written <= 1 << 20, "{written}");
}

#[test]
fn a_sparse_entry_cannot_write_past_the_limit_with_holes() {
    let mut s = Scratch::with_limit(1 << 20);
    // One byte of data at the end of a declared 64 MiB: the rest is a hole the parser
    // fills with zeros that never were in the stream.
    let mut h = Layer::header(tar::EntryType::GNUSparse, 0o644);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.sparse[0].set_offset((64 << 20) - 1);
    gnu.sparse[0].set_length(1);
    gnu.set_real_size(64 << 20);
    h.set_size(1);
    h.set_path("var/sparse").unwrap();
    h.set_cksum();
    let mut tar = tar::Builder::new(Vec::new());
    tar.append(&h, &b"x"[..]).unwrap();
    let blob = tar.into_inner().unwrap();
    assert!(blob.len() < 4096);
    let err = s.apply(&blob, Compression::None).unwrap_err();
    assert!(
        matches!(&err, LayerError::TooLarge { entry, .. } if entry == "var/sparse"),
        "{err:?}"
    );
    let written = std::fs::metadata(s.path("var/sparse")).unwrap().len();
    assert!(written <= 1 << 20, "{written}");
    // Within the limit, the same entry unpacks with its content at the end.
    let mut s = Scratch::with_limit(GIB);
    s.apply(&blob, Compression::None).unwrap();
    let content = std::fs::read(s.path("var/sparse")).unwrap();
    assert_eq!(content.len(), 64 << 20);
    assert_eq!(content[(64 << 20) - 1], b'x');
    assert!(content[..(64 << 20) - 1].iter().all(|b| *b == 0));
}

#[test]
fn the_limit_holds_over_all_the_layers_of_an_image() {
    let content = "x".repeat(40_000);
    let mut s = Scratch::with_limit(100_000);
    s.apply(&Layer::new().file("a", &content).zstd(), Compression::Zstd)
        .unwrap();
    s.apply(&Layer::new().file("b", &content).zstd(), Compression::Zstd)
        .unwrap();
    let err = s
        .apply(&Layer::new().file("c", &content).zstd(), Compression::Zstd)
        .unwrap_err();
    assert!(
        matches!(&err, LayerError::TooLarge { entry, .. } if entry == "c"),
        "{err:?}"
    );
}

#[test]
fn corrupt_or_mislabelled_layers_are_read_errors() {
    let mut s = Scratch::new();
    let tar = Layer::new().file("a", "content").tar();
    let err = s.apply(&tar, Compression::Gzip).unwrap_err();
    assert!(matches!(err, LayerError::Read { .. }), "{err:?}");
    let zst = zstd(&tar);
    let err = s
        .apply(&zst[..zst.len() / 2], Compression::Zstd)
        .unwrap_err();
    assert!(matches!(err, LayerError::Read { .. }), "{err:?}");
    let err = apply_layer(
        &s.blobs.join("missing"),
        "sha256:missing",
        Compression::None,
        &s.root,
        &mut s.budget,
    )
    .unwrap_err();
    assert!(err.to_string().contains("sha256:missing"), "{err}");
}

/// Every name under `root` (the root itself not included), never following a symlink.
fn count_names(root: &Path) -> u64 {
    let mut count = 0;
    for entry in std::fs::read_dir(root).unwrap() {
        let entry = entry.unwrap();
        count += 1;
        if entry.file_type().unwrap().is_dir() {
            count += count_names(&entry.path());
        }
    }
    count
}

#[test]
fn the_entry_limit_holds_over_all_the_layers_of_an_image() {
    let mut s = Scratch::with_limits(LayerLimits {
        max_bytes: GIB,
        max_entries: 10,
    });
    let mut first = Layer::new().dir("d");
    for i in 0..5 {
        first = first.file(&format!("d/f{i}"), "x");
    }
    let stats = s.apply(&first.tar(), Compression::None).unwrap();
    assert_eq!((stats.entries, s.budget.entries()), (6, 6));
    // Four more fit exactly (a whiteout counts like any entry)...
    let second = Layer::new()
        .file("g0", "x")
        .file("g1", "x")
        .file("g2", "x")
        .raw(tar::EntryType::Regular, "d/.wh.f0", "");
    s.apply(&second.tar(), Compression::None).unwrap();
    assert_eq!(s.budget.entries(), 10);
    // ...and the next one, in any later layer, goes over, named with the key and limit.
    let err = s
        .apply(&Layer::new().file("h", "x").gzip(), Compression::Gzip)
        .unwrap_err();
    assert!(
        matches!(&err, LayerError::TooManyEntries { entry, limit: 10, .. } if entry == "h"),
        "{err:?}"
    );
    assert!(err.is_over_limit());
    let message = err.to_string();
    assert!(
        message.contains("images.max_entries") && message.contains("10"),
        "{message}"
    );
    assert!(!s.exists("h"), "the entry over the limit is not created");
    assert!(count_names(&s.root) <= 10);
}

#[test]
fn directories_made_for_missing_parents_count_as_entries() {
    let mut s = Scratch::with_limits(LayerLimits {
        max_bytes: GIB,
        max_entries: 20,
    });
    // One entry two hundred directories deep: the tree would have 201 names for 1 entry.
    let deep = vec!["d"; 200].join("/") + "/f";
    let h = Layer::header(tar::EntryType::Regular, 0o644);
    let layer = Layer::new().with(h, &deep, b"x");
    let err = s.apply(&layer.tar(), Compression::None).unwrap_err();
    assert!(
        matches!(&err, LayerError::TooManyEntries { limit: 20, .. }),
        "{err:?}"
    );
    assert!(count_names(&s.root) <= 20, "{}", count_names(&s.root));
}

#[test]
fn overlong_paths_names_and_link_targets_are_refused() {
    let long_name = "n".repeat(place::MAX_NAME + 1);
    let long_path = vec!["p"; place::MAX_PATH / 2 + 1].join("/");
    let long_target = "t/".repeat(place::MAX_LINK_TARGET / 2 + 1);
    let cases: Vec<(Layer, &str)> = vec![
        (Layer::new().file(&long_name, "x"), "255"),
        (Layer::new().file(&long_path, "x"), "4096"),
        (Layer::new().symlink("link", &long_target), "4095"),
        (
            Layer::new().file("a", "x").hard_link("b", &long_path),
            "4096",
        ),
    ];
    for (layer, limit) in cases {
        let mut s = Scratch::new();
        let err = s.apply(&layer.tar(), Compression::None).unwrap_err();
        let (entry, reason) = refused(&err);
        assert!(reason.contains(limit), "{reason}");
        assert!(
            entry.len() <= 512,
            "the quoted name is bounded: {} bytes",
            entry.len()
        );
        assert!(err.to_string().len() < 2048, "{err}");
        s.assert_outside_untouched();
    }
    // At the limits exactly, all is well.
    let mut s = Scratch::new();
    let name = "n".repeat(place::MAX_NAME);
    s.apply(&Layer::new().file(&name, "x").tar(), Compression::None)
        .unwrap();
    assert!(s.exists(&name));
}

#[test]
fn a_megabyte_name_is_quoted_short_and_inert_in_errors() {
    // A GNU long name of 1 MiB with a terminal escape in it, on an entry refused for its
    // length: the error must not carry the megabyte, nor the escape as is.
    let name = format!("\x1b]0;owned\x07{}", "a".repeat(1 << 20));
    let mut s = Scratch::new();
    let err = s
        .apply(&Layer::new().file(&name, "x").tar(), Compression::None)
        .unwrap_err();
    let message = err.to_string();
    assert!(message.len() < 2048, "{} bytes", message.len());
    assert!(!message.contains('\x1b'), "{message}");
}
