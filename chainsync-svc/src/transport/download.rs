//! `GET http://{ip}:{port}/get-checkpoint` (spec §5.3): download a validator's expert-group
//! shard into a staged directory, verify it (§7.7) while it arrives and publish it as a
//! verified validator checkpoint. A failed candidate leaves nothing behind: the staged
//! directory is removed when its [`Staged`] guard drops.
//!
//! Three parties per attempt: the async task receives the body and hands the pieces to a
//! writer thread, which appends them to the staged file and tells a verifier thread how far
//! the file is written; the verifier ([`DownloadVerifier`]: `.safetensors` or `.pt`, told by the
//! file's first bytes) checks the keys as soon as the tensor
//! list is in, and hashes and checks each tensor once its bytes are on disk, so after the last
//! byte only the rest of the last tensors remains. A refusal stops the transfer at once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use miner_contract::hash::ModelHash;
use miner_contract::shard::shard_file_name;
use miner_contract::{ExpertGroup, PublishInfo, Published, RunDir, Staged};
use miner_keys::Hotkey;
use tokio::time::Instant;
use tracing::Instrument;

use super::retry::{AttemptError, RetryError, RetryPolicy, is_non_retryable, retry};
use super::verify::{DownloadVerifier, VerifyError, check_hash, sniff_file, verify_hash_signature};
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
    // The route names no file: the shard's format (and so its name) is known once its first
    // bytes are in; it is renamed to `model_expgroup_<gid>.<ext>` after verification.
    let file_path = staged
        .path()
        .join(format!("model_expgroup_{}.download", group.group_id));
    let url = format!("{}/get-checkpoint", peer.base_url());

    let expected = super::verify::parse_committed_hash(&candidate.model_hash).map_err(rejected)?;
    let outcome = retry(policy, deadline, |attempt, idle| {
        let req = client.get(&url).form(&form);
        let file_path = file_path.clone();
        let p = p.clone();
        let group = group.clone();
        let span = super::http_span("GET", "/get-checkpoint", &url, attempt);
        async move {
            let r = fetch_once(req, &file_path, &p, idle, deadline, group, expected).await;
            super::record_attempt(&r);
            r
        }
        .instrument(span)
    })
    .await;
    let hash = match outcome {
        Ok(hash) => hash,
        Err(RetryError::Fatal { error, .. }) => return Err(error),
        Err(RetryError::Exhausted { attempts, last }) => {
            return Err(TransportError::Exhausted {
                peer: p.clone(),
                attempts,
                last: Box::new(last),
            });
        }
        Err(RetryError::Deadline { attempts, last }) => {
            return Err(TransportError::Deadline {
                peer: p.clone(),
                attempts,
                last: last.map(Box::new),
            });
        }
    };

    // Verified while it arrived: name it by its format, publish (fsyncs, manifest, rename) off
    // the async threads. Dropping `staged` on any failure removes the directory.
    let signed = candidate.signed_model_hash.clone();
    let gid = group.group_id;
    tokio::task::spawn_blocking(move || {
        let format = sniff_file(&file_path).map_err(|e| e.to_string())?;
        let named = file_path.with_file_name(shard_file_name(gid, format));
        std::fs::rename(&file_path, &named).map_err(|e| format!("rename: {e}"))?;
        staged
            .publish(PublishInfo::verified_download(gid, hash, signed))
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| local(&PathBuf::from(&url), format!("publish task failed: {e}")))?
    .map_err(|reason| local(run.validator_dir().as_path(), reason))
}

/// How far the writer thread has written the file, shared with the verifier thread.
#[derive(Default)]
struct Progress {
    state: Mutex<Written>,
    changed: Condvar,
}

#[derive(Default, Clone, Copy)]
struct Written {
    bytes: u64,
    /// The whole body is in the file.
    complete: bool,
    /// The attempt ended without a complete body: stop.
    aborted: bool,
}

impl Progress {
    fn update(&self, f: impl FnOnce(&mut Written)) {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut w);
        self.changed.notify_all();
    }

    /// Waits until more than `seen` bytes are written or the attempt ends.
    fn wait_beyond(&self, seen: u64) -> Written {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while w.bytes <= seen && !w.complete && !w.aborted {
            w = self.changed.wait(w).unwrap_or_else(|e| e.into_inner());
        }
        *w
    }
}

