//! Distribute over the Hugging Face Hub (spec §5.1, addendum A1): a validator's expert-group
//! shard at the revision it committed (`r@rv`), `model_expgroup_<gid>.safetensors` first and
//! `.pt` when that is absent (the stock miner asks only for `.pt` and silently trains from the
//! base model when validators publish `.safetensors`; this never does), verified while it
//! streams and published as a verified validator checkpoint.
//!
//! The pipeline is the HTTP download's: the async task receives the body and hands batches to
//! a writer thread; a verifier thread follows the file as it grows (keys as soon as the tensor
//! list is in, each tensor hashed and checked once its bytes are on disk). A refusal stops the
//! transfer at once. Memory is bounded (a few MiB in flight), the size by [`MAX_SHARD_BYTES`],
//! the time by the caller's deadline and the Hub client's per-read stall timeout.
//!
//! **Invariant:** only a file whose hash equals the committed `h`, signed by the validator,
//! with only routed-expert keys of our group and finite values, is published; a failed
//! candidate leaves no directory and no temporary behind (the [`Staged`] guard).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use miner_contract::hash::ModelHash;
use miner_contract::pt::Followed;
use miner_contract::shard::ShardFormat;
use miner_contract::{ExpertGroup, PublishInfo, Published, RunDir, Staged};
use miner_hub::{HubClient, HubError, RepoId};
use tokio::time::Instant;

use super::verify::{
    DownloadVerifier, VerifyError, check_hash, parse_committed_hash, verify_hash_signature,
};
use crate::commitment::ChainCheckpoint;
use crate::hub::KIND;

/// The largest shard accepted (the reference validators' `max_submission_bytes`; a real
/// DeepSeek-V2-Lite group shard is about 3.35 GiB).
pub const MAX_SHARD_BYTES: u64 = 8 << 30;

/// A shard's file format, by suffix (the order validators try them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardKind {
    Safetensors,
    Pt,
}

impl ShardKind {
    pub const IN_ORDER: [ShardKind; 2] = [ShardKind::Safetensors, ShardKind::Pt];

    pub fn file_name(self, group_id: u32) -> String {
        match self {
            ShardKind::Safetensors => format!("model_expgroup_{group_id}.safetensors"),
            ShardKind::Pt => format!("model_expgroup_{group_id}.pt"),
        }
    }
}

/// Why a Hub candidate failed.
#[derive(Debug, thiserror::Error)]
pub enum HubFetchError {
    #[error("validator {hotkey}: no Hub coordinates (r, rv) in its commitment")]
    NoCoordinates { hotkey: String },
    #[error("validator {hotkey}: Hub coordinates {repo:?}@{rev:?} are not a repo id and revision")]
    BadCoordinates {
        hotkey: String,
        repo: String,
        rev: String,
    },
    #[error("validator {hotkey}: {repo}@{rev} holds neither {tried}")]
    Missing {
        hotkey: String,
        repo: String,
        rev: String,
        tried: String,
    },
    #[error("validator {hotkey}: {repo}@{rev}/{file}: {source}")]
    Hub {
        hotkey: String,
        repo: String,
        rev: String,
        file: String,
        #[source]
        source: HubError,
    },
    #[error(
        "validator {hotkey}: {file} is {size} bytes, over the {limit}-byte limit of the expert group's shard"
    )]
    TooLarge {
        hotkey: String,
        file: String,
        size: u64,
        limit: u64,
    },
    #[error("validator {hotkey}: {repo}@{rev}/{file} rejected: {source}")]
    Rejected {
        hotkey: String,
        repo: String,
        rev: String,
        file: String,
        #[source]
        source: VerifyError,
    },
    #[error("validator {hotkey}: local {path}: {reason}")]
    Local {
        hotkey: String,
        path: String,
        reason: String,
    },
    #[error("validator {hotkey}: the deadline passed after {attempts} attempt(s){}", last.as_ref().map(|l| format!("; last error: {l}")).unwrap_or_default())]
    Deadline {
        hotkey: String,
        attempts: u32,
        last: Option<String>,
    },
}

