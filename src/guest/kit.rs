//! The guest kit: the uncompressed kernel and the initramfs every machine boots with,
//! built once from the extracted kernel package and the static init, and cached on disk.
//!
//! Why a cache: extracting the 50+ MB `vmlinux` takes a noticeable fraction of a second
//! and every daemon start needs the kit. The cache entry's name is a hash of the inputs'
//! identities (path, device, inode, size, mtime, ctime of the kernel image and the init,
//! plus the module list and the layout version), so a rebuilt init or a new kernel gets a
//! new entry and a hit costs two `stat`s. The modules are not part of the key: they come
//! from the same package as the kernel image, which changes whenever they do.
//!
//! Cache layout:
//! ```text
//! <cache_dir>/<key>/vmlinux          uncompressed ELF kernel
//! <cache_dir>/<key>/initramfs.cpio   newc archive: /init + modules
//! <cache_dir>/.build-<key>-<pid>-<n> an entry being built (renamed to <key> when whole)
//! ```
//! Concurrency and crashes: an entry is built in a private directory, every file synced,
//! then the directory is renamed into place in one step. A reader sees a whole entry or
//! none; two builders race harmlessly (the loser drops its copy); a crashed build leaves
//! only a `.build-*` directory, removed by the next build once its process is gone.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::bzimage::{self, BzImageError};
use super::initramfs::{self, ModuleFile};
use crate::elf::{self, ElfError};

/// The kernel modules the guest needs before it can see its disks, network, agent port
/// and vsock and mount an overlay root, in load order (each depends only on modules before it). The Debian cloud
/// kernel has everything else it needs (ext4, serial console, PVH entry) built in.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    // An overlay root: the image's shared base below the machine's writable layer.
    "overlay",
];

/// Version of the cache entry layout and initramfs layout; bump it when either changes so
/// old entries are not reused.
const LAYOUT_VERSION: &str = "hearth-kit-v1";
const VMLINUX: &str = "vmlinux";
const INITRAMFS: &str = "initramfs.cpio";

/// Where the kit's inputs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KitSource {
    /// The root of the extracted `linux-image-*-cloud-amd64` package (holds `boot/` and
    /// `lib/modules/`).
    pub kernel_dir: PathBuf,
    /// The static `hearth-init` executable.
    pub init_binary: PathBuf,
}

/// A ready guest kit: files in the cache that a VMM can boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestKit {
    /// The uncompressed ELF kernel.
    pub vmlinux: PathBuf,
    /// The initramfs (newc cpio, uncompressed).
    pub initramfs: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_version: String,
    /// The cache key of this kit: equal ids mean identical kernel and initramfs. Other
    /// caches derived from the kit (the accelerator probe) key on it.
    pub id: String,
}

