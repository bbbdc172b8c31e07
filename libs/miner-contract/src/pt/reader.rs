//! `.pt` reader: zip central directory + restricted unpickler, tensor data read on demand.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use super::pickle::{self, Graph, MAX_PICKLE, Node, TensorRef, UnpickleError};
use super::zip::{ZipIndex, read_at};
use super::{Expected, PtError, Tensor, TensorMeta, io_err, numel_of};
use crate::hash::{ModelHash, ModelHasher};

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
                detail: format!("archive {}/ has no data.pkl record", clip(&index.root)),
            })?;
        if pkl_entry.size > MAX_PICKLE {
            return Err(PtError::BadPickle {
                path: path.to_path_buf(),
                detail: format!(
                    "data.pkl is {} bytes (state dicts pickle to far less than the {MAX_PICKLE}-byte limit)",
                    pkl_entry.size
                ),
            });
        }
        let start = index.data_offset(pkl_entry);
        let mut pkl = vec![0u8; pkl_entry.size as usize];
        read_at(&file, path, start, &mut pkl)?;
        let graph = pickle::unpickle(&pkl).map_err(|e| unpickle_error(path, e))?;
        drop(pkl);
        let (layout, tensors) =
            state_dict_of(&graph).map_err(|detail| PtError::NotACheckpoint {
                path: path.to_path_buf(),
                detail,
            })?;
        check_views(path, tensors.iter().map(|(n, t)| (*n, *t)))?;

        let mut entries = Vec::with_capacity(tensors.len());
        let mut views = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            let record_start = storage_record(&index, path, name, t)?;
            views.push(View {
                record_start,
                offset: t.offset,
                stride: t.stride.clone(),
                contiguous: is_contiguous(&t.shape, &t.stride),
            });
            entries.push(TensorMeta {
                name: name.to_string(),
                dtype: t.storage.dtype,
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

    /// [`PtReader::open`], then [`Expected::check`] of the tensor list: a file that is not what
    /// the caller expects is refused before any tensor data is read.
    pub fn open_expecting(path: &Path, expected: &Expected) -> Result<Self, PtError> {
        let r = Self::open(path)?;
        expected.check(path, &r.entries)?;
        Ok(r)
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

/// How many times over the tensors of a file may view the bytes of its storages. State dicts
/// view each storage once; tied weights or a few views of one base stay far below this, while
/// thousands of full views of one storage would make hashing a small file take hours.
pub(super) const MAX_VIEW_FACTOR: u64 = 4;
/// Largest span a non-contiguous view may cover (it is read whole, then gathered).
pub(super) const MAX_GATHER_SPAN: u64 = 256 << 20;

/// Checks a view against its storage as the pickle declares it, before any data is read:
/// the element count and the extent fit the storage, no dimension larger than one has stride
/// zero (an expanded view), nothing overflows. Returns the view's data bytes.
pub(super) fn check_view(t: &TensorRef) -> Result<u64, String> {
    let dtype = t.storage.dtype;
    let es = dtype.elem_size() as u64;
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| format!("shape {:?} overflows", t.shape))?;
    let storage_bytes = t
        .storage
        .numel
        .checked_mul(es)
        .ok_or_else(|| format!("storage of {} elements overflows", t.storage.numel))?;
    if t.offset > t.storage.numel {
        return Err(format!(
            "offset {} is past the end of storage data/{}, which holds {} elements",
            t.offset, t.storage.key, t.storage.numel
        ));
    }
    if numel == 0 {
        return Ok(0);
    }
    if numel > t.storage.numel {
        return Err(format!(
            "shape {:?} has {numel} elements but its storage data/{} holds {}",
            t.shape, t.storage.key, t.storage.numel
        ));
    }
    if let Some(d) = t
        .shape
        .iter()
        .zip(&t.stride)
        .position(|(&d, &s)| d > 1 && s == 0)
    {
        return Err(format!(
            "dimension {d} of shape {:?} has stride 0 (an expanded view)",
            t.shape
        ));
    }
    let mut last = t.offset;
    for (&d, &s) in t.shape.iter().zip(&t.stride) {
        last = (d as u64 - 1)
            .checked_mul(s as u64)
            .and_then(|x| last.checked_add(x))
            .ok_or_else(|| format!("shape {:?} with stride {:?} overflows", t.shape, t.stride))?;
    }
    if last >= t.storage.numel {
        return Err(format!(
            "shape {:?}, stride {:?}, offset {} reach element {last} of storage data/{}, which holds {}",
            t.shape, t.stride, t.offset, t.storage.key, t.storage.numel
        ));
    }
    let span = (last - t.offset + 1) * es;
    if !is_contiguous(&t.shape, &t.stride) && span > MAX_GATHER_SPAN {
        return Err(format!(
            "non-contiguous view spans {span} bytes (at most {MAX_GATHER_SPAN} are gathered)"
        ));
    }
    debug_assert!(numel * es <= storage_bytes);
    Ok(numel * es)
}

/// Checks every view ([`check_view`]) and that together they view each storage's bytes at most
/// [`MAX_VIEW_FACTOR`] times over. Errors name the tensor.
pub(super) fn check_views<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a TensorRef)>,
) -> Result<(), PtError> {
    let mut viewed = 0u64;
    let mut storages: HashMap<&str, u64> = HashMap::new();
    for (name, t) in tensors {
        let n = check_view(t).map_err(|detail| PtError::OutOfBounds {
            path: path.to_path_buf(),
            name: name.to_string(),
            detail,
        })?;
        viewed = viewed.saturating_add(n);
        let es = t.storage.dtype.elem_size() as u64;
        storages
            .entry(t.storage.key.as_str())
            .or_insert(t.storage.numel.saturating_mul(es));
    }
    let stored = storages.values().fold(0u64, |a, &b| a.saturating_add(b));
    if viewed > stored.saturating_mul(MAX_VIEW_FACTOR).max(1 << 20) {
        return Err(PtError::NotACheckpoint {
            path: path.to_path_buf(),
            detail: format!(
                "the tensors view {viewed} bytes of {stored} bytes of storage (the same data over and over)"
            ),
        });
    }
    Ok(())
}

