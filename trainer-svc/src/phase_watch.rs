//! Phase awareness (the reference's `SystemStatePoller`, spec §3.5): follows chainsync-svc's
//! `WatchPhase` stream and folds the latest phase into the trainer's status and gauges.
//!
//! Where chainsync is: `--chainsync ADDR` when given, else `<run>/control/chainsync.json`
//! (re-read before every connection attempt, so a restarted chainsync on a new port is found).
//! While chainsync is unreachable the phase is **cleared**, not kept stale: the status shows an
//! empty `phase` and block 0, and the `subnet_*` gauges are left out of the exposition (so
//! Prometheus marks their series stale); `miner_chainsync_connected` reads 0. Training never
//! waits for it: reconnection runs on its own task with exponential backoff.

use std::path::PathBuf;
use std::time::Duration;

use miner_proto::chainsync::v1 as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::status::StatusSnapshot;

/// First retry delay after a failed or lost connection.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(250);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Time allowed to open a connection to chainsync.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The subnet phase as last streamed by chainsync-svc.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainPhase {
    /// Exact phase name (`Distribute`, `Train`, `MinerCommit1`, ...).
    pub name: String,
    /// Index in the cycle (0 = Distribute ... 8 = ValidatorCommit2).
    pub index: u32,
    /// Chain head block.
    pub block: u64,
    pub blocks_remaining: u64,
    pub cycle_index: u64,
}

impl From<&pb::Phase> for ChainPhase {
    fn from(p: &pb::Phase) -> Self {
        ChainPhase {
            name: p.name.clone(),
            index: p.index,
            block: p.block,
            blocks_remaining: p.blocks_remaining,
            cycle_index: p.cycle_index,
        }
    }
}

/// Where to find chainsync-svc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhaseSource {
    /// `--chainsync`: an `http://host:port` URI.
    Explicit(String),
    /// `<run>/control/chainsync.json`, re-read on every attempt.
    RunDir(PathBuf),
}

