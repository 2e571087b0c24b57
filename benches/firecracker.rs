//! Where the time of a Firecracker start goes, through hearth's driver: spawn until the
//! API answers, the configuration requests, `InstanceStart`, and pause, full snapshot,
//! resume, restore and stop. The guest's own boot is not part of it (on hosts whose KVM
//! cannot boot the guest kernel it never happens).
//!
//! Run as root: `HEARTH_FIRECRACKER=/path/to/firecracker cargo bench --bench firecracker`
//! (HEARTH_BENCH_RUNS, default 15). Without the variable it says it is skipped.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use hearth::vmm::{FirecrackerDriver, VmmDriver};

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples.get(i).copied().unwrap_or(f64::NAN)
}

fn main() {
    let Some(env) = support::firecracker_env::firecracker_env() else {
        println!("firecracker bench SKIPPED: HEARTH_FIRECRACKER is not set");
        return;
    };
    let runs: usize = std::env::var("HEARTH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let netns =
        support::firecracker_env::ScratchNetns::create(&format!("hfb-{}", std::process::id()));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut rows: Vec<(&str, Vec<f64>)> = [
        "launch",
        "pause",
        "snapshot (128 MiB)",
        "resume",
        "stop",
        "restore",
        "relaunch (adopt)",
    ]
    .into_iter()
    .map(|n| (n, Vec::new()))
    .collect();
    runtime.block_on(async {
        let driver = VmmDriver::Firecracker(
            FirecrackerDriver::new(env.firecracker.clone()).with_name_prefix("hearthfb-"),
        );
        for run in 0..runs {
            let dir = tempfile::tempdir().expect("dir");
            let spec = support::firecracker_env::scratch_spec(
                env,
                dir.path(),
                &format!("b{run}"),
                &netns.name,
            );
            let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
            let t = Instant::now();
            let p = driver.launch(&spec).await.expect("launch");
            rows[0].1.push(ms(t));
            let t = Instant::now();
            let again = driver.launch(&spec).await.expect("relaunch");
            rows[6].1.push(ms(t));
            assert_eq!(again.pid, p.pid);
            let t = Instant::now();
            driver.pause(&p).await.expect("pause");
            rows[1].1.push(ms(t));
            let t = Instant::now();
            let snap = driver.snapshot(&p, "s").await.expect("snapshot");
            rows[2].1.push(ms(t));
            let t = Instant::now();
            driver.resume(&p).await.expect("resume");
            rows[3].1.push(ms(t));
            let t = Instant::now();
            driver.stop(&p, Duration::ZERO).await.expect("stop");
            rows[4].1.push(ms(t));
            let t = Instant::now();
            let r = driver.restore(&spec, &snap, false).await.expect("restore");
            rows[5].1.push(ms(t));
            driver
                .stop(&r, Duration::ZERO)
                .await
                .expect("stop restored");
        }
    });
    drop(netns);
    println!("Firecracker through hearth's driver, {runs} runs (ms):");
    println!("{:<20} {:>8} {:>8}", "operation", "p50", "p90");
    for (name, samples) in &mut rows {
        let p50 = percentile(samples, 0.5);
        let p90 = percentile(samples, 0.9);
        println!("{name:<20} {p50:>8.2} {p90:>8.2}");
    }
}
