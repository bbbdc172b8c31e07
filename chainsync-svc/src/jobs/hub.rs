//! The jobs over the Hugging Face Hub transport (spec §6.1, §10.1; addendum A1, B).
//!
//! A submission is the triple (commit-1 signature, commit-2 `{"e","h","v","r","rv"}`, the shard
//! in our repo at revision `rv`). COMMIT1 commits `{"m"}` and uploads the shard; COMMIT2 waits
//! for the upload, checks **without a token** that the file is fetchable at the 7-character
//! revision (what validators do), then commits `{"e","h","v","r","rv"}`. SUBMIT reads both
//! commits back where validators read them and fetches the file token-free, as a validator of
//! the Submission phase would.
//!
//! The copy guard (`hf.copy_guard`, on by default) closes the window of spec §4.5: the shard is
//! uploaded while the repo is PRIVATE (created private, or made private before the upload if
//! an earlier cycle left it public) and the repo is made public only once the chain head is past
//! MinerCommit1's last block, when a copier can no longer land a commit-1 of its own. Without
//! the guard the reference's order stays: commit-1, a public upload, commit-2.
//!
//! **Invariant:** nothing is half-published: commit-2 names a revision only after the file was
//! fetched token-free at that revision with the uploaded size; an upload, a visibility change
//! or a check that cannot finish inside MinerCommit2 leaves no commit-2 and a record saying why.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use miner_hub::{HubError, RepoId};
use tokio::sync::watch;

use super::run::{End, STOPPING};
use super::{CycleCommit, Engine, JobKind, JobOutcome, JobRecord};
use crate::commitment::{ChainCheckpoint, MinerCommit};
use crate::hub::{HubRuntime, KIND, chain_revision};
use crate::phase::{PhaseInfo, PhaseName};
use crate::transport::hub::{HubFetchProgress, ShardKind, download_from_hub};

/// Pause between tries of a Hub call that failed transiently (429, 5xx, a timeout); the Hub
/// client itself already retried the request and honoured `Retry-After`.
const HUB_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Where this cycle's upload stands (COMMIT1 sends, COMMIT2 waits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UploadState {
    Running {
        done: u64,
        total: u64,
    },
    Done(Uploaded),
    /// `missed`: it could not finish inside MinerCommit2 (rather than failing).
    Failed {
        missed: bool,
        reason: String,
    },
}

/// A finished upload: the shard is in `repo` at commit `oid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Uploaded {
    pub repo: RepoId,
    /// The file name in the repo (`model_expgroup_<gid>.<ext>`).
    pub file: String,
    /// The 7-character revision committed on chain.
    pub rv: String,
    pub size: u64,
}

/// The shard file of our checkpoint directory `dir` (`.safetensors` preferred, as validators
/// read it) and its name in the repo.
pub(crate) fn own_shard(dir: &Path, gid: u32) -> (PathBuf, String) {
    for kind in ShardKind::IN_ORDER {
        let name = kind.file_name(gid);
        let p = dir.join(&name);
        if p.is_file() {
            return (p, name);
        }
    }
    let name = ShardKind::Pt.file_name(gid);
    (dir.join(&name), name)
}

/// `, the miner's fault: ...` for errors only the operator can fix.
fn fault(e: &HubError, repo: &RepoId) -> String {
    match e {
        HubError::Unauthorized { .. } | HubError::Forbidden { .. } => {
            format!(" (the miner's fault: the token cannot write to {repo}; it needs write access)")
        }
        _ => String::new(),
    }
}

