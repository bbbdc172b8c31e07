//! Verification of a `.pt` file while it is still being written (a download streamed to disk):
//! [`PtFollower`] follows the file as it grows, parses the zip records in file order (local
//! headers, `data.pkl`, then the storage records whose sizes the pickle gives), and hashes
//! each tensor in sorted-name order (spec §7.5) as soon as its bytes are in the file, handing
//! every piece of data to a [`FollowCheck`] (e.g. a finiteness check) on the way. After the last
//! byte only what was not yet hashable is left to do.
//!
//! **Invariant:** the result of [`PtFollower::finish`] is exactly what a full pass with
//! [`PtReader`] over the finished file gives (same hash, same checks on the same bytes): the
//! streamed parse is an accelerator whose tensor list and data locations are cross-checked
//! against the central directory at the end, and any file the streamed parse cannot follow
//! (non-contiguous views, unusual record layouts, a mismatch) is verified by a full pass.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::pickle::MAX_PICKLE;
use super::reader::{check_views, clip, is_contiguous, state_dict_of, unpickle_error};
use super::zip::read_at;
use super::{Expected, PtError, PtLayout, PtReader, TensorMeta, io_err, pickle};
use crate::hash::{ModelHash, ModelHasher};

const LFH_SIG: u32 = 0x0403_4b50;
const CDH_SIG: u32 = 0x0201_4b50;
const DD_SIG: u32 = 0x0807_4b50;
const LFH_LEN: u64 = 30;
/// Longest record of unknown size other than `data.pkl` (small metadata records) searched for
/// its data descriptor while streaming; a longer one makes the follower give up (full pass at
/// the end). `data.pkl` is searched up to [`MAX_PICKLE`] and refused beyond.
const MAX_SCAN: u64 = 64 << 20;
/// Bytes read at once while searching for a data descriptor.
const SCAN_WINDOW: u64 = 1 << 20;
/// What may follow the central directory entries: ZIP64 end record and locator, end record
/// and its longest comment.
const TAIL_SLACK: u64 = 56 + 20 + 22 + 0xFFFF;
/// Largest piece of tensor data read and hashed at once.
const CHUNK: u64 = 8 << 20;
/// Smallest piece worth reading while a tensor is still arriving (its end is always taken).
const MIN_PIECE: u64 = 1 << 20;

/// Checks applied to a checkpoint as it is verified: once to the tensor list, then to every
/// tensor's little-endian bytes, in sorted-name order, possibly in several pieces per tensor
/// (each a whole number of elements).
pub trait FollowCheck {
    type Error: From<PtError>;
    /// The layout and the tensors (sorted by name), before any data.
    fn entries(&mut self, layout: PtLayout, entries: &[TensorMeta]) -> Result<(), Self::Error>;
    /// A piece of `meta`'s data.
    fn data(&mut self, meta: &TensorMeta, le_bytes: &[u8]) -> Result<(), Self::Error>;
}

/// What [`PtFollower::finish`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Followed {
    /// The model hash of the file.
    pub hash: ModelHash,
    /// `true` when the streamed parse held (cross-checked against the central directory);
    /// `false` when the file was verified by a full pass at the end.
    pub streamed: bool,
    /// Tensor bytes hashed inside `finish` (after the whole file was there).
    pub hashed_at_finish: u64,
}

/// One tensor of the streamed parse.
struct Entry {
    meta: TensorMeta,
    key: String,
    /// Byte offset of the first element inside its storage record.
    offset: u64,
    nbytes: u64,
}

enum State {
    /// The next local header (or the central directory) starts at `at`.
    Header { at: u64 },
    /// A record's data starts at `start`; its size is known, or searched for (its data
    /// descriptor) from `scan`.
    Data {
        name: String,
        start: u64,
        size: Option<u64>,
        zip64: bool,
        scan: u64,
    },
    /// The central directory was reached (at `cd_start`): every record is known.
    Done { cd_start: u64 },
    /// The streamed parse cannot follow this file; `finish` does a full pass.
    GaveUp,
}

/// What [`PtFollower::parse`] does next: go on in a new state, or wait for more bytes.
enum Step {
    Go(State),
    Wait(State),
}

