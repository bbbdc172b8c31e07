//! `init_tracing` with an OTLP/HTTP endpoint: spans reach `OtlpHttpCollectorStandIn` (a minimal
//! HTTP/1.1 receiver standing in for an OpenTelemetry collector's `/v1/traces`) by the time
//! the guard is shut down. One test per file: the subscriber is process-global.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Accepts `POST /v1/traces` and records (path, content-type, body length).
async fn otlp_http_collector_stand_in(
    listener: tokio::net::TcpListener,
    seen: Arc<Mutex<Vec<(String, String, usize)>>>,
) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            let (head_end, len) = loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    break (i + 4, len);
                }
            };
            while buf.len() < head_end + len {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            let ctype = head
                .lines()
                .find_map(|l| {
                    l.to_lowercase()
                        .strip_prefix("content-type:")
                        .map(|v| v.trim().to_string())
                })
                .unwrap_or_default();
            seen.lock().unwrap().push((path, ctype, len));
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
    }
}

#[test]
fn spans_are_exported_over_otlp_http_and_flushed_on_shutdown() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(otlp_http_collector_stand_in(listener, seen.clone()));
    let guard = {
        let _e = rt.enter();
        miner_service::init_tracing(
            "otlp-http-test",
            miner_service::LogFormat::Json,
            Some(format!("http://{addr}/v1/traces")),
        )
        .unwrap()
    };
    assert!(guard.exporting());
    {
        let span = tracing::info_span!("unit-of-work", answer = 42);
        let _g = span.enter();
        tracing::info!("inside");
    }
    guard.shutdown();
    let got = seen.lock().unwrap().clone();
    assert!(
        got.iter()
            .any(|(p, c, n)| p == "/v1/traces" && c == "application/x-protobuf" && *n > 0),
        "{got:?}"
    );
}
