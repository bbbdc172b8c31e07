//! `POST http://{ip}:{port}/submit-checkpoint` (spec §6.2): upload our shard as multipart,
//! streamed from disk (the file is never held in memory), signed over
//! `model_bytes(24) ‖ target_pubkey(32) ‖ u64_be(origin_block)`. The validator's reply is read
//! with a limit ([`MAX_JSON_BODY`], error bodies [`MAX_ERROR_BODY`]); redirects are refused.

use std::path::Path;
use std::time::Duration;

use miner_contract::hash::ModelHash;
use miner_contract::layout::model_file_name;
use miner_contract::shard::ShardFormat;
use miner_keys::Hotkey;
use reqwest::multipart::{Form, Part};
use tokio::time::Instant;
use tracing::Instrument;

use super::download::error_chain;
use super::limits::{BodyError, MAX_ERROR_BODY, MAX_JSON_BODY, error_text, read_body_limited};
use super::retry::{AttemptError, RetryError, RetryPolicy, is_non_retryable, retry};
use super::{Peer, TransportError, block_message};

/// What to submit and to whom.
#[derive(Debug, Clone)]
pub struct Submission<'a> {
    /// The assigned validator's axon and hotkey.
    pub peer: Peer,
    /// The pinned `model_expgroup_<gid>.safetensors` or `.pt` (its hash must be `model_hash`);
    /// sent under that name, so the validator reads it in that format.
    pub file: &'a Path,
    pub expert_group: u32,
    pub model_hash: ModelHash,
    /// The chain head when sending (`origin_block`).
    pub origin_block: u64,
}

/// A successful submission: the validator's JSON answer.
#[derive(Debug, Clone)]
pub struct SubmitReceipt {
    pub attempts: u32,
    pub body: serde_json::Value,
}

/// Submits with `policy` (300 s per attempt, 3 retries 60 s apart in the reference); no
/// attempt starts or sleep runs past `deadline` (the end of the Submission phase).
pub async fn submit_checkpoint(
    client: &reqwest::Client,
    key: &Hotkey,
    sub: &Submission<'_>,
    policy: &RetryPolicy,
    deadline: Option<Instant>,
) -> Result<SubmitReceipt, TransportError> {
    let p = sub.peer.to_string();
    let target_pub =
        miner_keys::ss58_decode(&sub.peer.hotkey_ss58).map_err(|e| TransportError::Invalid {
            peer: p.clone(),
            reason: format!("validator hotkey: {e}"),
        })?;
    let model_bytes = sub.model_hash.0;
    let block_bytes = block_message(&target_pub, sub.origin_block);
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&model_bytes);
    msg.extend_from_slice(&block_bytes);
    let fields: Vec<(&'static str, String)> = vec![
        ("target_hotkey_ss58", sub.peer.hotkey_ss58.clone()),
        ("origin_hotkey_ss58", key.ss58().to_owned()),
        ("origin_block", sub.origin_block.to_string()),
        (
            "signature",
            miner_keys::b64url_nopad_encode(&key.sign(&msg)),
        ),
        ("model_hex", hex::encode(model_bytes)),
        ("block_hex", hex::encode(block_bytes)),
    ];
    let url = format!("{}/submit-checkpoint", sub.peer.base_url());
    // The file's own name (`model_expgroup_<gid>.safetensors` or `.pt`, whichever the
    // checkpoint holds): the validator reads the format from it.
    let format = ShardFormat::of_path(sub.file).unwrap_or_default();
    let file_name = model_file_name(sub.expert_group, format);
    let mut attempts = 0u32;
    let outcome = retry(policy, deadline, |attempt, timeout| {
        attempts = attempt;
        let fields = fields.clone();
        let (url, file_name, p) = (url.clone(), file_name.clone(), p.clone());
        let p2 = p.clone();
        let span = super::http_span("POST", "/submit-checkpoint", &url, attempt);
        let attempt = async move {
            let local = |e: std::io::Error| {
                AttemptError::Fatal(TransportError::Local {
                    peer: p.clone(),
                    path: sub.file.display().to_string(),
                    reason: e.to_string(),
                })
            };
            let file = tokio::fs::File::open(sub.file).await.map_err(local)?;
            let len = file.metadata().await.map_err(local)?.len();
            let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
            let part = Part::stream_with_length(reqwest::Body::wrap_stream(stream), len)
                .file_name(file_name)
                .mime_str("application/octet-stream")
                .map_err(|e| {
                    AttemptError::Fatal(TransportError::Invalid {
                        peer: p.clone(),
                        reason: e.to_string(),
                    })
                })?;
            let mut form = Form::new();
            for (k, v) in fields {
                form = form.text(k, v);
            }
            let form = form.part("file", part);
            let resp = client
                .post(&url)
                .multipart(form)
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| {
                    AttemptError::Retryable(if e.is_timeout() {
                        TransportError::Timeout {
                            peer: p.clone(),
                            what: "submission",
                            after: timeout,
                        }
                    } else {
                        TransportError::Network {
                            peer: p.clone(),
                            reason: error_chain(&e),
                        }
                    })
                })?;
            let status = resp.status().as_u16();
            tracing::Span::current().record("http.response.status_code", status);
            read_reply(resp, &p, timeout).await
        };
        let attempt = async move {
            let body = attempt.await?;
            serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| {
                AttemptError::Fatal(TransportError::BadResponse {
                    peer: p2,
                    reason: format!("2xx without a JSON body: {e}"),
                })
            })
        };
        async move {
            let r = attempt.await;
            super::record_attempt(&r);
            r
        }
        .instrument(span)
    })
    .await;
    match outcome {
        Ok(body) => Ok(SubmitReceipt { attempts, body }),
        Err(RetryError::Fatal { error, .. }) => Err(error),
        Err(RetryError::Exhausted { attempts, last }) => Err(TransportError::Exhausted {
            peer: p,
            attempts,
            last: Box::new(last),
        }),
        Err(RetryError::Deadline { attempts, last }) => Err(TransportError::Deadline {
            peer: p,
            attempts,
            last: last.map(Box::new),
        }),
    }
}

/// The validator's answer: a 2xx body of at most [`MAX_JSON_BODY`] bytes; a redirect is refused
/// (never followed); an error status keeps at most [`MAX_ERROR_BODY`] bytes of its body.
async fn read_reply(
    resp: reqwest::Response,
    peer: &str,
    idle: Duration,
) -> Result<Vec<u8>, AttemptError<TransportError>> {
    let status = resp.status().as_u16();
    if resp.status().is_redirection() {
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).chars().take(200).collect())
            .unwrap_or_default();
        return Err(AttemptError::Fatal(TransportError::Redirect {
            peer: peer.to_owned(),
            status,
            location,
        }));
    }
    if !(200..300).contains(&status) {
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
    read_body_limited(resp, MAX_JSON_BODY, idle, false)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { .. } => AttemptError::Fatal(TransportError::BadResponse {
                peer: peer.to_owned(),
                reason: e.to_string(),
            }),
            BodyError::Timeout(after) => AttemptError::Retryable(TransportError::Timeout {
                peer: peer.to_owned(),
                what: "reading the submission reply",
                after,
            }),
            BodyError::Network(reason) => AttemptError::Retryable(TransportError::Network {
                peer: peer.to_owned(),
                reason,
            }),
        })
}
