//! Download of the validator baseline over `GET /get-checkpoint` (spec §5.3, §7.7) against
//! a `ValidatorStandIn` on loopback: success publishes a verified checkpoint; every failure
//! is a typed error naming the peer and leaves nothing on disk.

mod transport_support;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use chainsync_svc::transport::verify::VerifyError;
use chainsync_svc::transport::{TransportError, download_checkpoint, http_client};
use miner_contract::RunDir;
use miner_standins::{Faults, ValidatorStandIn};
use tokio::time::Instant;
use transport_support::*;

struct Setup {
    _tmp: tempfile::TempDir,
    run: RunDir,
    v: ValidatorStandIn,
    hash: String,
    served: std::path::PathBuf,
}

async fn setup(tensors: std::collections::BTreeMap<String, miner_contract::pt::Tensor>) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let served = tmp.path().join("served_model_expgroup_0.pt");
    let hash = write_shard(&served, &tensors).to_hex();
    let run = RunDir::create(&tmp.path().join("run")).expect("run dir");
    let v = validator(
        tmp.path(),
        StandInOpts {
            serve_file: Some(served.clone()),
            chain: None,
            check_phase: false,
            block: Arc::new(AtomicU64::new(0)),
        },
    )
    .await;
    Setup {
        _tmp: tmp,
        run,
        v,
        hash,
        served,
    }
}

fn assert_nothing_left(s: &Setup) {
    let left = all_entries(&s.run.validator_dir());
    assert!(
        left.is_empty(),
        "validator_checkpoint/ must stay empty, found {left:?}"
    );
}

#[tokio::test]
async fn success_publishes_a_verified_checkpoint() {
    let s = setup(expert_tensors(1)).await;
    let cand = candidate(&s.v, &s.hash, sign_hash(&validator_key(), &s.hash));
    let client = http_client().expect("client");
    let published = download_checkpoint(
        &client,
        &s.run,
        &miner_key(),
        &cand,
        &group(),
        8_081_505,
        &fast_policy(0, 5000),
        None,
    )
    .await
    .expect("download succeeds");
    let file = published.path.join("model_expgroup_0.pt");
    assert_eq!(
        std::fs::read(&file).expect("published file"),
        std::fs::read(&s.served).expect("served file")
    );
    assert!(published.path.ends_with(format!(
        "uid_3_hotkey_{}_globalver_{GLOBAL_VER}",
        s.v.hotkey_ss58()
    )));
    let entry = s
        .run
        .best_validator()
        .expect("list")
        .expect("a validator checkpoint");
    assert!(
        entry.is_verified(),
        "published download must be marked verified"
    );
    // The stand-in saw a correctly signed request from us.
    let recs = s.v.downloads();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].status, 200);
    assert_eq!(recs[0].origin_hotkey_ss58, miner_key().ss58());
    assert_eq!(
        (recs[0].origin_block, recs[0].expert_group_id.as_str()),
        (8_081_505, "0")
    );
    // Only the published directory, no temporaries.
    let names: Vec<String> = std::fs::read_dir(s.run.validator_dir())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let s = setup(expert_tensors(2)).await;
    s.v.set_faults(Faults {
        fail_times: 2,
        fail_status: 503,
        ..Faults::default()
    });
    let cand = candidate(&s.v, &s.hash, sign_hash(&validator_key(), &s.hash));
    let client = http_client().expect("client");
    download_checkpoint(
        &client,
        &s.run,
        &miner_key(),
        &cand,
        &group(),
        1,
        &fast_policy(2, 5000),
        None,
    )
    .await
    .expect("third attempt succeeds");
    assert_eq!(s.v.download_requests(), 3);
}

