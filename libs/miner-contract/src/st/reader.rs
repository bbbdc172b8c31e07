//! `.safetensors` reader: opens a file by reading its header only; tensor data on demand.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::header::{Header, MAX_HEADER, header_len, parse_header};
use super::{StEntry, StError, io_err, read_exact_at};
use crate::hash::{ModelHash, ModelHasher};
use crate::pt::{Tensor, TensorMeta};

/// Chunk size when streaming a tensor into the hasher.
const HASH_CHUNK: usize = 8 << 20;

/// An open `.safetensors` file: the validated header; tensor data is read on demand.
#[derive(Debug)]
pub struct StReader {
    path: PathBuf,
    file: File,
    header: Header,
}

/// Reads and validates the header of an open file, including that the file is exactly as long
/// as the header says (`len`).
pub(crate) fn read_header(
    file: &File,
    path: &Path,
    len: u64,
    max_header: u64,
) -> Result<Header, StError> {
    let mut first8 = [0u8; 8];
    read_exact_at(file, path, 0, &mut first8)?;
    let n = header_len(path, first8, max_header)?;
    let mut json = vec![0u8; n as usize];
    read_exact_at(file, path, 8, &mut json)?;
    let header = parse_header(path, &json)?;
    check_len(path, &header, len)?;
    Ok(header)
}

/// The file must end exactly where the last tensor ends.
pub(crate) fn check_len(path: &Path, header: &Header, len: u64) -> Result<(), StError> {
    let want = header.file_len();
    if len < want {
        return Err(StError::Truncated {
            path: path.to_path_buf(),
            detail: format!("the header promises {want} bytes, the file has {len}"),
        });
    }
    if len > want {
        return Err(StError::TrailingData {
            path: path.to_path_buf(),
            detail: format!(
                "{} bytes of junk after the last tensor (the header accounts for {want} of {len})",
                len - want
            ),
        });
    }
    Ok(())
}

impl StReader {
    /// Opens `path` and validates its header against the file's length.
    pub fn open(path: &Path) -> Result<Self, StError> {
        Self::open_with_limit(path, MAX_HEADER)
    }

    /// [`StReader::open`] with a tighter header limit (e.g. sized to an expert group).
    pub fn open_with_limit(path: &Path, max_header: u64) -> Result<Self, StError> {
        let file = File::open(path).map_err(|e| io_err(path, "open", e))?;
        let len = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
        let header = read_header(&file, path, len, max_header.min(MAX_HEADER))?;
        Ok(StReader {
            path: path.to_path_buf(),
            file,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors, sorted by name.
    pub fn entries(&self) -> &[TensorMeta] {
        &self.header.metas
    }

    /// The tensors with their offsets in the data section, sorted by name.
    pub fn st_entries(&self) -> &[StEntry] {
        &self.header.entries
    }

    /// The `__metadata__` map, if the file has one.
    pub fn metadata(&self) -> Option<&BTreeMap<String, String>> {
        self.header.metadata.as_ref()
    }

    /// File offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.header.data_start
    }

    fn index_of(&self, name: &str) -> Result<usize, StError> {
        self.header
            .metas
            .binary_search_by(|m| m.name.as_str().cmp(name))
            .map_err(|_| StError::NoSuchTensor {
                path: self.path.clone(),
                name: super::quoted(name),
            })
    }

    /// Reads one tensor.
    pub fn read(&self, name: &str) -> Result<Tensor, StError> {
        let i = self.index_of(name)?;
        self.read_index(i)
    }

    fn read_index(&self, i: usize) -> Result<Tensor, StError> {
        let e = &self.header.entries[i];
        let mut data = vec![0u8; (e.end - e.begin) as usize];
        read_exact_at(
            &self.file,
            &self.path,
            self.header.data_start + e.begin,
            &mut data,
        )?;
        Ok(Tensor {
            dtype: e.meta.dtype,
            shape: e.meta.shape.clone(),
            data,
        })
    }

    /// Reads every tensor.
    pub fn read_all(&self) -> Result<BTreeMap<String, Tensor>, StError> {
        (0..self.header.entries.len())
            .map(|i| Ok((self.header.metas[i].name.clone(), self.read_index(i)?)))
            .collect()
    }

    /// The model hash (§7.5) of the tensors as stored, streamed in sorted-name order in chunks.
    pub fn model_hash(&self) -> Result<ModelHash, StError> {
        let mut hasher = ModelHasher::new();
        let mut buf = Vec::new();
        for e in &self.header.entries {
            hasher.update(e.meta.name.as_bytes());
            let mut pos = self.header.data_start + e.begin;
            let mut left = e.end - e.begin;
            while left > 0 {
                let n = left.min(HASH_CHUNK as u64);
                buf.resize(n as usize, 0);
                read_exact_at(&self.file, &self.path, pos, &mut buf)?;
                hasher.update(&buf);
                pos += n;
                left -= n;
            }
        }
        Ok(hasher.finalize())
    }
}

/// Reads every tensor of a `.safetensors` file.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>, StError> {
    StReader::open(path)?.read_all()
}

/// The model hash of a `.safetensors` file, streamed.
pub fn hash_safetensors_file(path: &Path) -> Result<ModelHash, StError> {
    StReader::open(path)?.model_hash()
}
