//! Root filesystem images: sources, ext4 bases cached by content hash, per-machine disks.
