//! The one ELF fact the kit needs: is an executable static?
//!
//! Why: the guest init runs as PID 1 from an initramfs that holds no dynamic loader and no
//! libc. A dynamically linked init makes the kernel panic at boot with a message that does
//! not name the cause, so the kit refuses one up front. An executable is static when it has
//! no program interpreter (`PT_INTERP`); a static-pie still has `PT_DYNAMIC`, which is fine.

/// Program header type of the interpreter request.
const PT_INTERP: u32 = 3;

/// What [`check_static`] found wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// Not a 64-bit little-endian ELF file.
    #[error("not a 64-bit little-endian ELF executable")]
    NotElf64,
    /// The program headers lie outside the file.
    #[error("program headers run past the end of the file")]
    Truncated,
    /// The executable asks for a dynamic loader.
    #[error(
        "dynamically linked (has a PT_INTERP program header); build it with deploy/build-guest-init.sh"
    )]
    Dynamic,
}

/// Checks that `bytes` is a 64-bit little-endian ELF executable without `PT_INTERP`.
pub fn check_static(bytes: &[u8]) -> Result<(), ElfError> {
    // e_ident: magic, class 2 (64-bit), data 1 (little endian).
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err(ElfError::NotElf64);
    }
    let phoff = u64::from_le_bytes(field(bytes, 0x20)?) as usize;
    let phentsize = usize::from(u16::from_le_bytes(field(bytes, 0x36)?));
    let phnum = usize::from(u16::from_le_bytes(field(bytes, 0x38)?));
    if phentsize < 4 {
        return Err(ElfError::Truncated);
    }
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * phentsize)
            .ok_or(ElfError::Truncated)?;
        if u32::from_le_bytes(field(bytes, at)?) == PT_INTERP {
            return Err(ElfError::Dynamic);
        }
    }
    Ok(())
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], ElfError> {
    bytes
        .get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or(ElfError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_binary_is_dynamic() {
        // The test runner itself is linked dynamically (the default on the gnu target).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(check_static(&me), Err(ElfError::Dynamic));
    }

    #[test]
    fn no_interp_is_static() {
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        assert_eq!(check_static(&elf), Ok(()));
        elf[64..68].copy_from_slice(&PT_INTERP.to_le_bytes());
        assert_eq!(check_static(&elf), Err(ElfError::Dynamic));
    }

    #[test]
    fn garbage_is_not_elf() {
        assert_eq!(check_static(b"#!/bin/sh\n"), Err(ElfError::NotElf64));
    }
}
