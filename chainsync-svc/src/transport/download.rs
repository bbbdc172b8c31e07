//! `GET http://{ip}:{port}/get-checkpoint` (spec §5.3): download a validator's expert-group
//! shard into a staged directory, verify it (§7.7) and publish it as a verified validator
//! checkpoint. A failed candidate leaves nothing behind: the staged directory is removed
//! when its [`Staged`] guard drops.

use std::path::{Path, PathBuf};
use std::time::Duration;

use miner_contract::layout::model_file_name;
use miner_contract::{ExpertGroup, PublishInfo, Published, RunDir, Staged};
use miner_keys::Hotkey;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::retry::{AttemptError, RetryError, RetryPolicy, is_non_retryable, retry};
use super::verify::{VerifyError, verify_checkpoint_file, verify_hash_signature};
use super::{Peer, TransportError, block_message};
use crate::commitment::{ChainCheckpoint, axon_is_served};

/// Time left until `deadline`, capped at `limit`; zero when passed.
fn clip(limit: Duration, deadline: Option<Instant>) -> Duration {
    match deadline {
        Some(d) => limit.min(d.saturating_duration_since(Instant::now())),
        None => limit,
    }
}

/// Downloads `candidate`'s `model_expgroup_<gid>.pt` from the validator's axon, signed by our
/// hotkey at `origin_block`, and publishes it under `validator_checkpoint/` once verified.
///
/// `policy.attempt_timeout` is the longest the transfer may go without receiving data (the
/// reference's 30 s requests timeout); retries never start or sleep past `deadline`.
// Each argument is a distinct collaborator the caller already holds; a wrapper struct would
// only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn download_checkpoint(
    client: &reqwest::Client,
    run: &RunDir,
    key: &Hotkey,
    candidate: &ChainCheckpoint,
    group: &ExpertGroup,
    origin_block: u64,
    policy: &RetryPolicy,
    deadline: Option<Instant>,
) -> Result<Published, TransportError> {
    let peer = Peer {
        ip: candidate.axon_ip.clone(),
        port: candidate.axon_port,
        hotkey_ss58: candidate.hotkey.clone(),
    };
    let p = peer.to_string();
    let rejected = |source: VerifyError| TransportError::Rejected {
        peer: p.clone(),
        source,
    };
    if !axon_is_served(&peer.ip, peer.port) {
        return Err(TransportError::Invalid {
            peer: p.clone(),
            reason: "validator serves no axon".into(),
        });
    }
    if candidate.expert_group != group.group_id {
        return Err(rejected(VerifyError::WrongGroup {
            committed: candidate.expert_group,
            ours: group.group_id,
        }));
    }
    // Cheap checks on chain data first: no transfer for a candidate that cannot verify.
    verify_hash_signature(
        &candidate.hotkey,
        &candidate.model_hash,
        &candidate.signed_model_hash,
    )
    .map_err(rejected)?;
    let target_pub =
        miner_keys::ss58_decode(&candidate.hotkey).map_err(|e| TransportError::Invalid {
            peer: p.clone(),
            reason: format!("validator hotkey: {e}"),
        })?;
    let signature =
        miner_keys::b64url_nopad_encode(&key.sign(&block_message(&target_pub, origin_block)));
    let form: Vec<(&str, String)> = vec![
        ("target_hotkey_ss58", candidate.hotkey.clone()),
        ("origin_hotkey_ss58", key.ss58().to_owned()),
        ("expert_group_id", group.group_id.to_string()),
        ("origin_block", origin_block.to_string()),
        ("signature", signature),
    ];

    let local = |path: &Path, reason: String| TransportError::Local {
        peer: p.clone(),
        path: path.display().to_string(),
        reason,
    };
    let staged: Staged = run
        .stage_validator(candidate.uid, &candidate.hotkey, candidate.global_ver)
        .map_err(|e| local(run.validator_dir().as_path(), e.to_string()))?;
    let file_path = staged.path().join(model_file_name(group.group_id));
    let url = format!("{}/get-checkpoint", peer.base_url());

    let outcome = retry(policy, deadline, |_attempt, idle| {
        let req = client.get(&url).form(&form);
        let file_path = file_path.clone();
        let p = p.clone();
        async move { fetch_once(req, &file_path, &p, idle, deadline).await }
    })
    .await;
    if let Err(e) = outcome {
        return Err(match e {
            RetryError::Fatal { error, .. } => error,
            RetryError::Exhausted { attempts, last } => TransportError::Exhausted {
                peer: p.clone(),
                attempts,
                last: Box::new(last),
            },
            RetryError::Deadline { attempts, last } => TransportError::Deadline {
                peer: p.clone(),
                attempts,
                last: last.map(Box::new),
            },
        });
    }

    // Verify (one read of the file, off the async threads), then publish; dropping `staged`
    // on any failure removes the directory.
    let expected = candidate.model_hash.clone();
    let signed = candidate.signed_model_hash.clone();
    let gid = group.group_id;
    let group = group.clone();
    let joined =
        tokio::task::spawn_blocking(move || -> Result<Published, Result<VerifyError, String>> {
            let hash = verify_checkpoint_file(&file_path, &expected, &group).map_err(Ok)?;
            staged
                .publish(PublishInfo::verified_download(gid, hash, signed))
                .map_err(|e| Err(e.to_string()))
        })
        .await
        .map_err(|e| local(&PathBuf::from(&url), format!("verifier task failed: {e}")))?;
    joined.map_err(|e| match e {
        Ok(v) => rejected(v),
        Err(reason) => local(run.validator_dir().as_path(), reason),
    })
}

