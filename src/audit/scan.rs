//! The audit's only I/O: what exists on the host under hearth's naming, and what the
//! `leases` and `routes` tables hold. The comparison with the records is elsewhere
//! (`compare`), pure.
//!
//! Why VMM processes are also matched on the data directory: the marker prefix
//! (`-name hearth-<id>`) is the driver's, not this daemon's, so another daemon on the
//! same host (another data directory) may run VMMs with the same marker. A VMM of this
//! daemon always has its files in `<data_dir>/machines/<id>/`, and its command line says
//! so; a process that does not is someone else's and is neither reported nor swept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::AuditError;
use crate::actors::services::Services;
use crate::net::NetResource;

/// A host object and the machine id its name carries.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Named {
    /// The object's name (a namespace, a link, an entry under `machines/`).
    pub name: String,
    /// The machine id in the name; none when the name has hearth's prefix (or lives in
    /// hearth's directory) but is not followed by an id.
    pub machine_id: Option<String>,
}

impl Named {
    /// An object whose name is, or ends with, `machine_id`.
    pub fn of(name: impl Into<String>, machine_id: Option<&str>) -> Named {
        Named {
            name: name.into(),
            machine_id: machine_id.map(str::to_string),
        }
    }
}

/// What exists, as one scan saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostScan {
    /// The network name prefix scanned for (`network.prefix`).
    pub prefix: String,
    /// `<data_dir>/machines`.
    pub machines_dir: PathBuf,
    /// Namespaces named `<prefix>-...`.
    pub netns: Vec<Named>,
    /// Root-namespace links named `<prefix><id>`.
    pub links: Vec<Named>,
    /// This daemon's VMM processes: (machine id, pid).
    pub vmms: Vec<(String, i32)>,
    /// Entries under `<data_dir>/machines`.
    pub machine_dirs: Vec<Named>,
    /// The `leases` table: slot -> machine id.
    pub leases: BTreeMap<u32, String>,
    /// Machine ids with a row in the `routes` table.
    pub routes: Vec<String>,
    /// Machines' packet policies in the daemon's nftables table, named
    /// [`policy_name`].
    pub policies: Vec<Named>,
    /// Directories under the daemon's parent cgroup, in every hierarchy in use (one
    /// entry per directory, named by its path).
    pub cgroups: Vec<Named>,
}

/// How a machine's packet policy is named in findings.
pub fn policy_name(prefix: &str, id: &str) -> String {
    format!("{} chains m{id}_*", crate::net::policy::table_name(prefix))
}

/// True for hearth's machine id shape: 10 lowercase hex characters (the shape
/// `machine::spec::new_machine_id` makes and the network names parse).
pub fn is_machine_id(text: &str) -> bool {
    text.len() == 10
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Scans the host first, then the tables (see `audit::run` for why this order).
/// Read-only.
pub async fn scan(services: &Services) -> Result<HostScan, AuditError> {
    let config = services.config();
    let prefix = config.network.prefix.clone();
    // As `Config::machine_dir` lays it out.
    let machines_dir = config.data_dir.join("machines");
    let mut netns = Vec::new();
    let mut links = Vec::new();
    for resource in services.net().scan(&prefix).await? {
        match resource {
            NetResource::Netns { name, machine_id } => netns.push(Named { name, machine_id }),
            NetResource::Link { name, machine_id } => links.push(Named {
                name,
                machine_id: Some(machine_id),
            }),
        }
    }
    let policies = services
        .net()
        .scan_policies(&prefix)
        .await?
        .into_iter()
        .map(|id| Named::of(policy_name(&prefix, &id), Some(&id)))
        .collect();
    let cgroups = services
        .vmm_host()
        .cgroups
        .scan()?
        .into_iter()
        .map(|(path, name)| {
            let id = is_machine_id(&name).then_some(name.as_str());
            Named::of(path, id)
        })
        .collect();
    let marker = services.vmm().name_prefix().to_string();
    let dir = machines_dir.clone();
    let (vmms, machine_dirs) = tokio::task::spawn_blocking(move || {
        Ok::<_, AuditError>((own_vmms(&marker, &dir), list_dir(&dir)?))
    })
    .await
    .map_err(|e| AuditError::Task(e.to_string()))??;
    let store = services.store();
    let leases = store.leases()?;
    let routes = store.routes()?.into_iter().map(|r| r.machine_id).collect();
    Ok(HostScan {
        prefix,
        machines_dir,
        netns,
        links,
        vmms,
        machine_dirs,
        leases,
        routes,
        policies,
        cgroups,
    })
}

/// VMM processes carrying the marker whose command line names a file in this daemon's
/// directory of that machine.
fn own_vmms(marker: &str, machines_dir: &Path) -> Vec<(String, i32)> {
    crate::vmm::find_processes(marker)
        .into_iter()
        .filter(|(id, pid)| {
            is_machine_id(id) && crate::vmm::marked::names_dir(*pid, &machines_dir.join(id))
        })
        .collect()
}

/// Every entry under `dir`; a missing directory has none.
fn list_dir(dir: &Path) -> Result<Vec<Named>, AuditError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(AuditError::Dir {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| AuditError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let id = is_machine_id(&name).then(|| name.clone());
        out.push(Named {
            name,
            machine_id: id,
        });
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_id_shape() {
        assert!(is_machine_id("0123456789"));
        assert!(is_machine_id("abcdef0123"));
        for bad in [
            "",
            "012345678",
            "01234567890",
            "ABCDEF0123",
            "abcdefg123",
            "../../etc",
        ] {
            assert!(!is_machine_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn listing_names_ids_and_other_entries() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("machines");
        assert_eq!(list_dir(&dir).expect("missing dir"), Vec::new());
        std::fs::create_dir_all(dir.join("0123456789")).expect("mkdir");
        std::fs::write(dir.join("stray.tmp"), b"").expect("write");
        assert_eq!(
            list_dir(&dir).expect("list"),
            vec![
                Named::of("0123456789", Some("0123456789")),
                Named::of("stray.tmp", None),
            ]
        );
    }
}
