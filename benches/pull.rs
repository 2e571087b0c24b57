//! Registry image throughput: pull (from Debian's `docker-registry` on loopback into a
//! fresh blob directory, digests checked) and unpack + base build (layers applied, diff
//! ids checked, mkfs), for a 256 MiB image in 4 gzip layers, half of its bytes
//! compressible text and half incompressible. Then the second use of the same image: a
//! pull that verifies every cached blob again, against one that sees the manifest's base
//! is built and skips the layers (what the daemon does).
//!
//! Run as root: `cargo bench --bench pull` (HEARTH_BENCH_RUNS, default 3). Without
//! `docker-registry` it says it is skipped.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use hearth::image::oci::{OciRef, pull, pull_unless_built};
use hearth::image::{BaseSettings, BaseStore};
use support::registry::{ConfigSpec, Entry, LayerSpec, build_image};

const MIB: usize = 1 << 20;

/// Compressible text.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let line = format!("line {seed}: the quick brown fox jumps over the lazy dog\n");
    line.as_bytes().iter().copied().cycle().take(len).collect()
}

fn main() {
    let Some(registry) = support::registry::start_or_skip("pull bench") else {
        println!("pull bench SKIPPED: no docker-registry");
        return;
    };
    let runs: usize = std::env::var("HEARTH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let layers: Vec<LayerSpec> = (0..4u64)
        .map(|l| LayerSpec {
            gzip: true,
            entries: std::iter::once(Entry::Dir(format!("layer{l}")))
                .chain((0..8u64).map(|f| {
                    let data = if f % 2 == 0 {
                        support::registry::pseudo_random(8 * MIB, l * 100 + f)
                    } else {
                        text(8 * MIB, l * 100 + f)
                    };
                    Entry::File(format!("layer{l}/file{f}"), 0o644, data)
                }))
                .collect(),
        })
        .collect();
    let image = build_image(&layers, &ConfigSpec::running(&["/bin/true"]));
    let compressed: usize = image.layers.iter().map(|b| b.data.len()).sum();
    let uncompressed = 4 * 8 * 8 * MIB;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(registry.push("bench", "v1", &image));
    let reference = OciRef::parse(&registry.reference("bench", "v1")).expect("reference");
    let settings = registry.settings();
    println!(
        "image: {} MiB in 4 gzip layers ({} MiB compressed), {runs} runs",
        uncompressed / MIB,
        compressed / MIB
    );
    println!(
        "{:<6} {:>12} {:>14} {:>16}",
        "run", "pull ms", "pull MB/s", "unpack+mkfs ms"
    );
    let mut kept = None;
    for run in 0..runs {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Instant::now();
        let pulled = runtime
            .block_on(pull(
                &reference,
                &settings,
                &dir.path().join("blobs"),
                &|_| {},
            ))
            .expect("pull");
        let pull_s = t.elapsed().as_secs_f64();
        let bases = BaseStore::open(&dir.path().join("images"), BaseSettings::default())
            .expect("base store");
        let t = Instant::now();
        let (_, built) = bases
            .ensure_oci_base("bench", &pulled, 1 << 40, &|_| {})
            .expect("base");
        assert!(built);
        let build_s = t.elapsed().as_secs_f64();
        println!(
            "{run:<6} {:>12.0} {:>14.0} {:>16.0}   (unpack+mkfs {:.0} MB/s of content)",
            pull_s * 1000.0,
            compressed as f64 / pull_s / 1e6,
            build_s * 1000.0,
            uncompressed as f64 / build_s / 1e6
        );
        kept = Some((dir, bases));
    }
    let Some((dir, bases)) = kept else { return };
    let blobs = dir.path().join("blobs");
    let mut verify_ms = Vec::new();
    let mut skip_ms = Vec::new();
    for _ in 0..runs.max(5) {
        let t = Instant::now();
        let again = runtime
            .block_on(pull(&reference, &settings, &blobs, &|_| {}))
            .expect("pull again");
        verify_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(again.stats.blobs_downloaded, 0);
        let t = Instant::now();
        let skipped = runtime
            .block_on(pull_unless_built(
                &reference,
                &settings,
                &blobs,
                &|_| {},
                &|manifest: &str| bases.has_oci_base(manifest),
            ))
            .expect("pull skipping layers");
        skip_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(!skipped.layers_verified);
    }
    let p50 = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "second use, blobs cached: verify every layer p50 {:.1} ms; base built, layers skipped p50 {:.1} ms",
        p50(&mut verify_ms),
        p50(&mut skip_ms)
    );
}
