//! SIGKILL from outside at random moments (root, QEMU): five machines are created and
//! destroyed concurrently while hearthd is killed and started again twenty times. Every
//! machine must converge to what was last asked of it, and at the end nothing of any of
//! them may be left on the host.

mod support;

use std::time::Duration;

use hearth::api::pb;
use hearth::client::Client;
use support::{Daemon, wait_for};

const MACHINES: usize = 5;
const KILLS: usize = 20;

fn random_below(n: u64) -> u64 {
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).expect("random");
    u64::from_le_bytes(raw) % n
}

/// What the test last asked of each machine.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Asked {
    Nothing,
    Started,
    Destroyed,
}

async fn ask(
    client: &mut Client,
    slot: usize,
    generation: usize,
    asked: &mut Asked,
    ids: &mut [Option<String>],
) {
    // Alternate: a slot with no live machine gets a create, a live one a destroy.
    match (*asked, &ids[slot]) {
        (Asked::Started, Some(id)) => {
            let reply = client
                .machines
                .destroy_machine(pb::MachineRef { id: id.clone() })
                .await;
            if reply.is_ok() {
                *asked = Asked::Destroyed;
            }
        }
        _ => {
            let request = support::demo_request(
                &format!("kill-{slot}-{generation}"),
                &format!("k{slot}-{generation}"),
                &[],
            );
            if let Ok(reply) = client.machines.create_machine(request).await {
                ids[slot] = Some(reply.into_inner().id);
                *asked = Asked::Started;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_random_kills_during_concurrent_creates_and_destroys() {
    let mut daemon = Daemon::start_with("");
    let mut asked = [Asked::Nothing; MACHINES];
    let mut ids: Vec<Option<String>> = vec![None; MACHINES];
    let mut every_id = Vec::new();
    for kill in 0..KILLS {
        let mut client = daemon.client().await;
        for slot in 0..MACHINES {
            ask(&mut client, slot, kill, &mut asked[slot], &mut ids).await;
            if let Some(id) = &ids[slot]
                && !every_id.contains(id)
            {
                every_id.push(id.clone());
            }
        }
        // Let the runs get somewhere between 0 and 2.5 s, then crash the daemon there.
        tokio::time::sleep(Duration::from_millis(random_below(2500))).await;
        daemon.kill();
        daemon.spawn();
    }

    // Every machine converges to what was last asked of it.
    let mut client = daemon.client().await;
    for (slot, id) in ids.iter().enumerate() {
        let Some(id) = id else { continue };
        let goal = match asked[slot] {
            Asked::Started => pb::MachineState::Started,
            Asked::Destroyed => pb::MachineState::Destroyed,
            Asked::Nothing => continue,
        };
        wait_for(&mut client, id, goal).await;
    }
    // Earlier generations were destroyed while the daemon was being killed; they settle too.
    for id in &every_id {
        let m = client
            .machines
            .get_machine(pb::MachineRef { id: id.clone() })
            .await
            .expect("get")
            .into_inner();
        if m.desired == pb::DesiredState::Destroyed as i32 {
            wait_for(&mut client, id, pb::MachineState::Destroyed).await;
        }
    }
    support::assert_audit_clean(&mut client).await;
    let live: Vec<_> = ids.iter().flatten().cloned().collect();
    let started_vmms = daemon.processes().len();
    let wanted_started = asked.iter().filter(|a| **a == Asked::Started).count();
    assert_eq!(started_vmms, wanted_started, "one VMM per started machine");

    for id in &live {
        client
            .machines
            .destroy_machine(pb::MachineRef { id: id.clone() })
            .await
            .expect("destroy");
    }
    for id in &live {
        wait_for(&mut client, id, pb::MachineState::Destroyed).await;
    }
    daemon.assert_no_host_leftovers();
    assert!(
        daemon.processes().is_empty(),
        "VMMs left: {:?}",
        daemon.processes()
    );
    let dirs: Vec<_> = std::fs::read_dir(daemon.layout().machines())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(dirs.is_empty(), "machine directories left: {dirs:?}");
    let node = client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .expect("node")
        .into_inner();
    assert_eq!(node.ip_slots_used, 0, "leases left");
    let routes = client
        .registry
        .list_routes(pb::ListRoutesRequest {})
        .await
        .expect("routes");
    assert!(routes.into_inner().routes.is_empty(), "routes left");
    println!(
        "{} machines across {KILLS} kills converged with nothing left",
        every_id.len()
    );
}
