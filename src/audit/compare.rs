//! The pure half of an audit: the records against what a scan saw.
//!
//! Ownership follows the marks: a record owns a step's resource exactly when that step
//! is not `Untouched` (`MachineRecord::touched`), because intent is recorded before the
//! effect and the mark goes back to `Untouched` only after the release finished. So a
//! leak is a resource whose step its machine's record has not touched (or whose machine
//! has no record), and a missing resource is one whose step the record marks `Done`.
//! A `Begun` step may or may not have its resource: neither is reported.
//!
//! Which step owns which kind of resource is the step catalogue's `owns`
//! (`machine::step::CATALOGUE`); the kinds are matched to host objects here:
//!
//! | kind          | host object                                   |
//! |---------------|-----------------------------------------------|
//! | `netns`, `link` | namespace `<prefix>-<id>`, link `<prefix><id>` |
//! | `vmm`         | a process with the marker, in this data dir   |
//! | `machine_dir` | `<data_dir>/machines/<id>`                    |
//! | `lease`       | a `leases` row owned by the id                |
//! | `route`       | the id's `routes` row                         |
//! | `policy`      | chains `m<id>_*` in table `inet hearth_<prefix>` |
//! | `cgroup`      | `<hierarchy>/hearth_<prefix>/<id>`, per hierarchy |

use std::collections::HashMap;

use super::finding::{AuditReport, Finding, ResourceKind};
use super::scan::{HostScan, Named};
use crate::machine::record::MachineRecord;
use crate::machine::step::{Mark, Step};

/// Compares the records with the scan. Pure.
pub fn compare(records: &[MachineRecord], host: &HostScan) -> AuditReport {
    let by_id: HashMap<&str, &MachineRecord> = records.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut leaks = Vec::new();
    let unowned = |id: &str, step: Step| -> Option<String> {
        match by_id.get(id) {
            None => Some("no machine record has this id".to_string()),
            Some(rec) if !rec.touched(step) => Some(format!(
                "machine is {} and its {step} step is untouched",
                rec.state.name()
            )),
            Some(_) => None,
        }
    };
    let mut named = |kind: ResourceKind, objects: &[Named], shown: &dyn Fn(&str) -> String| {
        let step = kind.step();
        for object in objects {
            let why = match &object.machine_id {
                None => Some("the name has hearth's prefix but no machine id".to_string()),
                Some(id) => unowned(id, step),
            };
            if let Some(why) = why {
                leaks.push(Finding {
                    kind,
                    name: shown(&object.name),
                    machine_id: object.machine_id.clone(),
                    why,
                });
            }
        }
    };
    named(ResourceKind::Netns, &host.netns, &|n| n.to_string());
    named(ResourceKind::Link, &host.links, &|n| n.to_string());
    named(ResourceKind::Policy, &host.policies, &|n| n.to_string());
    named(ResourceKind::Cgroup, &host.cgroups, &|n| n.to_string());
    named(ResourceKind::MachineDir, &host.machine_dirs, &|n| {
        host.machines_dir.join(n).display().to_string()
    });

    for (id, pid) in &host.vmms {
        let why = unowned(id, ResourceKind::Vmm.step()).or_else(|| {
            let rec = by_id.get(id.as_str())?;
            let recorded = rec.resources.vmm.as_ref()?.pid;
            (rec.mark(ResourceKind::Vmm.step()) == Mark::Done && recorded != *pid)
                .then(|| format!("a second VMM: the record's is pid {recorded}"))
        });
        if let Some(why) = why {
            leaks.push(finding(ResourceKind::Vmm, format!("pid {pid}"), id, why));
        }
    }
    for (slot, id) in &host.leases {
        let why = unowned(id, ResourceKind::Lease.step()).or_else(|| {
            let rec = by_id.get(id.as_str())?;
            let recorded = rec.resources.lease_slot?;
            (rec.mark(ResourceKind::Lease.step()) == Mark::Done && recorded != *slot)
                .then(|| format!("a second lease: the record holds slot {recorded}"))
        });
        if let Some(why) = why {
            leaks.push(finding(
                ResourceKind::Lease,
                format!("slot {slot}"),
                id,
                why,
            ));
        }
    }
    for id in &host.routes {
        if let Some(why) = unowned(id, ResourceKind::Route.step()) {
            leaks.push(finding(ResourceKind::Route, id.clone(), id, why));
        }
    }

    let mut missing = Vec::new();
    for rec in records {
        missing.extend(missing_of(rec, host));
    }
    leaks.sort();
    missing.sort();
    AuditReport { leaks, missing }
}

