//! Config resolution: the contract's `config.yaml` + an on-disk expert group with local data
//! trains end to end; Hub-only sources and bad fields are refused naming the field.

use std::path::Path;
use std::sync::Arc;

use clap::Parser;
use tokio::sync::watch;
use trainer_svc::settings::TokenizerSource;
use trainer_svc::{Cli, Control, Outcome, Settings, StatusSnapshot};

fn write(p: &Path, text: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn cli(args: &[&str]) -> Cli {
    let mut v = vec!["trainer-svc", "--device", "cpu"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v).unwrap()
}

#[test]
fn on_disk_expert_group_with_local_data_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let run = root.join("checkpoints/miner/ck/hk/myrun");
    write(
        &run.join("config.yaml"),
        "run:\n  run_name: myrun\nchain:\n  coldkey_name: ck\n  hotkey_name: hk\ntask:\n  expert_group_name: mygroup\n\
         local_par:\n  gradient_accumulation_steps: 1\nlog:\n  eval_batches: 1\nmodel:\n  model_path: tok\n",
    );
    // The tokenizer, as `model.model_path` relative to the working directory is awkward in a
    // test: use --base-weights DIR/tokenizer.json instead.
    write(
        &root.join("base/tokenizer.json"),
        trainer_svc::data::tokenize::EMBEDDED_TOKENIZER_JSON,
    );
    let group = root.join("expert_groups/mygroup");
    write(
        &group.join("config.yaml"),
        "group_id: 3\ndata:\n  dataset_sources:\n    - path: data/docs.jsonl\n      weight: 2.0\n    - path: data/plain\n  sequence_length: 16\n  per_device_train_batch_size: 2\n",
    );
    write(
        &group.join("expert_assignment.json"),
        r#"{"1": [[0, 5], [1, 2]], "2": [[0, 9], [1, 0]]}"#,
    );
    let docs: String = (0..200)
        .map(|i| format!("{{\"text\": \"Question: {i} + {i} = {}\"}}\n", 2 * i))
        .collect();
    write(&group.join("data/docs.jsonl"), &docs);
    let plain: String = (0..200)
        .map(|i| format!("The river {i} runs to the sea.\n"))
        .collect();
    // A directory of shards shares its source's weight.
    write(&group.join("data/plain/a.txt"), &plain);
    write(&group.join("data/plain/b.txt"), &plain);
    let model_cfg = root.join("tiny.json");
    write(
        &model_cfg,
        &trainer_svc::model::ModelConfig::tiny().to_json_string(),
    );

    let c = cli(&[
        "--path",
        run.join("config.yaml").to_str().unwrap(),
        "--model-config",
        model_cfg.to_str().unwrap(),
        "--base-weights",
        root.join("base").to_str().unwrap(),
        "--max-steps",
        "2",
    ]);
    let mut s = Settings::from_cli(&c).unwrap();
    assert_eq!(s.run_dir, run);
    assert_eq!(s.expert_group_id, 3);
    assert_eq!(s.experts.get(&1), Some(&vec![2, 5]));
    assert_eq!(s.experts.get(&2), Some(&vec![0, 9]));
    assert_eq!(s.data.sources.len(), 3);
    assert_eq!(s.data.sources[0].weight, 2.0);
    assert_eq!(
        (s.data.sources[1].name.as_str(), s.data.sources[1].weight),
        ("data/plain/a.txt", 0.5)
    );
    assert_eq!(
        (s.data.sequence_length, s.data.rows, s.grad_accum),
        (16, 2, 1)
    );
    assert_eq!(
        s.data.tokenizer,
        TokenizerSource::File(root.join("base/tokenizer.json"))
    );
    assert_eq!(s.adamw.lr, 1e-5);
    // The metric CSV goes under the data root, as the reference's `metrics/<run_name>.csv`.
    assert_eq!(s.metric_csv, root.join("metrics/myrun.csv"));
    // No safetensors in --base-weights here: train from the random init.
    s.base_weights = None;

    let (tx, _rx) = watch::channel(StatusSnapshot::default());
    let out = trainer_svc::engine::run(s, Arc::new(Control::default()), tx).unwrap();
    assert_eq!(
        out,
        Outcome::MaxSteps {
            final_checkpoint: Some("globalver_0_inneropt_2".into())
        }
    );
    let shard = miner_contract::shard::read_shard(
        &run.join("globalver_0_inneropt_2/model_expgroup_3.safetensors"),
    )
    .unwrap();
    assert!(
        shard
            .keys()
            .any(|k| k.starts_with("model.layers.1.mlp.experts.5.")),
        "{:?}",
        shard.keys()
    );
    assert!(
        shard.keys().all(|k| !k.contains("experts.1.")),
        "{:?}",
        shard.keys()
    );
}

