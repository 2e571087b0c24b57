//! Image layer unpacking on arbitrary blobs: the first byte picks the compression (none,
//! gzip, zstd), the rest is the layer. Each run unpacks onto a fresh root beside a
//! "host" directory. Nothing may panic; outside the root nothing changes; inside, the
//! tree stays within the entry and byte limits; an error's message stays bounded.
#![no_main]

use std::path::Path;

use hearth::image::{Compression, LayerBudget, LayerLimits, apply_layer_from};
use libfuzzer_sys::fuzz_target;

const MAX_BYTES: u64 = 1 << 20;
const MAX_ENTRIES: u64 = 64;

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Names under `dir` (never following a symlink) and the bytes of its regular files.
fn tree(dir: &Path, names: &mut u64, bytes: &mut u64) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in read.flatten() {
        *names += 1;
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if meta.is_dir() {
            tree(&entry.path(), names, bytes);
        } else if meta.is_file() {
            *bytes += meta.len();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, blob)) = data.split_first() else {
        return;
    };
    let compression = match mode % 3 {
        0 => Compression::None,
        1 => Compression::Gzip,
        _ => Compression::Zstd,
    };
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let (root, host) = (scratch.path().join("root"), scratch.path().join("host"));
    std::fs::create_dir(&root).expect("root");
    std::fs::create_dir(&host).expect("host");
    std::fs::write(host.join("victim"), "host file").expect("victim");
    let mut budget = LayerBudget::new(LayerLimits {
        max_bytes: MAX_BYTES,
        max_entries: MAX_ENTRIES,
    });
    let result = apply_layer_from(blob, "fuzz", compression, &root, &mut budget);
    if let Err(e) = &result {
        assert!(
            e.to_string().len() <= 16 * 1024,
            "an error of {} bytes",
            e.to_string().len()
        );
    }
    assert_eq!(listing(scratch.path()), ["host", "root"]);
    assert_eq!(listing(&host), ["victim"]);
    assert_eq!(
        std::fs::read_to_string(host.join("victim")).ok().as_deref(),
        Some("host file")
    );
    let (mut names, mut bytes) = (0, 0);
    tree(&root, &mut names, &mut bytes);
    assert!(
        budget.entries() <= MAX_ENTRIES && names <= MAX_ENTRIES,
        "{names} names"
    );
    assert!(bytes <= MAX_BYTES, "{bytes} bytes");
});
