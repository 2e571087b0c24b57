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
//! (`machine::steps`). The names are the steps' own: what a record's `Done` step should
//! have left is what that step's `owned` names (`machine::steps::owned`), matched against
//! the scan's objects of the same kind by key. VMMs, leases and routes are matched by
//! machine id (and pid or slot), as they are found by marker or read from the store.

use std::collections::HashMap;

use super::finding::{AuditReport, Finding, ResourceKind};
use super::scan::HostScan;
use crate::machine::record::MachineRecord;
use crate::machine::step::{CREATE_ORDER, Mark, Step};
use crate::machine::steps::{self, StepContext};

/// Compares the records with the scan; `names` gives the steps' names for a record (the
/// context is asked nothing about the host). Pure.
pub fn compare(
    records: &[MachineRecord],
    host: &HostScan,
    names: &impl StepContext,
) -> AuditReport {
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
    for (&kind, objects) in &host.named {
        let step = kind.step();
        for object in objects {
            let why = match &object.machine_id {
                None => Some("the name has hearth's prefix but no machine id".to_string()),
                Some(id) => unowned(id, step),
            };
            if let Some(why) = why {
                leaks.push(Finding {
                    kind,
                    name: object.name.clone(),
                    machine_id: object.machine_id.clone(),
                    why,
                });
            }
        }
    }

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
        missing.extend(missing_of(rec, host, names));
    }
    leaks.sort();
    missing.sort();
    AuditReport { leaks, missing }
}

