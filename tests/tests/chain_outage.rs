//! The chain endpoint goes away for several blocks and comes back, with the real chainsync-svc
//! binary talking to the devnet through a TCP proxy that drops every connection and refuses new
//! ones for the outage. The outage covers MinerCommit1, MinerCommit2 and Submission of a cycle,
//! longer than a commit phase: chainsync-svc must not hang, crash or claim a commit it did not
//! make; COMMIT1 ends MISSED naming the chain error while the chain is still away (its phase
//! end is known from the owner phase API). During MinerCommit2 the owner phase API goes away
//! too (503), so chainsync-svc sees no phase at all until after Submission: the SUBMIT it never
//! started is recorded MISSED with the reason once a phase is seen again. Every job of the cycle
//! has a finished record; chainsync-svc reconnects, and the next cycle commits and submits as
//! usual. A cycle later both go away once COMMIT1 has started: with no block from anywhere,
//! COMMIT1 still ends MISSED when the block time says its phase is over. Checked on chain (the
//! commitments validators read), at the validator stand-in and on disk.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chainsync_svc::phase::PhaseName;
use miner_proto::chainsync::v1 as cpb;
use miner_tests::proxy::TcpProxy;
use miner_tests::scenario::Scene;
use miner_tests::*;
use serde_json::Value;

const BLOCK_EVERY: Duration = Duration::from_millis(1000);

