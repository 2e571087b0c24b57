//! The data dir's file system fills up, on purpose: a small ext4 file system on a loop
//! device is the daemon's data dir. Creates are refused or failed with the reason, a
//! running machine keeps serving, no record is lost, and once space is freed a create
//! succeeds and the audit is clean, all without restarting the daemon.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use hearth::api::pb;
use support::host_tools::{LoopFs, run};
use support::{Daemon, wait_for};
use tonic::Code;

/// Takes all but `leave_mib` of the file system's free space with one file.
fn fill(fs: &LoopFs, name: &str, leave_mib: u64) -> PathBuf {
    let filler = fs.mount_point().join(name);
    let take = fs.free_mib().saturating_sub(leave_mib);
    run(
        "fallocate",
        &[
            "-l",
            &format!("{}", take << 20),
            filler.to_str().expect("path"),
        ],
    );
    filler
}

/// Fills the rest byte by byte: what fallocate leaves (reserved blocks aside) goes too.
fn fill_to_the_last_block(fs: &LoopFs) -> PathBuf {
    use std::io::Write;
    let filler = fs.mount_point().join("last-blocks");
    let mut file = std::fs::File::create(&filler).expect("filler");
    let block = vec![0u8; 64 << 10];
    while file.write_all(&block).is_ok() {}
    let small = [0u8; 512];
    while file.write_all(&small).is_ok() {}
    let _ = file.sync_all();
    filler
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_dir_refuses_or_fails_creates_keeps_machines_and_recovers() {
    // No reserve: the store itself meets the full file system.
    let mut daemon = Daemon::prepare("[vmm]\nkind = \"qemu\"\n[capacity]\nmin_free_mib = 0\n");
    if !support::loop_devices("disk_full") {
        return;
    }
    let fs = LoopFs::ext4_at(640 << 20, &daemon.dir.path().join("data"));
    daemon.spawn();
    let mut client = daemon.client().await;
    let running = client
        .machines
        .create_machine(support::demo_request("full-1", "running", &[]))
        .await
        .expect("create")
        .into_inner();
    let running = wait_for(&mut client, &running.id, pb::MachineState::Started).await;
    assert!(support::http_get(&running.guest_ip, 80).contains("hearth demo"));
    println!("after one machine: {} MiB free", fs.free_mib());

    // Less room than a disk asks for: refused at admission, with the figures.
    let first = fill(&fs, "filler-1", 40);
    let big = client
        .machines
        .create_machine(support::demo_request("full-2", "big", &[]).tap_spec(|s| s.disk_mib = 100))
        .await
        .unwrap_err();
    assert_eq!(big.code(), Code::ResourceExhausted, "{big:?}");
    assert!(big.message().contains("MiB free"), "{}", big.message());

    // Not one block left: a create is refused, or recorded and then failed, naming the
    // want of space; nothing crashes.
    let last = fill_to_the_last_block(&fs);
    println!("filled: {} MiB free", fs.free_mib());
    let starved = client
        .machines
        .create_machine(support::demo_request("full-3", "starved", &[]))
        .await;
    match starved {
        Err(status) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains("space"), "{}", status.message());
        }
        Ok(created) => {
            let created = created.into_inner();
            let failed = wait_for(&mut client, &created.id, pb::MachineState::Failed).await;
            assert!(failed.failure.contains("space"), "{}", failed.failure);
        }
    }
    // The running machine still serves, and its record reads as before.
    assert!(support::http_get(&running.guest_ip, 80).contains("hearth demo"));
    let read = support::get_machine(&mut client, &running.id).await;
    assert_eq!(read.state, pb::MachineState::Started as i32);
    assert_eq!(read.vmm_pid, running.vmm_pid);
    support::node(&mut client).await;

    // Space comes back: everything works again, same daemon.
    std::fs::remove_file(last).expect("free");
    std::fs::remove_file(first).expect("free");
    println!("freed: {} MiB free", fs.free_mib());
    let after = client
        .machines
        .create_machine(support::demo_request("full-4", "after", &[]))
        .await
        .expect("a create once space is back")
        .into_inner();
    let after = wait_for(&mut client, &after.id, pb::MachineState::Started).await;
    assert!(support::http_get(&after.guest_ip, 80).contains("hearth demo"));
    assert!(
        !daemon.wait_exit(Duration::ZERO).await,
        "the daemon kept running throughout"
    );
    for machine in support::all_machines(&mut client).await {
        if machine.state != pb::MachineState::Destroyed as i32 {
            support::destroy(&mut client, &machine.id).await;
        }
    }
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
    daemon.kill();
    drop(fs);
}

/// A request with its spec changed.
trait TapSpec {
    fn tap_spec(self, change: impl FnOnce(&mut pb::MachineSpec)) -> Self;
}

impl TapSpec for pb::CreateMachineRequest {
    fn tap_spec(mut self, change: impl FnOnce(&mut pb::MachineSpec)) -> Self {
        if let Some(spec) = self.spec.as_mut() {
            change(spec);
        }
        self
    }
}
