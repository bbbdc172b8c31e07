//! Streaming `.safetensors` writer: the bytes Python's `safetensors.torch.save_file` writes,
//! with the model hash computed in the same pass and memory that does not grow with the file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, channel, sync_channel};

use super::header::{file_order, print_header};
use super::{StError, StReader, io_err};
use crate::hash::{ModelHash, ModelHasher};
use crate::pt::{Tensor, TensorMeta};

/// Write buffer: large enough that the per-write syscall cost vanishes, small enough to keep
/// memory flat.
const WRITE_BUF: usize = 4 << 20;
/// Bytes per buffer handed to the hashing thread, and how many may exist at once: at most
/// `(PIPE_BUFS + 2) * PIPE_CHUNK` (12 MiB) in flight whatever the file size.
const PIPE_CHUNK: usize = 2 << 20;
const PIPE_BUFS: usize = 4;

/// Feeds the model hasher on its own thread so BLAKE2b (the slowest step) overlaps the write.
struct HashPipe {
    tx: SyncSender<Vec<u8>>,
    free: Receiver<Vec<u8>>,
    current: Vec<u8>,
    allocated: usize,
}

impl HashPipe {
    fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
    ) -> (HashPipe, std::thread::ScopedJoinHandle<'scope, ModelHash>) {
        let (tx, rx) = sync_channel::<Vec<u8>>(PIPE_BUFS);
        let (free_tx, free) = channel::<Vec<u8>>();
        let handle = scope.spawn(move || {
            let mut hasher = ModelHasher::new();
            for buf in rx {
                hasher.update(&buf);
                // The writer may be gone already (error path); the buffer is then just freed.
                let _ = free_tx.send(buf);
            }
            hasher.finalize()
        });
        let pipe = HashPipe {
            tx,
            free,
            current: Vec::with_capacity(PIPE_CHUNK),
            allocated: 1,
        };
        (pipe, handle)
    }

    fn update(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(PIPE_CHUNK - self.current.len());
            self.current.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.current.len() == PIPE_CHUNK {
                self.send()?;
            }
        }
        Ok(())
    }

    fn send(&mut self) -> io::Result<()> {
        let stopped = || io::Error::other("model hashing thread stopped");
        let mut next = match self.free.try_recv() {
            Ok(b) => b,
            Err(TryRecvError::Empty) if self.allocated < PIPE_BUFS + 2 => {
                self.allocated += 1;
                Vec::with_capacity(PIPE_CHUNK)
            }
            Err(_) => self.free.recv().map_err(|_| stopped())?,
        };
        next.clear();
        let full = std::mem::replace(&mut self.current, next);
        self.tx.send(full).map_err(|_| stopped())
    }

    fn finish(mut self) -> io::Result<()> {
        if !self.current.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

/// Where one tensor's bytes go: the file, and the hasher when the file order is the hash order.
struct TensorSink<'a, W: Write> {
    out: &'a mut W,
    hasher: Option<&'a mut HashPipe>,
    remaining: u64,
    overflow: bool,
}

impl<W: Write> Write for TensorSink<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.len() as u64 > self.remaining {
            self.overflow = true;
            return Err(io::Error::other("more bytes than the tensor's shape holds"));
        }
        self.out.write_all(buf)?;
        self.remaining -= buf.len() as u64;
        match self.hasher.as_mut() {
            Some(h) => h.update(buf),
            None => Ok(()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

fn invalid(path: &Path, name: &str, detail: String) -> StError {
    StError::InvalidTensor {
        path: path.to_path_buf(),
        name: super::quoted(name),
        detail,
    }
}

/// Rejects duplicate names and shapes whose byte size overflows.
fn check_input(path: &Path, tensors: &mut [TensorMeta]) -> Result<(), StError> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(invalid(path, &w[0].name, "name appears twice".into()));
    }
    if tensors.is_empty() {
        return Err(invalid(
            path,
            "",
            "a checkpoint needs at least one tensor".into(),
        ));
    }
    for t in tensors.iter() {
        let overflow = t
            .shape
            .iter()
            .try_fold(t.dtype.elem_size(), |acc, &d| acc.checked_mul(d))
            .is_none_or(|n| n > isize::MAX as usize);
        if overflow {
            return Err(invalid(
                path,
                &t.name,
                format!("shape {:?} is too large", t.shape),
            ));
        }
    }
    Ok(())
}

