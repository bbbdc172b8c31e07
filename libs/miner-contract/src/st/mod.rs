//! The `.safetensors` codec: the shard format of the live subnet since May 2026 (addendum A1):
//! `safetensors.torch.save_file({name: tensor})`, a flat name→tensor map, no wrapper, no
//! `__metadata__` needed.
//!
//! File layout: an 8-byte little-endian header length `n`, `n` bytes of JSON
//! (`{"name":{"dtype":"F16","shape":[..],"data_offsets":[begin,end]},..}`, padded with spaces to
//! a multiple of 8), then the tensors' raw little-endian C-order bytes, back to back.
//!
//! * [`write_safetensors`] streams a state dict into exactly the bytes Python's `save_file`
//!   writes for the same tensors (tensors ordered by dtype alignment, then name; header JSON as
//!   serde_json prints it; space padding), computing the model hash in the same pass.
//! * [`StReader`] opens a file by reading only its header; tensor data is read on demand.
//! * [`StFollower`] verifies a file while it is being written (a download).
//!
//! **Invariant (hostile input):** a header is at most [`MAX_HEADER`] bytes (an expert group's
//! header is tens of KiB), parsed by serde_json (recursion-limited; no value type here nests);
//! every tensor's offsets are checked (in order, contiguous from 0, size = numel × element size,
//! no overflow) and the file must end exactly at the last tensor: no junk, no truncation. Only
//! the dtypes of [`DType`] are accepted. Every error is one line, untrusted text escaped.

mod follow;
mod header;
mod reader;
mod writer;

use std::path::PathBuf;

pub use follow::{StCheck, StFollower};
pub use header::{MAX_HEADER, StEntry, dtype_from_st_name, st_dtype_name};
pub use reader::{StReader, hash_safetensors_file, read_safetensors};
pub use writer::{write_safetensors, write_safetensors_tensors};

/// Everything that can go wrong reading or writing a `.safetensors` file. Every message is one
/// line that names the file; text taken from the file is escaped.
#[derive(Debug, thiserror::Error)]
pub enum StError {
    /// The OS refused a read/write/fsync/rename (disk full, permissions, missing file).
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// The file ends before what its header promises (an interrupted write or download).
    #[error("{path}: truncated safetensors file: {detail}")]
    Truncated { path: PathBuf, detail: String },
    /// The header length, UTF-8 or JSON is not a safetensors header.
    #[error("{path}: bad safetensors header: {detail}")]
    BadHeader { path: PathBuf, detail: String },
    /// A dtype outside [`DType`](crate::pt::DType) (e.g. `F8_E4M3`, `U32`, `C64`).
    #[error("{path}: tensor {name}: unsupported dtype {dtype}")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    /// A tensor's offsets or shape are inconsistent (overlap, gap, size mismatch, overflow).
    #[error("{path}: tensor {name}: bad data offsets: {detail}")]
    BadOffsets {
        path: PathBuf,
        name: String,
        detail: String,
    },
    /// Bytes after the last tensor.
    #[error("{path}: {detail}")]
    TrailingData { path: PathBuf, detail: String },
    /// A valid file that is not a checkpoint (no tensors).
    #[error("{path}: not a checkpoint: {detail}")]
    NotACheckpoint { path: PathBuf, detail: String },
    /// [`StReader::read`] was asked for a name the file does not hold.
    #[error("{path}: no tensor named {name}")]
    NoSuchTensor { path: PathBuf, name: String },
    /// The caller's input to a writer is inconsistent (duplicate names, wrong data length).
    #[error("{path}: invalid tensor {name}: {detail}")]
    InvalidTensor {
        path: PathBuf,
        name: String,
        detail: String,
    },
}

impl StError {
    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            StError::Io { path, .. }
            | StError::Truncated { path, .. }
            | StError::BadHeader { path, .. }
            | StError::UnsupportedDtype { path, .. }
            | StError::BadOffsets { path, .. }
            | StError::TrailingData { path, .. }
            | StError::NotACheckpoint { path, .. }
            | StError::NoSuchTensor { path, .. }
            | StError::InvalidTensor { path, .. } => path,
        }
    }
}

pub(crate) fn io_err(
    path: &std::path::Path,
    op: impl Into<String>,
    source: std::io::Error,
) -> StError {
    StError::Io {
        path: path.to_path_buf(),
        op: op.into(),
        source,
    }
}

/// Untrusted text made safe for a one-line message: control characters, quotes and
/// backslashes escaped (`{:?}` style, without the surrounding quotes), cut to 200 characters.
pub(crate) fn escape(s: &str) -> String {
    let mut out: String = s.chars().take(200).flat_map(char::escape_debug).collect();
    if s.chars().nth(200).is_some() {
        out.push('…');
    }
    out
}

/// A tensor name from a file, quoted and escaped.
pub(crate) fn quoted(name: &str) -> String {
    format!("\"{}\"", escape(name))
}

/// Reads exactly `buf.len()` bytes at `offset`, reporting a short file as truncation.
pub(crate) fn read_exact_at(
    file: &std::fs::File,
    path: &std::path::Path,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), StError> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "{} bytes at offset {offset} are past the end of the file",
                    buf.len()
                ),
            }
        } else {
            io_err(path, "read", e)
        }
    })
}
