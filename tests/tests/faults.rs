//! Faults with the real binaries: SIGKILL in the middle of publishing, SIGTERM at random
//! moments, a malformed config or a missing wallet. Each ends with the state checked on disk.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use miner_contract::RunDir;
use miner_tests::*;

fn spec() -> RunSpec {
    RunSpec {
        // Not contacted by these tests (the trainer never talks to the chain).
        ws_url: "ws://127.0.0.1:9".into(),
        owner_url: "http://127.0.0.1:9".into(),
        periods: short_periods(),
        checkpoint_interval: 1,
    }
}

/// Every visible checkpoint directory is complete (its manifest verifies).
fn assert_all_complete(run: &RunDir, when: &str) {
    for e in run.list().unwrap() {
        assert!(
            e.is_verified(),
            "{when}: {} is visible but {:?}",
            e.dir_name,
            e.state
        );
    }
}

fn spawn_trainer(run_dir: &Path, log: &Path) -> (Service, Ports) {
    let ports = Ports::free();
    let t = Service::spawn(
        "trainer-svc",
        trainer_command(run_dir, &ports).unwrap(),
        log,
    )
    .unwrap();
    (t, ports)
}

/// The trainer's status once it trains (past start-up and resume).
async fn status_of(port: u16) -> miner_proto::trainer::v1::TrainerStatus {
    use miner_proto::trainer::v1::TrainerState;
    wait_some("the trainer to train", Duration::from_secs(60), || async {
        trainer_status(port).await.filter(|s| {
            s.state != TrainerState::Starting as i32
                && s.state != TrainerState::Reloading as i32
                && s.state != TrainerState::Unspecified as i32
        })
    })
    .await
}

/// SIGKILL while a checkpoint is being published (its temp directory exists): the visible
/// checkpoints are complete at every moment, and a restart resumes from the last complete one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_publishing_leaves_only_complete_checkpoints_and_resumes() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = create_run(tmp.path(), &spec()).unwrap();
    let run = RunDir::open(&run_dir).unwrap();
    let log = tmp.path().join("trainer.log");
    let (mut trainer, _ports) = spawn_trainer(&run_dir, &log);

    // A watcher checks the visible state continuously while the trainer publishes.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, run_dir) = (stop.clone(), run_dir.clone());
        std::thread::spawn(move || {
            let run = RunDir::open(&run_dir).unwrap();
            let mut checks = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for e in run.list().unwrap_or_default() {
                    // A directory may be deleted by retention between list and check.
                    if e.path.exists() && !e.is_verified() && e.path.exists() {
                        return Err(format!("{} visible while {:?}", e.dir_name, e.state));
                    }
                }
                checks += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(checks)
        })
    };
    // Wait until two checkpoints exist, then kill the moment the next one is being staged.
    wait_some("two checkpoints", Duration::from_secs(90), || {
        let n = run.list().map(|l| l.len()).unwrap_or(0);
        async move { (n >= 2).then_some(()) }
    })
    .await;
    let start = Instant::now();
    let mut killed_mid_publish = false;
    while start.elapsed() < Duration::from_secs(30) {
        let staging = listdir(&run_dir)
            .iter()
            .any(|n| n.starts_with(miner_contract::layout::TMP_PREFIX));
        if staging {
            trainer.signal("KILL");
            killed_mid_publish = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(killed_mid_publish, "never saw a checkpoint being staged");
    let st = trainer.wait_for(Duration::from_secs(10)).expect("killed");
    assert_eq!(st.code(), None, "ended by the signal");
    stop.store(true, Ordering::SeqCst);
    let checks = watcher.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert!(checks > 10, "the watcher ran ({checks} checks)");
    assert_all_complete(&run, "after SIGKILL");
    let last = run.best_own().unwrap().expect("a complete checkpoint");
    eprintln!(
        "killed mid-publish; last complete checkpoint {} ({:?})",
        last.dir_name,
        t0.elapsed()
    );

    // Restart: resumes from the last complete checkpoint and goes on publishing.
    let (mut trainer, ports) = spawn_trainer(&run_dir, &log);
    let st = status_of(ports.trainer_grpc).await;
    assert!(
        st.inner_opt_step >= last.inner_opt,
        "restarted at inner step {} < {}",
        st.inner_opt_step,
        last.inner_opt
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("resumed from own checkpoint") && text.contains(&last.dir_name),
        "the restart names the checkpoint it resumed from:\n{}",
        trainer.log_tail(40)
    );
    let next = wait_some("a newer checkpoint", Duration::from_secs(60), || {
        let b = run
            .best_own()
            .ok()
            .flatten()
            .filter(|b| b.inner_opt > last.inner_opt);
        async move { b }
    })
    .await;
    assert!(next.is_verified());
    trainer.signal("TERM");
    let st = trainer
        .wait_for(Duration::from_secs(60))
        .expect("exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", trainer.log_tail(30));
    assert_all_complete(&run, "after the restart");
    let leftovers: Vec<String> = listdir(&run_dir)
        .into_iter()
        .filter(|n| n.starts_with(miner_contract::layout::TMP_PREFIX))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the killed publish's temp dir is cleaned up: {leftovers:?}"
    );
    eprintln!("sigkill test took {:?}", t0.elapsed());
}

