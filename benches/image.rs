//! Per-machine disks from a cached base: clone time of a 1 GiB base by reflink (on a
//! loop-mounted XFS the benchmark makes) and by sparse copy (on the data directory's file
//! system, ext4 here), and with a grow to 1.5 GiB (resize2fs).
//!
//! Run as root: `cargo bench --bench image` (HEARTH_BENCH_RUNS, default 15).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Instant;

use hearth::image::{BaseSettings, BaseStore, CloneMethod, ImageRef, clone_disk, remove_disk};
use support::host_tools::LoopXfs;

const MIB: u64 = 1 << 20;

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples.get(i).copied().unwrap_or(f64::NAN)
}

/// Clones the 1 GiB demo base under `root` `runs` times; returns the method and the
/// times in ms, without and with a grow by 512 MiB.
fn clones(root: &Path, runs: usize) -> (CloneMethod, Vec<f64>, Vec<f64>) {
    let bases = BaseStore::open(
        &root.join("images"),
        BaseSettings {
            headroom_mib: 1000,
            ..BaseSettings::default()
        },
    )
    .expect("base store");
    let base = bases.ensure_base(&ImageRef::Demo).expect("demo base");
    assert!(base.size_bytes >= 1000 * MIB);
    let (mut plain, mut grown) = (Vec::new(), Vec::new());
    let mut method = CloneMethod::SparseCopy;
    for run in 0..runs {
        let disk = root.join(format!("disk-{run}.ext4"));
        let t = Instant::now();
        method = clone_disk(&base.path, &disk, None).expect("clone");
        plain.push(t.elapsed().as_secs_f64() * 1000.0);
        remove_disk(&disk).expect("remove");
        let t = Instant::now();
        clone_disk(&base.path, &disk, Some(base.size_bytes + 512 * MIB)).expect("clone+grow");
        grown.push(t.elapsed().as_secs_f64() * 1000.0);
        remove_disk(&disk).expect("remove");
    }
    (method, plain, grown)
}

fn main() {
    let runs: usize = std::env::var("HEARTH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    println!("per-machine disk from a 1 GiB base, {runs} runs (ms):");
    println!(
        "{:<28} {:>8} {:>8} {:>10} {:>10}",
        "where", "p50", "p90", "grow p50", "grow p90"
    );
    let data = tempfile::tempdir().expect("tempdir");
    let mut rows = vec![("data dir (ext4)", clones(data.path(), runs))];
    if rustix::process::geteuid().is_root() {
        let xfs = LoopXfs::new(3 << 30);
        rows.push(("loop-mounted XFS", clones(&xfs.mount_point(), runs)));
    } else {
        println!("(not root: no loop-mounted XFS, reflink not measured)");
    }
    for (place, (method, mut plain, mut grown)) in rows {
        println!(
            "{:<28} {:>8.2} {:>8.2} {:>10.1} {:>10.1}",
            format!("{place}, {method:?}"),
            percentile(&mut plain, 0.5),
            percentile(&mut plain, 0.9),
            percentile(&mut grown, 0.5),
            percentile(&mut grown, 0.9),
        );
    }
}