#[tokio::test]
async fn stalled_body_times_out_and_leaves_nothing() {
    let s = setup(expert_tensors(3)).await;
    s.v.set_faults(Faults {
        stall_after_bytes: Some(1000),
        ..Faults::default()
    });
    let cand = candidate(&s.v, &s.hash, sign_hash(&validator_key(), &s.hash));
    let client = http_client().expect("client");
    let started = Instant::now();
    let err = download_checkpoint(
        &client,
        &s.run,
        &miner_key(),
        &cand,
        &group(),
        1,
        &fast_policy(1, 400),
        None,
    )
    .await
    .expect_err("stall must fail");
    assert!(started.elapsed() < Duration::from_secs(5));
    match &err {
        TransportError::Exhausted {
            attempts: 2,
            last,
            peer,
        } => {
            assert!(matches!(**last, TransportError::Timeout { .. }), "{err}");
            assert_eq!(peer, &format!("{}:{}", s.v.ip(), s.v.port()));
        }
        other => panic!("expected exhausted timeouts, got {other}"),
    }
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", s.v.port())),
        "{err}"
    );
    assert_nothing_left(&s);
}

#[tokio::test]
async fn connection_closed_mid_body_is_a_truncation() {
    let s = setup(expert_tensors(4)).await;
    s.v.set_faults(Faults {
        close_after_bytes: Some(3000),
        ..Faults::default()
    });
    let cand = candidate(&s.v, &s.hash, sign_hash(&validator_key(), &s.hash));
    let client = http_client().expect("client");
    let err = download_checkpoint(
        &client,
        &s.run,
        &miner_key(),
        &cand,
        &group(),
        1,
        &fast_policy(0, 5000),
        None,
    )
    .await
    .expect_err("must fail");
    match &err {
        TransportError::Exhausted { last, .. } => {
            assert!(
                matches!(
                    **last,
                    TransportError::Truncated { .. } | TransportError::Network { .. }
                ),
                "{err}"
            )
        }
        other => panic!("expected a truncated transfer, got {other}"),
    }
    assert_nothing_left(&s);
}

