#!/usr/bin/env bash
# Builds the guest init (`hearth-init`) as a static binary and places it where the daemon
# looks for it by default: `<target dir>/<profile>/hearth-init-static`, beside `hearthd`.
# With `hostile` (the test command), also builds the deliberately hostile init the
# hostile-guest tests boot (`<target dir>/<profile>/examples/hostile_guest-static`). The
# demo, the service and the benches do not ask for it: an example compiles every
# dev-dependency, minutes of a first build that only the tests use.
#
# Why static: it runs as PID 1 from the initramfs, where no dynamic loader or libc exists.
# Why `cargo rustc` with the flag after `--`: the flag then reaches only the final link of
# this one binary, so the dependency tree is not rebuilt for a second set of RUSTFLAGS.
# The libc crates' `#[link(cfg(target_feature = "crt-static"))]` attributes are evaluated
# at that link, so the result is fully static (checked below).
# Why a separate name: a later `cargo build`/`cargo test` relinks `hearth-init` dynamically
# in the same directory; the copy keeps the static one.
#
# Usage: deploy/build-guest-init.sh [release] [hostile]
# Respects CARGO_TARGET_DIR. Idempotent: rebuilding gives the same file.
set -euo pipefail

cd "$(dirname "$0")/.."

PROFILE=debug
ARGS=()
HOSTILE=no
for arg in "$@"; do
    case "$arg" in
        release) PROFILE=release; ARGS+=(--release) ;;
        hostile) HOSTILE=yes ;;
        *) echo "build-guest-init: unknown argument $arg (release, hostile)" >&2; exit 2 ;;
    esac
done
TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

# Checks that $1 is a static executable and copies it to $2.
install_static() {
    local bin="$1" out="$2" desc ldd_out
    # A static executable has no program interpreter (PT_INTERP); `file` says so in words.
    desc="$(file -b "$bin")"
    case "$desc" in
        *"dynamically linked"*|*"interpreter"*)
            echo "build-guest-init: $bin is not static: $desc" >&2
            exit 1
            ;;
    esac
    # ldd exits 0 on a static-pie too, so read what it says rather than its status.
    ldd_out="$(ldd "$bin" 2>&1 || true)"
    case "$ldd_out" in
        *"statically linked"*|*"not a dynamic executable"*) ;;
        *)
            echo "build-guest-init: ldd lists shared libraries for $bin: $ldd_out" >&2
            exit 1
            ;;
    esac
    cp "$bin" "$out.tmp"
    mv "$out.tmp" "$out"
    echo "build-guest-init: $out ($desc)"
}

cargo rustc --bin hearth-init "${ARGS[@]}" -- -C target-feature=+crt-static -C strip=symbols
install_static "$TARGET_DIR/$PROFILE/hearth-init" "$TARGET_DIR/$PROFILE/hearth-init-static"

# The hostile guest init of tests/hostile_guest.rs (examples/hostile_guest.rs), static for
# the same reason; the tests find it beside their own binaries' directory.
if [[ "$HOSTILE" == no ]]; then
    exit 0
fi
cargo rustc --example hostile_guest "${ARGS[@]}" -- -C target-feature=+crt-static -C strip=symbols
install_static "$TARGET_DIR/$PROFILE/examples/hostile_guest" \
    "$TARGET_DIR/$PROFILE/examples/hostile_guest-static"
