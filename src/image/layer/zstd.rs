//! A zstd stream reader over the pure-Rust `ruzstd` decoder, for layers compressed with zstd.
//!
//! `ruzstd` decodes one frame at a time, while a zstd stream may hold several frames and
//! skippable frames (the `zstd:chunked` layers some builders make are exactly that), so
//! this reader walks the frames itself. It also reads each frame header before the decoder
//! does, to refuse a window larger than [`MAX_WINDOW`]: the decoder keeps a whole window
//! of output in memory before handing any of it out, so a hostile header declaring a huge
//! window would otherwise make it buffer the whole bomb, out of reach of the size limit
//! that counts bytes as they come out.

use std::io::{self, Read};

use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

/// The largest frame window accepted: the reference decoder's default limit (2^27 bytes).
/// Layers made with ordinary settings use at most 8 MiB.
pub(crate) const MAX_WINDOW: u64 = 1 << 27;

const FRAME_MAGIC: u32 = 0xFD2F_B528;
/// Skippable frames use the 16 magic numbers 0x184D2A50..=0x184D2A5F.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;

/// Decompresses a zstd stream of any number of frames.
pub(crate) struct ZstdReader<R> {
    source: R,
    frame: FrameDecoder,
    in_frame: bool,
}

impl<R: Read> ZstdReader<R> {
    /// A reader of the decompressed bytes of `source`.
    pub(crate) fn new(source: R) -> Self {
        ZstdReader {
            source,
            frame: FrameDecoder::new(),
            in_frame: false,
        }
    }

    /// Reads up to the next data frame and hands its header to the decoder. `false` at the
    /// end of the stream.
    fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            let mut magic = [0u8; 4];
            match read_full(&mut self.source, &mut magic)? {
                0 => return Ok(false),
                4 => {}
                _ => return Err(invalid("zstd stream cut short in a frame header")),
            }
            let magic_number = u32::from_le_bytes(magic);
            if magic_number & 0xFFFF_FFF0 == SKIPPABLE_MAGIC {
                let mut len = [0u8; 4];
                self.source.read_exact(&mut len)?;
                let len = u64::from(u32::from_le_bytes(len));
                let skipped = io::copy(&mut (&mut self.source).take(len), &mut io::sink())?;
                if skipped != len {
                    return Err(invalid("zstd stream cut short in a skippable frame"));
                }
                continue;
            }
            if magic_number != FRAME_MAGIC {
                return Err(invalid(&format!(
                    "not a zstd frame (magic number {magic_number:#010x})"
                )));
            }
            let header = self.frame_header(magic)?;
            self.frame
                .reset(&header[..])
                .map_err(|e| invalid(&format!("zstd frame header: {e}")))?;
            self.in_frame = true;
            return Ok(true);
        }
    }

    /// Reads the rest of a frame header (RFC 8878, section 3.1.1.1) and checks its window.
    fn frame_header(&mut self, magic: [u8; 4]) -> io::Result<Vec<u8>> {
        let mut header = magic.to_vec();
        let mut byte = [0u8; 1];
        self.source.read_exact(&mut byte)?;
        let descriptor = byte[0];
        header.push(descriptor);
        let single_segment = descriptor & 0x20 != 0;
        let mut window = None;
        if !single_segment {
            self.source.read_exact(&mut byte)?;
            header.push(byte[0]);
            let log = 10 + u32::from(byte[0] >> 3);
            let base = 1u64 << log;
            window = Some(base + (base / 8) * u64::from(byte[0] & 7));
        }
        let dict_len = [0, 1, 2, 4][usize::from(descriptor & 3)];
        let size_len = match descriptor >> 6 {
            0 if single_segment => 1,
            0 => 0,
            1 => 2,
            2 => 4,
            _ => 8,
        };
        let mut rest = [0u8; 12];
        let rest = &mut rest[..dict_len + size_len];
        self.source.read_exact(rest)?;
        header.extend_from_slice(rest);
        let mut content_size = rest[dict_len..]
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        if size_len == 2 {
            content_size += 256;
        }
        // A single-segment frame's window is its whole declared content.
        let window = window.unwrap_or(content_size);
        if window > MAX_WINDOW {
            return Err(invalid(&format!(
                "zstd frame asks for a {window}-byte window, over the {MAX_WINDOW} accepted"
            )));
        }
        Ok(header)
    }

    /// Compares the frame's stored checksum, when it has one, with the decoded content.
    fn check_frame_end(&self) -> io::Result<()> {
        match (
            self.frame.get_checksum_from_data(),
            self.frame.get_calculated_checksum(),
        ) {
            (Some(stored), Some(computed)) if stored != computed => Err(invalid(&format!(
                "zstd frame checksum mismatch (stored {stored:#010x}, content {computed:#010x})"
            ))),
            _ => Ok(()),
        }
    }
}

impl<R: Read> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                while self.frame.can_collect() < buf.len() && !self.frame.is_finished() {
                    self.frame
                        .decode_blocks(
                            &mut self.source,
                            BlockDecodingStrategy::UptoBytes(buf.len()),
                        )
                        .map_err(|e| invalid(&format!("zstd block: {e}")))?;
                }
                let n = self.frame.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                // Nothing left to collect: the frame is finished and drained.
                self.check_frame_end()?;
                self.in_frame = false;
            }
            if !self.next_frame()? {
                return Ok(0);
            }
        }
    }
}

/// Reads until `buf` is full or the stream ends; the count read.
fn read_full(source: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match source.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(stream: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        ZstdReader::new(stream).read_to_end(&mut out)?;
        Ok(out)
    }

    fn compress(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    #[test]
    fn several_frames_and_skippable_frames_decode_as_one_stream() {
        let mut stream = compress(b"first frame, ");
        // A skippable frame: magic, length, payload.
        stream.extend_from_slice(&0x184D_2A53u32.to_le_bytes());
        stream.extend_from_slice(&5u32.to_le_bytes());
        stream.extend_from_slice(b"junk!");
        stream.extend_from_slice(&compress(&vec![7u8; 300_000]));
        let out = decode(&stream).unwrap();
        assert_eq!(&out[..13], b"first frame, ");
        assert_eq!(out.len(), 13 + 300_000);
        assert!(out[13..].iter().all(|b| *b == 7));
        assert!(decode(&[]).unwrap().is_empty());
    }

    #[test]
    fn huge_windows_and_garbage_are_refused() {
        // Magic, descriptor (no single segment), window descriptor 0xF8: a 2^41-byte window.
        let mut stream = FRAME_MAGIC.to_le_bytes().to_vec();
        stream.extend_from_slice(&[0x00, 0xF8, 0, 0, 0]);
        let err = decode(&stream).unwrap_err();
        assert!(err.to_string().contains("window"), "{err}");
        // Single segment declaring 4 GiB of content: the window is the content.
        let mut stream = FRAME_MAGIC.to_le_bytes().to_vec();
        stream.extend_from_slice(&[0xE0, 0, 0, 0, 0, 1, 0, 0, 0]);
        let err = decode(&stream).unwrap_err();
        assert!(err.to_string().contains("window"), "{err}");
        let err = decode(b"not zstd at all").unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
        let whole = compress(b"some content that will be cut");
        assert!(decode(&whole[..whole.len() - 3]).is_err());
    }
}
