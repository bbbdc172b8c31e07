//! The four jobs. Each returns an [`End`]; [`Engine::run_job`] races it against the phase end
//! and the shutdown and writes the final record.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use miner_contract::hash::ModelHash;
use miner_contract::shard::{ShardFormat, find_shard, shard_file_name};

use miner_contract::{CheckpointName, PinGuard};

use super::{CycleCommit, Engine, JobKind, JobOutcome, JobRecord, Passed, chain_reason, now_unix};
use crate::assignment::{assign_miners_to_validators, validator_for};
use crate::chain::{ChainError, CommitReceipt};
use crate::commitment::{
    CommitSnapshot, DEFAULT_MAX_WEIGHT_AGE, ForRole, MinerCommit, NeuronView, Role,
    SignedModelHashCommit, axon_is_served, chain_checkpoints, download_candidates,
    parse_commitment, read_commits,
};
use crate::phase::{PhaseInfo, PhaseName, PreviousPhases, version_window};
use crate::transport::{
    Peer, Submission, check_peer_address, download_checkpoint, submit_checkpoint,
};

/// The model shard of group `gid` in checkpoint directory `dir`: `.safetensors` when present,
/// else `.pt`; when neither exists, the `.safetensors` name (whose absence the caller reports).
fn shard_path(dir: &Path, gid: u32) -> std::path::PathBuf {
    find_shard(dir, gid)
        .map(|(p, _)| p)
        .unwrap_or_else(|| dir.join(shard_file_name(gid, ShardFormat::Safetensors)))
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    Succeeded,
    Skipped(String),
    Missed(String),
    Failed(String),
    Cancelled(String),
}

impl End {
    fn outcome(&self) -> (JobOutcome, String) {
        match self {
            End::Succeeded => (JobOutcome::Succeeded, String::new()),
            End::Skipped(r) => (JobOutcome::Skipped, r.clone()),
            End::Missed(r) => (JobOutcome::Missed, r.clone()),
            End::Failed(r) => (JobOutcome::Failed, r.clone()),
            End::Cancelled(r) => (JobOutcome::Cancelled, r.clone()),
        }
    }
}

const PIN_HOLDER: &str = "chainsync-commit";
pub(crate) const STOPPING: &str = "cancelled: the daemon is stopping";

/// A client span for one chain call (a child of the job's span).
fn chain_span(call: &'static str, netuid: u16, block: Option<u64>) -> tracing::Span {
    let span = tracing::info_span!(
        "chain call",
        otel.name = %format!("chain {call}"),
        otel.kind = "client",
        rpc.system = "substrate",
        rpc.method = call,
        netuid,
        block = tracing::field::Empty,
        included_block = tracing::field::Empty,
        error = tracing::field::Empty,
    );
    if let Some(b) = block {
        span.record("block", b);
    }
    span
}

/// Runs a chain call inside its span, recording a failure on it.
async fn traced<T>(
    span: tracing::Span,
    fut: impl std::future::Future<Output = Result<T, ChainError>>,
) -> Result<T, ChainError> {
    let s = span.clone();
    let r = fut.instrument(span).await;
    if let Err(e) = &r {
        s.record("error", tracing::field::display(e));
    }
    r
}

/// The model hash the current job works on, on its span.
fn note_hash(hex: &str) {
    if !hex.is_empty() {
        tracing::Span::current().record("hash", hex);
    }
}

