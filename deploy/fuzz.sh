#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets (fuzz/, cargo-fuzz over libFuzzer) for a while:
# the agent channel's line splitter and decoder, and image layer unpacking.
#
#   bash deploy/fuzz.sh [SECONDS_PER_TARGET]     (default 30; the test command runs 20)
#
# Needs a nightly toolchain and cargo-fuzz: installs them when missing (rustup and
# crates.io). When either cannot be had, says so, lists the fuzzers as skipped in
# $HEARTH_SKIP_LOG, and exits 0: the same decoders have property tests on stable
# (`cargo test --lib fuzz`, tests/image_fuzz.rs), which always run.
#
# Seeds are made here each run (a few valid agent lines; small tar layers with a
# directory, a file, a symlink, a hard link and a whiteout, plain, gzip and zstd); the
# corpus grows under target/fuzz-corpus/ and crashes land in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-30}"

skip() {
    echo "fuzz: SKIPPED: $1" >&2
    if [ -n "${HEARTH_SKIP_LOG:-}" ]; then
        echo "fuzz targets (deploy/fuzz.sh): $1" >> "$HEARTH_SKIP_LOG"
    fi
    exit 0
}

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal >/dev/null 2>&1 \
        || skip "no nightly toolchain, and rustup could not install one"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked >/dev/null 2>&1 \
        || skip "cargo-fuzz is not installed, and cargo install cargo-fuzz failed"
fi

CORPUS="$PWD/target/fuzz-corpus"
mkdir -p "$CORPUS/guest_lines" "$CORPUS/layer_unpack"

# Agent lines: the first byte is the chunk size the stream is read in.
printf '\x07{"type":"ready","boot_ms":812}\n{"type":"exited","status":{"code":7}}\n' \
    > "$CORPUS/guest_lines/seed-events"
printf '\x40{"type":"status","state":{"phase":"exited","boot_ms":null,"status":{"signal":9}}}\n{"type":"fatal","error":"x"}\n{"type":"shutting_down"}\n' \
    > "$CORPUS/guest_lines/seed-status"
printf '\x03{"type":"status"}\n{"type":"shutdown"}\n{"type":"claim","hostname":"h","command":["a"]}\n' \
    > "$CORPUS/guest_lines/seed-host"

# Layers: the first byte picks the compression (0 none, 1 gzip, 2 zstd).
SEEDS="$(mktemp -d)"
trap 'rm -rf "$SEEDS"' EXIT
mkdir -p "$SEEDS/tree/etc/sub" "$SEEDS/tree/bin"
echo hello > "$SEEDS/tree/etc/file"
ln -s ../etc/file "$SEEDS/tree/bin/link"
ln "$SEEDS/tree/etc/file" "$SEEDS/tree/etc/hard"
touch "$SEEDS/tree/etc/.wh.gone" "$SEEDS/tree/etc/sub/.wh..wh..opq"
tar -C "$SEEDS/tree" --owner=0 --group=0 -cf "$SEEDS/layer.tar" .
{ printf '\x00'; cat "$SEEDS/layer.tar"; } > "$CORPUS/layer_unpack/seed-plain"
{ printf '\x01'; gzip -c "$SEEDS/layer.tar"; } > "$CORPUS/layer_unpack/seed-gzip"
if command -v zstd >/dev/null; then
    { printf '\x02'; zstd -q -c "$SEEDS/layer.tar"; } > "$CORPUS/layer_unpack/seed-zstd"
fi

# Release with debug assertions (cargo-fuzz's default), no sanitizer: hearth's decoders
# are safe Rust, so what is sought is a panic, an assertion or a runaway allocation.
for target in guest_lines layer_unpack; do
    echo "fuzz: $target for ${SECS}s"
    log="$SEEDS/$target.log"
    status=0
    cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer none "$target" "$CORPUS/$target" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=262144 -print_final_stats=1 \
        > "$log" 2>&1 || status=$?
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -60 "$log" >&2
        echo "fuzz: $target FAILED (the input is in fuzz/artifacts/$target)" >&2
        exit 1
    fi
done
echo "fuzz: every target ran clean"
