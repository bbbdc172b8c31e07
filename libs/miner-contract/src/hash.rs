//! The model hash (spec §7.5): BLAKE2b with a 24-byte digest parameter over, for every tensor in
//! sorted-name order, the name's UTF-8 bytes followed by the tensor's raw little-endian C-order
//! bytes, with no separators or length prefixes.
//!
//! **Invariant:** the hash of a checkpoint file is the hash of the tensors as stored in it, so
//! [`crate::pt::write_pt`] computes it in the same pass as the write and [`hash_pt_file`]
//! recomputes it by streaming the file tensor by tensor.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use blake2::Blake2b;
use blake2::digest::Digest;
use blake2::digest::consts::U24;

use crate::pt::{PtError, PtReader, Tensor};

/// A model hash: 24 bytes, shown as 48 lowercase hex characters (what goes on chain).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelHash(pub [u8; 24]);

impl ModelHash {
    /// 48 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ModelHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModelHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelHash({})", self.to_hex())
    }
}

/// Why a string is not a model hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model hash {input:?}: expected 48 hex characters")]
pub struct ParseModelHashError {
    /// The rejected input (truncated to 100 characters).
    pub input: String,
}

impl FromStr for ModelHash {
    type Err = ParseModelHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseModelHashError {
            input: s.chars().take(100).collect(),
        };
        if s.len() != 48 {
            return Err(err());
        }
        let mut out = [0u8; 24];
        hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
        Ok(ModelHash(out))
    }
}

impl serde::Serialize for ModelHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ModelHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental model hasher. Feed tensors in sorted-name order: [`ModelHasher::update_tensor`]
/// for a whole tensor, or the name then the data in pieces through [`ModelHasher::update`]
/// (the hash has no separators, so both give the same result).
#[derive(Clone, Default)]
pub struct ModelHasher {
    inner: Blake2b<U24>,
}

impl ModelHasher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds raw bytes (a name or a piece of a tensor's little-endian data).
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
    }

    /// Feeds one tensor: its name's UTF-8 bytes, then its little-endian C-order bytes.
    pub fn update_tensor(&mut self, name: &str, le_bytes: &[u8]) {
        self.inner.update(name.as_bytes());
        self.inner.update(le_bytes);
    }

    pub fn finalize(self) -> ModelHash {
        ModelHash(self.inner.finalize().into())
    }
}

impl std::io::Write for ModelHasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The model hash of a `.pt` checkpoint file, read tensor by tensor (memory stays bounded by the
/// largest non-contiguous tensor; contiguous tensors are streamed in chunks).
pub fn hash_pt_file(path: &Path) -> Result<ModelHash, PtError> {
    PtReader::open(path)?.model_hash()
}

/// The model hash of an in-memory state dict (a `BTreeMap` iterates in sorted byte order, which
/// for UTF-8 equals Python's `sorted` on `str`).
pub fn hash_state_dict(tensors: &BTreeMap<String, Tensor>) -> ModelHash {
    let mut hasher = ModelHasher::new();
    for (name, t) in tensors {
        hasher.update_tensor(name, &t.data);
    }
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pt::DType;

    fn f16(x: f32) -> [u8; 2] {
        // Exact for the test values (all representable in fp16).
        let bits = x.to_bits();
        let sign = ((bits >> 16) & 0x8000) as u16;
        let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
        let mant = ((bits >> 13) & 0x3ff) as u16;
        let h = if x == 0.0 {
            sign
        } else {
            sign | ((exp as u16) << 10) | mant
        };
        h.to_le_bytes()
    }

    fn f16_tensor(shape: Vec<usize>, vals: &[f32]) -> Tensor {
        Tensor {
            dtype: DType::F16,
            shape,
            data: vals.iter().flat_map(|v| f16(*v)).collect(),
        }
    }

    #[test]
    fn spec_test_vector() {
        let mut sd = BTreeMap::new();
        sd.insert(
            "model.layers.1.mlp.experts.4.gate_up_proj".to_string(),
            f16_tensor(vec![2, 2], &[1.0, 2.0, 3.0, -0.5]),
        );
        sd.insert(
            "model.layers.1.mlp.experts.4.down_proj".to_string(),
            f16_tensor(vec![1, 2], &[0.25, -1.0]),
        );
        assert_eq!(
            sd["model.layers.1.mlp.experts.4.gate_up_proj"].data,
            hex::decode("003c0040004200b8").unwrap()
        );
        assert_eq!(
            sd["model.layers.1.mlp.experts.4.down_proj"].data,
            hex::decode("003400bc").unwrap()
        );
        let h = hash_state_dict(&sd);
        assert_eq!(
            h.to_hex(),
            "dd252182c01da6b0e8485ce0669cb0a2189e3d3758e43873"
        );
        assert_eq!(h.to_string(), h.to_hex());

        // Piecewise updates give the same digest (no separators).
        let mut hasher = ModelHasher::new();
        hasher.update(b"model.layers.1.mlp.experts.4.down_proj");
        hasher.update(&[0x00, 0x34]);
        hasher.update(&[0x00, 0xbc]);
        hasher.update_tensor(
            "model.layers.1.mlp.experts.4.gate_up_proj",
            &hex::decode("003c0040004200b8").unwrap(),
        );
        assert_eq!(hasher.finalize(), h);
    }

    #[test]
    fn hex_round_trip_and_rejects_bad_strings() {
        let h: ModelHash = "dd252182c01da6b0e8485ce0669cb0a2189e3d3758e43873"
            .parse()
            .unwrap();
        assert_eq!(
            h.to_hex(),
            "dd252182c01da6b0e8485ce0669cb0a2189e3d3758e43873"
        );
        assert!("dd25".parse::<ModelHash>().is_err());
        assert!(
            "zz252182c01da6b0e8485ce0669cb0a2189e3d3758e43873"
                .parse::<ModelHash>()
                .is_err()
        );
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, "\"dd252182c01da6b0e8485ce0669cb0a2189e3d3758e43873\"");
        assert_eq!(serde_json::from_str::<ModelHash>(&json).unwrap(), h);
    }
}