#[tokio::test]
async fn wrong_hash_is_rejected() {
    let s = setup(expert_tensors(5)).await;
    // The validator committed (and validly signed) the hash of a different model.
    let other = write_shard(&s.run.path().join("other.pt"), &expert_tensors(99)).to_hex();
    std::fs::remove_file(s.run.path().join("other.pt")).expect("rm");
    let cand = candidate(&s.v, &other, sign_hash(&validator_key(), &other));
    let client = http_client().expect("client");
    let err = download_checkpoint(
        &client,
        &s.run,
        &miner_key(),
        &cand,
        &group(),
        1,
        &fast_policy(0, 5000),
        None,
    )
    .await
    .expect_err("must fail");
    assert!(
        matches!(
            err,
            TransportError::Rejected {
                source: VerifyError::HashMismatch { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_nothing_left(&s);
}

#[tokio::test]
async fn bad_signature_is_rejected_without_downloading() {
    let s = setup(expert_tensors(6)).await;
    // Signed by someone else (the miner key), not by the validator hotkey.
    let cand = candidate(&s.v, &s.hash, sign_hash(&miner_key(), &s.hash));
    let client = http_client().expect("client");
    let err = download_checkpoint(
        &client,
        &s.run,
        &miner_key(),
        &cand,
        &group(),
        1,
        &fast_policy(0, 5000),
        None,
    )
    .await
    .expect_err("must fail");
    assert!(
        matches!(
            err,
            TransportError::Rejected {
                source: VerifyError::BadSignature { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        s.v.download_requests(),
        0,
        "no transfer for a candidate whose signature fails"
    );
    assert_nothing_left(&s);
}

#[tokio::test]
async fn foreign_keys_are_rejected() {
    let mut t = expert_tensors(7);
    let extra = t.values().next().cloned().expect("a tensor");
    t.insert("model.layers.1.mlp.experts.0.down_proj".into(), extra); // expert 0 is not in group 0 for layer 1
    let s = setup(t).await;
    let cand = candidate(&s.v, &s.hash, sign_hash(&validator_key(), &s.hash));
    let client = http_client().expect("client");
    let err = download_checkpoint(
        &client,
        &s.run,
        &miner_key(),
        &cand,
        &group(),
        1,
        &fast_policy(0, 5000),
        None,
    )
    .await
    .expect_err("must fail");
    match &err {
        TransportError::Rejected {
            source: VerifyError::ForeignKey { name, group: 0 },
            ..
        } => {
            assert_eq!(name, "model.layers.1.mlp.experts.0.down_proj")
        }
        other => panic!("expected a foreign-key rejection, got {other}"),
    }
    assert_nothing_left(&s);
}

#[tokio::test]
async fn forbidden_is_not_retried() {
    let s = setup(expert_tensors(8)).await;
    s.v.set_faults(Faults {
        fail_times: 5,
        fail_status: 403,
        ..Faults::default()
    });
    let cand = candidate(&s.v, &s.hash, sign_hash(&validator_key(), &s.hash));
    let client = http_client().expect("client");
    let err = download_checkpoint(
        &client,
        &s.run,
        &miner_key(),
        &cand,
        &group(),
        1,
        &fast_policy(5, 5000),
        None,
    )
    .await
    .expect_err("must fail");
    assert_eq!(err.status(), Some(403), "{err}");
    assert_eq!(s.v.download_requests(), 1);
    assert_nothing_left(&s);
}

#[tokio::test]
async fn retries_stop_at_the_deadline() {
    let s = setup(expert_tensors(9)).await;
    s.v.set_faults(Faults {
        fail_times: 1000,
        fail_status: 503,
        ..Faults::default()
    });
    let cand = candidate(&s.v, &s.hash, sign_hash(&validator_key(), &s.hash));
    let client = http_client().expect("client");
    let policy = chainsync_svc::transport::RetryPolicy {
        attempt_timeout: Duration::from_secs(30),
        retries: 100,
        backoff: chainsync_svc::transport::Backoff::Fixed(Duration::from_millis(300)),
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(1);
    let err = download_checkpoint(
        &client,
        &s.run,
        &miner_key(),
        &cand,
        &group(),
        1,
        &policy,
        Some(deadline),
    )
    .await
    .expect_err("must fail");
    assert!(
        started.elapsed() <= Duration::from_millis(1200),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, TransportError::Deadline { .. }), "{err}");
    assert_eq!(err.status(), Some(503));
    assert_nothing_left(&s);
}

#[tokio::test]
async fn no_checkpoint_on_the_validator_is_503() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = RunDir::create(&tmp.path().join("run")).expect("run dir");
    let v = validator(
        tmp.path(),
        StandInOpts {
            serve_file: None,
            chain: None,
            check_phase: false,
            block: Arc::new(AtomicU64::new(0)),
        },
    )
    .await;
    let h = "dd252182c01da6b0e8485ce0669cb0a2189e3d3758e43873";
    let cand = candidate(&v, h, sign_hash(&validator_key(), h));
    let err = download_checkpoint(
        &http_client().expect("c"),
        &run,
        &miner_key(),
        &cand,
        &group(),
        1,
        &fast_policy(1, 5000),
        None,
    )
    .await
    .expect_err("must fail");
    assert_eq!(err.status(), Some(503), "{err}");
    assert_eq!(v.download_requests(), 2, "503 is retried");
    assert!(all_entries(&run.validator_dir()).is_empty());
}

#[tokio::test]
async fn request_for_another_validator_is_refused_by_the_server() {
    let s = setup(expert_tensors(10)).await;
    // The chain says this axon belongs to Charlie (validly signed by Charlie); the server
    // behind it is Alice's, so our request targets the wrong hotkey: 403, not retried.
    let charlie = miner_keys::Hotkey::from_uri("//Charlie").expect("dev key");
    let mut cand = candidate(&s.v, &s.hash, sign_hash(&charlie, &s.hash));
    cand.hotkey = charlie.ss58().to_owned();
    let client = http_client().expect("client");
    let err = download_checkpoint(
        &client,
        &s.run,
        &miner_key(),
        &cand,
        &group(),
        1,
        &fast_policy(3, 5000),
        None,
    )
    .await
    .expect_err("must fail");
    assert_eq!(err.status(), Some(403), "{err}");
    assert_eq!(s.v.download_requests(), 1);
    assert_eq!(s.v.downloads()[0].target_hotkey_ss58, charlie.ss58());
    assert_nothing_left(&s);
}
