//! The model shard `model_expgroup_<gid>.<ext>` whichever format it is in (addendum A1):
//! `.safetensors` (the live subnet's format since May 2026, our default) or `.pt` (still
//! accepted). Everything above this module (layout, services, minerctl) opens, hashes, follows
//! and checks shards through it and never needs to know the format.
//!
//! * [`ShardFormat`] is chosen by file suffix; [`find_shard`] prefers `.safetensors` when a
//!   directory holds both (the order validators try).
//! * [`ShardReader`], [`read_shard`], [`hash_shard_file`], [`write_shard`]: one API over both
//!   codecs.
//! * [`ShardFollower`] verifies a file while it is downloaded (`advance(written)` /
//!   `finish(len)`) through a [`ShardCheck`].
//! * [`ShardExpectation`] checks a tensor list against an expert group (keys, dtypes, shapes)
//!   before any data is read.
//!
//! **Invariant:** the model hash (§7.5) is defined on the state dict, not the file: the same
//! tensors give the same hash in either format.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::expert_group::{ExpertGroup, parse_expert_key};
use crate::hash::ModelHash;
use crate::pt::{
    self, DType, FollowCheck, Followed, PtError, PtFollower, PtLayout, PtReader, PtWriteOptions,
    Tensor, TensorMeta,
};
use crate::st::{self, StCheck, StError, StFollower, StReader};

/// The file format of a shard.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ShardFormat {
    /// `safetensors.torch.save_file` of the flat state dict (the live subnet's format).
    #[default]
    Safetensors,
    /// `torch.save({"model_state_dict": ...})` (the format before May 2026, still accepted).
    Pt,
}

impl ShardFormat {
    /// The order validators try, and the order a directory holding both is read in.
    pub const PREFERENCE: [ShardFormat; 2] = [ShardFormat::Safetensors, ShardFormat::Pt];

    /// The file suffix without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            ShardFormat::Safetensors => "safetensors",
            ShardFormat::Pt => "pt",
        }
    }

    /// The format of a file, by its suffix (`.safetensors` or `.pt`).
    pub fn of_path(path: &Path) -> Option<ShardFormat> {
        let ext = path.extension()?.to_str()?;
        ShardFormat::PREFERENCE
            .into_iter()
            .find(|f| f.extension() == ext)
    }

    /// The format of a file from its first bytes, when they tell: a `.pt` zip starts with a
    /// local file header (`PK\x03\x04`), a safetensors file with an 8-byte header length and `{`.
    /// (A safetensors header length starting `PK\x03\x04` would be 67 MB, over [`st::MAX_HEADER`],
    /// so the two never overlap.) `None`: not enough bytes yet, or neither.
    pub fn sniff(prefix: &[u8]) -> Option<ShardFormat> {
        if prefix.starts_with(b"PK\x03\x04") {
            Some(ShardFormat::Pt)
        } else if prefix.len() > 8 && prefix[8] == b'{' {
            Some(ShardFormat::Safetensors)
        } else {
            None
        }
    }

    /// Whether this is the default format (`safetensors`).
    pub fn is_default(&self) -> bool {
        *self == ShardFormat::default()
    }

    /// `model_expgroup_<group_id>.<ext>`.
    pub fn file_name(self, group_id: u32) -> String {
        shard_file_name(group_id, self)
    }
}

impl fmt::Display for ShardFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

impl FromStr for ShardFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ShardFormat::PREFERENCE
            .into_iter()
            .find(|f| f.extension() == s)
            .ok_or_else(|| format!("unknown shard format {s:?} (expected safetensors or pt)"))
    }
}

/// `model_expgroup_<group_id>.<ext>`: the file that is hashed, signed and submitted.
pub fn shard_file_name(group_id: u32, format: ShardFormat) -> String {
    format!("model_expgroup_{group_id}.{}", format.extension())
}

