//! Connito's miner `config.yaml` (spec §2.2): the same schema, defaults and derived values, so an
//! existing run directory's file loads unchanged and a file written here loads in the reference.
//!
//! Unknown keys are ignored (the reference uses pydantic `extra="ignore"`). Path fields
//! (`ckpt.*_path`, `log.*path`) are re-derived on load, as the reference does. Derived intervals
//! (`ckpt.checkpoint_interval`, `ckpt.full_validation_interval`, `log.metric_interval`) default to
//! `max(1, round(local_par.global_opt_interval * 0.2))` when absent. Writes are atomic.
//!
//! Deviation: downloaded validator checkpoints live per miner in `<run>/validator_checkpoint/`
//! (see [`crate::layout`]); `ckpt.validator_checkpoint_path` is still written with the reference's
//! value for compatibility and is not used by this crate.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::expert_group::{ExpertGroup, ExpertGroupError};
use crate::layout::CONFIG_FILE;
use crate::publish::{self, PublishError};

/// Errors reading or writing `config.yaml`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path} does not exist")]
    Missing { path: PathBuf },
    #[error("read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bad YAML or a field of the wrong type; `message` starts with the field path
    /// (e.g. `cycle.train_period: expected an integer ...`).
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: Box<PublishError>,
    },
}

/// Rewrites serde_yaml's type names into words an operator understands; keeps the field path
/// and the line/column.
pub(crate) fn describe_yaml_error(e: &serde_yaml::Error) -> String {
    let mut msg = e.to_string();
    for (from, to) in [
        ("expected u64", "expected an integer"),
        ("expected u32", "expected an integer"),
        ("expected u16", "expected an integer"),
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        msg = msg.replace(from, to);
    }
    msg
}

