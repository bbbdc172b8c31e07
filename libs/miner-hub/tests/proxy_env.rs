//! Proxies from the environment: the client (run as the `hub_bench` example, so the environment is
//! its own) sends its Hub requests through `HTTP_PROXY` / `ALL_PROXY`. The proxy here answers
//! whoami itself; the endpoint is a closed port, so success means the proxy was used.

use std::sync::{Arc, Mutex};

fn example_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples/hub_bench");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p miner-hub --examples` (cargo test --workspace does)",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_through_the_proxy_from_the_environment() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
        let s2 = s2.clone();
        async move {
            let auth = headers.get("authorization").is_some();
            s2.lock().unwrap().push(format!("{uri} auth={auth}"));
            axum::Json(serde_json::json!({"name": "via-proxy", "auth": {"accessToken": {"role": "write"}}}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // A port nothing listens on: only the proxy can answer.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://hub.invalid:{}", closed.local_addr().unwrap().port());
    drop(closed);
    for var in ["HTTP_PROXY", "ALL_PROXY"] {
        let out = tokio::process::Command::new(example_binary())
            .args(["--endpoint", &endpoint, "--token", "t0k", "whoami"])
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env(var, &proxy)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{var}: {}\n{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("via-proxy"), "{var}: {stdout}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter().all(
            |s| s.starts_with(&format!("{endpoint}/api/whoami-v2")) && s.ends_with("auth=true")
        ),
        "{seen:?}"
    );
}
