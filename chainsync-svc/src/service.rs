//! Wires the daemon together: chain client, phase source, engine (scheduler + jobs), gRPC and
//! metrics servers; runs until `shutdown` (a signal or `Stop`).

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ChainSyncApi};
use crate::chain::ChainClient;
use crate::config::Settings;
use crate::jobs::{ClientHead, Engine, Policies};
use crate::metrics::{self, Metrics};
use crate::phase::{LocalSchedule, OwnerApi, PhaseSource, PhaseSourceKind};
use crate::transport::RetryPolicy;

/// Name of this service in `<run>/control/<name>.json` (what `minerctl` looks up).
pub const ENDPOINTS_NAME: &str = "chainsync";

/// The bound sockets (bound by the caller, so a test can use port 0).
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
}

/// Knobs tests shorten; the defaults are the production ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    pub policies: Option<Policies>,
}

/// Runs the daemon until `shutdown` is cancelled; returns after jobs ended, pins were released
/// and the servers stopped.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_full(
        settings,
        listeners,
        shutdown,
        Overrides::default(),
        api::Health::new(),
    )
    .await
}

/// [`run`] reporting health through `health` (the binary's signal handler turns it NOT_SERVING
/// before it cancels `shutdown`).
pub async fn run_reporting(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
    health: api::Health,
) -> anyhow::Result<()> {
    run_full(settings, listeners, shutdown, Overrides::default(), health).await
}

/// [`run`] with test overrides.
pub async fn run_with(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
    overrides: Overrides,
) -> anyhow::Result<()> {
    run_full(settings, listeners, shutdown, overrides, api::Health::new()).await
}

async fn run_full(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
    overrides: Overrides,
    health: api::Health,
) -> anyhow::Result<()> {
    let token = match &settings.control_token {
        Some(t) => t.clone(),
        None => miner_service::ControlToken::load_or_create(&settings.run_dir)?,
    };
    let tls = match &settings.tls {
        Some(t) => Some(t.server_config()?),
        None => None,
    };
    let grpc_addr = listeners
        .grpc
        .local_addr()
        .context("gRPC listener address")?;
    let metrics_addr = match &listeners.metrics {
        Some(l) => Some(l.local_addr().context("metrics listener address")?),
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let chain = tokio::select! {
        c = ChainClient::connect(&settings.endpoint) => Arc::new(c.with_context(|| format!("connect to {}", settings.endpoint))?),
        _ = shutdown.cancelled() => return Ok(()),
    };
    tracing::info!(endpoint = %settings.endpoint, hotkey = %settings.hotkey.ss58(), run_dir = %settings.run_dir.display(), "connected to the chain");
    let local = LocalSchedule::new(
        settings.schedule.clone(),
        Arc::new(ClientHead(chain.clone())),
        settings.local_whitelist.clone(),
    );
    let phase_src: Arc<dyn PhaseSource> = match settings.phase_source {
        PhaseSourceKind::OwnerApi => Arc::new(
            OwnerApi::new(&settings.owner_url, RetryPolicy::phase_api())
                .with_context(|| format!("owner phase API {}", settings.owner_url))?,
        ),
        PhaseSourceKind::Local => Arc::new(local),
    };
    let mut settings = settings;
    if let Some(hub) = settings.hub.as_mut()
        && hub.repo.is_none()
    {
        crate::hub::preflight(hub).await?;
    }
    let http = crate::transport::http_client().context("build the HTTP client")?;
    let engine = Engine::new(
        settings.clone(),
        chain,
        phase_src,
        settings.phase_source,
        http,
        overrides.policies.unwrap_or(settings.policies),
        metrics.clone(),
    )?;

    // Staged downloads and trash of a previous process that died mid-write.
    let run_dir = engine.run_dir().clone();
    match tokio::task::spawn_blocking(move || run_dir.clean_stale_temporaries()).await {
        Ok(Ok(removed)) if !removed.is_empty() => {
            tracing::info!(
                removed = removed.len(),
                "removed stale temporaries of dead writers"
            )
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "could not remove stale temporaries"),
        _ => {}
    }
    let stop_servers = CancellationToken::new();
    let api = ChainSyncApi {
        engine: engine.clone(),
        shutdown: shutdown.clone(),
    };
    let grpc = tokio::spawn(api::serve(
        api,
        listeners.grpc,
        shutdown.clone(),
        stop_servers.clone(),
        api::ServeOptions {
            auth: miner_service::AuthLayer::for_listen(token, grpc_addr),
            tls,
            health,
        },
    ));
    let metrics_task = listeners
        .metrics
        .map(|l| tokio::spawn(metrics::serve(l, metrics.clone(), stop_servers.clone())));

    // Lets a local `minerctl --path RUN` find this daemon; removed again when dropped.
    let endpoints = miner_service::Endpoints::new(
        ENDPOINTS_NAME,
        grpc_addr,
        metrics_addr,
        settings.tls.is_some(),
    )
    .write(&settings.run_dir)
    .map_err(|e| tracing::warn!(error = %e, "could not write the endpoints file"))
    .ok();

    engine.clone().run_scheduler(shutdown.clone()).await;
    tracing::info!("jobs ended; stopping the servers");
    stop_servers.cancel();
    match grpc.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "gRPC server task failed"),
        Ok(Ok(())) => {}
    }
    if let Some(m) = metrics_task {
        let _ = m.await;
    }
    drop(endpoints);
    Ok(())
}
