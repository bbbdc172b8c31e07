//! The control token never crosses the network in plaintext: with a token, minerctl refuses an
//! `http://` address that is not loopback before it connects (use `https://` with `--ca`).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

const MINERCTL: &str = env!("CARGO_BIN_EXE_minerctl");

/// Runs `minerctl status` against `addr`. Off-loopback addresses run inside a fresh network
/// namespace (`unshare --net`, CI runs as root), so even a regression that connects sends nothing
/// off this machine.
fn run(addr: &str, token: &std::path::Path, isolated: bool) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let mut cmd = if isolated {
        let mut c = Command::new("unshare");
        c.args(["--net", MINERCTL]);
        c
    } else {
        Command::new(MINERCTL)
    };
    let out = cmd
        .args([
            "status",
            "--trainer",
            addr,
            "--timeout",
            "5",
            "--token-file",
        ])
        .arg(token)
        .env_remove("RUST_LOG")
        .output()
        .expect("run minerctl (off-loopback cases need `unshare --net`, i.e. root)");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), all, started.elapsed())
}

#[test]
fn a_token_is_never_sent_in_plaintext_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    for addr in [
        "http://192.0.2.7:50051",
        "192.0.2.7:50051",
        "http://[2001:db8::7]:50051",
    ] {
        let (code, out, took) = run(addr, &token, true);
        assert!(
            !out.contains("unshare:"),
            "this test needs `unshare --net` (root) to stay off the network: {out}"
        );
        assert_ne!(code, Some(0), "{addr}: {out}");
        assert!(
            out.contains("refusing to send the control token in plaintext"),
            "{addr}: {out}"
        );
        assert!(!out.contains("0123456789abcdef"), "the token leaked: {out}");
        assert!(
            took < Duration::from_secs(3),
            "{addr}: it tried to connect ({took:?})"
        );
    }
    // Loopback is fine in plaintext: the refusal is about the address, not the token.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let (code, out, _) = run(&format!("http://127.0.0.1:{port}"), &token, false);
    assert_ne!(code, Some(0));
    assert!(!out.contains("plaintext"), "{out}");
}
