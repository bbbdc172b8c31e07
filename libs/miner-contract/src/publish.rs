//! Atomic publish of checkpoint directories (spec §7.2, §11.2 item 2).
//!
//! A writer stages into a unique hidden sibling `.tmp_<name>.<pid>-<start>.<nonce>`, writes and
//! fsyncs every file, writes `MANIFEST.json` last, fsyncs the directory, renames it to `<name>`
//! with `RENAME_NOREPLACE`, and fsyncs the parent.
//!
//! **Invariant:** a crash at any instant leaves either no `<name>` directory (the old state) or a
//! complete one with its manifest (the new state). A published directory is never modified in
//! place: publishing an existing complete name fails with [`PublishError::AlreadyPublished`].
//! Temporaries of dead writers are removed the next time anyone stages into the same parent.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::hash::ModelHash;
use crate::layout::{
    CheckpointKind, CheckpointName, LayoutError, NameError, RunDir, TMP_PREFIX, TRASH_PREFIX,
    model_file_name,
};
use crate::manifest::{
    self, MANIFEST_FILE, MANIFEST_FORMAT, Manifest, ManifestFile, ValidatorSource,
};
use crate::pins::{ProcessIdentity, now_unix_ms};
use crate::pt::{PtWriteOptions, Tensor, TensorMeta};
use crate::shard::{ShardError, ShardFormat};