macro_rules! defaults {
    ($ty:ident { $($field:ident : $val:expr),* $(,)? }) => {
        impl Default for $ty {
            fn default() -> Self {
                $ty { $($field: $val.into()),* }
            }
        }
    };
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunCfg {
    pub run_name: String,
}
defaults!(RunCfg {
    run_name: "foundation"
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChainCfg {
    pub netuid: u16,
    pub uid: u16,
    pub hotkey_ss58: String,
    pub coldkey_ss58: String,
    pub ip: String,
    pub port: u16,
    pub coldkey_name: String,
    pub hotkey_name: String,
    pub network: String,
    pub lite_network: String,
}
defaults!(ChainCfg {
    netuid: 102u16,
    uid: 0u16,
    hotkey_ss58: "",
    coldkey_ss58: "",
    ip: "0.0.0.0",
    port: 8000u16,
    coldkey_name: "template_coldkey_name",
    hotkey_name: "template_hotkey_name",
    network: "archive",
    lite_network: "finney",
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelCfg {
    pub model_path: String,
    pub base_arch_model: String,
    pub foundation: bool,
    pub torch_compile: bool,
    pub attn_implementation: String,
    pub precision: String,
    pub device: String,
}
defaults!(ModelCfg {
    model_path: "deepseek-ai/DeepSeek-V2-Lite",
    base_arch_model: "deepseek-ai/DeepSeek-V2-Lite",
    foundation: true,
    torch_compile: false,
    attn_implementation: "sdpa",
    precision: "fp16-mixed",
    device: "cuda",
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MoeCfg {
    pub interleave: bool,
    pub num_experts: u32,
    pub num_experts_per_tok: u32,
    pub partial_topk: u32,
    pub full_topk: u32,
    pub aux_load_balance: bool,
    pub router_aux_loss_coef: f64,
    pub partial_moe: bool,
    pub num_worker_groups: u32,
}
defaults!(MoeCfg {
    interleave: true,
    num_experts: 8u32,
    num_experts_per_tok: 2u32,
    partial_topk: 1u32,
    full_topk: 2u32,
    aux_load_balance: true,
    router_aux_loss_coef: 1.0,
    partial_moe: true,
    num_worker_groups: 2u32,
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CkptCfg {
    pub resume_from_ckpt: bool,
    pub strict_sharding: bool,
    /// Re-derived on load: `checkpoints/miner`.
    pub base_checkpoint_path: String,
    /// Re-derived on load: `checkpoints/miner/<coldkey_name>/<hotkey_name>/<run_name>`.
    pub checkpoint_path: String,
    /// Inner steps between saves (derived default 20).
    pub checkpoint_interval: u64,
    pub full_validation_interval: u64,
    /// Retention: checkpoints kept per kind.
    pub checkpoint_topk: usize,
    /// The reference's shared folder, written for compatibility only (see module docs).
    pub validator_checkpoint_path: String,
    pub download_concurrency: u32,
    /// The format of the model shard the trainer writes: `safetensors` (the live subnet's since
    /// May 2026, addendum A1) or `pt`. Not in the reference's schema (it always writes
    /// safetensors now); readers accept both whatever this says. Written only when not the
    /// default, so a default config stays the reference's file.
    #[serde(skip_serializing_if = "crate::shard::ShardFormat::is_default")]
    pub shard_format: crate::shard::ShardFormat,
}
defaults!(CkptCfg {
    resume_from_ckpt: true,
    strict_sharding: false,
    base_checkpoint_path: BASE_CHECKPOINT_PATH,
    checkpoint_path: "",
    checkpoint_interval: 20u64,
    full_validation_interval: 20u64,
    checkpoint_topk: 2usize,
    validator_checkpoint_path: "checkpoints/miner/validator_checkpoint",
    download_concurrency: 4u32,
    shard_format: crate::shard::ShardFormat::Safetensors,
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HfCfg {
    pub checkpoint_repo: Option<String>,
    pub default_repo_name: String,
    pub token_env_var: String,
    /// The Hub endpoint (ours; the reference reads only `HF_ENDPOINT`). Not written when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Keep the repo private until MinerCommit1 is over (ours; on by default). Not written when
    /// on, so a written config stays the reference's.
    #[serde(skip_serializing_if = "is_true")]
    pub copy_guard: bool,
}
fn is_true(b: &bool) -> bool {
    *b
}
impl Default for HfCfg {
    fn default() -> Self {
        HfCfg {
            checkpoint_repo: None,
            default_repo_name: "co".into(),
            token_env_var: "HF_TOKEN".into(),
            endpoint: None,
            copy_guard: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedCfg {
    pub warmup_steps: u64,
    pub total_steps: u64,
}
defaults!(SchedCfg {
    warmup_steps: 0u64,
    total_steps: 88000u64
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogCfg {
    pub log_wandb: bool,
    pub wandb_project_name: String,
    pub wandb_resume: bool,
    pub wandb_full_id: String,
    pub wandb_partial_id: Vec<String>,
    pub base_metric_path: String,
    /// Re-derived on load: `metrics/<run_name>.csv`.
    pub metric_path: String,
    pub metric_interval: u64,
}
impl Default for LogCfg {
    fn default() -> Self {
        LogCfg {
            log_wandb: false,
            wandb_project_name: "test-moe".into(),
            wandb_resume: false,
            wandb_full_id: String::new(),
            wandb_partial_id: Vec::new(),
            base_metric_path: BASE_METRIC_PATH.into(),
            metric_path: String::new(),
            metric_interval: 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptCfg {
    pub lr: f64,
    pub outer_lr: f64,
    pub outer_momentum: f64,
}
defaults!(OptCfg {
    lr: 1e-5,
    outer_lr: 0.7,
    outer_momentum: 0.9
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CycleCfg {
    pub cycle_length: u64,
    pub distribute_period: u64,
    pub train_period: u64,
    pub commit_period: u64,
    pub submission_period: u64,
    pub validate_period: u64,
    pub merge_period: u64,
    pub owner_url: String,
    pub version_range_cycles: u64,
    pub api_timeout_sec: u64,
    pub api_retries: u32,
    pub api_backoff_sec: u64,
}
defaults!(CycleCfg {
    cycle_length: 448u64,
    distribute_period: 20u64,
    train_period: 300u64,
    commit_period: 10u64,
    submission_period: 80u64,
    validate_period: 10u64,
    merge_period: 50u64,
    owner_url: "https://cycle-api.connito.ai:443",
    version_range_cycles: 3u64,
    api_timeout_sec: 10u64,
    api_retries: 5u32,
    api_backoff_sec: 2u64,
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskCfg {
    pub expert_group_name: String,
    pub load_all_expert_groups: bool,
}
defaults!(TaskCfg {
    expert_group_name: "exp_math",
    load_all_expert_groups: false
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataloaderCfg {
    pub world_size: u64,
}
defaults!(DataloaderCfg { world_size: 10u64 });

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LocalParCfg {
    pub gradient_accumulation_steps: u64,
    pub global_opt_interval: u64,
    pub world_size: u64,
    pub port: u16,
    pub ip_address: String,
}
defaults!(LocalParCfg {
    gradient_accumulation_steps: 4u64,
    global_opt_interval: 100u64,
    world_size: 1u64,
    port: 29500u16,
    ip_address: "127.0.0.1",
});

const BASE_CHECKPOINT_PATH: &str = "checkpoints/miner";
const BASE_METRIC_PATH: &str = "metrics";

/// The miner's `config.yaml` (`MinerConfig`), fields in the reference's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MinerConfig {
    pub run: RunCfg,
    pub chain: ChainCfg,
    pub model: ModelCfg,
    pub moe: MoeCfg,
    pub ckpt: CkptCfg,
    pub hf: HfCfg,
    pub sched: SchedCfg,
    pub log: LogCfg,
    pub opt: OptCfg,
    pub cycle: CycleCfg,
    pub task: TaskCfg,
    pub dataloader: DataloaderCfg,
    pub role: String,
    pub local_par: LocalParCfg,
}

impl Default for MinerConfig {
    fn default() -> Self {
        let mut c = MinerConfig {
            run: RunCfg::default(),
            chain: ChainCfg::default(),
            model: ModelCfg::default(),
            moe: MoeCfg::default(),
            ckpt: CkptCfg::default(),
            hf: HfCfg::default(),
            sched: SchedCfg::default(),
            log: LogCfg::default(),
            opt: OptCfg::default(),
            cycle: CycleCfg::default(),
            task: TaskCfg::default(),
            dataloader: DataloaderCfg::default(),
            role: "miner".into(),
            local_par: LocalParCfg::default(),
        };
        c.refresh_paths();
        c
    }
}

/// `max(1, round(global_opt_interval * 0.2))` with Python's round-half-to-even.
pub fn derived_interval(global_opt_interval: u64) -> u64 {
    let v = (global_opt_interval as f64 * 0.2).round_ties_even();
    (v as u64).max(1)
}

/// `path` itself when it names a file, `path/config.yaml` when it is a directory.
pub fn resolve_config_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(CONFIG_FILE)
    } else {
        path.to_path_buf()
    }
}

impl MinerConfig {
    /// Defaults for a new run (what `create_config --coldkey_name CK --hotkey_name HK --run_name RUN` writes).
    pub fn new_run(coldkey_name: &str, hotkey_name: &str, run_name: &str) -> MinerConfig {
        let mut c = MinerConfig::default();
        c.chain.coldkey_name = coldkey_name.into();
        c.chain.hotkey_name = hotkey_name.into();
        c.run.run_name = run_name.into();
        c.refresh_paths();
        c
    }

    /// Loads `config.yaml` from `path` (the file, or the run directory holding it); returns the
    /// config and the file it came from.
    pub fn load(path: &Path) -> Result<(MinerConfig, PathBuf), ConfigError> {
        let file = resolve_config_path(path);
        let text = std::fs::read_to_string(&file).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ConfigError::Missing { path: file.clone() }
            } else {
                ConfigError::Io {
                    path: file.clone(),
                    source,
                }
            }
        })?;
        let cfg = Self::from_yaml_str(&text, &file)?;
        Ok((cfg, file))
    }

    /// Parses YAML text; `origin` names the file in errors.
    pub fn from_yaml_str(text: &str, origin: &Path) -> Result<MinerConfig, ConfigError> {
        let invalid = |e: serde_yaml::Error| ConfigError::Invalid {
            path: origin.to_path_buf(),
            message: describe_yaml_error(&e),
        };
        let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(invalid)?;
        let mut cfg = match &value {
            serde_yaml::Value::Null => MinerConfig::default(),
            serde_yaml::Value::Mapping(_) => {
                serde_yaml::from_str::<MinerConfig>(text).map_err(invalid)?
            }
            _ => {
                return Err(ConfigError::Invalid {
                    path: origin.to_path_buf(),
                    message: "expected a mapping of sections (run, chain, ckpt, ...)".into(),
                });
            }
        };
        let has = |section: &str, key: &str| {
            value
                .get(section)
                .and_then(|s| s.get(key))
                .is_some_and(|v| !v.is_null())
        };
        let derived = derived_interval(cfg.local_par.global_opt_interval);
        if !has("ckpt", "checkpoint_interval") {
            cfg.ckpt.checkpoint_interval = derived;
        }
        if !has("ckpt", "full_validation_interval") {
            cfg.ckpt.full_validation_interval = derived;
        }
        if !has("log", "metric_interval") {
            cfg.log.metric_interval = derived;
        }
        cfg.refresh_paths();
        Ok(cfg)
    }

    /// Re-derives the path fields from names, as the reference's `_refresh_paths` does.
    pub fn refresh_paths(&mut self) {
        self.ckpt.base_checkpoint_path = BASE_CHECKPOINT_PATH.into();
        self.ckpt.checkpoint_path = self.checkpoint_rel_path().display().to_string();
        self.log.base_metric_path = BASE_METRIC_PATH.into();
        self.log.metric_path = format!("{BASE_METRIC_PATH}/{}.csv", self.run.run_name);
    }

    /// `checkpoints/miner/<coldkey_name>/<hotkey_name>/<run_name>` (relative to the root).
    pub fn checkpoint_rel_path(&self) -> PathBuf {
        Path::new(BASE_CHECKPOINT_PATH)
            .join(&self.chain.coldkey_name)
            .join(&self.chain.hotkey_name)
            .join(&self.run.run_name)
    }

    /// The run directory under a repository/data root.
    pub fn run_dir(&self, root: &Path) -> PathBuf {
        root.join(self.checkpoint_rel_path())
    }

    /// The root a run directory lives under, when it sits at the standard place
    /// (`<root>/checkpoints/miner/<coldkey>/<hotkey>/<run>`).
    pub fn root_of_run_dir(&self, run_dir: &Path) -> Option<PathBuf> {
        let rel = self.checkpoint_rel_path();
        let n = rel.components().count();
        let comps: Vec<_> = run_dir.components().collect();
        if comps.len() < n {
            return None;
        }
        let (head, tail) = comps.split_at(comps.len() - n);
        if tail
            .iter()
            .map(|c| c.as_os_str())
            .eq(rel.components().map(|c| c.as_os_str()))
        {
            Some(head.iter().collect())
        } else {
            None
        }
    }

    /// The YAML text (section and field order as the reference writes it).
    pub fn to_yaml_string(&self) -> String {
        let mut c = self.clone();
        c.refresh_paths();
        // Serializing plain data structs to YAML cannot fail.
        serde_yaml::to_string(&c).unwrap_or_default()
    }

    /// Writes the config atomically (temp + fsync + rename); `path` is the file or the run dir.
    pub fn write(&self, path: &Path) -> Result<PathBuf, ConfigError> {
        let file = resolve_config_path(path);
        publish::write_file_atomic(&file, self.to_yaml_string().as_bytes()).map_err(|source| {
            ConfigError::Write {
                path: file.clone(),
                source: Box::new(source),
            }
        })?;
        Ok(file)
    }

    /// The configured expert group: `<base>/<task.expert_group_name>/` if present, else the
    /// embedded copy.
    pub fn expert_group(&self, base: Option<&Path>) -> Result<ExpertGroup, ExpertGroupError> {
        ExpertGroup::load(&self.task.expert_group_name, base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_intervals_round_half_to_even() {
        assert_eq!(derived_interval(100), 20);
        assert_eq!(derived_interval(1), 1);
        assert_eq!(derived_interval(0), 1);
        assert_eq!(derived_interval(50), 10);
        // 12.4 → 12, 17.4 → 17 (n * 0.2 never ends in .5, so ties do not occur).
        assert_eq!(derived_interval(62), 12);
        assert_eq!(derived_interval(87), 17);
    }

    #[test]
    fn root_of_run_dir() {
        let c = MinerConfig::new_run("ck", "hk", "foundation");
        assert_eq!(
            c.root_of_run_dir(Path::new("/data/checkpoints/miner/ck/hk/foundation")),
            Some(PathBuf::from("/data"))
        );
        assert_eq!(c.root_of_run_dir(Path::new("/data/elsewhere")), None);
    }
}
