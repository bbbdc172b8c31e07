//! Expert groups (spec §8.3): `expert_groups/<name>/config.yaml` (group id and data config) and
//! `expert_assignment.json` (`{"<layer>": [[local_idx, org_id], ...]}`). The live groups
//! `exp_math` (group 0) and `exp_dummy` (group 1) are embedded as defaults.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const BUILTIN: &[(&str, &str, &str)] = &[
    (
        "exp_math",
        include_str!("../expert_groups/exp_math/config.yaml"),
        include_str!("../expert_groups/exp_math/expert_assignment.json"),
    ),
    (
        "exp_dummy",
        include_str!("../expert_groups/exp_dummy/config.yaml"),
        include_str!("../expert_groups/exp_dummy/expert_assignment.json"),
    ),
];

/// One weighted data source (`DataCfg.dataset_sources[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSource {
    pub path: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default = "text_column")]
    pub text_column: String,
}

fn one() -> f64 {
    1.0
}
fn text_column() -> String {
    "text".into()
}

/// `DataCfg` (reference `config.py:216-233`) with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataCfg {
    pub dataset_name: String,
    pub data_dir: String,
    pub dataset_sources: Option<Vec<DataSource>>,
    pub batch_size: u64,
    pub sequence_length: u64,
    pub per_device_train_batch_size: u64,
    pub world_size: u64,
    pub rank: u64,
    pub dataset_class: Option<String>,
    pub vali_fraction: f64,
}

impl Default for DataCfg {
    fn default() -> Self {
        DataCfg {
            dataset_name: "allenai/c4".into(),
            data_dir: "en".into(),
            dataset_sources: None,
            batch_size: 4,
            sequence_length: 4096,
            per_device_train_batch_size: 1,
            world_size: 10,
            rank: 1,
            dataset_class: None,
            vali_fraction: 0.1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct GroupConfigFile {
    #[serde(default)]
    group_id: u32,
    #[serde(default)]
    data: DataCfg,
}

/// An expert group: which routed experts a miner trains and on what data.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertGroup {
    pub group_id: u32,
    pub name: String,
    /// layer → `(local_idx, org_id)` pairs, in file order.
    pub layers: BTreeMap<usize, Vec<(usize, usize)>>,
    pub data: DataCfg,
}

/// Errors loading an expert group.
#[derive(Debug, thiserror::Error)]
pub enum ExpertGroupError {
    #[error("unknown expert group {name:?} (built in: exp_math, exp_dummy)")]
    Unknown { name: String },
    #[error("read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{file}: {message}")]
    Config { file: String, message: String },
    #[error("{file}: {message}")]
    Assignment { file: String, message: String },
    #[error("{file}: layer {layer} repeats original expert id {org_id}")]
    DuplicateOrgId {
        file: String,
        layer: usize,
        org_id: usize,
    },
    #[error("{file}: layer {layer} repeats local expert index {local_idx}")]
    DuplicateLocalIdx {
        file: String,
        layer: usize,
        local_idx: usize,
    },
}

/// `(layer, expert)` of a routed-expert tensor name `model.layers.{L}.mlp.experts.{E}.<param>`.
pub fn parse_expert_key(tensor_name: &str) -> Option<(usize, usize)> {
    let rest = tensor_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    let (expert, param) = rest.split_once('.')?;
    if param.is_empty() {
        return None;
    }
    Some((parse_decimal(layer)?, parse_decimal(expert)?))
}

fn parse_decimal(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl ExpertGroup {
    /// Names of the embedded groups.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _, _)| *n).collect()
    }

    /// An embedded group (`exp_math`, `exp_dummy`).
    pub fn builtin(name: &str) -> Result<ExpertGroup, ExpertGroupError> {
        let (_, cfg, assignment) = BUILTIN
            .iter()
            .find(|(n, _, _)| *n == name)
            .ok_or_else(|| ExpertGroupError::Unknown { name: name.into() })?;
        Self::from_sources(
            name,
            cfg,
            &format!("expert_groups/{name}/config.yaml (built in)"),
            assignment,
            &format!("expert_groups/{name}/expert_assignment.json (built in)"),
        )
    }

    /// `<base>/<name>/` when that directory exists, else the embedded group of that name.
    pub fn load(name: &str, base: Option<&Path>) -> Result<ExpertGroup, ExpertGroupError> {
        match base.map(|b| b.join(name)) {
            Some(dir) if dir.is_dir() => Self::load_dir(&dir),
            _ => Self::builtin(name),
        }
    }

    /// Loads `dir/config.yaml` and `dir/expert_assignment.json`; the name is the directory name.
    pub fn load_dir(dir: &Path) -> Result<ExpertGroup, ExpertGroupError> {
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path).map_err(|source| ExpertGroupError::Io { path, source })
        };
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let cfg_path = dir.join("config.yaml");
        let asg_path = dir.join("expert_assignment.json");
        Self::from_sources(
            &name,
            &read("config.yaml")?,
            &cfg_path.display().to_string(),
            &read("expert_assignment.json")?,
            &asg_path.display().to_string(),
        )
    }

