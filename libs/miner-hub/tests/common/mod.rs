//! Shared test helpers: the stand-in with the test users, the real Python huggingface_hub, files.
#![allow(dead_code)]

use miner_hub::{HubClient, HubConfig, RepoId};
use miner_standins::hub::{HubStandIn, HubStandInOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const ALICE: &str = "tok-alice-write";
pub const ALICE_RO: &str = "tok-alice-read";
pub const BOB: &str = "tok-bob-write";

pub async fn standin(lfs_threshold: u64, chunk: u64, page: usize) -> HubStandIn {
    let opts = HubStandInOptions {
        lfs_threshold,
        multipart_chunk_size: chunk,
        tree_page_size: page,
        tokens: vec![
            (ALICE.into(), "alice".into(), true),
            (ALICE_RO.into(), "alice".into(), false),
            (BOB.into(), "bob".into(), true),
        ],
        ..Default::default()
    };
    HubStandIn::start(opts)
        .await
        .expect("start the Hub stand-in")
}

pub fn client(endpoint: &str, token: Option<&str>) -> HubClient {
    let cfg = HubConfig {
        endpoint: endpoint.to_string(),
        token: token.map(str::to_string),
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(20),
        max_retries: 4,
        retry_deadline: Duration::from_secs(30),
        ..Default::default()
    };
    HubClient::new(cfg).expect("client")
}

pub fn repo(s: &str) -> RepoId {
    s.parse().unwrap()
}

/// `$MINER_PYTHON` with huggingface_hub 1.10.1 and without hf_xet; panics loudly otherwise.
pub fn python() -> PathBuf {
    let p = std::env::var("MINER_PYTHON").unwrap_or_else(|_| {
        panic!("MINER_PYTHON is not set: the Hub fidelity tests need the Python venv (scripts/setup-python.sh)")
    });
    let p = PathBuf::from(p);
    assert!(
        p.exists(),
        "MINER_PYTHON={} does not exist (run scripts/setup-python.sh)",
        p.display()
    );
    p
}

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/hub_client.py")
}

/// Runs one command of tests/py/hub_client.py against `endpoint`; returns its JSON line.
pub async fn py(
    endpoint: &str,
    token: Option<&str>,
    home: &Path,
    args: &[&str],
) -> serde_json::Value {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(script()).args(args);
    cmd.env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home)
        .env("HF_HUB_DISABLE_XET", "1");
    cmd.env_remove("HF_TOKEN")
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("http_proxy");
    cmd.env("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1");
    if let Some(t) = token {
        cmd.env("HF_TOKEN", t)
            .env_remove("HF_HUB_DISABLE_IMPLICIT_TOKEN");
    }
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("python timed out")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("python {args:?} printed {last:?}: {e}"))
}

/// Deterministic pseudo-random bytes (xorshift), so files are incompressible and reproducible.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A valid safetensors file with one F32 tensor `w` of `n` elements (0.5 each).
pub fn safetensors(n: usize) -> Vec<u8> {
    let mut header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#,
        n * 4
    );
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for _ in 0..n {
        out.extend_from_slice(&0.5f32.to_le_bytes());
    }
    out
}

/// Writes a sparse-free file of `size` pseudo-random bytes in 8 MiB steps (bounded memory).
pub fn big_file(path: &Path, size: u64, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let block = bytes(8 << 20, seed);
    let mut left = size;
    let mut i = 0u8;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        let mut b = block[..n].to_vec();
        b[0] = i; // every block differs
        i = i.wrapping_add(1);
        f.write_all(&b).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}
