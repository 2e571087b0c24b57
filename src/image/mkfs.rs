//! Turning a directory tree into an ext4 image file with e2fsprogs, and growing one.
//!
//! `mkfs.ext4 -d` copies a tree into a new file system without mounting anything, so it
//! needs no privileges and no loop devices. The image is sized from what the tree needs
//! (data blocks, inodes, journal, group metadata) plus a configured headroom, because
//! mkfs fails outright when the tree does not fit and a too-large image wastes every
//! clone's address space. The file is created sparse; mkfs punches holes where it can, so
//! an image costs disk blocks only for what it holds.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::digest::{BLOCK, TreeStats, round_up};

/// The file system label of every base.
pub const LABEL: &str = "hearth-root";
/// Bytes per inode on disk (`-I`).
const INODE_SIZE: u64 = 256;
const MIB: u64 = 1 << 20;

/// Why an image could not be made or grown.
#[derive(Debug, thiserror::Error)]
pub enum MkfsError {
    /// The tool could not be started at all.
    #[error("{program}: could not run it: {source} (is e2fsprogs installed?)")]
    Spawn {
        /// The tool.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The tool ran and failed; its stderr says why.
    #[error("{program} on {image} failed ({status}): {stderr}")]
    Failed {
        /// The tool.
        program: String,
        /// The image file.
        image: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its error output, trimmed.
        stderr: String,
    },
    /// Creating or sizing the image file failed.
    #[error("image {path}: {what}: {source}")]
    File {
        /// The image file.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
}

/// The geometry of an image for a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Image size in bytes, a whole number of MiB.
    pub size_bytes: u64,
    /// Inodes to create.
    pub inodes: u64,
}

/// Sizes an image for `stats` with `headroom_mib` free, at least `min_size_mib`.
///
/// The estimate is deliberately generous on metadata: running out of space inside mkfs is
/// a failed build, while a few spare MiB in a sparse file cost nothing until written.
pub fn plan(stats: &TreeStats, headroom_mib: u64, min_size_mib: u64) -> Plan {
    let headroom = headroom_mib.saturating_mul(MIB);
    // Room for the tree's inodes with a quarter to spare, plus one per 16 KiB of headroom
    // so the free space is usable by small files as well.
    let inodes = stats.inodes + stats.inodes / 4 + headroom / 16384 + 1024;
    let base = stats.data_bytes + inodes * INODE_SIZE + headroom;
    let mut size = base;
    // The journal depends on the final size, which depends on the journal: two rounds
    // settle it because its size only steps at powers of two.
    for _ in 0..2 {
        let blocks = size / BLOCK;
        // Group descriptors, bitmaps, superblock copies and the blocks reserved for
        // online growth stay well under 2% plus a few MiB.
        size = base + journal_blocks(blocks) * BLOCK + size / 50 + 4 * MIB;
    }
    let size = round_up(size, MIB).max(min_size_mib.saturating_mul(MIB));
    Plan {
        size_bytes: size,
        inodes,
    }
}

/// The journal mke2fs makes for a file system of `blocks` 4 KiB blocks (e2fsprogs'
/// default table, 1.46/1.47), rounded up to the next step.
fn journal_blocks(blocks: u64) -> u64 {
    match blocks {
        0..2048 => 0,
        2048..32_768 => 1024,
        32_768..262_144 => 4096,
        262_144..524_288 => 8192,
        524_288..4_194_304 => 16_384,
        4_194_304..8_388_608 => 32_768,
        8_388_608..16_777_216 => 65_536,
        16_777_216..33_554_432 => 131_072,
        _ => 262_144,
    }
}

/// Finds an e2fsprogs tool: the sbin directories first (they are often missing from a
/// service's PATH), then PATH.
pub(crate) fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Makes `image` (which must not exist) an ext4 file system of `plan`'s size holding a copy
/// of `tree`. The root directory is owned by 0:0 with mode 0755 whatever `tree`'s are.
/// Reserved blocks are off (`-m 0`): the guest's root user is the only user, and the
/// headroom should be what it gets.
pub fn make(tree: &Path, image: &Path, plan: Plan) -> Result<(), MkfsError> {
    let file_err = |what, source| MkfsError::File {
        path: image.to_path_buf(),
        what,
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|e| file_err("create", e))?;
    file.set_len(plan.size_bytes)
        .map_err(|e| file_err("set length", e))?;
    drop(file);
    let mut cmd = Command::new(tool("mkfs.ext4"));
    cmd.args([
        "-q", "-F", "-b", "4096", "-I", "256", "-m", "0", "-L", LABEL,
    ])
    .args(["-E", "root_owner=0:0"])
    .arg("-N")
    .arg(plan.inodes.to_string())
    .arg("-d")
    .arg(tree)
    .arg(image)
    .arg(format!("{}k", plan.size_bytes / 1024));
    run(cmd, "mkfs.ext4", image)
}

/// Grows the ext4 file system in the image file `image` to `size_bytes` (file length
/// first, then `resize2fs`). The file system must be unmounted and clean, as a fresh
/// clone of a base is.
pub fn grow(image: &Path, size_bytes: u64) -> Result<(), MkfsError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|source| MkfsError::File {
            path: image.to_path_buf(),
            what: "open",
            source,
        })?;
    file.set_len(size_bytes).map_err(|source| MkfsError::File {
        path: image.to_path_buf(),
        what: "set length",
        source,
    })?;
    drop(file);
    let mut cmd = Command::new(tool("resize2fs"));
    cmd.arg(image);
    run(cmd, "resize2fs", image)
}

