//! trainer-svc: trains the miner's expert group (spec §2.4) and serves its status over gRPC.
//!
//! Code map: [`settings`] (flags + config.yaml → validated [`Settings`]), [`data`] (sources,
//! tokenizer, interleave, held-out split), [`optim`] (AdamW, schedule, GradScaler, clipping),
//! [`engine`] (the training thread and checkpoints), [`status`] (snapshot + control flags),
//! [`metrics`] (Prometheus text), [`api`] (gRPC; the only module that knows tonic/prost).
//!
//! Control plane (`miner-service`): the control token `<run>/control/token` (created on first
//! start) is required as `authorization: Bearer <token>` by `Stop`/`LoadBaseline` (by every
//! call off loopback, where TLS is mandatory); `<run>/control/trainer.json` records the bound
//! addresses for `minerctl --path RUN` and is removed on exit.
//!
//! Phase awareness ([`phase_watch`]): a task follows chainsync-svc's `WatchPhase` (found via
//! `--chainsync` or `<run>/control/chainsync.json`) and a merge task folds the latest phase into
//! every snapshot the training thread publishes, so [`StatusSnapshot::phase`]/`block` and the
//! `subnet_*` gauges follow the chain; while chainsync is away they are cleared and training
//! goes on.

pub mod api;
pub mod data;
pub mod engine;
pub mod inputs;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod phase_watch;
pub mod settings;
pub mod status;

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use engine::Outcome;

/// The endpoints file name: `<run>/control/trainer.json`.
pub const ENDPOINTS_NAME: &str = "trainer";
pub use settings::{Cli, ConfigError, Settings};
pub use status::{Control, StatusSnapshot, TrainerState};

/// The default of `--training-nice`: how much nicer than the service the training thread runs
/// (added to the process's nice value, at most 19). libtorch starts its intra-op threads from that thread, so they inherit it; the
/// gRPC and metrics threads keep the service's priority and get a core as soon as a call
/// arrives however busy training keeps every core. It changes only the share under contention:
/// with nothing else runnable, training still uses every core (measured in
/// `scripts/bench-status.sh`: `minerctl status` p50 9 ms -> 2.5 ms with the trainer on both
/// cores).
pub const TRAINING_NICE: i32 = 10;

/// Adds `increment` to the calling thread's nice value (on Linux the nice value is per thread,
/// and threads started later from it inherit it). Failure only costs control-plane latency.
fn lower_training_priority(increment: i32) {
    use rustix::process::{getpriority_process, setpriority_process};
    if increment <= 0 {
        return;
    }
    let result = getpriority_process(None)
        .and_then(|now| setpriority_process(None, (now + increment).min(19)).map(|()| now));
    match result {
        Ok(now) => tracing::debug!(
            from = now,
            to = (now + increment).min(19),
            "training thread niced"
        ),
        Err(e) => tracing::warn!(error = %e, "could not lower the training thread's priority"),
    }
}

/// Already-bound listeners (tests bind `127.0.0.1:0`).
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
}

/// A running trainer's handles (for in-process tests and `main`).
pub struct Handles {
    pub control: Arc<Control>,
    pub status: watch::Receiver<StatusSnapshot>,
}

/// Runs the trainer until the loop ends: training on its own thread, gRPC and metrics on the
/// current runtime. Cancelling `shutdown` asks for a stop with a final checkpoint at the next
/// micro-batch boundary. Returns how the loop ended; a fatal training error is an `Err`.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<Outcome> {
    let control = Arc::new(Control::default());
    let (tx, rx) = watch::channel(StatusSnapshot::default());
    run_with(
        settings,
        listeners,
        shutdown,
        Handles {
            control,
            status: rx,
        },
        tx,
    )
    .await
}

