//! How the daemon scales with records: 1,000 machines created with `start = false`
//! (records only, nothing on the host) plus 10 running guests. Reports:
//! - the daemon's RSS;
//! - ListMachines p50/p99 and GetMachine p99;
//! - CreateMachine's commit latency (the call's answer) with the 1,010 records present;
//! - after `kill -9`, the time to the API answering and to every machine's run having
//!   looked at the host (the 10 running ones re-adopted, same VMM pids).
//!
//! Targets: RSS <= 100 MB, List p99 <= 10 ms, API answering <= 100 ms after restart.
//!
//! Run as root: `bash deploy/build-guest-init.sh release && cargo bench --bench scale`
//! (HEARTH_BENCH_RECORDS and HEARTH_BENCH_RUNNING change the counts).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Instant;

use hearth::api::pb;
use hearth::client::Client;
use support::percentile;

fn env_count(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sorted(mut samples: Vec<f64>) -> Vec<f64> {
    samples.sort_by(f64::total_cmp);
    samples
}

fn stopped_request(i: usize) -> pb::CreateMachineRequest {
    let mut request = support::demo_request(&format!("scale-{i}"), &format!("s{i}"), &[]);
    request.start = Some(false);
    request
}

/// Creates `range` stopped machines, `parallel` at a time; each call's latency in ms.
async fn create_stopped(
    client: &Client,
    range: std::ops::Range<usize>,
    parallel: usize,
) -> Vec<f64> {
    let mut latencies = Vec::new();
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(parallel) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let clock = Instant::now();
                let created = client
                    .machines
                    .create_machine(stopped_request(i))
                    .await
                    .expect("create")
                    .into_inner();
                (clock.elapsed().as_secs_f64() * 1000.0, created.id)
            }));
        }
        for task in tasks {
            let (ms, _) = task.await.expect("create task");
            latencies.push(ms);
        }
    }
    latencies
}

async fn list(client: &mut Client) -> Vec<pb::Machine> {
    client
        .machines
        .list_machines(pb::ListMachinesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .machines
}

fn main() {
    let records = env_count("HEARTH_BENCH_RECORDS", 1000);
    let running = env_count("HEARTH_BENCH_RUNNING", 10);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let mut daemon = support::Daemon::prepare(
            "[guest]\nready_timeout_secs = 300\n[capacity]\nvcpus = 100000\nmemory_mib = 100000000\nmax_memory_mib_per_machine = 16384\n",
        );
        // Room for every record's address block (a /29 each): a /16 of its own.
        daemon.rewrite_config(|text| {
            let line = text
                .lines()
                .find(|l| l.starts_with("pool = "))
                .map(str::to_string)
                .unwrap_or_default();
            text.replacen(&line, "pool = \"10.217.0.0/16\"", 1)
        });
        daemon.spawn();
        let mut client = daemon.client().await;

        let clock = Instant::now();
        let creates = create_stopped(&client, 0..records, 4).await;
        let fill_s = clock.elapsed().as_secs_f64();
        println!("{records} stopped records created in {fill_s:.1} s");

        let mut tasks = Vec::new();
        for i in 0..running {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let m = client
                    .machines
                    .create_machine(support::demo_request(&format!("run-{i}"), &format!("run{i}"), &[]))
                    .await
                    .expect("create")
                    .into_inner();
                let started = support::wait_for(&mut client, &m.id, pb::MachineState::Started).await;
                (started.id, started.vmm_pid)
            }));
        }
        let mut pids = BTreeMap::new();
        for task in tasks {
            let (id, pid) = task.await.expect("start task");
            pids.insert(id, pid);
        }
        println!("{running} machines running");
        let total = records + running;
        assert_eq!(list(&mut client).await.len(), total);

        // Reads with every record present.
        let mut lists = Vec::new();
        for _ in 0..200 {
            let clock = Instant::now();
            let machines = list(&mut client).await;
            lists.push(clock.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(machines.len(), total);
        }
        let ids: Vec<String> = list(&mut client).await.into_iter().map(|m| m.id).collect();
        let mut gets = Vec::new();
        for i in 0..1000 {
            let id = &ids[(i * 7919) % ids.len()];
            let clock = Instant::now();
            client
                .machines
                .get_machine(pb::MachineRef { id: id.clone() })
                .await
                .expect("get");
            gets.push(clock.elapsed().as_secs_f64() * 1000.0);
        }
        let rss_mb = daemon.rss_kib().expect("daemon rss") as f64 / 1024.0;
        // Creates with every record present (these add 100 more).
        let later = create_stopped(&client, records..records + 100, 1).await;
        let total = total + 100;

        // kill -9 and start again.
        let (mut client, api_ms, readopt_ms) = daemon.kill_and_restart_timed(total).await;
        let after = list(&mut client).await;
        assert_eq!(after.len(), total);
        for m in &after {
            match pids.get(&m.id) {
                Some(pid) => {
                    assert_eq!(m.state, pb::MachineState::Started as i32, "{} is {:?}", m.id, m.state);
                    assert_eq!(*pid, m.vmm_pid, "{} got a new VMM", m.id);
                }
                None => assert_eq!(m.state, pb::MachineState::Stopped as i32, "{}", m.id),
            }
        }
        assert_eq!(daemon.processes().len(), running, "VMM processes after the restart");
        let rss_after_mb = daemon.rss_kib().expect("daemon rss") as f64 / 1024.0;

        let (creates, later, lists, gets) = (sorted(creates), sorted(later), sorted(lists), sorted(gets));
        println!();
        println!("| measure ({records} stopped + {running} running records) | p50 | p99 |");
        println!("|---|---|---|");
        println!("| CreateMachine while filling (4 at once), ms | {:.2} | {:.2} |", percentile(&creates, 0.5), percentile(&creates, 0.99));
        println!("| CreateMachine with {} present (one at a time), ms | {:.2} | {:.2} |", records + running, percentile(&later, 0.5), percentile(&later, 0.99));
        println!("| ListMachines ({} machines), ms | {:.2} | {:.2} |", records + running, percentile(&lists, 0.5), percentile(&lists, 0.99));
        println!("| GetMachine, ms | {:.3} | {:.3} |", percentile(&gets, 0.5), percentile(&gets, 0.99));
        println!("| daemon RSS, MB | {rss_mb:.1} | after the restart: {rss_after_mb:.1} |");
        println!("| kill -9 to API answering, ms | {api_ms:.1} | |");
        println!("| kill -9 to all {total} runs observed ({running} VMMs re-adopted, 0 restarted), ms | {readopt_ms:.1} | |");
        println!();

        // Clean up: every machine destroyed (the stopped ones have nothing on the host).
        for m in &after {
            let _ = client.machines.destroy_machine(pb::MachineRef { id: m.id.clone() }).await;
        }
        for id in pids.keys() {
            support::wait_for(&mut client, id, pb::MachineState::Destroyed).await;
        }
        println!(
            "scale: records={records} rss_mb={rss_mb:.1} list_p99_ms={:.2} restart_api_ms={api_ms:.1} readopt_ms={readopt_ms:.1} list_p50_ms={:.2} get_p99_ms={:.3} create_p50_ms={:.2}",
            percentile(&lists, 0.99),
            percentile(&lists, 0.5),
            percentile(&gets, 0.99),
            percentile(&later, 0.5),
        );
    });
}
