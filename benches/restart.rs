//! Restart recovery: with N machines running (default 20), hearthd is killed with SIGKILL
//! and started again. Reports the time from the restart to the API answering, and to every
//! machine's run having looked at the host (re-adopted), and checks that no VMM was
//! restarted (same pids, same processes).
//!
//! Run as root: `bash deploy/build-guest-init.sh release && cargo bench --bench restart`
//! (HEARTH_BENCH_MACHINES sets N, HEARTH_BENCH_RUNS the number of restarts, default 5).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use hearth::api::pb;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let count: usize = std::env::var("HEARTH_BENCH_MACHINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let runs: usize = std::env::var("HEARTH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        // 20 guests under TCG on 2 cores boot slowly; give readiness room.
        let mut daemon = support::Daemon::start_with("[guest]\nready_timeout_secs = 300\n[capacity]\nvcpus = 64\n");
        let client = daemon.client().await;
        let mut tasks = Vec::new();
        for i in 0..count {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let m = client
                    .machines
                    .create_machine(support::demo_request(&format!("restart-{i}"), &format!("r{i}"), &[]))
                    .await
                    .expect("create")
                    .into_inner();
                let started = support::wait_for(&mut client, &m.id, pb::MachineState::Started).await;
                (started.id, started.vmm_pid)
            }));
        }
        let mut pids = BTreeMap::new();
        for task in tasks {
            let (id, pid) = task.await.expect("task");
            pids.insert(id, pid);
        }
        println!("{count} machines started");

        let (mut to_api, mut to_adopted) = (Vec::new(), Vec::new());
        for run in 0..runs {
            let (mut client, api_ms, adopted_ms) = daemon.kill_and_restart_timed(count).await;
            let list = client
                .machines
                .list_machines(pb::ListMachinesRequest {
                    include_destroyed: false,
                    ..Default::default()
                })
                .await
                .expect("list")
                .into_inner();
            for m in &list.machines {
                assert_eq!(m.state, pb::MachineState::Started as i32, "{} is {:?}", m.id, m.state);
                assert_eq!(pids.get(&m.id), Some(&m.vmm_pid), "{} got a new VMM", m.id);
            }
            assert_eq!(daemon.processes().len(), count, "VMM processes after restart {run}");
            println!("restart {run}: API answering after {api_ms:.1} ms, all {count} re-adopted after {adopted_ms:.1} ms");
            to_api.push(api_ms);
            to_adopted.push(adopted_ms);
        }
        println!(
            "restart with {count} running machines, {runs} restarts: API answering p50 {:.1} ms, all re-adopted p50 {:.1} ms, VMMs restarted: 0",
            median(to_api),
            median(to_adopted)
        );
        let mut client = daemon.client().await;
        for id in pids.keys() {
            let _ = client.machines.destroy_machine(pb::MachineRef { id: id.clone() }).await;
        }
        for id in pids.keys() {
            support::wait_for(&mut client, id, pb::MachineState::Destroyed).await;
        }
    });
}
