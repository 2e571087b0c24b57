//! An in-memory host for the steps' unit tests: a test double of the singletons (image
//! cache, lease pool, route registry), the network, the packet policy, cgroups and the
//! VMM, standing in for what needs root, KVM or a running daemon. It records what exists
//! by kind and name ([`Owned`]), as the real context answers `exists`. The machine
//! directories are real, in a private temporary directory: the disk and config steps
//! write their own files. Any call can be told to fail once, after doing half its work,
//! to play a host that breaks in the middle of an acquire.
//!
//! [`check_contract`] is the contract every step keeps, checked against this host: an
//! acquire run twice makes one of everything, a release run twice is fine, a release
//! after a half-done acquire leaves nothing, and the probe says so after each.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::context::{BaseFound, Owned, StepContext};
use super::{Cause, StepError};
use crate::guest::config::GuestResolver;
use crate::guest::kit::GuestKit;
use crate::guest::protocol::Claim;
use crate::image::ImageRef;
use crate::machine::record::MachineRecord;
use crate::machine::spec::MachineSpec;
use crate::machine::step::{CREATE_ORDER, Direction, Mark, ResourceKind, Step};
use crate::net::NetPlan;
use crate::net::PoolCidr;
use crate::net::policy::MachinePolicy;
use crate::route::Route;
use crate::vmm::{Confinement, ControlError, LaunchSpec, Liveness, ReadyError, VmmProcess};

/// The machine id the tests use.
pub const ID: &str = "0123456789";

/// A fake VMM process.
#[derive(Debug, Clone)]
struct FakeVmm {
    machine: String,
    running: bool,
    paused: bool,
}

#[derive(Default)]
struct State {
    objects: HashSet<Owned>,
    leases: BTreeMap<u32, String>,
    routes: HashMap<String, Route>,
    vmms: BTreeMap<i32, FakeVmm>,
    next_pid: i32,
    listening: HashSet<SocketAddr>,
    half: HashSet<&'static str>,
    calls: Vec<&'static str>,
    claims: u32,
    logs_kept: u32,
}

/// The in-memory host (see the module doc).
pub struct FakeHost {
    root: tempfile::TempDir,
    layout: crate::layout::Layout,
    state: Mutex<State>,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost::new()
    }
}

