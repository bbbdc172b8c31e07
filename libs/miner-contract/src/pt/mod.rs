//! The `.pt` codec: files that PyTorch 2.11 `torch.save` writes and `torch.load(weights_only=True)`
//! reads, restricted to state dicts of dense CPU tensors.
//!
//! * [`write_pt`] streams a state dict tensor by tensor into the exact torch 2.11 zip layout
//!   (stored records under a root folder named after the file stem, 64-byte aligned data, data
//!   descriptors, ZIP64 end records) and returns the model hash computed in the same pass.
//! * [`PtReader`] reads files written by us or by Python: the zip central directory plus a
//!   restricted unpickler that knows only the globals `weights_only` loading allows and never
//!   executes anything.
//!
//! **Hostile input:** the reader and the follower are safe on any bytes: no recursion (the
//! pickle's objects live in an arena), allocations budgeted against the input's size,
//! `data.pkl`, the central directory and record counts capped, every tensor view checked
//! against its storage before data is read, records that overlap or disagree with the central
//! directory refused, and untrusted text escaped in every error message. [`Expected`] refuses
//! a file whose names, dtypes or shapes are not the caller's, before any data is read.
//!
//! **Invariant:** a file written here is published atomically: it is written to a hidden
//! sibling, fsynced, then renamed onto the final path.

mod expected;
mod follow;
mod pickle;
mod reader;
mod writer;
mod zip;

use std::fmt;
use std::path::PathBuf;

pub use expected::{Expected, ExpectedTensor};
pub use follow::{FollowCheck, Followed, PtFollower};
pub use reader::{PtLayout, PtReader, read_pt};
pub use writer::{write_pt, write_pt_tensors};

/// The storage dtypes a checkpoint may hold (the dense torch storage classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F16,
    BF16,
    F32,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub const ALL: [DType; 10] = [
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn elem_size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The torch name, e.g. `torch.float16`.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F16 => "torch.float16",
            DType::BF16 => "torch.bfloat16",
            DType::F32 => "torch.float32",
            DType::F64 => "torch.float64",
            DType::I64 => "torch.int64",
            DType::I32 => "torch.int32",
            DType::I16 => "torch.int16",
            DType::I8 => "torch.int8",
            DType::U8 => "torch.uint8",
            DType::Bool => "torch.bool",
        }
    }

    /// The storage class `torch.save` pickles for this dtype, e.g. `HalfStorage`.
    pub fn storage_class(self) -> &'static str {
        match self {
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::F32 => "FloatStorage",
            DType::F64 => "DoubleStorage",
            DType::I64 => "LongStorage",
            DType::I32 => "IntStorage",
            DType::I16 => "ShortStorage",
            DType::I8 => "CharStorage",
            DType::U8 => "ByteStorage",
            DType::Bool => "BoolStorage",
        }
    }

    /// The dtype of a `torch.<name>` storage class, if it is one we hold.
    pub fn from_storage_class(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.storage_class() == name)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// Number of elements of a shape (1 for a 0-dim tensor).
pub fn numel_of(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// C-contiguous strides the way torch computes them (a zero-size dimension counts as 1).
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1].max(1));
    }
    strides
}

/// Name, dtype and shape of one tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorMeta {
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<usize>) -> Self {
        TensorMeta {
            name: name.into(),
            dtype,
            shape,
        }
    }

    pub fn numel(&self) -> usize {
        numel_of(&self.shape)
    }

    /// Bytes of the contiguous little-endian data.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.elem_size()
    }
}

/// A dense tensor: contiguous little-endian C-order bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        numel_of(&self.shape)
    }

    pub fn meta(&self, name: impl Into<String>) -> TensorMeta {
        TensorMeta::new(name, self.dtype, self.shape.clone())
    }
}

/// How [`write_pt`] lays out the top-level object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtWriteOptions {
    /// `true` (the default): `{"model_state_dict": {name: tensor}}` as the shards need (§7.2);
    /// `false`: a plain `{name: tensor}` dict as `mycelia_final.pt` (§2.4.6).
    pub wrap_model_state_dict: bool,
}

impl Default for PtWriteOptions {
    fn default() -> Self {
        PtWriteOptions {
            wrap_model_state_dict: true,
        }
    }
}

