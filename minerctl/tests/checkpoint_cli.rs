//! `minerctl checkpoint ...` as an operator runs it: the real binary on real files (written by
//! the Rust codec and by real PyTorch).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use miner_contract::pt::{DType, PtWriteOptions, Tensor, write_pt_tensors};
use miner_contract::{CheckpointName, PublishInfo, RunDir};

fn minerctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_minerctl"))
        .args(args)
        .output()
        .expect("run minerctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failure with `code` and a single stderr line naming `file`.
fn assert_fails(o: &Output, code: i32, file: &Path, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "{what}: stderr {err:?}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: not one line: {err:?}"
    );
    assert!(err.starts_with("minerctl: "), "{what}: {err:?}");
    assert!(
        err.contains(&file.display().to_string()),
        "{what}: does not name {}: {err:?}",
        file.display()
    );
    assert!(o.stdout.is_empty(), "{what}: printed to stdout");
}

fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let py = std::env::var_os("MINER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".deps/venv/bin/python"));
    assert!(
        py.exists(),
        "Python with PyTorch not found at {} (set MINER_PYTHON or run scripts/setup-python.sh)",
        py.display()
    );
    py
}

/// Files written by real PyTorch: a valid shard with its spec §7.5 hash computed in Python, and
/// the bad kinds only PyTorch/zipfile produce naturally.
const PY_FIXTURES: &str = r#"
import hashlib, os, sys, zipfile
import torch
d = sys.argv[1]
sd = {"model.layers.1.mlp.experts.4.gate_up_proj": torch.tensor([[1.0, 2.0], [3.0, -0.5]], dtype=torch.float16),
      "model.layers.1.mlp.experts.4.down_proj": torch.tensor([[0.25, -1.0]], dtype=torch.float16)}
torch.save({"model_state_dict": sd}, os.path.join(d, "model_expgroup_0.pt"))
buf = b"".join(k.encode() + sd[k].numpy().tobytes() for k in sorted(sd))
print(hashlib.blake2b(buf, digest_size=24).hexdigest())
torch.save({"model_state_dict": {"model.layers.1.mlp.experts.4.down_proj": torch.zeros(2, 2, dtype=torch.complex64)}},
           os.path.join(d, "complex.pt"))
with zipfile.ZipFile(os.path.join(d, "badpickle.pt"), "w", zipfile.ZIP_STORED) as z:
    z.writestr("badpickle/data.pkl", b"\x80\x02this is not a pickle")
    z.writestr("badpickle/byteorder", b"little")
    z.writestr("badpickle/version", b"3\n")