/// Why the kit could not be assembled. Each message names the file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// `boot/vmlinuz-*` is missing.
    #[error("no boot/vmlinuz-* under kernel dir {dir} (run deploy/install-guest-kernel.sh)")]
    NoKernel {
        /// The kernel dir.
        dir: PathBuf,
    },
    /// More than one kernel image; the kit would not know which one the modules match.
    #[error("kernel dir {dir} holds several kernel images ({found:?}); keep one")]
    AmbiguousKernel {
        /// The kernel dir.
        dir: PathBuf,
        /// The file names found.
        found: Vec<String>,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The kernel image could not be decompressed.
    #[error("kernel image {path}: {source}")]
    Kernel {
        /// The `vmlinuz` file.
        path: PathBuf,
        /// The cause.
        source: BzImageError,
    },
    /// A module the guest needs is not in the kernel package.
    #[error("kernel module {module}.ko not found under {dir}")]
    ModuleMissing {
        /// Module name.
        module: String,
        /// The module tree searched.
        dir: PathBuf,
    },
    /// The init is not a static executable.
    #[error("guest init {path} is unusable as PID 1: {source}")]
    InitNotStatic {
        /// The init binary.
        path: PathBuf,
        /// What is wrong with it.
        source: ElfError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KitError + '_ {
    move |source| KitError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl GuestKit {
    /// Returns the kit for `source`, building it into `cache_dir` if no cache entry for
    /// these inputs exists yet. Blocking (file I/O, decompression): call it from a
    /// blocking thread in async code.
    ///
    /// Idempotent: a second call with unchanged inputs returns the same paths after two
    /// `stat`s; concurrent callers may both build, one wins the rename, both get the same
    /// entry. Undo: deleting `cache_dir` (or one entry) is always safe while no VMM is
    /// starting; a running VMM holds its kernel and initramfs in guest memory already.
    pub fn ensure(source: &KitSource, cache_dir: &Path) -> Result<GuestKit, KitError> {
        let (vmlinuz, kernel_version) = find_kernel_image(&source.kernel_dir)?;
        let id = cache_key(&vmlinuz, &source.init_binary)?;
        let entry = cache_dir.join(&id);
        let kit = GuestKit {
            vmlinux: entry.join(VMLINUX),
            initramfs: entry.join(INITRAMFS),
            kernel_version,
            id,
        };
        if kit.vmlinux.is_file() && kit.initramfs.is_file() {
            return Ok(kit);
        }
        let built = build_entry(source, &vmlinuz, &kit, cache_dir);
        // The decompressed kernel was tens of MiB, now free.
        crate::heap::give_back();
        built?;
        Ok(kit)
    }
}

/// The single `boot/vmlinuz-<release>` of the package and its release (also what `hearth
/// doctor` looks for).
pub fn find_kernel_image(kernel_dir: &Path) -> Result<(PathBuf, String), KitError> {
    let boot = kernel_dir.join("boot");
    let rd = fs::read_dir(&boot).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => KitError::NoKernel {
            dir: kernel_dir.to_path_buf(),
        },
        _ => KitError::Io {
            path: boot.clone(),
            source: e,
        },
    })?;
    let mut found = Vec::new();
    for ent in rd {
        let ent = ent.map_err(io_err(&boot))?;
        if let Some(name) = ent.file_name().to_str()
            && name.starts_with("vmlinuz-")
        {
            found.push(name.to_string());
        }
    }
    found.sort();
    match found.as_slice() {
        [] => Err(KitError::NoKernel {
            dir: kernel_dir.to_path_buf(),
        }),
        [one] => {
            let release = one.trim_start_matches("vmlinuz-").to_string();
            Ok((boot.join(one), release))
        }
        _ => Err(KitError::AmbiguousKernel {
            dir: kernel_dir.to_path_buf(),
            found,
        }),
    }
}

/// Hash of the inputs' identities; see the module docs for what is in it and why.
fn cache_key(vmlinuz: &Path, init: &Path) -> Result<String, KitError> {
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION.as_bytes());
    for path in [vmlinuz, init] {
        let m = fs::metadata(path).map_err(io_err(path))?;
        h.update(path.as_os_str().as_encoded_bytes());
        for n in [
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime() as u64,
            m.mtime_nsec() as u64,
            m.ctime() as u64,
            m.ctime_nsec() as u64,
        ] {
            h.update(n.to_le_bytes());
        }
    }
    for m in GUEST_MODULES {
        h.update(m.as_bytes());
        h.update([0]);
    }
    Ok(hex::encode(&h.finalize()[..16]))
}

/// Builds the entry in a private directory and renames it into place.
fn build_entry(
    source: &KitSource,
    vmlinuz: &Path,
    kit: &GuestKit,
    cache_dir: &Path,
) -> Result<(), KitError> {
    // Check the cheap things before the expensive decompression.
    let init = fs::read(&source.init_binary).map_err(io_err(&source.init_binary))?;
    elf::check_static(&init).map_err(|source_err| KitError::InitNotStatic {
        path: source.init_binary.clone(),
        source: source_err,
    })?;
    let modules_dir = source
        .kernel_dir
        .join("lib/modules")
        .join(&kit.kernel_version);
    let modules = collect_modules(&modules_dir)?;
    let image = fs::read(vmlinuz).map_err(io_err(vmlinuz))?;
    let vmlinux = bzimage::extract_vmlinux(&image).map_err(|e| KitError::Kernel {
        path: vmlinuz.to_path_buf(),
        source: e,
    })?;
    drop(image);

    fs::create_dir_all(cache_dir).map_err(io_err(cache_dir))?;
    remove_abandoned_builds(cache_dir);
    let tmp = cache_dir.join(format!(
        ".build-{}-{}-{}",
        kit.id,
        std::process::id(),
        unique_suffix()
    ));
    let result = write_entry(&tmp, &vmlinux, &init, &modules)
        .and_then(|()| publish(&tmp, cache_dir, &kit.id));
    // Whatever happened, our private directory is no longer needed (after a successful
    // rename it no longer exists, and removal fails harmlessly).
    let _ = fs::remove_dir_all(&tmp);
    result
}