/// The group id and format of a `model_expgroup_<gid>.{safetensors,pt}` file name.
pub fn parse_shard_file_name(file_name: &str) -> Option<(u32, ShardFormat)> {
    let rest = file_name.strip_prefix("model_expgroup_")?;
    let (gid, ext) = rest.split_once('.')?;
    let format = ext.parse().ok()?;
    if gid.is_empty() || !gid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((gid.parse().ok()?, format))
}

/// The shard of `group_id` in `dir`: `.safetensors` if that file exists, else `.pt`.
pub fn find_shard(dir: &Path, group_id: u32) -> Option<(PathBuf, ShardFormat)> {
    ShardFormat::PREFERENCE.into_iter().find_map(|f| {
        let p = dir.join(shard_file_name(group_id, f));
        p.is_file().then_some((p, f))
    })
}

/// Untrusted text (a tensor name from a file) made safe for a one-line message: control
/// characters, quotes and backslashes escaped, cut to 200 characters. Plain names are unchanged.
pub fn escape_name(s: &str) -> String {
    st::escape(s)
}

/// How a shard's tensors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardLayout {
    /// `.safetensors`: a flat name→tensor map.
    Flat,
    /// `.pt`: `{"model_state_dict": {name: tensor}}`.
    PtModelStateDict,
    /// `.pt`: a plain `{name: tensor}` dict (accepted since A1: readers unwrap the wrapper
    /// "when present").
    PtPlainDict,
}

impl ShardLayout {
    fn of_pt(l: PtLayout) -> Self {
        match l {
            PtLayout::ModelStateDict => ShardLayout::PtModelStateDict,
            PtLayout::PlainDict => ShardLayout::PtPlainDict,
        }
    }

    /// A short name for listings (`flat`, `model_state_dict`, `plain dict`).
    pub fn describe(self) -> &'static str {
        match self {
            ShardLayout::Flat => "flat (safetensors)",
            ShardLayout::PtModelStateDict => "model_state_dict",
            ShardLayout::PtPlainDict => "plain dict",
        }
    }
}

/// A shard that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Pt(#[from] PtError),
    #[error(transparent)]
    Safetensors(#[from] StError),
    /// The file is neither `.safetensors` nor `.pt` (by name, or by content when the name
    /// does not tell).
    #[error("{path}: not a checkpoint shard (neither a .safetensors nor a torch.save .pt file)")]
    UnknownFormat { path: PathBuf },
}

impl ShardError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ShardError::Pt(e) => e.path(),
            ShardError::Safetensors(e) => e.path(),
            ShardError::UnknownFormat { path } => path,
        }
    }

    /// Whether the OS refused an operation (missing file, permissions, disk full), as opposed
    /// to the file's content being wrong.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            ShardError::Pt(PtError::Io { source, .. })
            | ShardError::Safetensors(StError::Io { source, .. }) => Some(source),
            _ => None,
        }
    }
}

fn format_of(path: &Path) -> Result<ShardFormat, ShardError> {
    ShardFormat::of_path(path).ok_or_else(|| ShardError::UnknownFormat {
        path: path.to_path_buf(),
    })
}

/// The format of the file at `path` from its first bytes.
fn sniff_path(path: &Path) -> Result<ShardFormat, ShardError> {
    use std::io::Read;
    let mut prefix = Vec::with_capacity(9);
    std::fs::File::open(path)
        .and_then(|f| f.take(9).read_to_end(&mut prefix))
        .map_err(|e| {
            ShardError::Safetensors(StError::Io {
                path: path.to_path_buf(),
                op: "open".into(),
                source: e,
            })
        })?;
    ShardFormat::sniff(&prefix).ok_or_else(|| ShardError::UnknownFormat {
        path: path.to_path_buf(),
    })
}

/// An open shard of either format: the tensor list is read on open, data on demand.
#[derive(Debug)]
pub enum ShardReader {
    Safetensors(StReader),
    Pt(PtReader),
}