/// Follows a `.pt` file being written front to back (see the module documentation).
pub struct PtFollower<C: FollowCheck> {
    path: PathBuf,
    file: File,
    check: C,
    avail: u64,
    state: State,
    layout: Option<PtLayout>,
    entries: Vec<Entry>,
    /// Storage key → size in bytes, from the pickle.
    storage_sizes: HashMap<String, u64>,
    /// Storage key → absolute offset of the record's data.
    record_starts: HashMap<String, u64>,
    hasher: ModelHasher,
    /// Next entry (sorted order) to hash, and how many of its bytes are hashed (`None`: its
    /// name is not fed yet).
    next: usize,
    done_in_next: Option<u64>,
    hashed: u64,
    buf: Vec<u8>,
    /// The root folder of the first record.
    root: Option<String>,
    /// Most bytes the central directory entries of the records seen so far can take.
    cd_bound: u64,
    expected: Option<Expected>,
}

fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn rd64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Length of a data descriptor (signature included).
fn dd_len(zip64: bool) -> u64 {
    if zip64 { 24 } else { 16 }
}

/// The size fields of a data descriptor at the start of `b`, when it is one.
fn dd_size(b: &[u8], zip64: bool) -> Option<(u64, u64)> {
    if rd32(b, 0) != DD_SIG {
        return None;
    }
    Some(if zip64 {
        (rd64(b, 8), rd64(b, 16))
    } else {
        (u64::from(rd32(b, 8)), u64::from(rd32(b, 12)))
    })
}

impl<C: FollowCheck> PtFollower<C> {
    /// Starts following `path` (which must exist; it may still be empty).
    pub fn new(path: &Path, check: C) -> Result<Self, PtError> {
        let file = File::open(path).map_err(|e| io_err(path, "open", e))?;
        Ok(PtFollower {
            path: path.to_path_buf(),
            file,
            check,
            avail: 0,
            state: State::Header { at: 0 },
            layout: None,
            entries: Vec::new(),
            storage_sizes: HashMap::new(),
            record_starts: HashMap::new(),
            hasher: ModelHasher::new(),
            next: 0,
            done_in_next: None,
            hashed: 0,
            buf: Vec::new(),
            root: None,
            cd_bound: 0,
            expected: None,
        })
    }

    /// Also checks the tensor list against `expected` (before [`FollowCheck::entries`] and
    /// before any tensor data).
    pub fn expecting(mut self, expected: Expected) -> Self {
        self.expected = Some(expected);
        self
    }

    /// Tensor bytes hashed so far.
    pub fn hashed_bytes(&self) -> u64 {
        self.hashed
    }

    /// Whether the streamed parse still follows the file (`false`: `finish` will do a full pass).
    pub fn following(&self) -> bool {
        !matches!(self.state, State::GaveUp)
    }

    /// The first `written` bytes of the file are in place (they are never changed afterwards):
    /// parses and hashes what it can. An error is final (a check refused the file, or the file
    /// could not be read).
    pub fn advance(&mut self, written: u64) -> Result<(), C::Error> {
        self.avail = self.avail.max(written);
        if matches!(self.state, State::GaveUp) {
            return Ok(());
        }
        self.parse()?;
        if matches!(self.state, State::GaveUp) {
            return Ok(());
        }
        self.hash_ready(false)
    }

    /// The whole file is written (`len` bytes): hashes the rest, cross-checks the streamed parse
    /// against the file's central directory, and falls back to a full pass when it does not
    /// hold. Returns the hash; the caller compares it with the expected one.
    pub fn finish(mut self, len: u64) -> Result<Followed, C::Error> {
        let before = self.hashed;
        self.advance(len)?;
        if self.following() && self.layout.is_some() {
            self.hash_ready(true)?;
        }
        let reader = PtReader::open(&self.path)?;
        if self.following() && self.matches(&reader) && self.next == self.entries.len() {
            let hashed_at_finish = self.hashed - before;
            return Ok(Followed {
                hash: self.hasher.finalize(),
                streamed: true,
                hashed_at_finish,
            });
        }
        // Full pass over the finished file, with the same checks.
        if let Some(expected) = &self.expected {
            expected.check(&self.path, reader.entries())?;
        }
        self.check.entries(reader.layout(), reader.entries())?;
        let mut hasher = ModelHasher::new();
        let mut total = 0u64;
        for meta in reader.entries() {
            let t = reader.read(&meta.name)?;
            self.check.data(meta, &t.data)?;
            hasher.update_tensor(&meta.name, &t.data);
            total += t.data.len() as u64;
        }
        Ok(Followed {
            hash: hasher.finalize(),
            streamed: false,
            hashed_at_finish: total,
        })
    }

