#!/usr/bin/env bash
# Installs what hearth needs on a fresh Debian 12 machine (run as root): the system
# packages it drives, the guest kernel, and a Rust toolchain check. Idempotent.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (hearthd manages network namespaces, taps and VMMs)" >&2
  exit 1
fi
packages=(e2fsprogs busybox-static docker-registry iproute2 nftables qemu-system-x86 xfsprogs python3-venv dnsutils etcd-server protobuf-compiler)
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
  # docker-registry is only for the OCI tests, which start their own on loopback; the
  # package's service would listen on :5000 on every interface. Stop it when we are the
  # ones who installed it.
  if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null; then
    systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
  fi
fi
# The group every VMM runs as (`vmm.group`); each VMM has its own uid from `vmm.uid_base`,
# which needs no account.
if ! getent group hearth-vmm >/dev/null; then
  groupadd --system hearth-vmm
fi
# The guest kernel: Debian's cloud kernel package, extracted (not installed).
bash "$(dirname "$0")/install-guest-kernel.sh"
if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo is missing; install a Rust toolchain (stable)" >&2
  exit 1
fi
# vhost-device-vsock (rust-vmm): a vhost-user vsock backend for QEMU that bridges guest
# vsock connections to host Unix sockets exactly as Firecracker's hybrid vsock does
# (`<uds_path>_<port>`). The tests use it to run the guest's vsock agent path on a real
# kernel where Firecracker itself cannot boot guests. Built from crates.io (~1 min).
if ! command -v vhost-device-vsock >/dev/null && [ ! -x /usr/local/bin/vhost-device-vsock ]; then
  cargo install vhost-device-vsock --version 0.3.0 --locked --root /usr/local
fi
# A control plane that is not Rust: Python's grpcio (gRPC's C core) and grpcio-tools from
# PyPI, in a venv of their own, for tests/python_client.rs (HEARTH_PY_VENV puts it
# elsewhere); and Prometheus's own Python client, whose exposition parser tests/metrics.rs
# reads the daemon's scrape with.
py_venv=${HEARTH_PY_VENV:-/opt/hearth/python}
if ! "$py_venv/bin/python" -c 'import grpc, grpc_tools, prometheus_client' >/dev/null 2>&1; then
  python3 -m venv "$py_venv"
  "$py_venv/bin/pip" install -q grpcio grpcio-tools prometheus-client
fi