async fn wait_head(head: &std::sync::atomic::AtomicU64, block: u64, limit: Duration) {
    let start = Instant::now();
    while head.load(Ordering::SeqCst) < block {
        assert!(
            start.elapsed() < limit,
            "timed out waiting for block {block} (head {})",
            head.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn outcome(j: &cpb::Job) -> cpb::JobOutcome {
    cpb::JobOutcome::try_from(j.outcome).unwrap_or(cpb::JobOutcome::Unspecified)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chain_outage_across_a_commit_window_is_recorded_and_the_next_cycle_commits() {
    let t0 = Instant::now();
    let say = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let _ = bin_path(Bin::Chainsync).expect("binaries");
    let d: &'static miner_devnet::Devnet = tokio::task::spawn_blocking(miner_devnet::shared)
        .await
        .expect("devnet");
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], d.port())))
        .await
        .unwrap();
    let s = Scene::new(Some(proxy.ws_url()), 1).await;

    let c = s.jump_before_validator_commit();
    let v_base = s.baseline_version(c);
    // Our checkpoint: older than the validators' baseline, inside the version window of the
    // next two cycles.
    let own_gv = v_base - 1;
    let own_hash = s.publish_own(own_gv, 1, 7);
    let vfile = s.tmp.path().join("baseline.pt");
    let vhash = scenario::write_expert_file(&vfile, 1);
    let v_bob = s.start_validator("//Bob", &vfile).await;
    let v_charlie = s.start_validator("//Charlie", &vfile).await;

    // Blocks come every second here: chainsync-svc is told so (transfer deadlines, and the
    // phase end while nothing can be read).
    let mut cs = s.spawn_chainsync_with("chainsync.log", &["--block-time-ms", "1000"]);
    s.jobs().await;
    say(&format!(
        "chainsync-svc answers, through the proxy at {}",
        proxy.addr()
    ));
    let _clock = s.start_clock(BLOCK_EVERY);
    assert_eq!(s.validators_commit(&vhash).await, v_base);
    say(&format!("validators committed their baseline in cycle {c}"));

    // Cycle k1: the baseline is downloaded before the outage.
    let (k1, k2) = (c + 1, c + 2);
    let dl = s
        .wait_job(cpb::JobKind::Download, k1, Duration::from_secs(40))
        .await;
    assert_eq!(outcome(&dl), cpb::JobOutcome::Succeeded, "{dl:#?}");

    // The outage: from the last block before MinerCommit1 of k1 to the end of Submission (12
    // blocks: MinerCommit1, MinerCommit2, Submission).
    let mc1_start = s.phase_start(k1, PhaseName::MinerCommit1);
    let mc1_end = mc1_start + s.periods.commit_period - 1;
    let mc2_start = mc1_end + 1;
    let mc2_end = mc1_end + s.periods.commit_period;
    let sub_end = mc2_end + s.periods.submission_period;
    wait_head(&s.head, mc1_start - 1, Duration::from_secs(30)).await;
    proxy.pause().await;
    let accepted_before = proxy.accepted();
    say(&format!(
        "chain endpoint down at block {}",
        s.head.load(Ordering::SeqCst)
    ));

    // COMMIT1 ends while the chain is still away (MinerCommit1 is 4 blocks; the chain stays
    // away for 12), MISSED, and says why: the chain could not be reached.
    let c1 = s
        .wait_job(cpb::JobKind::Commit1, k1, Duration::from_secs(20))
        .await;
    let at = s.head.load(Ordering::SeqCst);
    assert!(!proxy.is_up(), "COMMIT1 ended during the outage");
    say(&format!(
        "COMMIT1 of cycle {k1} at block {at}, chain still away: {:?}: {}",
        outcome(&c1),
        c1.error
    ));
    assert_eq!(
        outcome(&c1),
        cpb::JobOutcome::Missed,
        "the chain was away for all of MinerCommit1: {c1:#?}"
    );
    assert!(
        c1.error.contains("MinerCommit1") && c1.error.contains("chain unreachable"),
        "the reason names the phase and the chain error: {c1:#?}"
    );
    assert!(
        at <= mc2_end,
        "COMMIT1 ended soon after MinerCommit1 ({mc1_start}..={mc1_end}), not at block {at}"
    );

    // The owner phase API goes away too, from the second block of MinerCommit2 until
    // Submission is over: chainsync-svc sees no phase and never starts SUBMIT.
    wait_head(&s.head, mc2_start + 1, Duration::from_secs(30)).await;
    s.phase_api.set_down(503);
    let down_at = s.head.load(Ordering::SeqCst);
    assert!(
        down_at <= mc2_end,
        "the owner phase API went down at block {down_at}, after Submission began (the machine is too slow for this test)"
    );
    say(&format!(
        "owner phase API down at block {}",
        s.head.load(Ordering::SeqCst)
    ));
    wait_head(&s.head, sub_end + 1, Duration::from_secs(30)).await;
    s.phase_api.set_up();
    proxy.resume().await.unwrap();
    say(&format!(
        "chain endpoint and owner phase API back at block {}",
        s.head.load(Ordering::SeqCst)
    ));
    assert!(cs.running(), "{}", cs.log_tail(30));

    // Every job of k1 has a finished record, and what it reports is what the chain shows.
    let ours = s
        .chain
        .commitments(NETUID, mc1_end + 1)
        .await
        .unwrap()
        .into_iter()
        .find(|x| x.hotkey == s.miner.ss58());
    assert!(
        ours.as_ref()
            .and_then(|x| x.block)
            .is_none_or(|b| b < mc1_start),
        "nothing of ours was committed in MinerCommit1 of cycle {k1}: {ours:?}"
    );
    for kind in [cpb::JobKind::Commit2, cpb::JobKind::Submit] {
        let j = s.wait_job(kind, k1, Duration::from_secs(60)).await;
        say(&format!(
            "{kind:?} of cycle {k1}: {:?}: {}",
            outcome(&j),
            j.error
        ));
        match outcome(&j) {
            cpb::JobOutcome::Succeeded => panic!("nothing was committed in MinerCommit1: {j:#?}"),
            _ => assert!(!j.error.is_empty(), "a reason is recorded: {j:#?}"),
        }
        if kind == cpb::JobKind::Submit {
            assert_eq!(outcome(&j), cpb::JobOutcome::Missed, "{j:#?}");
            assert!(
                j.error.contains(&format!(
                    "Submission of cycle {k1} passed before the scheduler saw it"
                )) && j.error.contains("no phase seen for")
                    && j.error.contains("chain unreachable"),
                "the reason says the phase passed unseen and why: {j:#?}"
            );
        }
    }
    let k1_jobs: Vec<_> = s
        .journal()
        .into_iter()
        .filter(|r| r.cycle_index == k1)
        .collect();
    for kind in [
        chainsync_svc::jobs::JobKind::Download,
        chainsync_svc::jobs::JobKind::Commit1,
        chainsync_svc::jobs::JobKind::Commit2,
        chainsync_svc::jobs::JobKind::Submit,
    ] {
        assert_eq!(
            k1_jobs.iter().filter(|r| r.kind == kind).count(),
            1,
            "one {kind:?} record for cycle {k1}: {k1_jobs:#?}"
        );
    }
    assert_eq!(
        s.our_commitment(mc2_end + 1).await,
        ours.as_ref().and_then(|x| x.text().map(str::to_owned)),
        "no MinerCommit2 either"
    );
    assert!(v_bob.submissions().is_empty() && v_charlie.submissions().is_empty());

    // chainsync-svc reconnects on its own...
    let log_path = cs.log.clone();
    wait_some(
        "chainsync-svc to reconnect to the chain",
        Duration::from_secs(30),
        || {
            let reconnected = proxy.accepted() > accepted_before
                && std::fs::read_to_string(&log_path)
                    .is_ok_and(|l| l.contains("reconnected to the chain"));
            async move { reconnected.then_some(()) }
        },
    )
    .await;
    // ...and cycle k2 commits and submits inside its windows.
    let sub = s
        .wait_job(cpb::JobKind::Submit, k2, Duration::from_secs(60))
        .await;
    let jobs = s.jobs().await;
    for kind in [
        cpb::JobKind::Commit1,
        cpb::JobKind::Commit2,
        cpb::JobKind::Submit,
    ] {
        let j = finished_job(&jobs, kind, k2).unwrap();
        assert_eq!(
            outcome(&j),
            cpb::JobOutcome::Succeeded,
            "cycle {k2} {kind:?}: {j:#?}\n{}",
            cs.log_tail(30)
        );
        assert_eq!(j.model_hash, own_hash);
    }
    let (mc1_end2, mc2_end2) = commit_ends(&s.sched, k2);
    let m = s
        .our_commitment(mc1_end2 + 1)
        .await
        .expect("MinerCommit1 of k2 on chain");
    let v: Value = serde_json::from_str(&m).unwrap();
    let sig: [u8; 64] = miner_keys::b64url_nopad_decode(v["m"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    assert!(miner_keys::verify(
        &s.miner.public(),
        own_hash.as_bytes(),
        &sig
    ));
    assert_eq!(
        s.our_commitment(mc2_end2 + 1).await.as_deref(),
        Some(format!(r#"{{"e":0,"h":"{own_hash}","v":{own_gv}}}"#).as_str())
    );
    let subs: Vec<_> = v_bob
        .submissions()
        .into_iter()
        .chain(v_charlie.submissions())
        .collect();
    assert_eq!(subs.len(), 1, "{subs:#?}");
    assert_eq!(subs[0].model_hex, own_hash);
    assert_eq!(subs[0].origin_hotkey_ss58, s.miner.ss58());
    assert_eq!(sub.destination, {
        if v_bob.submissions().is_empty() {
            v_charlie.hotkey_ss58()
        } else {
            v_bob.hotkey_ss58()
        }
    });
    say(&format!(
        "cycle {k2} committed and submitted after the outage"
    ));

    // Cycle k3: a total outage. The chain goes away before MinerCommit1; once COMMIT1 has
    // started (from the owner API's phase), the owner API goes away too. With no block from
    // either, COMMIT1 still ends, MISSED, when the block time (--block-time-ms 1000) says
    // MinerCommit1 is over, and says so.
    let k3 = k2 + 1;
    let mc1_start3 = s.phase_start(k3, PhaseName::MinerCommit1);
    let mc1_end3 = mc1_start3 + s.periods.commit_period - 1;
    wait_head(&s.head, mc1_start3 - 1, Duration::from_secs(40)).await;
    proxy.pause().await;
    let port = s.ports.chainsync_grpc;
    wait_some(
        &format!("COMMIT1 of cycle {k3} to start"),
        Duration::from_secs(15),
        || async move {
            chainsync_jobs(port)
                .await?
                .into_iter()
                .find(|j| j.kind == cpb::JobKind::Commit1 as i32 && j.cycle_index == k3)
        },
    )
    .await;
    s.phase_api.set_down(503);
    let down_at = s.head.load(Ordering::SeqCst);
    say(&format!(
        "chain endpoint and owner phase API down at block {down_at} (MinerCommit1 {mc1_start3}..={mc1_end3})"
    ));
    assert!(down_at < mc1_end3, "the machine is too slow for this test");
    let c3 = s
        .wait_job(cpb::JobKind::Commit1, k3, Duration::from_secs(20))
        .await;
    let at = s.head.load(Ordering::SeqCst);
    say(&format!(
        "COMMIT1 of cycle {k3} at block {at}, nothing reachable: {:?}: {}",
        outcome(&c3),
        c3.error
    ));
    assert!(!proxy.is_up(), "COMMIT1 ended during the total outage");
    assert_eq!(outcome(&c3), cpb::JobOutcome::Missed, "{c3:#?}");
    assert!(
        c3.error.contains("MinerCommit1")
            && c3.error.contains("by the clock")
            && c3.error.contains("chain unreachable"),
        "the reason says the phase end was estimated by the clock, and why: {c3:#?}"
    );
    assert!(
        at <= mc1_end3 + 4,
        "COMMIT1 ended about when MinerCommit1 did ({mc1_end3}), not at block {at}"
    );
    s.phase_api.set_up();
    proxy.resume().await.unwrap();

    // A clean stop: nothing pinned, nothing staged, the journal parses.
    cs.signal("TERM");
    let st = cs.wait_for(Duration::from_secs(30)).expect("exits");
    assert_eq!(st.code(), Some(0), "{}", cs.log_tail(30));
    assert!(s.run.pins().unwrap().is_empty());
    assert!(
        s.staged_leftovers().is_empty(),
        "{:?}",
        s.staged_leftovers()
    );
    let recs = s.journal();
    assert!(
        recs.iter()
            .all(|r| r.outcome != chainsync_svc::jobs::JobOutcome::Running),
        "{recs:#?}"
    );
    say("done");
}
