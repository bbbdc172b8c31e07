//! The trainer's real inputs from the Hub (addendum A2/A3): pretrained DeepSeek-V2 base weights
//! (only the tensors the expert group uses, Range-fetched, cached and verified), its
//! `tokenizer.json`, and Hub datasets streamed shard by shard with a resumable position.
//!
//! The Hub is `miner_standins::hub::HubStandIn` (real HTTP on loopback); the model is a tiny
//! DeepSeek-V2 saved by Python `transformers` in several shards with an index; the partial
//! loading is compared with an independent Python implementation of upstream's (A3).

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use clap::Parser;
use miner_standins::hub::{FaultAction, HubFault, HubRoute, HubStandIn, HubStandInOptions};
use tch::{Kind, Tensor};
use tokio::sync::watch;
use trainer_svc::data::TrainStream;
use trainer_svc::settings::{BaseWeights, TokenizerSource};
use trainer_svc::status::{Control, StatusSnapshot};
use trainer_svc::{Cli, Settings};

const MODEL_REPO: &str = "tiny-org/tiny-dsv2";

fn python() -> PathBuf {
    let p = match std::env::var_os("MINER_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/venv/bin/python"),
    };
    assert!(
        p.exists(),
        "Python interpreter {} is missing: run scripts/setup-python.sh (or set MINER_PYTHON)",
        p.display()
    );
    p
}

fn py(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/hub_inputs.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("start Python");
    assert!(
        out.status.success(),
        "hub_inputs.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(p: &Path, text: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// The Hub stand-in and the runtime it runs on.
struct Hub {
    hub: HubStandIn,
    _rt: tokio::runtime::Runtime,
}

fn start_hub() -> Hub {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let hub = rt
        .block_on(HubStandIn::start(HubStandInOptions::default()))
        .unwrap();
    Hub { hub, _rt: rt }
}

/// Seeds every file under `dir` into `repo`.
fn seed(hub: &HubStandIn, repo: &str, kind: miner_standins::hub::RepoKind, dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_str().unwrap().to_string();
                hub.put_file(repo, kind, &rel, &std::fs::read(&p).unwrap())
                    .unwrap();
            }
        }
    }
}

/// The expert group, in the group's (unsorted) order as `expert_assignment.json` lists it.
const GROUP: &str = r#"{"1": [[0, 9], [1, 2], [2, 14]], "2": [[0, 5], [1, 0], [2, 11]]}"#;
const GROUP_ORDER: &str = r#"{"1": [9, 2, 14], "2": [5, 0, 11]}"#;

struct Setup {
    tmp: tempfile::TempDir,
    repo_dir: PathBuf,
    run: PathBuf,
    model_cfg: PathBuf,
}

impl Setup {
    fn root(&self) -> &Path {
        self.tmp.path()
    }
}

/// A tiny pretrained model repo (Python transformers), a run dir whose group trains on
/// `sources_yaml`, and `model.model_path` = `model_path` (empty: a local `tokenizer.json` only,
/// no base weights).
fn setup(model_path: &str, sources_yaml: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model_cfg = root.join("tiny.json");
    write(
        &model_cfg,
        &trainer_svc::model::ModelConfig::tiny().to_json_string(),
    );
    let tok = root.join("tokenizer.json");
    write(&tok, trainer_svc::data::tokenize::EMBEDDED_TOKENIZER_JSON);
    let repo_dir = root.join("repo");
    py(&[
        "model",
        repo_dir.to_str().unwrap(),
        model_cfg.to_str().unwrap(),
        tok.to_str().unwrap(),
    ]);
    let model_path = if model_path.is_empty() {
        tok.display().to_string()
    } else {
        model_path.to_string()
    };
    let run = root.join("checkpoints/miner/ck/hk/myrun");
    write(
        &run.join("config.yaml"),
        &format!(
            "run:\n  run_name: myrun\nchain:\n  coldkey_name: ck\n  hotkey_name: hk\ntask:\n  expert_group_name: mygroup\n\
             local_par:\n  gradient_accumulation_steps: 1\nlog:\n  eval_batches: 1\n  metric_interval: 1\n\
             ckpt:\n  checkpoint_interval: 1\n  validator_poll_secs: 0.0\nopt:\n  lr: 0.001\n\
             model:\n  model_path: {model_path:?}\n"
        ),
    );
    let group = root.join("expert_groups/mygroup");
    write(
        &group.join("config.yaml"),
        &format!(
            "group_id: 3\ndata:\n  dataset_sources:\n{sources_yaml}  sequence_length: 16\n  per_device_train_batch_size: 2\n"
        ),
    );
    write(&group.join("expert_assignment.json"), GROUP);
    let docs: String = (0..300)
        .map(|i| format!("{{\"text\": \"Question: {i} + {i} = {}\"}}\n", 2 * i))
        .collect();
    write(&group.join("data/docs.jsonl"), &docs);
    Setup {
        tmp,
        repo_dir,
        run,
        model_cfg,
    }
}