    /// Whether the streamed tensor list and data locations are the reader's.
    fn matches(&self, reader: &PtReader) -> bool {
        if self.layout != Some(reader.layout()) || reader.entries().len() != self.entries.len() {
            return false;
        }
        let starts = reader.data_starts();
        self.entries.iter().zip(reader.entries()).zip(starts).all(
            |((e, m), (start, contiguous))| {
                e.meta == *m
                    && contiguous
                    && self.record_starts.get(&e.key).map(|s| s + e.offset) == Some(start)
            },
        )
    }

    fn read(&mut self, at: u64, len: u64) -> Result<&[u8], PtError> {
        self.buf.resize(len as usize, 0);
        read_at(&self.file, &self.path, at, &mut self.buf)?;
        Ok(&self.buf)
    }

    fn corrupt(&self, detail: String) -> PtError {
        PtError::CorruptZip {
            path: self.path.clone(),
            detail,
        }
    }

    /// Parses records as far as the written bytes allow. A file the reader would refuse is
    /// refused here as soon as the offending bytes are in.
    fn parse(&mut self) -> Result<(), C::Error> {
        loop {
            let next = match std::mem::replace(&mut self.state, State::GaveUp) {
                State::Header { at } => self.on_header(at)?,
                State::Data {
                    name,
                    start,
                    size: Some(size),
                    zip64,
                    scan,
                } => self.on_sized(name, start, size, zip64, scan)?,
                State::Data {
                    name,
                    start,
                    size: None,
                    zip64,
                    scan,
                } => self.on_scan(name, start, zip64, scan)?,
                State::Done { cd_start } => {
                    self.check_tail(cd_start)?;
                    Step::Wait(State::Done { cd_start })
                }
                State::GaveUp => Step::Wait(State::GaveUp),
            };
            match next {
                Step::Go(state) => self.state = state,
                Step::Wait(state) => {
                    self.state = state;
                    return Ok(());
                }
            }
        }
    }

    /// A local header (or the central directory) starts at `at`.
    fn on_header(&mut self, at: u64) -> Result<Step, C::Error> {
        if at + 4 > self.avail {
            return Ok(Step::Wait(State::Header { at }));
        }
        let sig = rd32(self.read(at, 4)?, 0);
        if sig == CDH_SIG && self.layout.is_some() {
            return Ok(Step::Go(State::Done { cd_start: at }));
        }
        if sig != LFH_SIG {
            let e = if at == 0 {
                PtError::NotZip {
                    path: self.path.clone(),
                    detail: format!("no zip signature (starts with 0x{sig:08x})"),
                }
            } else if sig == CDH_SIG {
                PtError::NotACheckpoint {
                    path: self.path.clone(),
                    detail: "the archive has no data.pkl record".into(),
                }
            } else {
                self.corrupt(format!(
                    "bytes at offset {at} are not a zip record (signature 0x{sig:08x})"
                ))
            };
            return Err(e.into());
        }
        if at + LFH_LEN > self.avail {
            return Ok(Step::Wait(State::Header { at }));
        }
        let h = self.read(at, LFH_LEN)?;
        let (method, name_len, extra_len) =
            (rd16(h, 8), u64::from(rd16(h, 26)), u64::from(rd16(h, 28)));
        let start = at + LFH_LEN + name_len + extra_len;
        if method != 0 {
            return Err(self
                .corrupt(format!(
                    "record at offset {at} is compressed (method {method}); torch.save stores records"
                ))
                .into());
        }
        if start > self.avail {
            return Ok(Step::Wait(State::Header { at }));
        }
        let h = self.read(at + LFH_LEN, name_len + extra_len)?.to_vec();
        let (root, name) = std::str::from_utf8(&h[..name_len as usize])
            .ok()
            .and_then(|full| full.split_once('/'))
            .ok_or_else(|| {
                self.corrupt(format!(
                    "record at offset {at} is not named <root>/<name> in UTF-8"
                ))
            })?;
        match &self.root {
            Some(r) if r != root => {
                return Err(self
                    .corrupt(format!(
                        "record {:?} is outside the root folder {:?}",
                        clip(name),
                        clip(r)
                    ))
                    .into());
            }
            Some(_) => {}
            None => self.root = Some(root.to_owned()),
        }
        self.cd_bound += 46 + 28 + name_len;
        let name = name.to_owned();
        let extra = &h[name_len as usize..];
        let mut zip64 = false;
        let mut x = 0usize;
        while x + 4 <= extra.len() {
            zip64 |= rd16(extra, x) == 0x0001;
            x += 4 + rd16(extra, x + 2) as usize;
        }
        let size = name
            .strip_prefix("data/")
            .and_then(|key| self.storage_sizes.get(key))
            .copied();
        if let Some(key) = name.strip_prefix("data/") {
            self.record_starts.insert(key.to_owned(), start);
        }
        Ok(Step::Go(State::Data {
            name,
            start,
            size,
            zip64,
            scan: start,
        }))
    }