/// [`run`] with caller-made handles (tests keep a clone to watch the status or stop the loop).
pub async fn run_with(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
    handles: Handles,
    status_tx: watch::Sender<StatusSnapshot>,
) -> anyhow::Result<Outcome> {
    let Handles { control, status } = handles;
    let token = match &settings.control_token {
        Some(t) => t.clone(),
        None => miner_service::ControlToken::load_or_create(&settings.run_dir)?,
    };
    let tls = match &settings.tls {
        Some(t) => Some(t.server_config()?),
        None => None,
    };
    // Staged checkpoints and trash of a previous process that died mid-write.
    match miner_contract::RunDir::create(&settings.run_dir).map(|r| r.clean_stale_temporaries()) {
        Ok(Ok(removed)) if !removed.is_empty() => {
            tracing::info!(
                removed = removed.len(),
                "removed stale temporaries of dead writers"
            )
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "could not remove stale temporaries"),
        Err(e) => tracing::warn!(error = %e, "could not open the run directory to clean it"),
        _ => {}
    }
    // The training thread publishes on its own channel; the merge task adds the phase and
    // republishes on `status_tx` (what the API, the metrics and the caller see).
    let (engine_tx, engine_rx) = watch::channel(status_tx.borrow().clone());
    let (phase_tx, phase_rx) = watch::channel(None);
    let merge = tokio::spawn(phase_watch::merge(engine_rx, phase_rx, status_tx));
    let phase_stop = CancellationToken::new();
    let phase_source = match &settings.chainsync {
        Some(uri) => phase_watch::PhaseSource::Explicit(uri.clone()),
        None => phase_watch::PhaseSource::RunDir(settings.run_dir.clone()),
    };
    let phase = tokio::spawn(phase_watch::run(
        phase_source,
        Some(token.clone()),
        phase_tx,
        phase_stop.clone(),
    ));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread_settings = settings.clone();
    let thread_control = control.clone();
    std::thread::Builder::new()
        .name("trainer".into())
        .spawn(move || {
            lower_training_priority(thread_settings.training_nice);
            let r = engine::run(thread_settings, thread_control, engine_tx);
            let _ = done_tx.send(r);
        })
        .context("spawn the training thread")?;

    // Servers stop when the loop has ended (not on `shutdown`, so Stop/GetStatus keep working
    // while the final checkpoint is written).
    let servers = CancellationToken::new();
    let api = api::TrainerApi {
        status: status.clone(),
        control: control.clone(),
        run_dir: settings.run_dir.clone(),
    };
    let grpc_addr = listeners
        .grpc
        .local_addr()
        .context("gRPC listener address")?;
    let metrics_addr = match &listeners.metrics {
        Some(l) => Some(l.local_addr().context("metrics listener address")?),
        None => None,
    };
    let health = tonic_health::server::HealthReporter::new();
    let opts = api::ServeOptions {
        auth: miner_service::AuthLayer::for_listen(token, grpc_addr),
        tls,
        health: health.clone(),
    };
    let grpc = tokio::spawn(api::serve(api, listeners.grpc, servers.clone(), opts));
    let metrics = listeners
        .metrics
        .map(|l| tokio::spawn(metrics::serve(l, status.clone(), servers.clone())));
    let endpoints = miner_service::Endpoints::new(
        ENDPOINTS_NAME,
        grpc_addr,
        metrics_addr,
        settings.tls.is_some(),
    )
    .write(&settings.run_dir)
    .map_err(|e| tracing::warn!(error = %e, "could not write the endpoints file"))
    .ok();
    let forward = {
        let control = control.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            // Health first, so probes and minerctl see the stop before the port closes.
            health
                .set_service_status(api::HEALTH_NAME, tonic_health::ServingStatus::NotServing)
                .await;
            tracing::info!("shutdown requested; stopping at the next micro-batch boundary");
            control.request_stop(true);
        })
    };
    let result = match done_rx.await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("the training thread panicked")),
    };
    forward.abort();
    // The thread dropped its sender: the merge task publishes the last snapshot and ends.
    let _ = merge.await;
    phase_stop.cancel();
    let _ = phase.await;
    servers.cancel();
    match grpc.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "gRPC server task failed"),
        Ok(Ok(())) => {}
    }
    if let Some(m) = metrics {
        let _ = m.await;
    }
    drop(endpoints);
    result
}
