//! The zip container exactly as torch 2.11's (patched miniz) writer lays it out, and a reader of
//! the central directory.
//!
//! Layout of one record: local header (flags `0x0808`, method stored, CRC and sizes 0), name,
//! an optional ZIP64 extra field (when the record's size or header offset is `>= 0xFFFF_FFFF`),
//! then an `"FB"` (`0x4246`) extra field whose payload of `'Z'`s pads the data start to a multiple
//! of 64; the data; a data descriptor (16 bytes, or 24 with 8-byte sizes when the local header
//! carried a ZIP64 extra). After the records: the central directory (ZIP64 extra where a value
//! does not fit 32 bits), the ZIP64 end record and locator, and the classic end record.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::PtError;

/// Record data alignment (`.storage_alignment`).
pub(crate) const ALIGN: u64 = 64;

const LFH_SIG: u32 = 0x0403_4b50;
const CDH_SIG: u32 = 0x0201_4b50;
const DD_SIG: u32 = 0x0807_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const Z64_EOCD_SIG: u32 = 0x0606_4b50;
const Z64_LOC_SIG: u32 = 0x0706_4b50;
/// Data descriptor follows the data (bit 3) and names are UTF-8 (bit 11).
const FLAGS: u16 = 0x0808;
const U32_MAX: u64 = 0xFFFF_FFFF;
const LFH_LEN: u64 = 30;
const CDH_LEN: usize = 46;
const EOCD_LEN: usize = 22;
const Z64_EOCD_LEN: usize = 56;
const Z64_LOC_LEN: usize = 20;

fn put16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn clamp32(x: u64) -> u32 {
    x.min(U32_MAX) as u32
}

/// Whether a record of `size` bytes whose local header starts at `offset` needs ZIP64 fields
/// (miniz's rule: any value `>= 0xFFFF_FFFF`).
fn needs_zip64(offset: u64, size: u64) -> bool {
    size >= U32_MAX || offset >= U32_MAX
}

/// ZIP64 extended-information extra field with the values that do not fit 32 bits
/// (uncompressed size, compressed size, local header offset, in that order).
fn zip64_extra(usize_: u64, csize: u64, offset: u64, size_big: bool, offset_big: bool) -> Vec<u8> {
    let mut payload = Vec::new();
    if size_big {
        put64(&mut payload, usize_);
        put64(&mut payload, csize);
    }
    if offset_big {
        put64(&mut payload, offset);
    }
    let mut v = Vec::with_capacity(4 + payload.len());
    put16(&mut v, 0x0001);
    put16(&mut v, payload.len() as u16);
    v.extend_from_slice(&payload);
    v
}

/// The local file header (with its extra fields) of a record whose header starts at `offset`;
/// the record's data starts right after it, at a multiple of [`ALIGN`].
pub(crate) fn local_header(name: &str, offset: u64, size: u64) -> Vec<u8> {
    let mut extra = Vec::new();
    if needs_zip64(offset, size) {
        // miniz writes the local ZIP64 field before the data, when the compressed size is still 0.
        extra = zip64_extra(size, 0, offset, size >= U32_MAX, offset >= U32_MAX);
    }
    let start = offset + LFH_LEN + name.len() as u64 + extra.len() as u64 + 4;
    let pad = ((ALIGN - start % ALIGN) % ALIGN) as usize;
    put16(&mut extra, 0x4246); // "FB"
    put16(&mut extra, pad as u16);
    extra.extend(std::iter::repeat_n(b'Z', pad));

    let mut v = Vec::with_capacity(LFH_LEN as usize + name.len() + extra.len());
    put32(&mut v, LFH_SIG);
    put16(&mut v, 0); // version needed
    put16(&mut v, FLAGS);
    put16(&mut v, 0); // method: stored
    put16(&mut v, 0); // time
    put16(&mut v, 0); // date
    put32(&mut v, 0); // crc (in the descriptor)
    put32(&mut v, 0); // compressed size
    put32(&mut v, 0); // uncompressed size
    put16(&mut v, name.len() as u16);
    put16(&mut v, extra.len() as u16);
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&extra);
    v
}