impl Engine {
    fn show(&self, progress: &std::sync::Mutex<JobRecord>, f: impl FnOnce(&mut JobRecord)) {
        let mut r = progress.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut r);
        self.log.show(&r);
    }

    /// Retries a Hub call while it fails transiently; other errors are returned at once.
    /// Bounded by the caller (its future is dropped at the phase end).
    async fn hub_retry<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, HubError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, HubError>>,
    {
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, what, "Hub call failed; retrying");
                    tokio::time::sleep(HUB_RETRY_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    // ---------------------------------------------------------------- DOWNLOAD

    /// One validator candidate over the Hub; the record shows the repo, revision and bytes.
    pub(crate) async fn download_hub(
        &self,
        hub: &HubRuntime,
        progress: &std::sync::Mutex<JobRecord>,
        cand: &ChainCheckpoint,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<miner_contract::Published, String> {
        let show = |p: &HubFetchProgress| {
            self.show(progress, |r| {
                r.hf_repo = p.repo.clone();
                r.hf_revision = p.revision.clone();
                r.bytes_done = p.bytes_done;
                r.bytes_total = p.bytes_total;
            })
        };
        download_from_hub(
            &hub.client,
            &self.run,
            cand,
            &self.s.expert_group,
            self.policies.download.retries.saturating_add(1),
            deadline,
            &show,
        )
        .await
        .map_err(|e| e.to_string())
    }

    // ---------------------------------------------------------------- COMMIT1

    /// Makes the repo ready for this cycle's upload: private under the copy guard (created
    /// private, or made private if an earlier cycle left it public), else created public.
    async fn prepare_repo(&self, hub: &HubRuntime) -> Result<(), String> {
        let repo = &hub.repo;
        let why = |what: &str, e: HubError| format!("{what} {repo}: {e}{}", fault(&e, repo));
        let created = self
            .hub_retry("create repo", || {
                hub.client.create_repo(repo, KIND, hub.copy_guard)
            })
            .await
            .map_err(|e| why("create", e))?;
        if !hub.copy_guard || created {
            return Ok(());
        }
        let info = self
            .hub_retry("repo info", || hub.client.repo_info(repo, KIND, None))
            .await
            .map_err(|e| why("read the visibility of", e))?;
        if !info.private {
            tracing::info!(repo = %repo, "copy guard: making the repo private before the upload");
            self.hub_retry("make private", || hub.client.set_private(repo, KIND, true))
                .await
                .map_err(|e| why("make private", e))?;
        }
        Ok(())
    }

    /// Uploads the shard (after [`Self::prepare_repo`]), retrying transient failures; sends
    /// progress to `tx` and the record. Bounded by the caller.
    async fn upload_shard(
        &self,
        hub: &HubRuntime,
        progress: &std::sync::Mutex<JobRecord>,
        file: &Path,
        name: &str,
        summary: &str,
        tx: &watch::Sender<UploadState>,
    ) -> Result<Uploaded, String> {
        self.prepare_repo(hub).await?;
        let repo = &hub.repo;
        let size = std::fs::metadata(file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .len();
        loop {
            let (ptx, mut prx) = watch::channel(0u64);
            let up = hub
                .client
                .upload_file(repo, KIND, file, name, summary, Some(ptx));
            let forward = async {
                while prx.changed().await.is_ok() {
                    let n = *prx.borrow_and_update();
                    self.show(progress, |r| r.bytes_done = n);
                    tx.send_replace(UploadState::Running {
                        done: n,
                        total: size,
                    });
                }
                std::future::pending::<()>().await
            };
            let r = tokio::select! {
                biased;
                r = up => r,
                _ = forward => unreachable!("the forwarder never ends"),
            };
            match r {
                Ok(ci) => {
                    let rv = chain_revision(&ci.oid);
                    self.show(progress, |r| {
                        r.bytes_done = size;
                        r.hf_revision = rv.clone();
                    });
                    return Ok(Uploaded {
                        repo: repo.clone(),
                        file: name.to_owned(),
                        rv,
                        size,
                    });
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, repo = %repo, "shard upload failed; retrying");
                    tokio::time::sleep(HUB_RETRY_PAUSE).await;
                }
                Err(e) => return Err(format!("upload {name} to {repo}: {e}{}", fault(&e, repo))),
            }
        }
    }

    /// COMMIT1 over the Hub: commits `{"m"}` (`payload`; `None` when this cycle's is already on
    /// chain) and uploads the shard: at once under the copy guard (the repo is private), after
    /// the commit without it (the reference's order). The commit is bounded by MinerCommit1, the
    /// upload by MinerCommit2's end.
    pub(crate) async fn commit1_hub(
        &self,
        hub: &HubRuntime,
        progress: &std::sync::Mutex<JobRecord>,
        info: &PhaseInfo,
        payload: Option<Vec<u8>>,
        prior_err: Option<String>,
        mut state: CycleCommit,
    ) -> End {
        let gid = self.s.expert_group.group_id;
        let (file, name) = own_shard(&state.checkpoint, gid);
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let (tx, rx) = watch::channel(UploadState::Running {
            done: 0,
            total: size,
        });
        state.upload = Some(rx);
        self.show(progress, |r| {
            r.hf_repo = hub.repo.to_string();
            r.bytes_total = size;
        });
        let summary = format!(
            "miner submission global_ver={} expert_group={gid}",
            state.global_ver
        );
        let mc2_end = info.phase_end_block + self.s.schedule.phase_len(PhaseName::MinerCommit2);
        let upload = self.upload_shard(hub, progress, &file, &name, &summary, &tx);
        tokio::pin!(upload);
        let commit = async {
            match &payload {
                None => End::Succeeded,
                Some(p) => self.commit_in_phase(progress, info, p, prior_err).await,
            }
        };
        let mut early: Option<Result<Uploaded, String>> = None;
        let committed = if hub.copy_guard {
            tokio::pin!(commit);
            loop {
                tokio::select! {
                    e = &mut commit => break e,
                    u = &mut upload, if early.is_none() => early = Some(u),
                }
            }
        } else {
            commit.await
        };
        if committed != End::Succeeded {
            // The upload (private under the guard) is dropped; no commit-2 will name it.
            tx.send_replace(UploadState::Failed {
                missed: false,
                reason: "commit-1 did not succeed".into(),
            });
            return committed;
        }
        *self.commit.lock().await = Some(state);
        let result = match early {
            Some(u) => u.map_err(End::Failed),
            None => tokio::select! {
                u = &mut upload => u.map_err(End::Failed),
                p = self.block_past(mc2_end) => {
                    let r = progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    Err(End::Missed(format!(
                        "the upload of {name} to {} had sent {} of {} bytes when MinerCommit2 ended at block {mc2_end}{}{}",
                        hub.repo, r.bytes_done, r.bytes_total, p.note(self.s.timing.block_time), self.chain_down_note()
                    )))
                }
                _ = self.jobs_cancel.cancelled() => Err(End::Cancelled(STOPPING.into())),
            },
        };
        match result {
            Ok(up) => {
                tracing::info!(repo = %up.repo, rv = %up.rv, bytes = up.size, private = hub.copy_guard, "shard uploaded");
                tx.send_replace(UploadState::Done(up));
                End::Succeeded
            }
            Err(end) => {
                let (missed, reason) = match &end {
                    End::Missed(r) => (true, r.clone()),
                    End::Failed(r) | End::Cancelled(r) | End::Skipped(r) => (false, r.clone()),
                    End::Succeeded => (false, String::new()),
                };
                tx.send_replace(UploadState::Failed { missed, reason });
                end
            }
        }
    }

    // ---------------------------------------------------------------- COMMIT2

    /// This cycle's upload: in memory, or after a restart from a successful COMMIT1 record.
    async fn upload_of(&self, cycle: u64) -> Option<watch::Receiver<UploadState>> {
        if let Some(rx) = self
            .commit
            .lock()
            .await
            .as_ref()
            .filter(|c| c.cycle == cycle)
            .and_then(|c| c.upload.clone())
        {
            return Some(rx);
        }
        let r = self
            .log
            .find(JobKind::Commit1, cycle)
            .filter(|r| r.outcome == JobOutcome::Succeeded && !r.hf_revision.is_empty())?;
        let repo: RepoId = r.hf_repo.parse().ok()?;
        let (_, name) = own_shard(Path::new(&r.checkpoint), self.s.expert_group.group_id);
        let (_tx, rx) = watch::channel(UploadState::Done(Uploaded {
            repo,
            file: name,
            rv: r.hf_revision.clone(),
            size: r.bytes_total,
        }));
        Some(rx)
    }

    /// Waits (inside MinerCommit2) for this cycle's upload to end.
    async fn wait_upload(&self, info: &PhaseInfo) -> Result<Uploaded, End> {
        let end = info.phase_end_block;
        let Some(mut rx) = self.upload_of(info.cycle_index).await else {
            return Err(End::Skipped(
                "no shard upload this cycle (COMMIT1 did not start one)".into(),
            ));
        };
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                UploadState::Done(u) => return Ok(u),
                UploadState::Failed {
                    missed: true,
                    reason,
                } => {
                    return Err(End::Missed(format!("nothing committed: {reason}")));
                }
                UploadState::Failed { reason, .. } => {
                    return Err(End::Failed(format!(
                        "nothing committed: the upload failed: {reason}"
                    )));
                }
                UploadState::Running { done, total } => {
                    tokio::select! {
                        r = rx.changed() => if r.is_err() {
                            return Err(End::Failed("the upload ended without a result".into()));
                        },
                        p = self.block_past(end) => return Err(End::Missed(format!(
                            "the upload had sent {done} of {total} bytes when MinerCommit2 ended at block {end}{}",
                            p.note(self.s.timing.block_time)
                        ))),
                        _ = self.jobs_cancel.cancelled() => return Err(End::Cancelled(STOPPING.into())),
                    }
                }
            }
        }
    }

    /// Copy guard: once the head is past MinerCommit1's last block, makes the repo public
    /// (retrying until MinerCommit2 ends).
    async fn go_public(&self, hub: &HubRuntime, info: &PhaseInfo) -> Result<(), End> {
        let end = info.phase_end_block;
        let mc1_end = info.phase_start_block.saturating_sub(1);
        let repo = &hub.repo;
        let mut last = String::new();
        let work = async {
            self.block_past(mc1_end).await;
            loop {
                match hub.client.set_private(repo, KIND, false).await {
                    Ok(()) => return Ok(()),
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, repo = %repo, "make the repo public; retrying");
                        last = e.to_string();
                        tokio::time::sleep(HUB_RETRY_PAUSE).await;
                    }
                    Err(e) => {
                        return Err(End::Failed(format!(
                            "could not make {repo} public: {e}{}; nothing committed",
                            fault(&e, repo)
                        )));
                    }
                }
            }
        };
        tokio::select! {
            r = work => r,
            p = self.block_past(end) => Err(End::Missed(format!(
                "could not make {repo} public before MinerCommit2 ended at block {end}{}{}; nothing committed",
                p.note(self.s.timing.block_time),
                if last.is_empty() { String::new() } else { format!(": {last}") }
            ))),
            _ = self.jobs_cancel.cancelled() => Err(End::Cancelled(STOPPING.into())),
        }
    }

    /// What validators do: fetch the file token-free at the 7-character revision. Under the
    /// copy guard a 401/404 right after the visibility change is retried (the Hub may be slow
    /// to serve it) until MinerCommit2 ends; without it a private repo or a missing file is
    /// the miner's fault at once. Also refuses a stale `.safetensors` that validators would
    /// read instead of an uploaded `.pt`.
    async fn check_fetchable(
        &self,
        hub: &HubRuntime,
        info: &PhaseInfo,
        up: &Uploaded,
    ) -> Result<Duration, End> {
        let end = info.phase_end_block;
        let t0 = Instant::now();
        let mut last = String::new();
        let work = async {
            loop {
                match hub.anon.head_file(&up.repo, KIND, &up.rv, &up.file).await {
                    Ok(meta) if meta.size == up.size && meta.commit.starts_with(&up.rv) => {
                        return Ok(());
                    }
                    Ok(meta) => {
                        return Err(End::Failed(format!(
                            "the Hub serves {}@{}/{} as {} bytes at commit {}, not the {} bytes uploaded; nothing committed",
                            up.repo, up.rv, up.file, meta.size, meta.commit, up.size
                        )));
                    }
                    Err(e) if e.is_transient() => last = e.to_string(),
                    Err(e @ (HubError::NotFound { .. } | HubError::Unauthorized { .. }))
                        if hub.copy_guard =>
                    {
                        last = e.to_string()
                    }
                    Err(e) => return Err(End::Failed(self.not_fetchable(hub, up, &e).await)),
                }
                tokio::time::sleep(HUB_RETRY_PAUSE).await;
            }
        };
        tokio::select! {
            r = work => r?,
            p = self.block_past(end) => return Err(End::Missed(format!(
                "{}@{}/{} was not fetchable without a token before MinerCommit2 ended at block {end}{}{}; nothing committed",
                up.repo, up.rv, up.file, p.note(self.s.timing.block_time),
                if last.is_empty() { String::new() } else { format!(": {last}") }
            ))),
            _ = self.jobs_cancel.cancelled() => return Err(End::Cancelled(STOPPING.into())),
        }
        let took = t0.elapsed();
        if up.file.ends_with(".pt") {
            let st = ShardKind::Safetensors.file_name(self.s.expert_group.group_id);
            if hub
                .anon
                .head_file(&up.repo, KIND, &up.rv, &st)
                .await
                .is_ok()
            {
                return Err(End::Failed(format!(
                    "{}@{} also holds {st}, which validators read before {}: remove it from the repo; nothing committed",
                    up.repo, up.rv, up.file
                )));
            }
        }
        Ok(took)
    }

    /// Why validators cannot fetch the file (a private repo or a missing file: ours to fix).
    async fn not_fetchable(&self, hub: &HubRuntime, up: &Uploaded, e: &HubError) -> String {
        let private = hub
            .client
            .repo_info(&up.repo, KIND, None)
            .await
            .map(|i| i.private)
            .ok();
        let cause = match private {
            Some(true) => format!(
                "the repo {} is private (the miner's fault: make it public, or turn hf.copy_guard on to publish it after MinerCommit1)",
                up.repo
            ),
            _ => format!(
                "{} is missing at revision {} (the miner's fault)",
                up.file, up.rv
            ),
        };
        format!(
            "validators cannot fetch {}@{}/{} without a token ({e}): {cause}; nothing committed",
            up.repo, up.rv, up.file
        )
    }

    /// COMMIT2 over the Hub: the upload's result, the copy guard's visibility change, the
    /// token-free check, then the commitment with `r` and `rv`.
    pub(crate) async fn commit2_hub(
        &self,
        hub: &HubRuntime,
        progress: &std::sync::Mutex<JobRecord>,
        info: &PhaseInfo,
        hex: String,
        global_ver: u64,
    ) -> Result<Vec<u8>, End> {
        let up = self.wait_upload(info).await?;
        self.show(progress, |r| {
            r.hf_repo = up.repo.to_string();
            r.hf_revision = up.rv.clone();
            r.bytes_done = up.size;
            r.bytes_total = up.size;
        });
        let since_mc1 = Instant::now();
        if hub.copy_guard {
            self.go_public(hub, info).await?;
        }
        self.check_fetchable(hub, info, &up).await?;
        tracing::info!(
            repo = %up.repo, rv = %up.rv, file = %up.file,
            ms = since_mc1.elapsed().as_millis() as u64,
            copy_guard = hub.copy_guard,
            "the shard is fetchable without a token"
        );
        let commit = MinerCommit {
            expert_group: self.s.expert_group.group_id,
            model_hash: hex,
            global_ver,
            hf_repo_id: Some(up.repo.to_string()),
            hf_revision: Some(up.rv.clone()),
        };
        commit
            .to_payload()
            .map_err(|e| End::Failed(format!("commit-2 payload: {e}")))
    }

    // ---------------------------------------------------------------- SUBMIT

    /// SUBMIT over the Hub: there is no request to a validator (spec §6.1); this checks what
    /// validators will find in Submission: our checkpoint complete on chain with `r`/`rv`, and
    /// the file they read first (`.safetensors`, then `.pt`) fetchable token-free.
    pub(crate) async fn submit_hub(
        &self,
        hub: &HubRuntime,
        progress: &std::sync::Mutex<JobRecord>,
        ours: &ChainCheckpoint,
    ) -> End {
        let (Some(r), Some(rv)) = (&ours.hf_repo_id, &ours.hf_revision) else {
            return End::Failed(
                "our commit-2 carries no Hub coordinates (r, rv): validators score it 0".into(),
            );
        };
        let Ok(repo) = r.parse::<RepoId>() else {
            return End::Failed(format!("our committed repo {r:?} is not a repo id"));
        };
        self.show(progress, |rec| {
            rec.hf_repo = r.clone();
            rec.hf_revision = rv.clone();
            rec.destination = format!("hub:{r}@{rv}");
        });
        let gid = self.s.expert_group.group_id;
        for kind in ShardKind::IN_ORDER {
            let name = kind.file_name(gid);
            match self
                .hub_retry("head", || hub.anon.head_file(&repo, KIND, rv, &name))
                .await
            {
                Ok(meta) => {
                    self.show(progress, |rec| {
                        rec.bytes_done = meta.size;
                        rec.bytes_total = meta.size;
                    });
                    tracing::info!(repo = %repo, rv, file = %name, bytes = meta.size, "validators can fetch our shard");
                    return End::Succeeded;
                }
                Err(HubError::NotFound { .. }) => continue,
                Err(e) => {
                    return End::Failed(format!(
                        "validators cannot fetch {repo}@{rv}/{name} without a token: {e}"
                    ));
                }
            }
        }
        End::Failed(format!(
            "validators find neither shard at {repo}@{rv} without a token (the miner's fault)"
        ))
    }
}

