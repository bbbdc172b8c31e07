//! Selective reading of HuggingFace `*.safetensors` files: parses the header and reads only the byte
//! ranges of the tensors asked for (a DeepSeek-V2-Lite checkpoint is ~31 GB; a partial model needs a
//! fraction of it).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use tch::{Kind, Tensor};

#[derive(Debug, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<i64>,
    data_offsets: [u64; 2],
}

/// One tensor listed in a safetensors header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub file: PathBuf,
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

pub fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F64" => Kind::Double,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

/// The safetensors dtype name of a kind [`kind_of`] accepts.
pub fn dtype_str(k: Kind) -> &'static str {
    match k {
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Int16 => "I16",
        Kind::Int8 => "I8",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        _ => "?",
    }
}

/// Reads the header of one safetensors file.
pub fn read_header(path: &Path) -> anyhow::Result<BTreeMap<String, TensorInfo>> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let file_len = f
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("read safetensors header length of {}", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES || 8 + n > file_len {
        bail!(
            "{}: safetensors header length {n} is invalid",
            path.display()
        );
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("read safetensors header of {}", path.display()))?;
    parse_header(&header, file_len, path)
}

/// Most bytes a safetensors header may have (the real DeepSeek-V2-Lite shards have ~100 KB).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Parses the JSON header of a safetensors file of `file_len` bytes (`header` is the `n` bytes after
/// the 8-byte length); every tensor's range must lie inside the file and hold exactly
/// `numel * element size` bytes. `file` is recorded in each [`TensorInfo`].
pub fn parse_header(
    header: &[u8],
    file_len: u64,
    file: &Path,
) -> anyhow::Result<BTreeMap<String, TensorInfo>> {
    let path = file;
    let n = header.len() as u64;
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header)
        .with_context(|| format!("parse safetensors header of {}", path.display()))?;
    let base = 8 + n;
    let mut out = BTreeMap::new();
    for (name, v) in raw {
        if name == "__metadata__" {
            continue;
        }
        let e: Entry = serde_json::from_value(v)
            .with_context(|| format!("{}: bad header entry {name:?}", path.display()))?;
        let kind = kind_of(&e.dtype).with_context(|| {
            format!(
                "{}: tensor {name:?} has unsupported dtype {:?}",
                path.display(),
                e.dtype
            )
        })?;
        let [s, end] = e.data_offsets;
        let numel = e.shape.iter().try_fold(1u64, |acc, d| {
            u64::try_from(*d).ok().and_then(|d| acc.checked_mul(d))
        });
        let want = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes() as u64));
        if end < s || base.checked_add(end).is_none_or(|e| e > file_len) || Some(end - s) != want {
            bail!(
                "{}: tensor {name:?} has an inconsistent byte range",
                path.display()
            );
        }
        out.insert(
            name,
            TensorInfo {
                file: path.to_path_buf(),
                kind,
                shape: e.shape,
                start: base + s,
                end: base + end,
            },
        );
    }
    Ok(out)
}

/// The headers of every `*.safetensors` file in `dir` (sorted by file name); a name present in two
/// files is an error.
pub fn read_dir_headers(dir: &Path) -> anyhow::Result<BTreeMap<String, TensorInfo>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("list base weights dir {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no *.safetensors files", dir.display());
    }
    let mut all = BTreeMap::new();
    for f in files {
        for (name, info) in read_header(&f)? {
            if let Some(prev) = all.insert(name.clone(), info) {
                bail!(
                    "{}: tensor {name} also in {}",
                    f.display(),
                    prev.file.display()
                );
            }
        }
    }
    Ok(all)
}

/// Reads one tensor (CPU, its stored dtype).
pub fn read_tensor(info: &TensorInfo) -> anyhow::Result<Tensor> {
    let mut f = File::open(&info.file).with_context(|| format!("open {}", info.file.display()))?;
    f.seek(SeekFrom::Start(info.start))
        .with_context(|| format!("seek in {}", info.file.display()))?;
    let mut buf = vec![0u8; (info.end - info.start) as usize];
    f.read_exact(&mut buf)
        .with_context(|| format!("read tensor data from {}", info.file.display()))?;
    Tensor::f_from_data_size(&buf, &info.shape, info.kind)
        .with_context(|| format!("decode tensor from {}", info.file.display()))
}