/// The data descriptor after a record's data.
pub(crate) fn data_descriptor(offset: u64, size: u64, crc: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    put32(&mut v, DD_SIG);
    put32(&mut v, crc);
    if needs_zip64(offset, size) {
        put64(&mut v, size);
        put64(&mut v, size);
    } else {
        put32(&mut v, size as u32);
        put32(&mut v, size as u32);
    }
    v
}

/// One central directory header.
pub(crate) fn central_header(name: &str, offset: u64, size: u64, crc: u32) -> Vec<u8> {
    let extra = if needs_zip64(offset, size) {
        zip64_extra(size, size, offset, size >= U32_MAX, offset >= U32_MAX)
    } else {
        Vec::new()
    };
    let mut v = Vec::with_capacity(CDH_LEN + name.len() + extra.len());
    put32(&mut v, CDH_SIG);
    put16(&mut v, 0); // version made by
    put16(&mut v, 0); // version needed
    put16(&mut v, FLAGS);
    put16(&mut v, 0); // method
    put16(&mut v, 0); // time
    put16(&mut v, 0); // date
    put32(&mut v, crc);
    put32(&mut v, clamp32(size));
    put32(&mut v, clamp32(size));
    put16(&mut v, name.len() as u16);
    put16(&mut v, extra.len() as u16);
    put16(&mut v, 0); // comment length
    put16(&mut v, 0); // disk number start
    put16(&mut v, 0); // internal attributes
    put32(&mut v, 0); // external attributes
    put32(&mut v, clamp32(offset));
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&extra);
    v
}

/// ZIP64 end record + locator + classic end record, for a central directory of `entries`
/// headers, `cd_size` bytes long, starting at `cd_offset` (the ZIP64 end record follows it).
pub(crate) fn end_records(entries: u64, cd_offset: u64, cd_size: u64) -> Vec<u8> {
    let z64_offset = cd_offset + cd_size;
    let mut v = Vec::with_capacity(Z64_EOCD_LEN + Z64_LOC_LEN + EOCD_LEN);
    put32(&mut v, Z64_EOCD_SIG);
    put64(&mut v, (Z64_EOCD_LEN - 12) as u64);
    put16(&mut v, 0x031e); // made by: unix, 3.0
    put16(&mut v, 0x002d); // needed: 4.5 (ZIP64)
    put32(&mut v, 0);
    put32(&mut v, 0);
    put64(&mut v, entries);
    put64(&mut v, entries);
    put64(&mut v, cd_size);
    put64(&mut v, cd_offset);

    put32(&mut v, Z64_LOC_SIG);
    put32(&mut v, 0);
    put64(&mut v, z64_offset);
    put32(&mut v, 1);

    put32(&mut v, EOCD_SIG);
    put16(&mut v, 0);
    put16(&mut v, 0);
    put16(&mut v, entries.min(0xFFFF) as u16);
    put16(&mut v, entries.min(0xFFFF) as u16);
    put32(&mut v, clamp32(cd_size));
    put32(&mut v, clamp32(cd_offset));
    put16(&mut v, 0);
    v
}

struct CdEntry {
    name: String,
    offset: u64,
    size: u64,
    crc: u32,
}

struct Current {
    offset: u64,
    size: u64,
    written: u64,
    crc: crc32fast::Hasher,
    name: String,
}

/// A streaming writer of the torch zip layout. Record sizes are declared up front (they are
/// known from the tensor shapes), so headers are final when written and nothing is seeked.
pub(crate) struct ZipWriter<W: Write> {
    out: W,
    pos: u64,
    entries: Vec<CdEntry>,
    current: Option<Current>,
}

