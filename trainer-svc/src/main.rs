//! `trainer-svc` binary: parse flags, validate config and the control token file (exit 64, also
//! for a refused listen address), bind, run, map the outcome to an exit status (0 on a clean
//! stop, 1 on a fatal training error).

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use trainer_svc::settings::device_name;
use trainer_svc::{Cli, Listeners, Settings};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trainer-svc: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter needs the runtime; it is flushed before the runtime goes away.
    let telemetry = {
        let _enter = rt.enter();
        match miner_service::init_tracing("trainer-svc", cli.log_format, cli.otlp_endpoint.clone())
        {
            Ok(g) => g,
            Err(e) => {
                eprintln!("trainer-svc: {e}");
                return ExitCode::from(64);
            }
        }
    };
    let mut settings = match Settings::from_cli(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("trainer-svc: {e}");
            return ExitCode::from(64);
        }
    };
    // The control token (read, or created 0600) before anything is bound: a token file others
    // can read, or one that is empty or malformed, is a configuration error (64), not a crash
    // after binding that a supervisor would restart forever.
    match miner_service::ControlToken::load_or_create(&settings.run_dir) {
        Ok(t) => settings.control_token = Some(t),
        Err(e) => {
            eprintln!("trainer-svc: {e}");
            return ExitCode::from(64);
        }
    }
    tracing::info!(
        run_dir = %settings.run_dir.display(),
        device = %device_name(settings.device),
        expert_group = %settings.expert_group_name,
        group_id = settings.expert_group_id,
        seq_len = settings.data.sequence_length,
        rows = settings.data.rows,
        grad_accum = settings.grad_accum,
        lr = settings.adamw.lr,
        metric_interval = settings.metric_interval,
        checkpoint_interval = settings.checkpoint_interval,
        max_steps = ?settings.max_steps,
        listen = %settings.listen,
        metrics_listen = %settings.metrics_listen,
        tls = settings.tls.is_some(),
        otlp = telemetry.exporting(),
        "effective config"
    );
    let code = rt.block_on(async move {
        let (grpc, metrics) =
            match miner_service::bind_service_listeners(settings.listen, settings.metrics_listen)
                .await
            {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("trainer-svc: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let shutdown = CancellationToken::new();
        let signals = miner_service::shutdown_on_signals(shutdown.clone(), None);
        let result = trainer_svc::run(
            settings,
            Listeners {
                grpc,
                metrics: Some(metrics),
            },
            shutdown.clone(),
        )
        .await;
        signals.abort();
        match result {
            Ok(outcome) => {
                tracing::info!(?outcome, "trainer stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trainer-svc: {e:#}");
                ExitCode::FAILURE
            }
        }
    });
    telemetry.shutdown();
    code
}