/// What `rec` marks `Done` and the scan did not see.
fn missing_of(rec: &MachineRecord, host: &HostScan) -> Vec<Finding> {
    let id = rec.id.as_str();
    let done = |kind: ResourceKind| rec.mark(kind.step()) == Mark::Done;
    let has = |objects: &[Named], name: &str| objects.iter().any(|o| o.name == name);
    let why = |kind: ResourceKind| {
        let step = kind.step();
        format!("machine is {} and marks {step} done", rec.state.name())
    };
    let mut out = Vec::new();
    let netns = format!("{}-{id}", host.prefix);
    if done(ResourceKind::Netns) && !has(&host.netns, &netns) {
        out.push(finding(
            ResourceKind::Netns,
            netns,
            id,
            why(ResourceKind::Netns),
        ));
    }
    let link = format!("{}{id}", host.prefix);
    if done(ResourceKind::Link) && !has(&host.links, &link) {
        out.push(finding(
            ResourceKind::Link,
            link,
            id,
            why(ResourceKind::Link),
        ));
    }
    let in_cgroup = |o: &Named| o.machine_id.as_deref() == Some(id);
    if done(ResourceKind::Cgroup) && !host.cgroups.iter().any(in_cgroup) {
        out.push(finding(
            ResourceKind::Cgroup,
            crate::vmm::cgroup::Cgroups::relative_for(&host.prefix, id),
            id,
            why(ResourceKind::Cgroup),
        ));
    }
    let policy = super::scan::policy_name(&host.prefix, id);
    if done(ResourceKind::Policy) && !has(&host.policies, &policy) {
        out.push(finding(
            ResourceKind::Policy,
            policy,
            id,
            why(ResourceKind::Policy),
        ));
    }
    if done(ResourceKind::Vmm) {
        let recorded = rec.resources.vmm.as_ref().map(|v| v.pid);
        let seen = host
            .vmms
            .iter()
            .any(|(m, pid)| m == id && recorded.is_none_or(|r| r == *pid));
        if !seen {
            let name = recorded.map_or_else(|| "vmm".to_string(), |pid| format!("pid {pid}"));
            out.push(finding(ResourceKind::Vmm, name, id, why(ResourceKind::Vmm)));
        }
    }
    if done(ResourceKind::MachineDir) && !has(&host.machine_dirs, id) {
        let path = host.machines_dir.join(id).display().to_string();
        out.push(finding(
            ResourceKind::MachineDir,
            path,
            id,
            why(ResourceKind::MachineDir),
        ));
    }
    if done(ResourceKind::Lease) {
        let recorded = rec.resources.lease_slot;
        let seen = host
            .leases
            .iter()
            .any(|(slot, m)| m == id && recorded.is_none_or(|r| r == *slot));
        if !seen {
            let name = recorded.map_or_else(|| "lease".to_string(), |s| format!("slot {s}"));
            out.push(finding(
                ResourceKind::Lease,
                name,
                id,
                why(ResourceKind::Lease),
            ));
        }
    }
    if done(ResourceKind::Route) && !host.routes.iter().any(|m| m == id) {
        out.push(finding(
            ResourceKind::Route,
            id.to_string(),
            id,
            why(ResourceKind::Route),
        ));
    }
    out
}