/// Errors staging or publishing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// ENOSPC/EDQUOT while writing; the staged directory is removed when the [`Staged`] drops.
    #[error("write {path}: disk full ({source}); the unpublished checkpoint is discarded")]
    DiskFull {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not enough free space for an announced write (checked before writing).
    #[error("not enough free space in {path}: need {needed} bytes, {available} available")]
    InsufficientSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("write {path}: {source}")]
    Codec {
        path: PathBuf,
        #[source]
        source: ShardError,
    },
    #[error("checkpoint {path} is already published and is never modified in place")]
    AlreadyPublished { path: PathBuf },
    #[error("cannot publish {name} as {requested}: it was staged as a {staged} checkpoint")]
    KindMismatch {
        name: String,
        staged: CheckpointKind,
        requested: CheckpointKind,
    },
    #[error("cannot publish {path}: the model file {file} was not written")]
    MissingModelFile { path: PathBuf, file: String },
    #[error("invalid file name {0:?} for a checkpoint directory")]
    BadFileName(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PublishError + 'a {
    move |source| {
        if is_disk_full_io(&source) {
            PublishError::DiskFull {
                path: path.to_path_buf(),
                source,
            }
        } else {
            PublishError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn is_disk_full_io(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Whether an error (or any error in its source chain) is a full disk or exceeded quota.
pub fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && is_disk_full_io(io)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// What the writer asserts about a staged checkpoint when publishing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishInfo {
    pub expert_group: u32,
    pub model_hash: ModelHash,
    /// `Some` exactly for a verified validator download: the validator's signature over the hash.
    pub verified_signature: Option<String>,
}

impl PublishInfo {
    /// An own checkpoint whose `model_expgroup_<expert_group>.pt` has hash `model_hash`.
    pub fn own(expert_group: u32, model_hash: ModelHash) -> Self {
        PublishInfo {
            expert_group,
            model_hash,
            verified_signature: None,
        }
    }

    /// A downloaded validator checkpoint that passed signature, hash and expert-group checks
    /// (spec §7.7). Only verified downloads may be published.
    pub fn verified_download(expert_group: u32, model_hash: ModelHash, signature: String) -> Self {
        PublishInfo {
            expert_group,
            model_hash,
            verified_signature: Some(signature),
        }
    }

    fn kind(&self) -> CheckpointKind {
        if self.verified_signature.is_some() {
            CheckpointKind::Validator
        } else {
            CheckpointKind::Own
        }
    }
}

/// A published checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub name: CheckpointName,
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// A checkpoint being written in a hidden temporary directory. Dropping it without
/// [`Staged::publish`] removes the directory.
#[derive(Debug)]
pub struct Staged {
    name: CheckpointName,
    parent: PathBuf,
    tmp: PathBuf,
    final_path: PathBuf,
    done: bool,
}

impl RunDir {
    /// Starts writing own checkpoint `globalver_<global_ver>_inneropt_<inner_opt>`.
    pub fn stage_own(&self, global_ver: u64, inner_opt: u64) -> Result<Staged, PublishError> {
        self.stage(CheckpointName::own(global_ver, inner_opt))
    }

    /// Starts downloading validator checkpoint `uid_<uid>_hotkey_<hotkey>_globalver_<global_ver>`
    /// into this miner's `validator_checkpoint/`.
    pub fn stage_validator(
        &self,
        uid: u16,
        hotkey: &str,
        global_ver: u64,
    ) -> Result<Staged, PublishError> {
        self.stage(CheckpointName::validator(uid, hotkey, global_ver)?)
    }

    /// Starts writing checkpoint `name` (removing dead writers' temporaries first).
    pub fn stage(&self, name: CheckpointName) -> Result<Staged, PublishError> {
        let parent = self.parent_dir(name.kind());
        std::fs::create_dir_all(&parent).map_err(io_err("create", &parent))?;
        clean_stale_temporaries(&parent)?;
        let final_path = parent.join(name.dir_name());
        let tmp = parent.join(format!(
            "{TMP_PREFIX}{}.{}.{:016x}",
            name.dir_name(),
            ProcessIdentity::current().tag(),
            rand::random::<u64>()
        ));
        std::fs::create_dir(&tmp).map_err(io_err("create", &tmp))?;
        Ok(Staged {
            name,
            parent,
            tmp,
            final_path,
            done: false,
        })
    }

    /// Removes temporaries and trash of dead writers in both checkpoint parents; returns what
    /// was removed.
    pub fn clean_stale_temporaries(&self) -> Result<Vec<PathBuf>, PublishError> {
        let mut removed = Vec::new();
        for kind in [CheckpointKind::Own, CheckpointKind::Validator] {
            let dir = self.parent_dir(kind);
            if dir.is_dir() {
                removed.extend(clean_stale_temporaries(&dir)?);
            }
        }
        Ok(removed)
    }
}

/// The writer that owns a hidden `.tmp_`/`.trash_` entry, if its name carries one.
fn hidden_owner(file_name: &str) -> Option<Option<ProcessIdentity>> {
    let rest = file_name
        .strip_prefix(TMP_PREFIX)
        .or_else(|| file_name.strip_prefix(TRASH_PREFIX))?;
    let parts: Vec<&str> = rest.split('.').collect();
    Some(match parts.as_slice() {
        [_, tag, _] => ProcessIdentity::parse_tag(tag),
        // The reference's `.tmp_<name>` (no owner): stale by the reference's own rule.
        _ => None,
    })
}

/// Removes `.tmp_*` / `.trash_*` entries in `dir` whose writer is no longer alive.
pub fn clean_stale_temporaries(dir: &Path) -> Result<Vec<PathBuf>, PublishError> {
    let mut removed = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(io_err("list", dir))?;
    for dent in rd {
        let dent = dent.map_err(io_err("list", dir))?;
        let Some(file_name) = dent.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Some(owner) = hidden_owner(&file_name) else {
            continue;
        };
        if owner.is_some_and(|o| o.is_alive()) {
            continue;
        }
        let path = dent.path();
        let result = match dent.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        match result {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed stale temporary checkpoint");
                removed.push(path);
            }
            // Another cleaner got there first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
    }
    Ok(removed)
}

/// Moves a directory out of readers' sight (`.trash_<name>.<writer>`) and fsyncs the parent;
/// returns the trash path (`None` if it was already gone). Delete it with [`remove_trash`].
pub(crate) fn move_to_trash(path: &Path) -> Result<Option<PathBuf>, PublishError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        return Err(PublishError::BadFileName(path.display().to_string()));
    };
    let trash = parent.join(format!(
        "{TRASH_PREFIX}{name}.{}.{:016x}",
        ProcessIdentity::current().tag(),
        rand::random::<u64>()
    ));
    match std::fs::rename(path, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("rename", path)(e)),
    }
    sync_dir(parent)?;
    Ok(Some(trash))
}

pub(crate) fn remove_trash(trash: &Path) -> Result<(), PublishError> {
    match std::fs::remove_dir_all(trash) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", trash)(e)),
    }
}

/// Deletes a directory so that readers see it either whole or not at all.
pub(crate) fn delete_dir_atomically(path: &Path) -> Result<(), PublishError> {
    match move_to_trash(path)? {
        Some(trash) => remove_trash(&trash),
        None => Ok(()),
    }
}

