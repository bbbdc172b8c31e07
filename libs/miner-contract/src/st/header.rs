//! The safetensors header: parse and validate (hostile input), and print (byte for byte what
//! Python's `safetensors` prints).
//!
//! **Invariant:** a [`Header`] that parses describes a file of exactly
//! `data_start + data_len` bytes whose tensors tile `[0, data_len)` without gaps or overlaps,
//! each `numel × element size` bytes long, with a dtype of [`DType`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

use super::{StError, escape, quoted};
use crate::pt::{DType, TensorMeta};

/// Largest header accepted. An expert group's header is about 100 bytes per tensor (exp_math:
/// 416 tensors, ~45 KiB); a whole DeepSeek-V2-Lite state dict would need under 1 MiB. The
/// `safetensors` crate allows 100 MB, which a hostile peer could make us parse.
pub const MAX_HEADER: u64 = 4 << 20;

/// The safetensors name of a dtype (`F16`, `BF16`, `BOOL`, ...).
pub fn st_dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::I16 => "I16",
        DType::I8 => "I8",
        DType::U8 => "U8",
        DType::Bool => "BOOL",
    }
}

/// The dtype of a safetensors dtype name, if it is one we hold.
pub fn dtype_from_st_name(name: &str) -> Option<DType> {
    DType::ALL.into_iter().find(|d| st_dtype_name(*d) == name)
}

/// Rank of a dtype in the `safetensors` crate's `Dtype` enum (declared in increasing
/// alignment): `save_file` lays tensors out by descending rank, then by name.
pub(crate) fn layout_rank(d: DType) -> u8 {
    match d {
        DType::Bool => 0,
        DType::U8 => 1,
        DType::I8 => 2,
        DType::I16 => 3,
        DType::F16 => 5,
        DType::BF16 => 6,
        DType::I32 => 7,
        DType::F32 => 9,
        DType::F64 => 10,
        DType::I64 => 11,
    }
}

/// The order `save_file` writes tensors in: descending dtype rank, then name.
pub(crate) fn file_order(a: &TensorMeta, b: &TensorMeta) -> std::cmp::Ordering {
    layout_rank(b.dtype)
        .cmp(&layout_rank(a.dtype))
        .then_with(|| a.name.cmp(&b.name))
}

/// One tensor of a parsed header: offsets relative to the start of the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StEntry {
    pub meta: TensorMeta,
    pub begin: u64,
    pub end: u64,
}

/// A validated header.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    /// Sorted by name.
    pub entries: Vec<StEntry>,
    /// The same tensors' metadata, sorted by name.
    pub metas: Vec<TensorMeta>,
    /// The `__metadata__` map, if any (tolerated, never interpreted).
    pub metadata: Option<BTreeMap<String, String>>,
    /// File offset of the data section (`8 + n`).
    pub data_start: u64,
    /// Length of the data section.
    pub data_len: u64,
}

