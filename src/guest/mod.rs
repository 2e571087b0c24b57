//! What the host knows about the guest: the guest kit (kernel + initramfs), the config the
//! guest init reads at boot, and the host<->guest agent protocol.
