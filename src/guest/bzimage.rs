//! Turns Debian's compressed kernel (`boot/vmlinuz-*`, a bzImage with an LZ4 payload) into
//! the uncompressed ELF `vmlinux`.
//!
//! Why: QEMU `microvm` (and Firecracker) boot an uncompressed ELF kernel through its PVH
//! entry point directly, which skips the firmware and the in-guest decompression; under
//! TCG that saves a large part of the boot.
//!
//! The payload is located through the bzImage boot header (`payload_offset` and
//! `payload_length`, boot protocol 2.08+), with a scan for the LZ4 magic as a fallback.
//! The payload is an LZ4 "legacy" frame: the magic `02 21 4C 18`, then blocks each
//! prefixed by its compressed length (4 bytes, little endian), each decompressing to at
//! most 8 MiB. The kernel build appends the uncompressed size (4 bytes, little endian)
//! after the frame, which tells where the frame ends.

/// The LZ4 legacy frame magic (0x184C2102, little endian).
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4C, 0x18];
/// Decompressed size of every block of a legacy frame except the last.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Offset of the `HdrS` signature of the boot header.
const HDR_SIGNATURE_OFFSET: usize = 0x202;
/// Offset of `setup_sects` (0 means 4).
const HDR_SETUP_SECTS: usize = 0x1f1;
/// Offset of the boot protocol version.
const HDR_VERSION: usize = 0x206;
/// Offset of `payload_offset` (relative to the protected-mode code).
const HDR_PAYLOAD_OFFSET: usize = 0x248;
/// Offset of `payload_length`.
const HDR_PAYLOAD_LENGTH: usize = 0x24c;
/// Upper bound on an uncompressed kernel we accept, against a corrupt size field.
const MAX_VMLINUX: usize = 1 << 30;

/// Why a kernel image could not be decompressed.
#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    /// No LZ4 legacy frame in the image: not an LZ4-compressed bzImage.
    #[error("no LZ4 legacy frame found (not an LZ4-compressed bzImage)")]
    NoLz4Payload,
    /// The frame's structure does not hold together.
    #[error("LZ4 frame truncated or malformed at byte {offset}: {reason}")]
    Malformed {
        /// Offset in the image.
        offset: usize,
        /// What was wrong.
        reason: String,
    },
    /// A block failed to decompress.
    #[error("LZ4 block at byte {offset} does not decompress: {source}")]
    Block {
        /// Offset of the block in the image.
        offset: usize,
        /// The decoder's error.
        source: lz4_flex::block::DecompressError,
    },
    /// The result is not an ELF file.
    #[error("the decompressed kernel is not an ELF file")]
    NotElf,
}

/// Extracts the uncompressed ELF kernel from a bzImage.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let (start, expected) = match payload_from_header(image) {
        Some((start, len)) => (start, trailing_size(image, start, len)),
        None => (find_magic(image).ok_or(BzImageError::NoLz4Payload)?, None),
    };
    let out = decompress_legacy(image, start, expected)?;
    if !out.starts_with(b"\x7fELF") {
        return Err(BzImageError::NotElf);
    }
    Ok(out)
}

