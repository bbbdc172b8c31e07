//! The shared plumbing as a service uses it: the token file, the auth policy, the listen
//! policy and the endpoints file, on real files.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

use miner_service::{AuthLayer, ControlToken, Endpoints, check_listen};

#[test]
fn token_file_is_created_once_owner_only_and_shared_by_concurrent_starters() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().to_path_buf();
    // Eight "services" starting at once agree on one token.
    let tokens: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| ControlToken::load_or_create(&run).unwrap()))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().expose().to_string())
            .collect()
    });
    assert!(tokens.iter().all(|t| t == &tokens[0]));
    assert_eq!(tokens[0].len(), 64);
    let path = ControlToken::path_in(&run);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A later start reads the same token; no temp files are left behind.
    assert_eq!(
        ControlToken::load_or_create(&run).unwrap().expose(),
        tokens[0]
    );
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("token")]);
    // Debug never shows the secret.
    let t = ControlToken::read(&path).unwrap();
    assert!(!format!("{t:?}").contains(&tokens[0]));
    // A token others can read is refused with the fix in the message.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = ControlToken::read(&path).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
}

fn headers(auth: Option<&str>) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    if let Some(a) = auth {
        h.insert("authorization", a.parse().unwrap());
    }
    h
}

#[test]
fn mutating_calls_always_need_the_token_reads_only_off_loopback() {
    let tok = ControlToken::new("s3cret").unwrap();
    let local = AuthLayer::for_listen(tok.clone(), "127.0.0.1:1".parse().unwrap());
    let remote = AuthLayer::for_listen(tok, "0.0.0.0:1".parse().unwrap());
    let stop = "/miner.trainer.v1.Trainer/Stop";
    let load = "/miner.chainsync.v1.ChainSync/LoadBaseline";
    let read = "/miner.trainer.v1.Trainer/GetStatus";
    let health = "/grpc.health.v1.Health/Check";
    for l in [&local, &remote] {
        assert!(l.check(stop, &headers(None)).is_err());
        assert!(l.check(load, &headers(Some("Bearer nope"))).is_err());
        assert!(
            l.check(stop, &headers(Some("s3cret"))).is_err(),
            "no Bearer prefix"
        );
        assert!(l.check(stop, &headers(Some("Bearer s3cret"))).is_ok());
        assert!(l.check(health, &headers(None)).is_ok());
    }
    assert!(local.check(read, &headers(None)).is_ok());
    assert!(remote.check(read, &headers(None)).is_err());
    assert!(remote.check(read, &headers(Some("Bearer s3cret"))).is_ok());
}

#[test]
fn listen_policy_allows_loopback_and_needs_tls_and_token_elsewhere() {
    let lo: SocketAddr = "127.0.0.1:50051".parse().unwrap();
    let lo6: SocketAddr = "[::1]:50051".parse().unwrap();
    let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
    assert!(check_listen(lo, false, false).is_ok());
    assert!(check_listen(lo6, false, false).is_ok());
    let e = check_listen(any, false, true).unwrap_err().to_string();
    assert!(
        e.contains("0.0.0.0:50051") && e.contains("--tls-cert"),
        "{e}"
    );
    assert!(check_listen(any, true, false).is_err());
    assert!(check_listen(any, true, true).is_ok());
}

#[test]
fn endpoints_file_round_trips_and_is_removed_by_its_guard() {
    let tmp = tempfile::tempdir().unwrap();
    let ep = Endpoints::new(
        "trainer",
        "0.0.0.0:4000".parse().unwrap(),
        Some("127.0.0.1:4001".parse().unwrap()),
        true,
    );
    let guard = ep.write(tmp.path()).unwrap();
    let back = Endpoints::read(tmp.path(), "trainer").unwrap().unwrap();
    assert_eq!(back, ep);
    assert_eq!(back.dial_addr().to_string(), "127.0.0.1:4000");
    assert!(miner_service::pid_alive(back.pid));
    drop(guard);
    assert!(Endpoints::read(tmp.path(), "trainer").unwrap().is_none());
    // A corrupt file is an error naming it, not a silent "not running".
    std::fs::write(Endpoints::path_in(tmp.path(), "chainsync"), "{").unwrap();
    let e = Endpoints::read(tmp.path(), "chainsync")
        .unwrap_err()
        .to_string();
    assert!(e.contains("chainsync.json"), "{e}");
}
