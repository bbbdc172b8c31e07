//! SIGTERM to both services at seeded pseudo-random moments of running cycles on the devnet
//! (trainer-svc training and checkpointing, chainsync-svc downloading, committing, submitting):
//! both exit 0 promptly; no staged or half-deleted directory is left, every visible checkpoint
//! is complete, no pin is left behind, the job journal parses with no job left RUNNING; and
//! after each restart the miner goes on: the trainer resumes at or past its final checkpoint
//! and chainsync runs the next job of the cycle.
//!
//! The seed is printed; set `MINER_TEST_SEED` to replay one.

use std::time::{Duration, Instant};

use miner_contract::layout::model_file_name;
use miner_contract::shard::ShardFormat;
use miner_proto::chainsync::v1 as cpb;
use miner_proto::trainer::v1::TrainerState;
use miner_tests::scenario::Scene;
use miner_tests::*;

const BLOCK_EVERY: Duration = Duration::from_millis(1000);
const ROUNDS: usize = 3;

struct Pair {
    trainer: Service,
    chainsync: Service,
    ports: Ports,
}

fn spawn_pair(s: &Scene) -> Pair {
    let ports = Ports::free();
    let trainer = Service::spawn(
        "trainer-svc",
        trainer_command(&s.run_dir, &ports).unwrap(),
        &s.tmp.path().join("trainer.log"),
    )
    .unwrap();
    let chainsync = Service::spawn(
        "chainsync-svc",
        chainsync_command(&s.run_dir, &ports).unwrap(),
        &s.tmp.path().join("chainsync.log"),
    )
    .unwrap();
    Pair {
        trainer,
        chainsync,
        ports,
    }
}

/// The trainer's status once it trains (past start-up and resume).
async fn training(port: u16) -> miner_proto::trainer::v1::TrainerStatus {
    wait_some("the trainer to train", Duration::from_secs(90), || async {
        trainer_status(port).await.filter(|st| {
            st.state == TrainerState::Training as i32 || st.state == TrainerState::Evaluating as i32
        })
    })
    .await
}