impl Engine {
    /// Runs a job inside its span (`job <kind>`, with `job`, `kind`, `block`, `phase`, `cycle`,
    /// and `hash` once known, `outcome`, `error`); its HTTP and chain calls are child spans.
    pub(crate) async fn run_job(self: Arc<Self>, rec: JobRecord, info: PhaseInfo) {
        let span = tracing::info_span!(
            "job",
            otel.name = %format!("job {}", rec.kind.as_str().to_lowercase()),
            job = rec.id,
            kind = rec.kind.as_str(),
            block = rec.started_block,
            phase = %rec.phase,
            cycle = rec.cycle_index,
            manual = rec.manual,
            hash = tracing::field::Empty,
            outcome = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        self.run_job_traced(rec, info).instrument(span).await
    }

    async fn run_job_traced(self: Arc<Self>, mut rec: JobRecord, info: PhaseInfo) {
        let kind = rec.kind;
        let end = info.phase_end_block;
        let cancel = self.jobs_cancel.clone();
        tracing::info!(job = rec.id, kind = kind.as_str(), cycle = rec.cycle_index, phase = %rec.phase, phase_end = end, "job started");
        // The job writes its progress into `progress` so an abandoned job keeps what it learned.
        let progress = Arc::new(std::sync::Mutex::new(rec.clone()));
        let result = match kind {
            // Transfers are abandoned at the phase end or on shutdown (the staged download is
            // removed when its future drops).
            JobKind::Download | JobKind::Submit => {
                let fut = async {
                    if kind == JobKind::Download {
                        self.download(&progress, &info).await
                    } else {
                        self.submit(&progress, &info).await
                    }
                };
                let bounded = !rec.manual || kind == JobKind::Submit;
                let left = (end + 1).saturating_sub(self.block_estimate());
                let need = self.s.timing.min_transfer_blocks;
                if bounded && left < need {
                    End::Missed(format!(
                        "{left} block(s) left in {} (ends at {end}), a transfer needs {need}{}",
                        info.phase_name.as_str(),
                        self.chain_down_note()
                    ))
                } else {
                    tokio::select! {
                        r = fut => r,
                        p = self.block_past(end), if bounded => End::Missed(format!(
                            "{} ended at block {end} before the job finished{}{}",
                            info.phase_name.as_str(),
                            p.note(self.s.timing.block_time),
                            self.chain_down_note()
                        )),
                        _ = cancel.cancelled() => End::Cancelled(STOPPING.into()),
                    }
                }
            }
            // Commits handle the phase end and the shutdown themselves: an extrinsic once sent is
            // let finish.
            JobKind::Commit1 => self.commit1(&progress, &info).await,
            JobKind::Commit2 => self.commit2(&progress, &info).await,
        };
        if kind == JobKind::Submit {
            self.release_pin("submission ended").await;
        }
        rec = progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (outcome, error) = result.outcome();
        rec.outcome = outcome;
        rec.error = error;
        rec.finished_block = self.head().max(rec.started_block);
        rec.finished_unix = now_unix();
        self.log.put(&rec);
        self.metrics.job_finished(kind, outcome);
        let span = tracing::Span::current();
        span.record("outcome", outcome.as_str());
        if !rec.error.is_empty() {
            span.record("error", rec.error.as_str());
        }
        match outcome {
            JobOutcome::Succeeded | JobOutcome::Skipped => {
                tracing::info!(job = rec.id, kind = kind.as_str(), outcome = outcome.as_str(), reason = %rec.error, hash = %rec.model_hash, "job ended")
            }
            _ => {
                tracing::warn!(job = rec.id, kind = kind.as_str(), outcome = outcome.as_str(), reason = %rec.error, "job ended")
            }
        }
    }

    async fn release_pin(&self, why: &str) {
        let state = self.commit.lock().await.take();
        if let Some(mut c) = state
            && let Some(pin) = c.pin.take()
        {
            tracing::info!(checkpoint = %c.checkpoint.display(), why, "releasing the commit pin");
            if let Err(e) = pin.release() {
                tracing::warn!(error = %e, "release the commit pin");
            }
        }
    }

    /// Commitments and neurons in the post-state of `block`.
    async fn snapshot(&self, block: u64) -> Result<CommitSnapshot, ChainError> {
        let netuid = self.s.netuid;
        let (commits, mg) = tokio::try_join!(
            traced(
                chain_span("commitments", netuid, Some(block)),
                self.chain.commitments(netuid, block)
            ),
            traced(
                chain_span("metagraph", netuid, Some(block)),
                self.chain.metagraph(netuid, Some(block))
            )
        )
        .inspect_err(|_| self.metrics.rpc_error())?;
        Ok(CommitSnapshot {
            block,
            commitments: commits
                .iter()
                .filter_map(|c| Some((c.hotkey.clone(), c.raw()?.to_vec())))
                .collect(),
            neurons: mg
                .neurons
                .iter()
                .map(|n| NeuronView {
                    uid: n.uid,
                    hotkey: n.hotkey.clone(),
                    stake: n.stake(),
                    last_update: n.last_update,
                    axon_ip: n.axon.ip.to_string(),
                    axon_port: n.axon.port,
                })
                .collect(),
        })
    }

    async fn previous_and_whitelist(&self) -> Result<(PreviousPhases, Vec<String>), String> {
        let deadline = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(30));
        let prev = self
            .phase_src
            .previous_phases(deadline)
            .await
            .map_err(|e| format!("previous phase blocks: {e}"))?;
        let whitelist = match self.phase_src.validator_whitelist(deadline).await {
            Ok(w) => w,
            Err(e) if !self.s.local_whitelist.is_empty() => {
                tracing::warn!(error = %e, "validator whitelist unavailable; using --validator-whitelist");
                self.s.local_whitelist.clone()
            }
            Err(e) => {
                tracing::warn!(error = %e, "validator whitelist unavailable; role gating is off");
                Vec::new()
            }
        };
        Ok((prev, whitelist))
    }