/// Writes a state dict to `path` as Python's `safetensors.torch.save_file` would, streaming.
///
/// Tensors are laid out as `save_file` lays them out: by descending dtype alignment, then by
/// name, which for a shard (one dtype) is sorted-name order. `fill` is called once per tensor in
/// that order and must write exactly `meta.nbytes()` little-endian C-order bytes. The model hash
/// (§7.5) is computed from those bytes as they pass (when the file order is not the sorted-name
/// order, i.e. mixed dtypes, from the written file before it is renamed into place). The file is
/// written to `.<name>.partial`, fsynced, renamed onto `path`, and the directory fsynced.
pub fn write_safetensors<F>(
    path: &Path,
    mut tensors: Vec<TensorMeta>,
    mut fill: F,
) -> Result<ModelHash, StError>
where
    F: FnMut(&TensorMeta, &mut dyn Write) -> io::Result<()>,
{
    check_input(path, &mut tensors)?;
    let mut ordered = tensors.clone();
    ordered.sort_by(file_order);
    let hash_in_pass = ordered.iter().zip(&tensors).all(|(a, b)| a.name == b.name);
    let tmp = partial_path(path);
    let result = write_to(path, &tmp, &ordered, hash_in_pass, &mut fill);
    if result.is_err() {
        // Best effort: the partial file is useless; the error that matters is the write's.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_to<F>(
    path: &Path,
    tmp: &Path,
    ordered: &[TensorMeta],
    hash_in_pass: bool,
    fill: &mut F,
) -> Result<ModelHash, StError>
where
    F: FnMut(&TensorMeta, &mut dyn Write) -> io::Result<()>,
{
    let werr = |e: io::Error| io_err(path, "write", e);
    let header = print_header(ordered).map_err(|e| werr(io::Error::other(e)))?;
    let file = File::create(tmp).map_err(|e| io_err(tmp, "create", e))?;
    let mut out = BufWriter::with_capacity(WRITE_BUF, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(werr)?;
    out.write_all(&header).map_err(werr)?;
    let hash = std::thread::scope(|scope| {
        let (mut pipe, handle) = HashPipe::start(scope);
        let hasher = hash_in_pass.then_some(&mut pipe);
        let written = write_tensors(path, ordered, fill, &mut out, hasher);
        let closed = pipe.finish();
        let hash = handle.join().map_err(|_| {
            io_err(
                path,
                "hash",
                io::Error::other("model hashing thread panicked"),
            )
        });
        written?;
        closed.map_err(werr)?;
        hash
    })?;
    let file = out
        .into_inner()
        .map_err(|e| io_err(path, "write", e.into_error()))?;
    let hash = if hash_in_pass {
        hash
    } else {
        StReader::open(tmp)?.model_hash()?
    };
    file.sync_all().map_err(|e| io_err(tmp, "fsync", e))?;
    drop(file);
    std::fs::rename(tmp, path)
        .map_err(|e| io_err(path, format!("rename {} into place", tmp.display()), e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, "fsync directory", e))?;
    }
    Ok(hash)
}

/// Every tensor's data, in file order; each name then its bytes go to `hasher` when given.
fn write_tensors<F, W: Write>(
    path: &Path,
    ordered: &[TensorMeta],
    fill: &mut F,
    out: &mut W,
    mut hasher: Option<&mut HashPipe>,
) -> Result<(), StError>
where
    F: FnMut(&TensorMeta, &mut dyn Write) -> io::Result<()>,
{
    for meta in ordered {
        if let Some(h) = hasher.as_mut() {
            h.update(meta.name.as_bytes())
                .map_err(|e| io_err(path, "hash", e))?;
        }
        let nbytes = meta.nbytes() as u64;
        let mut sink = TensorSink {
            out,
            hasher: hasher.as_deref_mut(),
            remaining: nbytes,
            overflow: false,
        };
        let filled = fill(meta, &mut sink);
        let (overflow, remaining) = (sink.overflow, sink.remaining);
        match filled {
            Err(_) if overflow => {
                let detail = format!("fill wrote more than the {nbytes} bytes of its shape");
                return Err(invalid(path, &meta.name, detail));
            }
            Err(e) => return Err(io_err(path, format!("fill tensor {}", meta.name), e)),
            Ok(()) if remaining != 0 => {
                let detail = format!(
                    "fill wrote {} of the {nbytes} bytes of its shape",
                    nbytes - remaining
                );
                return Err(invalid(path, &meta.name, detail));
            }
            Ok(()) => {}
        }
    }
    Ok(())
}

/// Writes in-memory tensors (see [`write_safetensors`]); each tensor's data must match its shape.
pub fn write_safetensors_tensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<ModelHash, StError> {
    for (name, t) in tensors {
        let want = t.meta(name.as_str()).nbytes();
        if t.data.len() != want {
            let detail = format!(
                "{} data bytes for shape {:?} of {} (expected {want})",
                t.data.len(),
                t.shape,
                t.dtype
            );
            return Err(invalid(path, name, detail));
        }
    }
    let metas = tensors.iter().map(|(n, t)| t.meta(n.as_str())).collect();
    write_safetensors(path, metas, |meta, out| {
        let t = tensors
            .get(&meta.name)
            .ok_or_else(|| io::Error::other("tensor vanished"))?;
        out.write_all(&t.data)
    })
}