/// One attempt: request, stream the body to `file_path` (truncating any earlier attempt),
/// fsync. Never waits longer than `idle` for the next piece of data.
async fn fetch_once(
    req: reqwest::RequestBuilder,
    file_path: &Path,
    peer: &str,
    idle: Duration,
    deadline: Option<Instant>,
) -> Result<u64, AttemptError<TransportError>> {
    let retryable = AttemptError::Retryable;
    let timeout = |what: &'static str| TransportError::Timeout {
        peer: peer.to_owned(),
        what,
        after: idle,
    };
    let net = |e: reqwest::Error| TransportError::Network {
        peer: peer.to_owned(),
        reason: error_chain(&e),
    };
    let resp = tokio::time::timeout(idle, req.send())
        .await
        .map_err(|_| retryable(timeout("waiting for response headers")))?
        .map_err(|e| retryable(net(e)))?;
    let status = resp.status().as_u16();
    if !resp.status().is_success() {
        let body = tokio::time::timeout(idle, resp.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let err = TransportError::Status {
            peer: peer.to_owned(),
            status,
            body: body.chars().take(200).collect(),
        };
        return Err(if is_non_retryable(status) {
            AttemptError::Fatal(err)
        } else {
            retryable(err)
        });
    }
    let expected = resp.content_length();
    let local = |e: std::io::Error| {
        AttemptError::Fatal(TransportError::Local {
            peer: peer.to_owned(),
            path: file_path.display().to_string(),
            reason: e.to_string(),
        })
    };
    let file = tokio::fs::File::create(file_path).await.map_err(local)?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut resp = resp;
    let mut got = 0u64;
    loop {
        let wait = clip(idle, deadline);
        if wait.is_zero() {
            return Err(retryable(timeout("deadline reached mid-body")));
        }
        let chunk = tokio::time::timeout(wait, resp.chunk())
            .await
            .map_err(|_| retryable(timeout("waiting for body data")))?;
        match chunk {
            Ok(Some(bytes)) => {
                got += bytes.len() as u64;
                out.write_all(&bytes).await.map_err(local)?;
            }
            Ok(None) => break,
            Err(e) => {
                return Err(retryable(match expected {
                    Some(n) if got < n => TransportError::Truncated {
                        peer: peer.to_owned(),
                        got,
                        expected: n,
                    },
                    _ => net(e),
                }));
            }
        }
    }
    if let Some(n) = expected
        && got != n
    {
        return Err(retryable(TransportError::Truncated {
            peer: peer.to_owned(),
            got,
            expected: n,
        }));
    }
    out.flush().await.map_err(local)?;
    out.get_ref().sync_all().await.map_err(local)?;
    Ok(got)
}

/// An error with its sources, on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