fn write_entry(
    dir: &Path,
    vmlinux: &[u8],
    init: &[u8],
    modules: &[ModuleFile],
) -> Result<(), KitError> {
    fs::create_dir(dir).map_err(io_err(dir))?;
    let vm_path = dir.join(VMLINUX);
    write_synced(&vm_path, |f| f.write_all(vmlinux))?;
    let ird_path = dir.join(INITRAMFS);
    write_synced(&ird_path, |f| {
        let w = io::BufWriter::with_capacity(1 << 20, f);
        initramfs::write_initramfs(w, init, modules)?
            .into_inner()
            .map_err(|e| e.into_error())?;
        Ok(())
    })?;
    sync_dir(dir)
}

fn write_synced(
    path: &Path,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> Result<(), KitError> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    fill(&mut f).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), KitError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Renames the finished build into place. Losing a race to another builder is success:
/// the winner's entry was built from the same inputs.
fn publish(tmp: &Path, cache_dir: &Path, id: &str) -> Result<(), KitError> {
    let dest = cache_dir.join(id);
    match fs::rename(tmp, &dest) {
        Ok(()) => sync_dir(cache_dir),
        Err(e)
            if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY))
                && dest.join(VMLINUX).is_file()
                && dest.join(INITRAMFS).is_file() =>
        {
            Ok(())
        }
        Err(e) => Err(KitError::Io {
            path: dest,
            source: e,
        }),
    }
}

/// Finds each module of [`GUEST_MODULES`] in the package's module tree. Module file names
/// may spell `_` as `-`; the kernel treats both alike.
fn collect_modules(modules_dir: &Path) -> Result<Vec<ModuleFile>, KitError> {
    let mut found: Vec<Option<PathBuf>> = vec![None; GUEST_MODULES.len()];
    let mut stack = vec![modules_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(io_err(&dir))?;
        for ent in rd {
            let ent = ent.map_err(io_err(&dir))?;
            let path = ent.path();
            let ft = ent.file_type().map_err(io_err(&path))?;
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            let Some(name) = ent
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".ko"))
                .map(|n| n.replace('-', "_"))
            else {
                continue;
            };
            if let Some(i) = GUEST_MODULES.iter().position(|m| *m == name) {
                found[i] = Some(path);
            }
        }
    }
    GUEST_MODULES
        .iter()
        .zip(found)
        .map(|(name, path)| {
            let path = path.ok_or_else(|| KitError::ModuleMissing {
                module: (*name).to_string(),
                dir: modules_dir.to_path_buf(),
            })?;
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            Ok(ModuleFile {
                name: (*name).to_string(),
                bytes,
            })
        })
        .collect()
}

/// Removes `.build-*` directories whose builder process no longer exists (a crash or a
/// kill mid-build). Best effort: a failure only leaves garbage behind.
fn remove_abandoned_builds(cache_dir: &Path) {
    let Ok(rd) = fs::read_dir(cache_dir) else {
        return;
    };
    for ent in rd.flatten() {
        let name = ent.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".build-")) else {
            continue;
        };
        // .build-<key>-<pid>-<n>
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new("/proc").join(pid.to_string()).exists()
        {
            let _ = fs::remove_dir_all(ent.path());
        }
    }
}

