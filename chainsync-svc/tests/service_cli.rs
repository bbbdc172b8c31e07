//! The binary refuses bad input with exit status 64 and a message naming the field or file,
//! before it binds a port or writes anything.

use std::path::Path;
use std::process::Command;

use miner_contract::MinerConfig;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn example_wallet() -> std::path::PathBuf {
    miner_devnet::kit_dir()
        .expect("shared/devnet")
        .join("data/example_wallet")
}

fn daemon(path: &Path, wallet: &Path, port: u16) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chainsync-svc"))
        .arg("--path")
        .arg(path)
        .arg("--wallet-path")
        .arg(wallet)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "127.0.0.1:0",
            "--network",
            "local",
        ])
        .output()
        .expect("run chainsync-svc")
}

fn assert_untouched(run: &Path, port: u16) {
    assert!(!run.join("chainsync").exists(), "nothing may be written");
    assert!(
        !run.join("control").exists(),
        "no control token or endpoints file"
    );
    // The port was never bound (binding it now succeeds).
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the gRPC port stays free");
}

#[test]
fn a_malformed_config_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        "cycle:\n  train_period: lots\n",
    )
    .unwrap();
    let port = free_port();
    let out = daemon(dir.path(), &example_wallet(), port);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("config.yaml") && err.contains("train_period"),
        "{err}"
    );
    assert_untouched(dir.path(), port);
}

#[test]
fn a_missing_wallet_exits_64_naming_the_keyfile() {
    let dir = tempfile::tempdir().unwrap();
    MinerConfig::new_run("nobody", "nokey", "r")
        .write(dir.path())
        .unwrap();
    let port = free_port();
    let out = daemon(&dir.path().join("config.yaml"), &example_wallet(), port);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("nobody/hotkeys/nokey"), "{err}");
    assert_untouched(dir.path(), port);
}

#[test]
fn a_bad_network_exits_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    MinerConfig::new_run("miners", "miner_1", "r")
        .write(dir.path())
        .unwrap();
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_chainsync-svc"))
        .arg("--path")
        .arg(dir.path())
        .arg("--wallet-path")
        .arg(example_wallet())
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--network",
            "mainnet",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("--network") && err.contains("mainnet"),
        "{err}"
    );
    assert_untouched(dir.path(), port);
}

#[test]
fn a_non_loopback_listen_without_tls_exits_64_before_writing_the_token() {
    let dir = tempfile::tempdir().unwrap();
    MinerConfig::new_run("miners", "miner_1", "r")
        .write(dir.path())
        .unwrap();
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_chainsync-svc"))
        .arg("--path")
        .arg(dir.path())
        .arg("--wallet-path")
        .arg(example_wallet())
        .args(["--listen", &format!("0.0.0.0:{port}"), "--network", "local"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("--listen") && err.contains("--tls-cert"),
        "{err}"
    );
    assert_untouched(dir.path(), port);
}

#[test]
fn a_tls_cert_without_its_key_exits_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    MinerConfig::new_run("miners", "miner_1", "r")
        .write(dir.path())
        .unwrap();
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_chainsync-svc"))
        .arg("--path")
        .arg(dir.path())
        .arg("--wallet-path")
        .arg(example_wallet())
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--network",
            "local",
        ])
        .arg("--tls-cert")
        .arg(dir.path().join("cert.pem"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("--tls-cert") && err.contains("--tls-key"),
        "{err}"
    );
    assert_untouched(dir.path(), port);
}
