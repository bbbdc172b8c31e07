//! One Hub operation with our client, timed, for `scripts/bench-hub.sh` (and the proxy test):
//!
//! ```text
//! hub_bench --endpoint URL [--token T] upload REPO LOCAL PATH_IN_REPO
//! hub_bench --endpoint URL [--token T] download REPO REV FILE DEST
//! hub_bench --endpoint URL [--token T] whoami
//! hub_bench sha256 LOCAL
//! ```
//! `upload` creates the repo first (untimed; 409 = exists). Prints one JSON line: `{"secs": .., "peak_rss_mib": .., ...}` (peak = this process's VmHWM).
//! The endpoint may also come from `HF_ENDPOINT`; proxies from the environment apply.

use miner_hub::{HubClient, HubConfig, RepoType};
use std::path::Path;
use std::time::Instant;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(-1.0)
}

fn usage() -> ! {
    eprintln!(
        "usage: hub_bench [--endpoint URL] [--token T] (upload REPO LOCAL PATH | download REPO REV FILE DEST | whoami)"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    if std::env::var_os("HUB_BENCH_TRACE").is_some() {
        // Phase timings on stderr (`miner_hub` debug events).
        tracing_subscriber::fmt()
            .with_env_filter("miner_hub=debug")
            .with_writer(std::io::stderr)
            .init();
    }
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut endpoint = None;
    let mut token = None;
    while args.first().is_some_and(|a| a.starts_with("--")) {
        let flag = args.remove(0);
        let value = if args.is_empty() {
            usage()
        } else {
            args.remove(0)
        };
        match flag.as_str() {
            "--endpoint" => endpoint = Some(value),
            "--token" => token = Some(value),
            _ => usage(),
        }
    }
    let mut cfg = HubConfig::from_env(endpoint.as_deref(), "HF_TOKEN");
    if token.is_some() {
        cfg.token = token;
    }
    if let Some(n) = std::env::var("HUB_BENCH_PARALLEL_PARTS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.parallel_parts = n;
    }
    let client = match HubClient::new(cfg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hub_bench: {e}");
            std::process::exit(1);
        }
    };
    let mut t = Instant::now();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["upload", repo, local, path] => {
            let repo = repo.parse().unwrap_or_else(|e| panic!("{e}"));
            if let Err(e) = client.create_repo(&repo, RepoType::Model, false).await {
                eprintln!("hub_bench: {e}");
                std::process::exit(1);
            }
            t = Instant::now();
            client
                .upload_file(
                    &repo,
                    RepoType::Model,
                    Path::new(local),
                    path,
                    "bench upload",
                    None,
                )
                .await
                .map(|c| serde_json::json!({"oid": c.oid}))
        }
        ["download", repo, rev, file, dest] => {
            let repo = repo.parse().unwrap_or_else(|e| panic!("{e}"));
            client
                .download_to(&repo, RepoType::Model, rev, file, Path::new(dest), u64::MAX)
                .await
                .map(|m| serde_json::json!({"commit": m.commit, "size": m.size}))
        }
        ["sha256", local] => {
            // The hashing step of an upload alone (for the benchmark's breakdown).
            use sha2::Digest;
            use std::io::Read;
            let mut f = std::fs::File::open(local).unwrap_or_else(|e| panic!("{local}: {e}"));
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).unwrap_or_else(|e| panic!("{local}: {e}"));
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Ok(serde_json::json!({"sha256": hex::encode(h.finalize())}))
        }
        ["whoami"] => client
            .whoami()
            .await
            .map(|w| serde_json::json!({"name": w.name, "can_write": w.can_write})),
        _ => usage(),
    };
    match result {
        Ok(mut v) => {
            v["secs"] = t.elapsed().as_secs_f64().into();
            v["peak_rss_mib"] = peak_rss_mib().into();
            println!("{v}");
        }
        Err(e) => {
            eprintln!("hub_bench: {e}");
            std::process::exit(1);
        }
    }
}
