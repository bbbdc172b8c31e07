//! Prometheus text exposition (spec §9.1) of the latest [`StatusSnapshot`], served over plain
//! HTTP/1.1 on `--metrics-listen` (any path answers with the metrics) by
//! [`miner_service::serve_metrics`].

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::status::StatusSnapshot;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// The exposition text for one snapshot (reference names; a few `miner_*` extras).
pub fn render(s: &StatusSnapshot) -> String {
    let g = esc(&s.expert_group_name);
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, labels: &str, v: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{labels} {}\n",
            num(v)
        ));
    };
    let gl = format!("{{expert_group=\"{g}\"}}");
    gauge(
        "miner_training_loss",
        "Mean micro-batch training loss of the last optimizer step",
        &gl,
        s.loss,
    );
    gauge(
        "miner_learning_rate",
        "Current learning rate",
        "",
        s.learning_rate,
    );
    gauge(
        "miner_tokens_per_sec",
        "Training throughput of the last optimizer step",
        "",
        s.tokens_per_sec,
    );
    gauge(
        "miner_gradient_norm",
        "Global gradient norm before clipping",
        "",
        s.grad_norm,
    );
    gauge(
        "miner_grad_accum_steps",
        "Micro-batches per optimizer step",
        "",
        s.grad_accum_steps as f64,
    );
    gauge("miner_perplexity", "exp(training loss)", "", s.loss.exp());
    gauge(
        "miner_total_tokens",
        "Tokens trained on",
        "",
        s.total_tokens as f64,
    );
    gauge(
        "miner_total_samples",
        "Sequences trained on",
        "",
        s.total_samples as f64,
    );
    gauge(
        "miner_step_time_hours",
        "Duration of the last optimizer step",
        "",
        s.step_time_hours,
    );
    gauge(
        "miner_total_training_time_hours",
        "Time since the trainer started",
        "",
        s.total_training_time_hours,
    );
    gauge(
        "miner_param_sum",
        "Sum of the trainable expert parameters",
        "",
        s.param_sum,
    );
    gauge(
        "miner_inner_opt_step",
        "Optimizer steps (N of globalver_V_inneropt_N)",
        "",
        s.inner_opt_step as f64,
    );
    if let Some(v) = s.val_loss {
        gauge("miner_val_loss", "Last held-out evaluation loss", &gl, v);
    }
    gauge(
        "miner_loss_scale",
        "GradScaler scale (1 without a scaler)",
        "",
        s.loss_scale,
    );
    gauge(
        "miner_consecutive_non_finite_batches",
        "Batches skipped for a non-finite loss in a row",
        "",
        f64::from(s.consecutive_non_finite),
    );
    gauge(
        "miner_baseline_version",
        "Validator version of the loaded baseline",
        "",
        s.baseline_version as f64,
    );
    // Phase gauges of the reference's poller (spec §3.5): absent while chainsync-svc is
    // unreachable, so they go stale in Prometheus instead of showing an old phase.
    gauge(
        "miner_chainsync_connected",
        "1 while the phase is streamed from chainsync-svc, else 0",
        "",
        if s.chain_phase.is_some() { 1.0 } else { 0.0 },
    );
    if let Some(p) = &s.chain_phase {
        gauge(
            "subnet_current_block",
            "Chain head block (from chainsync-svc)",
            "",
            p.block as f64,
        );
        gauge(
            "subnet_current_phase_index",
            "Index of the current phase in the cycle (0 = Distribute)",
            "",
            f64::from(p.index),
        );
        gauge(
            "subnet_blocks_remaining_in_phase",
            "Blocks left in the current phase",
            "",
            p.blocks_remaining as f64,
        );
    }
    out
}

/// Serves the metrics until `shutdown` is cancelled (bounded: see
/// [`miner_service::metrics_http`]).
pub async fn serve(
    listener: TcpListener,
    status: watch::Receiver<StatusSnapshot>,
    shutdown: CancellationToken,
) {
    miner_service::serve_metrics(
        "trainer-svc",
        listener,
        miner_service::MetricsLimits::default(),
        move || render(&status.borrow()),
        shutdown,
    )
    .await
}