    /// A record of known size: its data descriptor must follow its data.
    fn on_sized(
        &mut self,
        name: String,
        start: u64,
        size: u64,
        zip64: bool,
        scan: u64,
    ) -> Result<Step, C::Error> {
        // The size comes from the pickle: saturate (a size past any file just waits; the
        // reader's check at `finish` refuses it).
        let end = start.saturating_add(size);
        let dl = dd_len(zip64);
        if end.saturating_add(dl) > self.avail {
            return Ok(Step::Wait(State::Data {
                name,
                start,
                size: Some(size),
                zip64,
                scan,
            }));
        }
        let d = self.read(end, dl)?;
        if dd_size(d, zip64) != Some((size, size)) {
            return Err(self
                .corrupt(format!(
                    "record {:?} ({size} bytes for its storage) is not followed by its data descriptor",
                    clip(&name)
                ))
                .into());
        }
        Ok(match self.record_done(&name, start, size)? {
            true => Step::Go(State::Header { at: end + dl }),
            false => Step::Wait(State::GaveUp),
        })
    }

    /// A record of unknown size (`data.pkl`, metadata): its data descriptor is searched for,
    /// a bounded window at a time, up to [`MAX_PICKLE`] bytes for `data.pkl` (longer: refused)
    /// and [`MAX_SCAN`] for others (longer: the full pass at the end decides).
    fn on_scan(
        &mut self,
        name: String,
        start: u64,
        zip64: bool,
        mut scan: u64,
    ) -> Result<Step, C::Error> {
        let dl = dd_len(zip64);
        let limit = start
            + if name == "data.pkl" {
                MAX_PICKLE
            } else {
                MAX_SCAN
            };
        // Candidate descriptor positions p need p + dl <= avail.
        while let Some(last) = self.avail.checked_sub(dl).filter(|&l| l >= scan) {
            if scan > limit {
                break;
            }
            let last = last.min(limit).min(scan + SCAN_WINDOW);
            let window = self.read(scan, last - scan + dl)?;
            let found = (0..=(last - scan) as usize).find(|&i| {
                window[i] == b'P'
                    && dd_size(&window[i..], zip64)
                        .is_some_and(|(a, b)| a == b && a == scan + i as u64 - start)
            });
            if let Some(i) = found {
                let size = scan + i as u64 - start;
                return Ok(match self.record_done(&name, start, size)? {
                    true => Step::Go(State::Header {
                        at: start + size + dl,
                    }),
                    false => Step::Wait(State::GaveUp),
                });
            }
            scan = last + 1;
        }
        if scan > limit {
            if name == "data.pkl" {
                return Err(PtError::BadPickle {
                    path: self.path.clone(),
                    detail: format!(
                        "data.pkl is over {MAX_PICKLE} bytes (state dicts pickle to far less)"
                    ),
                }
                .into());
            }
            return Ok(Step::Wait(State::GaveUp));
        }
        Ok(Step::Wait(State::Data {
            name,
            start,
            size: None,
            zip64,
            scan,
        }))
    }

