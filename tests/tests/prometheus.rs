//! A real Prometheus (Debian's `prometheus`, installed by `scripts/setup-prometheus.sh`) scrapes
//! the real trainer-svc and chainsync-svc `--metrics-listen` endpoints, and its query API
//! answers with the trainer's loss and with both targets up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use miner_tests::*;
use serde_json::Value;

/// `prometheus` on PATH, or a failure naming the setup script.
fn prometheus_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`prometheus` is not on PATH; install it with scripts/setup-prometheus.sh \
                 (Debian's prometheus package)"
            )
        })
}

/// Percent-encodes a query-string value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET /api/v1/query?query=<promql>` on Prometheus (HTTP/1.0: no chunking); the JSON body, or
/// `None` while it does not answer.
fn prom_query(port: u16, promql: &str) -> Option<Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!(
        "GET /api/v1/query?query={} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n",
        encode(promql)
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// The instant-vector samples of a successful query: (labels, value).
fn samples(v: &Value) -> Vec<(serde_json::Map<String, Value>, f64)> {
    if v.get("status").and_then(Value::as_str) != Some("success") {
        return Vec::new();
    }
    v.pointer("/data/result")
        .and_then(Value::as_array)
        .map(|rs| {
            rs.iter()
                .filter_map(|r| {
                    let labels = r.get("metric")?.as_object()?.clone();
                    let val = r.pointer("/value/1")?.as_str()?.parse::<f64>().ok()?;
                    Some((labels, val))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn write_config(dir: &Path, targets: &[(&str, u16)]) -> PathBuf {
    let mut yml = String::from(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
    );
    for (job, port) in targets {
        yml.push_str(&format!(
            "  - job_name: {job}\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    \
             static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ));
    }
    let p = dir.join("prometheus.yml");
    std::fs::write(&p, yml).unwrap();
    p
}

/// Polls `query` every 500 ms until `ok` accepts its samples; fails after `limit` with the last
/// answer and the service logs.
fn wait_query(
    port: u16,
    query: &str,
    limit: Duration,
    ok: impl Fn(&[(serde_json::Map<String, Value>, f64)]) -> bool,
    logs: &[&Service],
) -> Vec<(serde_json::Map<String, Value>, f64)> {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Some(v) = prom_query(port, query) {
            let s = samples(&v);
            if ok(&s) {
                return s;
            }
            last = Some(v);
        }
        if start.elapsed() > limit {
            let tails: Vec<String> = logs
                .iter()
                .map(|s| format!("--- {} log:\n{}", s.name, s.log_tail(20)))
                .collect();
            panic!(
                "timed out after {limit:?} waiting for Prometheus query `{query}`; last answer: {}\n{}",
                last.map(|v| v.to_string()).unwrap_or_else(|| "none".into()),
                tails.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Prometheus scrapes both services every second; `miner_training_loss{expert_group}` holds a
/// finite positive loss once the trainer has trained, and both targets are `up`.
#[test]
fn prometheus_scrapes_the_services_and_answers_the_training_loss() {
    let t0 = Instant::now();
    let prom = prometheus_bin();
    let tmp = tempfile::tempdir().unwrap();
    let devnet = miner_devnet::shared();
    let spec = RunSpec {
        ws_url: devnet.ws_url(),
        // Not needed for the metrics endpoint (no phase is acted on in this test).
        owner_url: "http://127.0.0.1:9".into(),
        periods: short_periods(),
        checkpoint_interval: 1000,
    };
    let run_dir = create_run(tmp.path(), &spec).unwrap();
    let ports = Ports::free();
    let trainer = Service::spawn(
        "trainer-svc",
        trainer_command(&run_dir, &ports).unwrap(),
        &tmp.path().join("trainer.log"),
    )
    .unwrap();
    let chainsync = Service::spawn(
        "chainsync-svc",
        chainsync_command(&run_dir, &ports).unwrap(),
        &tmp.path().join("chainsync.log"),
    )
    .unwrap();

    let config = write_config(
        tmp.path(),
        &[
            ("trainer-svc", ports.trainer_metrics),
            ("chainsync-svc", ports.chainsync_metrics),
        ],
    );
    let prom_port = free_port();
    let mut cmd = Command::new(prom);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"));
    let prometheus = Service::spawn("prometheus", cmd, &tmp.path().join("prometheus.log")).unwrap();
    let logs = [&trainer, &chainsync, &prometheus];

    let loss = wait_query(
        prom_port,
        "miner_training_loss",
        Duration::from_secs(60),
        |s| {
            s.iter().any(|(l, v)| {
                l.get("expert_group").and_then(Value::as_str) == Some("embedded")
                    && v.is_finite()
                    && *v > 0.0
            })
        },
        &logs,
    );
    let (labels, value) = &loss[0];
    assert_eq!(
        labels.get("job").and_then(Value::as_str),
        Some("trainer-svc"),
        "{labels:?}"
    );
    eprintln!(
        "miner_training_loss = {value} ({labels:?}) after {:?}",
        t0.elapsed()
    );

    for job in ["trainer-svc", "chainsync-svc"] {
        let q = format!("up{{job=\"{job}\"}} == 1");
        wait_query(
            prom_port,
            &q,
            Duration::from_secs(20),
            |s| s.len() == 1,
            &logs,
        );
    }
    // chainsync's job counters were parsed: one series per outcome.
    wait_query(
        prom_port,
        "chainsync_commits_total{job=\"chainsync-svc\"}",
        Duration::from_secs(20),
        |s| s.len() == 5 && s.iter().all(|(_, v)| v.is_finite()),
        &logs,
    );
    eprintln!("both targets up after {:?}", t0.elapsed());
}