    /// Parses a group from the two files' contents (`*_origin` name them in errors).
    pub fn from_sources(
        name: &str,
        config_yaml: &str,
        config_origin: &str,
        assignment_json: &str,
        assignment_origin: &str,
    ) -> Result<ExpertGroup, ExpertGroupError> {
        let cfg: GroupConfigFile = match serde_yaml::from_str::<serde_yaml::Value>(config_yaml) {
            Ok(serde_yaml::Value::Null) => GroupConfigFile {
                group_id: 0,
                data: DataCfg::default(),
            },
            Ok(_) => serde_yaml::from_str(config_yaml).map_err(|e| ExpertGroupError::Config {
                file: config_origin.into(),
                message: crate::config::describe_yaml_error(&e),
            })?,
            Err(e) => {
                return Err(ExpertGroupError::Config {
                    file: config_origin.into(),
                    message: crate::config::describe_yaml_error(&e),
                });
            }
        };
        let layers = parse_assignment(assignment_json, assignment_origin)?;
        Ok(ExpertGroup {
            group_id: cfg.group_id,
            name: name.to_string(),
            layers,
            data: cfg.data,
        })
    }

    /// Original (DeepSeek) expert ids of `layer`, sorted; empty if the layer is not in the group.
    pub fn org_ids(&self, layer: usize) -> Vec<usize> {
        let mut ids: Vec<usize> = self
            .layers
            .get(&layer)
            .map(|v| v.iter().map(|(_, org)| *org).collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    /// Local (trainer-side) expert indices of `layer`, sorted.
    pub fn local_ids(&self, layer: usize) -> Vec<usize> {
        let mut ids: Vec<usize> = self
            .layers
            .get(&layer)
            .map(|v| v.iter().map(|(local, _)| *local).collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    /// Whether `tensor_name` is a routed-expert tensor of this group: it parses as
    /// `model.layers.{L}.mlp.experts.{E}.*` and `E` is an original expert id of layer `L`.
    /// (The reference validator also accepts local indices, spec §7.7; tensors are named by
    /// original id, so this stricter rule is the one the shard writer and download check use.)
    pub fn is_group_key(&self, tensor_name: &str) -> bool {
        parse_expert_key(tensor_name).is_some_and(|(layer, expert)| {
            self.layers
                .get(&layer)
                .is_some_and(|v| v.iter().any(|(_, org)| *org == expert))
        })
    }

    /// Total number of `(layer, expert)` pairs.
    pub fn num_experts(&self) -> usize {
        self.layers.values().map(Vec::len).sum()
    }
}

fn parse_assignment(
    json: &str,
    origin: &str,
) -> Result<BTreeMap<usize, Vec<(usize, usize)>>, ExpertGroupError> {
    let bad = |message: String| ExpertGroupError::Assignment {
        file: origin.to_string(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(bad(
            "expected an object {\"<layer>\": [[local, org], ...]}".into()
        ));
    };
    let mut layers = BTreeMap::new();
    for (key, entries) in map {
        let layer = parse_decimal(&key)
            .ok_or_else(|| bad(format!("layer key {key:?} is not an integer")))?;
        let serde_json::Value::Array(entries) = entries else {
            return Err(bad(format!(
                "layer {layer}: expected a list of [local, org] pairs"
            )));
        };
        let mut pairs = Vec::with_capacity(entries.len());
        let mut seen_org = BTreeSet::new();
        let mut seen_local = BTreeSet::new();
        for (i, entry) in entries.iter().enumerate() {
            let pair = entry
                .as_array()
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
                .and_then(|(l, o)| Some((usize::try_from(l).ok()?, usize::try_from(o).ok()?)))
                .ok_or_else(|| {
                    bad(format!(
                        "layer {layer}, entry {i}: expected [local_idx, org_id] (two non-negative integers), got {entry}"
                    ))
                })?;
            if !seen_org.insert(pair.1) {
                return Err(ExpertGroupError::DuplicateOrgId {
                    file: origin.into(),
                    layer,
                    org_id: pair.1,
                });
            }
            if !seen_local.insert(pair.0) {
                return Err(ExpertGroupError::DuplicateLocalIdx {
                    file: origin.into(),
                    layer,
                    local_idx: pair.0,
                });
            }
            pairs.push(pair);
        }
        layers.insert(layer, pairs);
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_exp_math_matches_spec() {
        let g = ExpertGroup::builtin("exp_math").unwrap();
        assert_eq!(g.group_id, 0);
        assert_eq!(
            g.layers.keys().copied().collect::<Vec<_>>(),
            (1..=26).collect::<Vec<_>>()
        );
        assert_eq!(g.num_experts(), 26 * 8);
        assert_eq!(
            g.layers[&1],
            vec![
                (0, 22),
                (1, 17),
                (2, 44),
                (3, 15),
                (4, 25),
                (5, 39),
                (6, 4),
                (7, 46)
            ]
        );
        assert_eq!(g.org_ids(2), vec![0, 19, 22, 28, 35, 48, 50, 58]);
        assert_eq!(g.data.sequence_length, 4096);
        assert_eq!(g.data.batch_size, 4);
        let sources = g.data.dataset_sources.as_ref().unwrap();
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[1].path, "nvidia/Nemotron-CC-Math-v1");
        assert_eq!(sources[1].name.as_deref(), Some("4plus"));
        assert_eq!(sources[0].weight, 0.5);
        assert_eq!(
            g.data.dataset_class.as_deref(),
            Some("expert_groups.exp_math.dataset:StreamingTorchDataset")
        );
        assert!(g.is_group_key("model.layers.1.mlp.experts.22.gate_up_proj"));
        assert!(g.is_group_key("model.layers.2.mlp.experts.0.down_proj"));
        assert!(!g.is_group_key("model.layers.1.mlp.experts.0.down_proj"));
        assert!(!g.is_group_key("model.layers.0.mlp.experts.22.down_proj"));
        assert!(!g.is_group_key("model.layers.1.mlp.gate.weight"));
        assert!(!g.is_group_key("model.layers.1.mlp.experts.22"));
    }

    #[test]
    fn builtin_exp_dummy() {
        let g = ExpertGroup::builtin("exp_dummy").unwrap();
        assert_eq!(g.group_id, 1);
        assert_eq!(g.layers.len(), 48);
        assert_eq!(g.org_ids(9), (8..16).collect::<Vec<_>>());
        assert_eq!(g.data.batch_size, 1);
        assert_eq!(g.data.sequence_length, 100);
        assert!(matches!(
            ExpertGroup::builtin("exp_nope"),
            Err(ExpertGroupError::Unknown { .. })
        ));
    }

    #[test]
    fn rejects_repeated_org_id_naming_layer_and_id() {
        let err = ExpertGroup::from_sources(
            "g",
            "group_id: 3\n",
            "g/config.yaml",
            r#"{"1": [[0, 5], [1, 6]], "4": [[0, 9], [1, 9]]}"#,
            "g/expert_assignment.json",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "g/expert_assignment.json: layer 4 repeats original expert id 9"
        );
        let err = ExpertGroup::from_sources("g", "", "c", r#"{"x": []}"#, "a.json").unwrap_err();
        assert!(err.to_string().contains("layer key \"x\""), "{err}");
        let err =
            ExpertGroup::from_sources("g", "", "c", r#"{"2": [[0, -1]]}"#, "a.json").unwrap_err();
        assert!(err.to_string().contains("layer 2, entry 0"), "{err}");
    }

    #[test]
    fn expert_key_parsing() {
        assert_eq!(
            parse_expert_key("model.layers.12.mlp.experts.63.gate_up_proj"),
            Some((12, 63))
        );
        assert_eq!(
            parse_expert_key("model.layers.12.mlp.shared_experts.gate_proj.weight"),
            None
        );
        assert_eq!(
            parse_expert_key("model.layers.x.mlp.experts.1.down_proj"),
            None
        );
        assert_eq!(parse_expert_key("model.embed_tokens.weight"), None);
    }
}
