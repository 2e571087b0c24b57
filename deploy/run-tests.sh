#!/usr/bin/env bash
# Installs what is missing and runs every test (as root: the tests create network
# namespaces, links and taps, each with a test-unique prefix, and remove them).
set -euo pipefail
cd "$(dirname "$0")/.."
# Each phase's wall time, printed as it ends and listed again at the end.
timings=""
phase() {
  local name="$1" start=$SECONDS
  shift
  "$@"
  local took=$((SECONDS - start))
  echo "run-tests: $name took ${took} s"
  timings="$timings  $name: ${took} s"$'\n'
}
trap 'printf "run-tests: phase times (%s s in all):\n%s" "$SECONDS" "$timings"' EXIT
phase deps bash deploy/install-deps.sh
phase fmt cargo fmt --all -- --check
phase fmt-fuzz cargo fmt --manifest-path fuzz/Cargo.toml -- --check
phase clippy cargo clippy --all-targets -- -D warnings
phase clippy-failpoints cargo clippy --all-targets --features failpoints -- -D warnings
# The guest init must be static; the tests' daemons find it beside hearthd (and the
# hostile-guest tests their init beside their binaries).
phase guest-init bash deploy/build-guest-init.sh hostile
host_state() {
  # What the suite must leave as it found it: namespaces, links, nftables tables, hearth's
  # cgroups, VMM processes.
  echo "netns: $(ls /run/netns 2>/dev/null | sort | tr '\n' ' ')"
  echo "links: $(ls /sys/class/net | sort | tr '\n' ' ')"
  echo "nft: $(nft list tables 2>/dev/null | sort | tr '\n' ' ')"
  echo "cgroups: $(ls -d /sys/fs/cgroup/*/hearth_* /sys/fs/cgroup/hearth_* 2>/dev/null | sort | tr '\n' ' ')"
  echo "vmms: $(pgrep -c -f 'qemu-system|--api-sock|vhost-device-vsock' || true)"
}
before=$(host_state)
# Tests that cannot run here write why to this file; the summary at the end lists them.
HEARTH_SKIP_LOG="$(mktemp)"
export HEARTH_SKIP_LOG
skip_summary() {
  echo "run-tests: skipped tests:"
  if [ -s "$HEARTH_SKIP_LOG" ]; then
    sort -u "$HEARTH_SKIP_LOG" | sed 's/^/  - /'
  else
    echo "  none"
  fi
}
phase tests cargo test --lib --bins --tests -- --test-threads=2
# The chaos harness needs the fail points compiled in (a separate build of the daemon).
phase chaos cargo test --features failpoints --test chaos -- --nocapture
# Coverage-guided fuzzing of the decoders that take untrusted bytes (nightly and
# cargo-fuzz; listed as skipped, with the reason, when they cannot be had): 20 s a target.
phase fuzz bash deploy/fuzz.sh 20
# Firecracker: its tests and chaos cases need a binary (HEARTH_FIRECRACKER); no registry
# here packages one, so without it they report themselves skipped.
if [ -n "${HEARTH_FIRECRACKER:-}" ]; then
  cargo test --test firecracker -- --nocapture --test-threads=1
  CHAOS_VMM=firecracker cargo test --features failpoints --test chaos every_fail_point -- --nocapture
else
  echo "run-tests: Firecracker tests SKIPPED: HEARTH_FIRECRACKER is not set"
  echo "tests/firecracker.rs and the Firecracker chaos cases: HEARTH_FIRECRACKER is not set (no registry here packages a Firecracker binary)" >> "$HEARTH_SKIP_LOG"
fi
# What the suite left that was not there before it: one "kind:item" per line. (Stale
# objects of an earlier run that the suite's sweeps removed are not the suite's doing.)
items() { awk '{ for (i = 2; i <= NF; i++) print $1 $i }' | sort -u; }
left_behind() { comm -13 <(echo "$before" | items) <(host_state | items); }
# A VMM killed at the end of the last test may take a moment to go away.
for _ in $(seq 150); do
  [ -z "$(left_behind)" ] && break
  sleep 0.1
done
if [ -n "$(left_behind)" ]; then
  pgrep -af 'qemu-system|--api-sock|vhost-device-vsock' >&2 || true
  echo "run-tests: the suite left host resources behind:" >&2
  left_behind >&2
  skip_summary
  exit 1
fi
echo "run-tests: the host is as the suite found it"
skip_summary
