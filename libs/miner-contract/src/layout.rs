//! Where checkpoints live and what they are called (spec §2.3, §7.1, §7.6).
//!
//! A *run directory* is `checkpoints/miner/<coldkey>/<hotkey>/<run>/`. It holds `config.yaml`,
//! the miner's own checkpoints `globalver_<V>_inneropt_<N>/`, and — unlike the reference, which
//! shares one folder between every miner of a repository root (§11.2 item 10) — this miner's
//! downloaded validator checkpoints under `validator_checkpoint/uid_<uid>_hotkey_<ss58>_globalver_<V>/`.
//!
//! **Invariant:** a directory with a checkpoint name is visible to selection only when it holds a
//! valid `MANIFEST.json` (see [`crate::manifest`]) whose file list matches what is on disk, and, for
//! a validator download, says `"verified": true`. Everything starting with `.` (temporaries,
//! trash, pins) is invisible to readers.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest::{self, Manifest, ManifestProblem};
use crate::pins::{self, PinRecord};
use crate::shard::ShardFormat;

/// The run directory's configuration file.
pub const CONFIG_FILE: &str = "config.yaml";
/// Subdirectory of the run directory holding downloaded validator checkpoints (per miner).
pub const VALIDATOR_DIR: &str = "validator_checkpoint";
/// Prefix of an in-progress publish (`.tmp_<name>.<writer>`), as in the reference.
pub const TMP_PREFIX: &str = ".tmp_";
/// Prefix of a directory being deleted (`.trash_<name>.<writer>`).
pub const TRASH_PREFIX: &str = ".trash_";

/// The file name of the model shard of expert group `group_id` in `format`
/// (`model_expgroup_<gid>.safetensors` or `.pt`): the file that is hashed, signed and submitted.
pub fn model_file_name(group_id: u32, format: ShardFormat) -> String {
    crate::shard::shard_file_name(group_id, format)
}

/// The group id of a `model_expgroup_<gid>.safetensors` or `model_expgroup_<gid>.pt` file name.
pub fn parse_model_file_name(file_name: &str) -> Option<u32> {
    crate::shard::parse_shard_file_name(file_name).map(|(gid, _)| gid)
}

/// One value of a `key_value_key_value` file name: an integer when it parses as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameValue {
    Int(i128),
    Str(String),
}

/// The reference's `parse_dynamic_filename` (spec §7.1): take the stem (drop one trailing
/// `.suffix`, except for dotfiles), split on `_`, read `key_value` pairs left to right; a key
/// already seen shifts the window by one instead of two; values become integers when they parse.
pub fn parse_dynamic_filename(file_name: &str) -> BTreeMap<String, NameValue> {
    let stem = path_stem(file_name);
    let parts: Vec<&str> = stem.split('_').collect();
    let mut meta = BTreeMap::new();
    let mut i = 0;
    while i + 1 < parts.len() {
        let key = parts[i];
        if meta.contains_key(key) {
            i += 1;
            continue;
        }
        meta.insert(key.to_string(), python_int(parts[i + 1]));
        i += 2;
    }
    meta
}

/// Python's `Path(name).stem` for a single path component.
fn path_stem(name: &str) -> &str {
    match name.rfind('.') {
        Some(0) | None => name,
        Some(pos) if pos + 1 == name.len() => name,
        Some(pos) => &name[..pos],
    }
}

/// Python's `int(value)` on ASCII input: surrounding whitespace and one sign allowed.
fn python_int(value: &str) -> NameValue {
    let t = value.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(v) = t.parse::<i128>()
    {
        return NameValue::Int(v);
    }
    NameValue::Str(value.to_string())
}

/// Own checkpoints or downloaded validator checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    Own,
    Validator,
}

impl fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckpointKind::Own => "own",
            CheckpointKind::Validator => "validator",
        })
    }
}

/// The parsed name of a checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckpointName {
    /// `globalver_<V>_inneropt_<N>`: trained from validator version `V`, inner step `N`.
    Own { global_ver: u64, inner_opt: u64 },
    /// `uid_<uid>_hotkey_<ss58>_globalver_<V>`: downloaded from a validator (inner_opt 0).
    Validator {
        uid: u16,
        hotkey: String,
        global_ver: u64,
    },
}

/// Why a checkpoint name cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "invalid validator hotkey {0:?}: expected a non-empty ss58 address of letters and digits"
    )]
    BadHotkey(String),
}

impl CheckpointName {
    pub fn own(global_ver: u64, inner_opt: u64) -> Self {
        CheckpointName::Own {
            global_ver,
            inner_opt,
        }
    }