impl ShardReader {
    /// Opens `path` in the format its suffix names; a file named otherwise is opened in the
    /// format its first bytes show ([`ShardFormat::sniff`]), or refused.
    pub fn open(path: &Path) -> Result<Self, ShardError> {
        let format = match ShardFormat::of_path(path) {
            Some(f) => f,
            None => sniff_path(path)?,
        };
        Self::open_as(path, format)
    }

    /// Opens `path` as `format`, whatever its name.
    pub fn open_as(path: &Path, format: ShardFormat) -> Result<Self, ShardError> {
        Ok(match format {
            ShardFormat::Safetensors => ShardReader::Safetensors(StReader::open(path)?),
            ShardFormat::Pt => ShardReader::Pt(PtReader::open(path)?),
        })
    }

    pub fn format(&self) -> ShardFormat {
        match self {
            ShardReader::Safetensors(_) => ShardFormat::Safetensors,
            ShardReader::Pt(_) => ShardFormat::Pt,
        }
    }

    pub fn layout(&self) -> ShardLayout {
        match self {
            ShardReader::Safetensors(_) => ShardLayout::Flat,
            ShardReader::Pt(r) => ShardLayout::of_pt(r.layout()),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ShardReader::Safetensors(r) => r.path(),
            ShardReader::Pt(r) => r.path(),
        }
    }

    /// The tensors (name, dtype, shape), sorted by name.
    pub fn entries(&self) -> &[TensorMeta] {
        match self {
            ShardReader::Safetensors(r) => r.entries(),
            ShardReader::Pt(r) => r.entries(),
        }
    }

    /// Reads one tensor.
    pub fn read(&self, name: &str) -> Result<Tensor, ShardError> {
        Ok(match self {
            ShardReader::Safetensors(r) => r.read(name)?,
            ShardReader::Pt(r) => r.read(name)?,
        })
    }

    /// Reads every tensor.
    pub fn read_all(&self) -> Result<BTreeMap<String, Tensor>, ShardError> {
        Ok(match self {
            ShardReader::Safetensors(r) => r.read_all()?,
            ShardReader::Pt(r) => r.read_all()?,
        })
    }

    /// The model hash (§7.5), streamed in sorted-name order.
    pub fn model_hash(&self) -> Result<ModelHash, ShardError> {
        Ok(match self {
            ShardReader::Safetensors(r) => r.model_hash()?,
            ShardReader::Pt(r) => r.model_hash()?,
        })
    }
}

/// Reads every tensor of a shard (format by suffix).
pub fn read_shard(path: &Path) -> Result<BTreeMap<String, Tensor>, ShardError> {
    ShardReader::open(path)?.read_all()
}

/// The model hash of a shard file (format by suffix), streamed.
pub fn hash_shard_file(path: &Path) -> Result<ModelHash, ShardError> {
    ShardReader::open(path)?.model_hash()
}

/// Writes a shard in `format`, streaming: `fill` writes each tensor's little-endian bytes (in
/// sorted-name order for a shard of one dtype); returns the model hash computed in the same
/// pass. `.pt` shards are wrapped in `{"model_state_dict": ...}` as validators expect; the
/// file is published atomically (hidden sibling, fsync, rename, directory fsync).
pub fn write_shard<F>(
    path: &Path,
    format: ShardFormat,
    tensors: Vec<TensorMeta>,
    fill: F,
) -> Result<ModelHash, ShardError>
where
    F: FnMut(&TensorMeta, &mut dyn Write) -> io::Result<()>,
{
    Ok(match format {
        ShardFormat::Safetensors => st::write_safetensors(path, tensors, fill)?,
        ShardFormat::Pt => pt::write_pt(path, tensors, &PtWriteOptions::default(), fill)?,
    })
}

