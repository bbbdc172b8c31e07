//! Submission over `POST /submit-checkpoint` (spec §6.2) against a `ValidatorStandIn` that
//! runs the validator's checks (phase window, chain signature over h, file hash == h,
//! expert-group keys, signature over model_hex ‖ block_hex).

mod transport_support;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use chainsync_svc::transport::{
    Backoff, Peer, RetryPolicy, Submission, TransportError, http_client, submit_checkpoint,
};
use miner_contract::hash::ModelHash;
use miner_contract::shard::{ShardFormat, shard_file_name};
use miner_standins::{ChainCheckpointView, Faults, ValidatorStandIn};
use tokio::time::Instant;
use transport_support::*;

struct Setup {
    tmp: tempfile::TempDir,
    v: ValidatorStandIn,
    file: std::path::PathBuf,
    hash: ModelHash,
}

/// Our shard, committed on chain as (m signed by `signer`, h).
async fn setup(signer: &miner_keys::Hotkey) -> Setup {
    setup_as(signer, ShardFormat::Pt).await
}

/// Our shard in `format`, committed on chain as (m signed by `signer`, h).
async fn setup_as(signer: &miner_keys::Hotkey, format: ShardFormat) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join(shard_file_name(GROUP, format));
    let hash = miner_contract::shard::write_shard_tensors(&file, format, &expert_tensors(11))
        .expect("write shard");
    let chain = ChainCheckpointView {
        signed_model_hash: sign_hash(signer, &hash.to_hex()),
        model_hash: hash.to_hex(),
        expert_group: GROUP,
    };
    let v = validator(
        tmp.path(),
        StandInOpts {
            serve_file: None,
            chain: Some(chain),
            check_phase: true,
            block: Arc::new(AtomicU64::new(SUBMISSION_BLOCK)),
        },
    )
    .await;
    Setup { tmp, v, file, hash }
}

fn submission<'a>(s: &'a Setup, origin_block: u64) -> Submission<'a> {
    Submission {
        peer: Peer {
            ip: s.v.ip(),
            port: s.v.port(),
            hotkey_ss58: s.v.hotkey_ss58(),
        },
        file: &s.file,
        expert_group: GROUP,
        model_hash: s.hash,
        origin_block,
    }
}

#[tokio::test]
async fn success_is_verified_and_recorded_by_the_validator() {
    for format in ShardFormat::PREFERENCE {
        success_round(format).await;
    }
}

/// The shard is sent under its own name (`.safetensors` or `.pt`), the validator verifies and
/// stores it in that format.
async fn success_round(format: ShardFormat) {
    let s = setup_as(&miner_key(), format).await;
    let client = http_client().expect("client");
    let receipt = submit_checkpoint(
        &client,
        &miner_key(),
        &submission(&s, SUBMISSION_BLOCK),
        &fast_policy(0, 10_000),
        None,
    )
    .await
    .expect("submission accepted");
    assert_eq!(receipt.attempts, 1);
    assert_eq!(receipt.body["status"], "ok");
    let recs = s.v.submissions();
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.origin_hotkey_ss58, miner_key().ss58());
    assert_eq!(r.model_hex, s.hash.to_hex());
    assert_eq!(r.file_name, shard_file_name(GROUP, format));
    assert_eq!(
        ShardFormat::of_path(&r.stored_path),
        Some(format),
        "{}",
        r.stored_path.display()
    );
    assert_eq!(r.origin_block, SUBMISSION_BLOCK);
    // block_hex = validator pubkey ‖ u64_be(origin_block).
    let mut block = validator_key().public().to_vec();
    block.extend_from_slice(&SUBMISSION_BLOCK.to_be_bytes());
    assert_eq!(r.block_hex, hex::encode(block));
    assert_eq!(
        std::fs::read(&r.stored_path).expect("stored"),
        std::fs::read(&s.file).expect("ours")
    );
    assert_eq!(r.bytes, std::fs::metadata(&s.file).expect("meta").len());
}

#[tokio::test]
async fn unavailable_then_success() {
    let s = setup(&miner_key()).await;
    s.v.set_faults(Faults {
        fail_times: 1,
        fail_status: 503,
        ..Faults::default()
    });
    let receipt = submit_checkpoint(
        &http_client().expect("c"),
        &miner_key(),
        &submission(&s, SUBMISSION_BLOCK),
        &fast_policy(3, 10_000),
        None,
    )
    .await
    .expect("second attempt accepted");
    assert_eq!(receipt.attempts, 2);
    assert_eq!(s.v.submit_requests(), 2);
    assert_eq!(s.v.submissions().len(), 1);
}