/// SIGTERM at pseudo-random moments (seed printed): a clean exit 0 each time, nothing
/// half-written, and the next start continues from where the last one stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_at_random_moments_exits_cleanly_and_the_next_start_continues() {
    let t0 = Instant::now();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(1);
    eprintln!("seed {seed}");
    let mut x = u64::from(seed) | 1;
    let mut next_ms = |lo: u64, hi: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        lo + x % (hi - lo)
    };
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = create_run(tmp.path(), &spec()).unwrap();
    let run = RunDir::open(&run_dir).unwrap();
    let log = tmp.path().join("trainer.log");
    let mut last_final: Option<(u64, u64)> = None;
    for round in 0..3 {
        let (mut trainer, ports) = spawn_trainer(&run_dir, &log);
        let st = status_of(ports.trainer_grpc).await;
        if let Some((_, n)) = last_final {
            assert!(
                st.inner_opt_step >= n,
                "round {round}: started at inner step {} < final {n} of the last run",
                st.inner_opt_step
            );
        }
        let wait = next_ms(200, 3000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        trainer.signal("TERM");
        let s = trainer
            .wait_for(Duration::from_secs(60))
            .expect("exits after SIGTERM");
        assert_eq!(
            s.code(),
            Some(0),
            "round {round} (SIGTERM after {wait} ms): {}",
            trainer.log_tail(30)
        );
        assert_all_complete(&run, &format!("round {round}"));
        let leftovers: Vec<String> = listdir(&run_dir)
            .into_iter()
            .filter(|n| n.starts_with(miner_contract::layout::TMP_PREFIX))
            .collect();
        assert!(leftovers.is_empty(), "round {round}: {leftovers:?}");
        let fin = run.best_own().unwrap().expect("final checkpoint");
        assert!(run_dir.join("mycelia_final.pt").is_file());
        if let Some(prev) = last_final {
            assert!(
                (fin.global_ver, fin.inner_opt) >= prev,
                "round {round}: went back from {prev:?} to {}",
                fin.dir_name
            );
        }
        last_final = Some((fin.global_ver, fin.inner_opt));
        eprintln!(
            "round {round}: SIGTERM after {wait} ms, final {} ({:?})",
            fin.dir_name,
            t0.elapsed()
        );
    }
}

fn exit_64(name: &str, mut cmd: Command, must_name: &str) {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{name}: {err}");
    assert!(err.contains(must_name), "{name} names {must_name:?}: {err}");
}

/// A malformed `config.yaml` or a missing wallet: exit 64 naming the field or file, with
/// nothing bound and nothing written.
#[test]
fn bad_config_or_missing_wallet_exit_64_before_binding_or_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = create_run(tmp.path(), &spec()).unwrap();
    let config = run_dir.join("config.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    let before = listdir(&run_dir);
    let ports = Ports::free();
    let check_untouched = |what: &str| {
        assert_eq!(listdir(&run_dir), before, "{what}: nothing written");
        for p in [ports.trainer_grpc, ports.chainsync_grpc] {
            assert!(
                std::net::TcpListener::bind(("127.0.0.1", p)).is_ok(),
                "{what}: port {p} is free"
            );
        }
    };

    // A field with a bad value.
    std::fs::write(
        &config,
        good.replace("checkpoint_interval: 1", "checkpoint_interval: 0"),
    )
    .unwrap();
    assert_ne!(std::fs::read_to_string(&config).unwrap(), good);
    exit_64(
        "trainer, checkpoint_interval 0",
        trainer_command(&run_dir, &ports).unwrap(),
        "ckpt.checkpoint_interval",
    );
    check_untouched("checkpoint_interval 0");

    // Not YAML at all.
    std::fs::write(&config, "chain: [unclosed\n").unwrap();
    exit_64(
        "trainer, broken YAML",
        trainer_command(&run_dir, &ports).unwrap(),
        "config.yaml",
    );
    exit_64(
        "chainsync, broken YAML",
        chainsync_command(&run_dir, &ports).unwrap(),
        "config.yaml",
    );
    check_untouched("broken YAML");

    // A bad chain.network.
    std::fs::write(&config, good.replace("ws://127.0.0.1:9", "ftp://nowhere")).unwrap();
    exit_64(
        "chainsync, bad network",
        chainsync_command(&run_dir, &ports).unwrap(),
        "chain.network",
    );
    check_untouched("bad chain.network");

    // A missing wallet.
    std::fs::write(&config, &good).unwrap();
    let empty = tmp.path().join("no-wallets");
    std::fs::create_dir_all(&empty).unwrap();
    let cmd = chainsync_command_with_wallets(&run_dir, &ports, &empty).unwrap();
    exit_64("chainsync, missing wallet", cmd, "miner_1");
    check_untouched("missing wallet");
}
