//! Download of the validator baseline over `GET /get-checkpoint` (spec §5.3, §7.7) against
//! a `ValidatorStandIn` on loopback: success publishes a verified checkpoint; every failure
//! is a typed error naming the peer and leaves nothing on disk.

mod transport_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use chainsync_svc::commitment::ChainCheckpoint;
use chainsync_svc::transport::verify::VerifyError;
use chainsync_svc::transport::{
    Backoff, RetryPolicy, TransportError, download_checkpoint, http_client,
};
use miner_contract::pt::{DType, Tensor};
use miner_contract::shard::{ShardFormat, shard_file_name};
use miner_contract::{Published, RunDir};
use miner_keys::Hotkey;
use miner_standins::{Faults, ValidatorStandIn};
use tokio::time::Instant;
use transport_support::*;

/// A tensor of expert 0, which is not in group 0 for layer 1.
const FOREIGN: &str = "model.layers.1.mlp.experts.0.down_proj";

struct Setup {
    _tmp: tempfile::TempDir,
    run: RunDir,
    v: ValidatorStandIn,
    hash: String,
    served: PathBuf,
    format: ShardFormat,
}

/// A validator stand-in (//Alice) serving `serve_file`, not checking phases.
async fn stand_in(dir: &Path, serve_file: Option<PathBuf>) -> ValidatorStandIn {
    validator(
        dir,
        StandInOpts {
            serve_file,
            chain: None,
            check_phase: false,
            block: Arc::new(AtomicU64::new(0)),
        },
    )
    .await
}

async fn setup(tensors: BTreeMap<String, Tensor>) -> Setup {
    setup_as(tensors, ShardFormat::Pt).await
}

/// The stand-in serves `tensors` as a shard in `format` (the route names no file: the miner
/// tells the format from the bytes).
async fn setup_as(tensors: BTreeMap<String, Tensor>, format: ShardFormat) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let served = tmp.path().join(format!("served_model_expgroup_0.{format}"));
    let hash = miner_contract::shard::write_shard_tensors(&served, format, &tensors)
        .expect("write shard")
        .to_hex();
    let run = RunDir::create(&tmp.path().join("run")).expect("run dir");
    let v = stand_in(tmp.path(), Some(served.clone())).await;
    Setup {
        _tmp: tmp,
        run,
        v,
        hash,
        served,
        format,
    }
}

/// `download_checkpoint` as the miner for group 0, with origin block `block`.
async fn download(
    run: &RunDir,
    cand: &ChainCheckpoint,
    block: u64,
    policy: &RetryPolicy,
    deadline: Option<Instant>,
) -> Result<Published, TransportError> {
    let client = http_client().expect("client");
    download_checkpoint(
        &client,
        run,
        &miner_key(),
        cand,
        &group(),
        block,
        policy,
        deadline,
    )
    .await
}

impl Setup {
    /// The served checkpoint as the chain announces it, its hash signed by `signer`.
    fn candidate_signed_by(&self, signer: &Hotkey) -> ChainCheckpoint {
        candidate(&self.v, &self.hash, sign_hash(signer, &self.hash))
    }

    /// The served checkpoint as the chain announces it, validly signed by the validator.
    fn candidate(&self) -> ChainCheckpoint {
        self.candidate_signed_by(&validator_key())
    }

    /// Downloads `cand` (origin block 1, no deadline).
    async fn fetch(
        &self,
        cand: &ChainCheckpoint,
        policy: &RetryPolicy,
    ) -> Result<Published, TransportError> {
        download(&self.run, cand, 1, policy, None).await
    }
}

fn assert_nothing_left(s: &Setup) {
    let left = all_entries(&s.run.validator_dir());
    assert!(
        left.is_empty(),
        "validator_checkpoint/ must stay empty, found {left:?}"
    );
}

/// The published file is the served one, and the run lists it as a verified validator checkpoint.
fn assert_published_intact(s: &Setup, published: &Published) {
    let file = published.path.join(shard_file_name(0, s.format));
    assert_eq!(
        std::fs::read(&file).expect("published file"),
        std::fs::read(&s.served).expect("served file")
    );
    let entry = s
        .run
        .best_validator()
        .expect("list")
        .expect("a validator checkpoint");
    assert!(
        entry.is_verified(),
        "published download must be marked verified"
    );
    assert_eq!(entry.model_format(), Some(s.format));
    assert_eq!(entry.model_path(), Some(file));
}

/// `t` plus a copy of its first tensor under the name [`FOREIGN`].
fn with_foreign_key(mut t: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let extra = t.values().next().cloned().expect("a tensor");
    t.insert(FOREIGN.into(), extra);
    t
}