/// What the network side hands to the writer thread.
enum Piece {
    /// The next bytes of the body (about [`SEND_BATCH`]; network chunks are gathered first so
    /// the threads are woken a few thousand times per GiB, not once per packet).
    Data(Vec<u8>),
    /// The body is complete.
    End,
}

/// Bytes gathered from the network before they go to the writer thread.
const SEND_BATCH: usize = 256 << 10;
/// Pieces in flight between the network and the writer (bounds the memory: 4 MiB).
const PIECES_IN_FLIGHT: usize = 16;
/// Most bytes the verifier takes before it looks whether the attempt was abandoned.
const VERIFY_STEP: u64 = 64 << 20;

/// The writer thread: appends the body to `file` as it arrives and publishes how far it got;
/// on [`Piece::End`] marks the file complete, then fsyncs it. Returns the length.
fn write_body(
    mut file: std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<Piece>,
    progress: &Progress,
) -> std::io::Result<u64> {
    let mut written = 0u64;
    let result = (|| {
        while let Some(piece) = rx.blocking_recv() {
            match piece {
                Piece::Data(b) => {
                    file.write_all(&b)?;
                    written += b.len() as u64;
                    progress.update(|w| w.bytes = written);
                }
                Piece::End => {
                    progress.update(|w| w.complete = true);
                    file.sync_all()?;
                    return Ok(written);
                }
            }
        }
        Err(std::io::Error::other("transfer abandoned"))
    })();
    if result.is_err() {
        progress.update(|w| w.aborted = true);
    }
    result
}

/// The verifier thread: follows the file as the writer extends it (keys checked as soon as the
/// tensor list is in, each tensor hashed and checked for finiteness once its bytes are there)
/// and finishes when the file is complete. `Ok(None)`: the attempt was abandoned.
fn verify_body(
    path: &Path,
    group: ExpertGroup,
    expected: ModelHash,
    progress: &Progress,
) -> Result<Option<ModelHash>, VerifyError> {
    let mut follower = DownloadVerifier::new(path, group, None)?;
    let mut seen = 0u64;
    loop {
        let w = progress.wait_beyond(seen);
        if w.aborted {
            return Ok(None);
        }
        if w.complete {
            let (followed, _format) = follower.finish(w.bytes)?;
            tracing::debug!(
                streamed = followed.streamed,
                hashed_at_finish = followed.hashed_at_finish,
                "downloaded checkpoint verified"
            );
            return check_hash(&followed, &expected).map(Some);
        }
        seen = w.bytes.min(seen + VERIFY_STEP);
        follower.advance(seen)?;
    }
}

