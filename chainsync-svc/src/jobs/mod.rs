//! The scheduler and its four jobs (spec §2.5, §5.3, §6.2, §11.2 items 2-6 and 12).
//!
//! The scheduler follows the chain head (polled every `timing.poll`) and the phase source. Per
//! cycle it starts at most one job of each kind: DOWNLOAD in Distribute, COMMIT1 in
//! MinerCommit1, COMMIT2 in MinerCommit2, SUBMIT in Submission. Every job is bounded by its
//! phase: it is not started with too few blocks left and is abandoned (MISSED) when the head
//! passes the phase end, except an extrinsic already sent, which is let finish (never half a
//! commit). The commit pin (holder `chainsync-commit`) taken in COMMIT1 is kept until the
//! SUBMIT of the same cycle ends (or the cycle is over).

mod record;
mod run;

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
        let (phase_tx, _) = watch::channel(None);
        let (head_tx, _) = watch::channel(0);
        Ok(Arc::new(Engine {
            s,
            run,
            chain,
            phase_src,
            source_kind,
            http,
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

    /// Resolves once our chain head is past `block` (or never, if polling stops).
    pub(crate) async fn head_past(&self, block: u64) {
        let mut rx = self.head_tx.subscribe();
        if rx.wait_for(|h| *h > block).await.is_err() {
            std::future::pending::<()>().await;
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
        let head = match self.chain.head().await {
            Ok(h) => {
                self.head_tx.send_if_modified(|cur| {
                    let changed = *cur != h;
                    *cur = h;
                    changed
                });
                Some(h)
            }
            Err(e) => {
                self.metrics.rpc_error();
                tracing::warn!(error = %e, "read the chain head");
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

    /// Starts the job the phase calls for, if it has not run this cycle.
    pub fn maybe_start(self: &Arc<Self>, view: &PhaseView) -> Option<JobRecord> {
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
