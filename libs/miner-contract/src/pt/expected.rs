//! What a caller expects a checkpoint to hold (names, dtypes, shapes), checked against the
//! tensor list before any tensor data is read: a file with unexpected, missing, mistyped or
//! misshapen tensors is refused for the cost of its `data.pkl`.

use std::collections::BTreeMap;
use std::path::Path;

use super::reader::clip;
use super::{DType, PtError, TensorMeta};

/// One expected tensor: its shape and the dtypes it may have (empty: any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub dtypes: Vec<DType>,
    pub shape: Vec<usize>,
}

/// The tensors a checkpoint must hold, by name (e.g. an expert group's routed experts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    pub tensors: BTreeMap<String, ExpectedTensor>,
    /// `true`: every expected tensor must be in the file; `false`: the file may hold a subset.
    pub require_all: bool,
}

impl Expected {
    /// Expects exactly `tensors` (every one present, nothing else).
    pub fn exactly(tensors: BTreeMap<String, ExpectedTensor>) -> Self {
        Expected {
            tensors,
            require_all: true,
        }
    }

    /// Adds (or replaces) one expected tensor.
    pub fn with(mut self, name: impl Into<String>, dtypes: &[DType], shape: &[usize]) -> Self {
        self.tensors.insert(
            name.into(),
            ExpectedTensor {
                dtypes: dtypes.to_vec(),
                shape: shape.to_vec(),
            },
        );
        self
    }

    /// Checks a tensor list (as [`super::PtReader::entries`] or [`super::FollowCheck::entries`]
    /// give it): every name expected, with an allowed dtype and the expected shape, and, with
    /// `require_all`, none missing. The error names the first offending tensor (escaped).
    pub fn check(&self, path: &Path, entries: &[TensorMeta]) -> Result<(), PtError> {
        let refuse = |detail: String| PtError::NotACheckpoint {
            path: path.to_path_buf(),
            detail: format!("unexpected tensors: {detail}"),
        };
        for m in entries {
            let Some(want) = self.tensors.get(&m.name) else {
                return Err(refuse(format!("{:?} is not expected", clip(&m.name))));
            };
            if !want.dtypes.is_empty() && !want.dtypes.contains(&m.dtype) {
                return Err(refuse(format!(
                    "{:?} is {}, expected one of {:?}",
                    clip(&m.name),
                    m.dtype,
                    want.dtypes
                        .iter()
                        .map(|d| d.torch_name())
                        .collect::<Vec<_>>()
                )));
            }
            if want.shape != m.shape {
                return Err(refuse(format!(
                    "{:?} has shape {:?}, expected {:?}",
                    clip(&m.name),
                    m.shape,
                    want.shape
                )));
            }
        }
        if self.require_all && entries.len() < self.tensors.len() {
            let have: std::collections::HashSet<&str> =
                entries.iter().map(|m| m.name.as_str()).collect();
            if let Some(missing) = self.tensors.keys().find(|n| !have.contains(n.as_str())) {
                return Err(refuse(format!(
                    "{:?} is missing ({} of {} expected tensors present)",
                    clip(missing),
                    entries.len(),
                    self.tensors.len()
                )));
            }
        }
        Ok(())
    }
}
