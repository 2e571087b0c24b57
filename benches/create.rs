//! Cold create with a cached image, measured end to end through the API on a real
//! hearthd and real QEMU guests: each step's time, and hearth's own overhead (everything
//! from CreateMachine to `started` except the VMM's start-up and the guest's boot), broken
//! down into the store's durable commits (from the daemon's `hearth_store_commit_seconds`,
//! scraped before and after each create) and the rest: the other steps' effects (which
//! overlap: independent ones run at the same time, so their sum is shown apart), the
//! API, observing, deciding, messaging, the client's two calls.
//!
//! Run as root: `bash deploy/build-guest-init.sh release && cargo bench --bench create`
//! (HEARTH_BENCH_RUNS sets the sample count,
//! default 7). Reports p50 and p90 per step, then one line:
//! `create: overhead_p50_ms=<x> overhead_p90_ms=<x> policy_p50_ms=<x> cgroup_p50_ms=<x> total_p50_ms=<x> commits_per_create=<n> commits_p50_ms=<x>`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use hearth::api::pb;
use support::percentile;

/// The durable commits so far: (count, seconds in all).
fn durable_commits(metrics: &str) -> (f64, f64) {
    let series = |what: &str| {
        support::sample(
            metrics,
            &format!("hearth_store_commit_seconds_{what}{{durability=\"durable\"}}"),
        )
        .unwrap_or(0.0)
    };
    (series("count"), series("sum"))
}

fn main() {
    let runs: usize = std::env::var("HEARTH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let daemon = support::Daemon::start_with("");
        let mut client = daemon.client().await;
        let metrics = support::node(&mut client).await.metrics_address;
        let mut per_step: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut overhead = Vec::new();
        let mut total = Vec::new();
        let mut effects = Vec::new();
        let mut commits = Vec::new();
        let mut commit_count = Vec::new();
        let mut rest = Vec::new();
        let mut api = Vec::new();
        // One warm-up run builds the image base and the guest kit: the figures are for a
        // cached image.
        for run in 0..=runs {
            let before = durable_commits(&support::scrape(&metrics));
            let clock = std::time::Instant::now();
            let mut create_ms = 0.0;
            let request =
                support::demo_request(&format!("bench-{run}"), &format!("bench-{run}"), &[]);
            let id = client
                .machines
                .create_machine(request)
                .await
                .expect("create")
                .into_inner()
                .id;
            create_ms += clock.elapsed().as_secs_f64() * 1000.0;
            let reply = client
                .machines
                .wait_machine(pb::WaitMachineRequest {
                    id: id.clone(),
                    state: pb::MachineState::Started as i32,
                    timeout_ms: 240_000,
                })
                .await
                .expect("wait")
                .into_inner();
            let elapsed_ms = clock.elapsed().as_secs_f64() * 1000.0;
            let after = durable_commits(&support::scrape(&metrics));
            let started = reply.machine.expect("machine");
            assert!(reply.reached, "did not start: {}", started.failure);
            support::destroy(&mut client, &id).await;
            if run > 0 {
                let (mut guest_ms, mut effect_ms) = (0.0, 0.0);
                for t in started.timings.iter().filter(|t| t.direction == "acquire") {
                    let ms = t.duration_us as f64 / 1000.0;
                    per_step.entry(t.step.clone()).or_default().push(ms);
                    if t.step == "vmm" || t.step == "ready" {
                        guest_ms += ms;
                    } else {
                        effect_ms += ms;
                    }
                }
                let commit_ms = (after.1 - before.1) * 1000.0;
                total.push(elapsed_ms);
                overhead.push(elapsed_ms - guest_ms);
                effects.push(effect_ms);
                commits.push(commit_ms);
                commit_count.push(after.0 - before.0);
                rest.push(elapsed_ms - guest_ms - commit_ms);
                api.push(create_ms);
            }
        }
        println!("cold create, cached image, {runs} runs (ms)");
        println!("{:<34} {:>9} {:>9}", "step", "p50", "p90");
        let mut p50 = BTreeMap::new();
        let rows = per_step.into_iter().chain([
            ("hearth overhead (no vmm/ready)".to_string(), overhead),
            ("  durable commits".to_string(), commits),
            ("  the rest (effects overlap)".to_string(), rest),
            ("other steps' effects, summed".to_string(), effects),
            ("CreateMachine call (client)".to_string(), api),
            ("create -> started".to_string(), total),
        ]);
        for (name, mut samples) in rows {
            samples.sort_by(f64::total_cmp);
            let (mid, p90) = (percentile(&samples, 0.5), percentile(&samples, 0.9));
            println!("{name:<34} {mid:>9.2} {p90:>9.2}");
            p50.insert(name, (mid, p90));
        }
        commit_count.sort_by(f64::total_cmp);
        let per_create = percentile(&commit_count, 0.5);
        println!("durable commits per create (p50): {per_create:.0}");
        let get = |name: &str| p50.get(name).copied().unwrap_or((f64::NAN, f64::NAN));
        let overhead = get("hearth overhead (no vmm/ready)");
        println!(
            "create: overhead_p50_ms={:.2} overhead_p90_ms={:.2} policy_p50_ms={:.2} cgroup_p50_ms={:.2} total_p50_ms={:.2} commits_per_create={per_create:.0} commits_p50_ms={:.2}",
            overhead.0,
            overhead.1,
            get("policy").0,
            get("cgroup").0,
            get("create -> started").0,
            get("  durable commits").0,
        );
    });
}