/// What `rec` marks `Done` and the scan did not see.
fn missing_of(rec: &MachineRecord, host: &HostScan, names: &impl StepContext) -> Vec<Finding> {
    let id = rec.id.as_str();
    let done = |kind: ResourceKind| rec.mark(kind.step()) == Mark::Done;
    let why = |kind: ResourceKind| {
        let step = kind.step();
        format!("machine is {} and marks {step} done", rec.state.name())
    };
    let mut out = Vec::new();
    for step in CREATE_ORDER {
        if rec.mark(step) != Mark::Done {
            continue;
        }
        for object in steps::owned(step, names, rec) {
            if !host.has(object.kind, &object.name) {
                out.push(finding(object.kind, object.name, id, why(object.kind)));
            }
        }
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
    use crate::audit::scan::{Named, policy_name};
    use crate::machine::record::{MachineState, VmmRecord};
    use crate::machine::spec::MachineSpec;
    use crate::machine::steps::testing::FakeHost;

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
        let marks: Vec<_> = CREATE_ORDER.iter().map(|s| (*s, Mark::Done)).collect();
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

    /// Everything `started(id)` owns, on the host, named as the steps name it (policies
    /// and cgroups shown as a scan shows them).
    fn host_of(cx: &FakeHost, ids: &[&str]) -> HostScan {
        let mut host = HostScan::default();
        for id in ids {
            let r = started(id);
            for step in CREATE_ORDER {
                for object in steps::owned(step, cx, &r) {
                    let named = match object.kind {
                        ResourceKind::Policy => {
                            Named::keyed(policy_name("tst", id), object.name, Some(id))
                        }
                        ResourceKind::Cgroup => {
                            Named::keyed(format!("/cg/hearth_tst/{id}"), object.name, Some(id))
                        }
                        _ => Named::of(object.name, Some(id)),
                    };
                    host.add(object.kind, named);
                }
            }
            host.vmms.push((id.to_string(), 100));
            host.leases.insert(3, id.to_string());
            host.routes.push(id.to_string());
        }
        host
    }

    fn dir(cx: &FakeHost, id: &str) -> String {
        cx.machine_dir(id).display().to_string()
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
        let cx = FakeHost::new();
        let report = compare(&[started(A)], &host_of(&cx, &[A]), &cx);
        assert!(report.is_clean(), "{report:#?}");
    }

    #[test]
    fn nothing_on_the_host_and_no_records_is_clean() {
        let cx = FakeHost::new();
        assert!(compare(&[], &host_of(&cx, &[]), &cx).is_clean());
        let tombstone = rec(A, MachineState::Destroyed, &[]);
        assert!(compare(&[tombstone], &host_of(&cx, &[]), &cx).is_clean());
    }

    #[test]
    fn everything_of_an_unknown_id_is_a_leak() {
        let cx = FakeHost::new();
        let report = compare(&[], &host_of(&cx, &[B]), &cx);
        assert!(report.missing.is_empty());
        assert_eq!(
            keys(&report.leaks),
            vec![
                key(ResourceKind::Netns, "tst-bbbbbbbbbb", Some(B)),
                key(ResourceKind::Link, "tstbbbbbbbbbb", Some(B)),
                key(ResourceKind::Vmm, "pid 100", Some(B)),
                key(ResourceKind::MachineDir, &dir(&cx, B), Some(B)),
                key(ResourceKind::Lease, "slot 3", Some(B)),
                key(ResourceKind::Route, B, Some(B)),
                key(
                    ResourceKind::Policy,
                    "hearth_tst chains mbbbbbbbbbb_*",
                    Some(B)
                ),
                key(ResourceKind::Cgroup, "/cg/hearth_tst/bbbbbbbbbb", Some(B)),
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
        let cx = FakeHost::new();
        let report = compare(
            &[rec(B, MachineState::Destroyed, &[])],
            &host_of(&cx, &[B]),
            &cx,
        );
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
        let cx = FakeHost::new();
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
            let report = compare(&[r], &host_of(&cx, &[A]), &cx);
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
        let cx = FakeHost::new();
        for step in CREATE_ORDER {
            let mut r = started(A);
            r.set_mark(step, Mark::Begun);
            assert!(compare(&[r], &host_of(&cx, &[A]), &cx).is_clean(), "{step}");
        }
        let begun: Vec<_> = CREATE_ORDER.iter().map(|s| (*s, Mark::Begun)).collect();
        let r = rec(A, MachineState::Starting, &begun);
        assert!(compare(std::slice::from_ref(&r), &host_of(&cx, &[]), &cx).is_clean());
        assert!(compare(&[r], &host_of(&cx, &[A]), &cx).is_clean());
    }

    #[test]
    fn each_done_step_without_its_resource_is_missing() {
        let cx = FakeHost::new();
        type Strip = fn(&mut HostScan);
        let machine_dir = dir(&cx, A);
        let table: [(Strip, ResourceKind, &str); 8] = [
            (
                |h| drop(h.named.remove(&ResourceKind::Cgroup)),
                ResourceKind::Cgroup,
                A,
            ),
            (
                |h| drop(h.named.remove(&ResourceKind::Policy)),
                ResourceKind::Policy,
                A,
            ),
            (
                |h| drop(h.named.remove(&ResourceKind::Netns)),
                ResourceKind::Netns,
                "tst-aaaaaaaaaa",
            ),
            (
                |h| drop(h.named.remove(&ResourceKind::Link)),
                ResourceKind::Link,
                "tstaaaaaaaaaa",
            ),
            (|h| h.vmms.clear(), ResourceKind::Vmm, "pid 100"),
            (
                |h| drop(h.named.remove(&ResourceKind::MachineDir)),
                ResourceKind::MachineDir,
                &machine_dir,
            ),
            (|h| h.leases.clear(), ResourceKind::Lease, "slot 3"),
            (|h| h.routes.clear(), ResourceKind::Route, A),
        ];
        for (strip, kind, name) in table {
            let mut host = host_of(&cx, &[A]);
            strip(&mut host);
            let report = compare(&[started(A)], &host, &cx);
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
        let cx = FakeHost::new();
        let mut host = host_of(&cx, &[A]);
        host.vmms = vec![(A.to_string(), 200)];
        host.leases = BTreeMap::from([(5, A.to_string())]);
        let report = compare(&[started(A)], &host, &cx);
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
        let cx = FakeHost::new();
        let mut host = host_of(&cx, &[]);
        host.add(ResourceKind::Netns, Named::of("tst-scratch", None));
        host.add(
            ResourceKind::MachineDir,
            Named::of("/d/machines/stray.tmp", None),
        );
        let report = compare(&[], &host, &cx);
        assert_eq!(
            keys(&report.leaks),
            vec![
                key(ResourceKind::Netns, "tst-scratch", None),
                key(ResourceKind::MachineDir, "/d/machines/stray.tmp", None),
            ]
        );
    }

    #[test]
    fn a_stopped_machine_owns_disk_lease_network_and_policy_only() {
        let cx = FakeHost::new();
        let mut r = started(A);
        r.state = MachineState::Stopped;
        for step in crate::machine::step::STOP_RELEASES {
            r.set_mark(step, Mark::Untouched);
        }
        r.resources.vmm = None;
        let mut host = host_of(&cx, &[A]);
        host.vmms.clear();
        host.routes.clear();
        host.named.remove(&ResourceKind::Cgroup);
        assert!(compare(std::slice::from_ref(&r), &host, &cx).is_clean());
        let report = compare(&[r], &host_of(&cx, &[A]), &cx);
        assert_eq!(
            keys(&report.leaks),
            vec![
                key(ResourceKind::Vmm, "pid 100", Some(A)),
                key(ResourceKind::Route, A, Some(A)),
                key(ResourceKind::Cgroup, "/cg/hearth_tst/aaaaaaaaaa", Some(A)),
            ]
        );
    }

    #[test]
    fn machines_are_judged_each_by_their_own_record() {
        let cx = FakeHost::new();
        let mut host = host_of(&cx, &[A, B]);
        host.leases = BTreeMap::from([(3, A.to_string()), (4, B.to_string())]);
        let report = compare(&[started(A)], &host, &cx);
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
