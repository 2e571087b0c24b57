//! Property-based fuzzing of layer unpacking: generated tar streams, valid-ish and hostile
//! (path traversal, absolute names, names and link targets of every length, symlinks to
//! the host, hard links to nothing, devices, whiteouts, sparse files and declared sizes
//! far beyond the data, floods of tiny entries), then mutated (bytes flipped, cut short,
//! garbage spliced in) and wrapped in gzip or zstd or not, applied one to three layers
//! deep onto one root with one budget through the real `apply_layer_from`.
//!
//! Each case must end in `Ok` or a `LayerError` (a panic fails the run), leave everything
//! outside the root as it was, keep the tree within the entry and byte limits, and give an
//! error message of bounded length.
//!
//! `HEARTH_FUZZ_CASES` sets the number of cases (default 500, 10-25 s on two cores in a
//! debug build); `HEARTH_FUZZ_CASES=100000 cargo test --release --test image_fuzz` for a
//! long run. A failure is printed with the case that caused it, shrunk by proptest.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hearth::image::{Compression, LayerBudget, LayerError, LayerLimits, apply_layer_from};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

/// Cases run when `HEARTH_FUZZ_CASES` is not set.
const DEFAULT_CASES: u32 = 500;

/// Longest error message accepted: entry names are quoted bounded, and paths on disk are
/// under a temporary directory.
const MAX_ERROR_MESSAGE: usize = 16 * 1024;

fn cases() -> u32 {
    std::env::var("HEARTH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// One generated tar entry. Paths are bytes: they may be anything a header can hold.
#[derive(Debug, Clone)]
enum Entry {
    File {
        path: Vec<u8>,
        data: Vec<u8>,
    },
    Dir {
        path: Vec<u8>,
    },
    Symlink {
        path: Vec<u8>,
        target: Vec<u8>,
    },
    HardLink {
        path: Vec<u8>,
        target: Vec<u8>,
    },
    Device {
        path: Vec<u8>,
        block: bool,
        major: u32,
        minor: u32,
    },
    Fifo {
        path: Vec<u8>,
    },
    /// A header declaring `declared` bytes followed by only `data`.
    Lying {
        path: Vec<u8>,
        declared: u64,
        data: Vec<u8>,
    },
    /// A GNU sparse file: `data` at `offset`, the file `real` bytes long.
    Sparse {
        path: Vec<u8>,
        offset: u64,
        real: u64,
        data: Vec<u8>,
    },
    /// A header of 512 random bytes.
    Garbage {
        block: Vec<u8>,
    },
}

/// What happens to the serialised layer before it is applied.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Truncate { at: usize },
    Splice { at: usize, bytes: Vec<u8> },
}

/// One layer of a case.
#[derive(Debug, Clone)]
struct LayerCase {
    entries: Vec<Entry>,
    mutations: Vec<Mutation>,
    compression: Compression,
    /// Instead of a tar: these bytes (compressed or not).
    random: Option<Vec<u8>>,
}

/// One case: its layers and the image's limits.
#[derive(Debug, Clone)]
struct Case {
    layers: Vec<LayerCase>,
    max_entries: u64,
    max_bytes: u64,
}

/// The marker replaced, when a case is run, by the absolute path of the directory that
/// stands for the host outside the root.
const HOST: &[u8] = b"@HOST@";

fn component() -> impl Strategy<Value = Vec<u8>> {
    let plain = |names: &[&'static str]| {
        prop::sample::select(names.to_vec()).prop_map(|s: &str| s.as_bytes().to_vec())
    };
    prop_oneof![
        20 => plain(&["a", "b", "c", "etc", "lib", "usr", "bin", "lost+found"]),
        4 => plain(&[".wh.a", ".wh.b", ".wh.etc", ".wh..wh..opq"]),
        2 => plain(&[".", ""]),
        1 => plain(&["..", ".wh..wh.plnk", ".wh.", ".wh.."]),
        1 => (1usize..300).prop_map(|n| vec![b'n'; n]),
        1 => prop::collection::vec(any::<u8>(), 1..8),
    ]
}

fn path() -> impl Strategy<Value = Vec<u8>> {
    let lead = prop_oneof![
        12 => Just(""),
        4 => Just("./"),
        1 => Just("/"),
        1 => Just("../"),
        1 => Just("//"),
    ];
    prop_oneof![
        30 => (lead, prop::collection::vec(component(), 1..5), any::<bool>()).prop_map(
            |(lead, parts, slash)| {
                let mut p = lead.as_bytes().to_vec();
                p.extend(parts.join(&b'/'));
                if slash {
                    p.push(b'/');
                }
                p
            }
        ),
        1 => (1usize..6000).prop_map(|n| b"d/".repeat(n / 2)),
        1 => Just(HOST.to_vec()),
    ]
}

fn link_target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => path(),
        2 => Just(HOST.to_vec()),
        1 => Just([HOST, b"/victim"].concat()),
        1 => Just(b"/".to_vec()),
        1 => (1usize..5000).prop_map(|n| b"../".repeat(n / 3)),
        1 => Just(Vec::new()),
    ]
}

