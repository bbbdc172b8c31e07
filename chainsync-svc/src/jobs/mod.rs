//! The scheduler and its four jobs (spec §2.5, §5.3, §6.2, §11.2 items 2-6 and 12).
//!
//! The scheduler follows the chain head (polled every `timing.poll`) and the phase source. Per
//! cycle it starts at most one job of each kind: DOWNLOAD in Distribute, COMMIT1 in
//! MinerCommit1, COMMIT2 in MinerCommit2, SUBMIT in Submission. Every job is bounded by its
//! phase: it is not started with too few blocks left and is abandoned (MISSED) when the phase
//! end passes, except an extrinsic already sent, which is let finish (never half a commit).
//! The phase end is measured on our chain head; while the chain cannot be read, on the phase
//! source's block; while neither answers, by the block time (`--block-time-ms`), so no job
//! stays RUNNING through an outage. A job whose whole phase passed before the scheduler saw it
//! (a blocked poll, the chain and the phase source both away) is recorded MISSED with the
//! reason once a phase is seen again: every cycle gets one record per job kind. The commit pin
//! (holder `chainsync-commit`) taken in COMMIT1 is kept until the SUBMIT of the same cycle ends
//! (or the cycle is over).

mod hub;
mod record;
mod run;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use miner_contract::{PinGuard, RunDir};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use record::{
    JOBS_FILE, JobKind, JobLog, JobOutcome, JobRecord, JournalError, STATE_DIR, now_unix,
    parse_journal,
};

use crate::chain::ChainClient;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::phase::source::BoxFuture;
use crate::phase::{ChainHead, PhaseInfo, PhaseName, PhaseSchedule, PhaseSource, PhaseSourceKind};
use crate::transport::RetryPolicy;

/// The phase as the daemon last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseView {
    pub info: PhaseInfo,
    pub source: PhaseSourceKind,
    /// Owner API block minus our chain head, when both are known.
    pub skew_blocks: Option<i64>,
    /// Our chain head (what deadlines are measured against).
    pub head: u64,
}

/// Transfer policies (the reference's by default; tests shorten them).
#[derive(Debug, Clone, Copy)]
pub struct Policies {
    pub download: RetryPolicy,
    pub submit: RetryPolicy,
    /// Commit attempts inside one phase.
    pub commit_attempts: u32,
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            download: RetryPolicy::download(),
            submit: RetryPolicy::submit(),
            commit_attempts: 3,
        }
    }
}

/// The checkpoint committed this cycle, pinned until its submission ends.
#[derive(Debug)]
pub(crate) struct CycleCommit {
    pub cycle: u64,
    pub checkpoint: std::path::PathBuf,
    pub model_hash: String,
    pub global_ver: u64,
    pub pin: Option<PinGuard>,
    /// Hub transport: this cycle's shard upload (COMMIT1 sends, COMMIT2 waits).
    pub upload: Option<watch::Receiver<hub::UploadState>>,
}

/// The head of a [`ChainClient`] as a [`ChainHead`] (for the local phase source).
pub struct ClientHead(pub Arc<ChainClient>);

impl ChainHead for ClientHead {
    fn head_block(&self) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move { self.0.head().await.map_err(|e| e.to_string()) })
    }
}

/// The scheduler, its jobs and their shared state.
pub struct Engine {
    pub(crate) s: Settings,
    pub(crate) run: RunDir,
    pub(crate) chain: Arc<ChainClient>,
    pub(crate) phase_src: Arc<dyn PhaseSource>,
    pub(crate) source_kind: PhaseSourceKind,
    pub(crate) http: reqwest::Client,
    /// The Hub transport (`None`: the HTTP routes).
    pub(crate) hub: Option<crate::hub::HubRuntime>,
    pub(crate) policies: Policies,
    pub log: JobLog,
    pub metrics: Arc<Metrics>,
    phase_tx: watch::Sender<Option<PhaseView>>,
    /// Our chain head, published as soon as it is read (deadlines do not wait for the phase API).
    head_tx: watch::Sender<u64>,
    pub(crate) commit: tokio::sync::Mutex<Option<CycleCommit>>,
    pub(crate) download_lock: tokio::sync::Mutex<()>,
    /// Cancels running jobs (on shutdown).
    pub(crate) jobs_cancel: CancellationToken,
    tasks: TaskTracker,
    /// (kind, cycle) of scheduled jobs started by this process.
    started: Mutex<Vec<(JobKind, u64)>>,
    /// Whether the last head read succeeded (otherwise the phase source's block counts too).
    chain_up: AtomicBool,
    /// The highest block estimate seen and when it was first seen (the wall-clock fallback).
    mark: Mutex<(u64, tokio::time::Instant)>,
    /// (cycle, phase position) of the last phase the scheduler saw, and when.
    seen: Mutex<Option<((u64, usize), std::time::Instant)>>,
    /// The last head read's error (as [`chain_reason`] words it).
    chain_error: Mutex<String>,
    /// What the polls since the last phase seen could not read (taken when a phase is seen).
    poll_error: Mutex<Option<String>>,
}

