//! Bad input at the job level: what an operator sees in `GetJobs` when validators misbehave,
//! the phase API is down or a commit fails on chain, and that nothing half-written is left.
//!
//! The daemon runs in-process against the real devnet with a `PhaseApiStandIn` (short
//! schedule) and two whitelisted `ValidatorStandIn`s (//Bob, //Charlie) that committed the same
//! baseline in cycle k. In cycle k+1 each download (the scheduled one, then `LoadBaseline`)
//! meets a different pair of faults, one per validator:
//!
//! 1. 5xx on every request / the body stalls;
//! 2. the connection closes mid-body / a file with another hash;
//! 3. a file with foreign keys / a file with a NaN;
//!
//! in cycle k+2 the scheduled download meets a validator whose signature does not verify and
//! another whose commitment is garbage (4), then a `LoadBaseline` finds the phase API down (5).
//!
//! Meanwhile COMMIT1 fails on chain: our hotkey was deregistered.

mod cycle_support;
mod transport_support;

use std::path::Path;
use std::time::{Duration, Instant};

use chainsync_svc::phase::PhaseName;
use cycle_support::*;
use miner_contract::pt::write_pt_tensors;
use miner_keys::Hotkey;
use miner_proto::chainsync::v1 as pb;
use miner_proto::chainsync::v1::chain_sync_client::ChainSyncClient;
use miner_standins::Faults;
use serde_json::json;
use transport_support::all_entries;

/// Starts a manual download (`LoadBaseline`, with the control token) and waits for its record.
async fn load_baseline(
    client: &mut ChainSyncClient<tonic::transport::Channel>,
    bearer: &str,
    limit: Duration,
) -> pb::Job {
    let mut req = tonic::Request::new(pb::LoadBaselineRequest {});
    req.metadata_mut()
        .insert("authorization", bearer.parse().unwrap());
    let id = client
        .load_baseline(req)
        .await
        .expect("LoadBaseline")
        .into_inner()
        .job
        .expect("a job")
        .id;
    wait_final(client, "the LoadBaseline job", limit, |j| j.id == id).await
}

/// The `kind` job of `cycle`, once it has a final outcome (within 60 s).
async fn final_job(
    client: &mut ChainSyncClient<tonic::transport::Channel>,
    kind: pb::JobKind,
    cycle: u64,
) -> pb::Job {
    wait_job(client, kind, cycle, Duration::from_secs(60)).await
}