impl<W: Write> ZipWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        ZipWriter {
            out,
            pos: 0,
            entries: Vec::new(),
            current: None,
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Starts record `name` (the full name, root folder included) of exactly `size` bytes.
    pub(crate) fn start_record(&mut self, name: String, size: u64) -> io::Result<()> {
        if self.current.is_some() {
            return Err(io::Error::other(
                "zip record started before the previous one ended",
            ));
        }
        let offset = self.pos;
        let header = local_header(&name, offset, size);
        self.emit(&header)?;
        self.current = Some(Current {
            offset,
            size,
            written: 0,
            crc: crc32fast::Hasher::new(),
            name,
        });
        Ok(())
    }

    /// Appends data to the current record.
    pub(crate) fn write_data(&mut self, buf: &[u8]) -> io::Result<()> {
        let cur = self
            .current
            .as_mut()
            .ok_or_else(|| io::Error::other("zip data written outside a record"))?;
        if cur.written + buf.len() as u64 > cur.size {
            return Err(io::Error::other(format!(
                "record {} got more than its declared {} bytes",
                cur.name, cur.size
            )));
        }
        cur.crc.update(buf);
        cur.written += buf.len() as u64;
        self.out.write_all(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Bytes still owed to the current record.
    pub(crate) fn remaining(&self) -> u64 {
        self.current.as_ref().map_or(0, |c| c.size - c.written)
    }

    /// Ends the current record (its data must be complete) and writes its data descriptor.
    pub(crate) fn end_record(&mut self) -> io::Result<()> {
        let cur = self
            .current
            .take()
            .ok_or_else(|| io::Error::other("zip record ended twice"))?;
        if cur.written != cur.size {
            return Err(io::Error::other(format!(
                "record {} got {} of its declared {} bytes",
                cur.name, cur.written, cur.size
            )));
        }
        let crc = cur.crc.finalize();
        let dd = data_descriptor(cur.offset, cur.size, crc);
        self.emit(&dd)?;
        self.entries.push(CdEntry {
            name: cur.name,
            offset: cur.offset,
            size: cur.size,
            crc,
        });
        Ok(())
    }

    /// A whole small record.
    pub(crate) fn add(&mut self, name: String, data: &[u8]) -> io::Result<()> {
        self.start_record(name, data.len() as u64)?;
        self.write_data(data)?;
        self.end_record()
    }

    /// CRC32 of the records so far, combined (for the serialization id).
    pub(crate) fn combined_crc(&self) -> u64 {
        self.entries
            .iter()
            .fold(0u64, |acc, e| acc.rotate_left(5) ^ u64::from(e.crc))
    }

    /// Writes the central directory and end records; returns the sink (not yet fsynced).
    pub(crate) fn finish(mut self) -> io::Result<W> {
        if self.current.is_some() {
            return Err(io::Error::other("zip finished inside a record"));
        }
        let cd_offset = self.pos;
        let entries = std::mem::take(&mut self.entries);
        for e in &entries {
            let h = central_header(&e.name, e.offset, e.size, e.crc);
            self.emit(&h)?;
        }
        let cd_size = self.pos - cd_offset;
        let end = end_records(entries.len() as u64, cd_offset, cd_size);
        self.emit(&end)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// One record of an archive, from the central directory, checked against its local header.
#[derive(Debug, Clone)]
pub(crate) struct ZipEntry {
    /// Name without the root folder, e.g. `data.pkl`, `data/0`.
    pub name: String,
    pub header_offset: u64,
    /// Absolute offset of the record's data (after the local header and its extra fields).
    pub data_start: u64,
    pub size: u64,
}

/// The central directory of a torch zip archive.
#[derive(Debug)]
pub(crate) struct ZipIndex {
    pub root: String,
    pub entries: Vec<ZipEntry>,
    /// Record name → index into `entries`.
    by_name: HashMap<String, usize>,
}

/// Largest central directory read. torch writes ~80 bytes per record and one record per
/// storage: the full DeepSeek-V2-Lite model (~5,200 storages) needs ~0.5 MB.
const MAX_CENTRAL_DIR: u64 = 16 << 20;
/// Most records an archive may hold (one per storage plus five metadata records).
const MAX_RECORDS: u64 = 1 << 17;

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

/// At most 200 characters of an untrusted name, quoted and escaped (for error messages).
fn quoted(s: &str) -> String {
    format!("{:?}", super::reader::clip(s))
}

pub(crate) fn read_at(
    file: &File,
    path: &Path,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), PtError> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            PtError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "read of {} bytes at offset {offset} runs past the end",
                    buf.len()
                ),
            }
        } else {
            super::io_err(
                path,
                format!("read {} bytes at offset {offset}", buf.len()),
                e,
            )
        }
    })
}

