#!/usr/bin/env bash
# The main job: install what is missing, build, start hearthd on the embedded defaults
# (plus a scratch data dir), create the demo machine and print its run with per-step
# timings. Stops the daemon and destroys the machine at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo build --release --bins
bash deploy/build-guest-init.sh release
work=$(mktemp -d /tmp/hearth-demo.XXXXXX)
sock="$work/hearthd.sock"
cat > "$work/hearthd.toml" <<TOML
data_dir = "$work/data"
cache_dir = "/var/cache/hearth"
[api]
socket = "$sock"
TOML
./target/release/hearthd --config "$work/hearthd.toml" &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
cli() { ./target/release/hearth --socket "$sock" "$@"; }
id=$(cli --json machine create --name demo --image demo --port 80 | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
echo "created machine $id"
cli machine wait "$id" started --timeout 120 || true
cli machine get "$id"
ip=$(cli --json machine get "$id" | sed -n 's/.*"guest_ip":"\([0-9.]*\)".*/\1/p')
exec 3<>"/dev/tcp/$ip/80"
printf 'GET / HTTP/1.0\r\n\r\n' >&3
echo "the guest at $ip answers: $(tail -n 1 <&3)"
exec 3<&-
cli machine destroy "$id" >/dev/null
cli machine wait "$id" destroyed --timeout 60 >/dev/null
echo "destroyed machine $id"
