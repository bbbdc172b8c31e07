//! The Hub transport's start-up checks on the real binary against the `HubStandIn`: no token,
//! a token the Hub refuses, a read-only token, a repo id over 32 characters (configured, or
//! derived from the token's user) each exit 64 with one line naming the cause, before anything
//! is bound or written; a good token starts the daemon past the checks.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use miner_contract::MinerConfig;
use miner_standins::hub::{HubStandIn, HubStandInOptions};

fn example_wallet() -> PathBuf {
    miner_devnet::kit_dir()
        .expect("shared/devnet")
        .join("data/example_wallet")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn hub() -> HubStandIn {
    HubStandIn::start(HubStandInOptions {
        tokens: vec![
            ("hf_write".into(), "miner".into(), true),
            ("hf_read".into(), "miner".into(), false),
            (
                "hf_long".into(),
                "a-rather-long-hugging-face-user".into(),
                true,
            ),
        ],
        ..Default::default()
    })
    .await
    .expect("Hub stand-in")
}

/// Runs the binary on `run` (config written by `cfg`) with `token` in `HF_TOKEN` (none when
/// `None`), `--transport hub` and the stand-in's endpoint.
async fn run_daemon(run: &Path, endpoint: &str, token: Option<&str>, port: u16) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chainsync-svc"));
    cmd.arg("--path")
        .arg(run)
        .arg("--wallet-path")
        .arg(example_wallet())
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "127.0.0.1:0",
            "--network",
            "ws://127.0.0.1:9",
            "--transport",
            "hub",
            "--hf-endpoint",
            endpoint,
        ])
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT")
        .stdin(Stdio::null());
    if let Some(t) = token {
        cmd.env("HF_TOKEN", t);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("run chainsync-svc"))
        .await
        .unwrap()
}

fn config(dir: &Path, edit: impl FnOnce(&mut MinerConfig)) {
    let mut cfg = MinerConfig::new_run("miners", "miner_1", "r");
    edit(&mut cfg);
    cfg.write(dir).unwrap();
}

fn assert_untouched(run: &Path, port: u16) {
    assert!(!run.join("chainsync").exists(), "nothing may be written");
    assert!(!run.join("control").exists(), "no control token");
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the gRPC port stays free");
}

async fn expect_64(edit: impl FnOnce(&mut MinerConfig), token: Option<&str>, want: &[&str]) {
    let h = hub().await;
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), edit);
    let port = free_port();
    let out = run_daemon(dir.path(), &h.endpoint(), token, port).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    // One error line (other lines are log warnings, e.g. about the keyfile's mode).
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("chainsync-svc: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    for w in want {
        assert!(lines[0].contains(w), "{w:?} not in: {err}");
    }
    if let Some(t) = token {
        assert!(!err.contains(t), "the token leaked: {err}");
    }
    assert_untouched(dir.path(), port);
}

#[tokio::test]
async fn no_token_exits_64_naming_the_variable() {
    expect_64(
        |_| {},
        None,
        &["hf.token_env_var", "HF_TOKEN", "--transport http"],
    )
    .await;
}

#[tokio::test]
async fn a_token_the_hub_refuses_exits_64() {
    expect_64(|_| {}, Some("hf_unknown"), &["$HF_TOKEN", "refused"]).await;
}

#[tokio::test]
async fn a_read_only_token_exits_64() {
    expect_64(|_| {}, Some("hf_read"), &["read-only", "write access"]).await;
}

#[tokio::test]
async fn a_configured_repo_over_32_characters_exits_64() {
    let repo = format!("{}/{}", "a".repeat(16), "b".repeat(16)); // 33
    expect_64(
        |c| c.hf.checkpoint_repo = Some(repo),
        Some("hf_write"),
        &["hf.checkpoint_repo", "33 characters", "at most 32"],
    )
    .await;
}

#[tokio::test]
async fn a_derived_repo_over_32_characters_exits_64() {
    // "a-rather-long-hugging-face-user/co" is 34 characters.
    expect_64(
        |_| {},
        Some("hf_long"),
        &[
            "hf.default_repo_name",
            "34 characters",
            "hf.checkpoint_repo",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_good_token_passes_the_checks() {
    let h = hub().await;
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), |_| {});
    let port = free_port();
    // The checks pass; the daemon then fails to reach the (absent) chain with status 1, not 64.
    let out = run_daemon(dir.path(), &h.endpoint(), Some("hf_write"), port).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("connect to"), "{err}");
    let who = h
        .requests()
        .iter()
        .filter(|r| r.path == "/api/whoami-v2" && r.authorization)
        .count();
    assert_eq!(who, 1, "one authenticated whoami");
}
