//! The binary refuses bad input with exit status 64 and a message naming the field or file,
//! before it binds a port or writes anything.

use std::path::Path;
use std::process::Command;

use miner_contract::MinerConfig;

fn free_port() -> u16 {
    // Never the same port twice in this process (consecutive bind(0)s can repeat one).
    miner_devnet::free_port().expect("free port")
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
            "--transport",
            "http",
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

#[test]
fn a_bad_validator_whitelist_exits_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    MinerConfig::new_run("miners", "miner_1", "r")
        .write(dir.path())
        .unwrap();
    let list = dir.path().join("whitelist.txt");
    std::fs::write(
        &list,
        "# validators\n5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty\nnot-a-hotkey\n",
    )
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
            "--metrics-listen",
            "127.0.0.1:0",
            "--network",
            "local",
            "--phase-source",
            "local",
            "--validator-whitelist",
        ])
        .arg(format!(
            "5FLSigC9HGRKVhB9FiEo4Y3koPsNmBmLJbpXg2mp1hXcS59Y,@{}",
            list.display()
        ))
        .output()
        .expect("run chainsync-svc");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("--validator-whitelist")
            && err.contains("whitelist.txt line 3")
            && err.contains("not-a-hotkey"),
        "{err}"
    );
    assert_untouched(dir.path(), port);
}

#[test]
fn help_documents_the_validator_whitelist() {
    let out = Command::new(env!("CARGO_BIN_EXE_chainsync-svc"))
        .arg("--help")
        .output()
        .expect("run chainsync-svc --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        help.contains("--validator-whitelist") && help.contains("--phase-source local"),
        "{help}"
    );
}

#[test]
fn help_documents_the_retry_backoff_and_block_time_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_chainsync-svc"))
        .arg("--help")
        .output()
        .expect("run chainsync-svc --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for flag in [
        "--submit-retry-backoff-ms",
        "--download-retry-backoff-ms",
        "CHAINSYNC_SUBMIT_RETRY_BACKOFF_MS",
        "CHAINSYNC_DOWNLOAD_RETRY_BACKOFF_MS",
        "--block-time-ms",
        "CHAINSYNC_BLOCK_TIME_MS",
    ] {
        assert!(help.contains(flag), "{flag} is documented:\n{help}");
    }
    assert!(help.contains("For tests"), "{help}");
}

#[test]
fn the_retry_backoff_and_block_time_flags_set_the_policies_and_timing() {
    use chainsync_svc::config::{Cli, Settings};
    use chainsync_svc::transport::{Backoff, RetryPolicy};
    use clap::Parser;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    MinerConfig::new_run("miners", "miner_1", "r")
        .write(dir.path())
        .unwrap();
    let settings = |extra: &[&str]| {
        let mut args = vec![
            "chainsync-svc".to_owned(),
            "--path".to_owned(),
            dir.path().display().to_string(),
            "--wallet-path".to_owned(),
            example_wallet().display().to_string(),
            "--network".to_owned(),
            "local".to_owned(),
            "--transport".to_owned(),
            "http".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Settings::from_cli(&Cli::try_parse_from(args).expect("flags parse")).expect("settings")
    };

    let default = settings(&[]);
    assert_eq!(default.policies.submit, RetryPolicy::submit());
    assert_eq!(default.policies.download, RetryPolicy::download());
    assert_eq!(default.timing.block_time, Duration::from_secs(12));
    assert_eq!(
        settings(&["--block-time-ms", "1000"]).timing.block_time,
        Duration::from_millis(1000)
    );

    let short = settings(&[
        "--submit-retry-backoff-ms",
        "250",
        "--download-retry-backoff-ms",
        "40",
    ]);
    assert_eq!(
        short.policies.submit,
        RetryPolicy {
            backoff: Backoff::Fixed(Duration::from_millis(250)),
            ..RetryPolicy::submit()
        },
        "only the submission backoff changes (attempts and timeouts stay the reference's)"
    );
    assert_eq!(
        short.policies.download,
        RetryPolicy {
            backoff: Backoff::Fixed(Duration::from_millis(40)),
            ..RetryPolicy::download()
        }
    );
    assert_eq!(
        short.policies.commit_attempts,
        default.policies.commit_attempts
    );

    let bad = Cli::try_parse_from([
        "chainsync-svc",
        "--path",
        "x",
        "--submit-retry-backoff-ms",
        "soon",
    ]);
    assert!(bad.is_err(), "a non-number is refused");
    let zero = Cli::try_parse_from(["chainsync-svc", "--path", "x", "--block-time-ms", "0"]);
    assert!(zero.is_err(), "a zero block time is refused");
}

#[test]
fn wallet_names_with_dot_components_exit_64_naming_the_field() {
    for (cold, hot) in [
        ("..", "miner_1"),
        ("miners", "."),
        ("miners", "../miners/hotkeys/x"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        MinerConfig::new_run(cold, hot, "r")
            .write(dir.path())
            .unwrap();
        let port = free_port();
        let out = daemon(&dir.path().join("config.yaml"), &example_wallet(), port);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cold}/{hot}: {err}");
        assert!(err.contains("is not a wallet name"), "{err}");
        assert_untouched(dir.path(), port);
    }
}

#[test]
fn a_non_loopback_metrics_address_without_tls_exits_64() {
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
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "0.0.0.0:0", "--network", "local"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("--metrics-listen") && err.contains("TLS"),
        "{err}"
    );
    assert_untouched(dir.path(), port);
}

/// An encrypted (`$NACL`) hotkey takes its password from `--wallet-password-file` or a systemd
/// credential (`$CREDENTIALS_DIRECTORY/wallet-password`). The keyfile here is cut short after
/// the prefix, so decryption fails right after the password is obtained: the error tells which
/// stage was reached, without spending a real argon2 run.
#[test]
fn an_encrypted_hotkey_takes_its_password_from_a_file_or_a_systemd_credential() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let wallet = dir.path().join("wallets");
    std::fs::create_dir_all(wallet.join("enc/hotkeys")).unwrap();
    let key = wallet.join("enc/hotkeys/h");
    std::fs::write(&key, b"$NACLshort").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = dir.path().join("run");
    MinerConfig::new_run("enc", "h", "r").write(&run).unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    let run_with = |extra: &[&str], creds_dir: Option<&Path>| {
        let port = free_port();
        let mut c = Command::new(env!("CARGO_BIN_EXE_chainsync-svc"));
        c.arg("--path").arg(&run).arg("--wallet-path").arg(&wallet);
        c.args(["--listen", &format!("127.0.0.1:{port}")]);
        c.args(["--metrics-listen", "127.0.0.1:0", "--network", "local"]);
        c.args(extra).env_remove("CREDENTIALS_DIRECTORY");
        if let Some(d) = creds_dir {
            c.env("CREDENTIALS_DIRECTORY", d);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert_untouched(&run, port);
        assert!(!err.contains("hunter2"), "the password leaked: {err}");
        err
    };
    // No password anywhere.
    let err = run_with(&[], Some(&creds));
    assert!(err.contains("no password was given"), "{err}");
    // The credential is found and used.
    std::fs::write(creds.join("wallet-password"), "hunter2").unwrap();
    let err = run_with(&[], Some(&creds));
    assert!(err.contains("truncated"), "{err}");
    // A password file readable by others is refused; a private one is used.
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file_flag = ["--wallet-password-file", pw.to_str().unwrap()];
    let err = run_with(&file_flag, None);
    assert!(err.contains("readable by others"), "{err}");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = run_with(&file_flag, None);
    assert!(err.contains("truncated"), "{err}");
}