    /// A validator checkpoint name; the hotkey must be alphanumeric so the name stays
    /// parseable and cannot escape the directory.
    pub fn validator(uid: u16, hotkey: &str, global_ver: u64) -> Result<Self, NameError> {
        if hotkey.is_empty() || !hotkey.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(NameError::BadHotkey(hotkey.to_string()));
        }
        Ok(CheckpointName::Validator {
            uid,
            hotkey: hotkey.to_string(),
            global_ver,
        })
    }

    /// Parses a directory name the way the reference does (§7.1): `.tmp_*` and names containing
    /// `yaml` are not checkpoints; `globalver` is required; a name with `uid` and `hotkey` is a
    /// validator checkpoint (inner_opt 0), otherwise `inneropt` is required. Dotfiles are never
    /// checkpoints here (they are temporaries, trash or pins).
    pub fn parse(dir_name: &str) -> Option<Self> {
        if dir_name.starts_with('.') || dir_name.contains("yaml") {
            return None;
        }
        let meta = parse_dynamic_filename(dir_name);
        let uint = |key: &str| match meta.get(key) {
            Some(NameValue::Int(v)) => u64::try_from(*v).ok(),
            _ => None,
        };
        let global_ver = uint("globalver")?;
        if let (Some(uid), Some(hotkey)) = (meta.get("uid"), meta.get("hotkey")) {
            let NameValue::Int(uid) = uid else {
                return None;
            };
            let uid = u16::try_from(*uid).ok()?;
            let hotkey = match hotkey {
                NameValue::Str(s) => s.clone(),
                NameValue::Int(i) => i.to_string(),
            };
            return CheckpointName::validator(uid, &hotkey, global_ver).ok();
        }
        Some(CheckpointName::own(global_ver, uint("inneropt")?))
    }

    pub fn kind(&self) -> CheckpointKind {
        match self {
            CheckpointName::Own { .. } => CheckpointKind::Own,
            CheckpointName::Validator { .. } => CheckpointKind::Validator,
        }
    }

    pub fn global_ver(&self) -> u64 {
        match self {
            CheckpointName::Own { global_ver, .. }
            | CheckpointName::Validator { global_ver, .. } => *global_ver,
        }
    }

    /// The inner optimizer step; 0 for validator checkpoints (as the reference parses them).
    pub fn inner_opt(&self) -> u64 {
        match self {
            CheckpointName::Own { inner_opt, .. } => *inner_opt,
            CheckpointName::Validator { .. } => 0,
        }
    }

    /// `(global_ver, inner_opt)`: the reference's ordering key (§7.6).
    pub fn version_key(&self) -> (u64, u64) {
        (self.global_ver(), self.inner_opt())
    }

    /// The canonical directory name.
    pub fn dir_name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for CheckpointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointName::Own {
                global_ver,
                inner_opt,
            } => write!(f, "globalver_{global_ver}_inneropt_{inner_opt}"),
            CheckpointName::Validator {
                uid,
                hotkey,
                global_ver,
            } => write!(f, "uid_{uid}_hotkey_{hotkey}_globalver_{global_ver}"),
        }
    }
}

/// Selection order, best first: higher `(global_ver, inner_opt)` first; on a tie own checkpoints
/// before validator ones (the reference lists the primary dir first); then by directory name so
/// the order is total and stable.
pub fn selection_order(a: (&CheckpointName, &str), b: (&CheckpointName, &str)) -> Ordering {
    b.0.version_key()
        .cmp(&a.0.version_key())
        .then_with(|| a.0.kind().cmp(&b.0.kind()))
        .then_with(|| a.1.cmp(b.1))
}

/// Whether a listed checkpoint can be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum EntryState {
    /// A valid manifest whose files are all present with the recorded sizes (and, for a
    /// validator download, `"verified": true`). Only these are selectable.
    Verified,
    /// Not selectable; the reason says what is missing or wrong.
    Incomplete(String),
}

/// One checkpoint directory as a reader sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointEntry {
    #[serde(serialize_with = "serialize_display")]
    pub name: CheckpointName,
    pub kind: CheckpointKind,
    /// The directory name as found on disk (may differ from the canonical name, e.g. `globalver_07_...`).
    pub dir_name: String,
    pub path: PathBuf,
    pub global_ver: u64,
    pub inner_opt: u64,
    pub state: EntryState,
    pub manifest: Option<Manifest>,
    /// Live pins on this checkpoint (holders).
    pub pinned_by: Vec<String>,
}