    // ---------------------------------------------------------------- DOWNLOAD

    /// How long a manual download (`LoadBaseline`) may take: one cycle at the block time, so
    /// it cannot hold the download lock forever (a validator dripping bytes).
    pub(crate) fn manual_download_limit(&self) -> std::time::Duration {
        manual_download_limit(self.s.timing.block_time, self.s.schedule.cycle_length())
    }

    async fn download(&self, progress: &std::sync::Mutex<JobRecord>, info: &PhaseInfo) -> End {
        let _one = self.download_lock.lock().await;
        if matches!(
            info.phase_name,
            PhaseName::ValidatorCommit1 | PhaseName::ValidatorCommit2
        ) {
            return End::Skipped(
                "validators are committing; their new baseline is readable after ValidatorCommit2"
                    .into(),
            );
        }
        let (prev, whitelist) = match self.previous_and_whitelist().await {
            Ok(x) => x,
            Err(e) => return End::Failed(e),
        };
        let (Some(b1), Some(b2)) = (
            prev.get(PhaseName::ValidatorCommit1)
                .and_then(|r| r.read_block()),
            prev.get(PhaseName::ValidatorCommit2)
                .and_then(|r| r.read_block()),
        ) else {
            return End::Skipped("no completed ValidatorCommit phases yet".into());
        };
        let (sig, hash) = match tokio::try_join!(self.snapshot(b1), self.snapshot(b2)) {
            Ok(x) => x,
            Err(e) => return End::Failed(e.to_string()),
        };
        let window = version_window(info, &prev, self.s.version_range_cycles);
        let run = self.run.clone();
        let ours = match tokio::task::spawn_blocking(move || run.best()).await {
            Ok(Ok(b)) => b.map(|e| e.global_ver),
            Ok(Err(e)) => return End::Failed(format!("list checkpoints: {e}")),
            Err(e) => return End::Failed(format!("list checkpoints: {e}")),
        };
        let gid = self.s.expert_group.group_id;
        let candidates = download_candidates(&sig, &hash, &whitelist, window, gid, ours);
        if candidates.is_empty() {
            return End::Skipped(format!(
                "no validator checkpoint of expert group {gid} newer than ours ({}) at blocks {b1}/{b2}",
                ours.map(|v| format!("v={v}"))
                    .unwrap_or_else(|| "none".into())
            ));
        }
        let mut errors = Vec::new();
        for cand in &candidates {
            {
                let mut r = progress.lock().unwrap_or_else(|p| p.into_inner());
                r.attempts += 1;
                r.destination = cand.hotkey.clone();
                r.model_hash = cand.model_hash.clone();
                r.global_ver = Some(cand.global_ver);
            }
            note_hash(&cand.model_hash);
            // The axon matters only to the HTTP route; over the Hub the validator's repo does.
            if self.hub.is_none()
                && let Err(why) = check_peer_address(&cand.axon_ip, self.s.peer_addresses)
            {
                tracing::warn!(validator = %cand.hotkey, reason = %why, "validator candidate refused");
                errors.push(format!(
                    "validator {}:{}: {why}",
                    cand.axon_ip, cand.axon_port
                ));
                continue;
            }
            // A manual download (LoadBaseline) is not bound by a phase: it gets one cycle.
            let deadline = Some(
                if progress.lock().unwrap_or_else(|p| p.into_inner()).manual {
                    tokio::time::Instant::now() + self.manual_download_limit()
                } else {
                    self.deadline_for(info.phase_end_block)
                },
            );
            let origin_block = self.head().max(info.block);
            let fetched = match &self.hub {
                Some(hub) => self.download_hub(hub, progress, cand, deadline).await,
                None => download_checkpoint(
                    &self.http,
                    &self.run,
                    &self.s.hotkey,
                    cand,
                    &self.s.expert_group,
                    origin_block,
                    &self.policies.download,
                    deadline,
                )
                .await
                .map_err(|e| e.to_string()),
            };
            match fetched {
                Ok(p) => {
                    let mut r = progress.lock().unwrap_or_else(|p| p.into_inner());
                    r.checkpoint = p.path.display().to_string();
                    tracing::info!(validator = %cand.hotkey, global_ver = cand.global_ver, path = %p.path.display(), "validator baseline published");
                    return End::Succeeded;
                }
                Err(e) => {
                    tracing::warn!(validator = %cand.hotkey, error = %e, "validator candidate failed; trying the next");
                    errors.push(e);
                }
            }
        }
        End::Failed(errors.join("; "))
    }