fn small_data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..64),
        1 => (0usize..20_000).prop_map(|n| vec![b'z'; n]),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        24 => (path(), small_data()).prop_map(|(path, data)| Entry::File { path, data }),
        12 => path().prop_map(|path| Entry::Dir { path }),
        6 => (path(), link_target()).prop_map(|(path, target)| Entry::Symlink { path, target }),
        4 => (path(), link_target()).prop_map(|(path, target)| Entry::HardLink { path, target }),
        2 => (path(), any::<bool>(), 0u32..300, 0u32..300)
            .prop_map(|(path, block, major, minor)| Entry::Device { path, block, major, minor }),
        2 => path().prop_map(|path| Entry::Fifo { path }),
        1 => (path(), prop_oneof![Just(u64::MAX >> 1), 1u64..(1 << 40)], small_data())
            .prop_map(|(path, declared, data)| Entry::Lying { path, declared, data }),
        1 => (path(), 0u64..(1 << 36), 0u64..(1 << 40), small_data())
            .prop_map(|(path, offset, real, data)| Entry::Sparse { path, offset, real, data }),
        1 => prop::collection::vec(any::<u8>(), 512).prop_map(|block| Entry::Garbage { block }),
    ]
}

fn compression() -> impl Strategy<Value = Compression> {
    prop::sample::select(vec![
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
    ])
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), 1u8..=255).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..600))
            .prop_map(|(at, bytes)| Mutation::Splice { at, bytes }),
    ]
}

fn layer_case() -> impl Strategy<Value = LayerCase> {
    (
        prop::collection::vec(entry(), 0..16),
        prop_oneof![
            5 => Just(Vec::new()),
            1 => prop::collection::vec(mutation(), 1..4),
        ],
        compression(),
        prop_oneof![
            12 => Just(None),
            1 => prop::collection::vec(any::<u8>(), 0..4096).prop_map(Some),
        ],
    )
        .prop_map(|(entries, mutations, compression, random)| LayerCase {
            entries,
            mutations,
            compression,
            random,
        })
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(layer_case(), 1..4),
        prop_oneof![1u64..16, 16u64..200],
        prop_oneof![1 => 1u64..4096, 4 => Just(1u64 << 20)],
    )
        .prop_map(|(layers, max_entries, max_bytes)| Case {
            layers,
            max_entries,
            max_bytes,
        })
}

/// A flood of tiny files in one layer, against a limit below or above their number.
fn flood() -> impl Strategy<Value = Case> {
    (1usize..3000, 1u64..3000, compression()).prop_map(|(files, max_entries, compression)| {
        let entries = (0..files)
            .map(|i| Entry::File {
                path: format!("f/{}/{i}", i % 7).into_bytes(),
                data: vec![b'x'; i % 3],
            })
            .collect();
        Case {
            layers: vec![LayerCase {
                entries,
                mutations: Vec::new(),
                compression,
                random: None,
            }],
            max_entries,
            max_bytes: 1 << 24,
        }
    })
}