#[tokio::test]
async fn bad_request_is_not_retried() {
    let s = setup(&miner_key()).await;
    // origin_block outside the current Submission phase → 400 from the validator.
    let err = submit_checkpoint(
        &http_client().expect("c"),
        &miner_key(),
        &submission(&s, SUBMISSION_BLOCK - 100),
        &fast_policy(3, 10_000),
        None,
    )
    .await
    .expect_err("refused");
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", s.v.port())),
        "{err}"
    );
    assert_eq!(s.v.submit_requests(), 1);
    assert!(s.v.submissions().is_empty());
}

#[tokio::test]
async fn chain_signature_by_another_key_fails_validation() {
    // The chain commit-1 signature is not by the submitting hotkey: the validator refuses (400).
    let s = setup(&validator_key()).await;
    let err = submit_checkpoint(
        &http_client().expect("c"),
        &miner_key(),
        &submission(&s, SUBMISSION_BLOCK),
        &fast_policy(3, 10_000),
        None,
    )
    .await
    .expect_err("refused");
    assert_eq!(err.status(), Some(400), "{err}");
    assert_eq!(s.v.submit_requests(), 1);
    let stored: Vec<_> = all_entries(&s.tmp.path().join("validator_submissions"));
    assert!(
        stored.is_empty(),
        "the validator deletes a failed submission: {stored:?}"
    );
}

#[tokio::test]
async fn retries_respect_the_deadline() {
    let s = setup(&miner_key()).await;
    s.v.set_faults(Faults {
        fail_times: 100,
        fail_status: 503,
        ..Faults::default()
    });
    // The reference policy: 60 s between attempts. With 10 s left, no second attempt (the margin
    // keeps the first attempt itself well inside the deadline on a loaded machine).
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    let err = submit_checkpoint(
        &http_client().expect("c"),
        &miner_key(),
        &submission(&s, SUBMISSION_BLOCK),
        &RetryPolicy::submit(),
        Some(deadline),
    )
    .await
    .expect_err("gives up");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(err, TransportError::Deadline { attempts: 1, .. }),
        "{err}"
    );
    assert_eq!(err.status(), Some(503));
    assert_eq!(s.v.submit_requests(), 1);
}

#[tokio::test]
async fn slow_validator_is_cut_off_at_the_deadline() {
    let s = setup(&miner_key()).await;
    s.v.set_faults(Faults {
        delay_response: Some(Duration::from_secs(30)),
        ..Faults::default()
    });
    let started = Instant::now();
    let policy = RetryPolicy {
        attempt_timeout: Duration::from_secs(300),
        retries: 3,
        backoff: Backoff::Fixed(Duration::from_secs(60)),
    };
    let err = submit_checkpoint(
        &http_client().expect("c"),
        &miner_key(),
        &submission(&s, SUBMISSION_BLOCK),
        &policy,
        Some(started + Duration::from_millis(800)),
    )
    .await
    .expect_err("cut off");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    assert!(matches!(err, TransportError::Deadline { .. }), "{err}");
}

#[tokio::test]
async fn outside_the_submission_phase_is_a_conflict_not_retried() {
    let s = setup(&miner_key()).await;
    // The validator's head is in Train (offset 100): 409, and 409 is never retried.
    let tmp = tempfile::tempdir().expect("tempdir");
    let chain = ChainCheckpointView {
        signed_model_hash: sign_hash(&miner_key(), &s.hash.to_hex()),
        model_hash: s.hash.to_hex(),
        expert_group: GROUP,
    };
    let v = validator(
        tmp.path(),
        StandInOpts {
            serve_file: None,
            chain: Some(chain),
            check_phase: true,
            block: Arc::new(AtomicU64::new(8_081_100)),
        },
    )
    .await;
    let sub = Submission {
        peer: Peer {
            ip: v.ip(),
            port: v.port(),
            hotkey_ss58: v.hotkey_ss58(),
        },
        file: &s.file,
        expert_group: GROUP,
        model_hash: s.hash,
        origin_block: 8_081_100,
    };
    let err = submit_checkpoint(
        &http_client().expect("c"),
        &miner_key(),
        &sub,
        &fast_policy(3, 10_000),
        None,
    )
    .await
    .expect_err("refused");
    assert_eq!(err.status(), Some(409), "{err}");
    assert_eq!(v.submit_requests(), 1);
}