    // ---------------------------------------------------------------- COMMITS

    /// Our commitment as stored after `block`: (registration block, raw bytes).
    async fn our_commitment(
        &self,
        block: u64,
    ) -> Result<Option<(Option<u64>, Vec<u8>)>, ChainError> {
        let all = traced(
            chain_span("commitments", self.s.netuid, Some(block)),
            self.chain.commitments(self.s.netuid, block),
        )
        .await
        .inspect_err(|_| self.metrics.rpc_error())?;
        let me = self.s.hotkey.public();
        Ok(all
            .into_iter()
            .find(|c| c.hotkey_public == me)
            .and_then(|c| Some((c.block, c.raw()?.to_vec()))))
    }

    /// Our commitment as stored now (the "already on chain" check of a commit job), bounded by
    /// the phase end and the shutdown. A failed read is not fatal (the commit is tried anyway);
    /// its reason is returned for the record.
    #[allow(clippy::type_complexity)]
    async fn read_ours(
        &self,
        info: &PhaseInfo,
    ) -> Result<(Option<(Option<u64>, Vec<u8>)>, Option<String>), End> {
        let end = info.phase_end_block;
        tokio::select! {
            r = self.our_commitment(self.head().max(info.block)) => Ok(match r {
                Ok(x) => (x, None),
                Err(e) => {
                    tracing::warn!(error = %e, phase = info.phase_name.as_str(), "read our commitment before committing");
                    (None, Some(format!("read our commitment: {}", chain_reason(&e))))
                }
            }),
            p = self.block_past(end) => Err(End::Missed(format!(
                "{} ended at block {end} while reading our commitment{}{}",
                info.phase_name.as_str(),
                p.note(self.s.timing.block_time),
                self.chain_down_note()
            ))),
            _ = self.jobs_cancel.cancelled() => Err(End::Cancelled(STOPPING.into())),
        }
    }

