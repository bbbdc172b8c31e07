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
//!
//! Bounds (see [`super::limits`]): the body may not exceed [`max_shard_bytes`] of the group
//! (checked against `Content-Length` before the body and on every piece); once the tensor list
//! is in, the bound tightens to what those tensors can take in the file, so junk after a valid
//! file is refused as soon as it passes that. A file the streamed parse cannot follow (not a
//! `.pt` zip, an unparsable `data.pkl`) is refused at that point instead of being received to the
//! end. Redirects are refused, error bodies are read up to [`MAX_ERROR_BODY`], and the free space
//! is checked before the body is written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use miner_contract::hash::ModelHash;
use miner_contract::pt::PtError;
use miner_contract::shard::shard_file_name;
use miner_contract::{ExpertGroup, PublishInfo, Published, RunDir, Staged};
use miner_keys::Hotkey;
use tokio::time::Instant;
use tracing::Instrument;

use super::limits::{
    MAX_ERROR_BODY, WIDEST_SHARD_DTYPE, check_free_space, error_text, max_shard_bytes,
    read_body_limited,
};
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
    let cap = max_shard_bytes(group, WIDEST_SHARD_DTYPE);
    let outcome = retry(policy, deadline, |attempt, idle| {
        let req = client.get(&url).form(&form);
        let file_path = file_path.clone();
        let p = p.clone();
        let group = group.clone();
        let span = super::http_span("GET", "/get-checkpoint", &url, attempt);
        let bounds = Bounds {
            idle,
            deadline,
            cap,
        };
        async move {
            let r = fetch_once(req, &file_path, &p, bounds, group, expected).await;
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
/// and finishes when the file is complete. `Ok(None)`: the attempt was abandoned. A file the
/// streamed parse cannot follow is refused at once (a download is never received to the end
/// only to find it is not a checkpoint).
fn verify_body(
    path: &Path,
    group: ExpertGroup,
    expected: ModelHash,
    progress: &Progress,
    limit: Arc<AtomicU64>,
) -> Result<Option<ModelHash>, VerifyError> {
    let mut follower = DownloadVerifier::new(path, group, None)?.with_limit(limit);
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
        if !follower.following() {
            return Err(VerifyError::from(PtError::CorruptZip {
                path: path.to_path_buf(),
                detail: format!(
                    "not a checkpoint this miner can verify as it streams (refused after {seen} bytes: not a zip record, a compressed record, or an unparsable data.pkl)"
                ),
            }));
        }
    }
}

/// The time and size bounds of one attempt.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    /// Longest wait for the next piece of data.
    idle: Duration,
    /// The end of the whole download.
    deadline: Option<Instant>,
    /// [`max_shard_bytes`] of the group.
    cap: u64,
}

/// The response head: a success whose `Content-Length` (when given) fits under `cap`. A
/// redirect is refused (never followed); an error status keeps at most [`MAX_ERROR_BODY`]
/// bytes of its body, read within `idle`.
async fn check_head(
    resp: reqwest::Response,
    peer: &str,
    idle: Duration,
    cap: u64,
) -> Result<reqwest::Response, AttemptError<TransportError>> {
    let status = resp.status().as_u16();
    tracing::Span::current().record("http.response.status_code", status);
    if resp.status().is_redirection() {
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .chars()
                    .take(200)
                    .collect()
            })
            .unwrap_or_default();
        return Err(AttemptError::Fatal(TransportError::Redirect {
            peer: peer.to_owned(),
            status,
            location,
        }));
    }
    if !resp.status().is_success() {
        let body = read_body_limited(resp, MAX_ERROR_BODY, idle, true)
            .await
            .unwrap_or_default();
        let err = TransportError::Status {
            peer: peer.to_owned(),
            status,
            body: error_text(&body),
        };
        return Err(if is_non_retryable(status) {
            AttemptError::Fatal(err)
        } else {
            AttemptError::Retryable(err)
        });
    }
    if let Some(n) = resp.content_length()
        && n > cap
    {
        return Err(AttemptError::Fatal(TransportError::TooLarge {
            peer: peer.to_owned(),
            what: "Content-Length",
            got: n,
            limit: cap,
            why: "the expert group's shard can take",
        }));
    }
    Ok(resp)
}

/// One attempt: request, stream the body to `file_path` (truncating any earlier attempt) on a
/// writer thread while a verifier thread checks and hashes what is written, fsync. Never waits
/// longer than `idle` for the next piece of data. Returns the verified model hash.
async fn fetch_once(
    req: reqwest::RequestBuilder,
    file_path: &Path,
    peer: &str,
    bounds: Bounds,
    group: ExpertGroup,
    expected: ModelHash,
) -> Result<ModelHash, AttemptError<TransportError>> {
    let Bounds {
        idle,
        deadline,
        cap,
    } = bounds;
    let timeout = TransportError::Timeout {
        peer: peer.to_owned(),
        what: "waiting for response headers",
        after: idle,
    };
    let resp = tokio::time::timeout(clip(idle, deadline), req.send())
        .await
        .map_err(|_| AttemptError::Retryable(timeout))?
        .map_err(|e| {
            AttemptError::Retryable(TransportError::Network {
                peer: peer.to_owned(),
                reason: error_chain(&e),
            })
        })?;
    let resp = check_head(resp, peer, idle, cap).await?;
    let expected_len = resp.content_length();
    let local = |reason: String| {
        AttemptError::Fatal(TransportError::Local {
            peer: peer.to_owned(),
            path: file_path.display().to_string(),
            reason,
        })
    };
    if let Some(dir) = file_path.parent() {
        check_free_space(dir, expected_len.unwrap_or(0)).map_err(local)?;
    }
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
    let limit = Arc::new(AtomicU64::new(cap));
    let mut verifier = {
        let progress = progress.clone();
        let path = file_path.to_path_buf();
        let limit = limit.clone();
        tokio::task::spawn_blocking(move || verify_body(&path, group, expected, &progress, limit))
    };

    let received = receive_body(resp, &tx, &mut verifier, peer, bounds, expected_len, &limit).await;
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
/// the content or the body passes `limit` (the group's cap, then what the file's tensors can
/// take once the verifier has their list).
async fn receive_body(
    mut resp: reqwest::Response,
    tx: &tokio::sync::mpsc::Sender<Piece>,
    verifier: &mut tokio::task::JoinHandle<Result<Option<ModelHash>, VerifyError>>,
    peer: &str,
    bounds: Bounds,
    expected: Option<u64>,
    limit: &AtomicU64,
) -> Result<u64, Received> {
    let Bounds { idle, deadline, .. } = bounds;
    let too_large = |what: &'static str, got: u64, limit: u64| {
        Received::Failed(AttemptError::Fatal(TransportError::TooLarge {
            peer: peer.to_owned(),
            what,
            got,
            limit,
            why: "its tensors can take in the file",
        }))
    };
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
        // A wait cut short by the deadline is the deadline, not an idle peer (a drip).
        let what = if wait < idle {
            "deadline reached mid-body"
        } else {
            "waiting for body data"
        };
        let chunk = chunk.map_err(|_| retryable(timeout(what)))?;
        match chunk {
            Ok(Some(bytes)) => {
                got += bytes.len() as u64;
                // The bound tightens once the verifier has the tensor list. A declared length
                // over it is named first: it is what the peer promised to send.
                let max = limit.load(Ordering::SeqCst);
                if let Some(n) = expected
                    && n > max
                {
                    return Err(too_large("Content-Length", n, max));
                }
                if got > max {
                    return Err(too_large("body", got, max));
                }
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
