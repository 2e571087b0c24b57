//! A VMM that broke out of its guest (root, QEMU, real guests). The test acts as the
//! VMM's own uid and gid (`setpriv`, the owner of the machine directory) and, for every
//! name in the machine directory that hearthd creates, opens, rotates, truncates,
//! renames, connects to or removes, plants in turn a link to a canary file outside, a
//! link to a path that does not exist, a FIFO and a directory. After each planting it
//! drives every path that touches those names: log rotation (the keeper's tick), the
//! VMM killed and restarted by the daemon, a stop and a start with the writable layer
//! removed (the disk step is redone), the config disk written again (the drift check
//! sees it replaced), and at the end a destroy.
//!
//! Throughout, GetNode is asked every 20 ms (no call may fail or hang; the p99 is
//! printed). After each round the machine is running again (repaired) or failed; at the
//! end every canary keeps its digest and owner, nothing new appeared outside the machine
//! directory (no dangling link was followed to create a file), and after destroy the
//! audit is clean and nothing of the daemon is left on the host.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth::api::pb;
use sha2::{Digest, Sha256};
use support::{Daemon, percentile, wait_for};

/// Every name in a QEMU machine's directory that the daemon, as root, acts on.
const NAMES: &[&str] = &[
    "vmm.log",
    "vmm.log.1",
    "vmm.log.1.partial",
    "serial.log",
    "serial.log.1",
    "config.disk",
    "config.disk.tmp",
    "qmp.sock",
    "agent.sock",
    "serial.sock",
    "base.ext4.partial",
    "rootfs.ext4.partial",
];

/// Each canary is larger than the log cap (1 MiB here), so a size check that followed a
/// link would rotate it: copy its end and truncate it.
const CANARY_BYTES: usize = 2 << 20;

/// What is planted at every name in one round.
#[derive(Debug, Clone, Copy)]
enum Plant {
    LinkToCanary,
    DanglingLink,
    Fifo,
    Directory,
}

/// A GetNode that takes this long is the API blocked, not a slow host.
const HANG_LIMIT: Duration = Duration::from_secs(5);

struct Canary {
    path: PathBuf,
    digest: Vec<u8>,
}

fn digest(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).expect("read canary")).to_vec()
}

