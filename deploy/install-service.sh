#!/usr/bin/env bash
# Installs hearthd as a systemd service (run as root, from a clone): builds the release
# binaries and the static guest init, copies them to /usr/local/bin, puts
# deploy/hearthd.toml at /etc/hearth/hearthd.toml unless one is there, and installs,
# enables and starts deploy/hearthd.service. Idempotent: run it again after an update
# (the restart leaves running machines alone; the new daemon re-adopts them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo build --release --bins
bash deploy/build-guest-init.sh release
install -m 0755 target/release/hearthd target/release/hearth /usr/local/bin/
# hearthd finds the guest init beside itself.
install -m 0755 target/release/hearth-init-static /usr/local/bin/
install -d -m 0755 /etc/hearth
if [ ! -e /etc/hearth/hearthd.toml ]; then
  install -m 0644 deploy/hearthd.toml /etc/hearth/hearthd.toml
fi
install -m 0644 deploy/hearthd.service /etc/systemd/system/hearthd.service
if [ "$(systemctl is-system-running 2>/dev/null || true)" = "offline" ]; then
  echo "install-service: systemd is not running here; the unit is installed, not started"
  exit 0
fi
systemctl daemon-reload
systemctl enable hearthd.service
systemctl restart hearthd.service
systemctl --no-pager status hearthd.service | head -5
