//! Verification of a `.safetensors` file while it is still being written (a download streamed
//! to disk), with the shape of [`crate::pt::PtFollower`]: `advance(written)` as the file grows,
//! `finish(len)` at the end.
//!
//! The header is at the front: it is checked (length limit first, then the whole header) as soon
//! as its bytes are in, so a hostile or foreign file is refused before its data is transferred.
//! Each tensor is then hashed in sorted-name order (spec §7.5) as soon as its bytes are in the
//! file, and every piece of data is handed to a [`StCheck`] on the way; bytes past the length the
//! header promises are refused at once.
//!
//! **Invariant:** the result of [`StFollower::finish`] is exactly what [`super::StReader`] gives
//! for the finished file (same header validation, same hash over the same bytes).

use std::fs::File;
use std::path::{Path, PathBuf};

use super::header::{Header, MAX_HEADER, header_len, parse_header};
use super::reader::check_len;
use super::{StError, io_err, read_exact_at};
use crate::hash::ModelHasher;
use crate::pt::{Followed, TensorMeta};

/// Largest piece of tensor data read and hashed at once.
const CHUNK: u64 = 8 << 20;
/// Smallest piece worth reading while a tensor is still arriving (its end is always taken).
const MIN_PIECE: u64 = 1 << 20;

/// Checks applied to a `.safetensors` file as it is verified: once to the tensor list (sorted by
/// name), then to every tensor's little-endian bytes in sorted-name order, possibly in several
/// pieces per tensor (each a whole number of elements).
pub trait StCheck {
    type Error: From<StError>;
    /// The tensors (sorted by name), before any data.
    fn entries(&mut self, entries: &[TensorMeta]) -> Result<(), Self::Error>;
    /// A piece of `meta`'s data.
    fn data(&mut self, meta: &TensorMeta, le_bytes: &[u8]) -> Result<(), Self::Error>;
}

/// Follows a `.safetensors` file being written front to back (see the module documentation).
pub struct StFollower<C: StCheck> {
    path: PathBuf,
    file: File,
    check: C,
    max_header: u64,
    avail: u64,
    header: Option<Header>,
    hasher: ModelHasher,
    /// Next entry (sorted order) to hash, and how many of its bytes are hashed (`None`: its
    /// name is not fed yet).
    next: usize,
    done_in_next: Option<u64>,
    hashed: u64,
    buf: Vec<u8>,
}

impl<C: StCheck> StFollower<C> {
    /// Starts following `path` (which must exist; it may still be empty).
    pub fn new(path: &Path, check: C) -> Result<Self, StError> {
        let file = File::open(path).map_err(|e| io_err(path, "open", e))?;
        Ok(StFollower {
            path: path.to_path_buf(),
            file,
            check,
            max_header: MAX_HEADER,
            avail: 0,
            header: None,
            hasher: ModelHasher::new(),
            next: 0,
            done_in_next: None,
            hashed: 0,
            buf: Vec::new(),
        })
    }

    /// A tighter header limit than [`MAX_HEADER`] (e.g. sized to the expected tensor count).
    pub fn with_max_header(mut self, max_header: u64) -> Self {
        self.max_header = max_header.min(MAX_HEADER);
        self
    }

    /// Tensor bytes hashed so far.
    pub fn hashed_bytes(&self) -> u64 {
        self.hashed
    }

    /// Always `true`: a safetensors file is always followed as it streams (the method mirrors
    /// [`crate::pt::PtFollower::following`]).
    pub fn following(&self) -> bool {
        true
    }

    /// The first `written` bytes of the file are in place (never changed afterwards): checks the
    /// header once it is in, then hashes and checks what it can. An error is final.
    pub fn advance(&mut self, written: u64) -> Result<(), C::Error> {
        self.avail = self.avail.max(written);
        if self.header.is_none() && !self.parse()? {
            return Ok(());
        }
        if let Some(h) = &self.header
            && self.avail > h.file_len()
        {
            // Refused as soon as the bytes arrive: a file longer than its header says.
            check_len(&self.path, h, self.avail)?;
        }
        self.hash_ready(false)
    }

    /// The whole file is written (`len` bytes): checks its length against the header, hashes the
    /// rest and returns the hash (the caller compares it with the expected one).
    pub fn finish(mut self, len: u64) -> Result<Followed, C::Error> {
        let before = self.hashed;
        self.advance(len)?;
        let Some(h) = &self.header else {
            return Err(StError::Truncated {
                path: self.path.clone(),
                detail: format!("{len} bytes hold no complete header"),
            }
            .into());
        };
        check_len(&self.path, h, len)?;
        self.hash_ready(true)?;
        Ok(Followed {
            hash: self.hasher.finalize(),
            streamed: true,
            hashed_at_finish: self.hashed - before,
        })
    }

    /// Parses the header once its bytes are in. `Ok(false)`: not yet.
    fn parse(&mut self) -> Result<bool, C::Error> {
        if self.avail < 8 {
            return Ok(false);
        }
        let mut first8 = [0u8; 8];
        read_exact_at(&self.file, &self.path, 0, &mut first8)?;
        let n = header_len(&self.path, first8, self.max_header)?;
        if self.avail < 8 + n {
            return Ok(false);
        }
        let mut json = vec![0u8; n as usize];
        read_exact_at(&self.file, &self.path, 8, &mut json)?;
        let header = parse_header(&self.path, &json)?;
        self.check.entries(&header.metas)?;
        self.header = Some(header);
        Ok(true)
    }

    /// Hashes (and checks) tensors in sorted order while their bytes are written; with `all`,
    /// takes pieces of any size.
    fn hash_ready(&mut self, all: bool) -> Result<(), C::Error> {
        let Some(h) = &self.header else {
            return Ok(());
        };
        while self.next < h.entries.len() {
            let e = &h.entries[self.next];
            let (abs, nbytes) = (h.data_start + e.begin, e.end - e.begin);
            let es = e.meta.dtype.elem_size() as u64;
            let done = match self.done_in_next {
                Some(d) => d,
                None => {
                    self.hasher.update(e.meta.name.as_bytes());
                    self.done_in_next = Some(0);
                    0
                }
            };
            let mut pos = done;
            while pos < nbytes {
                let avail_end = self.avail.saturating_sub(abs).min(nbytes);
                let mut n = avail_end.saturating_sub(pos).min(CHUNK);
                if pos + n < nbytes {
                    n -= n % es;
                    if n == 0 || (!all && n < MIN_PIECE) {
                        break;
                    }
                }
                self.buf.resize(n as usize, 0);
                read_exact_at(&self.file, &self.path, abs + pos, &mut self.buf)?;
                self.check.data(&e.meta, &self.buf)?;
                self.hasher.update(&self.buf);
                pos += n;
                self.hashed += n;
            }
            if pos < nbytes {
                self.done_in_next = Some(pos);
                return Ok(());
            }
            self.next += 1;
            self.done_in_next = None;
        }
        Ok(())
    }
}
