//! Persistent tap devices. rtnetlink cannot create them (the kernel answers EOPNOTSUPP),
//! so this uses the TUNSETIFF and TUNSETPERSIST ioctls on /dev/net/tun. The device is
//! created in the namespace the calling thread was in when it opened /dev/net/tun, so
//! this runs on a worker thread that has entered the machine's namespace.
//!
//! Only called when the tap is missing: TUNSETIFF on an existing single-queue tap that a
//! VMM holds open fails with EBUSY, and the check is cheaper than the ioctl anyway.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates tap `name` in the calling thread's namespace and makes it persistent, so it
/// outlives the descriptor and waits, down, for the VMM to attach (QEMU's
/// `-netdev tap,ifname=<name>`).
///
/// Idempotent: on an existing detached tap of that name the ioctls attach and set
/// persistence again. Undo: deleting the namespace (or the link, by netlink).
pub(crate) fn create_persistent(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name {name:?} must be 1-15 bytes"),
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `request` is an initialised ifreq-sized struct that outlives the call, and
    // `tun` is an open /dev/net/tun descriptor.
    let rc = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETIFF as _,
            &mut request as *mut IfReq,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an integer by value.
    let rc = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETPERSIST as _,
            1 as libc::c_ulong,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