impl FakeHost {
    /// An empty host with its own temporary directory.
    pub fn new() -> FakeHost {
        let root = tempfile::tempdir().expect("tempdir");
        let layout =
            crate::layout::Layout::new(root.path().join("data"), root.path().join("cache"));
        std::fs::create_dir_all(layout.machines()).expect("machines dir");
        FakeHost {
            root,
            layout,
            state: Mutex::new(State {
                next_pid: 1000,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next call named `call` does half its work, then fails (transiently).
    pub fn break_next(&self, call: &'static str) {
        self.state().half.insert(call);
    }

    /// Whether a call named `call` was told to break, and (once) takes the order.
    fn breaks(&self, call: &'static str) -> bool {
        let mut state = self.state();
        state.calls.push(call);
        state.half.remove(call)
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<&'static str> {
        self.state().calls.clone()
    }

    /// What exists that a step owns by name, sorted for comparison.
    pub fn objects(&self) -> Vec<Owned> {
        let mut out: Vec<Owned> = self.state().objects.iter().cloned().collect();
        out.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        out
    }

    /// Removes an object, as an operator or a reboot would.
    pub fn lose(&self, object: &Owned) {
        self.state().objects.remove(object);
    }

    /// The leases held: slot -> machine.
    pub fn leases(&self) -> BTreeMap<u32, String> {
        self.state().leases.clone()
    }

    /// The routes published, by machine.
    pub fn routes(&self) -> HashMap<String, Route> {
        self.state().routes.clone()
    }

    /// The pids of the VMMs that run, with whether each is paused.
    pub fn running_vmms(&self) -> Vec<(i32, bool)> {
        self.state()
            .vmms
            .iter()
            .filter(|(_, v)| v.running)
            .map(|(pid, v)| (*pid, v.paused))
            .collect()
    }

    /// Ends a VMM, as a crash would.
    pub fn kill_vmm(&self, pid: i32) {
        if let Some(vmm) = self.state().vmms.get_mut(&pid) {
            vmm.running = false;
        }
    }

    /// Claims sent to guests so far.
    pub fn claims(&self) -> u32 {
        self.state().claims
    }

    /// Log keepers asked for so far.
    pub fn logs_kept(&self) -> u32 {
        self.state().logs_kept
    }

    /// Makes `addr` accept connections (a guest's port).
    pub fn listen(&self, addr: SocketAddr) {
        self.state().listening.insert(addr);
    }

    /// The directory the machine directories live in.
    pub fn machines(&self) -> PathBuf {
        self.layout.machines()
    }

    /// A fresh record of machine [`ID`] for the `demo` image, wanted started.
    pub fn record(&self) -> MachineRecord {
        let spec = MachineSpec {
            image: "demo".into(),
            vcpus: 1,
            memory_mib: 128,
            command: vec!["/bin/true".into()],
            ..MachineSpec::default()
        };
        MachineRecord::new(ID.into(), "m".into(), "r".into(), spec, 0)
    }

    /// Runs `step`'s acquire as a run does: `Begun` before, the output recorded and
    /// `Done` after a success.
    pub async fn acquire(&self, step: Step, rec: &mut MachineRecord) -> Result<(), StepError> {
        rec.set_mark(step, Mark::Begun);
        let output = super::run(step, Direction::Acquire, self, rec).await?;
        super::apply_output(rec, &output);
        rec.set_mark(step, Mark::Done);
        Ok(())
    }

    /// Runs `step`'s release as a run does: `Untouched`, and what it recorded forgotten,
    /// after a success.
    pub async fn release(&self, step: Step, rec: &mut MachineRecord) -> Result<(), StepError> {
        super::run(step, Direction::Release, self, rec).await?;
        rec.set_mark(step, Mark::Untouched);
        super::forget(step, rec);
        Ok(())
    }

    /// Acquires every step before `step`, in create order.
    pub async fn acquire_before(&self, step: Step, rec: &mut MachineRecord) {
        for earlier in CREATE_ORDER.iter().take_while(|s| **s != step) {
            self.acquire(*earlier, rec)
                .await
                .unwrap_or_else(|e| panic!("{earlier} before {step}: {e}"));
        }
    }

    fn plan(&self, id: &str, slot: u32) -> Result<NetPlan, StepError> {
        let pool = PoolCidr::parse("10.200.0.0/16").expect("the test pool");
        NetPlan::derive("tst", id, pool, slot).map_err(|e| StepError::Retry(Cause::Plan(e)))
    }

    fn retry(call: &'static str) -> StepError {
        StepError::Retry(Cause::Broken(call))
    }
}

impl StepContext for FakeHost {
    fn machine_dir(&self, id: &str) -> PathBuf {
        self.layout.machine_dir(id)
    }

    fn net_plan(&self, id: &str, slot: u32) -> Result<NetPlan, StepError> {
        self.plan(id, slot)
    }

    fn exists(&self, object: &Owned) -> Option<bool> {
        match object.kind {
            ResourceKind::MachineDir => Some(std::path::Path::new(&object.name).is_dir()),
            _ => Some(self.state().objects.contains(object)),
        }
    }

    fn upper_templates(&self) -> PathBuf {
        self.root.path().join("templates")
    }

    fn guest_resolver(&self) -> Option<GuestResolver> {
        None
    }

    fn ready_timeout(&self) -> Duration {
        Duration::from_millis(200)
    }

    async fn kit(&self) -> Result<GuestKit, StepError> {
        Ok(GuestKit {
            vmlinux: self.root.path().join("vmlinux"),
            initramfs: self.root.path().join("initramfs"),
            kernel_version: "fake".into(),
            id: "fake-kit".into(),
        })
    }

    async fn ensure_base(&self, image: ImageRef) -> Result<BaseFound, StepError> {
        if self.breaks("ensure_base") {
            return Err(Self::retry("ensure_base"));
        }
        let path = self.root.path().join("base.ext4");
        if !path.exists() {
            std::fs::write(&path, vec![7u8; 64 << 10]).map_err(|source| {
                StepError::Retry(Cause::Io {
                    action: "write",
                    path: path.clone(),
                    source,
                })
            })?;
        }
        Ok(BaseFound {
            digest: format!("sha256:fake-{image}"),
            path,
            workload: None,
        })
    }

    async fn lease(&self, machine: &str) -> Result<u32, StepError> {
        if self.breaks("lease") {
            return Err(Self::retry("lease"));
        }
        let mut state = self.state();
        if let Some((slot, _)) = state.leases.iter().find(|(_, m)| *m == machine) {
            return Ok(*slot);
        }
        let slot = (1..).find(|s| !state.leases.contains_key(s)).unwrap_or(1);
        state.leases.insert(slot, machine.to_string());
        Ok(slot)
    }

    async fn release_lease(&self, machine: &str) -> Result<(), StepError> {
        self.state().leases.retain(|_, m| m != machine);
        Ok(())
    }

    async fn ensure_network(&self, plan: NetPlan) -> Result<(), StepError> {
        let half = self.breaks("ensure_network");
        let mut state = self.state();
        state
            .objects
            .insert(Owned::new(ResourceKind::Netns, plan.netns.clone()));
        if half {
            return Err(Self::retry("ensure_network"));
        }
        state
            .objects
            .insert(Owned::new(ResourceKind::Link, plan.host_veth.clone()));
        Ok(())
    }

    async fn remove_network(&self, plan: NetPlan) -> Result<(), StepError> {
        let mut state = self.state();
        state
            .objects
            .remove(&Owned::new(ResourceKind::Link, plan.host_veth));
        state
            .objects
            .remove(&Owned::new(ResourceKind::Netns, plan.netns));
        Ok(())
    }

    async fn ensure_policy(&self, machine: MachinePolicy) -> Result<(), StepError> {
        let half = self.breaks("ensure_policy");
        self.state()
            .objects
            .insert(Owned::new(ResourceKind::Policy, machine.id));
        if half {
            return Err(Self::retry("ensure_policy"));
        }
        Ok(())
    }

    async fn remove_policy(&self, machine: &str) -> Result<(), StepError> {
        self.state()
            .objects
            .remove(&Owned::new(ResourceKind::Policy, machine));
        Ok(())
    }

    async fn ensure_cgroup(
        &self,
        machine: &str,
        _vcpus: u32,
        _memory_mib: u32,
        _running: Option<i32>,
    ) -> Result<(), StepError> {
        let half = self.breaks("ensure_cgroup");
        self.state()
            .objects
            .insert(Owned::new(ResourceKind::Cgroup, machine));
        if half {
            return Err(Self::retry("ensure_cgroup"));
        }
        Ok(())
    }

    async fn remove_cgroup(&self, machine: &str) -> Result<(), StepError> {
        let mut state = self.state();
        // Whatever still runs inside ends with it.
        for vmm in state.vmms.values_mut() {
            if vmm.machine == machine {
                vmm.running = false;
            }
        }
        state
            .objects
            .remove(&Owned::new(ResourceKind::Cgroup, machine));
        Ok(())
    }

    fn vmm_confinement(&self, _machine: &str, _slot: u32) -> Confinement {
        Confinement {
            cgroup_procs: Vec::new(),
            cgroup_path: String::new(),
            run_as: None,
        }
    }

    fn keep_logs(&self, _machine: &str, _process: &VmmProcess) {
        self.state().logs_kept += 1;
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<VmmProcess, StepError> {
        let half = self.breaks("launch");
        let mut state = self.state();
        // A VMM that runs for the machine is adopted, not started twice.
        let adopted = state
            .vmms
            .iter()
            .find(|(_, v)| v.running && v.machine == spec.machine_id)
            .map(|(pid, _)| *pid);
        let pid = match adopted {
            Some(pid) => pid,
            None => {
                state.next_pid += 1;
                let pid = state.next_pid;
                state.vmms.insert(
                    pid,
                    FakeVmm {
                        machine: spec.machine_id.clone(),
                        running: true,
                        paused: false,
                    },
                );
                pid
            }
        };
        if half {
            return Err(Self::retry("launch"));
        }
        Ok(VmmProcess {
            driver: "fake".into(),
            pid,
            start_time: pid as u64,
            boot_id: "fake-boot".into(),
            control_socket: spec.workdir.join("control.sock"),
            agent_socket: spec.workdir.join("agent.sock"),
        })
    }

    fn liveness(&self, process: &VmmProcess) -> Liveness {
        match self.state().vmms.get(&process.pid) {
            Some(vmm) if vmm.running => Liveness::Running,
            _ => Liveness::Gone,
        }
    }

    async fn stop_vmm(&self, process: VmmProcess) -> Result<(), StepError> {
        self.kill_vmm(process.pid);
        Ok(())
    }

    async fn kill_unrecorded(&self, machine: &str, _dir: PathBuf) -> Result<(), StepError> {
        for vmm in self.state().vmms.values_mut() {
            if vmm.machine == machine {
                vmm.running = false;
            }
        }
        Ok(())
    }

    async fn wait_ready(&self, process: &VmmProcess, _: Duration) -> Result<(), ReadyError> {
        self.guest(process).map(|_| ())
    }

    async fn wait_idle(&self, process: &VmmProcess, _: Duration) -> Result<(), ReadyError> {
        self.guest(process).map(|_| ())
    }

    async fn claim(
        &self,
        process: &VmmProcess,
        _claim: &Claim,
        _: Duration,
    ) -> Result<(), ReadyError> {
        self.guest(process)?;
        self.state().claims += 1;
        Ok(())
    }

    async fn pause(&self, process: &VmmProcess) -> Result<(), ControlError> {
        self.set_paused(process, true)
    }

    async fn resume(&self, process: &VmmProcess) -> Result<(), ControlError> {
        self.set_paused(process, false)
    }

    async fn tcp_connect(&self, addr: SocketAddr, _timeout: Duration) -> Result<(), String> {
        if self.state().listening.contains(&addr) {
            Ok(())
        } else {
            Err("connection refused".into())
        }
    }

    async fn publish(&self, route: Route) -> Result<(), StepError> {
        if self.breaks("publish") {
            return Err(Self::retry("publish"));
        }
        self.state().routes.insert(route.machine_id.clone(), route);
        Ok(())
    }

    async fn unpublish(&self, machine: &str) -> Result<(), StepError> {
        self.state().routes.remove(machine);
        Ok(())
    }
}

impl FakeHost {
    /// A guest that answers when its VMM runs (and is not paused).
    fn guest(&self, process: &VmmProcess) -> Result<(), ReadyError> {
        match self.state().vmms.get(&process.pid) {
            Some(vmm) if vmm.running && !vmm.paused => Ok(()),
            _ => Err(ReadyError::VmmExited {
                pid: process.pid,
                console: String::new(),
            }),
        }
    }

    fn set_paused(&self, process: &VmmProcess, paused: bool) -> Result<(), ControlError> {
        match self.state().vmms.get_mut(&process.pid) {
            Some(vmm) if vmm.running => {
                vmm.paused = paused;
                Ok(())
            }
            _ => Err(ControlError::Api {
                message: format!("pid {} is gone", process.pid),
            }),
        }
    }
}

/// What a step left on the host: its owned objects that exist, and whether its probe
/// says present.
fn footprint(host: &FakeHost, step: Step, rec: &MachineRecord) -> (Vec<Owned>, bool) {
    let owned = super::owned(step, host, rec)
        .into_iter()
        .filter(|o| host.exists(o) == Some(true))
        .collect();
    (owned, super::present(step, host, rec))
}

/// The contract every step keeps (see the module doc), checked on `step` with the steps
/// before it acquired. `breaking` names the context call that the half-done acquire
/// breaks (none: the step's acquire is checked whole only). Returns the host and the
/// record with the step acquired, for the step's own checks.
pub async fn check_contract(
    step: Step,
    breaking: Option<&'static str>,
) -> (FakeHost, MachineRecord) {
    check_contract_of(step, breaking, |_| {}).await
}

/// [`check_contract`] on a record changed by `tweak` first.
pub async fn check_contract_of(
    step: Step,
    breaking: Option<&'static str>,
    tweak: impl FnOnce(&mut MachineRecord),
) -> (FakeHost, MachineRecord) {
    let host = FakeHost::new();
    let mut rec = host.record();
    tweak(&mut rec);
    host.acquire_before(step, &mut rec).await;
    let before = host.objects();
    let recorded_before = rec.resources.clone();
    // A step whose probe looks at something sees nothing yet, with its mark as a finished
    // acquire leaves it; one without a probe is always present.
    let probed = {
        let mut done = rec.clone();
        done.set_mark(step, Mark::Done);
        !super::present(step, &host, &done)
    };

    host.acquire(step, &mut rec)
        .await
        .unwrap_or_else(|e| panic!("{step}: first acquire: {e}"));
    let (made, present) = footprint(&host, step, &rec);
    assert!(
        present,
        "{step}: the probe does not see what the acquire made"
    );
    assert_eq!(
        made,
        super::owned(step, &host, &rec),
        "{step}: not everything it owns exists"
    );
    let after_one = host.objects();
    let recorded = rec.resources.clone();
    host.acquire(step, &mut rec)
        .await
        .unwrap_or_else(|e| panic!("{step}: second acquire: {e}"));
    assert_eq!(
        host.objects(),
        after_one,
        "{step}: a second acquire made more"
    );
    assert_eq!(
        rec.resources, recorded,
        "{step}: a second acquire recorded something else"
    );
    assert!(
        super::present(step, &host, &rec),
        "{step}: probe after the second acquire"
    );

    for round in ["first", "second"] {
        host.release(step, &mut rec)
            .await
            .unwrap_or_else(|e| panic!("{step}: {round} release: {e}"));
        assert_eq!(
            rec.resources, recorded_before,
            "{step}: the {round} release did not forget what the acquire recorded"
        );
        assert_eq!(
            host.objects(),
            before,
            "{step}: the {round} release left objects"
        );
        let (left, _) = footprint(&host, step, &rec);
        assert!(
            left.is_empty(),
            "{step}: {left:?} left after the {round} release"
        );
        if probed {
            assert!(
                !super::present(step, &host, &rec),
                "{step}: the probe sees something after the {round} release"
            );
        }
    }

    if let Some(call) = breaking {
        host.break_next(call);
        let err = host.acquire(step, &mut rec).await;
        assert!(
            err.is_err(),
            "{step}: the acquire with {call} broken succeeded"
        );
        assert_eq!(rec.mark(step), Mark::Begun);
        host.release(step, &mut rec)
            .await
            .unwrap_or_else(|e| panic!("{step}: release after a half acquire: {e}"));
        assert_eq!(
            host.objects(),
            before,
            "{step}: a release after a half acquire left objects"
        );
        // And the acquire is whole again afterwards.
    }
    host.acquire(step, &mut rec)
        .await
        .unwrap_or_else(|e| panic!("{step}: acquire after the releases: {e}"));
    assert!(super::present(step, &host, &rec));
    (host, rec)
}