/// A header for `kind` with `name` and `link` (GNU long name and long link entries in
/// front when they do not fit), declaring `size` bytes.
fn header(out: &mut Vec<u8>, kind: tar::EntryType, name: &[u8], link: &[u8], size: u64) {
    for (long_kind, value) in [(b'L', name), (b'K', link)] {
        if value.len() <= 100 {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(long_kind));
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_mode(0o644);
        h.set_size(value.len() as u64 + 1);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        let mut data = value.to_vec();
        data.push(0);
        pad(&mut data);
        out.extend_from_slice(&data);
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    let old = h.as_old_mut();
    let n = name.len().min(100);
    old.name[..n].copy_from_slice(&name[..n]);
    let l = link.len().min(100);
    old.linkname[..l].copy_from_slice(&link[..l]);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
}

fn pad(data: &mut Vec<u8>) {
    let rem = data.len() % 512;
    if rem != 0 {
        data.resize(data.len() + 512 - rem, 0);
    }
}

fn host_path(bytes: &[u8], host: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let host = host.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some(at) = rest.windows(HOST.len()).position(|w| w == HOST) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(host);
        rest = &rest[at + HOST.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// The tar stream of `entries`, with `@HOST@` made the host directory's path.
fn serialise(entries: &[Entry], host: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let data_of = |out: &mut Vec<u8>, data: &[u8]| {
        let mut d = data.to_vec();
        pad(&mut d);
        out.extend_from_slice(&d);
    };
    for e in entries {
        match e {
            Entry::File { path, data } => {
                header(
                    &mut out,
                    tar::EntryType::Regular,
                    &host_path(path, host),
                    b"",
                    data.len() as u64,
                );
                data_of(&mut out, data);
            }
            Entry::Dir { path } => header(
                &mut out,
                tar::EntryType::Directory,
                &host_path(path, host),
                b"",
                0,
            ),
            Entry::Symlink { path, target } => header(
                &mut out,
                tar::EntryType::Symlink,
                &host_path(path, host),
                &host_path(target, host),
                0,
            ),
            Entry::HardLink { path, target } => header(
                &mut out,
                tar::EntryType::Link,
                &host_path(path, host),
                &host_path(target, host),
                0,
            ),
            Entry::Device {
                path,
                block,
                major,
                minor,
            } => {
                let kind = if *block {
                    tar::EntryType::Block
                } else {
                    tar::EntryType::Char
                };
                let start = out.len();
                header(&mut out, kind, &host_path(path, host), b"", 0);
                // Device numbers go into the last header written.
                let at = out.len() - 512;
                debug_assert!(at >= start);
                let mut h = tar::Header::new_gnu();
                h.as_mut_bytes().copy_from_slice(&out[at..]);
                let _ = h.set_device_major(*major);
                let _ = h.set_device_minor(*minor);
                h.set_cksum();
                out[at..].copy_from_slice(h.as_bytes());
            }
            Entry::Fifo { path } => header(
                &mut out,
                tar::EntryType::Fifo,
                &host_path(path, host),
                b"",
                0,
            ),
            Entry::Lying {
                path,
                declared,
                data,
            } => {
                header(
                    &mut out,
                    tar::EntryType::Regular,
                    &host_path(path, host),
                    b"",
                    *declared,
                );
                data_of(&mut out, data);
            }
            Entry::Sparse {
                path,
                offset,
                real,
                data,
            } => {
                header(
                    &mut out,
                    tar::EntryType::GNUSparse,
                    &host_path(path, host),
                    b"",
                    data.len() as u64,
                );
                let at = out.len() - 512;
                let mut h = tar::Header::new_gnu();
                h.as_mut_bytes().copy_from_slice(&out[at..]);
                if let Some(gnu) = h.as_gnu_mut() {
                    gnu.sparse[0].set_offset(*offset);
                    gnu.sparse[0].set_length(data.len() as u64);
                    gnu.set_real_size(*real);
                }
                h.set_cksum();
                out[at..].copy_from_slice(h.as_bytes());
                data_of(&mut out, data);
            }
            Entry::Garbage { block } => out.extend_from_slice(block),
        }
    }
    // End of archive.
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        match m {
            Mutation::Flip { at, xor } => {
                let at = at % bytes.len();
                bytes[at] ^= xor;
            }
            Mutation::Truncate { at } => bytes.truncate(at % bytes.len()),
            Mutation::Splice { at, bytes: garbage } => {
                let at = at % bytes.len();
                bytes.splice(at..at, garbage.iter().copied());
            }
        }
    }
    bytes
}

fn compress(bytes: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => bytes.to_vec(),
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = gz.write_all(bytes);
            gz.finish().unwrap_or_default()
        }
        Compression::Zstd => {
            ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
        }
    }
}

/// Every name under `dir`, never following a symlink, and the bytes of distinct regular
/// files (their length, holes included).
fn tree(dir: &Path) -> (u64, u64) {
    fn walk(dir: &Path, seen: &mut HashSet<(u64, u64)>, names: &mut u64, bytes: &mut u64) {
        let Ok(read) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in read.flatten() {
            *names += 1;
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                walk(&entry.path(), seen, names, bytes);
            } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
                *bytes += meta.len();
            }
        }
    }
    let (mut names, mut bytes) = (0, 0);
    walk(dir, &mut HashSet::new(), &mut names, &mut bytes);
    (names, bytes)
}

/// Names in `dir`, sorted.
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

