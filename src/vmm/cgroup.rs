//! Per-machine cgroups: every VMM runs in `<hierarchy>/hearth_<prefix>/<machine id>`,
//! with a CPU quota of its vCPUs, a memory limit of its memory plus a stated overhead,
//! and a cap on its tasks ([`pids_max`]: a VMM that breaks out of its guest and its
//! seccomp filter still cannot fork the host out of pids).
//!
//! cgroup v2 is used where the unified hierarchy has the `cpu` and `memory` controllers
//! (and `pids` where it has it); otherwise the v1 hierarchies of those controllers (hosts
//! whose controllers are bound to v1 leave the cgroup2 mount empty). The names depend only on the prefix and
//! the machine id, so every call works after a crash with nothing recorded.
//!
//! Every operation is idempotent: `ensure` creates what is missing and writes the limits
//! again; `remove` ends whatever still runs inside (only the machine's VMM can be there)
//! and removes the directories; a missing directory is success.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The CFS period the quota is a share of.
const PERIOD_US: u64 = 100_000;

/// Tasks (processes and threads) one VMM may have beyond one per vCPU: QEMU's main
/// loop, its RCU and I/O worker pool (at most 64), Firecracker's few threads.
const TASKS_BEYOND_VCPUS: u64 = 128;

/// The `pids.max` of a machine with `vcpus` vCPUs.
pub fn pids_max(vcpus: u32) -> u64 {
    TASKS_BEYOND_VCPUS + u64::from(vcpus)
}

/// How long `remove` waits for killed processes to leave a cgroup.
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// A cgroup operation failed, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {action}: {source}")]
pub struct CgroupError {
    /// The directory or file.
    pub path: PathBuf,
    /// What was being done.
    pub action: &'static str,
    /// The system error.
    #[source]
    pub source: io::Error,
}

fn fail(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError {
        path,
        action,
        source,
    }
}

/// Which cgroup layout the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy, mounted here, with `cpu` and `memory` available.
    V2(PathBuf),
    /// The v1 hierarchies of the `cpu` and the `memory` controller, and of `pids` when
    /// mounted.
    V1 {
        /// Where `cpu` is mounted.
        cpu: PathBuf,
        /// Where `memory` is mounted.
        memory: PathBuf,
        /// Where `pids` is mounted, if it is.
        pids: Option<PathBuf>,
    },
}

/// What a machine's cgroup limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// vCPUs: the quota is this many full CPUs.
    pub vcpus: u32,
    /// Memory limit in bytes (guest memory plus the VMM's overhead).
    pub memory_bytes: u64,
}

/// The cgroups of one daemon's machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    hierarchy: Hierarchy,
    /// `hearth_<prefix>`.
    parent: String,
}

impl Cgroups {
    /// Finds the host's hierarchy (see the module header) for the daemon with `prefix`.
    pub fn detect(prefix: &str) -> Result<Cgroups, String> {
        let mounts = fs::read_to_string("/proc/self/mounts")
            .map_err(|e| format!("read /proc/self/mounts: {e}"))?;
        Ok(Cgroups {
            hierarchy: pick(&mounts)?,
            parent: parent_name(prefix),
        })
    }

    /// For tests: a given hierarchy.
    pub fn with(hierarchy: Hierarchy, prefix: &str) -> Cgroups {
        Cgroups {
            hierarchy,
            parent: parent_name(prefix),
        }
    }