fn finding(kind: ResourceKind, name: String, id: &str, why: String) -> Finding {
    Finding {
        kind,
        name,
        machine_id: Some(id.to_string()),
        why,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::machine::record::{MachineState, VmmRecord};
    use crate::machine::spec::MachineSpec;

    const A: &str = "aaaaaaaaaa";
    const B: &str = "bbbbbbbbbb";

    fn rec(id: &str, state: MachineState, marks: &[(Step, Mark)]) -> MachineRecord {
        let spec = MachineSpec {
            image: "demo".into(),
            vcpus: 1,
            memory_mib: 128,
            command: Vec::new(),
            env: Vec::new(),
            ports: vec![80],
            ..MachineSpec::default()
        };
        let mut rec = MachineRecord::new(id.into(), format!("m-{id}"), id.into(), spec, 0);
        rec.state = state;
        for (step, mark) in marks {
            rec.set_mark(*step, *mark);
        }
        rec
    }

    /// Every step `Done`, with slot 3 and pid 100 recorded.
    fn started(id: &str) -> MachineRecord {
        let marks: Vec<_> = crate::machine::step::CREATE_ORDER
            .iter()
            .map(|s| (*s, Mark::Done))
            .collect();
        let mut r = rec(id, MachineState::Started, &marks);
        r.resources.lease_slot = Some(3);
        r.resources.vmm = Some(VmmRecord {
            driver: "qemu".into(),
            pid: 100,
            start_time: 1,
            boot_id: "b".into(),
            control_socket: PathBuf::from("/x/qmp.sock"),
            agent_socket: PathBuf::from("/x/agent.sock"),
            attempt: 1,
        });
        r
    }

    /// Everything `started(id)` owns, on the host.
    fn host_of(ids: &[&str]) -> HostScan {
        let mut host = HostScan {
            prefix: "tp".into(),
            machines_dir: PathBuf::from("/d/machines"),
            ..HostScan::default()
        };
        for id in ids {
            host.netns.push(Named::of(format!("tp-{id}"), Some(id)));
            host.policies.push(Named::of(
                super::super::scan::policy_name("tp", id),
                Some(id),
            ));
            host.cgroups
                .push(Named::of(format!("/cg/hearth_tp/{id}"), Some(id)));
            host.links.push(Named::of(format!("tp{id}"), Some(id)));
            host.vmms.push((id.to_string(), 100));
            host.machine_dirs.push(Named::of(*id, Some(id)));
            host.leases.insert(3, id.to_string());
            host.routes.push(id.to_string());
        }
        host
    }

    /// (kind, name, machine id) of each finding, for compact expectations.
    fn keys(findings: &[Finding]) -> Vec<(ResourceKind, String, Option<String>)> {
        findings
            .iter()
            .map(|f| (f.kind, f.name.clone(), f.machine_id.clone()))
            .collect()
    }

    fn key(
        kind: ResourceKind,
        name: &str,
        id: Option<&str>,
    ) -> (ResourceKind, String, Option<String>) {
        (kind, name.to_string(), id.map(str::to_string))
    }

    #[test]
    fn a_started_machine_with_everything_is_clean() {
        let report = compare(&[started(A)], &host_of(&[A]));
        assert!(report.is_clean(), "{report:#?}");
    }

    #[test]
    fn nothing_on_the_host_and_no_records_is_clean() {
        assert!(compare(&[], &host_of(&[])).is_clean());
        let tombstone = rec(A, MachineState::Destroyed, &[]);
        assert!(compare(&[tombstone], &host_of(&[])).is_clean());
    }

    #[test]
    fn everything_of_an_unknown_id_is_a_leak() {
        let report = compare(&[], &host_of(&[B]));
        assert!(report.missing.is_empty());
        assert_eq!(
            keys(&report.leaks),
            vec![
                key(ResourceKind::Netns, "tp-bbbbbbbbbb", Some(B)),
                key(ResourceKind::Link, "tpbbbbbbbbbb", Some(B)),
                key(ResourceKind::Vmm, "pid 100", Some(B)),
                key(ResourceKind::MachineDir, "/d/machines/bbbbbbbbbb", Some(B)),
                key(ResourceKind::Lease, "slot 3", Some(B)),
                key(ResourceKind::Route, B, Some(B)),
                key(
                    ResourceKind::Policy,
                    "hearth_tp chains mbbbbbbbbbb_*",
                    Some(B)
                ),
                key(ResourceKind::Cgroup, "/cg/hearth_tp/bbbbbbbbbb", Some(B)),
            ]
        );
        assert!(
            report
                .leaks
                .iter()
                .all(|f| f.why.contains("no machine record"))
        );
    }

    #[test]
    fn everything_of_a_destroyed_tombstone_is_a_leak() {
        let report = compare(&[rec(B, MachineState::Destroyed, &[])], &host_of(&[B]));
        assert_eq!(report.leaks.len(), 8, "{report:#?}");
        assert!(
            report
                .leaks
                .iter()
                .all(|f| f.why.contains("machine is destroyed")),
            "{report:#?}"
        );
    }

    #[test]
    fn each_untouched_step_makes_its_resources_leaks() {
        let table: [(Step, &[ResourceKind]); 7] = [
            (Step::Network, &[ResourceKind::Netns, ResourceKind::Link]),
            (Step::Policy, &[ResourceKind::Policy]),
            (Step::Cgroup, &[ResourceKind::Cgroup]),
            (Step::Vmm, &[ResourceKind::Vmm]),
            (Step::Disk, &[ResourceKind::MachineDir]),
            (Step::Lease, &[ResourceKind::Lease]),
            (Step::Publish, &[ResourceKind::Route]),
        ];
        for (step, kinds) in table {
            let mut r = started(A);
            r.set_mark(step, Mark::Untouched);
            let report = compare(&[r], &host_of(&[A]));
            let found: Vec<ResourceKind> = report.leaks.iter().map(|f| f.kind).collect();
            assert_eq!(found, kinds, "{step}: {report:#?}");
            assert!(report.missing.is_empty(), "{step}: {report:#?}");
            assert!(
                report
                    .leaks
                    .iter()
                    .all(|f| f.why.contains(&format!("{step} step is untouched"))),
                "{step}: {report:#?}"
            );
        }
    }

    #[test]
    fn a_begun_step_owns_its_resource_whether_or_not_it_exists() {
        for step in crate::machine::step::CREATE_ORDER {
            let mut r = started(A);
            r.set_mark(step, Mark::Begun);
            assert!(compare(&[r], &host_of(&[A])).is_clean(), "{step}");
        }
        let begun: Vec<_> = crate::machine::step::CREATE_ORDER
            .iter()
            .map(|s| (*s, Mark::Begun))
            .collect();
        let r = rec(A, MachineState::Starting, &begun);
        assert!(compare(std::slice::from_ref(&r), &host_of(&[])).is_clean());
        assert!(compare(&[r], &host_of(&[A])).is_clean());
    }

    #[test]
    fn each_done_step_without_its_resource_is_missing() {
        type Strip = fn(&mut HostScan);
        let table: [(Strip, ResourceKind, &str); 8] = [
            (
                |h| h.cgroups.clear(),
                ResourceKind::Cgroup,
                "hearth_tp/aaaaaaaaaa",
            ),
            (
                |h| h.policies.clear(),
                ResourceKind::Policy,
                "hearth_tp chains maaaaaaaaaa_*",
            ),
            (|h| h.netns.clear(), ResourceKind::Netns, "tp-aaaaaaaaaa"),
            (|h| h.links.clear(), ResourceKind::Link, "tpaaaaaaaaaa"),
            (|h| h.vmms.clear(), ResourceKind::Vmm, "pid 100"),
            (
                |h| h.machine_dirs.clear(),
                ResourceKind::MachineDir,
                "/d/machines/aaaaaaaaaa",
            ),
            (|h| h.leases.clear(), ResourceKind::Lease, "slot 3"),
            (|h| h.routes.clear(), ResourceKind::Route, A),
        ];
        for (strip, kind, name) in table {
            let mut host = host_of(&[A]);
            strip(&mut host);
            let report = compare(&[started(A)], &host);
            assert!(report.leaks.is_empty(), "{kind}: {report:#?}");
            assert_eq!(
                keys(&report.missing),
                vec![key(kind, name, Some(A))],
                "{kind}"
            );
            assert!(report.missing[0].why.contains("done"), "{kind}");
        }
    }

    #[test]
    fn a_second_vmm_or_lease_of_a_machine_is_a_leak_and_the_recorded_one_missing() {
        let mut host = host_of(&[A]);
        host.vmms = vec![(A.to_string(), 200)];
        host.leases = BTreeMap::from([(5, A.to_string())]);
        let report = compare(&[started(A)], &host);
        assert_eq!(
            keys(&report.leaks),
            vec![
                key(ResourceKind::Vmm, "pid 200", Some(A)),
                key(ResourceKind::Lease, "slot 5", Some(A)),
            ]
        );
        assert!(report.leaks[0].why.contains("pid 100"), "{report:#?}");
        assert!(report.leaks[1].why.contains("slot 3"), "{report:#?}");
        assert_eq!(
            keys(&report.missing),
            vec![
                key(ResourceKind::Vmm, "pid 100", Some(A)),
                key(ResourceKind::Lease, "slot 3", Some(A)),
            ]
        );
    }

    #[test]
    fn names_without_a_machine_id_are_leaks() {
        let mut host = host_of(&[]);
        host.netns.push(Named::of("tp-scratch", None));
        host.machine_dirs.push(Named::of("stray.tmp", None));
        let report = compare(&[], &host);
        assert_eq!(
            keys(&report.leaks),
            vec![
                key(ResourceKind::Netns, "tp-scratch", None),
                key(ResourceKind::MachineDir, "/d/machines/stray.tmp", None),
            ]
        );
    }

    #[test]
    fn a_stopped_machine_owns_disk_lease_network_and_policy_only() {
        let mut r = started(A);
        r.state = MachineState::Stopped;
        for step in crate::machine::step::STOP_RELEASES {
            r.set_mark(step, Mark::Untouched);
        }
        r.resources.vmm = None;
        let mut host = host_of(&[A]);
        host.vmms.clear();
        host.routes.clear();
        host.cgroups.clear();
        assert!(compare(std::slice::from_ref(&r), &host).is_clean());
        let report = compare(&[r], &host_of(&[A]));
        assert_eq!(
            keys(&report.leaks),
            vec![
                key(ResourceKind::Vmm, "pid 100", Some(A)),
                key(ResourceKind::Route, A, Some(A)),
                key(ResourceKind::Cgroup, "/cg/hearth_tp/aaaaaaaaaa", Some(A)),
            ]
        );
    }

    #[test]
    fn machines_are_judged_each_by_their_own_record() {
        let mut host = host_of(&[A, B]);
        host.leases = BTreeMap::from([(3, A.to_string()), (4, B.to_string())]);
        let report = compare(&[started(A)], &host);
        assert!(report.missing.is_empty(), "{report:#?}");
        assert_eq!(report.leaks.len(), 8, "{report:#?}");
        assert!(
            report
                .leaks
                .iter()
                .all(|f| f.machine_id.as_deref() == Some(B))
        );
    }
}
