//! What a prepared guest does with a claim before it starts the workload: set the wall
//! clock, feed the host's entropy to the kernel's pool, take the machine's hostname.
//!
//! Why: a prepared guest booted long before its claim, may have been paused since, and
//! gathered its entropy while nothing happened; the workload must see the real time, a
//! well-seeded pool and its own name. The clock and the entropy are best effort (the
//! workload still runs, the log says what failed); a hostname the kernel refuses is as
//! fatal as it is at a normal boot.

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;

use hearth::guest::protocol::Claim;
use nix::errno::Errno;
use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_settime};

use crate::console::shown;

/// Most entropy bytes taken from a claim; the rest is ignored (the host sends
/// [`hearth::guest::protocol::CLAIM_ENTROPY_BYTES`]).
const MAX_ENTROPY: usize = 256;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])` from `<linux/random.h>`.
const RNDADDENTROPY: libc::Ioctl =
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()) as libc::Ioctl;

/// `struct rand_pool_info` with room for [`MAX_ENTROPY`] bytes.
#[repr(C)]
struct RandPoolInfo {
    /// Bits credited.
    entropy_count: libc::c_int,
    /// Bytes in `buf`.
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

/// A claim the guest cannot take.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("claim: hostname {hostname}: {source}")]
    Hostname {
        /// Shown bounded and escaped: it comes from the host.
        hostname: String,
        source: Errno,
    },
}

/// Sets the clock, the entropy and the hostname, in that order. Returns what went wrong
/// without stopping the claim (for the workload log); an error only for the hostname.
pub fn prepare(claim: &Claim) -> Result<Vec<String>, ClaimError> {
    let mut notes = Vec::new();
    if let Err(e) = set_clock(claim.now_unix_ms) {
        notes.push(format!("claim: set the clock: {e}"));
    }
    if let Err(e) = add_entropy(&claim.entropy) {
        notes.push(format!("claim: entropy: {e}"));
    }
    nix::unistd::sethostname(&claim.hostname).map_err(|source| ClaimError::Hostname {
        hostname: shown(&claim.hostname),
        source,
    })?;
    Ok(notes)
}

/// `clock_settime(CLOCK_REALTIME)` to the host's time.
fn set_clock(now_unix_ms: u64) -> Result<(), Errno> {
    let secs = libc::time_t::try_from(now_unix_ms / 1000).map_err(|_| Errno::EINVAL)?;
    // Below 1e9: fits any c_long.
    let nanos = ((now_unix_ms % 1000) * 1_000_000) as libc::c_long;
    clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::new(secs, nanos))
}

/// Why the claim's entropy did not reach the pool.
#[derive(Debug, thiserror::Error)]
enum EntropyError {
    #[error("not hex: {0}")]
    Hex(#[from] hex::FromHexError),
    #[error("none sent")]
    Empty,
    #[error("/dev/urandom: {0}")]
    Io(#[from] std::io::Error),
}

/// Adds the claim's bytes to the kernel's pool, credited (`RNDADDENTROPY`); if the
/// kernel refuses the ioctl, they are at least mixed in by a write to `/dev/urandom`.
fn add_entropy(hex_text: &str) -> Result<(), EntropyError> {
    let hex_text = hex_text.as_bytes();
    let bytes = hex::decode(&hex_text[..hex_text.len().min(2 * MAX_ENTROPY)])?;
    if bytes.is_empty() {
        return Err(EntropyError::Empty);
    }
    let mut urandom = fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    let mut info = RandPoolInfo {
        // At most MAX_ENTROPY bytes: both fit a c_int.
        entropy_count: (bytes.len() * 8) as libc::c_int,
        buf_size: bytes.len() as libc::c_int,
        buf: [0; MAX_ENTROPY],
    };
    info.buf[..bytes.len()].copy_from_slice(&bytes);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info header and `buf_size` bytes after it
    // from this pointer; `info` is that layout and holds them, and outlives the call.
    let r = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, &info) };
    if Errno::result(r).is_err() {
        urandom.write_all(&bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_number_is_the_kernels() {
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
    }

    #[test]
    fn bad_entropy_is_refused_before_any_write() {
        assert!(matches!(add_entropy("zz"), Err(EntropyError::Hex(_))));
        assert!(matches!(add_entropy("abc"), Err(EntropyError::Hex(_))));
        assert!(matches!(add_entropy(""), Err(EntropyError::Empty)));
    }
}