/// Distinguishes two builds by one process (two threads) from each other.
fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A minimal static ELF: header plus one PT_LOAD program header.
    fn static_elf() -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        elf
    }

    /// A fake package: a "bzImage" that is just a legacy LZ4 frame of an ELF header, and
    /// one file per module (some spelled with dashes, in nested directories).
    fn fake_package(root: &Path) -> KitSource {
        let kdir = root.join("kernel");
        fs::create_dir_all(kdir.join("boot")).unwrap();
        let payload = static_elf();
        let mut image = vec![0u8; 512];
        image.extend_from_slice(&[0x02, 0x21, 0x4C, 0x18]);
        let c = lz4_flex::block::compress(&payload);
        image.extend_from_slice(&(c.len() as u32).to_le_bytes());
        image.extend_from_slice(&c);
        fs::write(kdir.join("boot/vmlinuz-9.9.9-test"), &image).unwrap();
        let mdir = kdir.join("lib/modules/9.9.9-test/kernel");
        for (i, m) in GUEST_MODULES.iter().enumerate() {
            let d = mdir.join(format!("d{}", i % 3));
            fs::create_dir_all(&d).unwrap();
            let file = if i % 2 == 0 {
                m.replace('_', "-")
            } else {
                m.to_string()
            };
            fs::write(d.join(format!("{file}.ko")), m.as_bytes()).unwrap();
        }
        let init = root.join("init");
        fs::write(&init, static_elf()).unwrap();
        KitSource {
            kernel_dir: kdir,
            init_binary: init,
        }
    }

    #[test]
    fn builds_once_then_hits_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let source = fake_package(tmp.path());
        let cache = tmp.path().join("cache");
        let kit = GuestKit::ensure(&source, &cache).unwrap();
        assert_eq!(kit.kernel_version, "9.9.9-test");
        assert_eq!(fs::read(&kit.vmlinux).unwrap(), static_elf());
        let ird = fs::read(&kit.initramfs).unwrap();
        for (i, m) in GUEST_MODULES.iter().enumerate() {
            let path = initramfs::module_path(i, m);
            assert!(
                ird.windows(path.len()).any(|w| w == path.as_bytes()),
                "{path} missing from the initramfs"
            );
        }
        let t = Instant::now();
        let again = GuestKit::ensure(&source, &cache).unwrap();
        let hit = t.elapsed();
        assert_eq!(again, kit);
        assert!(hit.as_millis() < 50, "cache hit took {hit:?}");
        // Only the entry is left: no build directory.
        let names: Vec<_> = fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(&kit.id)]);
    }

    #[test]
    fn a_new_init_gets_a_new_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let source = fake_package(tmp.path());
        let cache = tmp.path().join("cache");
        let first = GuestKit::ensure(&source, &cache).unwrap();
        let mut elf = static_elf();
        elf.push(0);
        fs::write(&source.init_binary, elf).unwrap();
        let second = GuestKit::ensure(&source, &cache).unwrap();
        assert_ne!(first.id, second.id);
        assert!(first.vmlinux.is_file() && second.vmlinux.is_file());
    }

    #[test]
    fn concurrent_builders_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let source = fake_package(tmp.path());
        let cache = tmp.path().join("cache");
        let kits: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| GuestKit::ensure(&source, &cache)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        assert!(kits.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 1);
    }

    #[test]
    fn refuses_a_dynamic_init() {
        let tmp = tempfile::tempdir().unwrap();
        let mut source = fake_package(tmp.path());
        source.init_binary = std::env::current_exe().unwrap();
        let err = GuestKit::ensure(&source, &tmp.path().join("cache")).unwrap_err();
        assert!(
            matches!(
                err,
                KitError::InitNotStatic {
                    source: ElfError::Dynamic(_),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn names_a_missing_module() {
        let tmp = tempfile::tempdir().unwrap();
        let source = fake_package(tmp.path());
        let mdir = source.kernel_dir.join("lib/modules/9.9.9-test/kernel");
        for d in fs::read_dir(&mdir).unwrap().flatten() {
            let _ = fs::remove_file(d.path().join("virtio-blk.ko"));
            let _ = fs::remove_file(d.path().join("virtio_blk.ko"));
        }
        let err = GuestKit::ensure(&source, &tmp.path().join("cache")).unwrap_err();
        assert!(
            matches!(&err, KitError::ModuleMissing { module, .. } if module == "virtio_blk"),
            "{err}"
        );
    }

    #[test]
    fn missing_kernel_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let source = KitSource {
            kernel_dir: tmp.path().join("nope"),
            init_binary: tmp.path().join("init"),
        };
        let err = GuestKit::ensure(&source, tmp.path()).unwrap_err();
        assert!(matches!(err, KitError::NoKernel { .. }), "{err}");
    }
}