/// A chain error as a job reason: a chain that cannot be reached is said so.
pub(crate) fn chain_reason(e: &crate::chain::ChainError) -> String {
    match e {
        crate::chain::ChainError::Unavailable { .. } => format!("chain unreachable: {e}"),
        _ => e.to_string(),
    }
}

/// How the scheduler learned that a block is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Passed {
    /// The chain head (or, while the chain is away, the phase source) is at this block.
    Block(u64),
    /// No block was seen for the blocks' expected duration (no chain, no phase source); the
    /// last block seen.
    Clock(u64),
}

impl Passed {
    /// ` (by the clock: ...)` for a reason text, empty when a block was seen.
    pub(crate) fn note(self, block_time: Duration) -> String {
        match self {
            Passed::Block(_) => String::new(),
            Passed::Clock(b) => format!(
                " (by the clock: no block seen since {b}, at {} s a block)",
                block_time.as_secs_f64()
            ),
        }
    }
}

/// At most this many cycles back are filled in by [`jobs_between`] after a long gap.
const MAX_MISSED_CYCLES: u64 = 2;

/// The (cycle, phase, job) of the job phases strictly between two (cycle, phase position)
/// points the scheduler saw, oldest first, at most [`MAX_MISSED_CYCLES`] cycles back from `cur`;
/// nothing when `cur` is not after `prev`.
pub(crate) fn jobs_between(
    prev: (u64, usize),
    cur: (u64, usize),
) -> Vec<(u64, PhaseName, JobKind)> {
    let n = PhaseName::ALL.len() as u64;
    let pos = |(c, i): (u64, usize)| c.saturating_mul(n).saturating_add(i as u64);
    let to = pos(cur);
    let from = (pos(prev) + 1).max(to.saturating_sub(MAX_MISSED_CYCLES * n));
    (from..to)
        .filter_map(|p| {
            let phase = PhaseName::ALL[(p % n) as usize];
            job_for_phase(phase).map(|k| (p / n, phase, k))
        })
        .collect()
}

/// The job kind the scheduler runs in a phase.
pub fn job_for_phase(p: PhaseName) -> Option<JobKind> {
    match p {
        PhaseName::Distribute => Some(JobKind::Download),
        PhaseName::MinerCommit1 => Some(JobKind::Commit1),
        PhaseName::MinerCommit2 => Some(JobKind::Commit2),
        PhaseName::Submission => Some(JobKind::Submit),
        _ => None,
    }
}

