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
use std::path::Path;

use super::error::AuditError;
use crate::actors::services::Services;
use crate::machine::step::ResourceKind;
use crate::net::NetResource;

/// A host object and the machine id its name carries.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Named {
    /// The object's name as findings show it (a namespace, a link, a directory's path).
    pub name: String,
    /// The name a step's `owned` gives it (`machine::steps::Owned::name`): the shown
    /// name, or the machine id for objects named by id inside something else (a policy's
    /// chains, a cgroup in each hierarchy).
    pub key: String,
    /// The machine id in the name; none when the name has hearth's prefix (or lives in
    /// hearth's directory) but is not followed by an id.
    pub machine_id: Option<String>,
}

impl Named {
    /// An object known by its own name, which is, or ends with, `machine_id`.
    pub fn of(name: impl Into<String>, machine_id: Option<&str>) -> Named {
        let name = name.into();
        Named {
            key: name.clone(),
            name,
            machine_id: machine_id.map(str::to_string),
        }
    }

    /// An object shown as `name` and known to its step by `key`.
    pub fn keyed(
        name: impl Into<String>,
        key: impl Into<String>,
        machine_id: Option<&str>,
    ) -> Named {
        Named {
            name: name.into(),
            key: key.into(),
            machine_id: machine_id.map(str::to_string),
        }
    }
}

/// What exists, as one scan saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostScan {
    /// The objects found by name, per kind: namespaces named `<prefix>-...`,
    /// root-namespace links `<prefix><id>`, entries under `<data_dir>/machines` (by
    /// path), machines' packet policies in the daemon's nftables table ([`policy_name`],
    /// keyed by id), directories under the daemon's parent cgroup in every hierarchy in
    /// use (by path, keyed by id).
    pub named: BTreeMap<ResourceKind, Vec<Named>>,
    /// This daemon's VMM processes: (machine id, pid).
    pub vmms: Vec<(String, i32)>,
    /// The `leases` table: slot -> machine id.
    pub leases: BTreeMap<u32, String>,
    /// Machine ids with a row in the `routes` table.
    pub routes: Vec<String>,
}

impl HostScan {
    /// The objects of `kind` found by name.
    pub fn named(&self, kind: ResourceKind) -> &[Named] {
        self.named.get(&kind).map_or(&[], Vec::as_slice)
    }

    /// Adds an object of `kind`.
    pub fn add(&mut self, kind: ResourceKind, object: Named) {
        self.named.entry(kind).or_default().push(object);
    }

    /// Whether an object of `kind` known as `key` was found.
    pub fn has(&self, kind: ResourceKind, key: &str) -> bool {
        self.named(kind).iter().any(|n| n.key == key)
    }
}

/// How a machine's packet policy is named in findings.
pub fn policy_name(prefix: &str, id: &str) -> String {
    format!("{} chains m{id}_*", crate::net::policy::table_name(prefix))
}

pub use crate::machine_id::is_machine_id;

/// Scans the host first, then the tables (see `audit::run` for why this order).
/// Read-only.
pub async fn scan(services: &Services) -> Result<HostScan, AuditError> {
    let config = services.config();
    let prefix = config.network.prefix.clone();
    let machines_dir = config.layout().machines();
    let mut host = HostScan::default();
    for resource in services.net().scan(&prefix).await? {
        match resource {
            NetResource::Netns { name, machine_id } => {
                host.add(ResourceKind::Netns, Named::of(name, machine_id.as_deref()));
            }
            NetResource::Link { name, machine_id } => {
                host.add(ResourceKind::Link, Named::of(name, Some(&machine_id)));
            }
        }
    }
    for id in services.net().scan_policies(&prefix).await? {
        let policy = Named::keyed(policy_name(&prefix, &id), id.clone(), Some(&id));
        host.add(ResourceKind::Policy, policy);
    }
    for (path, name) in services.vmm_host().cgroups.scan()? {
        let id = is_machine_id(&name).then_some(name.as_str());
        host.add(ResourceKind::Cgroup, Named::keyed(path, name.as_str(), id));
    }
    let marker = services.vmm().name_prefix().to_string();
    let dir = machines_dir.clone();
    let (vmms, machine_dirs) = tokio::task::spawn_blocking(move || {
        Ok::<_, AuditError>((own_vmms(&marker, &dir), list_dir(&dir)?))
    })
    .await
    .map_err(|e| AuditError::Task(e.to_string()))??;
    for entry in machine_dirs {
        let path = machines_dir.join(&entry.name).display().to_string();
        host.add(
            ResourceKind::MachineDir,
            Named::of(path, entry.machine_id.as_deref()),
        );
    }
    host.vmms = vmms;
    let store = services.store();
    host.leases = store.leases()?;
    host.routes = store.routes()?.into_iter().map(|r| r.machine_id).collect();
    Ok(host)
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
        let id = is_machine_id(&name).then_some(name.as_str());
        out.push(Named::of(name.as_str(), id));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