    /// Sends `payload` until it is included, the phase is over, or the attempts are spent.
    /// Never starts an extrinsic after shutdown began or after the phase end; one in flight
    /// is let finish. The phase end is our chain head's, or while the chain is away the phase
    /// source's, or failing both the block time's (so the job ends even in a total outage).
    /// `prior_err`: why the preceding chain read failed, if it did.
    pub(crate) async fn commit_in_phase(
        &self,
        progress: &std::sync::Mutex<JobRecord>,
        info: &PhaseInfo,
        payload: &[u8],
        prior_err: Option<String>,
    ) -> End {
        let end = info.phase_end_block;
        let max_attempts = self.policies.commit_attempts.max(1);
        let mut last_err = prior_err.unwrap_or_default();
        // Sends tried; a failure to reach the chain (nothing sent) does not count.
        let mut tried = 0u32;
        // The block we are at: the estimate, or one more per block the clock says is over
        // while neither the chain nor the phase source shows one.
        let mut at = 0u64;
        let mut by_clock = String::new();
        loop {
            if self.jobs_cancel.is_cancelled() {
                return End::Cancelled(format!(
                    "{STOPPING}{}",
                    if last_err.is_empty() {
                        String::new()
                    } else {
                        format!(" (last error: {last_err})")
                    }
                ));
            }
            at = at.max(self.block_estimate());
            let left = (end + 1).saturating_sub(at);
            if left < self.s.timing.min_commit_blocks {
                let why = format!(
                    "{left} block(s) left in {} (ends at {end}), a commit needs {}{by_clock}",
                    info.phase_name.as_str(),
                    self.s.timing.min_commit_blocks
                );
                return End::Missed(if last_err.is_empty() {
                    format!("{why}{}", self.chain_down_note())
                } else {
                    format!("{why}; last error: {last_err}")
                });
            }
            if tried >= max_attempts {
                return End::Failed(format!("{tried} attempts failed; last error: {last_err}"));
            }
            tried += 1;
            progress.lock().unwrap_or_else(|p| p.into_inner()).attempts += 1;
            let t0 = Instant::now();
            let span = chain_span("set_commitment", self.s.netuid, None);
            let r: Result<CommitReceipt, ChainError> = traced(
                span.clone(),
                self.chain
                    .set_commitment(&self.s.hotkey, self.s.netuid, payload),
            )
            .await;
            if let Ok(receipt) = &r {
                span.record("included_block", receipt.block);
            }
            match r {
                Ok(receipt) => {
                    self.metrics.commit_latency(t0.elapsed().as_secs_f64());
                    progress
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .included_block = Some(receipt.block);
                    if receipt.block > end + 1 {
                        return End::Missed(format!(
                            "included in block {} after {} ended at {end}; validators read block {}",
                            receipt.block,
                            info.phase_name.as_str(),
                            end + 1
                        ));
                    }
                    return End::Succeeded;
                }
                Err(e) => {
                    self.metrics.rpc_error();
                    tracing::warn!(error = %e, phase = info.phase_name.as_str(), "commit failed");
                    if matches!(e, ChainError::Unavailable { .. }) {
                        // Nothing was sent: the chain was not reached. The phase end bounds
                        // the retries instead.
                        tried -= 1;
                    }
                    last_err = chain_reason(&e);
                    // Wait a block before retrying (the failure may be a rate limit); in an
                    // outage the block may only be known by the clock.
                    at = at.max(self.block_estimate());
                    tokio::select! {
                        p = self.block_past(at) => {
                            by_clock = p.note(self.s.timing.block_time);
                            if let Passed::Clock(_) = p {
                                at += 1;
                            }
                        }
                        _ = self.jobs_cancel.cancelled() => {}
                    }
                }
            }
        }
    }

    /// Hashes the model shard of `dir`, `.safetensors` or `.pt` (blocking work off the runtime).
    async fn hash_model(&self, dir: &Path) -> Result<ModelHash, String> {
        let file = shard_path(dir, self.s.expert_group.group_id);
        let f2 = file.clone();
        match tokio::task::spawn_blocking(move || miner_contract::shard::hash_shard_file(&f2)).await
        {
            Ok(Ok(h)) => Ok(h),
            Ok(Err(e)) => Err(format!("hash {}: {e}", file.display())),
            Err(e) => Err(format!("hash {}: {e}", file.display())),
        }
    }