    /// After the first central directory header only the directory and the end records may
    /// follow: more bytes than the records seen can need is junk.
    fn check_tail(&self, cd_start: u64) -> Result<(), PtError> {
        let bound = self.cd_bound + TAIL_SLACK;
        if self.avail > cd_start.saturating_add(bound) {
            return Err(self.corrupt(format!(
                "{} bytes follow the central directory start at {cd_start}; {} records need at most {bound}",
                self.avail - cd_start,
                self.cd_records()
            )));
        }
        Ok(())
    }

    fn cd_records(&self) -> usize {
        self.record_starts.len() + usize::from(self.layout.is_some())
    }

    /// A record is complete. For `data.pkl`: parse the tensor list (refusing what the reader
    /// refuses: a bad pickle, not a state dict, views that do not fit their storages) and run
    /// the entry checks. Returns whether the streamed parse goes on (`false`: a view the stream
    /// cannot follow; the full pass at the end decides).
    fn record_done(&mut self, name: &str, start: u64, size: u64) -> Result<bool, C::Error> {
        if name != "data.pkl" {
            return Ok(true);
        }
        if self.layout.is_some() {
            return Err(self
                .corrupt("record \"data.pkl\" appears twice".into())
                .into());
        }
        let mut pkl = vec![0u8; size as usize];
        read_at(&self.file, &self.path, start, &mut pkl)?;
        let graph = pickle::unpickle(&pkl).map_err(|e| unpickle_error(&self.path, e))?;
        drop(pkl);
        let (layout, tensors) =
            state_dict_of(&graph).map_err(|detail| PtError::NotACheckpoint {
                path: self.path.clone(),
                detail,
            })?;
        check_views(&self.path, tensors.iter().map(|(n, t)| (*n, *t)))?;
        let mut entries = Vec::with_capacity(tensors.len());
        let mut streamable = true;
        for (name, t) in tensors {
            streamable &= is_contiguous(&t.shape, &t.stride);
            let es = t.storage.dtype.elem_size() as u64;
            let meta = TensorMeta::new(name, t.storage.dtype, t.shape.clone());
            self.storage_sizes
                .entry(t.storage.key.clone())
                .or_insert(t.storage.numel.saturating_mul(es));
            entries.push(Entry {
                nbytes: meta.nbytes() as u64,
                meta,
                key: t.storage.key.clone(),
                offset: t.offset.saturating_mul(es),
            });
        }
        drop(graph);
        let metas: Vec<TensorMeta> = entries.iter().map(|e| e.meta.clone()).collect();
        if let Some(expected) = &self.expected {
            expected.check(&self.path, &metas)?;
        }
        if !streamable {
            // The full pass at the end runs the checks, on the views as the reader gathers them.
            return Ok(false);
        }
        self.check.entries(layout, &metas)?;
        self.layout = Some(layout);
        self.entries = entries;
        Ok(true)
    }