pub(crate) fn run(mut cmd: Command, program: &str, image: &Path) -> Result<(), MkfsError> {
    let out = cmd.output().map_err(|source| MkfsError::Spawn {
        program: program.to_string(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    // Keep the end: e2fsprogs puts the reason last, after progress lines.
    if stderr.len() > 2000 {
        let cut = stderr.len() - 2000;
        let cut = (cut..stderr.len())
            .find(|&i| stderr.is_char_boundary(i))
            .unwrap_or(cut);
        stderr = format!("...{}", &stderr[cut..]);
    }
    Err(MkfsError::Failed {
        program: program.to_string(),
        image: image.to_path_buf(),
        status: out.status,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_grows_with_content_and_headroom() {
        let small = TreeStats {
            inodes: 40,
            data_bytes: 3 * MIB,
            file_bytes: 3 * MIB,
        };
        let p = plan(&small, 64, 0);
        assert_eq!(p.size_bytes % MIB, 0);
        assert!(p.size_bytes >= 67 * MIB, "{p:?}");
        assert!(p.size_bytes <= 100 * MIB, "{p:?}");
        assert!(p.inodes >= 50);
        let big = TreeStats {
            inodes: 100_000,
            data_bytes: 2048 * MIB,
            file_bytes: 2000 * MIB,
        };
        let q = plan(&big, 64, 0);
        // Data, inode tables, a 64 MiB journal and the headroom all have to fit.
        assert!(
            q.size_bytes >= (2048 + 64 + 64) * MIB + q.inodes * INODE_SIZE,
            "{q:?}"
        );
        assert!(q.inodes >= 125_000);
        assert_eq!(plan(&small, 0, 512).size_bytes, 512 * MIB);
    }

    #[test]
    fn journal_table_steps() {
        assert_eq!(journal_blocks(1000), 0);
        assert_eq!(journal_blocks(32_767), 1024);
        assert_eq!(journal_blocks(262_144), 8192);
        assert_eq!(journal_blocks(u64::MAX), 262_144);
    }

    #[test]
    fn a_failing_mkfs_reports_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("x.ext4");
        let err = make(
            &dir.path().join("no-such-tree"),
            &image,
            Plan {
                size_bytes: 16 * MIB,
                inodes: 64,
            },
        )
        .unwrap_err();
        match &err {
            MkfsError::Failed { stderr, .. } => assert!(stderr.contains("no-such-tree"), "{err}"),
            other => panic!("expected a mkfs failure, got {other}"),
        }
    }
}
