//! What hearthd keeps stays bounded, on real guests and a real store: a guest that
//! reboots itself in a loop is restarted with a growing backoff and then failed, with
//! its event history capped; destroyed machines are compacted away after their
//! retention, their request ids become usable again, and a restart after compaction
//! re-adopts running machines as before.

mod support;

use std::time::{Duration, Instant};

use hearth::api::pb;
use support::{Daemon, wait_for};
use tonic::Code;

/// A machine serving port 80 that reboots its guest two seconds after it is ready.
fn reboot_loop(request_id: &str) -> pb::CreateMachineRequest {
    support::shell_request(
        request_id,
        "looper",
        "( sleep 2; echo b > /proc/sysrq-trigger ) & exec httpd -f -p 80 -h /srv/www",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_rebooting_in_a_loop_is_backed_off_then_failed_with_its_events_capped() {
    let daemon = Daemon::start_with(
        "[vmm]\nkind = \"qemu\"\n\
         [guest]\nmax_restarts = 2\nrestart_backoff_ms = 400\nrestart_backoff_max_ms = 800\n\
         [store]\nevents_first = 4\nevents_last = 8\n",
    );
    let mut client = daemon.client().await;
    let created = client
        .machines
        .create_machine(reboot_loop("loop-1"))
        .await
        .expect("create")
        .into_inner();
    // Every event, live, while the loop runs: (when it arrived, its message, its state).
    let mut events = support::watch_machine(&mut client, &created.id, 0).await;
    let mut seen: Vec<(Instant, String, i32)> = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(180), events.message())
            .await
            .unwrap_or_else(|_| panic!("the loop did not end in time: {seen:#?}"))
            .expect("event stream")
            .expect("stream open");
        let failed =
            event.state == pb::MachineState::Failed as i32 && event.message.starts_with("failed:");
        seen.push((Instant::now(), event.message, event.state));
        if failed {
            break;
        }
    }
    let crashes: Vec<usize> = seen
        .iter()
        .enumerate()
        .filter(|(_, (_, m, _))| m.contains("after the guest was ready"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        crashes.len(),
        3,
        "two restarts, then the third crash fails it: {seen:#?}"
    );
    // After each crash but the last, the VMM starts again only after the backoff, and
    // the backoff doubles.
    let mut waits = Vec::new();
    for &crash in &crashes[..2] {
        let (at, _, _) = &seen[crash];
        let relaunched = seen[crash..]
            .iter()
            .find(|(_, m, _)| m.starts_with("acquire vmm: ok"))
            .unwrap_or_else(|| panic!("no relaunch after the crash: {seen:#?}"));
        waits.push(relaunched.0.duration_since(*at));
    }
    println!("restart waits after crashes 1 and 2: {waits:?}");
    assert!(waits[0] >= Duration::from_millis(400), "{waits:?}");
    assert!(waits[1] >= Duration::from_millis(800), "{waits:?}");
    // Failed, and done releasing what it held (its last events are those releases).
    let machine =
        support::wait_machine_until(&mut client, &created.id, Duration::from_secs(60), |m| {
            m.state == pb::MachineState::Failed as i32 && m.current_step.is_empty()
        })
        .await;
    assert!(
        machine.failure.contains("3 times") && machine.failure.contains("guest.max_restarts"),
        "{}",
        machine.failure
    );
    // The log kept its first 4 and last 8 events of the many it had: replayed, they are
    // what comes before the destroy that follows.
    let replay = support::watch_machine(&mut client, &created.id, 0).await;
    client
        .machines
        .destroy_machine(pb::MachineRef {
            id: created.id.clone(),
        })
        .await
        .expect("destroy");
    let kept = until(replay, |e| {
        e.message.starts_with("desired state: destroyed")
    })
    .await;
    println!("{} events seen live, {} kept", seen.len(), kept.len());
    assert!(seen.len() > 12, "the loop made more events than the cap");
    assert_eq!(kept.len(), 12, "{kept:#?}");
    assert_eq!(kept[0].message, "created");
    // The last ones are the failed machine's releases.
    assert!(
        kept.last()
            .is_some_and(|e| e.state == pb::MachineState::Failed as i32),
        "{kept:#?}"
    );
    let seqs: Vec<u64> = kept.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(
        seqs[4] > seqs[3] + 1,
        "the middle of the history was dropped: {seqs:?}"
    );
    wait_for(&mut client, &created.id, pb::MachineState::Destroyed).await;
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}

/// The events of `stream` before the first that `last` matches (which is waited for up
/// to 120 s).
async fn until(
    mut stream: tonic::Streaming<pb::MachineEvent>,
    last: impl Fn(&pb::MachineEvent) -> bool,
) -> Vec<pb::MachineEvent> {
    let mut out = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(120), stream.message())
            .await
            .unwrap_or_else(|_| panic!("the awaited event did not come: {out:#?}"))
            .expect("event stream")
            .expect("stream open");
        if last(&event) {
            return out;
        }
        out.push(event);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroyed_machines_are_compacted_after_their_retention() {
    let mut daemon = Daemon::start_with(
        "[vmm]\nkind = \"qemu\"\n[store]\nretention_secs = 1\ncompact_interval_secs = 1\n",
    );
    let mut client = daemon.client().await;
    let keep = client
        .machines
        .create_machine(support::demo_request("keep-1", "keep", &[]))
        .await
        .expect("create")
        .into_inner();
    let gone = client
        .machines
        .create_machine(support::demo_request("gone-1", "gone", &[]))
        .await
        .expect("create")
        .into_inner();
    let kept = wait_for(&mut client, &keep.id, pb::MachineState::Started).await;
    wait_for(&mut client, &gone.id, pb::MachineState::Started).await;
    support::destroy(&mut client, &gone.id).await;

    // The tombstone answers until its retention is over, then is gone with its events.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = client
            .machines
            .get_machine(pb::MachineRef {
                id: gone.id.clone(),
            })
            .await;
        match status {
            Err(status) if status.code() == Code::NotFound => break,
            Ok(_) if Instant::now() < deadline => {
                // The compactor runs every second; look again on its next pass.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("the tombstone was not compacted: {other:?}"),
        }
    }
    // Its request id is free: another body under it makes a new machine. The whole log,
    // replayed up to that machine's first event, holds nothing of the compacted one.
    let replay = support::watch_machine(&mut client, "", 0).await;
    let reused = client
        .machines
        .create_machine(support::demo_request("gone-1", "again", &[]))
        .await
        .expect("the request id is usable again")
        .into_inner();
    assert_ne!(reused.id, gone.id);
    let log = until(replay, |e| e.machine_id == reused.id).await;
    assert!(log.iter().any(|e| e.machine_id == keep.id), "{log:#?}");
    assert!(log.iter().all(|e| e.machine_id != gone.id), "{log:#?}");
    wait_for(&mut client, &reused.id, pb::MachineState::Started).await;

    // A restart after compaction re-adopts the running machines, VMMs untouched.
    daemon.kill();
    daemon.spawn();
    let mut client = daemon.client().await;
    let after = wait_for(&mut client, &keep.id, pb::MachineState::Started).await;
    assert_eq!(after.vmm_pid, kept.vmm_pid, "re-adopted, not restarted");
    let listed = support::all_machines(&mut client).await;
    assert!(listed.iter().all(|m| m.id != gone.id));
    for id in [&keep.id, &reused.id] {
        support::destroy(&mut client, id).await;
    }
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}