fn assert_foreign_key(err: &TransportError) {
    match err {
        TransportError::Rejected {
            source: VerifyError::ForeignKey { name, group: 0 },
            ..
        } => assert_eq!(name, FOREIGN),
        other => panic!("expected a foreign-key rejection, got {other}"),
    }
}

#[tokio::test]
async fn success_publishes_a_verified_checkpoint() {
    let s = setup(expert_tensors(1)).await;
    let published = download(
        &s.run,
        &s.candidate(),
        8_081_505,
        &fast_policy(0, 5000),
        None,
    )
    .await
    .expect("download succeeds");
    assert_published_intact(&s, &published);
    assert!(published.path.ends_with(format!(
        "uid_3_hotkey_{}_globalver_{GLOBAL_VER}",
        s.v.hotkey_ss58()
    )));
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
    s.fetch(&s.candidate(), &fast_policy(2, 5000))
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
    let started = Instant::now();
    let err = s
        .fetch(&s.candidate(), &fast_policy(1, 400))
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
    let err = s
        .fetch(&s.candidate(), &fast_policy(0, 5000))
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
    let err = s
        .fetch(&cand, &fast_policy(0, 5000))
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
    let cand = s.candidate_signed_by(&miner_key());
    let err = s
        .fetch(&cand, &fast_policy(0, 5000))
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
    let s = setup(with_foreign_key(expert_tensors(7))).await;
    let err = s
        .fetch(&s.candidate(), &fast_policy(0, 5000))
        .await
        .expect_err("must fail");
    assert_foreign_key(&err);
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
    let err = s
        .fetch(&s.candidate(), &fast_policy(5, 5000))
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
    let policy = RetryPolicy {
        attempt_timeout: Duration::from_secs(30),
        retries: 100,
        backoff: Backoff::Fixed(Duration::from_millis(300)),
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(1);
    let err = download(&s.run, &s.candidate(), 1, &policy, Some(deadline))
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
    let v = stand_in(tmp.path(), None).await;
    let h = "dd252182c01da6b0e8485ce0669cb0a2189e3d3758e43873";
    let cand = candidate(&v, h, sign_hash(&validator_key(), h));
    let err = download(&run, &cand, 1, &fast_policy(1, 5000), None)
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
    let charlie = Hotkey::from_uri("//Charlie").expect("dev key");
    let mut cand = s.candidate_signed_by(&charlie);
    cand.hotkey = charlie.ss58().to_owned();
    let err = s
        .fetch(&cand, &fast_policy(3, 5000))
        .await
        .expect_err("must fail");
    assert_eq!(err.status(), Some(403), "{err}");
    assert_eq!(s.v.download_requests(), 1);
    assert_eq!(s.v.downloads()[0].target_hotkey_ss58, charlie.ss58());
    assert_nothing_left(&s);
}

/// A shard whose `gate_up_proj` tensors together hold `extra_mib` MiB of finite data (each
/// within a routed expert's largest shape, `[2816, 2048]`), so a stall placed after the first
/// MiB leaves most of the file unsent.
fn big_tensors(seed: u16, extra_mib: usize) -> BTreeMap<String, Tensor> {
    let mut t = expert_tensors(seed);
    let rows = extra_mib * 512 / 3;
    for e in [17, 22, 44] {
        let big = Tensor {
            dtype: DType::F16,
            shape: vec![rows, 1024],
            data: (0..rows * 1024)
                .flat_map(|i| (0x3000u16 | ((i + e) as u16 & 0x3FF)).to_le_bytes())
                .collect(),
        };
        t.insert(format!("model.layers.1.mlp.experts.{e}.gate_up_proj"), big);
    }
    t
}

/// Serves `tensors` but stalls after the first MiB (the tensor list is at the front): the
/// download must be refused from the part that arrived, without waiting for the stalled rest
/// (20 s idle timeout) and without a retry, leaving nothing. Returns the refusal.
async fn refused_while_streaming(
    tensors: BTreeMap<String, Tensor>,
    format: ShardFormat,
) -> TransportError {
    let s = setup_as(tensors, format).await;
    s.v.set_faults(Faults {
        stall_after_bytes: Some(1 << 20),
        ..Faults::default()
    });
    let started = Instant::now();
    let err = s
        .fetch(&s.candidate(), &fast_policy(1, 20_000))
        .await
        .expect_err("must fail");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(s.v.download_requests(), 1, "a refusal is not retried");
    assert_nothing_left(&s);
    err
}

#[tokio::test]
async fn foreign_keys_are_refused_while_the_file_still_arrives() {
    for format in ShardFormat::PREFERENCE {
        let err = refused_while_streaming(with_foreign_key(big_tensors(11, 8)), format).await;
        assert_foreign_key(&err);
    }
}

#[tokio::test]
async fn non_finite_values_are_refused_while_the_file_still_arrives() {
    let mut t = big_tensors(12, 8);
    // A NaN in the first tensor in sorted order.
    let first = t.values_mut().next().expect("a tensor");
    first.data[2..4].copy_from_slice(&0x7E00u16.to_le_bytes());
    let name = t.keys().next().cloned().expect("a name");
    for format in ShardFormat::PREFERENCE {
        match &refused_while_streaming(t.clone(), format).await {
            TransportError::Rejected {
                source: VerifyError::NonFinite { name: n },
                ..
            } => assert_eq!(n, &name),
            other => panic!("expected a non-finite rejection, got {other}"),
        }
    }
}

#[tokio::test]
async fn a_large_file_is_verified_while_streaming_and_published_intact() {
    for format in ShardFormat::PREFERENCE {
        large_file_round(format).await;
    }
}

async fn large_file_round(format: ShardFormat) {
    let s = setup_as(big_tensors(13, 24), format).await;
    let published = s
        .fetch(&s.candidate(), &fast_policy(0, 20_000))
        .await
        .expect("download succeeds");
    assert_published_intact(&s, &published);
    let file = published.path.join(shard_file_name(0, format));
    assert_eq!(
        miner_contract::shard::hash_shard_file(&file)
            .unwrap()
            .to_hex(),
        s.hash
    );
    let m = s
        .run
        .best_validator()
        .unwrap()
        .expect("a validator checkpoint");
    assert_eq!(m.manifest.as_ref().unwrap().model_hash.to_hex(), s.hash);
}

#[tokio::test]
async fn a_safetensors_baseline_publishes_as_model_expgroup_safetensors() {
    let s = setup_as(expert_tensors(21), ShardFormat::Safetensors).await;
    let published = s
        .fetch(&s.candidate(), &fast_policy(0, 5000))
        .await
        .expect("download succeeds");
    assert_published_intact(&s, &published);
    let names: Vec<String> = std::fs::read_dir(&published.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.contains(&"model_expgroup_0.safetensors".to_string())
            && !names
                .iter()
                .any(|n| n.ends_with(".pt") || n.ends_with(".download")),
        "{names:?}"
    );
}

/// Refused content in the safetensors format: a dtype the model does not use, junk after the
/// last tensor, a file that is neither format. Each is refused (not retried), nothing is left.
#[tokio::test]
async fn bad_safetensors_content_is_refused_and_leaves_nothing() {
    let mut ints = expert_tensors(22);
    let (name, t) = ints.iter_mut().next().expect("a tensor");
    let name = name.clone();
    *t = Tensor {
        dtype: DType::I64,
        shape: vec![2],
        data: vec![0; 16],
    };
    let s = setup_as(ints, ShardFormat::Safetensors).await;
    let err = s
        .fetch(&s.candidate(), &fast_policy(1, 5000))
        .await
        .expect_err("an int64 expert tensor");
    let msg = err.to_string();
    assert!(
        matches!(
            &err,
            TransportError::Rejected {
                source: VerifyError::Unexpected(_),
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains(&name) && msg.contains("int64"), "{msg}");
    assert_eq!(s.v.download_requests(), 1, "a refusal is not retried");
    assert_nothing_left(&s);

    for (what, tail) in [("junk", &b"junk"[..]), ("text", &b""[..])] {
        let s = setup_as(expert_tensors(23), ShardFormat::Safetensors).await;
        let bytes = if what == "text" {
            b"hello, this is not a checkpoint at all".to_vec()
        } else {
            [std::fs::read(&s.served).unwrap(), tail.to_vec()].concat()
        };
        std::fs::write(&s.served, &bytes).unwrap();
        let err = s
            .fetch(&s.candidate(), &fast_policy(1, 5000))
            .await
            .expect_err(what);
        let msg = err.to_string();
        assert!(
            matches!(
                &err,
                TransportError::Rejected {
                    source: VerifyError::File(_),
                    ..
                }
            ),
            "{what}: {msg}"
        );
        assert!(!msg.contains('\n'), "{what}: {msg}");
        assert_eq!(s.v.download_requests(), 1, "{what}: not retried");
        assert_nothing_left(&s);
    }
}
