//! Shared set-up for trainer-svc's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use clap::Parser;
use trainer_svc::{Cli, Settings};

/// A run directory whose `config.yaml` selects the embedded tiny setup with small, fast knobs.
pub fn small_run_dir(dir: &Path, checkpoint_interval: u64, extra_yaml: &str) -> PathBuf {
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let yaml = format!(
        "task:\n  expert_group_name: embedded\n  exp:\n    data:\n      sequence_length: 32\n      per_device_train_batch_size: 2\n\
         local_par:\n  gradient_accumulation_steps: 2\n\
         log:\n  metric_interval: {checkpoint_interval}\n  eval_batches: 2\n\
         ckpt:\n  checkpoint_interval: {checkpoint_interval}\n  validator_poll_secs: 0.0\n\
         opt:\n  lr: 0.01\n{extra_yaml}"
    );
    std::fs::write(run.join("config.yaml"), yaml).unwrap();
    run
}

/// Settings as `trainer-svc --device cpu --path <run> [--max-steps N]` would build them.
pub fn settings(run: &Path, max_steps: Option<u64>) -> Settings {
    let mut args = vec![
        "trainer-svc".to_string(),
        "--device".into(),
        "cpu".into(),
        "--path".into(),
        run.display().to_string(),
    ];
    if let Some(n) = max_steps {
        args.push("--max-steps".into());
        args.push(n.to_string());
    }
    let cli = Cli::try_parse_from(args).unwrap();
    Settings::from_cli(&cli).unwrap()
}

/// Rows of the metric CSV as (inner_opt_step, loss).
pub fn csv_losses(path: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let si = header.iter().position(|h| *h == "inner_opt_step").unwrap();
    let li = header.iter().position(|h| *h == "loss").unwrap();
    lines
        .filter(|l| !l.is_empty() && !l.starts_with("unix_time"))
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[si].parse().unwrap(), f[li].parse().unwrap())
        })
        .collect()
}
