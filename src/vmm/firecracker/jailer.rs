//! Jailer mode: Firecracker started through its jailer, chrooted, as an unprivileged
//! user, optionally inside a cgroup with limits.
//!
//! The jailer's chroot is `<chroot base>/<exec file name>/<instance id>/root`. hearth puts
//! the chroot base inside the machine directory (`<workdir>/jail`), so the jail goes away
//! with the machine directory on destroy, and two machines can never share a jail. The
//! VMM sees only the jail: the kernel, the initramfs and both disks are hard-linked into
//! it (the kit is copied when it lives on another filesystem), and every path given to
//! the API is relative to the jail's root. What the VMM writes (the root disk, its log,
//! metrics, console and snapshots) is handed to the jail's uid/gid.
//!
//! The cgroup is `<mount>/<parent cgroup>/<instance id>`: one directory under the cgroup2
//! mount, or (cgroup v1) one under the mount of each controller a limit names. The jailer
//! creates them; [`JailerSettings::remove_cgroup`] removes them once the process is gone.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::Layout;
use crate::vmm::{ControlError, LaunchError, LaunchSpec};

/// The kernel's name inside the jail.
pub const KERNEL: &str = "vmlinux";
/// The initramfs's name inside the jail.
pub const INITRD: &str = "initramfs.cpio";
/// The root disk's name inside the jail.
pub const ROOT_DISK: &str = "root.img";
/// The config disk's name inside the jail.
pub const CONFIG_DISK: &str = "config.img";
/// The shared base's name inside the jail (overlay roots only).
pub const BASE_DISK: &str = "base.img";
/// The chroot base, relative to the machine directory.
pub const CHROOT_BASE: &str = "jail";

/// How to jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerSettings {
    /// The jailer binary.
    pub binary: PathBuf,
    /// The uid Firecracker runs as when the machine has no identity of its own (VMMs
    /// run as root, `vmm.unprivileged = false`); otherwise each jail takes its machine's
    /// (`vmm.uid_base` + lease slot), so no two Firecrackers share a uid.
    pub uid: u32,
    /// The gid that goes with [`JailerSettings::uid`].
    pub gid: u32,
    /// cgroup limits, `<file>=<value>` (e.g. `cpu.max=50000 100000` in v2,
    /// `cpu.shares=512` in v1); empty: no cgroup.
    pub cgroups: Vec<String>,
    /// 1 or 2.
    pub cgroup_version: u8,
    /// The parent cgroup of every machine's cgroup.
    pub parent_cgroup: String,
    /// Whether the driver removes the machine's cgroup when its process is gone. The
    /// daemon sets false: there the cgroup is its `cgroup` step's, which the jailer
    /// shares (same parent, same instance id).
    pub release_cgroup: bool,
}

impl JailerSettings {
    /// The uid and gid `spec`'s Firecracker runs as: its machine's own, else the
    /// configured fallback.
    pub fn identity(&self, spec: &LaunchSpec) -> (u32, u32) {
        spec.confine
            .run_as
            .map_or((self.uid, self.gid), |id| (id.uid, id.gid))
    }