/// [`write_shard`] from in-memory tensors.
pub fn write_shard_tensors(
    path: &Path,
    format: ShardFormat,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<ModelHash, ShardError> {
    Ok(match format {
        ShardFormat::Safetensors => st::write_safetensors_tensors(path, tensors)?,
        ShardFormat::Pt => pt::write_pt_tensors(path, tensors, &PtWriteOptions::default())?,
    })
}

/// Checks applied to a shard as it is verified, whatever its format: once to the layout and
/// tensor list (sorted by name, before any data), then to every tensor's little-endian bytes in
/// sorted-name order, possibly in pieces (each a whole number of elements).
pub trait ShardCheck {
    type Error: From<ShardError>;
    fn entries(&mut self, layout: ShardLayout, entries: &[TensorMeta]) -> Result<(), Self::Error>;
    fn data(&mut self, meta: &TensorMeta, le_bytes: &[u8]) -> Result<(), Self::Error>;
}

/// A [`ShardCheck`] seen by one codec's follower.
struct Adapt<C>(C);

/// A [`ShardCheck`] error travelling through a codec's follower.
struct Wrapped<E>(E);

impl<E: From<ShardError>> From<PtError> for Wrapped<E> {
    fn from(e: PtError) -> Self {
        Wrapped(E::from(ShardError::Pt(e)))
    }
}

impl<E: From<ShardError>> From<StError> for Wrapped<E> {
    fn from(e: StError) -> Self {
        Wrapped(E::from(ShardError::Safetensors(e)))
    }
}

impl<C: ShardCheck> FollowCheck for Adapt<C> {
    type Error = Wrapped<C::Error>;
    fn entries(&mut self, layout: PtLayout, entries: &[TensorMeta]) -> Result<(), Self::Error> {
        self.0
            .entries(ShardLayout::of_pt(layout), entries)
            .map_err(Wrapped)
    }
    fn data(&mut self, meta: &TensorMeta, le_bytes: &[u8]) -> Result<(), Self::Error> {
        self.0.data(meta, le_bytes).map_err(Wrapped)
    }
}

impl<C: ShardCheck> StCheck for Adapt<C> {
    type Error = Wrapped<C::Error>;
    fn entries(&mut self, entries: &[TensorMeta]) -> Result<(), Self::Error> {
        self.0.entries(ShardLayout::Flat, entries).map_err(Wrapped)
    }
    fn data(&mut self, meta: &TensorMeta, le_bytes: &[u8]) -> Result<(), Self::Error> {
        self.0.data(meta, le_bytes).map_err(Wrapped)
    }
}

enum Follower<C: ShardCheck> {
    St(StFollower<Adapt<C>>),
    Pt(PtFollower<Adapt<C>>),
}

/// Verifies a shard while it is being written (a download streamed to disk), in the format its
/// file name says: the same `advance(written)` / `finish(len)` shape as
/// [`crate::pt::PtFollower`], with the checks of a [`ShardCheck`].
pub struct ShardFollower<C: ShardCheck> {
    inner: Follower<C>,
}

impl<C: ShardCheck> ShardFollower<C> {
    /// Starts following `path` (which must exist; it may still be empty); the format comes from
    /// its suffix.
    pub fn new(path: &Path, check: C) -> Result<Self, ShardError> {
        Self::with_format(path, format_of(path)?, check)
    }

    /// Starts following `path` as `format`.
    pub fn with_format(path: &Path, format: ShardFormat, check: C) -> Result<Self, ShardError> {
        let inner = match format {
            ShardFormat::Safetensors => Follower::St(StFollower::new(path, Adapt(check))?),
            ShardFormat::Pt => Follower::Pt(PtFollower::new(path, Adapt(check))?),
        };
        Ok(ShardFollower { inner })
    }

    /// A tighter safetensors header limit (see [`ShardExpectation::max_header`]); no effect on
    /// a `.pt` file.
    pub fn with_max_header(self, max_header: u64) -> Self {
        let inner = match self.inner {
            Follower::St(f) => Follower::St(f.with_max_header(max_header)),
            other => other,
        };
        ShardFollower { inner }
    }

    pub fn format(&self) -> ShardFormat {
        match self.inner {
            Follower::St(_) => ShardFormat::Safetensors,
            Follower::Pt(_) => ShardFormat::Pt,
        }
    }

    /// Tensor bytes hashed so far.
    pub fn hashed_bytes(&self) -> u64 {
        match &self.inner {
            Follower::St(f) => f.hashed_bytes(),
            Follower::Pt(f) => f.hashed_bytes(),
        }
    }

    /// Whether the streamed parse still follows the file (`false`: `finish` does a full pass).
    pub fn following(&self) -> bool {
        match &self.inner {
            Follower::St(f) => f.following(),
            Follower::Pt(f) => f.following(),
        }
    }

    /// The first `written` bytes of the file are in place: checks and hashes what it can. An
    /// error is final.
    pub fn advance(&mut self, written: u64) -> Result<(), C::Error> {
        match &mut self.inner {
            Follower::St(f) => f.advance(written).map_err(|Wrapped(e)| e),
            Follower::Pt(f) => f.advance(written).map_err(|Wrapped(e)| e),
        }
    }

    /// The whole file is written (`len` bytes): finishes the checks and returns the hash.
    pub fn finish(self, len: u64) -> Result<Followed, C::Error> {
        match self.inner {
            Follower::St(f) => f.finish(len).map_err(|Wrapped(e)| e),
            Follower::Pt(f) => f.finish(len).map_err(|Wrapped(e)| e),
        }
    }
}

/// The routed-expert tensor shapes of the model (DeepSeek-V2: `gate_up_proj` is
/// `[2 × moe_intermediate_size, hidden_size]`, `down_proj` is `[hidden_size,
/// moe_intermediate_size]`, spec §7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertShapes {
    pub hidden_size: usize,
    pub moe_intermediate_size: usize,
}

