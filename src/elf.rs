//! Tells a static executable from a dynamically linked one by its ELF program headers.
//!
//! Two binaries must be static: the guest init, which runs as PID 1 from an initramfs with
//! no dynamic loader (a dynamic one makes the guest kernel panic without naming the
//! cause), and the demo image's busybox, which lives in a root file system with no C
//! library. A binary is static when it asks for no program interpreter (no `PT_INTERP`
//! header; a static-pie still has `PT_DYNAMIC`, which is fine). Checking here turns a
//! guest-side mystery into a clear error on the host.

/// Program header type of the interpreter request.
const PT_INTERP: u32 = 3;

/// Why a file is not a usable static executable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// Not an ELF file, or its headers are cut short or inconsistent.
    #[error("not an ELF executable ({0})")]
    Malformed(&'static str),
    /// The executable names a program interpreter, so it needs a C library at run time.
    #[error("dynamically linked (it asks for the interpreter {0}); a static build is needed")]
    Dynamic(String),
}

/// Checks that `bytes` (a whole ELF file) is an executable without a program interpreter.
pub fn check_static(bytes: &[u8]) -> Result<(), ElfError> {
    if bytes.len() < 16 || &bytes[..4] != b"\x7fELF" {
        return Err(ElfError::Malformed("no ELF magic"));
    }
    let wide = match bytes[4] {
        1 => false,
        2 => true,
        _ => return Err(ElfError::Malformed("unknown ELF class")),
    };
    let big = match bytes[5] {
        1 => false,
        2 => true,
        _ => return Err(ElfError::Malformed("unknown byte order")),
    };
    let r = Reader { bytes, big };
    let (phoff, phentsize, phnum) = if wide {
        (r.u64(0x20)?, r.u16(0x36)?, r.u16(0x38)?)
    } else {
        (u64::from(r.u32(0x1c)?), r.u16(0x2a)?, r.u16(0x2c)?)
    };
    let min_entry = if wide { 56 } else { 32 };
    if phnum > 0 && usize::from(phentsize) < min_entry {
        return Err(ElfError::Malformed("program header entries too small"));
    }
    let phoff = usize::try_from(phoff).map_err(|_| ElfError::Malformed("program header offset"))?;
    for i in 0..usize::from(phnum) {
        let at = phoff
            .checked_add(i * usize::from(phentsize))
            .ok_or(ElfError::Malformed("program header offset"))?;
        if r.u32(at)? != PT_INTERP {
            continue;
        }
        let (offset, size) = if wide {
            (r.u64(at + 8)?, r.u64(at + 32)?)
        } else {
            (u64::from(r.u32(at + 4)?), u64::from(r.u32(at + 16)?))
        };
        let name = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(o, s)| bytes.get(o..o.checked_add(s)?))
            .map(|raw| {
                String::from_utf8_lossy(raw)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .unwrap_or_else(|| "<unreadable>".to_string());
        return Err(ElfError::Dynamic(name));
    }
    Ok(())
}

/// Bounds-checked reads in the file's byte order.
struct Reader<'a> {
    bytes: &'a [u8],
    big: bool,
}

impl Reader<'_> {
    fn take<const N: usize>(&self, at: usize) -> Result<[u8; N], ElfError> {
        at.checked_add(N)
            .and_then(|end| self.bytes.get(at..end))
            .and_then(|s| s.try_into().ok())
            .ok_or(ElfError::Malformed("headers cut short"))
    }

    fn u16(&self, at: usize) -> Result<u16, ElfError> {
        let b = self.take::<2>(at)?;
        Ok(if self.big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&self, at: usize) -> Result<u32, ElfError> {
        let b = self.take::<4>(at)?;
        Ok(if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn u64(&self, at: usize) -> Result<u64, ElfError> {
        let b = self.take::<8>(at)?;
        Ok(if self.big {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian ELF64 header followed by program headers of the given types; a
    /// PT_INTERP entry points at an interpreter name placed after the table.
    fn elf64(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        let name_at = 64 + 56 * types.len() as u64;
        let name = b"/lib64/ld-linux-x86-64.so.2\0";
        for &t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            ph[8..16].copy_from_slice(&name_at.to_le_bytes());
            ph[32..40].copy_from_slice(&(name.len() as u64).to_le_bytes());
            b.extend(ph);
        }
        b.extend_from_slice(name);
        b
    }

    #[test]
    fn static_and_dynamic_are_told_apart() {
        assert_eq!(check_static(&elf64(&[1, 1, 4])), Ok(()));
        assert_eq!(
            check_static(&elf64(&[6, PT_INTERP, 1])),
            Err(ElfError::Dynamic("/lib64/ld-linux-x86-64.so.2".into()))
        );
    }

    #[test]
    fn malformed_files_are_refused_without_panicking() {
        assert!(matches!(
            check_static(b"#!/bin/sh\n"),
            Err(ElfError::Malformed(_))
        ));
        let mut cut = elf64(&[1, 1]);
        cut.truncate(80);
        assert!(matches!(check_static(&cut), Err(ElfError::Malformed(_))));
        let mut huge = elf64(&[1]);
        huge[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(check_static(&huge), Err(ElfError::Malformed(_))));
    }

    #[test]
    fn a_host_binary_is_dynamic() {
        // Debian's coreutils are dynamically linked; the demo tests cover a static busybox.
        if let Ok(bytes) = std::fs::read("/usr/bin/ls") {
            assert!(matches!(check_static(&bytes), Err(ElfError::Dynamic(_))));
        }
    }
}