fn assert_failed_with(j: &pb::Job, wants: &[&str]) {
    assert_eq!(j.outcome, pb::JobOutcome::Failed as i32, "{j:#?}");
    for w in wants {
        assert!(j.error.contains(w), "the record lacks {w:?}: {:?}", j.error);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_input_gets_a_clear_job_record_and_leaves_nothing_behind() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("chainsync_svc=info")
        .with_test_writer()
        .try_init();
    let bed = Devbed::start(Duration::from_millis(500)).await;
    let (d, sched, head) = (bed.d, &bed.sched, &bed.head);
    let l = sched.cycle_length();
    let tmp = tempfile::tempdir().unwrap();
    let miner = Hotkey::load(&wallet_dir(), "miners", "miner_1", None).expect("example wallet");
    let bob = Hotkey::from_uri("//Bob").unwrap();
    let charlie = Hotkey::from_uri("//Charlie").unwrap();
    fund(d, charlie.ss58());

    // The baseline both validators commit, and the bad files they may serve instead.
    let good = tmp.path().join("good.pt");
    let vhash = write_pt_tensors(&good, &shard(100), &Default::default())
        .unwrap()
        .to_hex();
    let wrong = tmp.path().join("wrong.pt");
    write_pt_tensors(&wrong, &shard(300), &Default::default()).unwrap();
    let foreign = tmp.path().join("foreign.pt");
    let mut t = shard(100);
    let extra = t.values().next().cloned().unwrap();
    t.insert("model.layers.1.mlp.experts.0.down_proj".into(), extra);
    write_pt_tensors(&foreign, &t, &Default::default()).unwrap();
    let nan = tmp.path().join("nan.pt");
    let mut t = shard(100);
    let nan_name = t.keys().next().cloned().unwrap();
    t.values_mut().next().unwrap().data[0..2].copy_from_slice(&0x7E00u16.to_le_bytes());
    write_pt_tensors(&nan, &t, &Default::default()).unwrap();

    let run_dir = tmp.path().join("run");
    let run = create_run(&run_dir, d.ws_url(), "badinput", &periods());
    let phase_api = phase_api(head, vec![BOB.to_owned(), charlie.ss58().to_owned()]).await;
    let phase_url = phase_api.url();

    // Cycle k: both validators commit the baseline.
    let (vc1_start, _) = bed.wait_for_phase(PhaseName::ValidatorCommit1, 2).await;
    let k = vc1_start / l;
    let v_base = k * l + sched.phase_offset(PhaseName::MinerCommit1);
    bed.commit_all(&[
        (&bob, vc1_text(&bob, &vhash)),
        (&charlie, vc1_text(&charlie, &vhash)),
    ])
    .await;
    let own_hash = publish_own(&run, v_base - 1, 5, 7);
    let stand_in = |key_uri: &str, sub: &str| {
        start_validator(validator_config(
            key_uri,
            &good,
            &tmp.path().join(sub),
            head,
        ))
    };
    let vb = stand_in("//Bob", "sub_b").await;
    let vc = stand_in("//Charlie", "sub_c").await;
    seed_axon(d, BOB, vb.port());
    seed_axon(d, charlie.ss58(), vc.port());
    bed.wait_for_phase(PhaseName::ValidatorCommit2, 1).await;
    let vc2 = vc2_text(&vhash, v_base);
    bed.commit_all(&[(&bob, vc2.clone()), (&charlie, vc2)])
        .await;

    // Round 1 (the scheduled download of cycle k+1): Bob answers 503 to everything, Charlie's
    // body stalls. Our hotkey is deregistered (its `Uids` entry is gone), so the chain refuses
    // its commitments (COMMIT1 fails on chain).
    vb.set_faults(Faults {
        fail_times: 1000,
        fail_status: 503,
        ..Default::default()
    });
    vc.set_faults(Faults {
        stall_after_bytes: Some(4096),
        ..Default::default()
    });
    d.set_storage(json!({"SubtensorModule": {"Uids": [[[NETUID, miner.ss58()], null]]}}))
        .expect("deregister the miner's hotkey");

    let quick = retry_policy(Duration::from_secs(1), 0, Duration::from_millis(100));
    let daemon = Daemon::start(&owner_api_cli(&run_dir, phase_url.clone()), quick).await;
    let mut client = daemon.client().await;
    // The daemon writes its control token as it starts.
    let token_path = run_dir.join("control/token");
    let start = Instant::now();
    let token = loop {
        match std::fs::read_to_string(&token_path) {
            Ok(t) if !t.trim().is_empty() => break t,
            _ => {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "no control token"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let bearer = format!("Bearer {}", token.trim());
    let vdir = run_dir.join("validator_checkpoint");
    let nothing_left = |what: &str| {
        let left = all_entries(&vdir);
        assert!(
            left.is_empty(),
            "{what}: validator_checkpoint/ holds {left:?}"
        );
    };
    let (pb_, pc_) = (
        format!("127.0.0.1:{}", vb.port()),
        format!("127.0.0.1:{}", vc.port()),
    );

    let c1 = k + 1;
    let r1 = final_job(&mut client, pb::JobKind::Download, c1).await;
    assert_failed_with(&r1, &[&pb_, "HTTP 503", &pc_, "no data for"]);
    assert_eq!(r1.attempts, 2, "both candidates tried: {r1:#?}");
    nothing_left("5xx / stall");

    // Round 2: Bob closes the connection mid-body; Charlie serves a file with another hash.
    vb.set_faults(Faults {
        close_after_bytes: Some(10_000),
        ..Default::default()
    });
    vc.set_faults(Faults {
        serve_file: Some(wrong.clone()),
        ..Default::default()
    });
    let r2 = load_baseline(&mut client, &bearer, Duration::from_secs(20)).await;
    assert_failed_with(&r2, &[&pb_, &pc_, "differs from the committed hash"]);
    // Depending on when the close lands, the client sees a short body or a closed connection.
    assert!(
        r2.error.contains("body ended after") || r2.error.contains("connection closed"),
        "{:?}",
        r2.error
    );
    nothing_left("closed mid-body / wrong hash");

    // Round 3: foreign keys from Bob, a NaN from Charlie.
    vb.set_faults(Faults {
        serve_file: Some(foreign.clone()),
        ..Default::default()
    });
    vc.set_faults(Faults {
        serve_file: Some(nan.clone()),
        ..Default::default()
    });
    let r3 = load_baseline(&mut client, &bearer, Duration::from_secs(20)).await;
    assert_failed_with(
        &r3,
        &[
            &pb_,
            "tensor model.layers.1.mlp.experts.0.down_proj is not a routed expert of expert group 0",
            &pc_,
            &format!("tensor {nan_name} holds NaN or infinite values"),
        ],
    );
    nothing_left("foreign keys / NaN");
    assert!(
        r1.started_block < r3.started_block || r1.id < r3.id,
        "records in order"
    );

    // COMMIT1 of cycle k+1 was refused by the chain (deregistered hotkey): a record with the
    // chain's reason, nothing committed.
    let mc1 = final_job(&mut client, pb::JobKind::Commit1, c1).await;
    assert!(
        mc1.outcome == pb::JobOutcome::Failed as i32
            || mc1.outcome == pb::JobOutcome::Missed as i32,
        "{mc1:#?}"
    );
    assert_eq!(mc1.model_hash, own_hash);
    assert!(mc1.included_block.is_none(), "{mc1:#?}");
    assert!(
        mc1.error.contains("AccountNotAllowedCommit"),
        "the record names why the chain refused: {:?}",
        mc1.error
    );
    let mc1_read = c1 * l + sched.phase_offset(PhaseName::MinerCommit1) + periods().commit_period;
    while bed.head_now() < mc1_read {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ours = bed
        .chain
        .commitments(NETUID, mc1_read)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.hotkey == miner.ss58())
        .and_then(|c| c.block);
    assert!(
        ours.is_none_or(|b| b < c1 * l),
        "no commitment of ours in cycle {c1}: {ours:?}"
    );

    // Round 4 (the scheduled download of cycle k+2): in cycle k+1 Charlie's `{"m"}` signs
    // another hash (a bad signature over the `h` it commits next) and Bob's `{"h"}` commitment
    // is garbage. Charlie is refused without a transfer; Bob's garbage is not a candidate.
    vb.set_faults(Faults::default());
    vc.set_faults(Faults::default());
    let v_next = c1 * l + sched.phase_offset(PhaseName::MinerCommit1);
    bed.wait_for_phase(PhaseName::ValidatorCommit1, 2).await;
    bed.commit_all(&[(&charlie, vc1_text(&charlie, &own_hash))])
        .await;
    bed.wait_for_phase(PhaseName::ValidatorCommit2, 1).await;
    let garbage = "{\"h\": not json at all \u{1}";
    bed.commit_all(&[
        (&bob, garbage.to_owned()),
        (&charlie, vc2_text(&vhash, v_next)),
    ])
    .await;
    let c2 = c1 + 1;
    let r4 = final_job(&mut client, pb::JobKind::Download, c2).await;
    assert_failed_with(
        &r4,
        &[
            &pc_,
            &format!(
                "signature of hotkey {} over hash {vhash} does not verify",
                charlie.ss58()
            ),
        ],
    );
    assert!(
        !r4.error.contains(&pb_),
        "Bob's garbage is no candidate: {r4:#?}"
    );
    assert_eq!(r4.attempts, 1, "{r4:#?}");
    nothing_left("bad signature / garbage commitment");
    assert_eq!(
        (vb.download_requests(), vc.download_requests()),
        (3, 3),
        "no transfer for a bad signature or a garbage commitment"
    );

    // Round 5: the phase API is down; a download cannot learn the previous phases.
    drop(phase_api);
    let r5 = load_baseline(&mut client, &bearer, Duration::from_secs(60)).await;
    assert_failed_with(&r5, &["previous phase blocks", &phase_url]);
    nothing_left("phase API down");
    assert_eq!(
        (vb.download_requests(), vc.download_requests()),
        (3, 3),
        "no validator was asked while the phase API was down"
    );

    daemon.stop().await;
    // The journal holds the same records.
    let journal = std::fs::read_to_string(run_dir.join("chainsync/jobs.jsonl")).unwrap();
    let recs = chainsync_svc::jobs::parse_journal(&journal, Path::new("jobs.jsonl")).unwrap();
    for j in [&r1, &r2, &r3, &r4, &r5, &mc1] {
        let r = recs
            .iter()
            .rev()
            .find(|r| r.id == j.id)
            .unwrap_or_else(|| panic!("job {} not in the journal", j.id));
        assert_eq!(r.error, j.error);
    }
    // The staging area is clean too.
    let stray: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp_") || n.starts_with(".trash_"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}
