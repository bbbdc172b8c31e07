//! Prometheus text exposition (spec §9.1 names plus `chainsync_*` job counters), served over
//! plain HTTP/1.1 on `--metrics-listen` (any path answers with the metrics) by
//! [`miner_service::serve_metrics`].

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::jobs::{JobKind, JobOutcome};

/// Upper bounds of `chain_commit_latency_seconds` (seconds).
pub const COMMIT_LATENCY_BUCKETS: [f64; 10] =
    [0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0];

#[derive(Debug, Default)]
struct Values {
    block: u64,
    phase_index: u64,
    blocks_remaining: u64,
    rpc_errors: u64,
    commit_latency_counts: [u64; COMMIT_LATENCY_BUCKETS.len()],
    commit_latency_sum: f64,
    commit_latency_count: u64,
    /// (metric, outcome) → count.
    outcomes: BTreeMap<(&'static str, &'static str), u64>,
}

/// The daemon's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    v: Mutex<Values>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Values) -> T) -> T {
        f(&mut self.v.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn set_phase(&self, block: u64, phase_index: u64, blocks_remaining: u64) {
        self.with(|v| {
            v.block = block;
            v.phase_index = phase_index;
            v.blocks_remaining = blocks_remaining;
        });
    }

    pub fn rpc_error(&self) {
        self.with(|v| v.rpc_errors += 1);
    }

    pub fn commit_latency(&self, secs: f64) {
        self.with(|v| {
            for (i, b) in COMMIT_LATENCY_BUCKETS.iter().enumerate() {
                if secs <= *b {
                    v.commit_latency_counts[i] += 1;
                }
            }
            v.commit_latency_sum += secs;
            v.commit_latency_count += 1;
        });
    }

    /// Counts a finished job under its kind's counter.
    pub fn job_finished(&self, kind: JobKind, outcome: JobOutcome) {
        let metric = match kind {
            JobKind::Download => "chainsync_downloads_total",
            JobKind::Commit1 | JobKind::Commit2 => "chainsync_commits_total",
            JobKind::Submit => "chainsync_submissions_total",
        };
        let label = match outcome {
            JobOutcome::Running => return,
            JobOutcome::Succeeded => "succeeded",
            JobOutcome::Failed => "failed",
            JobOutcome::Missed => "missed",
            JobOutcome::Skipped => "skipped",
            JobOutcome::Cancelled => "cancelled",
        };
        self.with(|v| *v.outcomes.entry((metric, label)).or_default() += 1);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        self.with(|v| {
            let mut out = String::new();
            let mut scalar = |name: &str, kind: &str, help: &str, value: String| {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
            };
            scalar("subnet_current_block", "gauge", "Chain head block", v.block.to_string());
            scalar("subnet_current_phase_index", "gauge", "Index of the current phase in the cycle", v.phase_index.to_string());
            scalar(
                "subnet_blocks_remaining_in_phase",
                "gauge",
                "Blocks left in the current phase",
                v.blocks_remaining.to_string(),
            );
            scalar("chain_rpc_errors_total", "counter", "Failed chain calls", v.rpc_errors.to_string());
            let h = "chain_commit_latency_seconds";
            out.push_str(&format!(
                "# HELP {h} Seconds from submitting a commitment to its verified inclusion\n# TYPE {h} histogram\n"
            ));
            for (i, b) in COMMIT_LATENCY_BUCKETS.iter().enumerate() {
                out.push_str(&format!("{h}_bucket{{le=\"{b}\"}} {}\n", v.commit_latency_counts[i]));
            }
            out.push_str(&format!("{h}_bucket{{le=\"+Inf\"}} {}\n", v.commit_latency_count));
            out.push_str(&format!("{h}_sum {}\n{h}_count {}\n", v.commit_latency_sum, v.commit_latency_count));
            for (metric, help) in [
                ("chainsync_downloads_total", "Validator baseline download jobs by outcome"),
                ("chainsync_commits_total", "Commit jobs (MinerCommit1 and MinerCommit2) by outcome"),
                ("chainsync_submissions_total", "Submission jobs by outcome"),
            ] {
                out.push_str(&format!("# HELP {metric} {help}\n# TYPE {metric} counter\n"));
                for outcome in ["succeeded", "failed", "missed", "skipped", "cancelled"] {
                    let n = v.outcomes.get(&(metric, outcome)).copied().unwrap_or(0);
                    out.push_str(&format!("{metric}{{outcome=\"{outcome}\"}} {n}\n"));
                }
            }
            out
        })
    }
}

/// Serves the metrics until `shutdown` (bounded: see [`miner_service::metrics_http`]).
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    shutdown: CancellationToken,
) {
    miner_service::serve_metrics(
        "chainsync-svc",
        listener,
        miner_service::MetricsLimits::default(),
        move || metrics.render(),
        shutdown,
    )
    .await
}
