//! Validation of a downloaded validator checkpoint (spec §7.7), in one pass over the file:
//! every tensor is read once, checked (routed expert of our group, finite) and fed to the
//! model hasher in sorted-name order.

use std::path::Path;

use miner_contract::ExpertGroup;
use miner_contract::hash::{ModelHash, ModelHasher};
use miner_contract::pt::{DType, PtError, PtLayout, PtReader};

/// Why a checkpoint is refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("signature of hotkey {hotkey} over hash {hash} does not verify")]
    BadSignature { hotkey: String, hash: String },
    #[error("committed hash {0:?} is not 48 lowercase hex chars")]
    BadCommittedHash(String),
    #[error("file hash {actual} differs from the committed hash {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("tensor {name} is not a routed expert of expert group {group}")]
    ForeignKey { name: String, group: u32 },
    #[error("tensor {name} holds NaN or infinite values")]
    NonFinite { name: String },
    #[error("the checkpoint holds no tensors")]
    Empty,
    #[error("the checkpoint is not wrapped in {{\"model_state_dict\": ...}}")]
    NotModelStateDict,
    #[error("committed expert group {committed} is not ours ({ours})")]
    WrongGroup { committed: u32, ours: u32 },
    #[error(transparent)]
    File(#[from] PtError),
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

fn all_finite(dtype: DType, data: &[u8]) -> bool {
    match dtype {
        // Exponent bits all ones = Inf/NaN.
        DType::F16 => data
            .chunks_exact(2)
            .all(|c| (u16::from_le_bytes([c[0], c[1]]) & 0x7C00) != 0x7C00),
        DType::BF16 => data
            .chunks_exact(2)
            .all(|c| (u16::from_le_bytes([c[0], c[1]]) & 0x7F80) != 0x7F80),
        DType::F32 => data
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        DType::F64 => data.chunks_exact(8).all(|c| {
            f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]).is_finite()
        }),
        _ => true,
    }
}

/// Checks a `model_expgroup_<gid>.pt` file against the committed hash: `{"model_state_dict"}`
/// layout, at least one tensor, every key a routed expert of `group`, all values finite, and
/// the model hash (§7.5) equal to `expected_hex`. Returns the hash.
pub fn verify_checkpoint_file(
    path: &Path,
    expected_hex: &str,
    group: &ExpertGroup,
) -> Result<ModelHash, VerifyError> {
    let expected: ModelHash = expected_hex
        .parse()
        .map_err(|_| VerifyError::BadCommittedHash(expected_hex.to_owned()))?;
    let reader = PtReader::open(path)?;
    if reader.layout() != PtLayout::ModelStateDict {
        return Err(VerifyError::NotModelStateDict);
    }
    if reader.entries().is_empty() {
        return Err(VerifyError::Empty);
    }
    // Key check first: it needs no tensor data, so a foreign file is refused cheaply.
    if let Some(m) = reader
        .entries()
        .iter()
        .find(|m| !group.is_group_key(&m.name))
    {
        return Err(VerifyError::ForeignKey {
            name: m.name.clone(),
            group: group.group_id,
        });
    }
    let mut hasher = ModelHasher::new();
    for meta in reader.entries() {
        let t = reader.read(&meta.name)?;
        if !all_finite(t.dtype, &t.data) {
            return Err(VerifyError::NonFinite {
                name: meta.name.clone(),
            });
        }
        hasher.update_tensor(&meta.name, &t.data);
    }
    let actual = hasher.finalize();
    if actual != expected {
        return Err(VerifyError::HashMismatch {
            expected: expected.to_hex(),
            actual: actual.to_hex(),
        });
    }
    Ok(actual)
}