impl ExpertShapes {
    /// The routed-expert parameters, in sorted order.
    pub const PARAMS: [&'static str; 2] = ["down_proj", "gate_up_proj"];

    /// The shape of parameter `param` (`gate_up_proj` or `down_proj`).
    pub fn shape_of(&self, param: &str) -> Option<Vec<usize>> {
        match param {
            "gate_up_proj" => Some(vec![2 * self.moe_intermediate_size, self.hidden_size]),
            "down_proj" => Some(vec![self.hidden_size, self.moe_intermediate_size]),
            _ => None,
        }
    }
}

/// Why a shard's tensor list does not fit the expert group (messages escape tensor names).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpectationError {
    #[error("the checkpoint holds no tensors")]
    Empty,
    #[error("tensor {} is not a routed expert of expert group {group}", escape_name(.name))]
    ForeignKey { name: String, group: u32 },
    #[error("tensor {} has dtype {dtype}, expected one of {allowed}", escape_name(.name))]
    WrongDtype {
        name: String,
        dtype: DType,
        allowed: String,
    },
    #[error("tensor {} has shape {actual:?}, expected {expected:?}", escape_name(.name))]
    WrongShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor {} of expert group {group} is missing ({count} missing in all)", escape_name(.name))]
    Missing {
        name: String,
        group: u32,
        count: usize,
    },
}

/// What a shard of an expert group must hold, checked on the tensor list alone (before any data
/// is read or downloaded): every key a routed expert of the group (§7.7), at least one tensor,
/// a dtype the model uses, and, when the model's dimensions are known, the right shapes and
/// (with `require_all`) every tensor of the group.
#[derive(Debug, Clone)]
pub struct ShardExpectation {
    pub group: ExpertGroup,
    pub shapes: Option<ExpertShapes>,
    pub dtypes: Vec<DType>,
    pub require_all: bool,
}

impl ShardExpectation {
    /// Keys of `group`, floating dtypes (fp16, bf16, fp32), any shape, not all required.
    pub fn new(group: ExpertGroup) -> Self {
        ShardExpectation {
            group,
            shapes: None,
            dtypes: vec![DType::F16, DType::BF16, DType::F32],
            require_all: false,
        }
    }

