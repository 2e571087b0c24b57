#!/usr/bin/env bash
# Installs what hearth needs on a fresh Debian 12 machine (run as root): the system
# packages it drives, the guest kernel, and a Rust toolchain check. Idempotent.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (hearthd manages network namespaces, taps and VMMs)" >&2
  exit 1
fi
packages=(e2fsprogs busybox-static iproute2 nftables qemu-system-x86 xfsprogs)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
kernel_dir=${HEARTH_KERNEL_DIR:-/usr/local/lib/hearth/kernel}
if [ ${#missing[@]} -gt 0 ] || ! compgen -G "$kernel_dir/boot/vmlinuz-*" >/dev/null; then
  apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The guest kernel: Debian's cloud kernel package, extracted (not installed).
bash "$(dirname "$0")/install-guest-kernel.sh"
if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo is missing; install a Rust toolchain (stable)" >&2
  exit 1
fi
