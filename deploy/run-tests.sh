#!/usr/bin/env bash
# Installs what is missing and runs every test (as root: the tests create network
# namespaces, links and taps, each with a test-unique prefix, and remove them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The guest init must be static; the tests' daemons find it beside hearthd.
bash deploy/build-guest-init.sh
cargo test --lib --bins --tests -- --test-threads=2