/// What a download found out, for the job record.
#[derive(Debug, Clone, Default)]
pub struct HubFetchProgress {
    pub repo: String,
    pub revision: String,
    pub file: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Downloads `candidate`'s shard from the Hub at its committed revision, verifies it while it
/// arrives and publishes it under `validator_checkpoint/`. Transient Hub errors are retried
/// (at most `attempts` tries) until `deadline`; a refused file is not retried. `progress` is
/// called as bytes arrive.
pub async fn download_from_hub(
    client: &HubClient,
    run: &RunDir,
    candidate: &ChainCheckpoint,
    group: &ExpertGroup,
    attempts: u32,
    deadline: Option<Instant>,
    progress: &(dyn Fn(&HubFetchProgress) + Send + Sync),
) -> Result<Published, HubFetchError> {
    let hotkey = candidate.hotkey.clone();
    let (Some(r), Some(rv)) = (&candidate.hf_repo_id, &candidate.hf_revision) else {
        return Err(HubFetchError::NoCoordinates { hotkey });
    };
    let bad_coords = || HubFetchError::BadCoordinates {
        hotkey: hotkey.clone(),
        repo: r.chars().take(80).collect(),
        rev: rv.chars().take(80).collect(),
    };
    let repo: RepoId = r.parse().map_err(|_| bad_coords())?;
    if rv.is_empty() || rv.len() > 40 || !rv.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad_coords());
    }
    let rejected = |file: &str, source: VerifyError| HubFetchError::Rejected {
        hotkey: hotkey.clone(),
        repo: repo.to_string(),
        rev: rv.clone(),
        file: file.to_owned(),
        source,
    };
    if candidate.expert_group != group.group_id {
        return Err(rejected(
            "-",
            VerifyError::WrongGroup {
                committed: candidate.expert_group,
                ours: group.group_id,
            },
        ));
    }
    // Cheap checks on chain data first: no transfer for a candidate that cannot verify.
    verify_hash_signature(
        &candidate.hotkey,
        &candidate.model_hash,
        &candidate.signed_model_hash,
    )
    .map_err(|e| rejected("-", e))?;
    let expected = parse_committed_hash(&candidate.model_hash).map_err(|e| rejected("-", e))?;

    let mut tries = 0u32;
    let mut last: Option<String> = None;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(HubFetchError::Deadline {
                hotkey,
                attempts: tries,
                last,
            });
        }
        tries += 1;
        match attempt(
            client, run, candidate, &repo, rv, group, expected, deadline, progress,
        )
        .await
        {
            Ok(p) => return Ok(p),
            Err(e @ HubFetchError::Hub { .. }) if is_transient(&e) && tries < attempts.max(1) => {
                tracing::warn!(validator = %hotkey, error = %e, attempt = tries, "Hub download failed; retrying");
                last = Some(e.to_string());
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_transient(e: &HubFetchError) -> bool {
    matches!(e, HubFetchError::Hub { source, .. } if source.is_transient())
}

/// The first of `.safetensors`, `.pt` that exists at `repo@rv`: its kind, name and size.
async fn pick_file(
    client: &HubClient,
    hotkey: &str,
    repo: &RepoId,
    rv: &str,
    gid: u32,
) -> Result<(ShardKind, String, u64), HubFetchError> {
    let mut tried = Vec::new();
    for kind in ShardKind::IN_ORDER {
        let name = kind.file_name(gid);
        match client.head_file(repo, KIND, rv, &name).await {
            Ok(meta) => return Ok((kind, name, meta.size)),
            Err(HubError::NotFound { .. }) => tried.push(name),
            Err(source) => {
                return Err(HubFetchError::Hub {
                    hotkey: hotkey.to_owned(),
                    repo: repo.to_string(),
                    rev: rv.to_owned(),
                    file: name,
                    source,
                });
            }
        }
    }
    Err(HubFetchError::Missing {
        hotkey: hotkey.to_owned(),
        repo: repo.to_string(),
        rev: rv.to_owned(),
        tried: tried.join(" nor "),
    })
}

/// One try: pick the file, stream it into a staged directory while it is verified, publish.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    client: &HubClient,
    run: &RunDir,
    candidate: &ChainCheckpoint,
    repo: &RepoId,
    rv: &str,
    group: &ExpertGroup,
    expected: ModelHash,
    deadline: Option<Instant>,
    progress: &(dyn Fn(&HubFetchProgress) + Send + Sync),
) -> Result<Published, HubFetchError> {
    let hotkey = candidate.hotkey.as_str();
    let gid = group.group_id;
    let local = |path: &Path, reason: String| HubFetchError::Local {
        hotkey: hotkey.to_owned(),
        path: path.display().to_string(),
        reason,
    };
    let staged: Staged = run
        .stage_validator(candidate.uid, hotkey, candidate.global_ver)
        .map_err(|e| local(run.validator_dir().as_path(), e.to_string()))?;
    let (file, hash) = fetch_into(
        client,
        hotkey,
        repo,
        rv,
        group,
        staged.path(),
        Some(expected),
        deadline,
        progress,
    )
    .await?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let signed = candidate.signed_model_hash.clone();
    tokio::task::spawn_blocking(move || {
        staged
            .publish(PublishInfo::verified_download(gid, hash, signed))
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| local(&PathBuf::from(&name), format!("publish task failed: {e}")))?
    .map_err(|reason| local(run.validator_dir().as_path(), reason))
}

/// Downloads the shard of `group` at `repo@rv` (`.safetensors`, else `.pt`) into `dir`,
/// verifying it while it streams (routed-expert keys of the group, finite values) and, when
/// `expected` is given, its model hash. `who` names the source in errors. Returns the file and
/// its model hash; on an error the partial file may remain in `dir` (callers stage `dir`).
#[allow(clippy::too_many_arguments)]
pub async fn fetch_into(
    client: &HubClient,
    who: &str,
    repo: &RepoId,
    rv: &str,
    group: &ExpertGroup,
    dir: &Path,
    expected: Option<ModelHash>,
    deadline: Option<Instant>,
    progress: &(dyn Fn(&HubFetchProgress) + Send + Sync),
) -> Result<(PathBuf, ModelHash), HubFetchError> {
    let hotkey = who;
    let gid = group.group_id;
    let (kind, name, size) = pick_file(client, hotkey, repo, rv, gid).await?;
    // At most what the group's tensors can take in the file (`limits::max_shard_bytes`).
    let limit = MAX_SHARD_BYTES.min(super::limits::max_shard_bytes(
        group,
        super::limits::WIDEST_SHARD_DTYPE,
    ));
    if size > limit {
        return Err(HubFetchError::TooLarge {
            hotkey: hotkey.to_owned(),
            file: name,
            size,
            limit,
        });
    }
    let mut seen = HubFetchProgress {
        repo: repo.to_string(),
        revision: rv.to_owned(),
        file: name.clone(),
        bytes_done: 0,
        bytes_total: size,
    };
    progress(&seen);
    let local = |path: &Path, reason: String| HubFetchError::Local {
        hotkey: hotkey.to_owned(),
        path: path.display().to_string(),
        reason,
    };
    let hub_err = |source: HubError| HubFetchError::Hub {
        hotkey: hotkey.to_owned(),
        repo: repo.to_string(),
        rev: rv.to_owned(),
        file: name.clone(),
        source,
    };
    let follower = shard_follower(kind, group);
    let file_path = dir.join(&name);
    let (_meta, mut body) = client
        .open_file(repo, KIND, rv, &name, 0)
        .await
        .map_err(hub_err)?;
    let file = std::fs::File::create(&file_path).map_err(|e| local(&file_path, e.to_string()))?;
    let mut pipe = Pipeline::start(file, file_path.clone(), follower);
    let rejected_file = |source: VerifyError| HubFetchError::Rejected {
        hotkey: hotkey.to_owned(),
        repo: repo.to_string(),
        rev: rv.to_owned(),
        file: name.clone(),
        source,
    };
    let mut got = 0u64;
    let mut early: Option<VerifyResult> = None;
    let result: Result<(), HubFetchError> = async {
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(hub_err(HubError::Timeout {
                    url: format!("{repo}@{rv}/{name}"),
                    what: "the phase deadline passed mid-body".into(),
                }));
            }
            let chunk = tokio::select! {
                biased;
                v = &mut pipe.verifier, if early.is_none() => {
                    // The verifier ended before the body: a refusal, or the writer stopped.
                    match v.unwrap_or(Ok(None)) {
                        Err(e) => return Err(rejected_file(e)),
                        other => { early = Some(other); continue; }
                    }
                }
                c = body.chunk() => c.map_err(hub_err)?,
            };
            let Some(bytes) = chunk else { break };
            got += bytes.len() as u64;
            if got > size {
                return Err(HubFetchError::TooLarge {
                    hotkey: hotkey.to_owned(),
                    file: name.clone(),
                    size: got,
                    limit: size,
                });
            }
            pipe.send(bytes.to_vec())
                .await
                .map_err(|r| local(&file_path, r))?;
            seen.bytes_done = got;
            progress(&seen);
        }
        if got != size {
            return Err(hub_err(HubError::Connection {
                url: format!("{repo}@{rv}/{name}"),
                msg: format!("body ended after {got} of {size} bytes"),
            }));
        }
        Ok(())
    }
    .await;
    let verdict = pipe.finish(result.is_ok(), got, early).await;
    if let Err(PipeError::Verify(e)) = verdict {
        // A refusal of the content wins over a transfer error (it is the sender's fault).
        return Err(rejected_file(e));
    }
    result?;
    let hash = match verdict {
        Ok(Some(f)) => match &expected {
            Some(e) => check_hash(&f, e).map_err(rejected_file)?,
            None => f.hash,
        },
        Ok(None) => return Err(local(&file_path, "the verifier stopped early".into())),
        Err(PipeError::Verify(e)) => return Err(rejected_file(e)),
        Err(PipeError::Local(r)) => return Err(local(&file_path, r)),
    };
    Ok((file_path, hash))
}

