//! Streaming `.pt` writer.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, channel, sync_channel};

use super::zip::ZipWriter;
use super::{PtError, PtWriteOptions, Tensor, TensorMeta, io_err, pickle};
use crate::hash::{ModelHash, ModelHasher};

/// Write buffer: large enough that the per-write syscall cost vanishes, small enough to keep
/// memory flat.
const WRITE_BUF: usize = 4 << 20;

/// Bytes per buffer handed to the hashing thread, and how many such buffers may exist: the
/// pipe holds at most `(PIPE_BUFS + 2) * PIPE_CHUNK` (12 MiB) whatever the file size.
const PIPE_CHUNK: usize = 2 << 20;
const PIPE_BUFS: usize = 4;

/// Feeds the model hasher on its own thread, so BLAKE2b (the slowest step) overlaps the write.
/// Bytes are copied into recycled buffers; order is preserved by the channel.
struct HashPipe {
    /// Dropping it ends the hashing thread's input.
    tx: SyncSender<Vec<u8>>,
    /// Buffers the hashing thread has finished with.
    free: Receiver<Vec<u8>>,
    current: Vec<u8>,
    allocated: usize,
}

impl HashPipe {
    /// Starts the hashing thread inside `scope`; its handle yields the hash once the pipe is
    /// dropped.
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

