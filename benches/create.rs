//! Cold create with a cached image, measured end to end through the API on a real
//! hearthd and real QEMU guests: each step's time, and hearth's own overhead (everything
//! from CreateMachine to `started` except the VMM's start-up and the guest's boot).
//!
//! Run as root: `bash deploy/build-guest-init.sh release && cargo bench --bench create`
//! (HEARTH_BENCH_RUNS sets the sample count,
//! default 7). Reports p50 and p90 per step, then one line:
//! `create: overhead_p50_ms=<x> overhead_p90_ms=<x> policy_p50_ms=<x> cgroup_p50_ms=<x> total_p50_ms=<x>`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use support::percentile;

fn main() {
    let runs: usize = std::env::var("HEARTH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let daemon = support::Daemon::start_with("");
        let mut client = daemon.client().await;
        let mut per_step: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut overhead = Vec::new();
        let mut total = Vec::new();
        // One warm-up run builds the image base and the guest kit: the figures are for a
        // cached image.
        for run in 0..=runs {
            let (elapsed_ms, started) = support::create_started(
                &mut client,
                support::demo_request(&format!("bench-{run}"), &format!("bench-{run}"), &[]),
            )
            .await;
            if run > 0 {
                let mut guest_ms = 0.0;
                for t in started.timings.iter().filter(|t| t.direction == "acquire") {
                    let ms = t.duration_us as f64 / 1000.0;
                    per_step.entry(t.step.clone()).or_default().push(ms);
                    if t.step == "vmm" || t.step == "ready" {
                        guest_ms += ms;
                    }
                }
                total.push(elapsed_ms);
                overhead.push(elapsed_ms - guest_ms);
            }
        }
        println!("cold create, cached image, {runs} runs (ms)");
        println!("{:<28} {:>9} {:>9}", "step", "p50", "p90");
        let mut p50 = BTreeMap::new();
        let rows = per_step.into_iter().chain([
            ("hearth overhead (no vmm/ready)".to_string(), overhead),
            ("create -> started".to_string(), total),
        ]);
        for (name, mut samples) in rows {
            samples.sort_by(f64::total_cmp);
            let (mid, p90) = (percentile(&samples, 0.5), percentile(&samples, 0.9));
            println!("{name:<28} {mid:>9.2} {p90:>9.2}");
            p50.insert(name, (mid, p90));
        }
        let get = |name: &str| p50.get(name).copied().unwrap_or((f64::NAN, f64::NAN));
        let overhead = get("hearth overhead (no vmm/ready)");
        println!(
            "create: overhead_p50_ms={:.2} overhead_p90_ms={:.2} policy_p50_ms={:.2} cgroup_p50_ms={:.2} total_p50_ms={:.2}",
            overhead.0,
            overhead.1,
            get("policy").0,
            get("cgroup").0,
            get("create -> started").0
        );
    });
}