// ------------------------------------------------------------------ the streaming pipeline

/// A follower of one shard format: `advance(written)` while it arrives, `finish(len)` at the end.
pub(crate) trait Follow: Send {
    fn advance(&mut self, written: u64) -> Result<(), VerifyError>;
    fn finish(self: Box<Self>, len: u64) -> Result<Followed, VerifyError>;
}

impl Follow for DownloadVerifier {
    fn advance(&mut self, written: u64) -> Result<(), VerifyError> {
        DownloadVerifier::advance(self, written)
    }
    fn finish(self: Box<Self>, len: u64) -> Result<Followed, VerifyError> {
        DownloadVerifier::finish(*self, len).map(|(f, _)| f)
    }
}

/// Opens the follower on the file once the pipeline starts.
type MakeFollower = Box<dyn FnOnce(&Path) -> Result<Box<dyn Follow>, VerifyError> + Send>;

/// A follower for `kind`.
fn shard_follower(kind: ShardKind, group: &ExpertGroup) -> MakeFollower {
    let group = group.clone();
    let format = match kind {
        ShardKind::Pt => ShardFormat::Pt,
        ShardKind::Safetensors => ShardFormat::Safetensors,
    };
    Box::new(move |p: &Path| {
        Ok(Box::new(DownloadVerifier::new(p, group, Some(format))?) as Box<dyn Follow>)
    })
}