    /// Also checks shapes against the model's dimensions.
    pub fn with_shapes(mut self, shapes: ExpertShapes) -> Self {
        self.shapes = Some(shapes);
        self
    }

    /// Also requires every tensor of the group (needs [`ShardExpectation::with_shapes`]).
    pub fn requiring_all(mut self) -> Self {
        self.require_all = true;
        self
    }

    /// The largest safetensors header a shard of this group can need: ~512 bytes per possible
    /// tensor (names are ~45 bytes, an entry ~110) plus slack.
    pub fn max_header(&self) -> u64 {
        4096 + 512 * 4 * self.group.num_experts() as u64
    }

    /// Every tensor name of the group (sorted), when the parameters are known.
    pub fn expected_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for (layer, experts) in &self.group.layers {
            for (_, org) in experts {
                for p in ExpertShapes::PARAMS {
                    keys.push(format!("model.layers.{layer}.mlp.experts.{org}.{p}"));
                }
            }
        }
        keys.sort();
        keys
    }

    /// Checks a tensor list (sorted by name) against the group.
    pub fn check_entries(&self, entries: &[TensorMeta]) -> Result<(), ExpectationError> {
        if entries.is_empty() {
            return Err(ExpectationError::Empty);
        }
        for m in entries {
            self.check_one(m)?;
        }
        if self.require_all && self.shapes.is_some() {
            let missing: Vec<String> = self
                .expected_keys()
                .into_iter()
                .filter(|k| {
                    entries
                        .binary_search_by(|m| m.name.as_str().cmp(k))
                        .is_err()
                })
                .collect();
            if let Some(first) = missing.first() {
                return Err(ExpectationError::Missing {
                    name: first.clone(),
                    group: self.group.group_id,
                    count: missing.len(),
                });
            }
        }
        Ok(())
    }

    fn check_one(&self, m: &TensorMeta) -> Result<(), ExpectationError> {
        if !self.group.is_group_key(&m.name) {
            return Err(ExpectationError::ForeignKey {
                name: m.name.clone(),
                group: self.group.group_id,
            });
        }
        if !self.dtypes.contains(&m.dtype) {
            let allowed: Vec<String> = self.dtypes.iter().map(|d| d.to_string()).collect();
            return Err(ExpectationError::WrongDtype {
                name: m.name.clone(),
                dtype: m.dtype,
                allowed: allowed.join(", "),
            });
        }
        if let Some(shapes) = &self.shapes {
            let param = param_of(&m.name);
            let expected = shapes.shape_of(param).unwrap_or_default();
            if expected != m.shape {
                return Err(ExpectationError::WrongShape {
                    name: m.name.clone(),
                    expected,
                    actual: m.shape.clone(),
                });
            }
        }
        Ok(())
    }
}

