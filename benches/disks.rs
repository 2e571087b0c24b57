//! The `disk` step's cost by image size and layout, on a real hearthd whose data dir is
//! on this host's file system (ext4 here: no reflinks). Each machine is created, its
//! `disk` step's own time read from its timings as soon as the step is done, and the
//! machine destroyed (the rest of its start is cancelled).
//!
//! Images: the built-in demo (busybox, a few MiB) and a generated directory image with
//! 1 GiB of incompressible content. Layouts: `overlay` (a link to the shared base and a
//! copy of an empty layer template) and `copy` (a sparse copy of the whole base), each on
//! its own daemon in the same run. Each machine is destroyed after it is measured.
//!
//! Run as root: `cargo bench --bench disks` (HEARTH_BENCH_RUNS sets the samples per
//! row, default 7). Reports p50 and p90 per row, then one line:
//! `disks: small_p50_ms=<x> large_p50_ms=<x> copy_large_p50_ms=<x> copy_small_p50_ms=<x>`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::path::Path;

use hearth::api::pb;
use hearth::client::Client;
use support::percentile;

/// Bytes of generated content in the large image.
const LARGE_BYTES: u64 = 1 << 30;
/// Size of each generated file.
const FILE_BYTES: u64 = 64 << 20;

/// A directory image: busybox as `/bin/sh` (so it is a plausible root) and
/// [`LARGE_BYTES`] of pseudo-random files, which neither compress nor turn into holes.
fn make_large_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).expect("bin");
    std::fs::create_dir_all(dir.join("data")).expect("data");
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox");
    std::os::unix::fs::symlink("busybox", dir.join("bin/sh")).expect("sh");
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for n in 0..LARGE_BYTES / FILE_BYTES {
        let mut file = std::fs::File::create(dir.join(format!("data/blob-{n:02}"))).expect("blob");
        for _ in 0..FILE_BYTES / block.len() as u64 {
            for chunk in block.chunks_exact_mut(8) {
                // xorshift64: fast, and never a zero block.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes());
            }
            file.write_all(&block).expect("write blob");
        }
    }
}

/// The `disk` step's acquire time (ms) of a new machine of `image`, which is destroyed
/// once the step is done.
async fn disk_ms(client: &mut Client, image: &str, n: usize) -> f64 {
    let request = pb::CreateMachineRequest {
        request_id: format!("disks-{n}"),
        name: format!("disks-{n}"),
        spec: Some(pb::MachineSpec {
            image: image.to_string(),
            vcpus: 1,
            memory_mib: 128,
            command: vec!["/bin/sh".into()],
            ..Default::default()
        }),
        start: None,
    };
    let created = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let ms = loop {
        let machine = support::get_machine(client, &created.id).await;
        let done = machine
            .timings
            .iter()
            .find(|t| t.step == "disk" && t.direction == "acquire" && t.outcome == "ok");
        if let Some(t) = done {
            break t.duration_us as f64 / 1000.0;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no disk step within 120 s: {machine:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    support::destroy(client, &created.id).await;
    ms
}

/// `runs` samples of the disk step for `image` (after one warm-up that builds the base).
async fn samples(client: &mut Client, image: &str, runs: usize, first: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for run in 0..=runs {
        let ms = disk_ms(client, image, first + run).await;
        if run > 0 {
            out.push(ms);
        }
    }
    out.sort_by(f64::total_cmp);
    out
}

fn main() {
    let runs: usize = std::env::var("HEARTH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let tree = tempfile::tempdir().expect("tree dir");
        let large = tree.path().join("large");
        let clock = std::time::Instant::now();
        make_large_tree(&large);
        println!(
            "generated {} MiB of content in {:.1} s",
            LARGE_BYTES >> 20,
            clock.elapsed().as_secs_f64()
        );
        let large = large.to_string_lossy().into_owned();

        let overlay = support::Daemon::start_with("");
        let mut client = overlay.client().await;
        let small = samples(&mut client, "demo", runs, 0).await;
        let large_overlay = samples(&mut client, &large, runs, 100).await;
        drop(client);
        drop(overlay);

        let copy = support::Daemon::start_with("[images]\ndisk_layout = \"copy\"\n");
        let mut client = copy.client().await;
        let copy_small = samples(&mut client, "demo", runs, 200).await;
        let copy_large = samples(&mut client, &large, runs, 300).await;
        drop(client);
        drop(copy);

        println!("disk step, {runs} runs per row (ms), data dir on the host's file system");
        println!("{:<34} {:>9} {:>9}", "image / layout", "p50", "p90");
        let rows = [
            ("demo (few MiB) / overlay", &small),
            ("1 GiB of content / overlay", &large_overlay),
            ("demo (few MiB) / copy", &copy_small),
            ("1 GiB of content / copy", &copy_large),
        ];
        for (name, s) in rows {
            println!(
                "{name:<34} {:>9.2} {:>9.2}",
                percentile(s, 0.5),
                percentile(s, 0.9)
            );
        }
        println!(
            "disks: small_p50_ms={:.2} large_p50_ms={:.2} copy_large_p50_ms={:.2} copy_small_p50_ms={:.2}",
            percentile(&small, 0.5),
            percentile(&large_overlay, 0.5),
            percentile(&copy_large, 0.5),
            percentile(&copy_small, 0.5),
        );
    });
}
