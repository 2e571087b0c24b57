#!/usr/bin/env bash
# The main job: install what is missing, build, start hearthd on the embedded defaults
# (plus a scratch data dir), create the demo machine, print its run with per-step timings
# and the guest's answer to an HTTP request. Stops the daemon and destroys the machine at
# the end. Exits non-zero, saying why, when any of that fails.
#
# The scratch directory comes from `mktemp -d` (private, 0700): VMMs reach their machine
# directory through their working directory, never through its parents, so a data dir
# anywhere works.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
# The dev profile: the build the tests use too, so the test command after this one
# compiles no dependency again (a release build, for a real install, is what
# deploy/install-service.sh makes). hearth's own steps run unoptimised here: the timings
# below are a debug build's; benches/ measure release builds.
cargo build --bins
bash deploy/build-guest-init.sh
work=$(mktemp -d "${TMPDIR:-/tmp}/hearth-demo.XXXXXX")
sock="$work/hearthd.sock"
cat > "$work/hearthd.toml" <<TOML
data_dir = "$work/data"
cache_dir = "/var/cache/hearth"
[api]
socket = "$sock"
TOML
fail() {
  echo "run-demo: $*" >&2
  exit 1
}
./target/debug/hearthd --config "$work/hearthd.toml" &
daemon=$!
id=""
cleanup() {
  if [ -n "$id" ] && [ -S "$sock" ]; then
    ./target/debug/hearth --socket "$sock" machine destroy "$id" >/dev/null 2>&1 || true
    ./target/debug/hearth --socket "$sock" machine wait "$id" destroyed --timeout 60 \
      >/dev/null 2>&1 || true
  fi
  kill "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do
  [ -S "$sock" ] && break
  kill -0 "$daemon" 2>/dev/null || fail "hearthd did not start (its error is above)"
  sleep 0.1
done
[ -S "$sock" ] || fail "hearthd did not open $sock within 10 s"
cli() { ./target/debug/hearth --socket "$sock" "$@"; }
id=$(cli --json machine create --name demo --image demo --port 80 |
  sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
[ -n "$id" ] || fail "the demo machine was not created (the error is above)"
echo "created machine $id"
if ! cli machine wait "$id" started --timeout 120; then
  echo "run-demo: the demo machine did not start:" >&2
  cli machine get "$id" >&2 || true
  exit 1
fi
cli machine get "$id"
ip=$(cli --json machine get "$id" | sed -n 's/.*"guest_ip":"\([0-9.]*\)".*/\1/p')
[ -n "$ip" ] || fail "the demo machine has no guest address"
# One HTTP request to the guest, bounded in time; its last line is the page's body.
answer=$(timeout 20 bash -c '
  exec 3<>"/dev/tcp/$1/80" || exit 1
  printf "GET / HTTP/1.0\r\n\r\n" >&3
  tail -n 1 <&3
' _ "$ip" 2>/dev/null) || fail "the guest at $ip did not answer on port 80"
[ -n "$answer" ] || fail "the guest at $ip answered with nothing"
echo "the guest at $ip answers: $answer"
cli machine destroy "$id" >/dev/null
cli machine wait "$id" destroyed --timeout 60 >/dev/null
echo "destroyed machine $id"
id=""