#[test]
fn hub_only_sources_and_bad_fields_are_refused_with_the_field_named() {
    let tmp = tempfile::tempdir().unwrap();
    // exp_math (built into the contract) streams allenai/c4 from the Hub: not available here.
    let run = tmp.path().join("run");
    write(
        &run.join("config.yaml"),
        "task:\n  expert_group_name: exp_math\n",
    );
    let e = Settings::from_cli(&cli(&["--path", run.to_str().unwrap()])).unwrap_err();
    assert_eq!(e.field, "data.dataset_sources[0].path", "{e}");
    assert!(e.to_string().contains("allenai/c4"), "{e}");

    write(
        &run.join("config.yaml"),
        "task:\n  expert_group_name: embedded\nmodel:\n  precision: fp8\n",
    );
    let e = Settings::from_cli(&cli(&["--path", run.to_str().unwrap()])).unwrap_err();
    assert_eq!(e.field, "model.precision");

    write(
        &run.join("config.yaml"),
        "task:\n  expert_group_name: embedded\nopt:\n  lr: not-a-number\n",
    );
    let e = Settings::from_cli(&cli(&["--path", run.to_str().unwrap()])).unwrap_err();
    assert_eq!(e.field, "--path");
    assert!(e.to_string().contains("config.yaml"), "{e}");

    let e = Settings::from_cli(&cli(&["--path", tmp.path().join("nope").to_str().unwrap()]))
        .unwrap_err();
    assert_eq!(e.field, "--path");
}

#[test]
fn cuda_that_cannot_run_is_refused_before_anything_starts() {
    let parse = |d: &str| {
        let cli = Cli::try_parse_from(["trainer-svc", "--device", d]).unwrap();
        Settings::from_cli(&cli)
    };
    // A device index past the last GPU (or any CUDA device where none can run) is refused.
    let err = parse("cuda:999").unwrap_err();
    assert_eq!(err.field, "--device");
    if !tch::Cuda::is_available() {
        // The CPU libtorch of CI: refused up front with the fix, not a panic in the first tensor.
        let err = parse("cuda").unwrap_err();
        assert_eq!(err.field, "--device");
        assert!(
            err.message.contains("no usable CUDA backend") && err.message.contains("LD_PRELOAD"),
            "{}",
            err.message
        );
        // `auto` falls back to the CPU.
        assert!(parse("auto").is_ok());
    } else {
        assert!(err.message.contains("does not exist"), "{}", err.message);
    }
}

#[test]
fn shard_format_comes_from_the_config_and_the_flag_overrides_it() {
    use miner_contract::shard::ShardFormat;
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let path = run.to_str().unwrap();
    write(
        &run.join("config.yaml"),
        "task:\n  expert_group_name: embedded\n",
    );
    let s = Settings::from_cli(&cli(&["--path", path])).unwrap();
    assert_eq!(s.shard_format, ShardFormat::Safetensors, "the default");
    write(
        &run.join("config.yaml"),
        "task:\n  expert_group_name: embedded\nckpt:\n  shard_format: pt\n",
    );
    let s = Settings::from_cli(&cli(&["--path", path])).unwrap();
    assert_eq!(s.shard_format, ShardFormat::Pt);
    let s = Settings::from_cli(&cli(&["--path", path, "--shard-format", "safetensors"])).unwrap();
    assert_eq!(s.shard_format, ShardFormat::Safetensors);
    let bad = Cli::try_parse_from(["trainer-svc", "--shard-format", "npz"]).unwrap_err();
    assert!(bad.to_string().contains("npz"), "{bad}");
    write(
        &run.join("config.yaml"),
        "task:\n  expert_group_name: embedded\nckpt:\n  shard_format: npz\n",
    );
    let e = Settings::from_cli(&cli(&["--path", path])).unwrap_err();
    assert!(e.to_string().contains("shard_format"), "{e}");
}