/// Where the central directory is, from the end records.
struct CdLocation {
    n_entries: u64,
    cd_offset: u64,
    cd_size: u64,
}

/// One central directory header, parsed (sizes and offset with ZIP64 values applied).
struct CdHeader {
    full_name: String,
    method: u16,
    csize: u64,
    usize_: u64,
    offset: u64,
    /// Offset of the next header in the directory.
    next: usize,
}

impl ZipIndex {
    pub(crate) fn parse(file: &File, path: &Path) -> Result<ZipIndex, PtError> {
        let file_len = file
            .metadata()
            .map_err(|e| super::io_err(path, "stat", e))?
            .len();
        let corrupt = |detail: String| PtError::CorruptZip {
            path: path.to_path_buf(),
            detail,
        };
        let loc = Self::locate_cd(file, path, file_len)?;
        let mut cd = vec![0u8; loc.cd_size as usize];
        read_at(file, path, loc.cd_offset, &mut cd)?;

        let mut entries: Vec<ZipEntry> = Vec::with_capacity(loc.n_entries as usize);
        let mut by_name = HashMap::new();
        let mut root: Option<String> = None;
        let mut p = 0usize;
        for i in 0..loc.n_entries {
            let h = Self::cd_header(&cd, p, i).map_err(corrupt)?;
            p = h.next;
            let (r, rest) = match h.full_name.split_once('/') {
                Some((r, rest)) => (r, rest),
                None => {
                    return Err(corrupt(format!(
                        "record {} is not inside a root folder",
                        quoted(&h.full_name)
                    )));
                }
            };
            match &root {
                None => root = Some(r.to_string()),
                Some(existing) if existing != r => {
                    return Err(corrupt(format!(
                        "record {} is outside the root folder {}/",
                        quoted(&h.full_name),
                        quoted(existing)
                    )));
                }
                Some(_) => {}
            }
            if h.method != 0 {
                return Err(corrupt(format!(
                    "record {} is compressed (method {}); torch.save stores records",
                    quoted(rest),
                    h.method
                )));
            }
            if h.csize != h.usize_ {
                return Err(corrupt(format!(
                    "stored record {} has mismatched sizes",
                    quoted(rest)
                )));
            }
            if by_name.insert(rest.to_string(), entries.len()).is_some() {
                return Err(corrupt(format!("record {} appears twice", quoted(rest))));
            }
            let data_start = Self::check_local_header(file, path, &h, loc.cd_offset)?;
            entries.push(ZipEntry {
                name: rest.to_string(),
                header_offset: h.offset,
                data_start,
                size: h.usize_,
            });
        }
        Self::check_no_overlap(path, &entries)?;
        let root = root.ok_or_else(|| corrupt("archive has no records".into()))?;
        Ok(ZipIndex {
            root,
            entries,
            by_name,
        })
    }

