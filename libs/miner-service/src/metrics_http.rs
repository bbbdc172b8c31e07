//! The plain HTTP/1.1 server behind both services' `--metrics-listen` (Prometheus text; any
//! path answers with the metrics).
//!
//! Guards, because anything that can connect is untrusted:
//! - **one deadline per connection** ([`MetricsLimits::deadline`]): reading the request head and
//!   writing the answer together; a slow or idle client is dropped when it passes;
//! - **a cap on concurrent connections** ([`MetricsLimits::max_connections`]): past it, nothing
//!   more is accepted until a connection ends (the kernel's backlog holds the rest), so idle
//!   connections cannot take every file descriptor of the process;
//! - **a pause after an accept error** (out of file descriptors, `EMFILE`/`ENFILE`, most often):
//!   the failed connection stays in the backlog, so retrying at once spins and, logging each
//!   failure, floods the journal (half a million lines in 6 s were seen). The pause doubles from
//!   [`ACCEPT_PAUSE_MIN`] to [`ACCEPT_PAUSE_MAX`]; at most one line per [`ACCEPT_LOG_EVERY`] is
//!   logged, with the number of errors since the last line;
//! - the request head is read into a fixed 4 KiB buffer and otherwise ignored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Shortest pause after a failed `accept`.
pub const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(50);
/// Longest pause after failed `accept`s in a row.
pub const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// At most one log line about accept errors this often.
pub const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);
/// Bytes of the request head read (the rest is ignored).
const HEAD_BUF: usize = 4096;

/// Limits of the metrics server.
#[derive(Debug, Clone, Copy)]
pub struct MetricsLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Longest one connection may take, request head and answer together.
    pub deadline: Duration,
}

impl Default for MetricsLimits {
    fn default() -> Self {
        MetricsLimits {
            max_connections: 32,
            deadline: Duration::from_secs(5),
        }
    }
}

/// Counts accept errors and decides when to log and how long to pause.
#[derive(Debug)]
struct AcceptErrors {
    pause: Duration,
    since_log: u64,
    last_log: Option<Instant>,
}

impl AcceptErrors {
    fn new() -> Self {
        AcceptErrors {
            pause: ACCEPT_PAUSE_MIN,
            since_log: 0,
            last_log: None,
        }
    }

    /// An error: logs it when the last line is old enough; returns the pause to take.
    fn failed(&mut self, service: &str, e: &std::io::Error) -> Duration {
        self.since_log += 1;
        let due = self
            .last_log
            .is_none_or(|t| t.elapsed() >= ACCEPT_LOG_EVERY);
        if due {
            tracing::warn!(
                service,
                error = %e,
                errors = self.since_log,
                pause_ms = self.pause.as_millis() as u64,
                "metrics: cannot accept connections (pausing; out of file descriptors?)"
            );
            self.since_log = 0;
            self.last_log = Some(Instant::now());
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(ACCEPT_PAUSE_MAX);
        pause
    }

    fn succeeded(&mut self) {
        self.pause = ACCEPT_PAUSE_MIN;
    }
}

/// Serves `render()` to every connection on `listener` until `shutdown` (see the module docs).
pub async fn serve_metrics<F>(
    service: &'static str,
    listener: TcpListener,
    limits: MetricsLimits,
    render: F,
    shutdown: CancellationToken,
) where
    F: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut errors = AcceptErrors::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let sock = match accepted {
            Ok((sock, _)) => {
                errors.succeeded();
                sock
            }
            Err(e) => {
                drop(permit);
                let pause = errors.failed(service, &e);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(limits.deadline, answer(sock, &*render)).await;
            drop(permit);
        });
    }
}

/// Reads the request head (best effort) and writes the metrics.
async fn answer(mut sock: TcpStream, render: &(dyn Fn() -> String + Send + Sync)) {
    let mut buf = [0u8; HEAD_BUF];
    let mut got = 0;
    while got < buf.len() {
        match sock.read(&mut buf[got..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                got += n;
                if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let body = render();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = sock.write_all(head.as_bytes()).await;
    let _ = sock.write_all(body.as_bytes()).await;
    let _ = sock.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_pause_longer_and_log_rarely() {
        let mut a = AcceptErrors::new();
        let e = std::io::Error::from_raw_os_error(24);
        let pauses: Vec<Duration> = (0..8).map(|_| a.failed("t", &e)).collect();
        assert_eq!(pauses[0], ACCEPT_PAUSE_MIN);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]), "{pauses:?}");
        assert_eq!(*pauses.last().unwrap(), ACCEPT_PAUSE_MAX);
        // Logged once; the other seven are counted for the next line.
        assert_eq!(a.since_log, 7);
        a.succeeded();
        assert_eq!(a.failed("t", &e), ACCEPT_PAUSE_MIN);
    }
}
