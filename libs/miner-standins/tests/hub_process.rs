//! `miner-standins hub` as a process: prints its endpoint first, serves the Hub API with the
//! tokens given on the command line, refuses malformed tokens, and exits when stdin closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn get(endpoint: &str, path: &str, token: Option<&str>) -> String {
    let addr = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn hub_subcommand_serves_and_exits_on_stdin_eof() {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_miner-standins"))
        .args(["hub", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .args([
            "--token",
            "tk:carol:write",
            "--token",
            "ro:carol:read",
            "--exit-on-stdin-eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let endpoint = line.trim().to_string();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint:?}");
    let me = get(&endpoint, "/api/whoami-v2", Some("tk"));
    assert!(
        me.starts_with("HTTP/1.1 200")
            && me.contains("\"name\":\"carol\"")
            && me.contains("\"role\":\"write\""),
        "{me}"
    );
    let ro = get(&endpoint, "/api/whoami-v2", Some("ro"));
    assert!(ro.contains("\"role\":\"read\""), "{ro}");
    let anon = get(&endpoint, "/api/whoami-v2", None);
    assert!(anon.starts_with("HTTP/1.1 401"), "{anon}");
    let missing = get(&endpoint, "/api/models/carol/none", None);
    assert!(
        missing.starts_with("HTTP/1.1 401")
            && missing
                .to_ascii_lowercase()
                .contains("x-error-code: reponotfound"),
        "{missing}"
    );
    assert!(data.path().join("blobs").is_dir());
    drop(child.stdin.take());
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "did not exit on stdin EOF"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn malformed_tokens_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_miner-standins"))
        .args(["hub", "--token", "just-a-token"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TOKEN:USER:write|read"));
}
