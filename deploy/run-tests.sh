#!/usr/bin/env bash
# Installs what is missing and runs every test (as root: the tests create network
# namespaces, links and taps, each with a test-unique prefix, and remove them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --lib --bins --tests -- --test-threads=2
