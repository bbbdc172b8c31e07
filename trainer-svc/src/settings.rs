//! The trainer's typed, validated configuration: flags (clap, each with an env var) plus the
//! miner's `config.yaml` (spec §2.2) and the expert group. Nothing else reads the environment.
//! Validation happens before any port is bound; a bad field exits 64 naming the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use miner_contract::MinerConfig;

use crate::data::SourceSpec;
use crate::engine::model::{GroupExperts, ModelConfig};
use crate::optim::AdamWConfig;

/// Command line of `trainer-svc`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "trainer-svc",
    version,
    about = "Trains the miner's expert group and serves its status over gRPC"
)]
pub struct Cli {
    /// `auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "TRAINER_DEVICE", default_value = "auto")]
    pub device: String,
    /// Stop cleanly (with a final checkpoint) after this many optimizer steps in this run.
    #[arg(long, env = "TRAINER_MAX_STEPS")]
    pub max_steps: Option<u64>,
    /// The miner's `config.yaml`, or the run directory holding it. Without it: the embedded
    /// default (tiny model, bundled corpus and tokenizer) under `./checkpoints/miner/...`.
    #[arg(long, env = "MINER_CONFIG_PATH")]
    pub path: Option<PathBuf>,
    /// Directory of safetensors base weights (and `tokenizer.json`) for the non-expert tensors.
    #[arg(long, env = "TRAINER_BASE_WEIGHTS")]
    pub base_weights: Option<PathBuf>,
    /// HuggingFace `config.json` of the model (default: DeepSeek-V2-Lite, or tiny for the embedded default).
    #[arg(long, env = "TRAINER_MODEL_CONFIG")]
    pub model_config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "TRAINER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address.
    #[arg(long, env = "TRAINER_METRICS_LISTEN", default_value = "127.0.0.1:8100")]
    pub metrics_listen: SocketAddr,
    /// PEM certificate chain for TLS on the gRPC listener (with `--tls-key`). Required to
    /// listen on a non-loopback address.
    #[arg(long, env = "TRAINER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "TRAINER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// OTLP/gRPC collector for spans, e.g. `http://127.0.0.1:4317` (off when unset).
    #[arg(long, env = "TRAINER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// chainsync-svc's gRPC address (`HOST:PORT` or `http://HOST:PORT`) to follow the phase
    /// from. Default: `<run>/control/chainsync.json`, re-read on every reconnect.
    #[arg(long, env = "TRAINER_CHAINSYNC")]
    pub chainsync: Option<String>,
    /// `text` or `json` log lines.
    #[arg(long, env = "TRAINER_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// How much lower the training threads' CPU priority is than the service's (a nice increment,
    /// 0-19), so status and stop calls are answered at once even when training keeps every core
    /// busy; with nothing else runnable training still gets every core. 0 turns it off.
    #[arg(long, env = "TRAINER_NICE", default_value_t = crate::TRAINING_NICE,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    pub training_nice: i32,
    /// Format of the model shard in own checkpoints: `safetensors` (the live subnet's, default)
    /// or `pt`. Overrides `ckpt.shard_format` of the config.
    #[arg(long, env = "TRAINER_SHARD_FORMAT")]
    pub shard_format: Option<miner_contract::shard::ShardFormat>,
}

pub use miner_service::LogFormat;

/// A configuration problem, naming the field (exit status 64).
#[derive(Debug, thiserror::Error)]
#[error("invalid config field `{field}`: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Mixed precision (only on CUDA; the CPU always computes in fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp16Mixed,
    Bf16Mixed,
}

/// Where the tokenizer comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    Embedded,
    File(PathBuf),
}

/// Data settings of the expert group.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSettings {
    pub sources: Vec<SourceSpec>,
    pub tokenizer: TokenizerSource,
    pub sequence_length: usize,
    /// Sequences per micro-batch (`per_device_train_batch_size`).
    pub rows: usize,
    pub vali_fraction: f64,
    /// Held-out micro-batches per evaluation.
    pub eval_batches: usize,
}