    /// Hashes (and checks) tensors in sorted order while their bytes are written; with `all`,
    /// takes pieces of any size.
    fn hash_ready(&mut self, all: bool) -> Result<(), C::Error> {
        if self.layout.is_none() {
            return Ok(());
        }
        while self.next < self.entries.len() {
            let e = &self.entries[self.next];
            let Some(&rec) = self.record_starts.get(&e.key) else {
                return Ok(());
            };
            let (abs, nbytes) = (rec.saturating_add(e.offset), e.nbytes);
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
                read_at(&self.file, &self.path, abs + pos, &mut self.buf)?;
                let meta = &self.entries[self.next].meta;
                self.check.data(meta, &self.buf)?;
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;

    use super::*;
    use crate::hash::hash_pt_file;
    use crate::pt::{DType, Tensor, write_pt_tensors};

    /// Records what it was shown; refuses a named tensor's data when asked to.
    #[derive(Default)]
    struct Seen {
        entries: Vec<String>,
        data_bytes: u64,
        refuse_entry: Option<String>,
    }

    impl FollowCheck for Seen {
        type Error = PtError;
        fn entries(&mut self, _layout: PtLayout, entries: &[TensorMeta]) -> Result<(), PtError> {
            self.entries = entries.iter().map(|m| m.name.clone()).collect();
            match &self.refuse_entry {
                Some(n) if self.entries.contains(n) => Err(PtError::NotACheckpoint {
                    path: PathBuf::from("check"),
                    detail: format!("refused {n}"),
                }),
                _ => Ok(()),
            }
        }
        fn data(&mut self, meta: &TensorMeta, le_bytes: &[u8]) -> Result<(), PtError> {
            assert_eq!(le_bytes.len() % meta.dtype.elem_size(), 0);
            self.data_bytes += le_bytes.len() as u64;
            Ok(())
        }
    }

    fn tensor(dtype: DType, shape: &[usize], seed: u8) -> Tensor {
        let n: usize = shape.iter().product::<usize>() * dtype.elem_size();
        Tensor {
            dtype,
            shape: shape.to_vec(),
            data: (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect(),
        }
    }

    /// Copies `src` into `dst` in pieces of `piece` bytes, advancing the follower after each;
    /// calls `at(written, follower)` after every piece.
    fn replay<C: FollowCheck>(
        src: &Path,
        dst: &Path,
        piece: usize,
        check: C,
        mut at: impl FnMut(u64, &PtFollower<C>),
    ) -> Result<Followed, C::Error> {
        let bytes = std::fs::read(src).unwrap();
        let mut out = std::fs::File::create(dst).unwrap();
        let mut f = PtFollower::new(dst, check)?;
        let mut written = 0u64;
        for chunk in bytes.chunks(piece) {
            out.write_all(chunk).unwrap();
            written += chunk.len() as u64;
            f.advance(written)?;
            at(written, &f);
        }
        f.finish(written)
    }

    #[test]
    fn hashes_while_the_file_grows_and_matches_a_full_pass() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("model_expgroup_0.pt");
        let mut sd = BTreeMap::new();
        // Three 3 MiB tensors (several pieces each), small ones, a 0-dim and an empty tensor.
        for (i, name) in ["a.big", "b.big", "c.big"].iter().enumerate() {
            sd.insert(name.to_string(), tensor(DType::F16, &[1536, 1024], i as u8));
        }
        sd.insert("d.small".into(), tensor(DType::F32, &[3, 5], 9));
        sd.insert("e.scalar".into(), tensor(DType::I64, &[], 4));
        sd.insert("f.empty".into(), tensor(DType::BF16, &[0, 4], 1));
        let expected = write_pt_tensors(&src, &sd, &Default::default()).unwrap();
        let total: u64 = sd.values().map(|t| t.data.len() as u64).sum();
        let len = std::fs::metadata(&src).unwrap().len();

        let mut hashed_before_end = 0;
        let followed = replay(
            &src,
            &dir.path().join("copy.pt"),
            64 << 10,
            Seen::default(),
            |w, f| {
                if w + (64 << 10) < len {
                    hashed_before_end = f.hashed_bytes();
                }
                assert!(f.following());
            },
        )
        .unwrap();
        assert!(followed.streamed, "{followed:?}");
        assert_eq!(followed.hash, expected);
        assert_eq!(hash_pt_file(&src).unwrap(), expected);
        // Hashing kept up with the file: before its last piece at most one small piece (under
        // MIN_PIECE) plus that piece was not hashed yet, and nothing was left for the end.
        assert!(
            hashed_before_end + MIN_PIECE + (64 << 10) >= total,
            "hashed {hashed_before_end} of {total} before the last piece"
        );
        assert_eq!(followed.hashed_at_finish, 0);
    }

    #[test]
    fn a_refused_tensor_list_stops_before_any_data() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.pt");
        let mut sd = BTreeMap::new();
        sd.insert("x".to_string(), tensor(DType::F16, &[1024, 1024], 1));
        sd.insert("y".to_string(), tensor(DType::F16, &[1024, 1024], 2));
        write_pt_tensors(&src, &sd, &Default::default()).unwrap();
        let mut refused_at = None;
        let r = {
            let bytes = std::fs::read(&src).unwrap();
            let dst = dir.path().join("copy.pt");
            let mut out = std::fs::File::create(&dst).unwrap();
            let check = Seen {
                refuse_entry: Some("y".into()),
                ..Default::default()
            };
            let mut f = PtFollower::new(&dst, check).unwrap();
            let mut w = 0u64;
            let mut r = Ok(());
            for chunk in bytes.chunks(4096) {
                out.write_all(chunk).unwrap();
                w += chunk.len() as u64;
                r = f.advance(w);
                if r.is_err() {
                    refused_at = Some(w);
                    break;
                }
            }
            r
        };
        let err = r.unwrap_err().to_string();
        assert!(err.contains("refused y"), "{err}");
        // The tensor list is at the front: refused within the first pieces.
        assert!(refused_at.unwrap() <= 16384, "{refused_at:?}");
    }

    #[test]
    fn a_truncated_file_fails_like_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.pt");
        let mut sd = BTreeMap::new();
        sd.insert("x".to_string(), tensor(DType::F32, &[256, 256], 3));
        write_pt_tensors(&src, &sd, &Default::default()).unwrap();
        let bytes = std::fs::read(&src).unwrap();
        let dst = dir.path().join("cut.pt");
        std::fs::write(&dst, &bytes[..bytes.len() - 100]).unwrap();
        let mut f = PtFollower::new(&dst, Seen::default()).unwrap();
        f.advance(bytes.len() as u64 - 100).unwrap();
        let err = f.finish(bytes.len() as u64 - 100).unwrap_err();
        assert!(
            matches!(err, PtError::Truncated { .. } | PtError::CorruptZip { .. }),
            "{err}"
        );
    }

