//! `MANIFEST.json`: the last file written into a checkpoint directory before it is renamed into
//! place. Its presence (and agreement with the files on disk) is what makes a checkpoint
//! directory *complete*; readers ignore directories without a valid one.
//!
//! **API boundary:** this is an IPC contract between trainer-svc (writes own checkpoints),
//! chainsync-svc (writes verified validator downloads, reads own checkpoints) and minerctl.
//! Add fields only with `#[serde(default)]`; bump [`MANIFEST_FORMAT`] for incompatible changes.

use std::io::{self, Write};
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use crate::hash::ModelHash;
use crate::layout::{CheckpointKind, CheckpointName};

/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// The manifest format this crate writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// What a published checkpoint directory contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    pub kind: CheckpointKind,
    /// The directory name this manifest was published under.
    pub name: String,
    pub global_ver: u64,
    pub inner_opt: u64,
    /// The expert group of the model shard.
    pub expert_group: u32,
    /// `model_expgroup_<expert_group>.safetensors` or `model_expgroup_<expert_group>.pt` (the
    /// `.safetensors` one when the directory holds both).
    pub model_file: String,
    /// Model hash (spec §7.5) of `model_file`, computed while writing it (own) or verified
    /// against the validator's chain commitment (validator).
    pub model_hash: ModelHash,
    /// Every file in the directory except the manifest, sorted by path, with its size in bytes.
    pub files: Vec<ManifestFile>,
    /// Milliseconds since the Unix epoch when the checkpoint was published.
    pub created_unix_ms: u64,
    /// Where a downloaded validator checkpoint came from; `None` for own checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validator: Option<ValidatorSource>,
}

/// One file of a checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Relative path with `/` separators.
    pub path: String,
    pub size: u64,
}

/// Provenance of a downloaded validator checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidatorSource {
    pub uid: u16,
    pub hotkey: String,
    /// The validator's signature over the model hash (base64url, from the chain).
    pub signature: String,
    /// Signature, hash and expert-group checks (spec §7.7) passed before publishing.
    pub verified: bool,
}

/// Why a checkpoint directory is not complete; carries the manifest when one could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestProblem {
    pub manifest: Option<Box<Manifest>>,
    pub reason: String,
}

impl ManifestProblem {
    fn new(manifest: Option<&Manifest>, reason: impl Into<String>) -> Self {
        ManifestProblem {
            manifest: manifest.cloned().map(Box::new),
            reason: reason.into(),
        }
    }
}

/// Reads and parses `dir/MANIFEST.json` without checking it against the directory.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ManifestProblem> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ManifestProblem::new(None, format!("no {MANIFEST_FILE}")));
        }
        Err(e) => {
            return Err(ManifestProblem::new(
                None,
                format!("read {MANIFEST_FILE}: {e}"),
            ));
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| ManifestProblem::new(None, format!("parse {MANIFEST_FILE}: {e}")))
}

/// Checks that `dir` (named `dir_name`) is a complete, selectable checkpoint: the manifest
/// parses, agrees with the name, lists the model file, every listed file exists with the
/// recorded size, and a validator download says it was verified.
pub fn check_dir(dir: &Path, dir_name: &str) -> Result<Manifest, ManifestProblem> {
    let m = read_manifest(dir)?;
    let bad = |reason: String| ManifestProblem::new(Some(&m), reason);
    if m.format != MANIFEST_FORMAT {
        return Err(bad(format!("unsupported manifest format {}", m.format)));
    }
    if m.name != dir_name {
        return Err(bad(format!(
            "manifest names {:?} but the directory is {dir_name:?}",
            m.name
        )));
    }
    let Some(name) = CheckpointName::parse(dir_name) else {
        return Err(bad(format!("{dir_name:?} is not a checkpoint name")));
    };
    if name.kind() != m.kind || name.global_ver() != m.global_ver || name.inner_opt() != m.inner_opt
    {
        return Err(bad(
            "manifest kind/version disagree with the directory name".into(),
        ));
    }
    if crate::shard::parse_shard_file_name(&m.model_file).map(|(g, _)| g) != Some(m.expert_group) {
        return Err(bad(format!(
            "model file {:?} does not match expert group {}",
            m.model_file, m.expert_group
        )));
    }
    if !m.files.iter().any(|f| f.path == m.model_file) {
        return Err(bad(format!("{} is not listed", m.model_file)));
    }
    match (&name, &m.validator) {
        (CheckpointName::Own { .. }, None) => {}
        (CheckpointName::Own { .. }, Some(_)) => {
            return Err(bad("own checkpoint carries validator provenance".into()));
        }
        (CheckpointName::Validator { .. }, None) => {
            return Err(bad("validator checkpoint without provenance".into()));
        }
        (CheckpointName::Validator { uid, hotkey, .. }, Some(v)) => {
            if v.uid != *uid || v.hotkey != *hotkey {
                return Err(bad(
                    "validator provenance disagrees with the directory name".into(),
                ));
            }
            if !v.verified {
                return Err(bad("not verified".into()));
            }
        }
    }
    for f in &m.files {
        if !is_safe_relative(&f.path) {
            return Err(bad(format!("unsafe file path {:?}", f.path)));
        }
        match std::fs::metadata(dir.join(&f.path)) {
            Ok(meta) if meta.is_file() && meta.len() == f.size => {}
            Ok(meta) if meta.is_file() => {
                return Err(bad(format!(
                    "{} has {} bytes, manifest says {}",
                    f.path,
                    meta.len(),
                    f.size
                )));
            }
            Ok(_) => return Err(bad(format!("{} is not a file", f.path))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(bad(format!("{} is missing", f.path)));
            }
            Err(e) => return Err(bad(format!("stat {}: {e}", f.path))),
        }
    }
    Ok(m)
}

/// A relative path of normal components only (no `..`, no root).
pub(crate) fn is_safe_relative(p: &str) -> bool {
    !p.is_empty()
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Writes `dir/MANIFEST.json` and fsyncs it (the caller fsyncs the directory).
pub(crate) fn write_manifest(dir: &Path, m: &Manifest) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(m).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let path = dir.join(MANIFEST_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    f.write_all(&bytes)?;
    f.sync_all()
}