/// The trainer's complete, validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub run_dir: PathBuf,
    pub device: tch::Device,
    pub precision: Precision,
    pub max_steps: Option<u64>,
    pub model: ModelConfig,
    pub base_weights: Option<PathBuf>,
    pub expert_group_id: u32,
    pub expert_group_name: String,
    pub experts: GroupExperts,
    pub data: DataSettings,
    pub adamw: AdamWConfig,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub grad_accum: u64,
    pub max_grad_norm: f64,
    /// Optimizer steps between two metric log rows (CSV, gauges): `max(round(global_opt_interval*0.02), 1)`.
    pub log_interval: u64,
    pub metric_interval: u64,
    pub checkpoint_interval: u64,
    pub checkpoint_topk: usize,
    pub metric_csv: PathBuf,
    pub seed: i64,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// Minimum seconds between two polls of the validator checkpoint directory.
    pub validator_poll_secs: f64,
    /// TLS certificate and key of the gRPC listener.
    pub tls: Option<miner_service::TlsFiles>,
    /// The control token for mutating RPCs (and every RPC off loopback). `None`: read or
    /// create `<run>/control/token` at start (the binary always does this). Never logged.
    pub control_token: Option<miner_service::ControlToken>,
    /// `--chainsync` as an `http://` URI; `None`: the run directory's endpoints file.
    pub chainsync: Option<String>,
    /// `--training-nice`: the nice increment of the training threads.
    pub training_nice: i32,
    /// Format of the model shard written into own checkpoints (`--shard-format`, else
    /// `ckpt.shard_format`).
    pub shard_format: miner_contract::shard::ShardFormat,
}

/// Name of the embedded default expert group (selectable in YAML as `task.expert_group_name`).
pub const EMBEDDED_GROUP: &str = "embedded";

pub fn parse_device(s: &str) -> Result<tch::Device, ConfigError> {
    match s {
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => Ok(tch::Device::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(tch::Device::Cuda(n)),
            _ => Err(bad(
                "--device",
                format!("{other:?} is not auto, cpu, cuda or cuda:N"),
            )),
        },
    }
}

/// A CUDA device must exist in the libtorch this process loaded: libtorch built for the CPU (or a
/// CUDA libtorch whose `libtorch_cuda.so` was not loaded) has no CUDA kernels, and the first tensor
/// would fail deep inside the model instead of here, before anything is bound or written.
fn check_device_usable(device: tch::Device) -> Result<(), ConfigError> {
    let tch::Device::Cuda(n) = device else {
        return Ok(());
    };
    if !tch::Cuda::is_available() {
        return Err(bad(
            "--device",
            format!(
                "cuda:{n} was asked for, but the loaded libtorch has no usable CUDA backend (a CPU \
                 libtorch, no GPU or driver, or libtorch_cuda.so not loaded: build against a CUDA \
                 libtorch, or set LD_PRELOAD=<torch lib dir>/libtorch_cuda.so); use --device cpu \
                 or auto"
            ),
        ));
    }
    let count = tch::Cuda::device_count();
    if n as i64 >= count {
        return Err(bad(
            "--device",
            format!("cuda:{n} does not exist: this machine has {count} CUDA device(s)"),
        ));
    }
    Ok(())
}

pub fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cpu => "cpu".into(),
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Reads a YAML path like `log.metric_interval`.
fn get<'a>(v: &'a serde_yaml::Value, path: &str) -> Option<&'a serde_yaml::Value> {
    let mut cur = v;
    for k in path.split('.') {
        cur = cur.get(k)?;
    }
    if cur.is_null() { None } else { Some(cur) }
}

fn get_u64(v: &serde_yaml::Value, path: &str, default: u64) -> Result<u64, ConfigError> {
    match get(v, path) {
        None => Ok(default),
        Some(x) => x
            .as_u64()
            .ok_or_else(|| bad(path, format!("expected a non-negative integer, got {x:?}"))),
    }
}

