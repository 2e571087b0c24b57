#!/usr/bin/env bash
# Builds the guest init (`hearth-init`) as a static binary and places it where the daemon
# looks for it by default: `<target dir>/<profile>/hearth-init-static`, beside `hearthd`.
#
# Why static: it runs as PID 1 from the initramfs, where no dynamic loader or libc exists.
# Why `cargo rustc` with the flag after `--`: the flag then reaches only the final link of
# this one binary, so the dependency tree is not rebuilt for a second set of RUSTFLAGS.
# The libc crates' `#[link(cfg(target_feature = "crt-static"))]` attributes are evaluated
# at that link, so the result is fully static (checked below).
# Why a separate name: a later `cargo build`/`cargo test` relinks `hearth-init` dynamically
# in the same directory; the copy keeps the static one.
#
# Usage: deploy/build-guest-init.sh [release]
# Respects CARGO_TARGET_DIR. Idempotent: rebuilding gives the same file.
set -euo pipefail

cd "$(dirname "$0")/.."

PROFILE=debug
ARGS=()
if [[ "${1:-}" == "release" ]]; then
    PROFILE=release
    ARGS+=(--release)
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

cargo rustc --bin hearth-init "${ARGS[@]}" -- -C target-feature=+crt-static -C strip=symbols

BIN="$TARGET_DIR/$PROFILE/hearth-init"
OUT="$TARGET_DIR/$PROFILE/hearth-init-static"

# A static executable has no program interpreter (PT_INTERP); `file` says so in words.
DESC="$(file -b "$BIN")"
case "$DESC" in
    *"dynamically linked"*|*"interpreter"*)
        echo "build-guest-init: $BIN is not static: $DESC" >&2
        exit 1
        ;;
esac
# ldd exits 0 on a static-pie too, so read what it says rather than its status.
LDD="$(ldd "$BIN" 2>&1 || true)"
case "$LDD" in
    *"statically linked"*|*"not a dynamic executable"*) ;;
    *)
        echo "build-guest-init: ldd lists shared libraries for $BIN: $LDD" >&2
        exit 1
        ;;
esac

cp "$BIN" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "build-guest-init: $OUT ($DESC)"
