//! Faulty validators, with the real chainsync-svc binary on the devnet: both validators commit
//! the same baseline hash on chain; the first download candidate serves a file whose hash
//! differs from that commitment, the second answers 503 once and then serves the right file.
//! chainsync-svc rejects the first (nothing of it on disk), retries the second, publishes the
//! verified baseline, and GetJobs shows it; the cycle then commits, and the submission is
//! answered 503 once by the assigned validator, retried, and accepted inside Submission.
//!
//! The binary runs with the production retry counts and backoffs shortened by its
//! `--download-retry-backoff-ms` / `--submit-retry-backoff-ms` flags (10 s and 60 s by
//! default: longer than this test's 1-second-block phases).

use std::time::{Duration, Instant};

use chainsync_svc::phase::CyclePeriods;
use miner_contract::CheckpointKind;
use miner_proto::chainsync::v1 as cpb;
use miner_standins::Faults;
use miner_tests::scenario::{self, Scene};
use miner_tests::*;

const BLOCK_EVERY: Duration = Duration::from_millis(1000);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_503_is_retried_a_wrong_hash_is_rejected_and_a_refused_submission_is_retried() {
    let t0 = Instant::now();
    let say = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let _ = bin_path(Bin::Chainsync).expect("binaries");
    let periods = CyclePeriods {
        distribute_period: 6,
        ..short_periods()
    };
    let s = Scene::with_periods(None, 1, periods).await;
    say("scene ready");
    let c = s.jump_before_validator_commit();
    say(&format!("chain at block {}", s.d.head().unwrap()));
    let v_base = s.baseline_version(c);
    let own_gv = v_base - 1;
    let own_hash = s.publish_own(own_gv, 1, 7);
    let vfile = s.tmp.path().join("baseline.pt");
    let vhash = scenario::write_expert_file(&vfile, 1);
    // Same tensor names, other values: a file whose hash is not the committed one.
    let wrong = s.tmp.path().join("wrong.pt");
    let wrong_hash = scenario::write_expert_file(&wrong, 300);
    assert_ne!(wrong_hash, vhash);

    let mut cs = s.spawn_chainsync_with(
        "chainsync.log",
        &[
            "--download-retry-backoff-ms",
            "500",
            "--submit-retry-backoff-ms",
            "500",
        ],
    );
    s.jobs().await;
    say("chainsync-svc answers");
    let _clock = s.start_clock(BLOCK_EVERY);
    assert_eq!(s.validators_commit1(&vhash).await, v_base);
    // Candidates are tried in storage-key order: the first serves the wrong file.
    let order = s.candidate_order().await;
    assert_eq!(order.len(), 2, "{order:?}");
    let uri = |ss58: &str| {
        if ss58 == s.bob.ss58() {
            "//Bob"
        } else {
            "//Charlie"
        }
    };
    let wrong_server = s.start_validator(uri(&order[0]), &wrong).await;
    let good_server = s.start_validator(uri(&order[1]), &vfile).await;
    good_server.set_faults(Faults {
        fail_times: 1,
        fail_status: 503,
        fail_submit_times: 1,
        fail_submit_status: 503,
        ..Default::default()
    });
    // Whichever validator the submission is assigned to answers its first submission 503.
    wrong_server.set_faults(Faults {
        fail_submit_times: 1,
        fail_submit_status: 503,
        ..Default::default()
    });
    s.validators_commit2(&vhash, v_base).await;
    say(&format!(
        "validators committed {vhash} in cycle {c}; {} serves a wrong file, {} answers 503 once",
        order[0], order[1]
    ));

    // DOWNLOAD of cycle k: the wrong file is rejected, the 503 retried, the baseline published.
    let k = c + 1;
    let dl = s
        .wait_job(cpb::JobKind::Download, k, Duration::from_secs(60))
        .await;
    say(&format!("download: {dl:?}"));
    assert_eq!(
        dl.outcome,
        cpb::JobOutcome::Succeeded as i32,
        "{dl:#?}\n{}",
        cs.log_tail(30)
    );
    assert_eq!(dl.model_hash, vhash);
    assert_eq!(dl.destination, order[1], "the second candidate served it");
    assert_eq!(dl.attempts, 2, "two candidates tried: {dl:#?}");
    assert_eq!(
        wrong_server.download_requests(),
        1,
        "the wrong file was fetched once"
    );
    assert_eq!(good_server.download_requests(), 2, "one 503, then OK");
    let log = std::fs::read_to_string(&cs.log).unwrap();
    assert!(
        log.contains("validator candidate failed") && log.contains(&order[0]),
        "the rejection is logged with the validator:\n{}",
        cs.log_tail(30)
    );
    let vbest = s.run.best_validator().unwrap().expect("a baseline");
    assert!(vbest.is_verified());
    assert_eq!(vbest.global_ver, v_base);
    assert_eq!(vbest.manifest.as_ref().unwrap().model_hash.to_hex(), vhash);
    assert!(vbest.dir_name.contains(&order[1]), "{}", vbest.dir_name);
    assert_eq!(dl.checkpoint, vbest.path.display().to_string());
    let validator_dirs: Vec<_> = s
        .run
        .list()
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == CheckpointKind::Validator)
        .map(|e| e.dir_name)
        .collect();
    assert_eq!(validator_dirs, vec![vbest.dir_name.clone()]);
    assert!(
        s.staged_leftovers().is_empty(),
        "the rejected download left nothing behind: {:?}",
        s.staged_leftovers()
    );

    // The rest of cycle k: commits and the submission to the assigned validator, which answers
    // 503 first; the retry 500 ms later is accepted inside Submission.
    let sj = s
        .wait_job(cpb::JobKind::Submit, k, Duration::from_secs(60))
        .await;
    say(&format!("submit: {sj:?}"));
    assert_eq!(
        sj.outcome,
        cpb::JobOutcome::Succeeded as i32,
        "{sj:#?}\n{}",
        cs.log_tail(30)
    );
    assert_eq!(sj.model_hash, own_hash);
    let (dest, other) = if sj.destination == wrong_server.hotkey_ss58() {
        (&wrong_server, &good_server)
    } else {
        (&good_server, &wrong_server)
    };
    assert_eq!(dest.submit_requests(), 2, "one 503, then accepted");
    assert_eq!(other.submit_requests(), 0);
    assert_eq!(sj.attempts, 2, "{sj:#?}");
    let (sub_start, sub_end) = (
        s.phase_start(k, chainsync_svc::phase::PhaseName::Submission),
        s.phase_start(k, chainsync_svc::phase::PhaseName::Submission) + s.periods.submission_period
            - 1,
    );
    assert!(
        (sub_start..=sub_end + 1).contains(&sj.finished_block),
        "accepted inside Submission ({sub_start}..={sub_end}): {sj:#?}"
    );
    let subs = dest.submissions();
    assert_eq!(subs.len(), 1, "{subs:#?}");
    assert_eq!(subs[0].model_hex, own_hash);
    assert_eq!(
        miner_contract::shard::hash_shard_file(&subs[0].stored_path)
            .unwrap()
            .to_hex(),
        own_hash,
        "the validator stored the committed file"
    );
    // On chain: what the validator checked the submission against.
    let (mc1_end, mc2_end) = commit_ends(&s.sched, k);
    assert!(s.our_commitment(mc1_end + 1).await.is_some());
    assert_eq!(
        s.our_commitment(mc2_end + 1).await.as_deref(),
        Some(format!(r#"{{"e":0,"h":"{own_hash}","v":{own_gv}}}"#).as_str())
    );

    cs.signal("TERM");
    let st = cs.wait_for(Duration::from_secs(30)).expect("exits");
    assert_eq!(st.code(), Some(0), "{}", cs.log_tail(30));
    assert!(s.run.pins().unwrap().is_empty());
    say("done");
}