impl PhaseSource {
    /// The URI to dial now, or why there is none.
    fn resolve(&self) -> Result<String, String> {
        match self {
            PhaseSource::Explicit(uri) => Ok(uri.clone()),
            PhaseSource::RunDir(run) => match miner_service::Endpoints::read(run, "chainsync") {
                Ok(Some(e)) if e.tls => Err(format!(
                    "{}: chainsync-svc listens with TLS, which the phase watch does not dial; pass --chainsync http://HOST:PORT of a plaintext loopback listener",
                    miner_service::Endpoints::path_in(run, "chainsync").display()
                )),
                Ok(Some(e)) => Ok(format!("http://{}", e.dial_addr())),
                Ok(None) => Err(format!(
                    "{}: no endpoints file (chainsync-svc not running?)",
                    miner_service::Endpoints::path_in(run, "chainsync").display()
                )),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// Normalises a `--chainsync` value (`host:port` or `http://host:port`) to a URI.
pub fn parse_chainsync_addr(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.starts_with("https://") {
        return Err(format!(
            "{s:?}: TLS to chainsync-svc is not supported; use its plaintext loopback listener (http://HOST:PORT)"
        ));
    }
    let uri = if s.starts_with("http://") {
        s.to_string()
    } else if s.contains("://") {
        return Err(format!("{s:?}: expected HOST:PORT or http://HOST:PORT"));
    } else {
        format!("http://{s}")
    };
    let parsed: tonic::transport::Uri = uri
        .parse()
        .map_err(|e| format!("{s:?} is not an address: {e}"))?;
    if parsed.host().is_none_or(str::is_empty) || parsed.port_u16().is_none() {
        return Err(format!("{s:?}: expected HOST:PORT or http://HOST:PORT"));
    }
    Ok(uri)
}

/// Doubling backoff between `BACKOFF_INITIAL` and `BACKOFF_MAX` (pure).
pub fn next_backoff(cur: Duration) -> Duration {
    (cur * 2).clamp(BACKOFF_INITIAL, BACKOFF_MAX)
}

/// Writes the phase (or its absence) into a status snapshot: `phase`/`block` for the API,
/// `chain_phase` for the gauges.
pub fn apply(s: &mut StatusSnapshot, p: Option<&ChainPhase>) {
    match p {
        Some(p) => {
            s.phase.clone_from(&p.name);
            s.block = p.block;
            s.chain_phase = Some(p.clone());
        }
        None => {
            s.phase.clear();
            s.block = 0;
            s.chain_phase = None;
        }
    }
}

/// Follows chainsync's `WatchPhase` until `stop`, publishing every phase on `tx` and `None`
/// while it is unreachable. Never fails: errors are logged and retried with backoff.
pub async fn run(
    source: PhaseSource,
    token: Option<miner_service::ControlToken>,
    tx: watch::Sender<Option<ChainPhase>>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_INITIAL;
    // Log the first failure of an outage at warn, the retries at debug.
    let mut outage_logged = false;
    loop {
        match follow(&source, token.as_ref(), &tx, &stop).await {
            Ok(()) => return,
            Err(Failure { error, streamed }) => {
                tx.send_if_modified(|v| v.take().is_some());
                if streamed {
                    backoff = BACKOFF_INITIAL;
                    outage_logged = false;
                }
                if outage_logged {
                    tracing::debug!(%error, "chainsync-svc still unreachable; retrying");
                } else {
                    tracing::warn!(%error, retry_in = ?backoff, "phase from chainsync-svc unavailable; training goes on, retrying");
                    outage_logged = true;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = next_backoff(backoff);
    }
}

struct Failure {
    error: String,
    /// Whether at least one phase arrived before the failure (resets the backoff).
    streamed: bool,
}

/// One connection: `Ok` only when `stop` fired.
async fn follow(
    source: &PhaseSource,
    token: Option<&miner_service::ControlToken>,
    tx: &watch::Sender<Option<ChainPhase>>,
    stop: &CancellationToken,
) -> Result<(), Failure> {
    let fail = |error: String| Failure {
        error,
        streamed: false,
    };
    let uri = source.resolve().map_err(fail)?;
    let endpoint = tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|e| fail(format!("chainsync-svc at {uri}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        c = endpoint.connect() => c.map_err(|e| fail(format!("connect to chainsync-svc at {uri}: {e}")))?,
    };
    let mut client = pb::chain_sync_client::ChainSyncClient::with_interceptor(
        channel,
        miner_service::TraceContextInterceptor::with_token(token),
    );
    let mut stream = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        r = client.watch_phase(pb::WatchPhaseRequest {}) => r
            .map_err(|e| fail(format!("WatchPhase on chainsync-svc at {uri}: {}", e.message())))?
            .into_inner(),
    };
    tracing::info!(%uri, "following the phase from chainsync-svc");
    let mut streamed = false;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = stream.message() => m,
        };
        match msg {
            Ok(Some(p)) => {
                streamed = true;
                let p = ChainPhase::from(&p);
                tracing::debug!(phase = %p.name, block = p.block, "phase");
                tx.send_replace(Some(p));
            }
            Ok(None) => {
                return Err(Failure {
                    error: format!("chainsync-svc at {uri} ended the phase stream"),
                    streamed,
                });
            }
            Err(e) => {
                return Err(Failure {
                    error: format!("phase stream from chainsync-svc at {uri}: {}", e.message()),
                    streamed,
                });
            }
        }
    }
}

/// Publishes the engine's snapshots with the latest phase folded in, until the engine's sender
/// is dropped (the training thread ended); the last snapshot is published before returning.
pub async fn merge(
    mut engine: watch::Receiver<StatusSnapshot>,
    mut phase: watch::Receiver<Option<ChainPhase>>,
    out: watch::Sender<StatusSnapshot>,
) {
    let mut phase_open = true;
    loop {
        let mut snap = engine.borrow_and_update().clone();
        apply(&mut snap, phase.borrow_and_update().as_ref());
        out.send_replace(snap);
        tokio::select! {
            r = engine.changed() => if r.is_err() {
                let mut snap = engine.borrow().clone();
                apply(&mut snap, phase.borrow().as_ref());
                out.send_replace(snap);
                return;
            },
            r = phase.changed(), if phase_open => if r.is_err() {
                phase_open = false;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut d = BACKOFF_INITIAL;
        let mut seen = vec![d];
        for _ in 0..8 {
            d = next_backoff(d);
            seen.push(d);
        }
        assert_eq!(seen[1], BACKOFF_INITIAL * 2);
        assert_eq!(*seen.last().unwrap(), BACKOFF_MAX);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn chainsync_addresses_are_normalised() {
        assert_eq!(
            parse_chainsync_addr("127.0.0.1:50052").as_deref(),
            Ok("http://127.0.0.1:50052")
        );
        assert_eq!(
            parse_chainsync_addr("http://localhost:7").as_deref(),
            Ok("http://localhost:7")
        );
        assert!(parse_chainsync_addr("https://127.0.0.1:1").is_err());
        assert!(parse_chainsync_addr("127.0.0.1").is_err());
    }
}