    /// Finds the end records and, from them, the central directory (checked to lie inside the
    /// file before them, and to be of a plausible size).
    fn locate_cd(file: &File, path: &Path, file_len: u64) -> Result<CdLocation, PtError> {
        let corrupt = |detail: String| PtError::CorruptZip {
            path: path.to_path_buf(),
            detail,
        };
        let mut magic = [0u8; 4];
        let starts_like_zip = file_len >= 4 && {
            read_at(file, path, 0, &mut magic)?;
            u32::from_le_bytes(magic) == LFH_SIG
        };
        let missing_end = |what: &str| {
            if starts_like_zip {
                PtError::Truncated {
                    path: path.to_path_buf(),
                    detail: format!("{what} not found ({file_len} bytes)"),
                }
            } else {
                PtError::NotZip {
                    path: path.to_path_buf(),
                    detail: format!("no zip signature ({file_len} bytes)"),
                }
            }
        };
        if file_len < EOCD_LEN as u64 {
            return Err(missing_end("end of central directory"));
        }
        // The classic end record sits in the last 22 + 65535 (comment) bytes.
        let tail_len = file_len.min((EOCD_LEN + 0xFFFF + Z64_LOC_LEN) as u64) as usize;
        let tail_start = file_len - tail_len as u64;
        let mut tail = vec![0u8; tail_len];
        read_at(file, path, tail_start, &mut tail)?;
        let eocd_rel = (0..=tail_len - EOCD_LEN)
            .rev()
            .find(|&i| rd32(&tail, i) == EOCD_SIG)
            .ok_or_else(|| missing_end("end of central directory"))?;
        let eocd_pos = tail_start + eocd_rel as u64;
        let e = &tail[eocd_rel..];
        let mut loc = CdLocation {
            n_entries: u64::from(rd16(e, 10)),
            cd_size: u64::from(rd32(e, 12)),
            cd_offset: u64::from(rd32(e, 16)),
        };
        let mut cd_end_limit = eocd_pos;
        if eocd_rel >= Z64_LOC_LEN && rd32(&tail, eocd_rel - Z64_LOC_LEN) == Z64_LOC_SIG {
            let z64_pos = rd64(&tail, eocd_rel - Z64_LOC_LEN + 8);
            if z64_pos
                .checked_add(Z64_EOCD_LEN as u64)
                .is_none_or(|end| end > eocd_pos)
            {
                return Err(corrupt(format!(
                    "ZIP64 end record offset {z64_pos} is out of range"
                )));
            }
            let mut z = [0u8; Z64_EOCD_LEN];
            read_at(file, path, z64_pos, &mut z)?;
            if rd32(&z, 0) != Z64_EOCD_SIG {
                return Err(corrupt("bad ZIP64 end record signature".into()));
            }
            loc.n_entries = rd64(&z, 32);
            loc.cd_size = rd64(&z, 40);
            loc.cd_offset = rd64(&z, 48);
            cd_end_limit = z64_pos;
        }
        let cd_end = loc
            .cd_offset
            .checked_add(loc.cd_size)
            .ok_or_else(|| corrupt("central directory size overflows".into()))?;
        if cd_end > cd_end_limit {
            return Err(PtError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "central directory ({} bytes at {}) runs past its end records at {cd_end_limit}",
                    loc.cd_size, loc.cd_offset
                ),
            });
        }
        if loc.cd_size > MAX_CENTRAL_DIR
            || loc.n_entries > MAX_RECORDS
            || loc.n_entries > loc.cd_size / CDH_LEN as u64
        {
            return Err(corrupt(format!(
                "implausible central directory: {} entries in {} bytes",
                loc.n_entries, loc.cd_size
            )));
        }
        Ok(loc)
    }

    /// Parses the central directory header #`i` at `p`.
    fn cd_header(cd: &[u8], p: usize, i: u64) -> Result<CdHeader, String> {
        if p + CDH_LEN > cd.len() || rd32(cd, p) != CDH_SIG {
            return Err(format!("bad central directory header #{i}"));
        }
        let method = rd16(cd, p + 10);
        let mut csize = u64::from(rd32(cd, p + 20));
        let mut usize_ = u64::from(rd32(cd, p + 24));
        let name_len = rd16(cd, p + 28) as usize;
        let extra_len = rd16(cd, p + 30) as usize;
        let comment_len = rd16(cd, p + 32) as usize;
        let mut offset = u64::from(rd32(cd, p + 42));
        let name_start = p + CDH_LEN;
        let extra_start = name_start + name_len;
        let next = extra_start + extra_len + comment_len;
        if next > cd.len() {
            return Err(format!(
                "central directory header #{i} overruns the directory"
            ));
        }
        let full_name = std::str::from_utf8(&cd[name_start..extra_start])
            .map_err(|_| format!("record name #{i} is not UTF-8"))?
            .to_string();
        // ZIP64 extended information replaces the 0xFFFFFFFF values, in order.
        let mut x = extra_start;
        while x + 4 <= extra_start + extra_len {
            let id = rd16(cd, x);
            let len = rd16(cd, x + 2) as usize;
            let body = x + 4;
            if body + len > extra_start + extra_len {
                return Err(format!(
                    "extra field of {} overruns its header",
                    quoted(&full_name)
                ));
            }
            if id == 0x0001 {
                let mut q = body;
                for field in [&mut usize_, &mut csize, &mut offset] {
                    if *field == U32_MAX {
                        if q + 8 > body + len {
                            return Err(format!("short ZIP64 field in {}", quoted(&full_name)));
                        }
                        *field = rd64(cd, q);
                        q += 8;
                    }
                }
            }
            x = body + len;
        }
        Ok(CdHeader {
            full_name,
            method,
            csize,
            usize_,
            offset,
            next,
        })
    }

    /// Reads a record's local header and checks it against its central directory entry (same
    /// name, stored, sizes when given); the record's data must end before the central
    /// directory. Returns the absolute offset of the data.
    fn check_local_header(
        file: &File,
        path: &Path,
        h: &CdHeader,
        cd_offset: u64,
    ) -> Result<u64, PtError> {
        let corrupt = |detail: String| PtError::CorruptZip {
            path: path.to_path_buf(),
            detail,
        };
        let name = quoted(&h.full_name);
        let name_len = h.full_name.len();
        if h.offset.saturating_add(LFH_LEN + name_len as u64) > cd_offset {
            return Err(corrupt(format!(
                "local header of {name} at {} is not before the central directory at {cd_offset}",
                h.offset
            )));
        }
        let mut lh = vec![0u8; LFH_LEN as usize + name_len];
        read_at(file, path, h.offset, &mut lh)?;
        if rd32(&lh, 0) != LFH_SIG {
            return Err(corrupt(format!("bad local header for record {name}")));
        }
        let local_name_len = rd16(&lh, 26) as usize;
        if local_name_len != name_len || lh[LFH_LEN as usize..] != *h.full_name.as_bytes() {
            return Err(corrupt(format!(
                "local header of record {name} names another record"
            )));
        }
        if rd16(&lh, 8) != h.method {
            return Err(corrupt(format!(
                "local header of record {name} disagrees on the compression method"
            )));
        }
        // Sizes in the local header: 0 (a data descriptor follows), 0xFFFFFFFF (ZIP64), or the
        // central directory's.
        for at in [18, 22] {
            let v = u64::from(rd32(&lh, at));
            if v != 0 && v != U32_MAX && v != h.usize_ {
                return Err(corrupt(format!(
                    "local header of record {name} gives size {v}, the central directory {}",
                    h.usize_
                )));
            }
        }
        let start = h.offset + LFH_LEN + name_len as u64 + u64::from(rd16(&lh, 28));
        let end = start.checked_add(h.usize_);
        if end.is_none_or(|end| end > cd_offset) {
            return Err(PtError::CorruptZip {
                path: path.to_path_buf(),
                detail: format!(
                    "record {name} ({} bytes at {start}) runs into the central directory at {cd_offset}",
                    h.usize_
                ),
            });
        }
        Ok(start)
    }

    /// No record's header or data overlaps another record.
    fn check_no_overlap(path: &Path, entries: &[ZipEntry]) -> Result<(), PtError> {
        let mut by_offset: Vec<&ZipEntry> = entries.iter().collect();
        by_offset.sort_by_key(|e| e.header_offset);
        for w in by_offset.windows(2) {
            if w[0].data_start + w[0].size > w[1].header_offset {
                return Err(PtError::CorruptZip {
                    path: path.to_path_buf(),
                    detail: format!(
                        "records {} and {} overlap",
                        quoted(&w[0].name),
                        quoted(&w[1].name)
                    ),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn find(&self, name: &str) -> Option<&ZipEntry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// The absolute offset of a record's data (checked at parse time to lie in the file).
    pub(crate) fn data_offset(&self, e: &ZipEntry) -> u64 {
        e.data_start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_record_header_matches_torch() {
        // Bytes of torch 2.11's first record of model_expgroup_0.pt (data.pkl, 0x162 bytes).
        let h = local_header("model_expgroup_0/data.pkl", 0, 0x162);
        assert_eq!(h.len(), 64);
        assert_eq!(&h[..4], b"PK\x03\x04");
        assert_eq!(&h[6..8], &[0x08, 0x08]);
        assert_eq!(&h[28..30], &[9, 0]);
        assert_eq!(&h[55..], b"FB\x05\x00ZZZZZ");
        let dd = data_descriptor(0, 0x162, 0x990c_bce7);
        assert_eq!(hex::encode(dd), "504b0708e7bc0c996201000062010000");
    }

    #[test]
    fn zip64_local_header_for_big_record_at_big_offset() {
        let name = "model_shared/data/7";
        let offset = 5 * (1u64 << 30) + 3;
        let size = 4 * (1u64 << 30) + 17;
        let h = local_header(name, offset, size);
        // Data start is aligned.
        assert_eq!((offset + h.len() as u64) % ALIGN, 0);
        let extra = &h[30 + name.len()..];
        assert_eq!(rd16(&h, 28) as usize, extra.len());
        // ZIP64 field first: id 1, 24 bytes: uncompressed, compressed (0 as miniz), offset.
        assert_eq!(rd16(extra, 0), 1);
        assert_eq!(rd16(extra, 2), 24);
        assert_eq!(rd64(extra, 4), size);
        assert_eq!(rd64(extra, 12), 0);
        assert_eq!(rd64(extra, 20), offset);
        assert_eq!(&extra[28..30], b"FB");
        assert_eq!(rd16(extra, 30) as usize, extra.len() - 32);
        // 24-byte descriptor with 8-byte sizes.
        let dd = data_descriptor(offset, size, 7);
        assert_eq!(dd.len(), 24);
        assert_eq!(rd64(&dd, 8), size);
        assert_eq!(rd64(&dd, 16), size);
        // Central header: both 32-bit sizes and the offset are 0xFFFFFFFF, real values in extra.
        let c = central_header(name, offset, size, 7);
        assert_eq!(rd32(&c, 20), 0xFFFF_FFFF);
        assert_eq!(rd32(&c, 24), 0xFFFF_FFFF);
        assert_eq!(rd32(&c, 42), 0xFFFF_FFFF);
        let cx = &c[46 + name.len()..];
        assert_eq!(rd16(&c, 30) as usize, cx.len());
        assert_eq!((rd16(cx, 0), rd16(cx, 2)), (1, 24));
        assert_eq!(
            (rd64(cx, 4), rd64(cx, 12), rd64(cx, 20)),
            (size, size, offset)
        );
    }

    #[test]
    fn zip64_only_offset_or_only_size() {
        let name = "a/data/0";
        // Small record beyond 4 GiB: only the offset goes to the ZIP64 field.
        let offset = U32_MAX;
        let h = local_header(name, offset, 10);
        let extra = &h[30 + name.len()..];
        assert_eq!((rd16(extra, 0), rd16(extra, 2)), (1, 8));
        assert_eq!(rd64(extra, 4), offset);
        assert_eq!((offset + h.len() as u64) % ALIGN, 0);
        assert_eq!(data_descriptor(offset, 10, 0).len(), 24);
        let c = central_header(name, offset, 10, 0);
        assert_eq!(
            (rd32(&c, 20), rd32(&c, 24), rd32(&c, 42)),
            (10, 10, 0xFFFF_FFFF)
        );
        // Big record at a small offset: only the sizes.
        let size = U32_MAX;
        let c = central_header(name, 4096, size, 0);
        assert_eq!(
            (rd32(&c, 20), rd32(&c, 24), rd32(&c, 42)),
            (0xFFFF_FFFF, 0xFFFF_FFFF, 4096)
        );
        let cx = &c[46 + name.len()..];
        assert_eq!((rd16(cx, 0), rd16(cx, 2)), (1, 16));
        // Just below the limit: plain 32-bit fields, no extra, 16-byte descriptor.
        let c = central_header(name, U32_MAX - 1, U32_MAX - 1, 0);
        assert_eq!(c.len(), 46 + name.len());
        assert_eq!(data_descriptor(U32_MAX - 1, U32_MAX - 1, 0).len(), 16);
    }

    #[test]
    fn end_records_clamp_and_carry_64_bit_values() {
        let cd_offset = 6 * (1u64 << 30);
        let v = end_records(70_000, cd_offset, 5_000_000);
        assert_eq!(v.len(), 56 + 20 + 22);
        assert_eq!(rd32(&v, 0), Z64_EOCD_SIG);
        assert_eq!(rd64(&v, 4), 44);
        assert_eq!(rd64(&v, 24), 70_000);
        assert_eq!(rd64(&v, 32), 70_000);
        assert_eq!(rd64(&v, 40), 5_000_000);
        assert_eq!(rd64(&v, 48), cd_offset);
        assert_eq!(rd32(&v, 56), Z64_LOC_SIG);
        assert_eq!(rd64(&v, 64), cd_offset + 5_000_000);
        assert_eq!(rd32(&v, 72), 1);
        let e = &v[76..];
        assert_eq!(rd32(e, 0), EOCD_SIG);
        assert_eq!((rd16(e, 8), rd16(e, 10)), (0xFFFF, 0xFFFF));
        assert_eq!(rd32(e, 12), 5_000_000);
        assert_eq!(rd32(e, 16), 0xFFFF_FFFF);
    }

    #[test]
    fn reader_parses_zip64_values_from_a_synthetic_directory() {
        // A sparse file whose central directory describes a >4 GiB record at a >4 GiB offset.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.pt");
        let name = "big/data/0";
        let offset = 5 * (1u64 << 30);
        let size = 4 * (1u64 << 30) + 64;
        let lfh = local_header(name, offset, size);
        let data_end = offset + lfh.len() as u64 + size;
        let dd = data_descriptor(offset, size, 1);
        let cd_offset = data_end + dd.len() as u64;
        let cd = central_header(name, offset, size, 1);
        let end = end_records(1, cd_offset, cd.len() as u64);
        let f = File::create(&path).unwrap();
        f.write_all_at(b"PK\x03\x04", 0).unwrap();
        f.write_all_at(&lfh, offset).unwrap();
        f.write_all_at(&dd, data_end).unwrap();
        f.write_all_at(&cd, cd_offset).unwrap();
        f.write_all_at(&end, cd_offset + cd.len() as u64).unwrap();
        let f = File::open(&path).unwrap();
        let idx = ZipIndex::parse(&f, &path).unwrap();
        assert_eq!(idx.root, "big");
        let e = idx.find("data/0").unwrap();
        assert_eq!((e.header_offset, e.size), (offset, size));
        let start = idx.data_offset(e);
        assert_eq!(start, offset + lfh.len() as u64);
        assert_eq!(start % ALIGN, 0);
    }
}