    /// The hierarchy in use.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// The directories of this daemon's parent cgroup (one per hierarchy in use).
    fn parents(&self) -> Vec<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V2(root) => vec![root.join(&self.parent)],
            Hierarchy::V1 { cpu, memory, pids } => [Some(cpu), Some(memory), pids.as_ref()]
                .into_iter()
                .flatten()
                .map(|root| root.join(&self.parent))
                .collect(),
        }
    }

    /// The machine's cgroup relative to a hierarchy's root: `hearth_<prefix>/<id>`.
    pub fn relative(&self, id: &str) -> String {
        format!("{}/{id}", self.parent)
    }

    /// [`Cgroups::relative`] without a detected hierarchy (the audit's pure half).
    pub fn relative_for(prefix: &str, id: &str) -> String {
        format!("{}/{id}", parent_name(prefix))
    }

    /// The machine's directories (one per hierarchy in use).
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        self.parents().into_iter().map(|p| p.join(id)).collect()
    }

    /// The files a process writes its pid (or `0`, itself) to, to join the machine's
    /// cgroup in every hierarchy.
    pub fn procs_files(&self, id: &str) -> Vec<PathBuf> {
        self.dirs(id)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Whether the machine's cgroup exists (in every hierarchy).
    pub fn present(&self, id: &str) -> bool {
        self.dirs(id).iter().all(|d| d.is_dir())
    }

    /// Creates the machine's cgroup if missing and writes its limits. Idempotent.
    /// Undo: [`Cgroups::remove`].
    pub fn ensure(&self, id: &str, limits: Limits) -> Result<(), CgroupError> {
        let quota = u64::from(limits.vcpus.max(1)) * PERIOD_US;
        match &self.hierarchy {
            Hierarchy::V2(root) => {
                // Controllers must be enabled down the path for the machine's files to
                // exist.
                enable_controllers(root)?;
                let parent = root.join(&self.parent);
                create_dir(&parent)?;
                enable_controllers(&parent)?;
                let dir = parent.join(id);
                create_dir(&dir)?;
                write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                let pids_file = dir.join("pids.max");
                if pids_file.exists() {
                    write(&pids_file, &pids_max(limits.vcpus).to_string())?;
                }
            }
            Hierarchy::V1 { cpu, memory, pids } => {
                let cpu_dir = cpu.join(&self.parent).join(id);
                create_dir(&cpu.join(&self.parent))?;
                create_dir(&cpu_dir)?;
                write(&cpu_dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&cpu_dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                let mem_dir = memory.join(&self.parent).join(id);
                create_dir(&memory.join(&self.parent))?;
                create_dir(&mem_dir)?;
                write(
                    &mem_dir.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                if let Some(pids) = pids {
                    let pids_dir = pids.join(&self.parent).join(id);
                    create_dir(&pids.join(&self.parent))?;
                    create_dir(&pids_dir)?;
                    write(
                        &pids_dir.join("pids.max"),
                        &pids_max(limits.vcpus).to_string(),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` into the machine's cgroup (every hierarchy). Idempotent.
    pub fn add(&self, id: &str, pid: i32) -> Result<(), CgroupError> {
        for file in self.procs_files(id) {
            write(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the machine's cgroup.
    pub fn pids(&self, id: &str) -> Vec<i32> {
        let mut out = Vec::new();
        for file in self.procs_files(id) {
            if let Ok(text) = fs::read_to_string(&file) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Removes the machine's cgroup, with any cgroup nested in it (a jailer's).
    /// Whatever still runs inside is killed first: only the machine's VMM ever joins it,
    /// and the VMM step is released before this one. Idempotent: a missing directory is
    /// success.
    pub fn remove(&self, id: &str) -> Result<(), CgroupError> {
        let deadline = Instant::now() + DRAIN_WAIT;
        for dir in self.dirs(id) {
            remove_tree(&dir, deadline)?;
        }
        Ok(())
    }

    /// The machine ids (and other names) under this daemon's parent, in any hierarchy:
    /// (path shown, name).
    pub fn scan(&self) -> Result<Vec<(String, String)>, CgroupError> {
        let mut out = Vec::new();
        for parent in self.parents() {
            let entries = match fs::read_dir(&parent) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(fail(&parent, "list")(e)),
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    out.push((parent.join(&name).display().to_string(), name));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The daemon's parent cgroup in every hierarchy: `hearth_<prefix>`.
fn parent_name(prefix: &str) -> String {
    format!("hearth_{prefix}")
}

/// The hierarchy from the mount table (see the module header).
fn pick(mounts: &str) -> Result<Hierarchy, String> {
    let mut v2 = None;
    let mut cpu = None;
    let mut memory = None;
    let mut pids = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(path), Some(fstype), Some(options)) =
            (fields.get(1), fields.get(2), fields.get(3))
        else {
            continue;
        };
        let options: Vec<&str> = options.split(',').collect();
        match *fstype {
            "cgroup2" if v2.is_none() => v2 = Some(PathBuf::from(path)),
            "cgroup" if options.contains(&"cpu") && cpu.is_none() => {
                cpu = Some(PathBuf::from(path))
            }
            "cgroup" if options.contains(&"memory") && memory.is_none() => {
                memory = Some(PathBuf::from(path))
            }
            "cgroup" if options.contains(&"pids") && pids.is_none() => {
                pids = Some(PathBuf::from(path))
            }
            _ => {}
        }
    }
    if let Some(root) = v2 {
        let controllers = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("cpu") && has("memory") {
            return Ok(Hierarchy::V2(root));
        }
    }
    match (cpu, memory) {
        (Some(cpu), Some(memory)) => Ok(Hierarchy::V1 { cpu, memory, pids }),
        _ => Err(
            "no cgroup hierarchy with the cpu and memory controllers is mounted (neither \
             cgroup2 with both nor cgroup v1 for each)"
                .to_string(),
        ),
    }
}

/// Removes `dir` and the cgroups nested in it, deepest first, killing what runs in each
/// until `deadline`. A missing directory is success.
fn remove_tree(dir: &Path, deadline: Instant) -> Result<(), CgroupError> {
    let children = match fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(fail(dir, "list")(e)),
    };
    for child in children {
        remove_tree(&child, deadline)?;
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                for pid in read_pids(&dir.join("cgroup.procs")) {
                    // SAFETY: kill(2) has no memory effects.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(fail(dir, "remove")(e)),
        }
    }
}

fn create_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(fail(dir, "create")(e)),
    }
}

fn write(file: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(file, value).map_err(fail(file, "write"))
}

fn read_pids(file: &Path) -> Vec<i32> {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Adds `+cpu +memory` (and `+pids` where the hierarchy offers it) to `dir`'s subtree
/// control where missing.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let now = fs::read_to_string(&file).map_err(fail(&file, "read"))?;
    let offered = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let pids = offered.split_whitespace().any(|c| c == "pids");
    for controller in ["cpu", "memory"].into_iter().chain(pids.then_some("pids")) {
        if !now.split_whitespace().any(|c| c == controller) {
            write(&file, &format!("+{controller}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_chosen_when_cgroup2_has_no_controllers() {
        let mounts = "cgroup2 /nonexistent/unified cgroup2 rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n";
        assert_eq!(
            pick(mounts).expect("pick"),
            Hierarchy::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                memory: "/sys/fs/cgroup/memory".into(),
                pids: None,
            }
        );
        let with_pids = format!("{mounts}cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,pids 0 0\n");
        assert_eq!(
            pick(&with_pids).expect("pick"),
            Hierarchy::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                memory: "/sys/fs/cgroup/memory".into(),
                pids: Some("/sys/fs/cgroup/pids".into()),
            }
        );
        let none = pick("cgroup2 /nonexistent cgroup2 rw 0 0\n").expect_err("no controllers");
        assert!(none.contains("cpu and memory"), "{none}");
    }

    #[test]
    fn names_depend_on_prefix_and_id_only() {
        let c = Cgroups::with(
            Hierarchy::V1 {
                cpu: "/c".into(),
                memory: "/m".into(),
                pids: Some("/p".into()),
            },
            "hth",
        );
        assert_eq!(
            c.procs_files("0123456789"),
            vec![
                PathBuf::from("/c/hearth_hth/0123456789/cgroup.procs"),
                PathBuf::from("/m/hearth_hth/0123456789/cgroup.procs"),
                PathBuf::from("/p/hearth_hth/0123456789/cgroup.procs"),
            ]
        );
        let v2 = Cgroups::with(Hierarchy::V2("/u".into()), "td1");
        assert_eq!(v2.dirs("x"), vec![PathBuf::from("/u/hearth_td1/x")]);
    }
}