enum PipeError {
    Verify(VerifyError),
    Local(String),
}

#[derive(Default, Clone, Copy)]
struct Written {
    bytes: u64,
    complete: bool,
    aborted: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<Written>,
    changed: Condvar,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Written)) {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut w);
        self.changed.notify_all();
    }
    fn wait_beyond(&self, seen: u64) -> Written {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while w.bytes <= seen && !w.complete && !w.aborted {
            w = self.changed.wait(w).unwrap_or_else(|e| e.into_inner());
        }
        *w
    }
}

/// Pieces in flight between the network and the writer (bounds memory with the Hub's chunks).
const PIECES_IN_FLIGHT: usize = 16;
/// Most bytes the verifier takes before it looks whether the attempt was abandoned.
const VERIFY_STEP: u64 = 64 << 20;

type VerifyResult = Result<Option<Followed>, VerifyError>;

/// The writer and verifier threads of one attempt.
struct Pipeline {
    tx: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    shared: Arc<Shared>,
    writer: tokio::task::JoinHandle<std::io::Result<u64>>,
    verifier: tokio::task::JoinHandle<VerifyResult>,
}

impl Pipeline {
    fn start(file: std::fs::File, path: PathBuf, follower: MakeFollower) -> Pipeline {
        let shared = Arc::new(Shared::default());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(PIECES_IN_FLIGHT);
        let writer = {
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || {
                let mut file = file;
                let mut written = 0u64;
                let r = (|| {
                    while let Some(b) = rx.blocking_recv() {
                        file.write_all(&b)?;
                        written += b.len() as u64;
                        shared.update(|w| w.bytes = written);
                    }
                    file.sync_all()?;
                    Ok(written)
                })();
                if r.is_err() {
                    shared.update(|w| w.aborted = true);
                }
                r
            })
        };
        let verifier = {
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || -> VerifyResult {
                let mut f = follower(&path)?;
                let mut seen = 0u64;
                loop {
                    let w = shared.wait_beyond(seen);
                    if w.aborted {
                        return Ok(None);
                    }
                    if w.complete {
                        return f.finish(w.bytes).map(Some);
                    }
                    seen = w.bytes.min(seen + VERIFY_STEP);
                    f.advance(seen)?;
                }
            })
        };
        Pipeline {
            tx: Some(tx),
            shared,
            writer,
            verifier,
        }
    }

    async fn send(&self, piece: Vec<u8>) -> Result<(), String> {
        match &self.tx {
            Some(tx) => tx
                .send(piece)
                .await
                .map_err(|_| "the file writer stopped".to_owned()),
            None => Err("the pipeline is closed".into()),
        }
    }

    /// Ends the attempt: when the body is complete (`ok`) marks the file complete and waits
    /// for the verdict; otherwise stops both threads. `early`: the verifier's result if it
    /// already ended.
    async fn finish(
        mut self,
        ok: bool,
        len: u64,
        early: Option<VerifyResult>,
    ) -> Result<Option<Followed>, PipeError> {
        if !ok {
            self.shared.update(|w| w.aborted = true);
        }
        drop(self.tx.take());
        let written = (&mut self.writer)
            .await
            .map_err(|e| PipeError::Local(format!("writer task failed: {e}")))
            .and_then(|r| r.map_err(|e| PipeError::Local(e.to_string())));
        if ok && let Ok(n) = &written {
            let n = *n;
            self.shared.update(|w| {
                w.bytes = n;
                w.complete = n == len;
                w.aborted = n != len;
            });
        } else {
            self.shared.update(|w| w.aborted = true);
        }
        let verdict = match early {
            Some(v) => v,
            None => (&mut self.verifier)
                .await
                .map_err(|e| PipeError::Local(format!("verifier task failed: {e}")))?,
        };
        // A refusal of the content wins over a local write error (it is the sender's fault).
        let verdict = verdict.map_err(PipeError::Verify)?;
        written?;
        Ok(verdict)
    }
}