    /// Sends what is buffered and closes the pipe.
    fn finish(mut self) -> io::Result<()> {
        if !self.current.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

/// Where a tensor's bytes go: the zip record (with its CRC) and the model hasher.
struct TensorSink<'a, W: Write> {
    zip: &'a mut ZipWriter<W>,
    hasher: &'a mut HashPipe,
    overflow: bool,
}

impl<W: Write> Write for TensorSink<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.len() as u64 > self.zip.remaining() {
            self.overflow = true;
            return Err(io::Error::other("more bytes than the tensor's shape holds"));
        }
        self.zip.write_data(buf)?;
        self.hasher.update(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The hidden sibling a file is written to before it is renamed into place.
fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// The zip root folder: the file stem, as torch uses (`model_expgroup_0` for `model_expgroup_0.pt`).
fn archive_root(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && !s.contains('/'))
        .unwrap_or("archive")
        .to_string()
}

/// Writes a state dict to `path` in the torch 2.11 `.pt` layout, streaming tensor by tensor.
///
/// Tensors are written in sorted-name order; `fill` is called once per tensor, in that order,
/// and must write exactly `meta.nbytes()` little-endian C-order bytes. The model hash (§7.5) and
/// the records' CRC32s are computed from those bytes as they pass. The file is written to a
/// hidden sibling (`.<name>.partial`), fsynced, and renamed onto `path` (then the directory is
/// fsynced), so `path` never holds a partial file. Memory use does not grow with file size.
pub fn write_pt<F>(
    path: &Path,
    mut tensors: Vec<TensorMeta>,
    opts: &PtWriteOptions,
    mut fill: F,
) -> Result<ModelHash, PtError>
where
    F: FnMut(&TensorMeta, &mut dyn Write) -> io::Result<()>,
{
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(PtError::InvalidTensor {
            path: path.to_path_buf(),
            name: w[0].name.clone(),
            detail: "name appears twice".into(),
        });
    }
    for t in &tensors {
        let overflow = t
            .shape
            .iter()
            .try_fold(t.dtype.elem_size(), |acc, &d| acc.checked_mul(d))
            .is_none_or(|n| n > isize::MAX as usize);
        if overflow {
            return Err(PtError::InvalidTensor {
                path: path.to_path_buf(),
                name: t.name.clone(),
                detail: format!("shape {:?} is too large", t.shape),
            });
        }
    }
    let tmp = partial_path(path);
    let result = write_to(path, &tmp, &tensors, opts, &mut fill);
    match result {
        Ok(hash) => Ok(hash),
        Err(e) => {
            // Best effort: the partial file is useless; the error that matters is `e`.
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_to<F>(
    path: &Path,
    tmp: &Path,
    tensors: &[TensorMeta],
    opts: &PtWriteOptions,
    fill: &mut F,
) -> Result<ModelHash, PtError>
where
    F: FnMut(&TensorMeta, &mut dyn Write) -> io::Result<()>,
{
    let root = archive_root(path);
    let werr = |e: io::Error| io_err(path, "write", e);
    let file = File::create(tmp).map_err(|e| io_err(tmp, "create", e))?;
    let mut zip = ZipWriter::new(BufWriter::with_capacity(WRITE_BUF, file));

    let pkl = pickle::state_dict_pickle(tensors, opts.wrap_model_state_dict);
    zip.add(format!("{root}/data.pkl"), &pkl).map_err(werr)?;
    zip.add(format!("{root}/.format_version"), b"1")
        .map_err(werr)?;
    zip.add(format!("{root}/.storage_alignment"), b"64")
        .map_err(werr)?;
    zip.add(format!("{root}/byteorder"), b"little")
        .map_err(werr)?;

    std::thread::scope(|scope| {
        let (mut hasher, handle) = HashPipe::start(scope);
        let written = write_records(path, &root, tensors, fill, &mut zip, &mut hasher);
        let closed = hasher.finish();
        // The thread cannot panic (it only hashes); if it somehow did, report it as an I/O error.
        let hash = handle.join().map_err(|_| {
            io_err(
                path,
                "hash",
                io::Error::other("model hashing thread panicked"),
            )
        });
        written?;
        closed.map_err(werr)?;
        finish_file(path, tmp, &root, zip)?;
        hash
    })
}

/// The tensor records, in order, each hashed (name then bytes) as it is written.
fn write_records<F, W: Write>(
    path: &Path,
    root: &str,
    tensors: &[TensorMeta],
    fill: &mut F,
    zip: &mut ZipWriter<W>,
    hasher: &mut HashPipe,
) -> Result<(), PtError>
where
    F: FnMut(&TensorMeta, &mut dyn Write) -> io::Result<()>,
{
    let werr = |e: io::Error| io_err(path, "write", e);
    for (i, meta) in tensors.iter().enumerate() {
        zip.start_record(format!("{root}/data/{i}"), meta.nbytes() as u64)
            .map_err(werr)?;
        hasher.update(meta.name.as_bytes()).map_err(werr)?;
        let mut sink = TensorSink {
            zip,
            hasher,
            overflow: false,
        };
        let filled = fill(meta, &mut sink);
        let overflow = sink.overflow;
        let remaining = zip.remaining();
        match filled {
            Err(_) if overflow => {
                return Err(PtError::InvalidTensor {
                    path: path.to_path_buf(),
                    name: meta.name.clone(),
                    detail: format!(
                        "fill wrote more than the {} bytes of its shape",
                        meta.nbytes()
                    ),
                });
            }
            Err(e) => return Err(io_err(path, format!("fill tensor {}", meta.name), e)),
            Ok(()) if remaining != 0 => {
                return Err(PtError::InvalidTensor {
                    path: path.to_path_buf(),
                    name: meta.name.clone(),
                    detail: format!(
                        "fill wrote {} of the {} bytes of its shape",
                        meta.nbytes() as u64 - remaining,
                        meta.nbytes()
                    ),
                });
            }
            Ok(()) => {}
        }
        zip.end_record().map_err(werr)?;
    }
    Ok(())
}

/// The trailing records, the central directory and end records; then fsync, rename into place
/// and fsync the directory.
fn finish_file(
    path: &Path,
    tmp: &Path,
    root: &str,
    mut zip: ZipWriter<BufWriter<File>>,
) -> Result<(), PtError> {
    let werr = |e: io::Error| io_err(path, "write", e);
    zip.add(format!("{root}/version"), b"3\n").map_err(werr)?;
    let id = format!("{:020}{:020}", rand::random::<u64>(), zip.combined_crc());
    zip.add(format!("{root}/.data/serialization_id"), id.as_bytes())
        .map_err(werr)?;
    let buf = zip.finish().map_err(werr)?;
    let file = buf
        .into_inner()
        .map_err(|e| io_err(path, "write", e.into_error()))?;
    file.sync_all().map_err(|e| io_err(tmp, "fsync", e))?;
    drop(file);
    std::fs::rename(tmp, path)
        .map_err(|e| io_err(path, format!("rename {} into place", tmp.display()), e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, "fsync directory", e))?;
    }
    Ok(())
}

/// Writes in-memory tensors (see [`write_pt`]); each tensor's data must match its shape.
pub fn write_pt_tensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    opts: &PtWriteOptions,
) -> Result<ModelHash, PtError> {
    for (name, t) in tensors {
        let want = t.meta(name.as_str()).nbytes();
        if t.data.len() != want {
            return Err(PtError::InvalidTensor {
                path: path.to_path_buf(),
                name: name.clone(),
                detail: format!(
                    "{} data bytes for shape {:?} of {} (expected {want})",
                    t.data.len(),
                    t.shape,
                    t.dtype
                ),
            });
        }
    }
    let metas = tensors.iter().map(|(n, t)| t.meta(n.as_str())).collect();
    write_pt(path, metas, opts, |meta, out| {
        let t = tensors
            .get(&meta.name)
            .ok_or_else(|| io::Error::other("tensor vanished"))?;
        out.write_all(&t.data)
    })
}