    /// The jail's root for a machine.
    pub fn chroot_root(&self, workdir: &Path, firecracker: &Path, instance_id: &str) -> PathBuf {
        let exec_name = firecracker
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| OsString::from("firecracker"));
        workdir
            .join(CHROOT_BASE)
            .join(exec_name)
            .join(instance_id)
            .join("root")
    }

    /// The jailer's arguments; Firecracker's own follow `--`.
    pub fn args(
        &self,
        spec: &LaunchSpec,
        firecracker: &Path,
        instance_id: &str,
        api_socket: &str,
    ) -> Vec<OsString> {
        let (uid, gid) = self.identity(spec);
        let mut a: Vec<OsString> = vec![
            "--id".into(),
            instance_id.into(),
            "--exec-file".into(),
            firecracker.as_os_str().to_os_string(),
            "--uid".into(),
            uid.to_string().into(),
            "--gid".into(),
            gid.to_string().into(),
            "--chroot-base-dir".into(),
            spec.workdir.join(CHROOT_BASE).into_os_string(),
        ];
        if let Some(ns) = &spec.netns {
            a.push("--netns".into());
            a.push(Path::new("/run/netns").join(ns).into_os_string());
        }
        if !self.cgroups.is_empty() {
            // Under the daemon the jailer's cgroup nests in the machine's own (whose
            // limits hold first), so the machine's `cgroup` step removes both.
            let parent = if spec.confine.cgroup_path.is_empty() {
                self.parent_cgroup.clone()
            } else {
                spec.confine.cgroup_path.clone()
            };
            a.push("--cgroup-version".into());
            a.push(self.cgroup_version.to_string().into());
            a.push("--parent-cgroup".into());
            a.push(parent.into());
            for c in &self.cgroups {
                a.push("--cgroup".into());
                a.push(c.into());
            }
        }
        a.push("--".into());
        a.push("--api-sock".into());
        a.push(format!("/{api_socket}").into());
        a
    }

    /// The jail of one instance: `<chroot base>/<exec name>/<instance id>`, all the
    /// jailer makes for it (the root, its device nodes, the copied binary).
    pub fn instance_dir(&self, workdir: &Path, firecracker: &Path, instance_id: &str) -> PathBuf {
        let root = self.chroot_root(workdir, firecracker, instance_id);
        root.parent().map(Path::to_path_buf).unwrap_or(root)
    }

    /// Fills the jail: the kit and the disks linked in, ownership handed over.
    ///
    /// Starts from a clean jail: whatever an earlier launch of this instance left (its
    /// device nodes, which the jailer refuses to make twice, its sockets) is removed
    /// first, so a launch after a failed or released one behaves as the first. Only
    /// called when no process of the instance runs (the driver adopts one first).
    /// Undo: removing the machine directory (the jail lives inside it).
    pub fn prepare(
        &self,
        spec: &LaunchSpec,
        layout: &Layout,
        firecracker: &Path,
        instance_id: &str,
    ) -> Result<(), LaunchError> {
        let root = &layout.host_dir;
        let err = |path: &Path| {
            let machine_id = spec.machine_id.clone();
            let path = path.to_path_buf();
            move |source| LaunchError::Workdir {
                machine_id,
                path,
                source,
            }
        };
        let instance = self.instance_dir(&spec.workdir, firecracker, instance_id);
        match fs::remove_dir_all(&instance) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&instance)(e)),
        }
        fs::create_dir_all(root).map_err(err(root))?;
        self.give(spec, root)?;
        for (from, name, copy_ok) in [
            (&spec.kit.vmlinux, KERNEL, true),
            (&spec.kit.initramfs, INITRD, true),
            (&spec.root_disk, ROOT_DISK, false),
            (&spec.config_disk, CONFIG_DISK, false),
        ] {
            let to = root.join(name);
            link_into(from, &to, copy_ok).map_err(err(&to))?;
        }
        // The shared base: another link to its inode, which stays root's and read-only
        // (never given to the jail's uid: other machines use the same inode).
        if let Some(base) = &spec.base_disk {
            let to = root.join(BASE_DISK);
            link_into(base, &to, false).map_err(err(&to))?;
        }
        self.give(spec, &root.join(ROOT_DISK))?;
        // The config disk is read-only to the guest; readable is enough.
        let cfg = root.join(CONFIG_DISK);
        fs::set_permissions(&cfg, fs::Permissions::from_mode(0o644)).map_err(err(&cfg))?;
        Ok(())
    }

    /// Hands `path` to the jail's uid/gid. Idempotent.
    pub fn give(&self, spec: &LaunchSpec, path: &Path) -> Result<(), LaunchError> {
        let (uid, gid) = self.identity(spec);
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|source| {
            LaunchError::Workdir {
                machine_id: spec.machine_id.clone(),
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// Makes the directory `name` in the jail's root `root` (a directory its VMM can
    /// write, so nothing there is followed) and hands it to the root's owner, the
    /// identity [`JailerSettings::prepare`] gave the jail. Idempotent.
    pub fn give_dir(
        &self,
        root: &crate::vmmdir::VmmDir,
        name: &str,
    ) -> Result<crate::vmmdir::VmmDir, ControlError> {
        let io = |path: std::path::PathBuf| move |source| ControlError::Io { path, source };
        let dir = root.make_dir(name).map_err(io(root.show(name)))?;
        let (uid, gid) = root.owner().map_err(io(root.path().to_path_buf()))?;
        dir.chown(uid, gid).map_err(io(dir.path().to_path_buf()))?;
        Ok(dir)
    }

    /// The machine's cgroup directories (none when no limit is set).
    pub fn cgroup_dirs(&self, instance_id: &str) -> Vec<PathBuf> {
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        cgroup_dirs(
            &mounts,
            self.cgroup_version,
            &self.cgroups,
            &self.parent_cgroup,
            instance_id,
        )
    }

    /// Removes the machine's cgroups (empty once its process is gone), unless the
    /// daemon's `cgroup` step owns them (see `release_cgroup`). Idempotent.
    pub fn remove_cgroup(&self, instance_id: &str) {
        if !self.release_cgroup {
            return;
        }
        for dir in self.cgroup_dirs(instance_id) {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Where the jailer puts a machine's cgroup, from `/proc/mounts`: under the cgroup2
/// mount (v2), or under the mount of each controller the limits name (v1, the controller
/// being the part of a limit's file name before its first dot).
pub fn cgroup_dirs(
    mounts: &str,
    version: u8,
    limits: &[String],
    parent: &str,
    instance_id: &str,
) -> Vec<PathBuf> {
    if limits.is_empty() {
        return Vec::new();
    }
    let entries: Vec<(&str, &str, &str)> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, kind, options) = (f.next()?, f.next()?, f.next()?, f.next()?);
            Some((point, kind, options))
        })
        .collect();
    let mut points: Vec<&str> = Vec::new();
    if version == 2 {
        points.extend(
            entries
                .iter()
                .find(|(_, kind, _)| *kind == "cgroup2")
                .map(|(p, _, _)| *p),
        );
    } else {
        for limit in limits {
            let controller = limit.split(['.', '=']).next().unwrap_or_default();
            let found = entries.iter().find(|(_, kind, options)| {
                *kind == "cgroup" && options.split(',').any(|o| o == controller)
            });
            if let Some((p, _, _)) = found
                && !points.contains(p)
            {
                points.push(p);
            }
        }
    }
    points
        .into_iter()
        .map(|p| Path::new(p).join(parent).join(instance_id))
        .collect()
}

/// Hard-links `from` to `to` (replacing `to`); copies when they are on different
/// filesystems and `copy_ok`.
fn link_into(from: &Path, to: &Path, copy_ok: bool) -> std::io::Result<()> {
    match fs::remove_file(to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if copy_ok && e.raw_os_error() == Some(libc::EXDEV) => {
            fs::copy(from, to).map(|_| ())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::kit::GuestKit;

    fn settings() -> JailerSettings {
        JailerSettings {
            binary: "/usr/local/bin/jailer".into(),
            uid: 123,
            gid: 456,
            cgroups: vec!["cpu.max=50000 100000".into()],
            cgroup_version: 2,
            parent_cgroup: "hearth".into(),
            release_cgroup: true,
        }
    }

    fn spec(dir: &Path) -> LaunchSpec {
        LaunchSpec {
            machine_id: "abc".into(),
            workdir: dir.to_path_buf(),
            netns: Some("hth-abc".into()),
            tap: None,
            vcpus: 1,
            memory_mib: 128,
            kit: GuestKit {
                vmlinux: dir.join("vmlinux-src"),
                initramfs: dir.join("initramfs-src"),
                kernel_version: "6.1".into(),
                id: "k".into(),
            },
            root_disk: dir.join("root.img"),
            base_disk: None,
            config_disk: dir.join("config.img"),
            confine: Default::default(),
        }
    }

    #[test]
    fn the_jail_is_inside_the_machine_directory() {
        let s = settings();
        let root = s.chroot_root(
            Path::new("/m/abc"),
            Path::new("/opt/fc/firecracker"),
            "hearth-abc",
        );
        assert_eq!(
            root,
            PathBuf::from("/m/abc/jail/firecracker/hearth-abc/root")
        );
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
            cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0\n\
            cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            cgroup_dirs(mounts, 2, &s.cgroups, "hearth", "hearth-abc"),
            vec![PathBuf::from("/sys/fs/cgroup/unified/hearth/hearth-abc")]
        );
        let v1 = vec![
            "cpu.shares=512".to_string(),
            "memory.limit_in_bytes=268435456".to_string(),
            "cpu.cfs_quota_us=50000".to_string(),
        ];
        assert_eq!(
            cgroup_dirs(mounts, 1, &v1, "hearth", "hearth-abc"),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu/hearth/hearth-abc"),
                PathBuf::from("/sys/fs/cgroup/memory/hearth/hearth-abc"),
            ]
        );
        assert!(cgroup_dirs(mounts, 1, &[], "hearth", "x").is_empty());
    }

    #[test]
    fn args_name_the_jail_the_netns_and_the_cgroup() {
        let s = settings();
        let args: Vec<String> = s
            .args(
                &spec(Path::new("/m/abc")),
                Path::new("/opt/fc/firecracker"),
                "hearth-abc",
                "firecracker.sock",
            )
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(line.starts_with("--id hearth-abc --exec-file /opt/fc/firecracker --uid 123 --gid 456 --chroot-base-dir /m/abc/jail"), "{line}");
        assert!(line.contains("--netns /run/netns/hth-abc"), "{line}");
        assert!(
            line.contains("--cgroup-version 2 --parent-cgroup hearth --cgroup"),
            "{line}"
        );
        assert!(args.contains(&"cpu.max=50000 100000".to_string()));
        assert!(line.ends_with("-- --api-sock /firecracker.sock"), "{line}");
        // The marker scan finds the machine in the jailer's command line too.
        assert_eq!(crate::vmm::procfs::marker_id(&args, "hearth-"), Some("abc"));
    }

    #[test]
    fn two_machines_jails_run_as_two_uids() {
        let s = settings();
        let uid_of = |slot: u32| {
            let mut sp = spec(Path::new("/m/abc"));
            sp.confine.run_as = Some(crate::vmm::RunAs {
                uid: 900_000 + slot,
                gid: 777,
                kvm_gid: None,
            });
            let args: Vec<String> = s
                .args(
                    &sp,
                    Path::new("/opt/fc/firecracker"),
                    "hearth-abc",
                    "f.sock",
                )
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let at = args.iter().position(|a| a == "--uid").expect("--uid");
            assert_eq!(
                args[at + 2..at + 4],
                ["--gid".to_string(), "777".to_string()]
            );
            args[at + 1].clone()
        };
        assert_eq!(uid_of(1), "900001");
        assert_eq!(uid_of(2), "900002");
        // Without a machine identity (VMMs as root), the configured fallback.
        assert_eq!(s.identity(&spec(Path::new("/m/abc"))), (123, 456));
    }

    #[test]
    fn prepare_links_the_files_and_is_repeatable() {
        let dir = tempfile::tempdir().unwrap();
        let mut sp = spec(dir.path());
        sp.base_disk = Some(dir.path().join("base.ext4"));
        for f in [
            &sp.kit.vmlinux,
            &sp.kit.initramfs,
            &sp.root_disk,
            &sp.config_disk,
        ]
        .into_iter()
        .chain(sp.base_disk.as_ref())
        {
            fs::write(f, b"x").unwrap();
        }
        let me = JailerSettings {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            ..settings()
        };
        let layout = Layout {
            host_dir: me.chroot_root(dir.path(), Path::new("firecracker"), "hearth-abc"),
            vmm_dir: "/".into(),
        };
        me.prepare(&sp, &layout, Path::new("firecracker"), "hearth-abc")
            .unwrap();
        me.prepare(&sp, &layout, Path::new("firecracker"), "hearth-abc")
            .unwrap();
        use std::os::unix::fs::MetadataExt;
        let disk = fs::metadata(layout.host_dir.join(ROOT_DISK)).unwrap();
        assert_eq!(disk.ino(), fs::metadata(&sp.root_disk).unwrap().ino());
        assert!(layout.host_dir.join(KERNEL).exists());
        assert_eq!(layout.vmm(ROOT_DISK), "/root.img");
        // The shared base is linked in too, the same inode.
        let base = fs::metadata(layout.host_dir.join(BASE_DISK)).unwrap();
        assert_eq!(
            base.ino(),
            fs::metadata(sp.base_disk.as_ref().unwrap()).unwrap().ino()
        );
    }
}
