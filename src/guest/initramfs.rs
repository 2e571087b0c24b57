//! Writes the guest's initramfs: a newc cpio archive holding `/init` (the static
//! `hearth-init`) and the kernel modules the init loads before it can see any disk.
//!
//! Why newc and uncompressed: it is the format the kernel unpacks natively, and an
//! uncompressed archive costs no decompression under TCG. The archive is small (the init
//! and about a dozen modules).
//!
//! Layout:
//! ```text
//! /init                                  hearth-init, mode 0755
//! /dev /proc /sys /newroot               mount points the init uses
//! /lib/hearth/modules/NN-<module>.ko     loaded in file-name order
//! ```

use std::io::{self, Write};

use super::INITRAMFS_MODULE_DIR;

/// A kernel module to place in the archive.
#[derive(Debug, Clone)]
pub struct ModuleFile {
    /// Module name (`virtio_blk`), used in the file name.
    pub name: String,
    /// The `.ko` contents.
    pub bytes: Vec<u8>,
}

/// Directories created before any file, parents first.
const DIRS: &[&str] = &["dev", "proc", "sys", "newroot", "lib", "lib/hearth"];

/// The archive path of module number `index` (zero-based load position).
pub fn module_path(index: usize, name: &str) -> String {
    format!("{INITRAMFS_MODULE_DIR}/{index:02}-{name}.ko")
}

/// Writes the archive to `out`: `init` becomes `/init`, `modules` are numbered in the
/// order given, which is the order the init loads them.
pub fn write_initramfs<W: Write>(out: W, init: &[u8], modules: &[ModuleFile]) -> io::Result<W> {
    let mut out = out;
    let mut ino = 1u32;
    let mut next_ino = || {
        ino += 1;
        ino
    };
    for dir in DIRS.iter().copied().chain([INITRAMFS_MODULE_DIR]) {
        out = entry(out, dir, 0o040_755, next_ino(), 2, &[])?;
    }
    out = entry(out, "init", 0o100_755, next_ino(), 1, init)?;
    for (i, m) in modules.iter().enumerate() {
        out = entry(
            out,
            &module_path(i, &m.name),
            0o100_644,
            next_ino(),
            1,
            &m.bytes,
        )?;
    }
    cpio::newc::trailer(out)
}

fn entry<W: Write>(
    out: W,
    name: &str,
    mode: u32,
    ino: u32,
    nlink: u32,
    data: &[u8],
) -> io::Result<W> {
    let size = u32::try_from(data.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("initramfs entry {name} is larger than 4 GiB"),
        )
    })?;
    let mut w = cpio::newc::Builder::new(name)
        .mode(mode)
        .ino(ino)
        .nlink(nlink)
        .uid(0)
        .gid(0)
        .mtime(0)
        .write(out, size);
    w.write_all(data)?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_round_trips_through_a_newc_reader() {
        let modules = vec![
            ModuleFile {
                name: "virtio".into(),
                bytes: b"first".to_vec(),
            },
            ModuleFile {
                name: "virtio_blk".into(),
                bytes: b"second".to_vec(),
            },
        ];
        let archive = write_initramfs(Vec::new(), b"INIT", &modules).unwrap();
        let mut names = Vec::new();
        let mut rest: &[u8] = &archive;
        loop {
            let mut r = cpio::newc::Reader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            let name = r.entry().name().to_string();
            let mode = r.entry().mode();
            let mut data = Vec::new();
            io::Read::read_to_end(&mut r, &mut data).unwrap();
            names.push((name, mode, data));
            rest = r.finish().unwrap();
        }
        let init = names.iter().find(|(n, ..)| n == "init").unwrap();
        assert_eq!(init.1, 0o100_755);
        assert_eq!(init.2, b"INIT");
        let mods: Vec<_> = names
            .iter()
            .filter(|(n, ..)| n.starts_with(INITRAMFS_MODULE_DIR) && n.ends_with(".ko"))
            .map(|(n, _, d)| (n.as_str(), d.as_slice()))
            .collect();
        assert_eq!(
            mods,
            vec![
                ("lib/hearth/modules/00-virtio.ko", &b"first"[..]),
                ("lib/hearth/modules/01-virtio_blk.ko", &b"second"[..]),
            ]
        );
        // Parents precede children, so the kernel can create each path.
        let pos = |p: &str| names.iter().position(|(n, ..)| n == p).unwrap();
        assert!(pos("lib") < pos("lib/hearth"));
        assert!(pos("lib/hearth") < pos(INITRAMFS_MODULE_DIR));
    }
}