fn serialize_display<S: serde::Serializer>(v: &CheckpointName, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl CheckpointEntry {
    pub fn is_verified(&self) -> bool {
        self.state == EntryState::Verified
    }

    pub fn is_pinned(&self) -> bool {
        !self.pinned_by.is_empty()
    }

    /// The model shard this checkpoint carries (the manifest's `model_file`: `.safetensors` or
    /// `.pt`, whichever the writer or the download produced).
    pub fn model_path(&self) -> Option<PathBuf> {
        self.manifest
            .as_ref()
            .map(|m| self.path.join(&m.model_file))
    }

    /// The format of the model shard this checkpoint carries.
    pub fn model_format(&self) -> Option<ShardFormat> {
        self.manifest
            .as_ref()
            .and_then(|m| crate::shard::parse_shard_file_name(&m.model_file))
            .map(|(_, f)| f)
    }
}

/// Errors opening or reading a run directory.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("run directory {path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} is not a run directory (expected a directory or its config.yaml)")]
    NotADirectory { path: PathBuf },
    #[error("read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl LayoutError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        LayoutError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A miner's run directory: `checkpoints/miner/<coldkey>/<hotkey>/<run>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Opens an existing run directory; `path` may also be its `config.yaml` (or any file
    /// inside it), as operators pass `--path <run>/config.yaml`.
    pub fn open(path: &Path) -> Result<RunDir, LayoutError> {
        let meta = std::fs::metadata(path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                LayoutError::Missing {
                    path: path.to_path_buf(),
                }
            } else {
                LayoutError::io(path, e)
            }
        })?;
        let root = if meta.is_dir() {
            path.to_path_buf()
        } else {
            match path.parent() {
                Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
                Some(p) => p.to_path_buf(),
                None => {
                    return Err(LayoutError::NotADirectory {
                        path: path.to_path_buf(),
                    });
                }
            }
        };
        Ok(RunDir { root })
    }

    /// Creates the run directory (and its validator and pin subdirectories) if needed.
    pub fn create(path: &Path) -> Result<RunDir, LayoutError> {
        let run = RunDir {
            root: path.to_path_buf(),
        };
        for dir in [run.root.clone(), run.validator_dir(), run.pins_dir()] {
            std::fs::create_dir_all(&dir).map_err(|e| LayoutError::io(&dir, e))?;
        }
        Ok(run)
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn config_file(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    /// Where own checkpoints live (the run directory itself, as in the reference).
    pub fn own_dir(&self) -> PathBuf {
        self.root.clone()
    }

    /// Where this miner's downloaded validator checkpoints live.
    pub fn validator_dir(&self) -> PathBuf {
        self.root.join(VALIDATOR_DIR)
    }

    pub fn pins_dir(&self) -> PathBuf {
        self.root.join(pins::PINS_DIR)
    }

    /// The directory a checkpoint name is published to.
    pub fn parent_dir(&self, kind: CheckpointKind) -> PathBuf {
        match kind {
            CheckpointKind::Own => self.own_dir(),
            CheckpointKind::Validator => self.validator_dir(),
        }
    }

    pub fn checkpoint_path(&self, name: &CheckpointName) -> PathBuf {
        self.parent_dir(name.kind()).join(name.dir_name())
    }

    /// Every checkpoint-named directory (own and validator), in selection order, with its state
    /// and live pins. Temporaries and other dotfiles are skipped.
    pub fn list(&self) -> Result<Vec<CheckpointEntry>, LayoutError> {
        let pins = pins::read_live_pins(&self.pins_dir()).map_err(|e| match e {
            pins::PinError::Io { path, source } => LayoutError::Io { path, source },
            other => LayoutError::io(&self.pins_dir(), io::Error::other(other.to_string())),
        })?;
        let mut out = Vec::new();
        for kind in [CheckpointKind::Own, CheckpointKind::Validator] {
            let dir = self.parent_dir(kind);
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound && kind == CheckpointKind::Validator =>
                {
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(LayoutError::Missing { path: dir });
                }
                Err(e) => return Err(LayoutError::io(&dir, e)),
            };
            for dent in rd {
                let dent = dent.map_err(|e| LayoutError::io(&dir, e))?;
                let Some(dir_name) = dent.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let Some(name) = CheckpointName::parse(&dir_name) else {
                    continue;
                };
                if name.kind() != kind {
                    continue;
                }
                let path = dent.path();
                // A checkpoint is a directory; a stray file with a checkpoint name is not.
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => continue,
                    // Deleted between readdir and stat (retention): not there.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(LayoutError::io(&path, e)),
                }
                out.push(inspect_dir(name, dir_name, path, &pins));
            }
        }
        out.sort_by(|a, b| selection_order((&a.name, &a.dir_name), (&b.name, &b.dir_name)));
        Ok(out)
    }

    /// The best verified checkpoint of either kind (own first on a tie).
    pub fn best(&self) -> Result<Option<CheckpointEntry>, LayoutError> {
        Ok(best_of(self.list()?, None))
    }

    /// The best verified own checkpoint (what gets submitted).
    pub fn best_own(&self) -> Result<Option<CheckpointEntry>, LayoutError> {
        Ok(best_of(self.list()?, Some(CheckpointKind::Own)))
    }

    /// The best verified validator checkpoint.
    pub fn best_validator(&self) -> Result<Option<CheckpointEntry>, LayoutError> {
        Ok(best_of(self.list()?, Some(CheckpointKind::Validator)))
    }

    /// Reads one checkpoint directory by name (`None` if it does not exist).
    pub fn entry(&self, name: &CheckpointName) -> Result<Option<CheckpointEntry>, LayoutError> {
        let path = self.checkpoint_path(name);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LayoutError::io(&path, e)),
        }
        let pins = pins::read_live_pins(&self.pins_dir())
            .map_err(|e| LayoutError::io(&self.pins_dir(), io::Error::other(e.to_string())))?;
        Ok(Some(inspect_dir(
            name.clone(),
            name.dir_name(),
            path,
            &pins,
        )))
    }
}