fn xorshift(seed: u64) -> impl FnMut(u64, u64) -> u64 {
    let mut x = seed | 1;
    move |lo, hi| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        lo + x % (hi - lo)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_at_random_moments_of_a_cycle_exits_cleanly_and_the_miner_goes_on() {
    let t0 = Instant::now();
    let say = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let _ = bin_path(Bin::Trainer).expect("binaries");
    let seed: u64 = std::env::var("MINER_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::from(d.subsec_nanos()))
                .unwrap_or(1)
        });
    say(&format!("seed {seed} (MINER_TEST_SEED={seed} replays it)"));
    let mut next = xorshift(seed);

    let s = Scene::new(None, 3).await;
    let l = s.cycle_length();
    let mut pair = spawn_pair(&s);
    // The trainer's first checkpoint is the validators' baseline file (as a merged model is).
    let first = wait_some(
        "the trainer's first checkpoint",
        Duration::from_secs(90),
        || {
            let r = s.run.best_own().ok().flatten();
            async move { r }
        },
    )
    .await;
    let vfile = s.tmp.path().join("validator_model.safetensors");
    std::fs::copy(
        first
            .path
            .join(model_file_name(0, ShardFormat::Safetensors)),
        &vfile,
    )
    .unwrap();
    let vhash = miner_contract::shard::hash_shard_file(&vfile)
        .unwrap()
        .to_hex();
    let _v_bob = s.start_validator("//Bob", &vfile).await;
    let _v_charlie = s.start_validator("//Charlie", &vfile).await;
    wait_some("chainsync's gRPC", Duration::from_secs(30), || {
        chainsync_jobs(pair.ports.chainsync_grpc)
    })
    .await;
    let c = s.jump_before_validator_commit();
    let _clock = s.start_clock(BLOCK_EVERY);
    s.validators_commit(&vhash).await;
    say(&format!(
        "validators committed in cycle {c}; cycles running"
    ));

    let mut last_final: Option<(u64, u64)> = None;
    for round in 0..ROUNDS {
        // A moment anywhere in one cycle from now.
        let wait = Duration::from_millis(next(500, l * BLOCK_EVERY.as_millis() as u64));
        tokio::time::sleep(wait).await;
        let head = s.head.load(std::sync::atomic::Ordering::SeqCst);
        let phase = s.sched.phase_at(head);
        let running: Vec<String> = chainsync_jobs(pair.ports.chainsync_grpc)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|j| j.outcome == cpb::JobOutcome::Running as i32)
            .map(|j| format!("{:?}", cpb::JobKind::try_from(j.kind).unwrap_or_default()))
            .collect();
        let (tpid, cpid) = (pair.trainer.pid(), pair.chainsync.pid());
        pair.trainer.signal("TERM");
        pair.chainsync.signal("TERM");
        let stopped = Instant::now();
        let ts = pair
            .trainer
            .wait_for(Duration::from_secs(60))
            .expect("trainer-svc exits after SIGTERM");
        let cs = pair
            .chainsync
            .wait_for(Duration::from_secs(30))
            .expect("chainsync-svc exits after SIGTERM");
        say(&format!(
            "round {round}: SIGTERM after {wait:?} at block {head} ({} of cycle {}, running jobs {running:?}); both exited in {:?}",
            phase.phase_name.as_str(),
            phase.cycle_index,
            stopped.elapsed()
        ));
        assert_eq!(ts.code(), Some(0), "{}", pair.trainer.log_tail(30));
        assert_eq!(cs.code(), Some(0), "{}", pair.chainsync.log_tail(30));

        // Nothing half-written is visible; nothing of the dead processes stays behind.
        for e in s.run.list().unwrap() {
            assert!(
                e.is_verified(),
                "round {round}: {} is visible but {:?}",
                e.dir_name,
                e.state
            );
        }
        assert!(
            s.staged_leftovers().is_empty(),
            "round {round}: {:?}",
            s.staged_leftovers()
        );
        assert!(
            s.pin_files().is_empty(),
            "round {round}: pins left by pids {tpid}/{cpid}: {:?}",
            s.pin_files()
        );
        let journal = s.journal();
        assert!(
            journal
                .iter()
                .all(|r| r.outcome != chainsync_svc::jobs::JobOutcome::Running),
            "round {round}: a job is still RUNNING in the journal: {journal:#?}"
        );
        for name in ["trainer.json", "chainsync.json"] {
            assert!(
                !s.run_dir.join("control").join(name).exists(),
                "round {round}: control/{name} removed on exit"
            );
        }
        let fin = s.run.best_own().unwrap().expect("final checkpoint");
        assert!(s.run_dir.join("mycelia_final.pt").is_file());
        if let Some(prev) = last_final {
            assert!(
                (fin.global_ver, fin.inner_opt) >= prev,
                "round {round}: went back from {prev:?} to {}",
                fin.dir_name
            );
        }
        last_final = Some((fin.global_ver, fin.inner_opt));
        let jobs_before = journal.iter().map(|r| r.id).max().unwrap_or(0);

        // Restart: the trainer resumes at or past its final checkpoint...
        pair = spawn_pair(&s);
        let restart_block = s.head.load(std::sync::atomic::Ordering::SeqCst);
        let st = training(pair.ports.trainer_grpc).await;
        assert!(
            st.inner_opt_step >= fin.inner_opt,
            "round {round}: restarted at inner step {} < final {}",
            st.inner_opt_step,
            fin.inner_opt
        );
        if round + 1 == ROUNDS {
            // ...and chainsync runs the next job of the cycle to its end.
            let port = pair.ports.chainsync_grpc;
            let j = wait_some(
                "a job started after the restart to succeed",
                Duration::from_secs(3 * l),
                || async move {
                    chainsync_jobs(port).await?.into_iter().find(|j| {
                        j.id > jobs_before
                            && j.started_block >= restart_block
                            && j.outcome == cpb::JobOutcome::Succeeded as i32
                    })
                },
            )
            .await;
            say(&format!(
                "after the last restart: {:?} of cycle {} succeeded at block {}",
                cpb::JobKind::try_from(j.kind).unwrap_or_default(),
                j.cycle_index,
                j.finished_block
            ));
        }
    }
    pair.trainer.signal("TERM");
    pair.chainsync.signal("TERM");
    assert_eq!(
        pair.trainer
            .wait_for(Duration::from_secs(60))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert_eq!(
        pair.chainsync
            .wait_for(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert!(s.pin_files().is_empty());
    say("done");
}