/// Runs `script` with `sh -c` as `uid:gid` and no supplementary groups (the VMM's
/// privileges), failing the test if it fails.
fn as_vmm(uid: u32, gid: u32, script: &str) {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &gid.to_string(),
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("setpriv");
    assert!(
        out.status.success(),
        "as the VMM: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Plants `plant` at every name of `dir`, as the VMM.
fn plant_all(dir: &Path, outside: &Path, plant: Plant, uid: u32, gid: u32) {
    let mut script = format!("cd '{}' || exit 1\n", dir.display());
    for name in NAMES {
        script.push_str(&format!("rm -rf '{name}'\n"));
        script.push_str(&match plant {
            Plant::LinkToCanary => format!("ln -s '{}/{name}' '{name}'\n", outside.display()),
            Plant::DanglingLink => {
                format!("ln -s '{}/missing-{name}' '{name}'\n", outside.display())
            }
            Plant::Fifo => format!("mkfifo '{name}'\n"),
            Plant::Directory => format!("mkdir '{name}' && touch '{name}/inside'\n"),
        });
    }
    as_vmm(uid, gid, &script);
}

/// GetNode every 20 ms on its own connection until stopped: latencies and failures.
struct Prober {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<f64>, Vec<String>)>,
}

impl Prober {
    async fn start(daemon: &Daemon) -> Prober {
        let mut client = daemon.client().await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let (mut latencies, mut failures) = (Vec::new(), Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let clock = Instant::now();
                let call = client.node.get_node(pb::GetNodeRequest {});
                match tokio::time::timeout(HANG_LIMIT, call).await {
                    Ok(Ok(_)) => latencies.push(clock.elapsed().as_secs_f64() * 1000.0),
                    Ok(Err(e)) => failures.push(e.to_string()),
                    Err(_) => failures.push(format!("no answer in {HANG_LIMIT:?}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (latencies, failures)
        });
        Prober { stop, task }
    }

    async fn finish(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut latencies, failures) = self.task.await.expect("prober");
        assert!(failures.is_empty(), "GetNode failed or hung: {failures:?}");
        latencies.sort_by(f64::total_cmp);
        assert!(latencies.len() >= 50, "too few GetNode samples");
        eprintln!(
            "hostile_vmm: GetNode x{} p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            latencies.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies.last().copied().unwrap_or(0.0)
        );
    }
}

/// Waits (bounded) until `done` holds, re-checking every 50 ms: a host-side condition
/// the daemon reaches by itself (the keeper's one-second tick).
async fn until(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts the machine again if the round failed it; returns its state after the round.
async fn settle(client: &mut hearth::client::Client, id: &str) -> pb::MachineState {
    let machine = support::wait_machine_until(client, id, Duration::from_secs(240), |m| {
        m.state == pb::MachineState::Started as i32 || m.state == pb::MachineState::Failed as i32
    })
    .await;
    let state = pb::MachineState::try_from(machine.state).expect("state");
    if state == pb::MachineState::Failed {
        eprintln!("hostile_vmm: the machine failed: {}", machine.failure);
        client
            .machines
            .start_machine(pb::MachineRef { id: id.into() })
            .await
            .expect("start again");
        wait_for(client, id, pb::MachineState::Started).await;
    }
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_replaces_its_files_never_makes_root_write_outside() {
    let daemon = Daemon::start_with("[vmm]\nlog_max_mib = 1\n");
    let mut client = daemon.client().await;
    let machine = client
        .machines
        .create_machine(support::demo_request("hvmm-1", "hvmm", &[]))
        .await
        .expect("create")
        .into_inner();
    let id = machine.id.clone();
    let machine = wait_for(&mut client, &id, pb::MachineState::Started).await;
    let dir = daemon.layout().machine_dir(&id);
    let owner = std::fs::metadata(&dir).expect("machine dir");
    let (uid, gid) = (owner.uid(), owner.gid());
    assert_ne!(uid, 0, "the VMM's directory is the VMM's");

    // Canaries outside, root's, in a directory the VMM can search but not write.
    let outside = daemon.dir.path().join("outside");
    std::fs::create_dir(&outside).expect("outside");
    let canaries: Vec<Canary> = NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let path = outside.join(name);
            let body: Vec<u8> = (0..CANARY_BYTES).map(|b| (b * 31 + i * 7) as u8).collect();
            std::fs::write(&path, body).expect("canary");
            Canary {
                digest: digest(&path),
                path,
            }
        })
        .collect();
    let before: Vec<String> = listing(&outside);

    let prober = Prober::start(&daemon).await;
    let mut outcomes = Vec::new();
    let mut pid = machine.vmm_pid;
    for plant in [
        Plant::LinkToCanary,
        Plant::DanglingLink,
        Plant::Fifo,
        Plant::Directory,
    ] {
        let round = format!("{plant:?}");
        // 1. Rotation and drift: the keeper's next tick finds vmm.log replaced and
        //    removes the name; the config disk replaced is written again.
        plant_all(&dir, &outside, plant, uid, gid);
        until(
            &format!("{round}: vmm.log taken back"),
            Duration::from_secs(10),
            || std::fs::symlink_metadata(dir.join("vmm.log")).is_err(),
        )
        .await;
        // 1b. Rotation proper: vmm.log (the VMM's own, as it is after a launch) grown
        //     past the cap, with the rotated names planted.
        plant_all(&dir, &outside, plant, uid, gid);
        as_vmm(
            uid,
            gid,
            &format!(
                "cd '{}' && rm -rf vmm.log && head -c 1500000 /dev/zero > vmm.log",
                dir.display()
            ),
        );
        until(
            &format!("{round}: vmm.log rotated"),
            Duration::from_secs(10),
            || std::fs::metadata(dir.join("vmm.log")).is_ok_and(|m| m.len() < 1 << 20),
        )
        .await;
        let rotated = std::fs::symlink_metadata(dir.join("vmm.log.1")).expect("vmm.log.1");
        assert!(
            rotated.is_file() && rotated.uid() == 0,
            "{round}: {rotated:?}"
        );
        // 2. The VMM killed: the daemon launches it again over the planted names.
        plant_all(&dir, &outside, plant, uid, gid);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the VMM");
        let restarted =
            support::wait_machine_until(&mut client, &id, Duration::from_secs(240), |m| {
                m.state == pb::MachineState::Failed as i32
                    || (m.vmm_pid != pid
                        && m.vmm_pid != 0
                        && m.state == pb::MachineState::Started as i32)
            })
            .await;
        outcomes.push((round.clone() + " kill", state_name(restarted.state)));
        settle(&mut client, &id).await;
        // 3. Stop, plant while stopped, start: a fresh launch and a fresh keeper.
        client
            .machines
            .stop_machine(pb::MachineRef { id: id.clone() })
            .await
            .expect("stop");
        wait_for(&mut client, &id, pb::MachineState::Stopped).await;
        plant_all(&dir, &outside, plant, uid, gid);
        // Its writable layer gone too: the disk step is redone over the planted names.
        as_vmm(uid, gid, &format!("rm -f '{}/rootfs.ext4'", dir.display()));
        client
            .machines
            .start_machine(pb::MachineRef { id: id.clone() })
            .await
            .expect("start");
        let state = settle(&mut client, &id).await;
        outcomes.push((round.clone() + " stop/start", state_name(state as i32)));
        // The config disk was written again, a regular file of the daemon's.
        let config = std::fs::symlink_metadata(dir.join("config.disk")).expect("config disk");
        assert!(config.is_file(), "{round}: config.disk is {config:?}");
        pid = support::get_machine(&mut client, &id).await.vmm_pid;
        support::http_get(&support::get_machine(&mut client, &id).await.guest_ip, 80);
    }
    // 4. Destroy with everything planted once more.
    plant_all(&dir, &outside, Plant::LinkToCanary, uid, gid);
    support::destroy(&mut client, &id).await;
    prober.finish().await;
    eprintln!("hostile_vmm: outcomes {outcomes:?}");

    for canary in &canaries {
        let meta = std::fs::metadata(&canary.path).expect("canary");
        assert_eq!(meta.uid(), 0, "{}", canary.path.display());
        assert_eq!(
            meta.len() as usize,
            CANARY_BYTES,
            "{}",
            canary.path.display()
        );
        assert_eq!(
            digest(&canary.path),
            canary.digest,
            "{}",
            canary.path.display()
        );
    }
    assert_eq!(
        listing(&outside),
        before,
        "a file appeared outside the machine directory"
    );
    assert!(!dir.exists(), "the machine directory is gone");
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}

fn state_name(state: i32) -> String {
    pb::MachineState::try_from(state).map_or_else(|_| state.to_string(), |s| format!("{s:?}"))
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