impl Engine {
    /// Opens the run directory (creating it and its `chainsync/` journal if needed).
    pub fn new(
        s: Settings,
        chain: Arc<ChainClient>,
        phase_src: Arc<dyn PhaseSource>,
        source_kind: PhaseSourceKind,
        http: reqwest::Client,
        policies: Policies,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Engine>> {
        let run = RunDir::create(&s.run_dir)
            .map_err(|e| anyhow::anyhow!("run directory {}: {e}", s.run_dir.display()))?;
        let log = JobLog::open(&s.run_dir)?;
        let hub = match &s.hub {
            Some(h) => Some(
                crate::hub::HubRuntime::new(h)
                    .map_err(|e| anyhow::anyhow!("Hugging Face Hub client: {e}"))?,
            ),
            None => None,
        };
        let (phase_tx, _) = watch::channel(None);
        let (head_tx, _) = watch::channel(0);
        Ok(Arc::new(Engine {
            s,
            run,
            chain,
            phase_src,
            source_kind,
            http,
            hub,
            policies,
            log,
            metrics,
            phase_tx,
            head_tx,
            commit: tokio::sync::Mutex::new(None),
            download_lock: tokio::sync::Mutex::new(()),
            jobs_cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            started: Mutex::new(Vec::new()),
            chain_up: AtomicBool::new(true),
            mark: Mutex::new((0, tokio::time::Instant::now())),
            seen: Mutex::new(None),
            poll_error: Mutex::new(None),
            chain_error: Mutex::new(String::new()),
        }))
    }

    pub fn run_dir(&self) -> &RunDir {
        &self.run
    }

    pub fn schedule(&self) -> &PhaseSchedule {
        &self.s.schedule
    }

    /// The latest phase (`None` before the first successful poll).
    pub fn phase(&self) -> Option<PhaseView> {
        self.phase_tx.borrow().clone()
    }

    /// Follows every phase update.
    pub fn watch_phase(&self) -> watch::Receiver<Option<PhaseView>> {
        self.phase_tx.subscribe()
    }

    /// Our last seen chain head.
    pub(crate) fn head(&self) -> u64 {
        *self.head_tx.borrow()
    }

    /// `; chain unreachable: <error>` while the last head read failed (for reasons), else empty.
    pub(crate) fn chain_down_note(&self) -> String {
        if self.chain_up.load(Ordering::SeqCst) {
            return String::new();
        }
        let e = self.chain_error.lock().unwrap_or_else(|p| p.into_inner());
        format!("; {}", e.as_str())
    }

    /// The block the scheduler believes it is: our chain head, or while the chain cannot be
    /// read, the higher of it and the phase source's block.
    pub(crate) fn block_estimate(&self) -> u64 {
        let head = self.head();
        if self.chain_up.load(Ordering::SeqCst) {
            return head;
        }
        let owner = self.phase_tx.borrow().as_ref().map_or(0, |v| v.info.block);
        head.max(owner)
    }

    /// Moves the wall-clock mark when the block estimate rises.
    fn note_progress(&self) {
        let est = self.block_estimate();
        let mut m = self.mark.lock().unwrap_or_else(|p| p.into_inner());
        if est > m.0 {
            *m = (est, tokio::time::Instant::now());
        }
    }

    /// When block `block` is expected to be over, from the last block seen and the block time.
    fn expected_past(&self, block: u64) -> tokio::time::Instant {
        let (b0, t0) = *self.mark.lock().unwrap_or_else(|p| p.into_inner());
        let n = (block + 1).saturating_sub(b0);
        t0 + self
            .s
            .timing
            .block_time
            .saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Resolves once `block` is over: the block estimate is past it, or, while the chain cannot
    /// be read and the phase source shows no new block either, once the block time says it
    /// must be over. So a job bounded by its phase ends even in a total outage; a chain that
    /// answers is trusted (a stalled chain does not end a phase).
    pub(crate) async fn block_past(&self, block: u64) -> Passed {
        let mut hrx = self.head_tx.subscribe();
        let mut prx = self.phase_tx.subscribe();
        loop {
            let est = self.block_estimate();
            if est > block {
                return Passed::Block(est);
            }
            let now = tokio::time::Instant::now();
            let chain_up = self.chain_up.load(Ordering::SeqCst);
            let expected = self.expected_past(block);
            if !chain_up && expected <= now {
                return Passed::Clock(est);
            }
            // Re-checked at least every poll (the chain may go away without a new block).
            let wake = if chain_up {
                now + self.s.timing.poll
            } else {
                expected.min(now + self.s.timing.poll)
            };
            tokio::select! {
                Ok(()) = hrx.changed() => {}
                Ok(()) = prx.changed() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// A wall-clock estimate of when block `end` is over (for HTTP deadlines).
    pub(crate) fn deadline_for(&self, end: u64) -> tokio::time::Instant {
        let left = end.saturating_sub(self.head()) + 1;
        tokio::time::Instant::now()
            + self
                .s
                .timing
                .block_time
                .saturating_mul(u32::try_from(left).unwrap_or(u32::MAX))
    }

    /// One poll: read our head and the phase; publish them. Returns the phase on success.
    pub async fn poll_once(&self) -> Option<PhaseView> {
        let mut errors: Vec<String> = Vec::new();
        let view = self.poll_inner(&mut errors).await;
        if !errors.is_empty() {
            *self.poll_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(errors.join("; "));
        }
        self.note_progress();
        view
    }

    async fn poll_inner(&self, errors: &mut Vec<String>) -> Option<PhaseView> {
        let head = match self.chain.head().await {
            Ok(h) => {
                self.chain_up.store(true, Ordering::SeqCst);
                self.head_tx.send_if_modified(|cur| {
                    let changed = *cur != h;
                    *cur = h;
                    changed
                });
                Some(h)
            }
            Err(e) => {
                self.chain_up.store(false, Ordering::SeqCst);
                self.metrics.rpc_error();
                tracing::warn!(error = %e, "read the chain head");
                let why = chain_reason(&e);
                *self.chain_error.lock().unwrap_or_else(|p| p.into_inner()) = why.clone();
                errors.push(why);
                None
            }
        };
        // The owner API is asked once per new block, not on every poll.
        if let (Some(h), Some(prev)) = (head, self.phase())
            && prev.head == h
            && self.source_kind == PhaseSourceKind::OwnerApi
        {
            return Some(prev);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let info = match self.source_kind {
            PhaseSourceKind::Local => head.map(|h| self.s.schedule.phase_at(h)),
            PhaseSourceKind::OwnerApi => match self.phase_src.current_phase(Some(deadline)).await {
                Ok(i) => Some(i),
                Err(e) => {
                    tracing::warn!(error = %e, "owner phase API; using the local schedule");
                    errors.push(format!("owner phase API: {e}"));
                    head.map(|h| self.s.schedule.phase_at(h))
                }
            },
        }?;
        let head = head.unwrap_or(info.block);
        let skew = match self.source_kind {
            PhaseSourceKind::OwnerApi => {
                let local = self.s.schedule.phase_at(head);
                let skew = info.block as i64 - head as i64;
                let before = self.phase_tx.borrow().as_ref().and_then(|p| p.skew_blocks);
                if before != Some(skew) && (skew.abs() > 1 || local.phase_name != info.phase_name) {
                    tracing::info!(
                        skew_blocks = skew,
                        owner = info.phase_name.as_str(),
                        local = local.phase_name.as_str(),
                        owner_block = info.block,
                        head,
                        "owner phase API and local schedule differ"
                    );
                }
                Some(skew)
            }
            PhaseSourceKind::Local => None,
        };
        let view = PhaseView {
            info,
            source: self.source_kind,
            skew_blocks: skew,
            head,
        };
        self.metrics.set_phase(
            head,
            view.info.phase_index,
            view.info.phase_end_block.saturating_sub(head),
        );
        self.phase_tx.send_if_modified(|cur| {
            if cur.as_ref() == Some(&view) {
                false
            } else {
                *cur = Some(view.clone());
                true
            }
        });
        Some(view)
    }

    /// Whether a scheduled job of `kind` already ran (or runs) in `cycle`. A job cancelled by
    /// a shutdown may run again after a restart (commits first look at the chain).
    fn already_ran(&self, kind: JobKind, cycle: u64) -> bool {
        if self
            .started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(kind, cycle))
        {
            return true;
        }
        self.log
            .find(kind, cycle)
            .is_some_and(|r| r.outcome != JobOutcome::Cancelled)
    }

    /// Records MISSED, with the reason, each job whose phase passed since the last phase the
    /// scheduler saw without the job being started (a blocked poll, the chain and the phase
    /// source both away), so every cycle has one record per job kind.
    fn record_passed(&self, view: &PhaseView) {
        let cur = (view.info.cycle_index, view.info.phase_name.index());
        let prev = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace((cur, std::time::Instant::now()));
        let why = self
            .poll_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some((prev, seen_at)) = prev else { return };
        for (cycle, phase, kind) in jobs_between(prev, cur) {
            if self.already_ran(kind, cycle) || self.jobs_cancel.is_cancelled() {
                continue;
            }
            self.started
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((kind, cycle));
            let mut rec = self.log.start(
                kind,
                phase.as_str(),
                cycle,
                self.head().max(view.info.block),
                false,
            );
            rec.outcome = JobOutcome::Missed;
            rec.error = format!(
                "{phase} of cycle {cycle} passed before the scheduler saw it (no phase seen for {:.1} s; next: {} at block {}){}",
                seen_at.elapsed().as_secs_f64(),
                view.info.phase_name.as_str(),
                view.info.block,
                match &why {
                    Some(w) if !w.is_empty() => format!("; {w}"),
                    _ => String::new(),
                }
            );
            rec.finished_block = rec.started_block;
            rec.finished_unix = now_unix();
            self.log.put(&rec);
            self.metrics.job_finished(kind, JobOutcome::Missed);
            tracing::warn!(job = rec.id, kind = kind.as_str(), cycle, reason = %rec.error, "job missed");
        }
    }

    /// Starts the job the phase calls for, if it has not run this cycle (first recording as
    /// MISSED the jobs of phases that passed unseen).
    pub fn maybe_start(self: &Arc<Self>, view: &PhaseView) -> Option<JobRecord> {
        self.record_passed(view);
        let kind = job_for_phase(view.info.phase_name)?;
        let cycle = view.info.cycle_index;
        if self.already_ran(kind, cycle) || self.jobs_cancel.is_cancelled() {
            return None;
        }
        self.started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((kind, cycle));
        Some(self.spawn_job(kind, view.info.clone(), false))
    }

    /// Starts a job now (the scheduler's or a manual one) and returns its running record.
    pub fn spawn_job(self: &Arc<Self>, kind: JobKind, info: PhaseInfo, manual: bool) -> JobRecord {
        let rec = self.log.start(
            kind,
            info.phase_name.as_str(),
            info.cycle_index,
            self.head().max(info.block),
            manual,
        );
        let me = self.clone();
        let first = rec.clone();
        self.tasks.spawn(async move { me.run_job(rec, info).await });
        first
    }

    /// The scheduler loop; returns when `shutdown` is cancelled, after every job has ended
    /// (cancelled ones recorded as CANCELLED) and the commit pin is released.
    pub async fn run_scheduler(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if let Some(view) = tokio::select! {
                _ = shutdown.cancelled() => None,
                v = self.poll_once() => v,
            } {
                self.maybe_start(&view);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.s.timing.poll) => {}
            }
        }
        self.shutdown_jobs().await;
    }

    /// Cancels the jobs, waits for them (an extrinsic in flight is let finish) and releases the pin.
    pub async fn shutdown_jobs(&self) {
        self.jobs_cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let state = self.commit.lock().await.take();
        if let Some(mut c) = state
            && let Some(pin) = c.pin.take()
            && let Err(e) = pin.release()
        {
            tracing::warn!(error = %e, "release the commit pin");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(cycle: u64, p: PhaseName) -> (u64, usize) {
        (cycle, p.index())
    }

    #[test]
    fn jobs_between_lists_the_job_phases_skipped_over() {
        use PhaseName::*;
        // The next phase: nothing skipped.
        assert!(jobs_between(at(3, MinerCommit1), at(3, MinerCommit2)).is_empty());
        assert!(jobs_between(at(3, Train), at(3, Train)).is_empty());
        // MinerCommit2 and Submission passed unseen.
        assert_eq!(
            jobs_between(at(3, MinerCommit1), at(3, Validate)),
            vec![
                (3, MinerCommit2, JobKind::Commit2),
                (3, Submission, JobKind::Submit)
            ]
        );
        // Across a cycle boundary.
        assert_eq!(
            jobs_between(at(3, ValidatorCommit1), at(4, MinerCommit1)),
            vec![(4, Distribute, JobKind::Download)]
        );
        // Backwards (an owner API answering an earlier block): nothing.
        assert!(jobs_between(at(4, Submission), at(4, MinerCommit1)).is_empty());
    }

    #[test]
    fn jobs_between_fills_in_at_most_two_cycles_after_a_long_gap() {
        let got = jobs_between(at(0, PhaseName::Train), at(100, PhaseName::Train));
        assert_eq!(got.len(), 8, "{got:?}");
        assert_eq!(got[0], (98, PhaseName::MinerCommit1, JobKind::Commit1));
        assert_eq!(got[7], (100, PhaseName::Distribute, JobKind::Download));
    }
}
