//! Graceful shutdown: SIGTERM/SIGINT → health NOT_SERVING → cancel the root token.

use tokio_util::sync::CancellationToken;

/// Waits for SIGTERM or SIGINT; returns which one arrived.
pub async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "install SIGTERM handler");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// On the first SIGTERM/SIGINT: marks `services` NOT_SERVING on `health` (so load balancers
/// and `minerctl` see it first), then cancels `root`. Also returns when `root` is cancelled
/// some other way.
pub fn shutdown_on_signals(
    root: CancellationToken,
    health: Option<(tonic_health::server::HealthReporter, Vec<String>)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            sig = wait_for_signal() => {
                tracing::info!("{sig} received");
                if let Some((reporter, services)) = &health {
                    for s in services {
                        reporter
                            .set_service_status(s, tonic_health::ServingStatus::NotServing)
                            .await;
                    }
                }
                root.cancel();
            }
            _ = root.cancelled() => {}
        }
    })
}

/// Runs a server future (e.g. tonic's `serve_with_incoming_shutdown`) until it ends, or until
/// `grace` after `shutdown` is cancelled: graceful shutdown waits for open calls, and an endless
/// stream (a health `Watch`) would otherwise hold the process forever. Returns `Ok(false)` when
/// the grace period cut connections off.
pub async fn serve_with_grace<F, E>(
    serve: F,
    shutdown: CancellationToken,
    grace: std::time::Duration,
) -> Result<bool, E>
where
    F: std::future::Future<Output = Result<(), E>>,
{
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => r.map(|()| true),
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "closing connections still open after the shutdown grace period");
            Ok(false)
        }
    }
}