/// fsyncs a directory (so renames and creations in it are durable).
pub fn sync_dir(dir: &Path) -> Result<(), PublishError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Writes `bytes` to `path` atomically: a unique temporary sibling, fsync, rename, fsync parent.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), PublishError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| PublishError::BadFileName(path.display().to_string()))?;
    let tmp = parent.join(format!(
        ".{file_name}.tmp.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err("rename", path))?;
        sync_dir(&parent)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Free bytes available to unprivileged writers on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> Result<u64, PublishError> {
    let st = rustix::fs::statvfs(path).map_err(|e| PublishError::Io {
        op: "statvfs",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Staged {
    /// The temporary directory to write files into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn name(&self) -> &CheckpointName {
        &self.name
    }

    /// Where the checkpoint appears once published.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Fails early (as the reference does) unless `1.05 * bytes + 64 MiB` are free.
    pub fn ensure_free_space(&self, bytes: u64) -> Result<(), PublishError> {
        let needed = bytes.saturating_add(bytes / 20).saturating_add(64 << 20);
        let available = available_bytes(&self.tmp)?;
        if available < needed {
            return Err(PublishError::InsufficientSpace {
                path: self.tmp.clone(),
                needed,
                available,
            });
        }
        Ok(())
    }

    fn file_path(&self, rel: &str) -> Result<PathBuf, PublishError> {
        if !manifest::is_safe_relative(rel) || rel == MANIFEST_FILE || rel.starts_with('.') {
            return Err(PublishError::BadFileName(rel.to_string()));
        }
        Ok(self.tmp.join(rel))
    }

    /// Writes one file (buffered, fsynced) and returns its size. On error (e.g. disk full) the
    /// partial file is removed at once.
    pub fn write_file<F>(&self, rel: &str, fill: F) -> Result<u64, PublishError>
    where
        F: FnOnce(&mut dyn Write) -> io::Result<()>,
    {
        let path = self.file_path(rel)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        let result = (|| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_err("create", &path))?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            fill(&mut w).map_err(io_err("write", &path))?;
            let f = w
                .into_inner()
                .map_err(|e| io_err("write", &path)(e.into_error()))?;
            f.sync_all().map_err(io_err("fsync", &path))?;
            f.metadata().map(|m| m.len()).map_err(io_err("stat", &path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    fn codec_err(&self, path: &Path, e: impl Into<ShardError>) -> PublishError {
        let e: ShardError = e.into();
        let _ = std::fs::remove_file(path);
        if is_disk_full(&e) {
            let source = match e {
                ShardError::Pt(crate::pt::PtError::Io { source, .. })
                | ShardError::Safetensors(crate::st::StError::Io { source, .. }) => source,
                other => io::Error::other(other.to_string()),
            };
            PublishError::DiskFull {
                path: path.to_path_buf(),
                source,
            }
        } else {
            PublishError::Codec {
                path: path.to_path_buf(),
                source: e,
            }
        }
    }

    /// Streams `model_expgroup_<group_id>.<ext>` in `format` (tensors written in sorted order;
    /// `fill` writes each tensor's little-endian bytes) and returns its model hash, computed in
    /// the same pass.
    pub fn write_model<F>(
        &self,
        group_id: u32,
        format: ShardFormat,
        tensors: Vec<TensorMeta>,
        fill: F,
    ) -> Result<ModelHash, PublishError>
    where
        F: FnMut(&TensorMeta, &mut dyn Write) -> io::Result<()>,
    {
        let path = self.file_path(&model_file_name(group_id, format))?;
        crate::shard::write_shard(&path, format, tensors, fill)
            .map_err(|e| self.codec_err(&path, e))
    }

    /// Writes any `.pt` file of in-memory tensors (e.g. `model_shared.pt`) and returns its hash.
    pub fn write_pt_tensors(
        &self,
        rel: &str,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<ModelHash, PublishError> {
        let path = self.file_path(rel)?;
        crate::pt::write_pt_tensors(&path, tensors, &PtWriteOptions::default())
            .map_err(|e| self.codec_err(&path, e))
    }

    /// Writes the model shard from in-memory tensors in the default format
    /// (`model_expgroup_<group_id>.safetensors`) and returns its hash.
    pub fn write_model_tensors(
        &self,
        group_id: u32,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<ModelHash, PublishError> {
        self.write_model_tensors_as(group_id, ShardFormat::default(), tensors)
    }

    /// Writes the model shard from in-memory tensors in `format` and returns its hash.
    pub fn write_model_tensors_as(
        &self,
        group_id: u32,
        format: ShardFormat,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<ModelHash, PublishError> {
        let path = self.file_path(&model_file_name(group_id, format))?;
        crate::shard::write_shard_tensors(&path, format, tensors)
            .map_err(|e| self.codec_err(&path, e))
    }

    /// Makes the checkpoint visible: fsyncs every file, writes `MANIFEST.json` last, fsyncs,
    /// renames into place without replacing anything, and fsyncs the parent.
    pub fn publish(mut self, info: PublishInfo) -> Result<Published, PublishError> {
        if info.kind() != self.name.kind() {
            return Err(PublishError::KindMismatch {
                name: self.name.dir_name(),
                staged: self.name.kind(),
                requested: info.kind(),
            });
        }
        let mut files = Vec::new();
        collect_and_sync(&self.tmp, "", &mut files)?;
        files.sort();
        // The shard in whichever format was written; `.safetensors` first when both are.
        let Some(model_file) = ShardFormat::PREFERENCE
            .into_iter()
            .map(|f| model_file_name(info.expert_group, f))
            .find(|name| files.iter().any(|f| &f.path == name))
        else {
            return Err(PublishError::MissingModelFile {
                path: self.final_path.clone(),
                file: format!(
                    "{} or {}",
                    model_file_name(info.expert_group, ShardFormat::Safetensors),
                    model_file_name(info.expert_group, ShardFormat::Pt)
                ),
            });
        };
        let validator = match (&self.name, info.verified_signature) {
            (CheckpointName::Validator { uid, hotkey, .. }, Some(signature)) => {
                Some(ValidatorSource {
                    uid: *uid,
                    hotkey: hotkey.clone(),
                    signature,
                    verified: true,
                })
            }
            _ => None,
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            kind: self.name.kind(),
            name: self.name.dir_name(),
            global_ver: self.name.global_ver(),
            inner_opt: self.name.inner_opt(),
            expert_group: info.expert_group,
            model_file,
            model_hash: info.model_hash,
            files,
            created_unix_ms: now_unix_ms(),
            validator,
        };
        let manifest_path = self.tmp.join(MANIFEST_FILE);
        manifest::write_manifest(&self.tmp, &manifest).map_err(io_err("write", &manifest_path))?;
        sync_dir(&self.tmp)?;
        self.rename_into_place()?;
        self.done = true;
        sync_dir(&self.parent)?;
        Ok(Published {
            name: self.name.clone(),
            path: self.final_path.clone(),
            manifest,
        })
    }

    fn rename_into_place(&self) -> Result<(), PublishError> {
        for attempt in 0..2 {
            match rename_noreplace(&self.tmp, &self.final_path) {
                Ok(()) => return Ok(()),
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) =>
                {
                    let dir_name = self.name.dir_name();
                    if attempt > 0 || manifest::check_dir(&self.final_path, &dir_name).is_ok() {
                        return Err(PublishError::AlreadyPublished {
                            path: self.final_path.clone(),
                        });
                    }
                    // An incomplete directory under the final name (a foreign or legacy leftover,
                    // never selectable): move it away, then try once more.
                    tracing::warn!(path = %self.final_path.display(), "replacing incomplete checkpoint directory");
                    delete_dir_atomically(&self.final_path)?;
                }
                Err(e) => return Err(io_err("rename", &self.final_path)(e)),
            }
        }
        Err(PublishError::AlreadyPublished {
            path: self.final_path.clone(),
        })
    }
}

/// `renameat2(RENAME_NOREPLACE)`, falling back to `rename(2)` (which refuses a non-empty target)
/// on filesystems without it.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOSYS) => {
            if to.exists() {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            std::fs::rename(from, to)
        }
        Err(e) => Err(e.into()),
    }
}

/// Lists files under `dir` (relative paths with `/`), fsyncing each file and subdirectory.
fn collect_and_sync(
    dir: &Path,
    prefix: &str,
    out: &mut Vec<ManifestFile>,
) -> Result<(), PublishError> {
    let rd = std::fs::read_dir(dir).map_err(io_err("list", dir))?;
    for dent in rd {
        let dent = dent.map_err(io_err("list", dir))?;
        let path = dent.path();
        let Some(name) = dent.file_name().to_str().map(str::to_string) else {
            return Err(PublishError::BadFileName(path.display().to_string()));
        };
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let ft = dent.file_type().map_err(io_err("stat", &path))?;
        if ft.is_dir() {
            collect_and_sync(&path, &rel, out)?;
            sync_dir(&path)?;
        } else if ft.is_file() {
            if rel == MANIFEST_FILE {
                continue;
            }
            let f = File::open(&path).map_err(io_err("open", &path))?;
            f.sync_all().map_err(io_err("fsync", &path))?;
            let size = f.metadata().map_err(io_err("stat", &path))?.len();
            out.push(ManifestFile { path: rel, size });
        } else {
            return Err(PublishError::BadFileName(rel));
        }
    }
    Ok(())
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match std::fs::remove_dir_all(&self.tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.tmp.display(), error = %e, "remove unpublished checkpoint")
            }
        }
    }
}
