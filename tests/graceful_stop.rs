//! SIGTERM stops hearthd promptly even while callers hold a WatchEvents stream and a long
//! WaitMachine open: they are told UNAVAILABLE, the process exits, and its machines keep
//! running. The next daemon re-adopts them with the same VMM pids, and stop, start and
//! destroy work as before.

mod support;

use std::time::Duration;

use hearth::api::pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::{Daemon, wait_for};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_watch_open_exits_and_the_machines_run_on() {
    if support::guest_prereqs::guest_prereqs("graceful_stop").is_none() {
        return;
    }
    let mut daemon = Daemon::start_with("[vmm]\nkind = \"qemu\"\n");
    let mut client = daemon.client().await;
    let created = client
        .machines
        .create_machine(support::demo_request("stop-1", "keep", &[]))
        .await
        .expect("create")
        .into_inner();
    let started = wait_for(&mut client, &created.id, pb::MachineState::Started).await;
    let vmm = started.vmm_pid;
    assert_ne!(vmm, 0);

    // A follower of every event, and a wait for something that will not happen soon.
    let mut watch = client
        .machines
        .watch_events(pb::WatchEventsRequest {
            machine_id: String::new(),
            after_seq: 0,
            history_only: false,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("an event").expect("open");
    assert_eq!(first.seq, 1);
    let follower = tokio::spawn(async move {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    });
    let mut waiting = client.clone();
    let id = created.id.clone();
    let waiter = tokio::spawn(async move {
        waiting
            .machines
            .wait_machine(pb::WaitMachineRequest {
                id,
                state: pb::MachineState::Destroyed as i32,
                timeout_ms: 600_000,
            })
            .await
    });

    let pid = daemon.pid().expect("running");
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
    assert!(
        daemon.wait_exit(Duration::from_secs(5)).await,
        "hearthd still runs 5 s after SIGTERM with a stream open"
    );
    let ended = follower.await.expect("follower");
    let status = ended.expect("the stream ends with a status, not silently");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    let waited = waiter.await.expect("waiter");
    assert!(
        waited.is_err(),
        "the wait did not end with the daemon: {waited:?}"
    );
    assert!(
        kill(Pid::from_raw(vmm as i32), None).is_ok(),
        "the VMM {vmm} went with the daemon"
    );

    // The next daemon re-adopts the machine with the very same VMM.
    daemon.spawn();
    let mut client = daemon.client().await;
    let again = wait_for(&mut client, &created.id, pb::MachineState::Started).await;
    assert_eq!(again.vmm_pid, vmm, "re-adopted, not restarted");
    client
        .machines
        .stop_machine(pb::MachineRef {
            id: created.id.clone(),
        })
        .await
        .expect("stop");
    wait_for(&mut client, &created.id, pb::MachineState::Stopped).await;
    client
        .machines
        .start_machine(pb::MachineRef {
            id: created.id.clone(),
        })
        .await
        .expect("start");
    wait_for(&mut client, &created.id, pb::MachineState::Started).await;
    support::destroy(&mut client, &created.id).await;
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}
