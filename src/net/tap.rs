//! Persistent tap devices. rtnetlink cannot create them (the kernel answers EOPNOTSUPP), so
//! this uses the TUNSETIFF and TUNSETPERSIST ioctls on /dev/net/tun, from a thread inside
//! the target namespace.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates (or re-attaches to) tap `name` in the calling thread's namespace and makes it
/// persistent. Idempotent: an existing tap of that name is kept. Undo: deleting the
/// namespace (or the link by netlink).
pub fn ensure_persistent(name: &str) -> io::Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name {name:?} is too long"),
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a valid, fully initialised ifreq-sized struct that outlives the
    // call, and `tun` is an open /dev/net/tun descriptor.
    let rc = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETIFF as _,
            &mut req as *mut IfReq,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
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
