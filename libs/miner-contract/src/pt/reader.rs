//! `.pt` reader: zip central directory + restricted unpickler, tensor data read on demand.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::pickle::{self, TensorRef, UnpickleError, Value};
use super::zip::{ZipIndex, read_at};
use super::{DType, PtError, Tensor, TensorMeta, io_err, numel_of};
use crate::hash::{ModelHash, ModelHasher};

/// `data.pkl` larger than this is not a state dict we wrote or will ever read.
const MAX_PICKLE: u64 = 512 << 20;
/// Chunk size when streaming a contiguous tensor into the hasher.
const HASH_CHUNK: usize = 8 << 20;

/// The top-level object of a checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtLayout {
    /// `{"model_state_dict": {name: tensor}}` (the shards).
    ModelStateDict,
    /// A plain `{name: tensor}` dict or `OrderedDict` (e.g. `mycelia_final.pt`).
    PlainDict,
}

/// Where one tensor's elements live in the file.
#[derive(Debug, Clone)]
struct View {
    /// Absolute file offset of the storage record's data.
    record_start: u64,
    /// In elements.
    offset: u64,
    stride: Vec<usize>,
    contiguous: bool,
}

/// An open checkpoint: the tensor list is parsed on open, tensor data is read on demand.
#[derive(Debug)]
pub struct PtReader {
    path: PathBuf,
    file: File,
    layout: PtLayout,
    entries: Vec<TensorMeta>,
    views: Vec<View>,
}

pub(super) fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    if numel_of(shape) <= 1 {
        return true;
    }
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