impl Engine {
    /// The checkpoint COMMIT1 should commit: `best`, unless it is older than the version window
    /// (spec §3.7: validators refuse it) while a newer verified baseline is loaded; then waits,
    /// inside MinerCommit1 and leaving the blocks a commit needs, for the trainer to publish its
    /// first checkpoint trained from that baseline (the devnet once saw COMMIT1 pick the old
    /// checkpoint 170 ms before the new one appeared, and the submission was refused).
    pub(crate) async fn fresh_checkpoint(
        &self,
        best: miner_contract::CheckpointEntry,
        info: &PhaseInfo,
    ) -> miner_contract::CheckpointEntry {
        let span = i64::try_from(
            info.cycle_length
                .saturating_mul(self.s.version_range_cycles),
        )
        .unwrap_or(i64::MAX);
        let min = i64::try_from(info.phase_start_block)
            .unwrap_or(i64::MAX)
            .saturating_sub(span);
        let old = |gv: u64| i64::try_from(gv).is_ok_and(|v| v < min);
        if !old(best.global_ver) {
            return best;
        }
        let run = self.run.clone();
        let baseline = match tokio::task::spawn_blocking(move || run.best_validator()).await {
            Ok(Ok(Some(v))) if v.global_ver > best.global_ver && !old(v.global_ver) => v.global_ver,
            _ => return best,
        };
        let until = info
            .phase_end_block
            .saturating_sub(self.s.timing.min_commit_blocks + 1);
        tracing::info!(
            own = best.global_ver,
            baseline,
            window_min = min,
            until,
            "the best own checkpoint is older than the version window; waiting for one trained from the new baseline"
        );
        let wait = async {
            loop {
                let run = self.run.clone();
                if let Ok(Ok(Some(b))) = tokio::task::spawn_blocking(move || run.best_own()).await
                    && b.global_ver >= baseline
                {
                    return b;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            b = wait => {
                tracing::info!(checkpoint = %b.path.display(), "committing the checkpoint trained from the new baseline");
                b
            }
            _ = self.block_past(until) => {
                tracing::warn!(own = best.global_ver, baseline, "no checkpoint from the new baseline in time; committing the old one");
                best
            }
            _ = self.jobs_cancel.cancelled() => best,
        }
    }
}

impl Engine {
    /// A commit-1 included in MinerCommit1's last block is seen by its job only in the block
    /// MinerCommit2 starts with: while this cycle's COMMIT1 is still running and has not
    /// recorded its commitment, COMMIT2 waits for it (inside its own phase).
    pub(crate) async fn wait_commit1(&self, info: &PhaseInfo) {
        let cycle = info.cycle_index;
        let poll = async {
            loop {
                if self
                    .commit
                    .lock()
                    .await
                    .as_ref()
                    .is_some_and(|c| c.cycle == cycle)
                {
                    return;
                }
                match self.log.find(JobKind::Commit1, cycle) {
                    Some(r) if r.outcome == JobOutcome::Running => {}
                    _ => return,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = poll => {}
            _ = self.block_past(info.phase_end_block) => {}
            _ = self.jobs_cancel.cancelled() => {}
        }
    }
}
