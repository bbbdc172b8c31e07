//! Crash safety: a writer process publishing checkpoints (and applying retention) in a loop is
//! SIGKILLed at random instants. After every kill a reader must never see a half-visible
//! checkpoint, and the next writer must clean the dead writer's temporaries.
//!
//! The writer is this test binary re-invoked with `MINER_CRASH_WRITER_RUN=<run dir>`, running
//! only `crash_writer_child`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use miner_contract::pt::{DType, Tensor};
use miner_contract::shard::hash_shard_file;
use miner_contract::{PublishError, PublishInfo, RunDir};

const CHILD_ENV: &str = "MINER_CRASH_WRITER_RUN";

/// ~768 KiB per checkpoint (two files) so kills land inside writes, fsyncs, renames and retention alike.
/// The bytes are generated once; each step changes a few so every checkpoint hashes differently.
fn model(base: &[u8], step: u64) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    for e in [4usize, 15, 17] {
        let mut data = base.to_vec();
        data[..8].copy_from_slice(&step.to_le_bytes());
        data[8] = e as u8;
        m.insert(
            format!("model.layers.1.mlp.experts.{e}.gate_up_proj"),
            Tensor {
                dtype: DType::F16,
                shape: vec![128, 512],
                data,
            },
        );
    }
    m
}

fn base_bytes() -> Vec<u8> {
    (0..128 * 512 * 2u32).map(|i| (i % 251) as u8).collect()
}

/// The writer loop (only when re-invoked by `kill_writer_at_random_points`).
#[test]
fn crash_writer_child() {
    let Some(run_path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let run = RunDir::open(Path::new(&run_path)).expect("open run dir");
    let mut step = run.best_own().expect("list").map_or(0, |e| e.inner_opt + 1);
    let base = base_bytes();
    loop {
        let staged = run.stage_own(1, step).expect("stage");
        let hash = staged
            .write_model_tensors(0, &model(&base, step))
            .expect("write model");
        staged
            .write_pt_tensors("model_shared.pt", &model(&base, step + 1000))
            .expect("write shared");
        match staged.publish(PublishInfo::own(0, hash)) {
            Ok(_) | Err(PublishError::AlreadyPublished { .. }) => {}
            Err(e) => panic!("publish: {e}"),
        }
        run.apply_retention(2).expect("retention");
        step += 1;
    }
}

fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|d| d.unwrap().file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with(".tmp_") || n.starts_with(".trash_"))
        .collect()
}

#[test]
fn kill_writer_at_random_points() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let mut seen_checkpoints = 0usize;
    let mut newest_step = 0u64;
    let mut killed_with_temporaries = 0usize;
    for iteration in 0..24u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Random kill instant between 20 and 320 ms (process start included).
        let delay = 20 + rand::random::<u64>() % 300;
        std::thread::sleep(Duration::from_millis(delay));
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "writer exited on its own ({status}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        // The reader's view: every checkpoint-named directory is complete and verifiable.
        let list = run.list().unwrap();
        for e in &list {
            assert!(
                e.is_verified(),
                "iteration {iteration}: half-visible checkpoint {}: {:?}",
                e.dir_name,
                e.state
            );
            let m = e.manifest.as_ref().unwrap();
            for f in &m.files {
                let len = std::fs::metadata(e.path.join(&f.path)).unwrap().len();
                assert_eq!(len, f.size, "{}/{}", e.dir_name, f.path);
            }
            assert_eq!(
                hash_shard_file(&e.model_path().unwrap()).unwrap(),
                m.model_hash,
                "iteration {iteration}: {} hash differs from its manifest",
                e.dir_name
            );
        }
        assert!(
            list.len() <= 3,
            "retention keeps 2 (+1 between publish and retention)"
        );
        seen_checkpoints = seen_checkpoints.max(list.len());
        newest_step = newest_step.max(list.first().map_or(0, |e| e.inner_opt));

        // The next writer cleans what the killed one left behind.
        if !hidden(dir.path()).is_empty() {
            killed_with_temporaries += 1;
        }
        let next = run.stage_own(u64::MAX, iteration).unwrap();
        let ours = next
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(
            hidden(dir.path()),
            vec![ours],
            "stale temporaries left behind"
        );
        drop(next);
        assert!(hidden(dir.path()).is_empty());
    }
    assert!(seen_checkpoints >= 1, "the writer never published anything");
    eprintln!(
        "crash test: 24 kills, {killed_with_temporaries} left temporaries, newest step {newest_step}, {:?}",
        started.elapsed()
    );
}
