//! `chainsync-svc` binary: parse flags, validate the config, the listen address and load the
//! wallet (exit 64 before anything is bound or written), bind, run until SIGTERM/SIGINT or
//! `Stop` (exit 0).

use std::process::ExitCode;

use chainsync_svc::api::{HEALTH_NAME, Health};
use chainsync_svc::config::{Cli, Settings};
use chainsync_svc::service::{Listeners, run_reporting};
use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chainsync-svc: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter needs the runtime; it is flushed before the runtime goes away.
    let telemetry = {
        let _enter = rt.enter();
        match miner_service::init_tracing(
            "chainsync-svc",
            cli.log_format,
            cli.otlp_endpoint.clone(),
        ) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("chainsync-svc: {e}");
                return ExitCode::from(64);
            }
        }
    };
    let mut settings = match Settings::from_cli(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chainsync-svc: {e}");
            return ExitCode::from(64);
        }
    };
    // The Hub transport's start-up checks (token accepted and able to write, repo id fits the
    // chain), before anything is bound or written.
    if let Some(hub) = settings.hub.as_mut() {
        match rt.block_on(chainsync_svc::hub::preflight(hub)) {
            Ok(p) => tracing::info!(
                user = %p.user,
                repo = %p.repo,
                private = ?p.private,
                copy_guard = hub.copy_guard,
                endpoint = %hub.endpoint,
                "Hugging Face Hub transport ready"
            ),
            Err(e @ chainsync_svc::hub::PreflightError::Config(_)) => {
                eprintln!("chainsync-svc: {e}");
                return ExitCode::from(64);
            }
            Err(e) => {
                eprintln!("chainsync-svc: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // The first thing written: `<run>/control/token` (0600), shared with trainer-svc and minerctl.
    match miner_service::ControlToken::load_or_create(&settings.run_dir) {
        Ok(t) => settings.control_token = Some(t),
        Err(e) => {
            eprintln!("chainsync-svc: {e}");
            return ExitCode::from(64);
        }
    }
    tracing::info!(
        run_dir = %settings.run_dir.display(),
        hotkey = %settings.hotkey.ss58(),
        netuid = settings.netuid,
        endpoint = %settings.endpoint,
        phase_source = ?settings.phase_source,
        transport = if settings.hub.is_some() { "hub" } else { "http" },
        owner_url = %settings.owner_url,
        expert_group = settings.expert_group.group_id,
        cycle_length = settings.schedule.cycle_length(),
        listen = %cli.listen,
        metrics_listen = %cli.metrics_listen,
        tls = settings.tls.is_some(),
        otlp = telemetry.exporting(),
        "effective config"
    );
    let code = rt.block_on(async move {
        let (grpc, metrics) =
            match miner_service::bind_service_listeners(cli.listen, cli.metrics_listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("chainsync-svc: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let shutdown = CancellationToken::new();
        let health = Health::new();
        let signals = miner_service::shutdown_on_signals(
            shutdown.clone(),
            Some((health.clone(), vec![HEALTH_NAME.into()])),
        );
        let result = run_reporting(
            settings,
            Listeners {
                grpc,
                metrics: Some(metrics),
            },
            shutdown,
            health,
        )
        .await;
        signals.abort();
        match result {
            Ok(()) => {
                tracing::info!("chainsync stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chainsync-svc: {e:#}");
                ExitCode::FAILURE
            }
        }
    });
    telemetry.shutdown();
    code
}
