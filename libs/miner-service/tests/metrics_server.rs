//! The metrics server under hostile clients (both services serve their metrics with it):
//!
//! 1. out of file descriptors: 150 connections wait in the backlog while the process may open
//!    no more files, so every `accept` fails with EMFILE. The server pauses between attempts
//!    and logs at most a line per 10 s (it used to retry at once and log each failure: half a
//!    million lines in 6 s); once descriptors are back it serves again;
//! 2. idle connections: at most `max_connections` are accepted at once (the rest wait in the
//!    backlog, holding no descriptor of ours), and each is closed when its deadline passes, so
//!    a scrape gets through once they time out.
//!
//! One test function: the file-descriptor limit is per process.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use miner_service::{MetricsLimits, serve_metrics};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio_util::sync::CancellationToken;

/// Counts the lines the tracing subscriber writes.
#[derive(Clone, Default)]
struct LineCounter(Arc<AtomicUsize>);

impl Write for LineCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.iter().filter(|b| **b == b'\n').count();
        self.0.fetch_add(n, Ordering::SeqCst);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

/// Sends a request and reads the answer (None: nothing within `within`).
fn scrape(addr: std::net::SocketAddr, within: Duration) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(within)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn the_metrics_server_survives_fd_exhaustion_and_idle_connections() {
    let lines = LineCounter::default();
    let writer = lines.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let limits = MetricsLimits {
        max_connections: 4,
        deadline: Duration::from_millis(600),
    };
    let listener = rt
        .block_on(async {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind("127.0.0.1:0".parse().unwrap())?;
            s.listen(1024)
        })
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();

    // 1. Out of file descriptors.
    let waiting: Vec<TcpStream> = (0..150)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    let saved = getrlimit(Resource::Nofile);
    let used = open_fds();
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(used),
            maximum: saved.maximum,
        },
    )
    .unwrap();
    let before = lines.0.load(Ordering::SeqCst);
    let server = rt.spawn(serve_metrics(
        "test",
        listener,
        limits,
        || "metric_one 1\n".to_owned(),
        stop.clone(),
    ));
    std::thread::sleep(Duration::from_secs(3));
    let logged = lines.0.load(Ordering::SeqCst) - before;
    setrlimit(Resource::Nofile, saved).unwrap();
    assert!(
        (1..=2).contains(&logged),
        "{logged} log lines in 3 s of EMFILE (one expected, at most one per 10 s)"
    );
    // Descriptors are back: the waiting connections are served (or time out) and a scrape
    // gets through.
    drop(waiting);
    let started = Instant::now();
    let answer = loop {
        if let Some(a) = scrape(addr, Duration::from_secs(2)).filter(|a| a.contains("metric_one 1"))
        {
            break a;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no answer after EMFILE ended"
        );
    };
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");

    // 2. Idle connections: 20 that never send a byte.
    let base = open_fds();
    let idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let grown = open_fds() - base;
    assert!(
        grown <= 20 + 4,
        "{grown} new descriptors for 20 idle clients: the server accepted more than 4"
    );
    // Each idle connection is closed by the server once its deadline passes.
    let mut first = idle.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let t = Instant::now();
    let mut b = [0u8; 16];
    let n = first.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "an idle connection gets no answer");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        t.elapsed()
    );
    // A scrape gets through once the idle ones time out (5 rounds of 600 ms at most).
    let t = Instant::now();
    let a = scrape(addr, Duration::from_secs(8)).expect("an answer");
    assert!(a.contains("metric_one 1"), "{a}");
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );

    stop.cancel();
    rt.block_on(server).unwrap();
}