    async fn commit1(&self, progress: &std::sync::Mutex<JobRecord>, info: &PhaseInfo) -> End {
        // A previous cycle's pin is no longer needed.
        {
            let mut st = self.commit.lock().await;
            if st.as_ref().is_some_and(|c| c.cycle != info.cycle_index) {
                drop(st.take());
            }
        }
        let prep = async {
            let run = self.run.clone();
            let best = match tokio::task::spawn_blocking(move || run.best_own()).await {
                Ok(Ok(Some(b))) => b,
                Ok(Ok(None)) => return Err(End::Skipped("no own checkpoint to commit".into())),
                Ok(Err(e)) => return Err(End::Failed(format!("list own checkpoints: {e}"))),
                Err(e) => return Err(End::Failed(format!("list own checkpoints: {e}"))),
            };
            let best = self.fresh_checkpoint(best, info).await;
            let pin = self
                .run
                .pin(&best.name, PIN_HOLDER, self.s.timing.pin_ttl)
                .map_err(|e| End::Failed(format!("pin {}: {e}", best.path.display())))?;
            {
                let mut r = progress.lock().unwrap_or_else(|p| p.into_inner());
                r.checkpoint = best.path.display().to_string();
                r.global_ver = Some(best.global_ver);
            }
            let hash = self.hash_model(&best.path).await.map_err(End::Failed)?;
            Ok((best.path.clone(), best.global_ver, hash, pin))
        };
        let (path, global_ver, hash, pin): (PathBuf, u64, ModelHash, PinGuard) = tokio::select! {
            r = prep => match r { Ok(x) => x, Err(end) => return end },
            p = self.block_past(info.phase_end_block) => return End::Missed(format!(
                "MinerCommit1 ended at block {} while preparing the commit{}{}",
                info.phase_end_block, p.note(self.s.timing.block_time), self.chain_down_note())),
            _ = self.jobs_cancel.cancelled() => return End::Cancelled(STOPPING.into()),
        };
        let hex = hash.to_hex();
        note_hash(&hex);
        progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .model_hash = hex.clone();
        let state = CycleCommit {
            cycle: info.cycle_index,
            checkpoint: path,
            model_hash: hex.clone(),
            global_ver,
            pin: Some(pin),
            upload: None,
        };

        // Restart safety: a `{"m"}` of ours made in this phase that signs this hash is kept.
        let (read, prior_err) = match self.read_ours(info).await {
            Ok(r) => r,
            Err(end) => return end,
        };
        let mut on_chain = None;
        if let Some((Some(at), raw)) = read
            && (info.phase_start_block..=info.phase_end_block + 1).contains(&at)
            && let Some(m) = parse_commitment(&raw).and_then(|c| c.signed_model_hash)
            && crate::transport::verify::verify_hash_signature(self.s.hotkey.ss58(), &hex, &m)
                .is_ok()
        {
            progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .included_block = Some(at);
            tracing::info!(
                block = at,
                "our MinerCommit1 commitment for this cycle is already on chain"
            );
            on_chain = Some(at);
        }
        let payload = if on_chain.is_some() {
            None
        } else {
            let sig = miner_keys::b64url_nopad_encode(&self.s.hotkey.sign(hex.as_bytes()));
            match (SignedModelHashCommit {
                signed_model_hash: sig,
            })
            .to_payload()
            {
                Ok(p) => Some(p),
                Err(e) => return End::Failed(format!("commit-1 payload: {e}")),
            }
        };
        if let Some(hub) = self.hub.clone() {
            return self
                .commit1_hub(&hub, progress, info, payload, prior_err, state)
                .await;
        }
        let Some(payload) = payload else {
            *self.commit.lock().await = Some(state);
            return End::Succeeded;
        };
        let end = self
            .commit_in_phase(progress, info, &payload, prior_err)
            .await;
        if end == End::Succeeded {
            *self.commit.lock().await = Some(state);
        }
        // Otherwise the pin drops here: nothing was committed.
        end
    }