/// The first verified entry of `entries` (already in selection order), optionally of one kind.
pub fn best_of(
    entries: Vec<CheckpointEntry>,
    kind: Option<CheckpointKind>,
) -> Option<CheckpointEntry> {
    entries
        .into_iter()
        .find(|e| e.is_verified() && kind.is_none_or(|k| e.kind == k))
}

fn inspect_dir(
    name: CheckpointName,
    dir_name: String,
    path: PathBuf,
    pins: &[PinRecord],
) -> CheckpointEntry {
    let (state, manifest) = match manifest::check_dir(&path, &dir_name) {
        Ok(m) => (EntryState::Verified, Some(m)),
        Err(ManifestProblem { manifest, reason }) => {
            (EntryState::Incomplete(reason), manifest.map(|m| *m))
        }
    };
    let pinned_by = pins
        .iter()
        .filter(|p| p.checkpoint == dir_name && p.kind == name.kind())
        .map(|p| p.holder.clone())
        .collect();
    CheckpointEntry {
        kind: name.kind(),
        global_ver: name.global_ver(),
        inner_opt: name.inner_opt(),
        name,
        dir_name,
        path,
        state,
        manifest,
        pinned_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_names() {
        assert_eq!(
            CheckpointName::parse("globalver_8081320_inneropt_40"),
            Some(CheckpointName::own(8081320, 40))
        );
        assert_eq!(
            CheckpointName::parse("uid_13_hotkey_5FnRrH_globalver_5759026"),
            Some(CheckpointName::validator(13, "5FnRrH", 5759026).unwrap())
        );
        // The reference's stem: one trailing suffix is dropped.
        assert_eq!(
            CheckpointName::parse("globalver_1_inneropt_2.bak"),
            Some(CheckpointName::own(1, 2))
        );
        for not in [
            ".tmp_globalver_1_inneropt_2",
            "config.yaml",
            "globalver_1_inneropt_2_yaml",
            "validator_checkpoint",
            "globalver_x_inneropt_2",
            "globalver_1",
            "globalver_-1_inneropt_2",
            "uid_70000_hotkey_abc_globalver_1",
            "metrics",
        ] {
            assert_eq!(CheckpointName::parse(not), None, "{not}");
        }
    }

    #[test]
    fn dynamic_filename_shifts_on_repeated_key() {
        let m = parse_dynamic_filename("uid_13_hotkey_5FnRrH_block_5759026.pt");
        assert_eq!(m.get("uid"), Some(&NameValue::Int(13)));
        assert_eq!(m.get("hotkey"), Some(&NameValue::Str("5FnRrH".into())));
        assert_eq!(m.get("block"), Some(&NameValue::Int(5759026)));
        // [x,1,x,2,y,3]: x=1; "x" again shifts by one, so "2" becomes a key with value "y".
        let m = parse_dynamic_filename("x_1_x_2_y_3");
        assert_eq!(m.get("x"), Some(&NameValue::Int(1)));
        assert_eq!(m.get("2"), Some(&NameValue::Str("y".into())));
        assert_eq!(m.get("y"), None);
    }

    #[test]
    fn model_file_names() {
        assert_eq!(model_file_name(0, ShardFormat::Pt), "model_expgroup_0.pt");
        assert_eq!(
            model_file_name(3, ShardFormat::Safetensors),
            "model_expgroup_3.safetensors"
        );
        assert_eq!(parse_model_file_name("model_expgroup_12.pt"), Some(12));
        assert_eq!(
            parse_model_file_name("model_expgroup_12.safetensors"),
            Some(12)
        );
        assert_eq!(parse_model_file_name("model_expgroup_12.bin"), None);
        assert_eq!(parse_model_file_name("model_expgroup_1.2.pt"), None);
        assert_eq!(parse_model_file_name("model_shared.pt"), None);
        assert_eq!(parse_model_file_name("model_expgroup_.pt"), None);
    }
}
