#!/usr/bin/env bash
# Extracts Debian's cloud kernel package (kernel + modules) for hearth's guests into
# ${HEARTH_KERNEL_DIR:-/usr/local/lib/hearth/kernel}. No /boot changes, no initramfs
# tools: hearthd builds its own initramfs. Idempotent: does nothing when already there.
set -euo pipefail
dest=${HEARTH_KERNEL_DIR:-/usr/local/lib/hearth/kernel}
if compgen -G "$dest/boot/vmlinuz-*" >/dev/null; then
  exit 0
fi
# The metapackage depends on the versioned image package; resolve it.
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  echo "install-guest-kernel: cannot resolve linux-image-cloud-amd64 (run apt-get update first)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$pkg" >/dev/null)
mkdir -p "$dest.tmp"
dpkg-deb -x "$work"/*.deb "$dest.tmp"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "install-guest-kernel: $pkg extracted to $dest"