torch.save({"optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-5}]}}, os.path.join(d, "optimizer.pt"))
"#;

fn python_fixtures(dir: &Path) -> String {
    let out = Command::new(python())
        .args(["-c", PY_FIXTURES])
        .arg(dir)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run python");
    assert!(out.status.success(), "python fixtures: {}", stderr(&out));
    stdout(&out).trim().to_string()
}

fn expert_tensors(seed: u8) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    m.insert(
        "model.layers.1.mlp.experts.22.gate_up_proj".to_string(),
        Tensor {
            dtype: DType::F16,
            shape: vec![2, 3],
            data: (0..12u8).map(|i| i.wrapping_mul(seed)).collect(),
        },
    );
    m.insert(
        "model.layers.2.mlp.experts.58.down_proj".to_string(),
        Tensor {
            dtype: DType::BF16,
            shape: vec![4],
            data: vec![seed; 8],
        },
    );
    m
}

#[test]
fn hash_matches_pytorch_and_python_blake2b_for_files_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    let expected = python_fixtures(dir.path());
    let file = dir.path().join("model_expgroup_0.pt");
    let o = minerctl(&["checkpoint", "hash", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{expected}\n"));
    // The spec's test vector.
    assert_eq!(expected, "dd252182c01da6b0e8485ce0669cb0a2189e3d3758e43873");

    // A published checkpoint directory: the shard inside, checked against the manifest.
    let run = RunDir::create(&dir.path().join("run")).unwrap();
    let s = run.stage_own(5, 20).unwrap();
    let h = s.write_model_tensors(0, &expert_tensors(3)).unwrap();
    let p = s.publish(PublishInfo::own(0, h)).unwrap();
    let o = minerctl(&["checkpoint", "hash", p.path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{h}\n"));
}

#[test]
fn inspect_lists_tensors_parameters_and_hash() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model_expgroup_0.pt");
    let h = write_pt_tensors(&file, &expert_tensors(2), &PtWriteOptions::default()).unwrap();
    let o = minerctl(&["checkpoint", "inspect", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains(&format!("model_hash  {h}")), "{text}");
    assert!(text.contains("parameters  10"), "{text}");
    assert!(text.contains("layout      model_state_dict"), "{text}");
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip_while(|l| !l.starts_with("NAME"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        vec![
            vec![
                "model.layers.1.mlp.experts.22.gate_up_proj",
                "float16",
                "[2,",
                "3]"
            ],
            vec!["model.layers.2.mlp.experts.58.down_proj", "bfloat16", "[4]"],
        ]
    );

    let o = minerctl(&[
        "checkpoint",
        "inspect",
        "--json",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["model_hash"], h.to_string());
    assert_eq!(v["parameters"], 10);
    assert_eq!(v["tensors"][0]["shape"], serde_json::json!([2, 3]));
    assert_eq!(v["tensors"][1]["dtype"], "bfloat16");
}

#[test]
fn list_shows_selection_order_state_and_pins() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    std::fs::write(run.config_file(), "run:\n  run_name: foundation\n").unwrap();
    for io in [20, 40] {
        let s = run.stage_own(100, io).unwrap();
        let h = s.write_model_tensors(0, &expert_tensors(io as u8)).unwrap();
        s.publish(PublishInfo::own(0, h)).unwrap();
    }
    let s = run.stage_validator(7, "5Val", 100).unwrap();
    let h = s.write_model_tensors(0, &expert_tensors(1)).unwrap();
    s.publish(PublishInfo::verified_download(0, h, "sig".into()))
        .unwrap();
    std::fs::create_dir_all(run.validator_dir().join("uid_3_hotkey_5New_globalver_300")).unwrap();
    std::fs::create_dir_all(dir.path().join(".tmp_globalver_100_inneropt_60")).unwrap();
    let _pin = run
        .pin(
            &CheckpointName::own(100, 20),
            "chainsync-commit",
            Duration::from_secs(600),
        )
        .unwrap();

    // --path as the config file; text output.
    let o = minerctl(&[
        "checkpoint",
        "list",
        "--path",
        run.config_file().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let rows: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        rows,
        vec![
            "uid_3_hotkey_5New_globalver_300 validator 300 0 incomplete - no MANIFEST.json",
            "* globalver_100_inneropt_40 own 100 40 verified -",
            "globalver_100_inneropt_20 own 100 20 verified chainsync-commit",
            "uid_7_hotkey_5Val_globalver_100 validator 100 0 verified -",
        ],
        "{text}"
    );

    // --path as the run directory; JSON output.
    let o = minerctl(&[
        "checkpoint",
        "list",
        "--json",
        "--path",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cps = v["checkpoints"].as_array().unwrap();
    assert_eq!(cps.len(), 4);
    assert_eq!(cps[0]["state"], "incomplete");
    assert_eq!(cps[0]["best"], false);
    assert_eq!(cps[1]["name"], "globalver_100_inneropt_40");
    assert_eq!(cps[1]["best"], true);
    assert_eq!(cps[2]["pinned_by"], serde_json::json!(["chainsync-commit"]));
    assert_eq!(cps[3]["kind"], "validator");
    assert_eq!(cps[3]["model_hash"], h.to_string());
}

#[test]
fn bad_input_gets_one_line_naming_the_file_and_a_distinct_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    python_fixtures(dir.path());
    let p = |n: &str| dir.path().join(n);

    // Truncated zip (an interrupted write or download).
    let good = p("model_expgroup_0.pt");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(p("truncated.pt"), &bytes[..bytes.len() / 2]).unwrap();
    // A file that is not a checkpoint at all.
    std::fs::write(p("notes.txt"), "hello\n").unwrap();
    for (file, what) in [
        ("truncated.pt", "truncated zip"),
        ("badpickle.pt", "wrong pickle"),
        ("complex.pt", "unknown dtype"),
        ("notes.txt", "not a zip"),
        ("optimizer.pt", "not a model checkpoint"),
    ] {
        for cmd in ["hash", "inspect"] {
            let o = minerctl(&["checkpoint", cmd, p(file).to_str().unwrap()]);
            assert_fails(&o, 65, &p(file), &format!("{cmd} {what}"));
        }
    }
    let o = minerctl(&["checkpoint", "hash", p("complex.pt").to_str().unwrap()]);
    assert!(stderr(&o).contains("ComplexFloat"), "{}", stderr(&o));

    // A directory without a model shard.
    let empty = p("empty_ckpt");
    std::fs::create_dir_all(&empty).unwrap();
    let o = minerctl(&["checkpoint", "hash", empty.to_str().unwrap()]);
    assert_fails(&o, 65, &empty, "directory without shard");

    // A directory with two shards needs --group.
    let two = p("two_shards");
    std::fs::create_dir_all(&two).unwrap();
    let h1 = write_pt_tensors(
        &two.join("model_expgroup_1.pt"),
        &expert_tensors(9),
        &PtWriteOptions::default(),
    )
    .unwrap();
    std::fs::copy(&good, two.join("model_expgroup_0.pt")).unwrap();
    let o = minerctl(&["checkpoint", "hash", two.to_str().unwrap()]);
    assert_fails(&o, 64, &two, "ambiguous shards");
    assert!(stderr(&o).contains("--group"), "{}", stderr(&o));
    let o = minerctl(&["checkpoint", "hash", "--group", "1", two.to_str().unwrap()]);
    assert_eq!(stdout(&o), format!("{h1}\n"), "{}", stderr(&o));
    let o = minerctl(&["checkpoint", "hash", "--group", "5", two.to_str().unwrap()]);
    assert_fails(&o, 65, &two, "absent group");

    // Missing inputs.
    let gone = p("no/such/run");
    let o = minerctl(&["checkpoint", "list", "--path", gone.to_str().unwrap()]);
    assert_fails(&o, 66, &gone, "missing run dir");
    let o = minerctl(&["checkpoint", "hash", p("missing.pt").to_str().unwrap()]);
    assert_fails(&o, 66, &p("missing.pt"), "missing file");

    // Usage errors.
    let o = minerctl(&[
        "checkpoint",
        "list",
        "--path",
        p("notes.txt").to_str().unwrap(),
    ]);
    assert_fails(&o, 64, &p("notes.txt"), "list on a non-config file");
    let o = minerctl(&["checkpoint", "frobnicate"]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let o = minerctl(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("checkpoint"));
}

/// A `.safetensors` shard written by Python's `safetensors.torch.save_file`, with the reference
/// hash computed in Python over `load_file`, and a file with a hostile tensor name.
const PY_ST_FIXTURES: &str = r#"
import hashlib, os, sys
import torch
from safetensors.torch import load_file, save_file
d = sys.argv[1]
sd = {"model.layers.1.mlp.experts.4.gate_up_proj": torch.tensor([[1.0, 2.0], [3.0, -0.5]], dtype=torch.float16),
      "model.layers.1.mlp.experts.4.down_proj": torch.tensor([[0.25, -1.0]], dtype=torch.float16)}
save_file(sd, os.path.join(d, "model_expgroup_0.safetensors"))
back = load_file(os.path.join(d, "model_expgroup_0.safetensors"))
buf = b"".join(k.encode() + back[k].numpy().tobytes() for k in sorted(back))
print(hashlib.blake2b(buf, digest_size=24).hexdigest())
save_file({"evil\n\x1b[31mname": torch.ones(2, dtype=torch.bfloat16)}, os.path.join(d, "evil.safetensors"))
"#;

#[test]
fn safetensors_shards_hash_and_inspect_like_pt_and_win_in_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(python())
        .args(["-c", PY_ST_FIXTURES])
        .arg(dir.path())
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run python");
    assert!(out.status.success(), "python fixtures: {}", stderr(&out));
    let expected = stdout(&out).trim().to_string();
    // The spec's test vector, from a safetensors file.
    assert_eq!(expected, "dd252182c01da6b0e8485ce0669cb0a2189e3d3758e43873");
    let st = dir.path().join("model_expgroup_0.safetensors");
    let o = minerctl(&["checkpoint", "hash", st.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{expected}\n"));

    let o = minerctl(&["checkpoint", "inspect", st.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("format      safetensors"), "{text}");
    assert!(text.contains("layout      flat"), "{text}");
    assert!(text.contains(&format!("model_hash  {expected}")), "{text}");
    assert!(text.contains("parameters  6"), "{text}");

    // The directory also holds a .pt of other tensors: the .safetensors is the shard read (the
    // order validators try), without asking for --group.
    let other = write_pt_tensors(
        &dir.path().join("model_expgroup_0.pt"),
        &expert_tensors(4),
        &PtWriteOptions::default(),
    )
    .unwrap();
    assert_ne!(other.to_hex(), expected);
    let o = minerctl(&["checkpoint", "hash", dir.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{expected}\n"));
    let o = minerctl(&[
        "checkpoint",
        "hash",
        "--group",
        "0",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(stdout(&o), format!("{expected}\n"), "{}", stderr(&o));

    // A hostile tensor name cannot forge output lines or colours.
    let evil = dir.path().join("evil.safetensors");
    let o = minerctl(&["checkpoint", "inspect", evil.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("evil\\n\\u{1b}[31mname"), "{text}");
    assert!(!text.contains('\u{1b}'), "{text:?}");

    // Truncated and junk-extended safetensors: one line, exit 65.
    let bytes = std::fs::read(&st).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    let long = dir.path().join("long.safetensors");
    std::fs::write(&long, [&bytes[..], b"junk"].concat()).unwrap();
    for (p, what) in [(&cut, "truncated"), (&long, "junk after the last tensor")] {
        for cmd in ["hash", "inspect"] {
            let o = minerctl(&["checkpoint", cmd, p.to_str().unwrap()]);
            assert_fails(&o, 65, p, &format!("{cmd} {what}"));
            assert!(stderr(&o).contains(what), "{}", stderr(&o));
        }
    }
}
