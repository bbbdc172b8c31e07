//! Connito's `config.yaml`: the reference sample loads unchanged with the same defaults, writes
//! are atomic and round-trip, `--path` may be the file or its run directory, and errors name
//! the field.

use std::path::Path;

use miner_contract::config::{ConfigError, MinerConfig, resolve_config_path};

/// Spec §2.2.3: what the reference writes for coldkey `ck`, hotkey `hk`, run `foundation`.
const REFERENCE_SAMPLE: &str = r#"run:
  run_name: foundation
chain:
  netuid: 102
  uid: 0
  hotkey_ss58: ''
  coldkey_ss58: ''
  ip: 0.0.0.0
  port: 8000
  coldkey_name: ck
  hotkey_name: hk
  network: archive
  lite_network: finney
model:
  model_path: deepseek-ai/DeepSeek-V2-Lite
  base_arch_model: deepseek-ai/DeepSeek-V2-Lite
  foundation: true
  torch_compile: false
  attn_implementation: sdpa
  precision: fp16-mixed
  device: cuda
moe:
  interleave: true
  num_experts: 8
  num_experts_per_tok: 2
  partial_topk: 1
  full_topk: 2
  aux_load_balance: true
  router_aux_loss_coef: 1.0
  partial_moe: true
  num_worker_groups: 2
ckpt:
  resume_from_ckpt: true
  strict_sharding: false
  base_checkpoint_path: checkpoints/miner
  checkpoint_path: checkpoints/miner/ck/hk/foundation
  checkpoint_interval: 20
  full_validation_interval: 20
  checkpoint_topk: 2
  validator_checkpoint_path: checkpoints/miner/validator_checkpoint
  download_concurrency: 4
hf:
  checkpoint_repo: null
  default_repo_name: co
  token_env_var: HF_TOKEN
sched:
  warmup_steps: 0
  total_steps: 88000
log:
  log_wandb: false
  wandb_project_name: test-moe
  wandb_resume: false
  wandb_full_id: ''
  wandb_partial_id: []
  base_metric_path: metrics
  metric_path: metrics/foundation.csv
  metric_interval: 20
opt:
  lr: 1.0e-05
  outer_lr: 0.7
  outer_momentum: 0.9
cycle:
  cycle_length: 448
  distribute_period: 20
  train_period: 300
  commit_period: 10
  submission_period: 80
  validate_period: 10
  merge_period: 50
  owner_url: https://cycle-api.connito.ai:443
  version_range_cycles: 3
  api_timeout_sec: 10
  api_retries: 5
  api_backoff_sec: 2
task:
  expert_group_name: exp_math
  load_all_expert_groups: false
dataloader:
  world_size: 10
role: miner
local_par:
  gradient_accumulation_steps: 4
  global_opt_interval: 100
  world_size: 1
  port: 29500
  ip_address: 127.0.0.1
"#;

fn yaml(s: &str) -> serde_yaml::Value {
    serde_yaml::from_str(s).unwrap()
}

#[test]
fn reference_sample_loads_unchanged_with_the_reference_defaults() {
    let cfg = MinerConfig::from_yaml_str(REFERENCE_SAMPLE, Path::new("config.yaml")).unwrap();
    assert_eq!(cfg, MinerConfig::new_run("ck", "hk", "foundation"));
    assert_eq!(cfg.chain.netuid, 102);
    assert_eq!(cfg.chain.network, "archive");
    assert_eq!(cfg.cycle.train_period, 300);
    assert_eq!(cfg.cycle.cycle_length, 448);
    assert_eq!(cfg.cycle.owner_url, "https://cycle-api.connito.ai:443");
    assert_eq!(cfg.ckpt.checkpoint_interval, 20);
    assert_eq!(cfg.ckpt.full_validation_interval, 20);
    assert_eq!(cfg.log.metric_interval, 20);
    assert_eq!(cfg.ckpt.checkpoint_topk, 2);
    assert_eq!(
        cfg.ckpt.checkpoint_path,
        "checkpoints/miner/ck/hk/foundation"
    );
    assert_eq!(cfg.hf.checkpoint_repo, None);
    assert_eq!(cfg.opt.lr, 1e-5);
    assert_eq!(cfg.moe.partial_topk, 1);
    assert_eq!(cfg.model.precision, "fp16-mixed");
    assert_eq!(cfg.task.expert_group_name, "exp_math");
    assert_eq!(cfg.local_par.ip_address, "127.0.0.1");
    assert_eq!(cfg.role, "miner");
    let group = cfg.expert_group(None).unwrap();
    assert_eq!((group.group_id, group.layers.len()), (0, 26));
}

#[test]
fn written_config_equals_the_reference_sample() {
    let written = MinerConfig::new_run("ck", "hk", "foundation").to_yaml_string();
    assert_eq!(yaml(&written), yaml(REFERENCE_SAMPLE));
    // Same sections and keys in the same order as the reference writes them.
    let keys = |s: &str| -> Vec<String> {
        s.lines()
            .filter_map(|l| l.split_once(':').map(|(k, _)| k.to_string()))
            .collect()
    };
    assert_eq!(keys(&written), keys(REFERENCE_SAMPLE));
}

