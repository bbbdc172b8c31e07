//! Our client against `HubStandIn` faults: 429 with Retry-After, a 503 on one multipart part, a
//! stalled server, a connection cut mid-download (Range resume), tokens without write access, and
//! credentials kept off the storage host.

mod common;

use common::*;
use miner_hub::{HubClient, HubConfig, HubError, RepoType};
use miner_standins::hub::{FaultAction, HubFault, HubRoute};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_waits_for_retry_after_then_succeeds() {
    let hub = standin(1 << 20, 1 << 20, 100).await;
    let c = client(&hub.endpoint(), Some(ALICE));
    hub.inject(HubFault::nth(
        HubRoute::WhoAmI,
        1,
        FaultAction::Status {
            status: 429,
            retry_after: Some(1),
        },
    ));
    let t = Instant::now();
    let me = c.whoami().await.unwrap();
    assert_eq!(me.name, "alice");
    assert!(me.can_write);
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "Retry-After: 1 not honoured ({:?})",
        t.elapsed()
    );
    let whoamis: Vec<u16> = hub
        .requests()
        .iter()
        .filter(|r| r.route == HubRoute::WhoAmI)
        .map(|r| r.status)
        .collect();
    assert_eq!(whoamis, [429, 200]);

    // A Retry-After past the retry deadline is not waited for: RateLimited at once.
    let impatient = HubClient::new(HubConfig {
        endpoint: hub.endpoint(),
        token: Some(ALICE.into()),
        retry_deadline: Duration::from_secs(2),
        ..Default::default()
    })
    .unwrap();
    hub.inject(HubFault::nth(
        HubRoute::WhoAmI,
        1,
        FaultAction::Status {
            status: 429,
            retry_after: Some(600),
        },
    ));
    let t = Instant::now();
    match impatient.whoami().await {
        Err(HubError::RateLimited { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(600)))
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_on_one_multipart_part_retries_that_part_only() {
    let hub = standin(1 << 20, 1 << 20, 100).await;
    let c = client(&hub.endpoint(), Some(ALICE));
    let r = repo("alice/parts");
    c.create_repo(&r, RepoType::Model, false).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = bytes(3_500_000, 3);
    let path = tmp.path().join("shard.bin");
    std::fs::write(&path, &data).unwrap();
    hub.inject(HubFault::nth(
        HubRoute::StoragePartPut,
        2,
        FaultAction::Status {
            status: 503,
            retry_after: Some(0),
        },
    ));
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let commit = c
        .upload_file(&r, RepoType::Model, &path, "shard.bin", "parts", Some(tx))
        .await
        .unwrap();
    let reqs = hub.requests();
    let mut parts: Vec<(String, u16)> = reqs
        .iter()
        .filter(|q| q.route == HubRoute::StoragePartPut)
        .map(|q| (q.path.rsplit('/').next().unwrap().to_string(), q.status))
        .collect();
    parts.sort(); // parts go up in parallel; sort by part number, then status
    let failed: Vec<&String> = parts
        .iter()
        .filter(|(_, st)| *st == 503)
        .map(|(p, _)| p)
        .collect();
    assert_eq!(failed.len(), 1, "{parts:?}");
    let mut want: Vec<(String, u16)> = (1..=4).map(|i| (i.to_string(), 200)).collect();
    want.push((failed[0].clone(), 503));
    want.sort();
    assert_eq!(parts, want, "only the failed part was sent again");
    assert_eq!(
        reqs.iter()
            .filter(|q| q.route == HubRoute::LfsBatch)
            .count(),
        1,
        "not the whole upload again"
    );
    assert!(
        *rx.borrow() >= data.len() as u64,
        "progress reached the file size"
    );
    // What landed is the file.
    let got = c
        .get_range(
            &r,
            RepoType::Model,
            &commit.oid[..7],
            "shard.bin",
            0,
            data.len() as u64,
        )
        .await
        .unwrap();
    assert!(got == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_hub_gives_timeout_quickly() {
    let hub = standin(1 << 20, 1 << 20, 100).await;
    hub.put_file(
        "alice/stall",
        miner_standins::hub::RepoKind::Model,
        "f.bin",
        &bytes(2 << 20, 1),
    )
    .unwrap();
    let c = HubClient::new(HubConfig {
        endpoint: hub.endpoint(),
        read_timeout: Duration::from_secs(1),
        max_retries: 3,
        ..Default::default()
    })
    .unwrap();
    hub.inject(HubFault::nth(
        HubRoute::ResolveHead,
        1,
        FaultAction::Stall(Duration::from_secs(30)),
    ));
    let t = Instant::now();
    match c
        .head_file(&repo("alice/stall"), RepoType::Model, "main", "f.bin")
        .await
    {
        Err(HubError::Timeout { .. }) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // A stall in the middle of the storage body: Timeout too, well before the stall ends.
    hub.inject(HubFault::nth(
        HubRoute::StorageGet,
        1,
        FaultAction::Stall(Duration::from_secs(30)),
    ));
    let tmp = tempfile::tempdir().unwrap();
    let t = Instant::now();
    match c
        .download_to(
            &repo("alice/stall"),
            RepoType::Model,
            "main",
            "f.bin",
            &tmp.path().join("f"),
            1 << 30,
        )
        .await
    {
        Err(e @ HubError::Timeout { .. }) => assert!(e.is_transient()),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_download_resumes_with_range_to_an_identical_file() {
    let hub = standin(1 << 20, 1 << 20, 100).await;
    let data = bytes(3 << 20, 9);
    let oid = hub
        .put_file(
            "alice/cut",
            miner_standins::hub::RepoKind::Model,
            "w.safetensors",
            &data,
        )
        .unwrap();
    hub.inject(HubFault::nth(
        HubRoute::StorageGet,
        1,
        FaultAction::CutAfter(1 << 20),
    ));
    hub.inject(HubFault::nth(
        HubRoute::StorageGet,
        2,
        FaultAction::CutAfter(600_000),
    ));
    let c = client(&hub.endpoint(), Some(ALICE));
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("w.safetensors");
    let meta = c
        .download_to(
            &repo("alice/cut"),
            RepoType::Model,
            &oid[..7],
            "w.safetensors",
            &dest,
            1 << 30,
        )
        .await
        .unwrap();
    assert_eq!(meta.commit, oid);
    assert!(
        std::fs::read(&dest).unwrap() == data,
        "resumed file differs"
    );
    assert!(!tmp.path().join("w.safetensors.part").exists());
    let gets: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.route == HubRoute::StorageGet)
        .collect();
    assert_eq!(gets.len(), 3, "{gets:?}");
    assert_eq!(gets[0].range, None);
    for g in &gets[1..] {
        let start: u64 = g
            .range
            .as_deref()
            .unwrap()
            .trim_start_matches("bytes=")
            .trim_end_matches('-')
            .parse()
            .unwrap();
        assert!(
            start > 0 && start < data.len() as u64,
            "resumed from {start}"
        );
    }
    // The CDN-like storage host never received the token; the Hub did.
    assert!(gets.iter().all(|g| !g.authorization));
    assert!(
        hub.requests()
            .iter()
            .any(|r| r.route == HubRoute::ResolveHead && r.token.as_deref() == Some(ALICE))
    );
    // A file over the caller's bound is refused before any byte is written.
    match c
        .download_to(
            &repo("alice/cut"),
            RepoType::Model,
            "main",
            "w.safetensors",
            &tmp.path().join("x"),
            1000,
        )
        .await
    {
        Err(HubError::TooLarge { size, .. }) => assert_eq!(size, data.len() as u64),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_write_access_get_a_clear_error() {
    let hub = standin(1 << 20, 1 << 20, 100).await;
    let ro = client(&hub.endpoint(), Some(ALICE_RO));
    let me = ro.whoami().await.unwrap();
    assert_eq!((me.name.as_str(), me.can_write), ("alice", false));
    let err = ro
        .create_repo(&repo("alice/ro"), RepoType::Model, false)
        .await
        .unwrap_err();
    assert!(matches!(err, HubError::Forbidden { .. }), "{err:?}");
    hub.create_repo("alice/ro", miner_standins::hub::RepoKind::Model, false);
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("a.bin");
    std::fs::write(&f, bytes(2 << 20, 5)).unwrap();
    let err = ro
        .upload_file(&repo("alice/ro"), RepoType::Model, &f, "a.bin", "x", None)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, HubError::Forbidden { .. }) && err.is_miner_fault(),
        "{err:?}"
    );
    assert!(
        msg.contains("403") && msg.contains("write") && !msg.contains('\n'),
        "{msg}"
    );
    // Bob may not write to alice's repo; an unknown token is refused as invalid.
    let err = client(&hub.endpoint(), Some(BOB))
        .upload_file(&repo("alice/ro"), RepoType::Model, &f, "a.bin", "x", None)
        .await
        .unwrap_err();
    assert!(matches!(err, HubError::Forbidden { .. }), "{err:?}");
    let err = client(&hub.endpoint(), Some("nope"))
        .whoami()
        .await
        .unwrap_err();
    assert!(matches!(err, HubError::Unauthorized { .. }), "{err:?}");
    // Nothing was committed.
    assert_eq!(
        hub.requests()
            .iter()
            .filter(|r| r.route == HubRoute::Commit)
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_list_with_pagination_and_prefix() {
    let hub = standin(1 << 20, 1 << 20, 3).await;
    let c = client(&hub.endpoint(), Some(ALICE));
    let r = repo("alice/data");
    assert!(c.create_repo(&r, RepoType::Dataset, false).await.unwrap());
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..5 {
        let f = tmp.path().join(format!("{i}.txt"));
        std::fs::write(&f, format!("row {i}")).unwrap();
        c.upload_file(
            &r,
            RepoType::Dataset,
            &f,
            &format!("train/{i}.txt"),
            "row",
            None,
        )
        .await
        .unwrap();
    }
    let all = c
        .list_files(&r, RepoType::Dataset, "main", Some("train"))
        .await
        .unwrap();
    let mut paths: Vec<_> = all.iter().map(|f| f.path.as_str()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "train/0.txt",
            "train/1.txt",
            "train/2.txt",
            "train/3.txt",
            "train/4.txt"
        ]
    );
    let tree_pages = hub
        .requests()
        .iter()
        .filter(|r| r.route == HubRoute::Tree)
        .count();
    assert!(tree_pages >= 2, "pagination followed ({tree_pages} pages)");
    let got = c
        .get_range(&r, RepoType::Dataset, "main", "train/3.txt", 4, 1)
        .await
        .unwrap();
    assert_eq!(got, b"3");
    match c.list_files(&r, RepoType::Model, "main", None).await {
        Err(HubError::NotFound { what, .. }) => assert_eq!(what, "RepoNotFound"),
        other => panic!("a dataset is not a model: {other:?}"),
    }
}

/// A server that redirects every GET to itself: the client stops after a few hops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_loops_are_cut_short() {
    use axum::http::{HeaderMap, Method, StatusCode, header};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let h2 = hits.clone();
    let app = axum::Router::new().fallback(move |m: Method| {
        let h2 = h2.clone();
        async move {
            let mut hm = HeaderMap::new();
            if m == Method::HEAD {
                hm.insert(
                    "x-repo-commit",
                    "0123456789abcdef0123456789abcdef01234567".parse().unwrap(),
                );
                hm.insert(header::CONTENT_LENGTH, "10".parse().unwrap());
                return (StatusCode::OK, hm);
            }
            h2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            hm.insert(
                header::LOCATION,
                format!("http://{addr}/loop").parse().unwrap(),
            );
            (StatusCode::FOUND, hm)
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let c = client(&format!("http://{addr}"), None);
    let tmp = tempfile::tempdir().unwrap();
    let err = c
        .download_to(
            &repo("a/b"),
            RepoType::Model,
            "main",
            "f",
            &tmp.path().join("f"),
            100,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, HubError::Protocol(_)), "{err:?}");
    assert!(
        hits.load(std::sync::atomic::Ordering::SeqCst) <= 1 + miner_hub::MAX_REDIRECTS as u32 + 1
    );
}