/// The payload's start and length from the boot header, when the header has them and the
/// payload starts with the LZ4 magic.
fn payload_from_header(image: &[u8]) -> Option<(usize, usize)> {
    if image.get(HDR_SIGNATURE_OFFSET..HDR_SIGNATURE_OFFSET + 4)? != b"HdrS" {
        return None;
    }
    if read_u16(image, HDR_VERSION)? < 0x0208 {
        return None;
    }
    let setup_sects = match *image.get(HDR_SETUP_SECTS)? {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let start = pm_start.checked_add(read_u32(image, HDR_PAYLOAD_OFFSET)? as usize)?;
    let len = read_u32(image, HDR_PAYLOAD_LENGTH)? as usize;
    let end = start.checked_add(len)?;
    if end > image.len() || image.get(start..start + 4)? != LZ4_LEGACY_MAGIC {
        return None;
    }
    Some((start, len))
}

/// The uncompressed size the kernel build appends after the compressed payload.
fn trailing_size(image: &[u8], start: usize, len: usize) -> Option<usize> {
    let size = read_u32(image, (start + len).checked_sub(4)?)? as usize;
    (size > 0 && size <= MAX_VMLINUX).then_some(size)
}

fn find_magic(image: &[u8]) -> Option<usize> {
    image.windows(4).position(|w| w == LZ4_LEGACY_MAGIC)
}

/// Decompresses a legacy frame starting at `start` (at the magic). With `expected`, stops
/// once that many bytes are out; without, stops after the first short block.
fn decompress_legacy(
    image: &[u8],
    start: usize,
    expected: Option<usize>,
) -> Result<Vec<u8>, BzImageError> {
    let mut out = Vec::with_capacity(expected.unwrap_or(LZ4_LEGACY_BLOCK * 8));
    let mut pos = start + LZ4_LEGACY_MAGIC.len();
    loop {
        if expected.is_some_and(|n| out.len() >= n) {
            break;
        }
        let len = read_u32(image, pos).ok_or_else(|| BzImageError::Malformed {
            offset: pos,
            reason: "block length past the end of the image".to_string(),
        })? as usize;
        // A second magic starts a concatenated frame; the kernel's decoder skips it too.
        if len == u32::from_le_bytes(LZ4_LEGACY_MAGIC) as usize {
            pos += 4;
            continue;
        }
        let data = image
            .get(pos + 4..pos + 4 + len)
            .ok_or_else(|| BzImageError::Malformed {
                offset: pos,
                reason: format!("block of {len} bytes runs past the end of the image"),
            })?;
        let before = out.len();
        out.resize(before + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(data, &mut out[before..]).map_err(|source| {
            BzImageError::Block {
                offset: pos,
                source,
            }
        })?;
        out.truncate(before + n);
        pos += 4 + len;
        if out.len() > MAX_VMLINUX {
            return Err(BzImageError::Malformed {
                offset: pos,
                reason: format!("decompresses to more than {MAX_VMLINUX} bytes"),
            });
        }
        if expected.is_none() && n < LZ4_LEGACY_BLOCK {
            break;
        }
    }
    if let Some(n) = expected
        && out.len() != n
    {
        return Err(BzImageError::Malformed {
            offset: pos,
            reason: format!("decompressed {} bytes, the image says {n}", out.len()),
        });
    }
    Ok(out)
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a legacy frame of `payload` split into blocks of `block` bytes.
    fn frame(payload: &[u8], block: usize) -> Vec<u8> {
        let mut f = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in payload.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            f.extend_from_slice(&(c.len() as u32).to_le_bytes());
            f.extend_from_slice(&c);
        }
        f
    }

    #[test]
    fn scans_for_the_magic_without_a_header() {
        let mut payload = b"\x7fELF".to_vec();
        payload.extend(std::iter::repeat_n(7u8, 1000));
        let mut image = vec![0u8; 100];
        image.extend(frame(&payload, LZ4_LEGACY_BLOCK));
        image.extend_from_slice(&[0xff; 16]);
        assert_eq!(extract_vmlinux(&image).unwrap(), payload);
    }

    #[test]
    fn follows_the_header_across_full_blocks() {
        // Two full blocks and a short one; the trailing size ends the frame exactly.
        let mut payload = b"\x7fELF".to_vec();
        payload.extend((0..(2 * LZ4_LEGACY_BLOCK + 10)).map(|i| (i % 251) as u8));
        let mut f = frame(&payload, LZ4_LEGACY_BLOCK);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let setup_sects = 3u8;
        let pm_start = (usize::from(setup_sects) + 1) * 512;
        let mut image = vec![0u8; pm_start + 64];
        image[HDR_SETUP_SECTS] = setup_sects;
        image[HDR_SIGNATURE_OFFSET..HDR_SIGNATURE_OFFSET + 4].copy_from_slice(b"HdrS");
        image[HDR_VERSION..HDR_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        image[HDR_PAYLOAD_OFFSET..HDR_PAYLOAD_OFFSET + 4].copy_from_slice(&64u32.to_le_bytes());
        image[HDR_PAYLOAD_LENGTH..HDR_PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(f.len() as u32).to_le_bytes());
        image.extend(f);
        image.extend_from_slice(&[0xAB; 32]);
        assert_eq!(extract_vmlinux(&image).unwrap(), payload);
    }

    #[test]
    fn rejects_an_image_without_lz4() {
        assert!(matches!(
            extract_vmlinux(&[0u8; 4096]),
            Err(BzImageError::NoLz4Payload)
        ));
    }

    #[test]
    fn rejects_a_truncated_block() {
        let mut image = frame(b"\x7fELF hello hello hello", LZ4_LEGACY_BLOCK);
        image.truncate(image.len() - 3);
        assert!(matches!(
            extract_vmlinux(&image),
            Err(BzImageError::Malformed { .. })
        ));
    }
}
