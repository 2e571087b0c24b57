//! Prepared-capacity pools against cold creates of the same image, in one run on a real
//! hearthd with real QEMU guests: 20 creates that claim a prepared machine and 20 that
//! boot cold, each from CreateMachine until the machine is `started` (its workload runs
//! and its port listens), one at a time, each destroyed before the next. The pool refills
//! in the background meanwhile, as it would in service.
//!
//! Reports claim and cold p50/p99 and their ratio, the claim's steps, claims of a
//! workload that declares no port (the claim's floor), the time to prepare one machine, and the host memory (RSS) of a paused prepared machine's VMM; its last
//! line is for scripts:
//! `pool: claim_p50_ms=<x> claim_p99_ms=<x> cold_p50_ms=<x> ratio=<x>`.
//!
//! Run as root: `bash deploy/build-guest-init.sh release && cargo bench --bench pool`
//! (HEARTH_BENCH_RUNS sets the number of each, default 20).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use hearth::api::pb;
use support::percentile;

/// The pool's size: enough that claims rarely find it empty while it refills.
const POOL_SIZE: u32 = 4;

/// Resident memory of a process in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let runs: usize = std::env::var("HEARTH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let daemon = support::Daemon::start_with(&support::demo_pool("bench", POOL_SIZE));
        let mut client = daemon.client().await;
        let fill = Duration::from_secs(600);
        support::wait_pool(&mut client, "bench", POOL_SIZE, fill).await;

        // Memory of a paused prepared machine, and how long preparing one took.
        let prepared: Vec<pb::Machine> = support::all_machines(&mut client)
            .await
            .into_iter()
            .filter(|m| m.state == pb::MachineState::Prepared as i32)
            .collect();
        let mut rss: Vec<f64> = prepared.iter().map(|m| rss_mib(m.vmm_pid)).collect();
        let mut refill: Vec<f64> = prepared
            .iter()
            .map(|m| m.updated_at_ms.saturating_sub(m.created_at_ms) as f64)
            .collect();

        let mut claims = Vec::new();
        let mut claim_steps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut missed = 0;
        for run in 0..runs {
            // Claims are measured against a full pool: a claim never waits for a refill,
            // but on 2 cores a refill's booting guest competes with it for the CPU.
            support::wait_pool(&mut client, "bench", POOL_SIZE, fill).await;
            let request = support::demo_request(&format!("claim-{run}"), &format!("claim-{run}"), &[]);
            let (ms, started) = support::create_started(&mut client, request).await;
            if !started.claimed {
                missed += 1;
                continue;
            }
            claims.push(ms);
            // The claim's own steps (from the catalogue: what a prepared machine did not
            // acquire, and `ready` again, now resume, workload and ports; the earlier
            // `ready` waited for the idle guest at refill).
            let claim_own = hearth::machine::step::CREATE_ORDER
                .iter()
                .filter(|s| **s == hearth::machine::step::Step::Ready || !s.info().prepared)
                .map(|s| s.name());
            for step in claim_own {
                if let Some(t) = started
                    .timings
                    .iter()
                    .rev()
                    .find(|t| t.step == step && t.direction == "acquire")
                {
                    claim_steps
                        .entry(step.to_string())
                        .or_default()
                        .push(t.duration_us as f64 / 1000.0);
                }
            }
        }
        // The same claims with a workload that declares no port (`sleep`): the claim's
        // floor here, without a server's start-up and the wait for its port.
        let mut bare = Vec::new();
        for run in 0..runs / 2 {
            support::wait_pool(&mut client, "bench", POOL_SIZE, fill).await;
            let mut request = support::demo_request(
                &format!("bare-{run}"),
                &format!("bare-{run}"),
                &["/bin/busybox", "sleep", "3600"],
            );
            if let Some(spec) = request.spec.as_mut() {
                spec.ports.clear();
            }
            let (ms, started) = support::create_started(&mut client, request).await;
            if started.claimed {
                bare.push(ms);
            }
        }
        // Refill times of the machines prepared during the claims.
        support::wait_pool(&mut client, "bench", POOL_SIZE, fill).await;
        for m in support::all_machines(&mut client).await {
            if m.state == pb::MachineState::Prepared as i32 {
                refill.push(m.updated_at_ms.saturating_sub(m.created_at_ms) as f64);
                rss.push(rss_mib(m.vmm_pid));
            }
        }

        // Cold creates of the same image: a shape no pool has.
        let mut cold = Vec::new();
        for run in 0..runs {
            let mut request = support::demo_request(&format!("cold-{run}"), &format!("cold-{run}"), &[]);
            if let Some(spec) = request.spec.as_mut() {
                spec.memory_mib = 160;
            }
            let (ms, started) = support::create_started(&mut client, request).await;
            assert!(!started.claimed);
            cold.push(ms);
        }

        for samples in [&mut claims, &mut bare, &mut cold, &mut refill, &mut rss] {
            samples.sort_by(f64::total_cmp);
        }
        println!(
            "prepared pool of {POOL_SIZE} vs cold create, demo image, {} claims ({missed} found the pool empty), {} cold (ms)",
            claims.len(),
            cold.len()
        );
        println!("{:<34} {:>9} {:>9}", "", "p50", "p99");
        for (name, samples) in [
            ("claim: create -> started", &claims),
            ("claim, no port (sleep)", &bare),
            ("cold: create -> started", &cold),
            ("prepare one machine", &refill),
        ] {
            println!(
                "{:<34} {:>9.2} {:>9.2}",
                name,
                percentile(samples, 0.5),
                percentile(samples, 0.99)
            );
        }
        for (step, mut samples) in claim_steps {
            samples.sort_by(f64::total_cmp);
            println!(
                "{:<34} {:>9.2} {:>9.2}",
                format!("  claim step {step}"),
                percentile(&samples, 0.5),
                percentile(&samples, 0.99)
            );
        }
        println!(
            "{:<34} {:>9.1} {:>9.1}",
            "paused prepared VMM RSS (MiB)",
            percentile(&rss, 0.5),
            percentile(&rss, 0.99)
        );
        let claim_p50 = percentile(&claims, 0.5);
        let cold_p50 = percentile(&cold, 0.5);
        println!(
            "pool: claim_p50_ms={:.2} claim_p99_ms={:.2} cold_p50_ms={:.2} ratio={:.1}",
            claim_p50,
            percentile(&claims, 0.99),
            cold_p50,
            cold_p50 / claim_p50
        );
    });
}