const LOCAL_SOURCES: &str = "    - path: data/docs.jsonl\n";

fn settings(s: &Setup, endpoint: &str, cache: &Path, extra: &[&str]) -> Settings {
    let mut args = vec![
        "trainer-svc".to_string(),
        "--device".into(),
        "cpu".into(),
        "--path".into(),
        s.run.join("config.yaml").display().to_string(),
        "--model-config".into(),
        s.model_cfg.display().to_string(),
        "--hf-endpoint".into(),
        endpoint.into(),
        "--hub-cache".into(),
        cache.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    Settings::from_cli(&Cli::try_parse_from(args).unwrap()).unwrap()
}

/// Two sequences of 24 tokens; the second is right-padded (labels -100).
fn batch(vocab: i64) -> (Tensor, Tensor) {
    let (b, t) = (2i64, 24i64);
    let ids: Vec<i64> = (0..b * t).map(|i| (i * 7919 + 3) % vocab).collect();
    let ids = Tensor::from_slice(&ids).reshape([b, t]);
    let labels = ids.copy();
    let _ = labels.get(1).narrow(0, 18, 6).fill_(-100);
    (ids, labels)
}

/// Upstream's partial loading in Python: (loss, loaded expert tensors by name).
fn python_reference(s: &Setup, ids: &Tensor, labels: &Tensor) -> (f64, Vec<(String, Tensor)>) {
    let work = s.root().join("ref");
    std::fs::create_dir_all(&work).unwrap();
    write(&work.join("group.json"), GROUP_ORDER);
    Tensor::write_safetensors(
        &[("input_ids", ids), ("labels", labels)],
        work.join("batch.safetensors"),
    )
    .unwrap();
    py(&[
        "reference",
        s.repo_dir.to_str().unwrap(),
        work.join("group.json").to_str().unwrap(),
        work.join("batch.safetensors").to_str().unwrap(),
        work.join("out.safetensors").to_str().unwrap(),
    ]);
    let out = Tensor::read_safetensors(work.join("out.safetensors")).unwrap();
    let loss = out
        .iter()
        .find(|(n, _)| n == "loss")
        .map(|(_, t)| t.double_value(&[0]))
        .unwrap();
    let counts = out.iter().find(|(n, _)| n == "loaded_counts").unwrap();
    // Every backbone tensor whole (router included, as upstream's loaded_counts full:299 for
    // DeepSeek-V2-Lite), 2 layers x 3 experts x 2 tensors sliced.
    assert_eq!(Vec::<i64>::try_from(&counts.1).unwrap()[1], 12);
    let experts = out
        .into_iter()
        .filter(|(n, _)| n.contains(".experts."))
        .collect();
    (loss, experts)
}

fn model_loss(
    s: &Settings,
    ids: &Tensor,
    labels: &Tensor,
) -> (f64, trainer_svc::model::PartialModel) {
    let model = trainer_svc::inputs::build_model(s, Kind::Float).expect("build model");
    let loss = tch::no_grad(|| model.loss(ids, labels)).double_value(&[]);
    (loss, model)
}

fn resolve_gets(hub: &HubStandIn) -> Vec<miner_standins::hub::HubRequest> {
    hub.requests()
        .into_iter()
        .filter(|r| matches!(r.route, HubRoute::ResolveGet | HubRoute::StorageGet))
        .collect()
}

fn tensor_files(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![cache.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "bin") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn hub_model_path_loads_the_pretrained_partial_model_like_upstream() {
    let hub = start_hub();
    let s = setup(MODEL_REPO, LOCAL_SOURCES);
    seed(
        &hub.hub,
        MODEL_REPO,
        miner_standins::hub::RepoKind::Model,
        &s.repo_dir,
    );
    let cache = s.root().join("cache");
    let st = settings(&s, &hub.hub.endpoint(), &cache, &[]);
    assert_eq!(
        st.base_weights,
        Some(BaseWeights::Hub {
            repo: MODEL_REPO.into(),
            revision: "main".into()
        })
    );
    assert_eq!(
        st.data.tokenizer,
        TokenizerSource::Hub {
            repo: MODEL_REPO.into(),
            revision: "main".into()
        }
    );
    let (ids, labels) = batch(st.model.vocab_size as i64);
    let (want_loss, want_experts) = python_reference(&s, &ids, &labels);

    // 1. First start: the header and tensor reads are ranges, and only part of the repo is read.
    let (loss, model) = model_loss(&st, &ids, &labels);
    let rel = (loss - want_loss).abs() / want_loss.abs();
    eprintln!("loss {loss} vs Python upstream loading {want_loss} (rel {rel:.2e})");
    assert!(rel < 1e-5, "loss {loss} vs reference {want_loss}");
    let ours = model.expert_tensors();
    assert_eq!(ours.len(), want_experts.len());
    for (name, want) in &want_experts {
        let got = ours
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("model lacks {name}"));
        assert!(
            got.1.equal(want),
            "{name} is not cat(gate, up) / down of the source"
        );
    }
    let gets = resolve_gets(&hub.hub);
    let shard_gets: Vec<_> = gets
        .iter()
        .filter(|r| r.path.ends_with(".safetensors") || r.storage)
        .collect();
    assert!(!shard_gets.is_empty());
    assert!(
        shard_gets.iter().all(|r| r.range.is_some()),
        "a shard was downloaded whole: {shard_gets:?}"
    );
    let repo_bytes: u64 = std::fs::read_dir(&s.repo_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let cached: u64 = tensor_files(&cache)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    eprintln!("fetched {cached} of {repo_bytes} safetensors bytes");
    assert!(cached < repo_bytes * 3 / 4, "{cached} of {repo_bytes}");

    // 2. Restart: everything comes from the verified cache, nothing is downloaded again.
    hub.hub.clear_requests();
    let (again, _) = model_loss(&st, &ids, &labels);
    assert_eq!(again, loss);
    assert!(
        resolve_gets(&hub.hub).is_empty(),
        "{:?}",
        resolve_gets(&hub.hub)
    );

    // 3. A truncated and a corrupted cache file are detected and fetched again.
    let files = tensor_files(&cache);
    let embed = files
        .iter()
        .find(|p| p.to_string_lossy().contains("embed_tokens"))
        .unwrap();
    let expert = files
        .iter()
        .find(|p| p.to_string_lossy().contains("experts.9.gate_proj"))
        .unwrap();
    let len = std::fs::metadata(embed).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(embed)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let mut bytes = std::fs::read(expert).unwrap();
    bytes[5] ^= 0x40;
    std::fs::write(expert, bytes).unwrap();
    hub.hub.clear_requests();
    let (repaired, _) = model_loss(&st, &ids, &labels);
    assert_eq!(repaired, loss);
    let n = resolve_gets(&hub.hub)
        .iter()
        .filter(|r| r.storage || r.path.ends_with(".safetensors"))
        .count();
    assert!((2..=4).contains(&n), "{n} reads to repair two tensors");

    // 4. Offline with a complete cache: starts from it.
    let offline = settings(&s, "http://127.0.0.1:1", &cache, &[]);
    let (off, _) = model_loss(&offline, &ids, &labels);
    assert_eq!(off, loss);

    // 5. Offline with nothing cached: one line naming what is missing and how to provide it.
    let empty = settings(&s, "http://127.0.0.1:1", &s.root().join("empty-cache"), &[]);
    let e = trainer_svc::inputs::build_model(&empty, Kind::Float).unwrap_err();
    let msg = format!("{e:#}");
    assert!(!msg.contains('\n'), "{msg}");
    assert!(
        msg.contains(MODEL_REPO) && msg.contains("HF_ENDPOINT") && msg.contains("--base-weights"),
        "{msg}"
    );
    let e = trainer_svc::inputs::load_tokenizer(&empty).unwrap_err();
    assert!(format!("{e:#}").contains("tokenizer"), "{e:#}");

    // 6. Downloads cut mid-body continue where they stopped.
    for route in [HubRoute::StorageGet, HubRoute::ResolveGet] {
        for nth in [1, 3] {
            hub.hub
                .inject(HubFault::nth(route, nth, FaultAction::CutAfter(100)));
        }
    }
    hub.hub.inject(HubFault::nth(
        HubRoute::StorageGet,
        5,
        FaultAction::Status {
            status: 503,
            retry_after: None,
        },
    ));
    let cut = settings(&s, &hub.hub.endpoint(), &s.root().join("cache2"), &[]);
    let (resumed, _) = model_loss(&cut, &ids, &labels);
    assert_eq!(resumed, loss);
    let tok = trainer_svc::inputs::load_tokenizer(&cut).unwrap();
    assert_eq!(tok.vocab_size(), 1017);
}

/// First-step training loss of a one-step engine run (from the metric CSV).
fn engine_first_loss(st: Settings) -> f64 {
    let csv = st.metric_csv.clone();
    let (tx, _rx) = watch::channel(StatusSnapshot::default());
    trainer_svc::engine::run(st, Arc::new(Control::default()), tx).expect("engine run");
    let rows = common::csv_losses(&csv);
    assert!(!rows.is_empty(), "no metric rows");
    rows[0].1
}

#[test]
fn base_weights_flag_and_hub_model_path_go_through_the_engine() {
    let hub = start_hub();
    let s = setup("", LOCAL_SOURCES);
    let commit = hub
        .hub
        .put_file(
            MODEL_REPO,
            miner_standins::hub::RepoKind::Model,
            "README.md",
            b"# tiny\n",
        )
        .unwrap();
    seed(
        &hub.hub,
        MODEL_REPO,
        miner_standins::hub::RepoKind::Model,
        &s.repo_dir,
    );
    let head = hub
        .hub
        .head(MODEL_REPO, miner_standins::hub::RepoKind::Model)
        .unwrap();
    assert_ne!(commit, head);
    let ep = hub.hub.endpoint();
    let steps = ["--max-steps", "1"];
    let fresh = |name: &str| s.root().join(name);
    // --base-weights DIR.
    let dir = s.repo_dir.to_str().unwrap().to_string();
    let mut a = vec!["--base-weights", dir.as_str()];
    a.extend(steps);
    let st = settings(&s, &ep, &fresh("c1"), &a);
    assert_eq!(st.base_weights, Some(BaseWeights::Dir(s.repo_dir.clone())));
    let from_dir = engine_first_loss(st);
    clean_run(&s);
    // --base-weights owner/name@commit (pinned revision).
    let pinned = format!("{MODEL_REPO}@{head}");
    let mut a = vec!["--base-weights", pinned.as_str()];
    a.extend(steps);
    let st = settings(&s, &ep, &fresh("c2"), &a);
    let from_hub = engine_first_loss(st);
    clean_run(&s);
    // No base weights (model_path = a tokenizer file): the random init trains from a different loss.
    let st = settings(&s, &ep, &fresh("c3"), &["--max-steps", "1"]);
    assert_eq!(st.base_weights, None);
    let from_scratch = engine_first_loss(st);
    eprintln!("first loss: dir {from_dir}, hub {from_hub}, random init {from_scratch}");
    assert!(
        (from_dir - from_hub).abs() < 1e-6,
        "{from_dir} vs {from_hub}"
    );
    assert!((from_dir - from_scratch).abs() > 1e-3);
}

/// Removes checkpoints and metrics so the next engine run starts fresh.
fn clean_run(s: &Setup) {
    for e in std::fs::read_dir(&s.run).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(s.root().join("metrics"));
}

const HUB_SOURCES: &str = "    - path: allenai/c4\n      name: en\n      weight: 0.5\n      text_column: text\n    - path: nvidia/Nemotron-CC-Math-v1\n      name: 4plus\n      weight: 0.5\n      text_column: text\n";

fn seed_datasets(hub: &HubStandIn, root: &Path, per_shard: usize) {
    let dir = root.join("datasets");
    py(&["datasets", dir.to_str().unwrap(), &per_shard.to_string()]);
    let ds = miner_standins::hub::RepoKind::Dataset;
    seed(hub, "allenai/c4", ds, &dir.join("c4"));
    seed(hub, "nvidia/Nemotron-CC-Math-v1", ds, &dir.join("nemotron"));
}

/// Documents until the first source wraps (epoch 1); `None` for a fresh stream.
fn take(stream: &mut TrainStream, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let before = stream.position();
        let (_, doc) = stream.next_doc().expect("next document");
        let after = stream.position();
        if after
            .sources
            .iter()
            .zip(&before.sources)
            .any(|(a, b)| a.epoch > b.epoch)
        {
            break;
        }
        out.push(doc);
    }
    out
}

#[test]
fn hub_datasets_stream_shard_by_shard_and_resume_without_repeats() {
    let hub = start_hub();
    let per_shard = 40;
    let data = tempfile::tempdir().unwrap();
    seed_datasets(&hub.hub, data.path(), per_shard);
    let s = setup("", HUB_SOURCES);
    let st = settings(&s, &hub.hub.endpoint(), &s.root().join("cache"), &[]);
    assert_eq!(st.data.sources.len(), 2);
    assert_eq!(st.data.sources[0].name, "allenai/c4:en");

    // A run that reads 50 documents, is stopped, and resumes from the saved position.
    let mut first = TrainStream::new(&st.data.sources, st.data.vali_fraction).unwrap();
    let mut seen = take(&mut first, 50);
    let pos = first.position();
    let c4 = pos.sources[0].hub.as_ref().expect("C4 position");
    // Stopped in the middle of a shard: the resume continues inside it.
    assert!(c4.shard_doc > 0, "{pos:?}");
    drop(first);
    // Each dataset listed only its config's directory (C4 has tens of thousands of other files).
    let trees: Vec<String> = hub
        .hub
        .requests()
        .into_iter()
        .filter(|r| r.route == HubRoute::Tree)
        .map(|r| r.path)
        .collect();
    assert!(trees.iter().any(|p| p.ends_with("/en")), "{trees:?}");
    assert!(trees.iter().any(|p| p.ends_with("/4plus")), "{trees:?}");
    // Only the shards read so far were downloaded.
    let gets = resolve_gets(&hub.hub);
    assert!(!gets.iter().any(|r| r.path.contains("00002")), "{gets:?}");
    let json = serde_json::to_string(&pos).unwrap();
    let pos = serde_json::from_str(&json).unwrap();
    hub.hub.clear_requests();
    let mut resumed = TrainStream::resume(&st.data.sources, st.data.vali_fraction, &pos).unwrap();
    seen.extend(take(&mut resumed, 10_000));
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a document was seen twice");
    assert!(seen.iter().all(|d| !d.contains("validation")));
    assert!(seen.iter().any(|d| d.starts_with("nemotron s0")));
    // The stream reached the last shard of the source that wrapped first.
    assert!(
        seen.iter()
            .any(|d| d.starts_with("c4 s2") || d.starts_with("nemotron s2")),
        "{} docs",
        seen.len()
    );
    // Resuming did not re-read the earlier C4 shard 0 from the start.
    let regets = resolve_gets(&hub.hub);
    eprintln!(
        "{} documents before a wrap; {} reads after resume",
        seen.len(),
        regets.len()
    );

    // A Hub that fails mid-shard: the same documents, in the same order.
    for route in [HubRoute::StorageGet, HubRoute::ResolveGet] {
        hub.hub
            .inject(HubFault::nth(route, 2, FaultAction::CutAfter(300)));
        hub.hub.inject(HubFault::nth(
            route,
            4,
            FaultAction::Status {
                status: 502,
                retry_after: None,
            },
        ));
    }
    let st2 = settings(&s, &hub.hub.endpoint(), &s.root().join("cache-faults"), &[]);
    let mut faulty = TrainStream::new(&st2.data.sources, st2.data.vali_fraction).unwrap();
    let again = take(&mut faulty, 10_000);
    let mut clean = TrainStream::new(&st.data.sources, st.data.vali_fraction).unwrap();
    assert_eq!(again, take(&mut clean, 10_000));
}

#[test]
fn an_unparsable_dataset_shard_is_skipped_and_counted() {
    let hub = start_hub();
    let tmp = tempfile::tempdir().unwrap();
    seed_datasets(&hub.hub, tmp.path(), 20);
    hub.hub
        .put_file(
            "nvidia/Nemotron-CC-Math-v1",
            miner_standins::hub::RepoKind::Dataset,
            "4plus/train-00001.parquet",
            b"PAR1 this is not parquet PAR1",
        )
        .unwrap();
    let s = setup("", HUB_SOURCES);
    let st = settings(&s, &hub.hub.endpoint(), &s.root().join("cache"), &[]);
    let before = trainer_svc::data::SKIPPED_SHARDS.load(std::sync::atomic::Ordering::Relaxed);
    let mut stream = TrainStream::new(&st.data.sources, st.data.vali_fraction).unwrap();
    let docs = take(&mut stream, 10_000);
    let after = trainer_svc::data::SKIPPED_SHARDS.load(std::sync::atomic::Ordering::Relaxed);
    assert!(after > before, "skipped shards {before} -> {after}");
    let text = trainer_svc::metrics::render(&StatusSnapshot::default());
    assert!(
        text.contains(&format!("miner_data_shards_skipped_total {after}")),
        "{text}"
    );
    assert!(!docs.iter().any(|d| d.starts_with("nemotron s1")));
    assert!(
        docs.iter().any(|d| d.starts_with("nemotron s2")),
        "stream went on past the bad shard"
    );
}

fn state_position(run: &Path, ckpt: &str) -> trainer_svc::data::DataPosition {
    let st: trainer_svc::engine::checkpoint::TrainerStateFile =
        serde_json::from_slice(&std::fs::read(run.join(ckpt).join("trainer_state.json")).unwrap())
            .unwrap();
    st.data
}

/// Advances `stream` until its position equals `target` (at most `limit` documents).
fn docs_until(
    stream: &mut TrainStream,
    target: &trainer_svc::data::DataPosition,
    limit: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    while stream.position() != *target {
        assert!(out.len() < limit, "never reached {target:?}");
        out.push(stream.next_doc().unwrap().1);
    }
    out
}

#[test]
fn training_from_hub_datasets_restarts_where_the_checkpoint_stopped() {
    let hub = start_hub();
    let data = tempfile::tempdir().unwrap();
    seed_datasets(&hub.hub, data.path(), 40);
    let s = setup("", HUB_SOURCES);
    let ep = hub.hub.endpoint();
    let cache = s.root().join("cache");
    // First run: 3 steps, then the process ends (its checkpoint holds the data position).
    let st = settings(&s, &ep, &cache, &["--max-steps", "3"]);
    let sources = st.data.sources.clone();
    let vali = st.data.vali_fraction;
    let (tx, _rx) = watch::channel(StatusSnapshot::default());
    trainer_svc::engine::run(st, Arc::new(Control::default()), tx).unwrap();
    let p1 = state_position(&s.run, "globalver_0_inneropt_3");
    assert!(p1.sources.iter().all(|p| p.hub.is_some()), "{p1:?}");
    // Restart: resumes from that checkpoint and trains 3 more steps.
    let st = settings(&s, &ep, &cache, &["--max-steps", "3"]);
    let (tx, _rx) = watch::channel(StatusSnapshot::default());
    trainer_svc::engine::run(st, Arc::new(Control::default()), tx).unwrap();
    let p2 = state_position(&s.run, "globalver_0_inneropt_6");
    // The documents of both runs are exactly one uninterrupted stream: none seen twice.
    let mut fresh = TrainStream::new(&sources, vali).unwrap();
    let run1 = docs_until(&mut fresh, &p1, 1000);
    let run2 = docs_until(&mut fresh, &p2, 1000);
    assert!(!run1.is_empty() && !run2.is_empty());
    let all: HashSet<&String> = run1.iter().chain(&run2).collect();
    assert_eq!(
        all.len(),
        run1.len() + run2.len(),
        "a document was trained on twice"
    );
    let mut resumed = TrainStream::resume(&sources, vali, &p1).unwrap();
    assert_eq!(docs_until(&mut resumed, &p2, 1000), run2);
}

const BIN: &str = env!("CARGO_BIN_EXE_trainer-svc");

fn reference_run(root: &Path) -> PathBuf {
    // The reference config: the live group, everything else default (model.model_path =
    // deepseek-ai/DeepSeek-V2-Lite, the group's Hub datasets).
    let run = root.join("run");
    write(
        &run.join("config.yaml"),
        "task:\n  expert_group_name: exp_math\nlog:\n  eval_batches: 2\n",
    );
    run
}

fn run_binary(run: &Path, endpoint: &str) -> std::process::Output {
    Command::new(BIN)
        .args([
            "--path",
            run.join("config.yaml").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--max-steps",
            "1",
        ])
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .env_remove("TRAINER_BASE_WEIGHTS")
        .env_remove("TRAINER_MODEL_CONFIG")
        .env_remove("TRAINER_HUB_CACHE")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run trainer-svc")
}

#[test]
fn reference_config_trains_from_the_hub_with_no_other_flag_and_offline_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Offline: exits non-zero with one line naming what is missing and how to provide it.
    let run = reference_run(&root.join("offline"));
    let out = run_binary(&run, "http://127.0.0.1:1");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("trainer-svc: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    eprintln!("offline: {line}");
    assert!(
        line.contains("deepseek-ai/DeepSeek-V2-Lite") && line.contains("HF_ENDPOINT"),
        "{line}"
    );

    // Reachable: a Hub whose deepseek-ai/DeepSeek-V2-Lite is a small DeepSeek-V2 with the real
    // expert count (so exp_math's experts exist), its config.json in the Hub's format, and the
    // two datasets laid out like the real repos.
    let hub = start_hub();
    let mut cfg = trainer_svc::model::ModelConfig::tiny();
    cfg.n_routed_experts = 64;
    cfg.num_experts_per_tok = 6;
    cfg.max_position_embeddings = 163_840;
    let cfg_path = root.join("lite.json");
    write(&cfg_path, &cfg.to_json_string());
    let tok = root.join("tokenizer.json");
    write(&tok, trainer_svc::data::tokenize::EMBEDDED_TOKENIZER_JSON);
    let repo = root.join("lite");
    py(&[
        "model",
        repo.to_str().unwrap(),
        cfg_path.to_str().unwrap(),
        tok.to_str().unwrap(),
    ]);
    std::fs::copy(&cfg_path, repo.join("config.json")).unwrap();
    seed(
        &hub.hub,
        "deepseek-ai/DeepSeek-V2-Lite",
        miner_standins::hub::RepoKind::Model,
        &repo,
    );
    seed_datasets(&hub.hub, &root.join("data"), 200);
    let run = reference_run(&root.join("online"));
    let out = run_binary(&run, &hub.hub.endpoint());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(run.join("globalver_0_inneropt_1").is_dir(), "{stderr}");
    // The routed experts of exp_math layer 1 (org ids 22, 17, ...) were trained and published.
    let dir = run.join("globalver_0_inneropt_1");
    let keys: Vec<String> = if dir.join("model_expgroup_0.pt").is_file() {
        miner_contract::pt::read_pt(&dir.join("model_expgroup_0.pt"))
            .unwrap()
            .keys()
            .cloned()
            .collect()
    } else {
        Tensor::read_safetensors(dir.join("model_expgroup_0.safetensors"))
            .expect("an expert shard in the checkpoint")
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };
    assert!(
        keys.iter()
            .any(|k| k.starts_with("model.layers.1.mlp.experts.22.")),
        "{keys:?}"
    );
    // Only the Hub was asked: the base weights' shards by range.
    let reqs = hub.hub.requests();
    assert!(
        reqs.iter().any(|r| r.path.contains("c4-train")),
        "C4 not streamed"
    );
    assert!(
        reqs.iter().any(|r| r.path.contains("4plus/train")),
        "Nemotron not streamed"
    );
}

/// The newest verified own checkpoint's name and inner step.
fn newest_own(run: &Path) -> Option<(String, u64)> {
    miner_contract::layout::RunDir::open(run)
        .ok()?
        .list()
        .ok()?
        .into_iter()
        .filter(|e| e.is_verified() && e.kind == miner_contract::CheckpointKind::Own)
        .map(|e| (e.dir_name, e.inner_opt))
        .max_by_key(|(_, n)| *n)
}

#[test]
fn killed_trainer_resumes_hub_datasets_without_repeating_a_document() {
    let hub = start_hub();
    let data = tempfile::tempdir().unwrap();
    seed_datasets(&hub.hub, data.path(), 60);
    let s = setup("", HUB_SOURCES);
    let ep = hub.hub.endpoint();
    let cache = s.root().join("cache");
    let st0 = settings(&s, &ep, &s.root().join("check-cache"), &[]);
    let (sources, vali) = (st0.data.sources, st0.data.vali_fraction);
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "--device",
            "cpu",
            "--path",
            s.run.join("config.yaml").to_str().unwrap(),
            "--model-config",
            s.model_cfg.to_str().unwrap(),
            "--hub-cache",
            cache.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let mut child = Command::new(BIN)
        .args(args(&[]))
        .env("HF_ENDPOINT", &ep)
        .env("OMP_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(s.root().join("first.log")).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while newest_own(&s.run).is_none_or(|(_, n)| n < 2) {
        assert!(t0.elapsed().as_secs() < 240, "no checkpoint in time");
        assert!(
            child.try_wait().unwrap().is_none(),
            "trainer exited: {}",
            std::fs::read_to_string(s.root().join("first.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap(); // SIGKILL: no final checkpoint.
    child.wait().unwrap();
    let (name1, n1) = newest_own(&s.run).unwrap();
    let p1 = state_position(&s.run, &name1);
    let out = Command::new(BIN)
        .args(args(&["--max-steps", "2"]))
        .env("HF_ENDPOINT", &ep)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (name2, n2) = newest_own(&s.run).unwrap();
    assert_eq!(n2, n1 + 2, "{name1} -> {name2}");
    let p2 = state_position(&s.run, &name2);
    let mut fresh = TrainStream::new(&sources, vali).unwrap();
    let before = docs_until(&mut fresh, &p1, 2000);
    let after = docs_until(&mut fresh, &p2, 2000);
    assert!(!before.is_empty() && !after.is_empty());
    let all: HashSet<&String> = before.iter().chain(&after).collect();
    assert_eq!(
        all.len(),
        before.len() + after.len(),
        "a document was trained on twice"
    );
}
