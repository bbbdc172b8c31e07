//! Validation of a downloaded validator checkpoint (spec §7.7, addendum A1): every tensor is
//! read once, checked (routed expert of our group, a dtype the model uses, finite) and fed to
//! the model hasher in sorted-name order, by a [`ShardFollower`] that can run while the file is
//! still arriving. The shard may be `.safetensors` or `.pt`: the follower is chosen by the file
//! name, or, for a transfer that names no file (`GET /get-checkpoint`), by the file's first bytes
//! ([`DownloadVerifier`]).

use std::path::{Path, PathBuf};

use miner_contract::ExpertGroup;
use miner_contract::hash::ModelHash;
use miner_contract::pt::{DType, Followed, PtError, TensorMeta};
use miner_contract::shard::{
    ExpectationError, ShardCheck, ShardError, ShardExpectation, ShardFollower, ShardFormat,
    ShardLayout, escape_name,
};

/// Why a checkpoint is refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("signature of hotkey {hotkey} over hash {hash} does not verify")]
    BadSignature { hotkey: String, hash: String },
    #[error("committed hash {0:?} is not 48 lowercase hex chars")]
    BadCommittedHash(String),
    #[error("file hash {actual} differs from the committed hash {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("tensor {} is not a routed expert of expert group {group}", escape_name(.name))]
    ForeignKey { name: String, group: u32 },
    #[error("tensor {} holds NaN or infinite values", escape_name(.name))]
    NonFinite { name: String },
    #[error("the checkpoint holds no tensors")]
    Empty,
    /// A dtype or shape the expert group's shard cannot have.
    #[error(transparent)]
    Unexpected(ExpectationError),
    #[error("committed expert group {committed} is not ours ({ours})")]
    WrongGroup { committed: u32, ours: u32 },
    #[error(transparent)]
    File(#[from] ShardError),
}

impl From<PtError> for VerifyError {
    fn from(e: PtError) -> Self {
        VerifyError::File(ShardError::Pt(e))
    }
}

impl From<ExpectationError> for VerifyError {
    fn from(e: ExpectationError) -> Self {
        match e {
            ExpectationError::Empty => VerifyError::Empty,
            ExpectationError::ForeignKey { name, group } => VerifyError::ForeignKey { name, group },
            other => VerifyError::Unexpected(other),
        }
    }
}