/// One attempt: request, stream the body to `file_path` (truncating any earlier attempt) on a
/// writer thread while a verifier thread checks and hashes what is written, fsync. Never waits
/// longer than `idle` for the next piece of data. Returns the verified model hash.
async fn fetch_once(
    req: reqwest::RequestBuilder,
    file_path: &Path,
    peer: &str,
    idle: Duration,
    deadline: Option<Instant>,
    group: ExpertGroup,
    expected: ModelHash,
) -> Result<ModelHash, AttemptError<TransportError>> {
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
    tracing::Span::current().record("http.response.status_code", status);
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
    let expected_len = resp.content_length();
    let local = |reason: String| {
        AttemptError::Fatal(TransportError::Local {
            peer: peer.to_owned(),
            path: file_path.display().to_string(),
            reason,
        })
    };
    let file = tokio::fs::File::create(file_path)
        .await
        .map_err(|e| local(e.to_string()))?
        .into_std()
        .await;

    let progress = Arc::new(Progress::default());
    let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(PIECES_IN_FLIGHT);
    let mut writer = {
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || write_body(file, rx, &progress))
    };
    let mut verifier = {
        let progress = progress.clone();
        let path = file_path.to_path_buf();
        tokio::task::spawn_blocking(move || verify_body(&path, group, expected, &progress))
    };

    let received = receive_body(resp, &tx, &mut verifier, peer, idle, deadline, expected_len).await;
    let early_verdict = match received {
        Ok(_) => {
            // The writer may already be gone (a write failed); its result says why.
            let _ = tx.send(Piece::End).await;
            None
        }
        Err(Received::Failed(e)) => {
            drop(tx);
            progress.update(|w| w.aborted = true);
            let _ = (&mut writer).await;
            let _ = (&mut verifier).await;
            return Err(e);
        }
        Err(Received::VerifierDone(v)) => Some(v),
    };
    drop(tx);
    if early_verdict.is_some() {
        progress.update(|w| w.aborted = true);
    }
    let written = (&mut writer)
        .await
        .map_err(|e| local(format!("writer task failed: {e}")));
    let verdict = match early_verdict {
        Some(v) => v,
        None => (&mut verifier).await,
    };
    let rejected = |source: VerifyError| {
        AttemptError::Fatal(TransportError::Rejected {
            peer: peer.to_owned(),
            source,
        })
    };
    // A refusal of the content wins over a local write error (it is the validator's fault).
    match verdict.map_err(|e| local(format!("verifier task failed: {e}")))? {
        Err(v) => return Err(rejected(v)),
        Ok(None) => {}
        Ok(Some(hash)) => {
            written?.map_err(|e| local(e.to_string()))?;
            return Ok(hash);
        }
    }
    written?.map_err(|e| local(e.to_string()))?;
    Err(local(
        "the verifier stopped before the end of the file".into(),
    ))
}

/// Why [`receive_body`] stopped early.
enum Received {
    /// The transfer failed (or the writer did).
    Failed(AttemptError<TransportError>),
    /// The verifier finished before the body did: it refused the content.
    VerifierDone(Result<Result<Option<ModelHash>, VerifyError>, tokio::task::JoinError>),
}

/// Streams the response body into the writer's channel; stops as soon as the verifier refuses
/// the content.
async fn receive_body(
    mut resp: reqwest::Response,
    tx: &tokio::sync::mpsc::Sender<Piece>,
    verifier: &mut tokio::task::JoinHandle<Result<Option<ModelHash>, VerifyError>>,
    peer: &str,
    idle: Duration,
    deadline: Option<Instant>,
    expected: Option<u64>,
) -> Result<u64, Received> {
    let retryable = |e| Received::Failed(AttemptError::Retryable(e));
    let timeout = |what: &'static str| TransportError::Timeout {
        peer: peer.to_owned(),
        what,
        after: idle,
    };
    let writer_gone = || {
        Received::Failed(AttemptError::Fatal(TransportError::Local {
            peer: peer.to_owned(),
            path: String::new(),
            reason: "the file writer stopped".into(),
        }))
    };
    let mut got = 0u64;
    let mut pending: Vec<u8> = Vec::with_capacity(SEND_BATCH);
    loop {
        let wait = clip(idle, deadline);
        if wait.is_zero() {
            return Err(retryable(timeout("deadline reached mid-body")));
        }
        let chunk = tokio::select! {
            biased;
            v = &mut *verifier => return Err(Received::VerifierDone(v)),
            c = tokio::time::timeout(wait, resp.chunk()) => c,
        };
        let chunk = chunk.map_err(|_| retryable(timeout("waiting for body data")))?;
        match chunk {
            Ok(Some(bytes)) => {
                got += bytes.len() as u64;
                pending.extend_from_slice(&bytes);
                if pending.len() >= SEND_BATCH {
                    let piece = std::mem::replace(&mut pending, Vec::with_capacity(SEND_BATCH));
                    tokio::select! {
                        biased;
                        v = &mut *verifier => return Err(Received::VerifierDone(v)),
                        sent = tx.send(Piece::Data(piece)) => sent.map_err(|_| writer_gone())?,
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Err(retryable(match expected {
                    Some(n) if got < n => TransportError::Truncated {
                        peer: peer.to_owned(),
                        got,
                        expected: n,
                    },
                    _ => TransportError::Network {
                        peer: peer.to_owned(),
                        reason: error_chain(&e),
                    },
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
    if !pending.is_empty() {
        tx.send(Piece::Data(pending))
            .await
            .map_err(|_| writer_gone())?;
    }
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
