//! `POST http://{ip}:{port}/submit-checkpoint` (spec §6.2): upload our shard as multipart,
//! streamed from disk (the file is never held in memory), signed over
//! `model_bytes(24) ‖ target_pubkey(32) ‖ u64_be(origin_block)`.

use std::path::Path;

use miner_contract::hash::ModelHash;
use miner_contract::layout::model_file_name;
use miner_contract::shard::ShardFormat;
use miner_keys::Hotkey;
use reqwest::multipart::{Form, Part};
use tokio::time::Instant;
use tracing::Instrument;

use super::download::error_chain;
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
            let body = resp.bytes().await.map_err(|e| {
                AttemptError::Retryable(TransportError::Network {
                    peer: p.clone(),
                    reason: error_chain(&e),
                })
            })?;
            if !(200..300).contains(&status) {
                let err = TransportError::Status {
                    peer: p.clone(),
                    status,
                    body: String::from_utf8_lossy(&body).chars().take(200).collect(),
                };
                return Err(if is_non_retryable(status) {
                    AttemptError::Fatal(err)
                } else {
                    AttemptError::Retryable(err)
                });
            }
            serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| {
                AttemptError::Fatal(TransportError::BadResponse {
                    peer: p.clone(),
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
