//! Counting, limiting and hashing the uncompressed bytes of an archive as they are read.
//!
//! The limit is enforced on the decompressed stream, below the tar parser, so that every
//! byte a bomb can produce is counted: file contents, but also padding, long names and PAX
//! records the parser would otherwise gather in memory. The meter also hashes the stream,
//! which gives the layer's uncompressed digest (the image config's `diff_id`) for free.

use std::cell::{Cell, RefCell};
use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// Most bytes of header records (PAX records, GNU long names) accepted for one entry: the
/// tar parser holds them in memory, and a real entry's stay far below (a file's xattrs fit
/// in one file system block).
pub(crate) const MAX_ENTRY_METADATA: u64 = 16 << 20;

/// What the meter stopped a read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tripped {
    /// The image's uncompressed byte budget ran out.
    Budget,
    /// One entry's header records went over [`MAX_ENTRY_METADATA`].
    Metadata,
}

/// Shared between the reader the tar parser owns and the unpacking loop, which cannot reach
/// the reader while the parser borrows it.
pub(crate) struct Meter {
    limit: u64,
    used: Cell<u64>,
    tripped: Cell<Option<Tripped>>,
    in_header: Cell<bool>,
    header_bytes: Cell<u64>,
    hasher: RefCell<Sha256>,
}

impl Meter {
    /// A meter that lets `limit - used` more bytes through.
    pub(crate) fn new(used: u64, limit: u64) -> Self {
        Meter {
            limit,
            used: Cell::new(used),
            tripped: Cell::new(None),
            in_header: Cell::new(false),
            header_bytes: Cell::new(0),
            hasher: RefCell::new(Sha256::new()),
        }
    }

    /// The running total, the bytes counted before this meter included.
    pub(crate) fn used(&self) -> u64 {
        self.used.get()
    }

    /// The budget: the most the running total may reach.
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Why a read was refused, if one was.
    pub(crate) fn tripped(&self) -> Option<Tripped> {
        self.tripped.get()
    }

    /// Marks the reads that follow as header records (`true`) or entry data (`false`).
    pub(crate) fn reading_header(&self, yes: bool) {
        self.in_header.set(yes);
        self.header_bytes.set(0);
    }

    /// `sha256:<hex>` of every byte read so far.
    pub(crate) fn digest(&self) -> String {
        let hasher = self.hasher.borrow().clone();
        format!("sha256:{}", hex::encode(hasher.finalize()))
    }

    /// Counts `n` bytes that did not come through a [`Metered`] reader (a sparse file's
    /// holes), with the same limit.
    pub(crate) fn charge(&self, n: u64) -> io::Result<()> {
        let in_header = self.in_header.replace(false);
        let result = self.count(n);
        self.in_header.set(in_header);
        result
    }

    fn count(&self, n: u64) -> io::Result<()> {
        let used = self.used.get().saturating_add(n);
        if used > self.limit {
            self.tripped.set(Some(Tripped::Budget));
            return Err(io::Error::other(format!(
                "over the limit of {} uncompressed bytes",
                self.limit
            )));
        }
        if self.in_header.get() {
            let header = self.header_bytes.get() + n;
            if header > MAX_ENTRY_METADATA {
                self.tripped.set(Some(Tripped::Metadata));
                return Err(io::Error::other(format!(
                    "header records over {MAX_ENTRY_METADATA} bytes"
                )));
            }
            self.header_bytes.set(header);
        }
        self.used.set(used);
        Ok(())
    }
}

/// A reader whose bytes go through a [`Meter`].
pub(crate) struct Metered<'m, R> {
    inner: R,
    meter: &'m Meter,
}

impl<'m, R: Read> Metered<'m, R> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: R, meter: &'m Meter) -> Self {
        Metered { inner, meter }
    }
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Once refused, always refused: the parser must not carry on past a refusal.
        if self.meter.tripped().is_some() {
            return Err(io::Error::other("size limit reached"));
        }
        let n = self.inner.read(buf)?;
        self.meter.count(n as u64)?;
        self.meter.hasher.borrow_mut().update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_counts_across_readers_and_trips_once_over() {
        let meter = Meter::new(10, 30);
        let mut out = Vec::new();
        Metered::new(&[1u8; 20][..], &meter)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(meter.used(), 30);
        assert_eq!(meter.tripped(), None);
        let err = Metered::new(&[1u8; 1][..], &meter)
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(err.to_string().contains("30"), "{err}");
        assert_eq!(meter.tripped(), Some(Tripped::Budget));
    }

    #[test]
    fn header_records_have_their_own_cap_and_the_stream_is_hashed() {
        let meter = Meter::new(0, u64::MAX);
        assert_eq!(
            meter.digest(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        meter.reading_header(true);
        let big = vec![0u8; MAX_ENTRY_METADATA as usize + 1];
        let mut out = Vec::new();
        assert!(
            Metered::new(&big[..], &meter)
                .read_to_end(&mut out)
                .is_err()
        );
        assert_eq!(meter.tripped(), Some(Tripped::Metadata));
    }
}