/// Most tensors a state dict may hold (the full DeepSeek-V2-Lite model has ~5,200).
pub(super) const MAX_TENSORS: usize = 1 << 16;

/// The state dict inside an unpickled checkpoint, sorted by name (a repeated key: last wins).
/// It borrows the graph: nothing is copied per tensor but the map's own entries.
pub(super) fn state_dict_of(g: &Graph) -> Result<(PtLayout, BTreeMap<&str, &TensorRef>), String> {
    let Some(Node::Dict(top)) = g.node(g.root) else {
        return Err(format!(
            "top-level object is a {}, not a dict",
            g.kind(g.root)
        ));
    };
    let wrapped = top
        .iter()
        .rev()
        .find(|(k, _)| g.str(*k) == Some("model_state_dict"))
        .map(|(_, v)| *v);
    let (layout, items) = match wrapped {
        Some(v) => match g.node(v) {
            Some(Node::Dict(inner)) => (PtLayout::ModelStateDict, inner),
            _ => {
                return Err(format!("model_state_dict is a {}, not a dict", g.kind(v)));
            }
        },
        None => (PtLayout::PlainDict, top),
    };
    if items.len() > MAX_TENSORS {
        return Err(format!(
            "the state dict has {} entries (at most {MAX_TENSORS} are read)",
            items.len()
        ));
    }
    let mut out = BTreeMap::new();
    for &(k, v) in items {
        let Some(name) = g.str(k) else {
            return Err(format!("state dict key is a {}, not a str", g.kind(k)));
        };
        match g.node(v) {
            Some(Node::Tensor(t)) => {
                out.insert(name, &**t);
            }
            _ => {
                return Err(format!(
                    "entry {:?} is a {}, not a tensor",
                    clip(name),
                    g.kind(v)
                ));
            }
        }
    }
    if out.is_empty() {
        return Err("the state dict holds no tensors".into());
    }
    Ok((layout, out))
}

/// At most 200 characters of an untrusted string (for error messages).
pub(super) fn clip(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The reader's error for an unpickling failure.
pub(super) fn unpickle_error(path: &Path, e: UnpickleError) -> PtError {
    match e {
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
    }
}

/// The absolute data offset of tensor `name`'s storage record, whose size must be exactly
/// what the pickle declares for the storage.
fn storage_record(
    index: &ZipIndex,
    path: &Path,
    name: &str,
    t: &TensorRef,
) -> Result<u64, PtError> {
    let key = &t.storage.key;
    let rec = index
        .find(&format!("data/{key}"))
        .ok_or_else(|| PtError::CorruptZip {
            path: path.to_path_buf(),
            detail: format!(
                "tensor {:?} needs storage record data/{key}, which is missing",
                clip(name)
            ),
        })?;
    let want = t.storage.numel * t.storage.dtype.elem_size() as u64;
    if rec.size != want {
        return Err(PtError::OutOfBounds {
            path: path.to_path_buf(),
            name: name.to_string(),
            detail: format!(
                "storage data/{key} of {} {} elements needs {want} bytes but its record has {}",
                t.storage.numel, t.storage.dtype, rec.size
            ),
        });
    }
    Ok(index.data_offset(rec))
}

/// Reads every tensor of a checkpoint file.
pub fn read_pt(path: &Path) -> Result<BTreeMap<String, Tensor>, PtError> {
    PtReader::open(path)?.read_all()
}
