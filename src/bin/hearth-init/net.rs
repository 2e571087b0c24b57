//! The guest's network: loopback up, and the one virtio-net interface with the static
//! address and default route from the config.
//!
//! Why ioctls: the classic `SIOCSIF*` / `SIOCADDRT` calls need no netlink code and no
//! external `ip` binary (the root image may have none). They cover exactly what a single
//! static IPv4 interface needs.

use std::ffi::CString;
use std::fs;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use std::path::Path;

use hearth::guest::config::{GuestNetwork, GuestResolver};
use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// Why the network could not be configured; each names the interface and the call.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no network interface appeared (only loopback); is a virtio-net device attached?")]
    NoInterface,
    #[error("interface {iface}: {call}: {source}")]
    Ioctl {
        iface: String,
        call: &'static str,
        source: Errno,
    },
    #[error("prefix length {0} is not 0..=32")]
    BadPrefix(u8),
    #[error("control socket: {0}")]
    Socket(Errno),
    #[error("{path}: {source}")]
    Resolver {
        path: String,
        source: std::io::Error,
    },
}

/// Brings loopback up and, when `net` is given, configures the first non-loopback
/// interface: address, netmask, up, default route via the gateway.
pub fn configure(net: Option<&GuestNetwork>, deadline: Instant) -> Result<(), NetError> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(NetError::Socket)?;
    set_up(&sock, "lo")?;
    let Some(net) = net else {
        return Ok(());
    };
    if net.prefix_len > 32 {
        return Err(NetError::BadPrefix(net.prefix_len));
    }
    let iface = wait_for_interface(deadline)?;
    let mask = if net.prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(net.prefix_len))
    };
    set_addr(&sock, &iface, libc::SIOCSIFADDR, "SIOCSIFADDR", net.address)?;
    set_addr(
        &sock,
        &iface,
        libc::SIOCSIFNETMASK,
        "SIOCSIFNETMASK",
        Ipv4Addr::from(mask),
    )?;
    set_up(&sock, &iface)?;
    add_default_route(&sock, &iface, net.gateway)?;
    match &net.resolver {
        Some(resolver) => write_resolver(Path::new("/etc"), resolver),
        None => Ok(()),
    }
}

/// The resolv.conf that sends every question to `resolver` and tries short names in its
/// domain first.
fn resolv_conf(resolver: &GuestResolver) -> String {
    format!(
        "# The machine's resolver, written at boot from its network config.\n\
         nameserver {}\nsearch {}\noptions ndots:1 timeout:2 attempts:2\n",
        resolver.nameserver, resolver.search
    )
}

/// Replaces `<etc>/resolv.conf` whole (a symlink there, as images made for a local stub
/// resolver have, is replaced rather than followed), creating `<etc>` when the image has
/// none. Idempotent: the same file every boot.
fn write_resolver(etc: &Path, resolver: &GuestResolver) -> Result<(), NetError> {
    let fail = |path: &Path| {
        let path = path.display().to_string();
        move |source| NetError::Resolver { path, source }
    };
    fs::create_dir_all(etc).map_err(fail(etc))?;
    let temp = etc.join(".resolv.conf.new");
    let target = etc.join("resolv.conf");
    fs::write(&temp, resolv_conf(resolver)).map_err(fail(&temp))?;
    fs::rename(&temp, &target).map_err(fail(&target))
}

/// The first interface other than loopback, waiting for the driver to register it.
fn wait_for_interface(deadline: Instant) -> Result<String, NetError> {
    loop {
        let mut names: Vec<String> = fs::read_dir("/sys/class/net")
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n != "lo")
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        if let Some(first) = names.into_iter().next() {
            return Ok(first);
        }
        if Instant::now() >= deadline {
            return Err(NetError::NoInterface);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn ifreq(iface: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(iface.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr is the
    // generic view the ioctls expect.
    unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl_err<'a>(iface: &'a str, call: &'static str) -> impl FnOnce(Errno) -> NetError + 'a {
    move |source| NetError::Ioctl {
        iface: iface.to_string(),
        call,
        source,
    }
}

fn set_addr(
    sock: &OwnedFd,
    iface: &str,
    request: libc::Ioctl,
    call: &'static str,
    addr: Ipv4Addr,
) -> Result<(), NetError> {
    let mut req = ifreq(iface);
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    // SAFETY: the request takes a pointer to an ifreq that lives across the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut req) };
    Errno::result(r).map(drop).map_err(ioctl_err(iface, call))
}

fn set_up(sock: &OwnedFd, iface: &str) -> Result<(), NetError> {
    let mut req = ifreq(iface);
    // SAFETY: as above; SIOCGIFFLAGS fills ifru_flags, SIOCSIFFLAGS reads it.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    Errno::result(r).map_err(ioctl_err(iface, "SIOCGIFFLAGS"))?;
    // SAFETY: the kernel just wrote ifru_flags.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) };
    Errno::result(r)
        .map(drop)
        .map_err(ioctl_err(iface, "SIOCSIFFLAGS"))
}

fn add_default_route(sock: &OwnedFd, iface: &str, gateway: Ipv4Addr) -> Result<(), NetError> {
    let mut dev = CString::new(iface)
        .unwrap_or_default()
        .into_bytes_with_nul();
    // SAFETY: rtentry is plain old data; all zeroes is a valid value.
    let mut rt: libc::rtentry = unsafe { mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev.as_mut_ptr().cast();
    // SAFETY: rt and the device name it points to live across the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &mut rt) };
    match Errno::result(r) {
        // Already there (a rerun): fine.
        Ok(_) | Err(Errno::EEXIST) => Ok(()),
        Err(source) => Err(NetError::Ioctl {
            iface: iface.to_string(),
            call: "SIOCADDRT",
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver() -> GuestResolver {
        GuestResolver {
            nameserver: Ipv4Addr::new(10, 216, 3, 249),
            search: "hearth.internal".into(),
        }
    }

    #[test]
    fn the_resolver_replaces_a_symlink_and_makes_etc() {
        let dir = tempfile::tempdir().expect("tempdir");
        // An image without /etc gets one.
        let etc = dir.path().join("bare/etc");
        write_resolver(&etc, &resolver()).expect("write");
        let text = fs::read_to_string(etc.join("resolv.conf")).expect("read");
        assert!(text.contains("\nnameserver 10.216.3.249\n"), "{text}");
        assert!(text.contains("\nsearch hearth.internal\n"), "{text}");

        // A symlink to a stub resolver's file is replaced, and its target left alone.
        let etc = dir.path().join("stub/etc");
        fs::create_dir_all(&etc).expect("etc");
        let target = dir.path().join("stub-resolv.conf");
        fs::write(&target, "nameserver 127.0.0.53\n").expect("target");
        std::os::unix::fs::symlink(&target, etc.join("resolv.conf")).expect("symlink");
        write_resolver(&etc, &resolver()).expect("write over a symlink");
        let meta = fs::symlink_metadata(etc.join("resolv.conf")).expect("meta");
        assert!(meta.file_type().is_file());
        assert_eq!(
            fs::read_to_string(&target).expect("target"),
            "nameserver 127.0.0.53\n"
        );
        // And a second boot writes the same file.
        write_resolver(&etc, &resolver()).expect("again");
        assert_eq!(
            fs::read_to_string(etc.join("resolv.conf")).expect("read"),
            resolv_conf(&resolver())
        );
        assert!(!etc.join(".resolv.conf.new").exists());
    }
}