/// How each applied layer ended, by kind, so a run shows the generator reaches past the
/// first header (the outcome kinds are printed at the end of a run).
type Outcomes = Mutex<BTreeMap<&'static str, u64>>;

fn outcome_kind(result: &Result<hearth::image::LayerStats, LayerError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(LayerError::Open { .. }) => "open",
        Err(LayerError::Read { .. }) => "read",
        Err(LayerError::Refused { .. }) => "refused",
        Err(LayerError::Unsupported { .. }) => "unsupported",
        Err(LayerError::Write { .. }) => "write",
        Err(LayerError::TooLarge { .. }) => "too large",
        Err(LayerError::TooManyEntries { .. }) => "too many entries",
    }
}

/// Runs one case on a fresh scratch directory and checks the properties.
fn run_case(case: &Case, outcomes: &Outcomes) -> Result<(), TestCaseError> {
    let scratch = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let root = scratch.path().join("root");
    let host = scratch.path().join("host");
    for d in [&root, &host] {
        std::fs::create_dir(d).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    std::fs::write(host.join("victim"), "host file")
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let limits = LayerLimits {
        max_bytes: case.max_bytes,
        max_entries: case.max_entries,
    };
    let mut budget = LayerBudget::new(limits);
    for (i, layer) in case.layers.iter().enumerate() {
        let blob = match &layer.random {
            Some(bytes) => bytes.clone(),
            None => {
                let tar = mutate(serialise(&layer.entries, &host), &layer.mutations);
                compress(&tar, layer.compression)
            }
        };
        let result = apply_layer_from(
            &blob[..],
            &format!("layer{i}"),
            layer.compression,
            &root,
            &mut budget,
        );
        if let Ok(mut tally) = outcomes.lock() {
            *tally.entry(outcome_kind(&result)).or_default() += 1;
        }
        if let Err(e) = &result {
            let message = e.to_string();
            prop_assert!(
                message.len() <= MAX_ERROR_MESSAGE,
                "error of {} bytes: {}…",
                message.len(),
                &message[..200.min(message.len())]
            );
            if matches!(e, LayerError::TooManyEntries { .. }) {
                prop_assert!(message.contains("images.max_entries"), "{message}");
            }
        }
        // Outside the root, nothing changed.
        prop_assert_eq!(
            listing(scratch.path()),
            vec!["host".to_string(), "root".to_string()]
        );
        prop_assert_eq!(listing(&host), vec!["victim".to_string()]);
        let victim = std::fs::read_to_string(host.join("victim")).ok();
        prop_assert_eq!(victim.as_deref(), Some("host file"));
        // Inside, within the limits, whatever the outcome.
        let (names, bytes) = tree(&root);
        prop_assert!(
            budget.entries() <= case.max_entries,
            "{} > {}",
            budget.entries(),
            case.max_entries
        );
        prop_assert!(
            names <= case.max_entries,
            "{names} names for a limit of {}",
            case.max_entries
        );
        prop_assert!(
            bytes <= case.max_bytes,
            "{bytes} bytes for a limit of {}",
            case.max_bytes
        );
        if result.is_err() {
            // The caller throws a failed image's root away; so does this case.
            break;
        }
    }
    Ok(())
}

fn run(name: &str, strategy: impl Strategy<Value = Case>, cases: u32) {
    let ran = AtomicU64::new(0);
    let passed = AtomicU64::new(0);
    let outcomes = Outcomes::default();
    let mut runner = TestRunner::new(Config {
        cases,
        // No regression file is written into the source tree; a failure prints its case.
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |case| {
        ran.fetch_add(1, Ordering::Relaxed);
        run_case(&case, &outcomes)?;
        passed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    eprintln!(
        "{name}: {} cases run (shrinking included), {} passed; layers ended: {:?}",
        ran.load(Ordering::Relaxed),
        passed.load(Ordering::Relaxed),
        outcomes.lock().map(|t| t.clone()).unwrap_or_default()
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => panic!("{name}: {why}\nminimal case: {case:#?}"),
        Err(TestError::Abort(why)) => panic!("{name}: aborted: {why}"),
    }
}

fn not_root_note() {
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "note: not running as root; owners and device nodes fail with typed write errors, which the properties still cover"
        );
    }
}

#[test]
fn hostile_layers_end_in_ok_or_a_typed_error_and_stay_inside() {
    not_root_note();
    run("hostile layers", case(), cases());
}

#[test]
fn floods_of_tiny_entries_stop_at_the_entry_limit() {
    not_root_note();
    run("floods", flood(), (cases() / 20).max(10));
}