/// Displays an untrusted string for a log line: control characters (newlines, terminal
/// escapes) and bidirectional-text overrides are written as `\u{..}` escapes, nothing else
/// changes. Every string field of [`PtError`] is shown through it.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for c in self.0.chars() {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi {
                write!(f, "{}", c.escape_unicode())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

fn esc_path(p: &std::path::Path) -> String {
    Escaped(&p.to_string_lossy()).to_string()
}

/// Everything that can go wrong reading or writing a `.pt` file. Every message is one line that
/// names the file; untrusted text in it is escaped ([`Escaped`]).
#[derive(Debug, thiserror::Error)]
pub enum PtError {
    /// The OS refused a read/write/fsync/rename (disk full, permissions, missing file).
    #[error("{}: {}: {source}", esc_path(.path), Escaped(.op))]
    Io {
        path: PathBuf,
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a zip archive at all (e.g. a legacy or foreign file).
    #[error("{}: not a torch.save zip archive: {}", esc_path(.path), Escaped(.detail))]
    NotZip { path: PathBuf, detail: String },
    /// The file ends early (an interrupted write or download).
    #[error("{}: truncated file: {}", esc_path(.path), Escaped(.detail))]
    Truncated { path: PathBuf, detail: String },
    /// The zip structure is inconsistent (bad headers, missing or overlapping records,
    /// compression, local headers that disagree with the central directory).
    #[error("{}: corrupt zip archive: {}", esc_path(.path), Escaped(.detail))]
    CorruptZip { path: PathBuf, detail: String },
    /// `data.pkl` is not a pickle this reader understands, or is too big or too costly to build.
    #[error("{}: bad pickle in data.pkl: {}", esc_path(.path), Escaped(.detail))]
    BadPickle { path: PathBuf, detail: String },
    /// The pickle names a global that `torch.load(weights_only=True)` would refuse.
    #[error("{}: data.pkl references forbidden global {} (not allowed by weights_only)", esc_path(.path), Escaped(.global))]
    ForbiddenGlobal { path: PathBuf, global: String },
    /// A storage class or dtype outside [`DType`] (e.g. complex or quantized storages).
    #[error("{}: unsupported storage type {}", esc_path(.path), Escaped(.storage))]
    UnknownStorage { path: PathBuf, storage: String },
    /// Valid pickle, but not a state dict of tensors (wrong top level, no tensors, non-tensor
    /// values), or not the tensors the caller expected ([`Expected`]).
    #[error("{}: not a checkpoint: {}", esc_path(.path), Escaped(.detail))]
    NotACheckpoint { path: PathBuf, detail: String },
    /// A tensor's view does not fit its storage (past its end, more elements than it holds,
    /// an expanded view with stride 0, overflowing sizes), or a storage record's size is not
    /// the storage's.
    #[error("{}: tensor {}: data out of bounds: {}", esc_path(.path), Escaped(.name), Escaped(.detail))]
    OutOfBounds {
        path: PathBuf,
        name: String,
        detail: String,
    },
    /// [`PtReader::read`] was asked for a name the file does not hold.
    #[error("{}: no tensor named {}", esc_path(.path), Escaped(.name))]
    NoSuchTensor { path: PathBuf, name: String },
    /// The caller's input to a writer is inconsistent (duplicate names, a data length that does
    /// not match the shape, a fill callback that wrote the wrong number of bytes).
    #[error("{}: invalid tensor {}: {}", esc_path(.path), Escaped(.name), Escaped(.detail))]
    InvalidTensor {
        path: PathBuf,
        name: String,
        detail: String,
    },
}

impl PtError {
    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            PtError::Io { path, .. }
            | PtError::NotZip { path, .. }
            | PtError::Truncated { path, .. }
            | PtError::CorruptZip { path, .. }
            | PtError::BadPickle { path, .. }
            | PtError::ForbiddenGlobal { path, .. }
            | PtError::UnknownStorage { path, .. }
            | PtError::NotACheckpoint { path, .. }
            | PtError::OutOfBounds { path, .. }
            | PtError::NoSuchTensor { path, .. }
            | PtError::InvalidTensor { path, .. } => path,
        }
    }
}

/// Helper to build [`PtError::Io`].
pub(crate) fn io_err(
    path: &std::path::Path,
    op: impl Into<String>,
    source: std::io::Error,
) -> PtError {
    PtError::Io {
        path: path.to_path_buf(),
        op: op.into(),
        source,
    }
}
