#!/usr/bin/env bash
# Installs the guest kernel hearth boots its machines with: Debian's cloud kernel package,
# extracted (not installed) into one directory.
#
# Why extract instead of install: installing the package changes /boot and runs
# update-initramfs (slow, and the host's boot setup is none of our business). The daemon
# only needs the compressed kernel image and the module tree, which `dpkg-deb -x` gives.
#
# Usage (as root, after `apt-get update`):
#   deploy/install-guest-kernel.sh
# Environment:
#   HEARTH_KERNEL_DIR   where to extract (default /usr/local/lib/hearth/kernel)
#
# Idempotent: when the kernel the metapackage points to is already extracted there, it
# does nothing. Otherwise the new tree is extracted beside the target and swapped in with
# renames, so an interrupted run leaves either the old tree or the new one, never a mix.
set -euo pipefail

META=linux-image-cloud-amd64
DEST="${HEARTH_KERNEL_DIR:-/usr/local/lib/hearth/kernel}"

# The metapackage depends on exactly one versioned image package,
# e.g. linux-image-6.1.0-56-cloud-amd64.
PKG="$(apt-cache depends "$META" 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }')"
if [[ -z "$PKG" ]]; then
    echo "install-guest-kernel: cannot resolve $META to a linux-image-<version>-cloud-amd64 package (run apt-get update first?)" >&2
    exit 1
fi
KVER="${PKG#linux-image-}"

if [[ -f "$DEST/boot/vmlinuz-$KVER" && -d "$DEST/lib/modules/$KVER" ]]; then
    echo "install-guest-kernel: $PKG already extracted in $DEST"
    exit 0
fi

PARENT="$(dirname "$DEST")"
mkdir -p "$PARENT"
WORK="$(mktemp -d "$PARENT/.kernel-install.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# apt-get download writes into the current directory; it runs as the _apt user when it
# can, so the directory must be writable by it.
chmod 0755 "$WORK"
mkdir "$WORK/dl"
chown _apt "$WORK/dl" 2>/dev/null || true
(cd "$WORK/dl" && apt-get download -q "$PKG")
DEB="$(find "$WORK/dl" -maxdepth 1 -name "${PKG}_*.deb" -print -quit)"
if [[ -z "$DEB" ]]; then
    echo "install-guest-kernel: apt-get download $PKG produced no .deb" >&2
    exit 1
fi

mkdir "$WORK/tree"
dpkg-deb -x "$DEB" "$WORK/tree"
if [[ ! -f "$WORK/tree/boot/vmlinuz-$KVER" ]]; then
    echo "install-guest-kernel: $DEB holds no boot/vmlinuz-$KVER" >&2
    exit 1
fi
chmod 0755 "$WORK/tree"

# Swap: the old tree (if any) is moved aside, the new one renamed into place.
if [[ -e "$DEST" ]]; then
    mv "$DEST" "$WORK/old"
fi
mv "$WORK/tree" "$DEST"
echo "install-guest-kernel: extracted $PKG into $DEST"