fn get_f64(v: &serde_yaml::Value, path: &str, default: f64) -> Result<f64, ConfigError> {
    match get(v, path) {
        None => Ok(default),
        Some(x) => x
            .as_f64()
            .ok_or_else(|| bad(path, format!("expected a number, got {x:?}"))),
    }
}

/// The embedded default expert group for `ModelConfig::tiny()`: experts 0..8 of every MoE layer.
pub fn embedded_experts(model: &ModelConfig) -> GroupExperts {
    (0..model.num_hidden_layers)
        .filter(|l| model.is_moe_layer(*l))
        .map(|l| (l, (0..model.n_routed_experts.min(8)).collect()))
        .collect()
}

impl Settings {
    /// Resolves flags + `config.yaml` (the contract's [`MinerConfig`], plus a few trainer-only
    /// keys read from the same YAML) into validated settings; only reads the filesystem.
    pub fn from_cli(cli: &Cli) -> Result<Settings, ConfigError> {
        let device = parse_device(&cli.device)?;
        check_device_usable(device)?;
        let tls =
            miner_service::TlsFiles::from_flags(cli.tls_cert.as_deref(), cli.tls_key.as_deref())
                .map_err(|e| bad("--tls-cert", e.to_string()))?;
        if let Some(t) = &tls {
            t.server_config()
                .map_err(|e| bad("--tls-cert", e.to_string()))?;
        }
        // The binary always has a token (from the run directory), so only TLS is in question.
        miner_service::check_listen(cli.listen, tls.is_some(), true)
            .map_err(|e| bad("--listen", e.to_string()))?;
        // The metrics address follows the same policy (it serves plain HTTP without a token).
        miner_service::check_listen(cli.metrics_listen, tls.is_some(), true)
            .map_err(|e| bad("--metrics-listen", e.to_string()))?;
        let chainsync = match &cli.chainsync {
            Some(a) => Some(
                crate::phase_watch::parse_chainsync_addr(a).map_err(|e| bad("--chainsync", e))?,
            ),
            None => None,
        };
        if cli.max_steps == Some(0) {
            return Err(bad("--max-steps", "must be at least 1"));
        }
        let cwd = std::env::current_dir()
            .map_err(|e| bad("--path", format!("current directory: {e}")))?;
        let (cfg, yaml, run_dir) = match &cli.path {
            Some(p) => {
                let (cfg, file) = MinerConfig::load(p).map_err(|e| bad("--path", e.to_string()))?;
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| bad("--path", format!("read {}: {e}", file.display())))?;
                let yaml = serde_yaml::from_str::<serde_yaml::Value>(&text)
                    .map_err(|e| bad("--path", format!("parse {}: {e}", file.display())))?;
                let run_dir = match file.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => cwd.clone(),
                };
                (cfg, yaml, run_dir)
            }
            None => {
                let mut cfg = MinerConfig::default();
                cfg.task.expert_group_name = EMBEDDED_GROUP.into();
                let run_dir = cfg.run_dir(&cwd);
                (cfg, serde_yaml::Value::Null, run_dir)
            }
        };
        let y = &yaml;
        // The data root the run directory sits under (`<root>/checkpoints/miner/...`).
        let root = cfg
            .root_of_run_dir(&run_dir)
            .unwrap_or_else(|| run_dir.clone());
        let group_name = cfg.task.expert_group_name.clone();
        let embedded = group_name == EMBEDDED_GROUP;

        let precision = match cfg.model.precision.as_str() {
            "fp16-mixed" => Precision::Fp16Mixed,
            "bf16-mixed" => Precision::Bf16Mixed,
            other => {
                return Err(bad(
                    "model.precision",
                    format!("{other:?} is not fp16-mixed or bf16-mixed"),
                ));
            }
        };

        let (expert_group_id, experts, data, model) = if embedded {
            let model = match &cli.model_config {
                Some(p) => ModelConfig::from_json_file(p)
                    .map_err(|e| bad("--model-config", format!("{e:#}")))?,
                None => ModelConfig::tiny(),
            };
            let data = DataSettings {
                sources: SourceSpec::embedded_default(),
                tokenizer: TokenizerSource::Embedded,
                sequence_length: get_u64(y, "task.exp.data.sequence_length", 64)? as usize,
                rows: get_u64(y, "task.exp.data.per_device_train_batch_size", 8)? as usize,
                vali_fraction: 0.1,
                eval_batches: get_u64(y, "log.eval_batches", 4)? as usize,
            };
            (0, embedded_experts(&model), data, model)
        } else {
            Self::group_from_contract(&cfg, y, &root, cli)?
        };

        // The embedded tiny setup trains from scratch: a larger default lr so the loss visibly falls.
        let lr = if embedded && get(y, "opt.lr").is_none() {
            1e-2
        } else {
            cfg.opt.lr
        };
        let adamw = AdamWConfig {
            lr,
            ..AdamWConfig::default()
        };
        if !(adamw.lr.is_finite() && adamw.lr > 0.0) {
            return Err(bad(
                "opt.lr",
                format!("{} is not a positive number", adamw.lr),
            ));
        }
        let grad_accum = match cfg.local_par.gradient_accumulation_steps {
            // The reference derives ceil(batch_size / (per_device * world_size)); with its defaults, 4.
            0 => 4,
            n => n,
        };
        let checkpoint_interval = cfg.ckpt.checkpoint_interval;
        let metric_interval = cfg.log.metric_interval;
        for (f, v) in [
            ("ckpt.checkpoint_interval", checkpoint_interval),
            ("log.metric_interval", metric_interval),
        ] {
            if v == 0 {
                return Err(bad(f, "must be at least 1"));
            }
        }
        let checkpoint_topk = cfg.ckpt.checkpoint_topk;
        if checkpoint_topk == 0 {
            return Err(bad("ckpt.checkpoint_topk", "must be at least 1"));
        }
        let (warmup_steps, total_steps) = (cfg.sched.warmup_steps, cfg.sched.total_steps);
        if total_steps == 0 {
            return Err(bad("sched.total_steps", "must be at least 1"));
        }
        if data.sequence_length < 2 {
            return Err(bad("task.exp.data.sequence_length", "must be at least 2"));
        }
        if data.rows == 0 {
            return Err(bad(
                "task.exp.data.per_device_train_batch_size",
                "must be at least 1",
            ));
        }
        let metric_csv = root.join(&cfg.log.metric_path);
        for s in &data.sources {
            s.check()
                .map_err(|e| bad("task.exp.data.dataset_sources", e.to_string()))?;
        }
        let gao = cfg.local_par.global_opt_interval;
        Ok(Settings {
            run_dir,
            device,
            precision,
            max_steps: cli.max_steps,
            model,
            base_weights: cli.base_weights.clone(),
            expert_group_id,
            expert_group_name: group_name,
            experts,
            data,
            adamw,
            warmup_steps,
            total_steps,
            grad_accum,
            max_grad_norm: 1.0,
            log_interval: ((gao as f64) * 0.02).round().max(1.0) as u64,
            metric_interval,
            checkpoint_interval,
            checkpoint_topk,
            metric_csv,
            seed: 42,
            listen: cli.listen,
            metrics_listen: cli.metrics_listen,
            validator_poll_secs: get_f64(y, "ckpt.validator_poll_secs", 1.0)?,
            tls,
            control_token: None,
            chainsync,
            training_nice: cli.training_nice,
            shard_format: cli.shard_format.unwrap_or(cfg.ckpt.shard_format),
        })
    }

    /// The configured expert group (`<root>/expert_groups/<name>/`, else the contract's embedded
    /// copy) with local data sources.
    fn group_from_contract(
        cfg: &MinerConfig,
        y: &serde_yaml::Value,
        root: &Path,
        cli: &Cli,
    ) -> Result<(u32, GroupExperts, DataSettings, ModelConfig), ConfigError> {
        let base = root.join("expert_groups");
        let group = cfg
            .expert_group(Some(&base))
            .map_err(|e| bad("task.expert_group_name", e.to_string()))?;
        let group_dir = base.join(&group.name);
        let experts: GroupExperts = group
            .layers
            .keys()
            .map(|l| (*l, group.org_ids(*l)))
            .collect();
        if experts.is_empty() {
            return Err(bad(
                "task.expert_group_name",
                format!("group {} assigns no experts", group.name),
            ));
        }
        let d = &group.data;
        let seq = d.sequence_length as usize;
        let vali_fraction = d.vali_fraction;
        if !(vali_fraction > 0.0 && vali_fraction < 1.0) {
            return Err(bad("data.vali_fraction", "must be in (0, 1)"));
        }
        let list = match &d.dataset_sources {
            Some(l) if !l.is_empty() => l.clone(),
            _ => {
                return Err(bad(
                    "data.dataset_sources",
                    format!(
                        "expert group {} lists no dataset sources (legacy dataset_name {:?} is a Hub dataset)",
                        group.name, d.dataset_name
                    ),
                ));
            }
        };
        let mut sources = Vec::new();
        for (i, src) in list.iter().enumerate() {
            let field = format!("data.dataset_sources[{i}].path");
            let mut path = PathBuf::from(&src.path);
            if path.is_relative() {
                path = group_dir.join(path);
            }
            if !path.exists() {
                return Err(bad(
                    &field,
                    format!(
                        "{}: no local file at {} (streaming from the Hub is not supported; download the data and point `path` at a .parquet, .jsonl or .txt file or a directory of them)",
                        src.path,
                        path.display()
                    ),
                ));
            }
            if !(src.weight.is_finite() && src.weight > 0.0) {
                return Err(bad(
                    &format!("data.dataset_sources[{i}].weight"),
                    format!("{} is not > 0", src.weight),
                ));
            }
            if path.is_dir() {
                // A directory of shards: its .parquet/.jsonl/.json/.txt files (sorted), sharing the weight.
                let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
                    .map_err(|e| bad(&field, format!("read {}: {e}", path.display())))?
                    .filter_map(|d| d.ok().map(|d| d.path()))
                    .filter(|p| {
                        p.is_file()
                            && matches!(
                                p.extension().and_then(|e| e.to_str()),
                                Some("parquet" | "jsonl" | "json" | "txt")
                            )
                    })
                    .collect();
                files.sort();
                if files.is_empty() {
                    return Err(bad(
                        &field,
                        format!("{} holds no .parquet, .jsonl or .txt files", path.display()),
                    ));
                }
                let w = src.weight / files.len() as f64;
                for f in files {
                    let name = format!(
                        "{}/{}",
                        src.path,
                        f.file_name().and_then(|n| n.to_str()).unwrap_or_default()
                    );
                    sources.push(SourceSpec::local(&name, &f, &src.text_column, w));
                }
            } else {
                sources.push(SourceSpec::local(
                    &src.path,
                    &path,
                    &src.text_column,
                    src.weight,
                ));
            }
        }
        let tokenizer = {
            let from_base = cli
                .base_weights
                .as_ref()
                .map(|d| d.join("tokenizer.json"))
                .filter(|p| p.exists());
            let model_path = PathBuf::from(&cfg.model.model_path);
            let from_model = [model_path.join("tokenizer.json"), model_path.clone()]
                .into_iter()
                .find(|p| p.is_file());
            match from_base.or(from_model) {
                Some(p) => TokenizerSource::File(p),
                None => {
                    return Err(bad(
                        "model.model_path",
                        format!(
                            "{}: no local tokenizer.json (pass --base-weights DIR with one, or set model.model_path to it)",
                            model_path.display()
                        ),
                    ));
                }
            }
        };
        let model = match &cli.model_config {
            Some(p) => ModelConfig::from_json_file(p)
                .map_err(|e| bad("--model-config", format!("{e:#}")))?,
            None => ModelConfig::deepseek_v2_lite(seq),
        };
        let data = DataSettings {
            sources,
            tokenizer,
            sequence_length: seq,
            rows: d.per_device_train_batch_size as usize,
            vali_fraction,
            eval_batches: get_u64(y, "log.eval_batches", 51)? as usize,
        };
        Ok((group.group_id, experts, data, model))
    }
}
