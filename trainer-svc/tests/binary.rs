//! The real `trainer-svc` binary: `--max-steps`, SIGTERM, and config validation (exit 64).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_trainer-svc");

fn cmd(run: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args([
        "--device",
        "cpu",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--path",
    ])
    .arg(run)
    .env("OMP_NUM_THREADS", "1")
    .env("RUST_LOG", "info");
    c
}

/// Kills the child if the test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn published(run: &Path, name: &str) -> bool {
    run.join(name).join("MANIFEST.json").is_file()
        && run
            .join(name)
            .join("model_expgroup_0.safetensors")
            .is_file()
}

#[test]
fn max_steps_exits_zero_with_a_checkpoint_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 100, "");
    let out = cmd(&run).args(["--max-steps", "3"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    assert!(published(&run, "globalver_0_inneropt_3"), "{stderr}");
    assert!(stderr.contains("(0) Setup training"), "{stderr}");
    let rows = common::csv_losses(&run.join("metrics/foundation.csv"));
    assert!(!rows.is_empty());
}

#[test]
fn sigterm_publishes_a_final_checkpoint_and_mycelia_final_then_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 1000, "");
    let mut child = KillOnDrop(cmd(&run).stderr(Stdio::piped()).spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    // Wait until it has taken a few optimizer steps.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("inner_opt_step") && line.contains("=3") {
                let _ = tx.send(());
                sent = true;
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("trainer did not reach step 3");
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "trainer did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = reader.join().unwrap();
    assert!(exit.success(), "exit {exit:?}\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(run.join("mycelia_final.pt").is_file(), "{log}");
    let names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("globalver_0_inneropt_"))
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(published(&run, &names[0]));
    // No mycelia_final.pt in the working directory.
    assert!(!Path::new("mycelia_final.pt").exists());
}

#[test]
fn invalid_config_exits_64_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 2, "");
    let out = Command::new(BIN)
        .args(["--device", "gpu", "--path"])
        .arg(&run)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device"));

    let bad = common::small_run_dir(&tmp.path().join("bad"), 2, "sched:\n  total_steps: 0\n");
    let out = cmd(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sched.total_steps"), "{err}");
    // Nothing was written for a config that never validated.
    assert!(!bad.join("metrics").exists());
}

#[test]
fn persistent_non_finite_loss_exits_non_zero() {
    let tmp = tempfile::tempdir().unwrap();
    // An absurd learning rate blows the experts up; every later loss is non-finite.
    let run = common::small_run_dir(&tmp.path().join("nan"), 1000, "");
    let yaml = std::fs::read_to_string(run.join("config.yaml"))
        .unwrap()
        .replace("lr: 0.01", "lr: 1.0e30");
    std::fs::write(run.join("config.yaml"), yaml).unwrap();
    let out = cmd(&run).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("non-finite"), "{err}");
}

/// The Python interpreter with PyTorch (env `MINER_PYTHON`, default `<workspace>/.deps/venv/bin/python`).
fn python() -> std::path::PathBuf {
    let p = std::env::var_os("MINER_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/venv/bin/python"));
    assert!(
        p.exists(),
        "no Python with PyTorch at {} (run scripts/setup-python.sh or set MINER_PYTHON)",
        p.display()
    );
    p
}

#[test]
fn published_files_load_in_pytorch_with_weights_only() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 100, "");
    let out = cmd(&run).args(["--max-steps", "2"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ckpt = run.join("globalver_0_inneropt_2");
    // The shard is the live subnet's `.safetensors` (addendum A1): a flat map that
    // `safetensors.torch.load_file` reads, whose reference hash (spec §7.5) is the manifest's.
    assert!(!ckpt.join("model_expgroup_0.pt").exists());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest["model_file"], "model_expgroup_0.safetensors");
    let script = r#"
import hashlib, json, sys, torch
from safetensors.torch import load_file
ckpt, final = sys.argv[1], sys.argv[2]
sd = load_file(f"{ckpt}/model_expgroup_0.safetensors")
assert sd and all(".mlp.experts." in k for k in sd), list(sd)[:5]
h = hashlib.blake2b(digest_size=24)
for k in sorted(sd):
    h.update(k.encode()); h.update(sd[k].contiguous().numpy().tobytes())
assert h.hexdigest() == json.load(open(f"{ckpt}/MANIFEST.json"))["model_hash"], "hash"
assert all(t.dtype == torch.float16 for t in sd.values())
shared = torch.load(f"{ckpt}/model_shared.pt", weights_only=True)["model_state_dict"]
assert "model.embed_tokens.weight" in shared and "lm_head.weight" in shared, list(shared)[:5]
assert not any(".mlp.experts." in k for k in shared)
opt = torch.load(f"{ckpt}/inner_optimizer.pt", weights_only=True)
assert any(k.startswith("exp_avg.") for k in opt) and any(k.startswith("master.") for k in opt)
m = torch.load(final, weights_only=True)
assert "model.embed_tokens.weight" in m and set(sd) <= set(m), "mycelia_final.pt is not a plain dict of all tensors"
for k, t in sd.items():
    assert torch.allclose(t.float(), m[k].float(), atol=1e-3), k
print("ok", len(sd), len(shared), len(m))
"#;
    let py = Command::new(python())
        .args(["-c", script])
        .arg(&ckpt)
        .arg(run.join("mycelia_final.pt"))
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}{}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );
}

/// `--shard-format pt` writes the pre-May `model_expgroup_<gid>.pt` (wrapped in
/// `model_state_dict`, loadable with `weights_only`), and a later run with the default format
/// resumes from it and continues in `.safetensors`.
#[test]
fn pt_shards_on_request_and_resume_across_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 100, "");
    let out = cmd(&run)
        .args(["--max-steps", "2", "--shard-format", "pt"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let first = run.join("globalver_0_inneropt_2");
    assert!(first.join("model_expgroup_0.pt").is_file(), "{stderr}");
    assert!(!first.join("model_expgroup_0.safetensors").exists());
    let script = r#"
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True)["model_state_dict"]
assert sd and all(".mlp.experts." in k for k in sd), list(sd)[:5]
print(len(sd))
"#;
    let py = Command::new(python())
        .args(["-c", script])
        .arg(first.join("model_expgroup_0.pt"))
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );

    // The default format again: resumes from the .pt checkpoint (step 2 -> 4).
    let out = cmd(&run).args(["--max-steps", "2"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(published(&run, "globalver_0_inneropt_4"), "{stderr}");
    let a = miner_contract::shard::read_shard(&first.join("model_expgroup_0.pt")).unwrap();
    let b = miner_contract::shard::read_shard(
        &run.join("globalver_0_inneropt_4/model_expgroup_0.safetensors"),
    )
    .unwrap();
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same tensors in both formats"
    );
}