#[test]
fn write_then_read_round_trips_through_file_or_run_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = MinerConfig::new_run("cold", "hot", "r1");
    cfg.hf.checkpoint_repo = Some("me/co".into());
    cfg.opt.lr = 3e-4;
    cfg.cycle.api_retries = 9;
    cfg.log.wandb_partial_id = vec!["a".into(), "b".into()];
    // --path as the run directory.
    let file = cfg.write(dir.path()).unwrap();
    assert_eq!(file, dir.path().join("config.yaml"));
    let (back, from) = MinerConfig::load(dir.path()).unwrap();
    assert_eq!(back, cfg);
    assert_eq!(from, file);
    // --path as the file.
    let (back, _) = MinerConfig::load(&file).unwrap();
    assert_eq!(back, cfg);
    assert_eq!(resolve_config_path(dir.path()), file);
    // No temporaries left next to it.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["config.yaml".to_string()]);
}

#[test]
fn unknown_keys_are_ignored_and_missing_ones_take_defaults() {
    let text = "run:\n  run_name: x\n  bogus: 1\nchain:\n  coldkey_name: c\n  hotkey_name: h\nnew_section:\n  a: b\nlocal_par:\n  global_opt_interval: 50\n";
    let cfg = MinerConfig::from_yaml_str(text, Path::new("c.yaml")).unwrap();
    assert_eq!(cfg.run.run_name, "x");
    assert_eq!(cfg.cycle.train_period, 300);
    // Derived from global_opt_interval when absent: max(1, round(50 * 0.2)).
    assert_eq!(cfg.ckpt.checkpoint_interval, 10);
    assert_eq!(cfg.log.metric_interval, 10);
    assert_eq!(cfg.ckpt.checkpoint_path, "checkpoints/miner/c/h/x");
    assert_eq!(cfg.log.metric_path, "metrics/x.csv");
    // Stored paths are re-derived, as in the reference.
    let cfg = MinerConfig::from_yaml_str("ckpt:\n  checkpoint_path: /elsewhere\n", Path::new("c"))
        .unwrap();
    assert_eq!(
        cfg.ckpt.checkpoint_path,
        "checkpoints/miner/template_coldkey_name/template_hotkey_name/foundation"
    );
    // An empty file is all defaults.
    assert_eq!(
        MinerConfig::from_yaml_str("", Path::new("c")).unwrap(),
        MinerConfig::default()
    );
}

#[test]
fn errors_name_the_file_and_the_field() {
    let bad = REFERENCE_SAMPLE.replace("train_period: 300", "train_period: lots");
    let err = MinerConfig::from_yaml_str(&bad, Path::new("/runs/a/config.yaml")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Invalid { .. }));
    assert!(
        msg.starts_with("/runs/a/config.yaml: cycle.train_period: "),
        "{msg}"
    );
    assert!(msg.contains("expected an integer"), "{msg}");

    let err = MinerConfig::from_yaml_str("chain:\n  port: [1]\n", Path::new("c.yaml")).unwrap_err();
    assert!(err.to_string().contains("chain.port"), "{err}");
    let err =
        MinerConfig::from_yaml_str("model: {device: cuda\n", Path::new("c.yaml")).unwrap_err();
    assert!(err.to_string().starts_with("c.yaml: "), "{err}");
    let err = MinerConfig::from_yaml_str("- 1\n", Path::new("c.yaml")).unwrap_err();
    assert!(err.to_string().contains("expected a mapping"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let err = MinerConfig::load(dir.path()).unwrap_err();
    assert!(matches!(err, ConfigError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("config.yaml"), "{err}");
}

#[test]
fn shard_format_defaults_to_safetensors_and_pt_round_trips() {
    use miner_contract::shard::ShardFormat;
    let cfg = MinerConfig::from_yaml_str(REFERENCE_SAMPLE, Path::new("c.yaml")).unwrap();
    assert_eq!(cfg.ckpt.shard_format, ShardFormat::Safetensors);

    let text = REFERENCE_SAMPLE.replace(
        "  download_concurrency: 4\n",
        "  download_concurrency: 4\n  shard_format: pt\n",
    );
    let cfg = MinerConfig::from_yaml_str(&text, Path::new("c.yaml")).unwrap();
    assert_eq!(cfg.ckpt.shard_format, ShardFormat::Pt);
    // A non-default format is written, and read back.
    let written = cfg.to_yaml_string();
    assert!(written.contains("shard_format: pt"), "{written}");
    let again = MinerConfig::from_yaml_str(&written, Path::new("c.yaml")).unwrap();
    assert_eq!(again.ckpt.shard_format, ShardFormat::Pt);

    let bad = REFERENCE_SAMPLE.replace(
        "  download_concurrency: 4\n",
        "  download_concurrency: 4\n  shard_format: npz\n",
    );
    let err = MinerConfig::from_yaml_str(&bad, Path::new("c.yaml")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("ckpt.shard_format"), "{msg}");
    assert!(msg.contains("safetensors") && msg.contains("pt"), "{msg}");
}