/// The parameter part of a routed-expert key (`gate_up_proj` of
/// `model.layers.1.mlp.experts.4.gate_up_proj`).
fn param_of(name: &str) -> &str {
    debug_assert!(parse_expert_key(name).is_some());
    name.splitn(7, '.').nth(6).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_suffixes_and_sniffing() {
        assert_eq!(
            shard_file_name(3, ShardFormat::Safetensors),
            "model_expgroup_3.safetensors"
        );
        assert_eq!(ShardFormat::Pt.file_name(0), "model_expgroup_0.pt");
        assert_eq!(
            parse_shard_file_name("model_expgroup_12.safetensors"),
            Some((12, ShardFormat::Safetensors))
        );
        assert_eq!(
            parse_shard_file_name("model_expgroup_0.pt"),
            Some((0, ShardFormat::Pt))
        );
        for bad in [
            "model_expgroup_.pt",
            "model_expgroup_1.bin",
            "model_expgroup_1.pt.partial",
            "model_expgroup_x.pt",
            "model_shared.pt",
        ] {
            assert_eq!(parse_shard_file_name(bad), None, "{bad}");
        }
        assert_eq!("pt".parse(), Ok(ShardFormat::Pt));
        assert!("PT".parse::<ShardFormat>().is_err());
        assert_eq!(ShardFormat::default(), ShardFormat::Safetensors);
        assert_eq!(ShardFormat::sniff(b"PK\x03\x04rest"), Some(ShardFormat::Pt));
        assert_eq!(
            ShardFormat::sniff(b"\x10\0\0\0\0\0\0\0{\"a\""),
            Some(ShardFormat::Safetensors)
        );
        assert_eq!(ShardFormat::sniff(b"\x10\0\0\0\0\0\0\0"), None);
        assert_eq!(ShardFormat::sniff(b"hello, world"), None);
    }

    #[test]
    fn find_shard_prefers_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_shard(dir.path(), 0), None);
        std::fs::write(dir.path().join("model_expgroup_0.pt"), b"x").unwrap();
        assert_eq!(find_shard(dir.path(), 0).unwrap().1, ShardFormat::Pt);
        std::fs::write(dir.path().join("model_expgroup_0.safetensors"), b"x").unwrap();
        assert_eq!(
            find_shard(dir.path(), 0).unwrap().1,
            ShardFormat::Safetensors
        );
        assert_eq!(find_shard(dir.path(), 1), None);
    }

    fn meta(name: &str, dtype: DType, shape: &[usize]) -> TensorMeta {
        TensorMeta::new(name, dtype, shape.to_vec())
    }

    #[test]
    fn expectation_checks_keys_dtypes_shapes_and_completeness() {
        let g = ExpertGroup::builtin("exp_dummy").unwrap();
        let e = ShardExpectation::new(g.clone());
        let keys = e.expected_keys();
        assert_eq!(keys.len(), 2 * g.num_experts());
        let shapes = ExpertShapes {
            hidden_size: 8,
            moe_intermediate_size: 4,
        };
        let full: Vec<TensorMeta> = keys
            .iter()
            .map(|k| {
                let p = param_of(k);
                meta(k, DType::BF16, &shapes.shape_of(p).unwrap())
            })
            .collect();
        let strict = e.clone().with_shapes(shapes).requiring_all();
        assert_eq!(strict.check_entries(&full), Ok(()));
        assert_eq!(e.check_entries(&[]), Err(ExpectationError::Empty));

        let foreign = meta(
            "model.layers.1.mlp.experts.999.down_proj",
            DType::F16,
            &[8, 4],
        );
        assert!(matches!(
            e.check_entries(&[foreign]),
            Err(ExpectationError::ForeignKey { .. })
        ));
        let mut wrong_dtype = full.clone();
        wrong_dtype[0].dtype = DType::I64;
        let err = strict.check_entries(&wrong_dtype).unwrap_err();
        assert!(matches!(err, ExpectationError::WrongDtype { .. }), "{err}");
        let mut wrong_shape = full.clone();
        wrong_shape[1].shape = vec![4, 8];
        let err = strict.check_entries(&wrong_shape).unwrap_err();
        assert!(matches!(err, ExpectationError::WrongShape { .. }), "{err}");
        // Without shapes a partial shard is fine; with require_all it is not.
        assert_eq!(e.check_entries(&full[1..]), Ok(()));
        let err = strict.check_entries(&full[1..]).unwrap_err();
        assert!(
            matches!(err, ExpectationError::Missing { count: 1, .. }),
            "{err}"
        );
        // A hostile name is escaped in the message.
        let evil = meta("evil\nname", DType::F16, &[1]);
        let msg = e.check_entries(&[evil]).unwrap_err().to_string();
        assert!(msg.contains("evil\\nname") && !msg.contains('\n'), "{msg}");
        // The header budget is far below the safetensors crate's 100 MB.
        assert!(e.max_header() < 1 << 20);
        let math = ShardExpectation::new(ExpertGroup::builtin("exp_math").unwrap());
        assert!(math.max_header() > 416 * 128 && math.max_header() < 1 << 20);
    }
}