impl Header {
    /// The exact length of the file this header describes.
    pub fn file_len(&self) -> u64 {
        self.data_start + self.data_len
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

struct RawHeader {
    metadata: Option<BTreeMap<String, String>>,
    tensors: Vec<(String, RawInfo)>,
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut out = RawHeader {
                    metadata: None,
                    tensors: Vec::new(),
                };
                let mut seen_metadata = false;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        if seen_metadata {
                            return Err(de::Error::custom("__metadata__ appears twice"));
                        }
                        seen_metadata = true;
                        out.metadata = map.next_value()?;
                    } else {
                        let info = map.next_value::<RawInfo>().map_err(|e| {
                            de::Error::custom(format!("tensor {}: {e}", quoted(&key)))
                        })?;
                        out.tensors.push((key, info));
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// The header length of a file starting with `first8`, checked against `max`.
pub(crate) fn header_len(path: &Path, first8: [u8; 8], max: u64) -> Result<u64, StError> {
    let n = u64::from_le_bytes(first8);
    if n > max {
        return Err(StError::BadHeader {
            path: path.to_path_buf(),
            detail: format!("header length {n} exceeds the limit of {max} bytes"),
        });
    }
    if n < 2 {
        return Err(StError::BadHeader {
            path: path.to_path_buf(),
            detail: format!("header length {n} is too short for a JSON object"),
        });
    }
    Ok(n)
}

/// Parses and validates the `n`-byte header `json` (see the module invariant).
pub(crate) fn parse_header(path: &Path, json: &[u8]) -> Result<Header, StError> {
    let bad = |detail: String| StError::BadHeader {
        path: path.to_path_buf(),
        detail,
    };
    if json.first() != Some(&b'{') {
        return Err(bad("header does not start with '{'".into()));
    }
    let text = std::str::from_utf8(json).map_err(|e| bad(format!("not UTF-8: {e}")))?;
    let raw: RawHeader =
        serde_json::from_str(text).map_err(|e| bad(format!("JSON: {}", escape(&e.to_string()))))?;
    let mut entries = Vec::with_capacity(raw.tensors.len());
    for (name, info) in raw.tensors {
        entries.push(entry_of(path, name, info)?);
    }
    if entries.is_empty() {
        return Err(StError::NotACheckpoint {
            path: path.to_path_buf(),
            detail: "the file holds no tensors".into(),
        });
    }
    entries.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
    if let Some(w) = entries
        .windows(2)
        .find(|w| w[0].meta.name == w[1].meta.name)
    {
        return Err(bad(format!(
            "tensor {} appears twice",
            quoted(&w[0].meta.name)
        )));
    }
    let data_len = check_tiling(path, &entries)?;
    let data_start = 8 + json.len() as u64;
    Ok(Header {
        metas: entries.iter().map(|e| e.meta.clone()).collect(),
        entries,
        metadata: raw.metadata,
        data_start,
        data_len,
    })
}

/// One tensor: a known dtype, a shape whose byte size does not overflow and equals its span.
fn entry_of(path: &Path, name: String, info: RawInfo) -> Result<StEntry, StError> {
    let Some(dtype) = dtype_from_st_name(&info.dtype) else {
        return Err(StError::UnsupportedDtype {
            path: path.to_path_buf(),
            name: quoted(&name),
            dtype: quoted(&info.dtype),
        });
    };
    let offsets = |detail: String| StError::BadOffsets {
        path: path.to_path_buf(),
        name: quoted(&name),
        detail,
    };
    let [begin, end] = info.data_offsets;
    let nbytes = info
        .shape
        .iter()
        .try_fold(dtype.elem_size() as u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as u64)
        .ok_or_else(|| offsets(format!("shape {:?} of {dtype} overflows", info.shape)))?;
    if end < begin || end - begin != nbytes {
        return Err(offsets(format!(
            "[{begin}, {end}] does not hold the {nbytes} bytes of shape {:?} of {dtype}",
            info.shape
        )));
    }
    let shape = info.shape.iter().map(|&d| d as usize).collect();
    Ok(StEntry {
        meta: TensorMeta::new(name, dtype, shape),
        begin,
        end,
    })
}

/// Checks that the tensors, in offset order, tile `[0, end)` exactly; returns `end`.
fn check_tiling(path: &Path, entries: &[StEntry]) -> Result<u64, StError> {
    let mut order: Vec<&StEntry> = entries.iter().collect();
    order.sort_by_key(|e| (e.begin, e.end));
    let mut at = 0u64;
    for e in order {
        if e.begin != at {
            let what = if e.begin < at {
                "overlaps"
            } else {
                "leaves a gap before"
            };
            return Err(StError::BadOffsets {
                path: path.to_path_buf(),
                name: quoted(&e.meta.name),
                detail: format!(
                    "[{}, {}] {what} the previous tensor (which ends at {at})",
                    e.begin, e.end
                ),
            });
        }
        at = e.end;
    }
    Ok(at)
}

#[derive(serde::Serialize)]
struct OutInfo<'a> {
    dtype: &'a str,
    shape: &'a [usize],
    data_offsets: [u64; 2],
}

/// `tensors` (in file order) as the header's JSON object.
struct OutMap<'a>(&'a [TensorMeta]);

impl serde::Serialize for OutMap<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        let mut at = 0u64;
        for t in self.0 {
            let n = t.nbytes() as u64;
            let info = OutInfo {
                dtype: st_dtype_name(t.dtype),
                shape: &t.shape,
                data_offsets: [at, at + n],
            };
            map.serialize_entry(&t.name, &info)?;
            at += n;
        }
        map.end()
    }
}

/// The header `save_file` writes for `tensors` given in file order: compact JSON (serde_json's
/// escaping, as the `safetensors` Rust core behind Python uses), no `__metadata__`, padded with
/// spaces to a multiple of 8.
pub(crate) fn print_header(tensors: &[TensorMeta]) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = serde_json::to_vec(&OutMap(tensors))?;
    let pad = (8 - out.len() % 8) % 8;
    out.extend(std::iter::repeat_n(b' ', pad));
    Ok(out)
}