/// Verifies the validator's signature (base64url, no padding) over the ASCII hex hash.
pub fn verify_hash_signature(
    hotkey_ss58: &str,
    model_hash_hex: &str,
    signed_b64: &str,
) -> Result<(), VerifyError> {
    let bad = || VerifyError::BadSignature {
        hotkey: hotkey_ss58.to_owned(),
        hash: model_hash_hex.to_owned(),
    };
    let public = miner_keys::ss58_decode(hotkey_ss58).map_err(|_| bad())?;
    let sig: [u8; 64] = miner_keys::b64url_nopad_decode(signed_b64)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(bad)?;
    if miner_keys::verify(&public, model_hash_hex.as_bytes(), &sig) {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Whether any `W`-byte little-endian element of `data` has all the bits of `mask` set (an
/// exponent of all ones: Inf or NaN). Branch-free inside blocks so the compiler vectorizes it;
/// stops at the first block with a hit.
fn any_exponent_all_ones<const W: usize>(data: &[u8], mask: u64) -> bool {
    const BLOCK: usize = 4096;
    data.chunks(BLOCK).any(|block| {
        block.chunks_exact(W).fold(false, |hit, c| {
            let mut b = [0u8; 8];
            b[..W].copy_from_slice(c);
            hit | (u64::from_le_bytes(b) & mask == mask)
        })
    })
}

fn all_finite(dtype: DType, data: &[u8]) -> bool {
    match dtype {
        DType::F16 => !any_exponent_all_ones::<2>(data, 0x7C00),
        DType::BF16 => !any_exponent_all_ones::<2>(data, 0x7F80),
        DType::F32 => !any_exponent_all_ones::<4>(data, 0x7F80_0000),
        DType::F64 => !any_exponent_all_ones::<8>(data, 0x7FF0_0000_0000_0000),
        _ => true,
    }
}

/// The checks of §7.7 that look at the file's content: at least one tensor, every key a routed
/// expert of the group in a dtype the model uses (all before any data), all values finite. Both
/// `.pt` layouts are accepted (readers unwrap `model_state_dict` "when present", addendum A1),
/// as is the flat `.safetensors` map.
pub struct GroupCheck {
    expect: ShardExpectation,
}

impl GroupCheck {
    pub fn new(group: ExpertGroup) -> Self {
        GroupCheck {
            expect: ShardExpectation::new(group),
        }
    }

    /// The largest safetensors header a shard of this group can need.
    pub fn max_header(&self) -> u64 {
        self.expect.max_header()
    }
}

impl ShardCheck for GroupCheck {
    type Error = VerifyError;

    fn entries(&mut self, _layout: ShardLayout, entries: &[TensorMeta]) -> Result<(), VerifyError> {
        // Key, dtype (and shape, when known) checks first: they need no tensor data, so a
        // foreign file is refused cheaply.
        Ok(self.expect.check_entries(entries)?)
    }

    fn data(&mut self, meta: &TensorMeta, le_bytes: &[u8]) -> Result<(), VerifyError> {
        if all_finite(meta.dtype, le_bytes) {
            Ok(())
        } else {
            Err(VerifyError::NonFinite {
                name: meta.name.clone(),
            })
        }
    }
}

/// Verifies a downloaded shard while it is written, with a [`GroupCheck`]: in `format` when the
/// transfer names the file, else in the format its first bytes show (`GET /get-checkpoint`
/// serves a file without a name). Same `advance(written)` / `finish(len)` shape as the
/// followers it wraps.
pub struct DownloadVerifier {
    path: PathBuf,
    group: Option<ExpertGroup>,
    follower: Option<ShardFollower<GroupCheck>>,
}

impl DownloadVerifier {
    /// Starts verifying `path` (which must exist); `format` `None`: sniffed from the content.
    pub fn new(
        path: &Path,
        group: ExpertGroup,
        format: Option<ShardFormat>,
    ) -> Result<Self, VerifyError> {
        let mut v = DownloadVerifier {
            path: path.to_path_buf(),
            group: Some(group),
            follower: None,
        };
        if let Some(f) = format {
            v.start(f)?;
        }
        Ok(v)
    }

    fn start(&mut self, format: ShardFormat) -> Result<(), VerifyError> {
        if let Some(group) = self.group.take() {
            let check = GroupCheck::new(group);
            let max = check.max_header();
            let f = ShardFollower::with_format(&self.path, format, check)?.with_max_header(max);
            self.follower = Some(f);
        }
        Ok(())
    }

    /// The format being verified (`None` until the first bytes are in, for a sniffed file).
    pub fn format(&self) -> Option<ShardFormat> {
        self.follower.as_ref().map(ShardFollower::format)
    }

    /// The first `written` bytes of the file are in place.
    pub fn advance(&mut self, written: u64) -> Result<(), VerifyError> {
        if self.follower.is_none() {
            let mut prefix = [0u8; 9];
            let n = (written as usize).min(prefix.len());
            read_prefix(&self.path, &mut prefix[..n])?;
            match ShardFormat::sniff(&prefix[..n]) {
                Some(f) => self.start(f)?,
                // A file that is neither tells once its first 9 bytes are in: read it as
                // safetensors, whose header check names what is wrong.
                None if n == prefix.len() => self.start(ShardFormat::Safetensors)?,
                None => return Ok(()),
            }
        }
        match self.follower.as_mut() {
            Some(f) => f.advance(written),
            None => Ok(()),
        }
    }

    /// The whole file is written (`len` bytes): the hash and whether it streamed.
    pub fn finish(mut self, len: u64) -> Result<(Followed, ShardFormat), VerifyError> {
        self.advance(len)?;
        if self.follower.is_none() {
            // Under 9 bytes and no `PK` signature: the safetensors reader says why it is bad.
            self.start(ShardFormat::Safetensors)?;
        }
        let f = self.follower.take().ok_or(VerifyError::Empty)?;
        let format = f.format();
        Ok((f.finish(len)?, format))
    }
}

/// The format of a complete shard file, from its first bytes.
pub fn sniff_file(path: &Path) -> Result<ShardFormat, VerifyError> {
    let mut prefix = [0u8; 9];
    read_prefix(path, &mut prefix)?;
    ShardFormat::sniff(&prefix).ok_or_else(|| {
        VerifyError::File(ShardError::UnknownFormat {
            path: path.to_path_buf(),
        })
    })
}

fn read_prefix(path: &Path, buf: &mut [u8]) -> Result<(), VerifyError> {
    use std::os::unix::fs::FileExt;
    let io = |e: std::io::Error| {
        VerifyError::from(PtError::Io {
            path: path.to_path_buf(),
            op: "read".into(),
            source: e,
        })
    };
    let f = std::fs::File::open(path).map_err(io)?;
    f.read_exact_at(buf, 0).map_err(io)
}

/// The committed hash as a [`ModelHash`].
pub fn parse_committed_hash(expected_hex: &str) -> Result<ModelHash, VerifyError> {
    expected_hex
        .parse()
        .map_err(|_| VerifyError::BadCommittedHash(expected_hex.to_owned()))
}

/// The end of a verification: the file's hash must be the committed one.
pub fn check_hash(followed: &Followed, expected: &ModelHash) -> Result<ModelHash, VerifyError> {
    if followed.hash != *expected {
        return Err(VerifyError::HashMismatch {
            expected: expected.to_hex(),
            actual: followed.hash.to_hex(),
        });
    }
    Ok(followed.hash)
}

/// Checks a whole `model_expgroup_<gid>.safetensors` or `.pt` file (format by name) against the
/// committed hash ([`GroupCheck`], then the model hash (§7.5) equal to `expected_hex`). Returns
/// the hash. A download runs the same checks while the file arrives (see [`super::download`]).
pub fn verify_checkpoint_file(
    path: &Path,
    expected_hex: &str,
    group: &ExpertGroup,
) -> Result<ModelHash, VerifyError> {
    let expected = parse_committed_hash(expected_hex)?;
    let len = std::fs::metadata(path)
        .map_err(|e| PtError::Io {
            path: path.to_path_buf(),
            op: "stat".into(),
            source: e,
        })?
        .len();
    let format = ShardFormat::of_path(path).ok_or_else(|| ShardError::UnknownFormat {
        path: path.to_path_buf(),
    })?;
    let verifier = DownloadVerifier::new(path, group.clone(), Some(format))?;
    check_hash(&verifier.finish(len)?.0, &expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The obvious definition, element by element.
    fn reference(dtype: DType, data: &[u8]) -> bool {
        match dtype {
            DType::F16 => data
                .chunks_exact(2)
                .all(|c| (u16::from_le_bytes([c[0], c[1]]) & 0x7C00) != 0x7C00),
            DType::BF16 => data
                .chunks_exact(2)
                .all(|c| (u16::from_le_bytes([c[0], c[1]]) & 0x7F80) != 0x7F80),
            DType::F32 => data
                .chunks_exact(4)
                .all(|c| f32::from_le_bytes(c.try_into().unwrap()).is_finite()),
            DType::F64 => data
                .chunks_exact(8)
                .all(|c| f64::from_le_bytes(c.try_into().unwrap()).is_finite()),
            _ => true,
        }
    }

    #[test]
    fn finiteness_matches_the_element_by_element_definition() {
        let specials: [(DType, Vec<Vec<u8>>); 4] = [
            (
                DType::F16,
                [0x7C00u16, 0xFC00, 0x7E00, 0x7BFF, 0x0001, 0x8000]
                    .iter()
                    .map(|v| v.to_le_bytes().to_vec())
                    .collect(),
            ),
            (
                DType::BF16,
                [0x7F80u16, 0xFF80, 0x7FC0, 0x7F7F, 0x0001]
                    .iter()
                    .map(|v| v.to_le_bytes().to_vec())
                    .collect(),
            ),
            (
                DType::F32,
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 1e-45]
                    .iter()
                    .map(|v| v.to_le_bytes().to_vec())
                    .collect(),
            ),
            (
                DType::F64,
                [f64::NAN, f64::INFINITY, f64::MAX, 5e-324]
                    .iter()
                    .map(|v| v.to_le_bytes().to_vec())
                    .collect(),
            ),
        ];
        for (dtype, values) in specials {
            let es = dtype.elem_size();
            // Each special value alone, and at every position of a longer buffer of ones.
            for v in &values {
                for len in [1usize, 7, 2048, 2049, 5000] {
                    for pos in [0, len / 2, len - 1] {
                        let mut data: Vec<u8> = (0..len)
                            .flat_map(|_| match dtype {
                                DType::F16 => 0x3C00u16.to_le_bytes().to_vec(),
                                DType::BF16 => 0x3F80u16.to_le_bytes().to_vec(),
                                DType::F32 => 1f32.to_le_bytes().to_vec(),
                                _ => 1f64.to_le_bytes().to_vec(),
                            })
                            .collect();
                        data[pos * es..(pos + 1) * es].copy_from_slice(v);
                        assert_eq!(
                            all_finite(dtype, &data),
                            reference(dtype, &data),
                            "{dtype} value {v:?} at {pos} of {len}"
                        );
                    }
                }
            }
        }
    }
}