impl PtReader {
    /// Opens `path`, parses its zip directory and pickle, and checks every tensor against its
    /// storage record, so a bad file fails here rather than halfway through a read.
    pub fn open(path: &Path) -> Result<Self, PtError> {
        let file = File::open(path).map_err(|e| io_err(path, "open", e))?;
        let index = ZipIndex::parse(&file, path)?;
        let pkl_entry = index
            .find("data.pkl")
            .ok_or_else(|| PtError::NotACheckpoint {
                path: path.to_path_buf(),
                detail: format!("archive {}/ has no data.pkl record", index.root),
            })?;
        if pkl_entry.size > MAX_PICKLE {
            return Err(PtError::BadPickle {
                path: path.to_path_buf(),
                detail: format!("data.pkl is {} bytes", pkl_entry.size),
            });
        }
        let start = index.data_offset(&file, path, pkl_entry)?;
        let mut pkl = vec![0u8; pkl_entry.size as usize];
        read_at(&file, path, start, &mut pkl)?;
        let value = pickle::unpickle(&pkl).map_err(|e| match e {
            UnpickleError::Bad(detail) => PtError::BadPickle {
                path: path.to_path_buf(),
                detail,
            },
            UnpickleError::Forbidden(global) => PtError::ForbiddenGlobal {
                path: path.to_path_buf(),
                global,
            },
            UnpickleError::UnknownStorage(storage) => PtError::UnknownStorage {
                path: path.to_path_buf(),
                storage,
            },
        })?;
        let (layout, tensors) =
            state_dict_of(&value).map_err(|detail| PtError::NotACheckpoint {
                path: path.to_path_buf(),
                detail,
            })?;

        let mut record_starts: HashMap<String, (u64, u64)> = HashMap::new();
        let mut entries = Vec::with_capacity(tensors.len());
        let mut views = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            let key = &t.storage.key;
            let (record_start, record_len) = match record_starts.get(key) {
                Some(&v) => v,
                None => {
                    let rec = index.find(&format!("data/{key}")).ok_or_else(|| {
                        PtError::CorruptZip {
                            path: path.to_path_buf(),
                            detail: format!(
                                "tensor {name} needs storage record data/{key}, which is missing"
                            ),
                        }
                    })?;
                    let v = (index.data_offset(&file, path, rec)?, rec.size);
                    record_starts.insert(key.clone(), v);
                    v
                }
            };
            let dtype = t.storage.dtype;
            check_bounds(&t, dtype, record_len).map_err(|detail| PtError::OutOfBounds {
                path: path.to_path_buf(),
                name: name.clone(),
                detail,
            })?;
            views.push(View {
                record_start,
                offset: t.offset,
                stride: t.stride.clone(),
                contiguous: is_contiguous(&t.shape, &t.stride),
            });
            entries.push(TensorMeta {
                name,
                dtype,
                shape: t.shape.clone(),
            });
        }
        Ok(PtReader {
            path: path.to_path_buf(),
            file,
            layout,
            entries,
            views,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file wraps its tensors in `{"model_state_dict": ...}`.
    pub fn layout(&self) -> PtLayout {
        self.layout
    }

    /// The tensors, sorted by name.
    pub fn entries(&self) -> &[TensorMeta] {
        &self.entries
    }

    fn index_of(&self, name: &str) -> Result<usize, PtError> {
        self.entries
            .binary_search_by(|m| m.name.as_str().cmp(name))
            .map_err(|_| PtError::NoSuchTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// Reads one tensor as contiguous little-endian bytes (a strided view is gathered).
    pub fn read(&self, name: &str) -> Result<Tensor, PtError> {
        let i = self.index_of(name)?;
        self.read_index(i)
    }

    fn read_index(&self, i: usize) -> Result<Tensor, PtError> {
        let meta = &self.entries[i];
        let view = &self.views[i];
        let es = meta.dtype.elem_size();
        let nbytes = meta.nbytes();
        let mut data = vec![0u8; nbytes];
        if nbytes == 0 {
            // Nothing to read.
        } else if view.contiguous {
            read_at(
                &self.file,
                &self.path,
                view.record_start + view.offset * es as u64,
                &mut data,
            )?;
        } else {
            // Read the span the view covers, then gather elements in C order.
            let span_elems = 1 + meta
                .shape
                .iter()
                .zip(&view.stride)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>();
            let mut span = vec![0u8; span_elems * es];
            read_at(
                &self.file,
                &self.path,
                view.record_start + view.offset * es as u64,
                &mut span,
            )?;
            let ndim = meta.shape.len();
            let mut idx = vec![0usize; ndim];
            let mut src = 0usize;
            for out in data.chunks_exact_mut(es) {
                out.copy_from_slice(&span[src * es..src * es + es]);
                // Advance the odometer.
                for d in (0..ndim).rev() {
                    idx[d] += 1;
                    src += view.stride[d];
                    if idx[d] < meta.shape[d] {
                        break;
                    }
                    src -= view.stride[d] * idx[d];
                    idx[d] = 0;
                }
            }
        }
        Ok(Tensor {
            dtype: meta.dtype,
            shape: meta.shape.clone(),
            data,
        })
    }

    /// The model hash (§7.5) of the tensors as stored, streamed in chunks.
    pub fn model_hash(&self) -> Result<ModelHash, PtError> {
        let mut hasher = ModelHasher::new();
        let mut buf = Vec::new();
        for (i, meta) in self.entries.iter().enumerate() {
            hasher.update(meta.name.as_bytes());
            let view = &self.views[i];
            if view.contiguous {
                let es = meta.dtype.elem_size() as u64;
                let mut pos = view.record_start + view.offset * es;
                let mut left = meta.nbytes();
                while left > 0 {
                    let n = left.min(HASH_CHUNK);
                    buf.resize(n, 0);
                    read_at(&self.file, &self.path, pos, &mut buf)?;
                    hasher.update(&buf);
                    pos += n as u64;
                    left -= n;
                }
            } else {
                hasher.update(&self.read_index(i)?.data);
            }
        }
        Ok(hasher.finalize())
    }

    /// For each tensor (in [`PtReader::entries`] order): the absolute file offset of its first
    /// element and whether its view is contiguous (to cross-check a streamed parse).
    pub(crate) fn data_starts(&self) -> Vec<(u64, bool)> {
        self.entries
            .iter()
            .zip(&self.views)
            .map(|(m, v)| {
                (
                    v.record_start + v.offset * m.dtype.elem_size() as u64,
                    v.contiguous,
                )
            })
            .collect()
    }

    /// Reads every tensor.
    pub fn read_all(&self) -> Result<BTreeMap<String, Tensor>, PtError> {
        (0..self.entries.len())
            .map(|i| Ok((self.entries[i].name.clone(), self.read_index(i)?)))
            .collect()
    }
}

/// Checks that every element of the view lies inside a storage record of `record_len` bytes.
fn check_bounds(t: &TensorRef, dtype: DType, record_len: u64) -> Result<(), String> {
    let es = dtype.elem_size() as u64;
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| format!("shape {:?} overflows", t.shape))?;
    if numel == 0 {
        return Ok(());
    }
    let mut last = t.offset;
    for (&d, &s) in t.shape.iter().zip(&t.stride) {
        last = (d as u64 - 1)
            .checked_mul(s as u64)
            .and_then(|x| last.checked_add(x))
            .ok_or_else(|| format!("shape {:?} with stride {:?} overflows", t.shape, t.stride))?;
    }
    let end = last
        .checked_add(1)
        .and_then(|e| e.checked_mul(es))
        .ok_or_else(|| "extent overflows".to_string())?;
    if end > record_len {
        return Err(format!(
            "shape {:?}, stride {:?}, offset {} of {} need {end} bytes but storage record data/{} has {record_len}",
            t.shape, t.stride, t.offset, dtype, t.storage.key
        ));
    }
    Ok(())
}

/// The state dict inside an unpickled checkpoint, sorted by name (a repeated key: last wins).
pub(super) fn state_dict_of(
    v: &Value,
) -> Result<(PtLayout, BTreeMap<String, Rc<TensorRef>>), String> {
    let Value::Dict(top) = v else {
        return Err(format!("top-level object is a {}, not a dict", v.kind()));
    };
    let top = top.borrow();
    let wrapped = top
        .iter()
        .rev()
        .find(|(k, _)| matches!(k, Value::Str(s) if s == "model_state_dict"))
        .map(|(_, v)| v.clone());
    let (layout, items) = match wrapped {
        Some(Value::Dict(inner)) => (PtLayout::ModelStateDict, inner.borrow().clone()),
        Some(other) => {
            return Err(format!(
                "model_state_dict is a {}, not a dict",
                other.kind()
            ));
        }
        None => (PtLayout::PlainDict, top.clone()),
    };
    let mut out = BTreeMap::new();
    for (k, v) in items {
        let Value::Str(name) = &k else {
            return Err(format!("state dict key is a {}, not a str", k.kind()));
        };
        match v {
            Value::Tensor(t) => {
                out.insert(name.clone(), t);
            }
            other => {
                return Err(format!(
                    "entry {name:?} is a {}, not a tensor",
                    other.kind()
                ));
            }
        }
    }
    if out.is_empty() {
        return Err("the state dict holds no tensors".into());
    }
    Ok((layout, out))
}

/// Reads every tensor of a checkpoint file.
pub fn read_pt(path: &Path) -> Result<BTreeMap<String, Tensor>, PtError> {
    PtReader::open(path)?.read_all()
}
