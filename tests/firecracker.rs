//! A real Firecracker, driven through hearth's driver and through the daemon (run as
//! root). Needs `HEARTH_FIRECRACKER=/path/to/firecracker` (v1.x); without it every test
//! here says it is skipped and returns. The jailer is used when `HEARTH_JAILER` is set or
//! a `jailer` sits beside the binary.
//!
//! Whether the guest can boot depends on the host's KVM: where the accelerator probe says
//! KVM boots the guest kernel, the tests wait for the guest's readiness over vsock and
//! serve its page; where it cannot (a nested PVM host), they check everything up to the
//! guest's readiness and say so.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hearth::api::pb;
use hearth::vmm::firecracker::jailer::JailerSettings;
use hearth::vmm::{
    FirecrackerDriver, LaunchError, LaunchSpec, Liveness, RunState, VmmDriver, find_processes,
};
use support::firecracker_env::{
    FirecrackerEnv, ScratchNetns, daemon_config, firecracker_env, scratch_spec,
};
use support::{Daemon, assert_audit_clean, demo_request, get_machine, wait_for};

/// Marker prefix of the VMMs the driver tests start (never a daemon's).
const PREFIX: &str = "hearthfc-";

type Fixture = FirecrackerEnv;

fn fixture() -> Option<&'static Fixture> {
    firecracker_env()
}

fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Kills the test's VMMs and deletes its namespace, whatever happened.
struct Cleanup {
    machine: String,
    _netns: ScratchNetns,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (id, pid) in find_processes(PREFIX) {
            if id == self.machine {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A machine directory with disks, a namespace and a tap in it.
fn machine(fx: &Fixture, dir: &Path) -> (LaunchSpec, Cleanup) {
    let id = unique();
    let netns = ScratchNetns::create(&format!("hfc-{id}"));
    let spec = scratch_spec(fx, dir, &id, &netns.name);
    (
        spec,
        Cleanup {
            machine: id,
            _netns: netns,
        },
    )
}

/// Waits until the machine's VMM runs: started, or (where the guest cannot boot) in its
/// readiness wait.
async fn running_or_waiting(client: &mut hearth::client::Client, id: &str) -> pb::Machine {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let m = get_machine(client, id).await;
        if m.state == pb::MachineState::Started as i32 || m.current_step == "acquire:ready" {
            return m;
        }
        assert!(std::time::Instant::now() < deadline, "{m:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn driver(fx: &Fixture) -> VmmDriver {
    VmmDriver::Firecracker(FirecrackerDriver::new(fx.firecracker.clone()).with_name_prefix(PREFIX))
}

fn running(id: &str) -> Vec<i32> {
    find_processes(PREFIX)
        .into_iter()
        .filter(|(m, _)| m == id)
        .map(|(_, pid)| pid)
        .collect()
}

#[tokio::test]
async fn the_driver_runs_pauses_snapshots_restores_and_stops_a_real_firecracker() {
    let Some(fx) = fixture() else { return };
    let dir = tempfile::tempdir().expect("machine dir");
    let (spec, _cleanup) = machine(fx, dir.path());
    let driver = driver(fx);

    let process = driver.launch(&spec).await.expect("launch");
    assert_eq!(process.driver, "firecracker");
    assert_eq!(driver.liveness(&process), Liveness::Running);
    assert_eq!(driver.run_state(&process).await.unwrap(), RunState::Running);
    // Firecracker made the hybrid vsock socket; hearth listens for the guest agent.
    assert!(dir.path().join("vsock.sock").exists());
    assert!(process.agent_socket.ends_with("vsock.sock_1024"));
    assert!(process.agent_socket.exists());
    // The process runs inside the machine's namespace.
    let ns = std::fs::read_link(format!("/proc/{}/ns/net", process.pid)).unwrap();
    let want = std::fs::metadata(format!("/run/netns/{}", spec.netns.as_ref().unwrap())).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        ns.to_string_lossy().contains(&want.ino().to_string()),
        "{ns:?}"
    );

    // Launch again: the running process is adopted, not doubled.
    let again = driver.launch(&spec).await.expect("launch again");
    assert_eq!(again.pid, process.pid);
    assert_eq!(running(&spec.machine_id), vec![process.pid]);

    if fx.kvm_boots {
        let ready = driver
            .wait_ready(&process, Duration::from_secs(60))
            .await
            .expect("guest ready over vsock");
        assert!(ready.boot_ms > 0);
    }

    driver.pause(&process).await.expect("pause");
    assert_eq!(driver.run_state(&process).await.unwrap(), RunState::Paused);
    let snapshot = driver.snapshot(&process, "t1").await.expect("snapshot");
    let memory = std::fs::metadata(&snapshot.memory)
        .expect("memory file")
        .len();
    assert_eq!(memory, 128 << 20, "memory file holds all guest memory");
    assert!(
        std::fs::metadata(&snapshot.state)
            .expect("state file")
            .len()
            > 0
    );
    driver.resume(&process).await.expect("resume");
    assert_eq!(driver.run_state(&process).await.unwrap(), RunState::Running);

    driver
        .stop(&process, Duration::from_millis(500))
        .await
        .expect("stop");
    assert_eq!(driver.liveness(&process), Liveness::Gone);
    assert!(running(&spec.machine_id).is_empty());
    for gone in ["firecracker.sock", "vsock.sock", "vsock.sock_1024"] {
        assert!(!dir.path().join(gone).exists(), "{gone} left behind");
    }

    // The snapshot loads into a fresh process, paused, and runs on when resumed.
    let restored = driver
        .restore(&spec, &snapshot, false)
        .await
        .expect("restore");
    assert_ne!(restored.pid, process.pid);
    assert_eq!(driver.run_state(&restored).await.unwrap(), RunState::Paused);
    driver.resume(&restored).await.expect("resume restored");
    assert_eq!(
        driver.run_state(&restored).await.unwrap(),
        RunState::Running
    );
    driver
        .stop(&restored, Duration::from_millis(500))
        .await
        .expect("stop restored");
    assert!(running(&spec.machine_id).is_empty());
    // Stopping again is a no-op.
    let outcome = driver
        .stop(&restored, Duration::from_millis(500))
        .await
        .expect("second stop");
    assert!(outcome.graceful);
}

#[tokio::test]
async fn a_refused_configuration_carries_firecrackers_fault_and_leaves_no_process() {
    let Some(fx) = fixture() else { return };
    let dir = tempfile::tempdir().expect("machine dir");
    let (mut spec, _cleanup) = machine(fx, dir.path());
    spec.kit.vmlinux = dir.path().join("no-such-kernel");
    let err = driver(fx).launch(&spec).await.expect_err("must fail");
    let text = err.to_string();
    assert!(matches!(err, LaunchError::Api { .. }), "{text}");
    assert!(text.contains("PUT /boot-source"), "{text}");
    assert!(text.contains("Firecracker answered 400"), "{text}");
    assert!(running(&spec.machine_id).is_empty());
}

#[tokio::test]
async fn jailer_mode_runs_firecracker_chrooted_as_another_user() {
    let Some(fx) = fixture() else { return };
    let Some(jailer) = fx.jailer.clone() else {
        support::skipped(
            "firecracker jailer test",
            "no jailer beside the firecracker binary",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("machine dir");
    let (spec, _cleanup) = machine(fx, dir.path());
    // A cgroup limit too where this host has the cgroup v1 cpu controller mounted (the
    // jailer's default hierarchy).
    let v1_cpu = Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists();
    let settings = JailerSettings {
        binary: jailer,
        uid: 65534,
        gid: 65534,
        cgroups: if v1_cpu {
            vec!["cpu.shares=512".into()]
        } else {
            Vec::new()
        },
        cgroup_version: 1,
        parent_cgroup: "hearthtest".into(),
        release_cgroup: true,
    };
    let instance = format!("{PREFIX}{}", spec.machine_id);
    let cgroups = settings.cgroup_dirs(&instance);
    let driver = VmmDriver::Firecracker(
        FirecrackerDriver::new(fx.firecracker.clone())
            .with_name_prefix(PREFIX)
            .with_jailer(settings),
    );
    let process = driver.launch(&spec).await.expect("jailed launch");
    let jail_root = process.control_socket.parent().unwrap().to_path_buf();
    assert!(
        jail_root.starts_with(dir.path().join("jail")),
        "{jail_root:?}"
    );
    assert_eq!(driver.run_state(&process).await.unwrap(), RunState::Running);
    // It runs as the jail's user, chrooted into the jail.
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid)).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid_line.contains("65534"), "{uid_line}");
    // Its root (pivoted in a mount namespace of its own) is the jail: what it sees at
    // `/` is what hearth put in the jail.
    let own_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let its_mnt = std::fs::read_link(format!("/proc/{}/ns/mnt", process.pid)).unwrap();
    assert_ne!(own_mnt, its_mnt);
    let seen_root = PathBuf::from(format!("/proc/{}/root", process.pid));
    for file in ["root.img", "config.img", "vmlinux", "firecracker.sock"] {
        assert!(seen_root.join(file).exists(), "{file} not in the jail");
        assert!(jail_root.join(file).exists(), "{file} not in {jail_root:?}");
    }

    driver.pause(&process).await.expect("pause");
    let snapshot = driver
        .snapshot(&process, "j1")
        .await
        .expect("jailed snapshot");
    assert!(snapshot.memory.starts_with(&jail_root));
    driver
        .stop(&process, Duration::from_millis(500))
        .await
        .expect("stop");
    assert!(running(&spec.machine_id).is_empty());
    assert!(!jail_root.join("firecracker.sock").exists());
    for dir in &cgroups {
        assert!(!dir.exists(), "cgroup {dir:?} outlived its machine");
        // The parent is shared by every machine (hearth leaves it); this test's is its own.
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

#[tokio::test]
async fn hearthd_with_firecracker_creates_and_destroys_a_machine_leaving_nothing() {
    let Some(fx) = fixture() else { return };
    let daemon = Daemon::start_with(&daemon_config(fx));
    let mut client = daemon.client().await;
    let node = client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.vmm, "firecracker");
    let created = client
        .machines
        .create_machine(demo_request("fc-1", "fc-one", &[]))
        .await
        .expect("create")
        .into_inner();
    let machine = if fx.kvm_boots {
        let m = wait_for(&mut client, &created.id, pb::MachineState::Started).await;
        let url = format!("{}:80", m.guest_ip);
        let mut stream = std::net::TcpStream::connect(url).expect("connect to the guest");
        use std::io::{Read, Write};
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut page = String::new();
        stream.read_to_string(&mut page).unwrap();
        assert!(page.contains("200"), "{page}");
        m
    } else {
        // Everything up to readiness ran for real: the VMM step succeeded with a real
        // Firecracker in the machine's namespace; the guest cannot boot on this KVM.
        let m = wait_for(&mut client, &created.id, pb::MachineState::Failed).await;
        let vmm_ok = m
            .timings
            .iter()
            .any(|t| t.step == "vmm" && t.direction == "acquire" && t.outcome == "ok");
        assert!(vmm_ok, "{:#?}", m.timings);
        assert!(m.failure.contains("ready"), "{}", m.failure);
        m
    };
    assert!(!machine.guest_ip.is_empty() || !fx.kvm_boots);
    client
        .machines
        .destroy_machine(pb::MachineRef {
            id: created.id.clone(),
        })
        .await
        .expect("destroy");
    wait_for(&mut client, &created.id, pb::MachineState::Destroyed).await;
    assert_audit_clean(&mut client).await;
    let m = get_machine(&mut client, &created.id).await;
    assert_eq!(m.state, pb::MachineState::Destroyed as i32);
    assert!(daemon.processes().is_empty(), "{:?}", daemon.processes());
    daemon.assert_no_host_leftovers();
}

#[tokio::test]
async fn auto_picks_firecracker_only_where_kvm_boots_the_guest_kernel() {
    let Some(fx) = fixture() else { return };
    let daemon = Daemon::start_with(&format!(
        "[vmm]\nkind = \"auto\"\nfirecracker_binary = \"{}\"\n",
        fx.firecracker.display()
    ));
    let mut client = daemon.client().await;
    let node = client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    let want = if fx.kvm_boots { "firecracker" } else { "qemu" };
    assert_eq!(node.vmm, want);
}

#[tokio::test]
async fn hearthd_with_the_jailer_owns_audits_and_cleans_up_jailed_machines() {
    let Some(fx) = fixture() else { return };
    if fx.jailer.is_none() {
        support::skipped(
            "firecracker jailed daemon test",
            "no jailer beside the firecracker binary",
        );
        return;
    }
    // A long readiness deadline keeps the machine in its readiness wait with the jailed
    // Firecracker running, where KVM cannot boot the guest.
    let config = daemon_config(fx).replace("ready_timeout_secs = 3", "ready_timeout_secs = 600")
        + "[vmm.jailer]\nenabled = true\n";
    let daemon = Daemon::start_with(&config);
    let mut client = daemon.client().await;
    let created = client
        .machines
        .create_machine(demo_request("fc-j", "fc-jailed", &[]))
        .await
        .expect("create")
        .into_inner();
    running_or_waiting(&mut client, &created.id).await;
    let jails = daemon.layout().machine_dir(&created.id).join("jail");
    assert!(jails.is_dir(), "no jail at {jails:?}");
    // The audit finds the jailed VMM as this machine's (nothing missing, nothing leaked),
    // although its command line only names paths inside the jail.
    assert_audit_clean(&mut client).await;
    client
        .machines
        .destroy_machine(pb::MachineRef {
            id: created.id.clone(),
        })
        .await
        .expect("destroy");
    wait_for(&mut client, &created.id, pb::MachineState::Destroyed).await;
    assert_audit_clean(&mut client).await;
    assert!(!jails.exists(), "the jail outlived its machine");
    let left: Vec<_> = find_processes("hearth-")
        .into_iter()
        .filter(|(id, _)| *id == created.id)
        .collect();
    assert!(left.is_empty(), "{left:?}");
    daemon.assert_no_host_leftovers();
}

#[tokio::test]
async fn firecrackers_fault_message_reaches_the_machines_events() {
    let Some(fx) = fixture() else { return };
    // hearth admits 33 vCPUs here; Firecracker allows at most 32 and says so.
    let daemon = Daemon::start_with(
        &(daemon_config(fx) + "[capacity]\nvcpus = 128\nmax_vcpus_per_machine = 64\n"),
    );
    let mut client = daemon.client().await;
    let mut request = demo_request("fc-fault", "fc-fault", &[]);
    if let Some(spec) = request.spec.as_mut() {
        spec.vcpus = 33;
    }
    let created = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    let mut events = client
        .machines
        .watch_events(pb::WatchEventsRequest {
            machine_id: created.id.clone(),
            after_seq: 0,
            history_only: false,
        })
        .await
        .expect("events")
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let fault = loop {
        let event = tokio::time::timeout_at(deadline, events.message())
            .await
            .unwrap_or_else(|_| panic!("no fault in the events: {seen:#?}"))
            .expect("event stream")
            .expect("stream ended");
        if event.message.contains("PUT /machine-config")
            && event.message.contains("Firecracker answered 400")
        {
            break event.message;
        }
        seen.push(event.message);
    };
    assert!(fault.to_lowercase().contains("vcpu"), "{fault}");
    client
        .machines
        .destroy_machine(pb::MachineRef {
            id: created.id.clone(),
        })
        .await
        .expect("destroy");
    wait_for(&mut client, &created.id, pb::MachineState::Destroyed).await;
    assert_audit_clean(&mut client).await;
    assert!(daemon.processes().is_empty(), "{:?}", daemon.processes());
}

#[tokio::test]
async fn a_daemon_restart_re_adopts_the_running_firecracker() {
    let Some(fx) = fixture() else { return };
    // Where the guest cannot boot, a long readiness deadline keeps the machine's
    // Firecracker running through the restart.
    let config = daemon_config(fx).replace("ready_timeout_secs = 3", "ready_timeout_secs = 600");
    let mut daemon = Daemon::start_with(&config);
    let mut client = daemon.client().await;
    let created = client
        .machines
        .create_machine(demo_request("fc-r", "fc-restart", &[]))
        .await
        .expect("create")
        .into_inner();
    let before = running_or_waiting(&mut client, &created.id).await;
    assert!(before.vmm_pid > 0);

    daemon.kill();
    daemon.spawn();
    let mut client = daemon.client().await;
    // The run looks at the host again after the restart...
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let node = client
            .node
            .get_node(pb::GetNodeRequest {})
            .await
            .unwrap()
            .into_inner();
        if node.runs_observed >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the run never looked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and keeps the very process: same pid, one Firecracker for the machine.
    let after = get_machine(&mut client, &created.id).await;
    assert_eq!(after.vmm_pid, before.vmm_pid);
    let firecrackers: Vec<_> = find_processes("hearth-")
        .into_iter()
        .filter(|(id, _)| *id == created.id)
        .collect();
    assert_eq!(firecrackers.len(), 1, "{firecrackers:?}");
    assert_audit_clean(&mut client).await;
    client
        .machines
        .destroy_machine(pb::MachineRef {
            id: created.id.clone(),
        })
        .await
        .expect("destroy");
    wait_for(&mut client, &created.id, pb::MachineState::Destroyed).await;
    assert!(daemon.processes().is_empty(), "{:?}", daemon.processes());
}

/// A jailed machine whose first boot attempt fails (its Firecracker killed) is launched
/// again from a clean jail, and once destroyed leaves no jail and no cgroup, the
/// jailer's own (nested in the machine's) included.
#[tokio::test]
async fn a_jailed_relaunch_starts_from_a_clean_jail_and_leaves_nothing() {
    let Some(fx) = fixture() else { return };
    if fx.jailer.is_none() {
        support::skipped(
            "firecracker jailed relaunch test",
            "no jailer beside the firecracker binary",
        );
        return;
    }
    // The jailer's own cgroup too, as a v1 host configures it.
    let jailer_cgroup = if Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists() {
        "cgroups = [\"cpu.shares=512\"]\ncgroup_version = 1\n"
    } else {
        ""
    };
    let config = daemon_config(fx).replace("boot_attempts = 1", "boot_attempts = 2")
        + "[vmm.jailer]\n"
        + jailer_cgroup;
    let daemon = Daemon::start_with(&config);
    let mut client = daemon.client().await;
    let created = client
        .machines
        .create_machine(demo_request("fc-relaunch", "fc-relaunch", &[]))
        .await
        .expect("create")
        .into_inner();
    let first = support::wait_event(&mut client, &created.id, 0, "acquire vmm: ok").await;
    let pids: Vec<i32> = find_processes("hearth-")
        .into_iter()
        .filter(|(id, _)| *id == created.id)
        .map(|(_, pid)| pid)
        .collect();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let _ = std::process::Command::new("kill")
        .args(["-9", &pids[0].to_string()])
        .status();
    // The second launch succeeds: the jail of the first is no obstacle.
    support::wait_event(&mut client, &created.id, first.seq, "acquire vmm: ok").await;
    let machine = if fx.kvm_boots {
        wait_for(&mut client, &created.id, pb::MachineState::Started).await
    } else {
        // KVM cannot boot the guest here: the second attempt fails at its readiness
        // wait, and the machine fails for that, not for a launch that kept failing.
        let failed = wait_for(&mut client, &created.id, pb::MachineState::Failed).await;
        assert!(
            failed
                .failure
                .contains("did not become ready in 2 boot attempts"),
            "{}",
            failed.failure
        );
        failed
    };
    let machine_dir = daemon.layout().machine_dir(&machine.id);
    client
        .machines
        .destroy_machine(pb::MachineRef {
            id: machine.id.clone(),
        })
        .await
        .expect("destroy");
    wait_for(&mut client, &machine.id, pb::MachineState::Destroyed).await;
    assert!(!machine_dir.exists(), "the jail outlived its machine");
    let cgroups = hearth::vmm::cgroup::Cgroups::detect(&daemon.prefix).expect("cgroups");
    assert!(
        cgroups.dirs(&machine.id).iter().all(|d| !d.exists()),
        "a cgroup outlived its machine"
    );
    assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}