    /// The commit state of `cycle`: in memory, or rebuilt after a restart from this cycle's
    /// successful COMMIT1 record (re-pinning its checkpoint).
    async fn cycle_commit(&self, cycle: u64) -> Option<(PathBuf, String, u64)> {
        let mut st = self.commit.lock().await;
        if let Some(c) = st.as_ref().filter(|c| c.cycle == cycle) {
            return Some((c.checkpoint.clone(), c.model_hash.clone(), c.global_ver));
        }
        let r = self
            .log
            .find(JobKind::Commit1, cycle)
            .filter(|r| r.outcome == JobOutcome::Succeeded)?;
        let path = PathBuf::from(&r.checkpoint);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(CheckpointName::parse)?;
        let pin = match self.run.pin(&name, PIN_HOLDER, self.s.timing.pin_ttl) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "re-pin the committed checkpoint after a restart");
                None
            }
        };
        let gv = r.global_ver.unwrap_or(name.global_ver());
        *st = Some(CycleCommit {
            cycle,
            checkpoint: path.clone(),
            model_hash: r.model_hash.clone(),
            global_ver: gv,
            pin,
            upload: None,
        });
        Some((path, r.model_hash, gv))
    }

    async fn commit2(&self, progress: &std::sync::Mutex<JobRecord>, info: &PhaseInfo) -> End {
        self.wait_commit1(info).await;
        let Some((path, hex, global_ver)) = self.cycle_commit(info.cycle_index).await else {
            return End::Skipped("no MinerCommit1 commitment this cycle".into());
        };
        {
            let mut r = progress.lock().unwrap_or_else(|p| p.into_inner());
            r.checkpoint = path.display().to_string();
            r.model_hash = hex.clone();
            r.global_ver = Some(global_ver);
        }
        note_hash(&hex);
        let payload = if let Some(hub) = self.hub.clone() {
            match self
                .commit2_hub(&hub, progress, info, hex, global_ver)
                .await
            {
                Ok(p) => p,
                Err(end) => return end,
            }
        } else {
            let commit = MinerCommit {
                expert_group: self.s.expert_group.group_id,
                model_hash: hex,
                global_ver,
                hf_repo_id: None,
                hf_revision: None,
            };
            match commit.to_payload() {
                Ok(p) => p,
                Err(e) => return End::Failed(format!("commit-2 payload: {e}")),
            }
        };
        let (read, prior_err) = match self.read_ours(info).await {
            Ok(r) => r,
            Err(end) => return end,
        };
        if let Some((Some(at), raw)) = read
            && (info.phase_start_block..=info.phase_end_block + 1).contains(&at)
            && raw == payload
        {
            progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .included_block = Some(at);
            tracing::info!(
                block = at,
                "our MinerCommit2 commitment for this cycle is already on chain"
            );
            return End::Succeeded;
        }
        self.commit_in_phase(progress, info, &payload, prior_err)
            .await
    }

    // ---------------------------------------------------------------- SUBMIT

    async fn submit(&self, progress: &std::sync::Mutex<JobRecord>, info: &PhaseInfo) -> End {
        let committed = self
            .log
            .find(JobKind::Commit2, info.cycle_index)
            .is_some_and(|r| r.outcome == JobOutcome::Succeeded);
        if !committed {
            return End::Skipped("nothing committed at MinerCommit2 this cycle".into());
        }
        let Some((path, hex, global_ver)) = self.cycle_commit(info.cycle_index).await else {
            return End::Skipped("no committed checkpoint this cycle".into());
        };
        {
            let mut r = progress.lock().unwrap_or_else(|p| p.into_inner());
            r.checkpoint = path.display().to_string();
            r.model_hash = hex.clone();
            r.global_ver = Some(global_ver);
        }
        note_hash(&hex);
        let (prev, whitelist) = match self.previous_and_whitelist().await {
            Ok(x) => x,
            Err(e) => return End::Failed(e),
        };
        let (Some(b1), Some(b2)) = (
            prev.get(PhaseName::MinerCommit1)
                .and_then(|r| r.read_block()),
            prev.get(PhaseName::MinerCommit2)
                .and_then(|r| r.read_block()),
        ) else {
            return End::Failed("the MinerCommit phases of this cycle are not readable".into());
        };
        let (sig, hash) = match tokio::try_join!(self.snapshot(b1), self.snapshot(b2)) {
            Ok(x) => x,
            Err(e) => return End::Failed(e.to_string()),
        };
        let gid = self.s.expert_group.group_id;
        let window = version_window(info, &prev, self.s.version_range_cycles);
        let complete: Vec<_> = chain_checkpoints(
            &sig,
            &hash,
            &whitelist,
            DEFAULT_MAX_WEIGHT_AGE,
            window,
            ForRole::Miner,
            false,
        )
        .into_iter()
        .filter(|c| c.expert_group == gid && c.role == Role::Miner)
        .collect();
        let me = self.s.hotkey.ss58().to_owned();
        let Some(ours) = complete.iter().find(|c| c.hotkey == me) else {
            return End::Failed(format!(
                "our checkpoint is not complete on chain at blocks {b1}/{b2} (signature, hash, version window {window:?})"
            ));
        };
        if ours.model_hash != hex {
            return End::Failed(format!(
                "the chain shows hash {} for us at block {b2}, not the committed {hex}",
                ours.model_hash
            ));
        }
        if let Some(hub) = self.hub.clone() {
            return self.submit_hub(&hub, progress, ours).await;
        }
        let miners: Vec<String> = complete.iter().map(|c| c.hotkey.clone()).collect();
        let mut validators: Vec<(String, u64)> = Vec::new();
        for rc in read_commits(&hash, &whitelist, DEFAULT_MAX_WEIGHT_AGE) {
            if rc.role != Role::Validator {
                continue;
            }
            let Some(c) = rc.commit else { continue };
            if c.expert_group == Some(gid)
                && !validators.iter().any(|(h, _)| *h == rc.neuron.hotkey)
            {
                validators.push((rc.neuron.hotkey.clone(), c.miner_seed.unwrap_or(0)));
            }
        }
        let assignment =
            assign_miners_to_validators(&validators, &miners, self.s.max_miners_per_validator);
        let Some(dest) = validator_for(&assignment, &me).map(str::to_owned) else {
            return End::Skipped(format!(
                "not assigned to any of {} validator(s) of expert group {gid}",
                validators.len()
            ));
        };
        progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .destination = dest.clone();
        let Some(neuron) = hash.neurons.iter().find(|n| n.hotkey == dest) else {
            return End::Failed(format!("validator {dest} is not in the metagraph"));
        };
        if !axon_is_served(&neuron.axon_ip, neuron.axon_port) {
            return End::Failed(format!(
                "validator {dest} serves no axon ({}:{})",
                neuron.axon_ip, neuron.axon_port
            ));
        }
        if let Err(why) = check_peer_address(&neuron.axon_ip, self.s.peer_addresses) {
            return End::Failed(format!("validator {dest}: {why}"));
        }
        let model_hash: ModelHash = match hex.parse() {
            Ok(h) => h,
            Err(e) => return End::Failed(format!("committed hash {hex:?}: {e}")),
        };
        let file = shard_path(&path, gid);
        let sub = Submission {
            peer: Peer {
                ip: neuron.axon_ip.clone(),
                port: neuron.axon_port,
                hotkey_ss58: dest.clone(),
            },
            file: &file,
            expert_group: gid,
            model_hash,
            origin_block: self.head().max(info.block),
        };
        let deadline = Some(self.deadline_for(info.phase_end_block));
        match submit_checkpoint(
            &self.http,
            &self.s.hotkey,
            &sub,
            &self.policies.submit,
            deadline,
        )
        .await
        {
            Ok(receipt) => {
                progress.lock().unwrap_or_else(|p| p.into_inner()).attempts = receipt.attempts;
                tracing::info!(validator = %dest, body = %receipt.body, "submission accepted");
                End::Succeeded
            }
            Err(e) => End::Failed(e.to_string()),
        }
    }
}

/// [`Engine::manual_download_limit`]: `cycle_length` blocks of `block_time`, at least a minute.
pub(crate) fn manual_download_limit(
    block_time: std::time::Duration,
    cycle_length: u64,
) -> std::time::Duration {
    block_time
        .saturating_mul(u32::try_from(cycle_length).unwrap_or(u32::MAX))
        .max(std::time::Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_manual_download_gets_one_cycle_and_at_least_a_minute() {
        // Mainnet: 500 blocks of 12 s.
        assert_eq!(
            super::manual_download_limit(Duration::from_secs(12), 500),
            Duration::from_secs(6000)
        );
        // A fast devnet still gets a minute; absurd inputs do not overflow.
        assert_eq!(
            super::manual_download_limit(Duration::from_millis(100), 20),
            Duration::from_secs(60)
        );
        assert!(super::manual_download_limit(Duration::MAX, u64::MAX) >= Duration::from_secs(60));
    }
}