    /// The Python with real PyTorch 2.11 (`MINER_PYTHON`, else `.deps/venv/bin/python`).
    fn python() -> PathBuf {
        let p = match std::env::var_os("MINER_PYTHON") {
            Some(p) => PathBuf::from(p),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps/venv/bin/python"),
        };
        assert!(
            p.exists(),
            "Python with PyTorch not found at {} (set MINER_PYTHON or run scripts/setup-python.sh)",
            p.display()
        );
        p
    }

    fn torch_save(script: &str, out: &Path) {
        let st = std::process::Command::new(python())
            .arg("-c")
            .arg(script)
            .arg(out)
            .env("OMP_NUM_THREADS", "1")
            .status()
            .unwrap();
        assert!(st.success(), "python failed");
    }

    #[test]
    fn torch_save_files_in_model_order_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("model_expgroup_0.pt");
        // Model order (layers 2, 10; gate/up/down) differs from sorted order; mixed dtypes.
        torch_save(
            r#"
import sys, collections, torch
g = torch.Generator().manual_seed(7)
sd = collections.OrderedDict()
for layer in (2, 10):
    for e in (5, 1):
        for p in ("gate_proj", "up_proj", "down_proj"):
            sd[f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"] = torch.randn(384, 512, generator=g).to(torch.float16)
sd["model.layers.2.mlp.gate.weight"] = torch.randn(64, 512, generator=g)
sd["model.layers.10.mlp.gate.e_score_correction_bias"] = torch.randn(64, generator=g).to(torch.bfloat16)
torch.save({"model_state_dict": sd}, sys.argv[1])
"#,
            &src,
        );
        let expected = hash_pt_file(&src).unwrap();
        let followed = replay(
            &src,
            &dir.path().join("copy.pt"),
            32 << 10,
            Seen::default(),
            |_, f| assert!(f.following()),
        )
        .unwrap();
        assert!(followed.streamed, "{followed:?}");
        assert_eq!(followed.hash, expected);
    }

    #[test]
    fn views_the_stream_cannot_follow_fall_back_to_a_full_pass() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("views.pt");
        torch_save(
            r#"
import sys, torch
base = torch.arange(0, 4096, dtype=torch.float32).reshape(64, 64)
torch.save({"model_state_dict": {"a.t": base.t(), "b.row": base[3], "c.plain": torch.ones(8, 8)}}, sys.argv[1])
"#,
            &src,
        );
        let expected = hash_pt_file(&src).unwrap();
        let followed = replay(
            &src,
            &dir.path().join("copy.pt"),
            4096,
            Seen::default(),
            |_, _| {},
        )
        .unwrap();
        assert!(!followed.streamed, "a transposed view is not contiguous");
        assert_eq!(followed.hash, expected);
    }
}
