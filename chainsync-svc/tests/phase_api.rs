//! The owner phase-API client (spec §3.3) against a `PhaseApiStandIn` on loopback, and the
//! local schedule as a cross-check of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chainsync_svc::phase::{
    ChainHead, LocalSchedule, OwnerApi, PhaseApiError, PhaseName, PhaseSchedule, PhaseSource,
    PhaseSourceError, phase_skew, source::BoxFuture,
};
use chainsync_svc::transport::{Backoff, RetryPolicy};
use miner_standins::{OwnerSchedule, PhaseApiStandIn};
use tokio::time::Instant;

struct AtomicHead(Arc<AtomicU64>);

impl ChainHead for AtomicHead {
    fn head_block(&self) -> BoxFuture<'_, Result<u64, String>> {
        let b = self.0.load(Ordering::SeqCst);
        Box::pin(async move { Ok(b) })
    }
}

async fn stand_in(block: Arc<AtomicU64>) -> PhaseApiStandIn {
    let b = block.clone();
    PhaseApiStandIn::start(
        OwnerSchedule::default(),
        Arc::new(move || b.load(Ordering::SeqCst)),
        vec!["5Val".into()],
    )
    .await
    .expect("start phase API stand-in")
}

fn quick() -> RetryPolicy {
    RetryPolicy {
        attempt_timeout: Duration::from_secs(2),
        retries: 5,
        backoff: Backoff::Fixed(Duration::from_millis(50)),
    }
}

#[tokio::test]
async fn owner_api_and_local_schedule_agree() {
    let block = Arc::new(AtomicU64::new(8_081_325));
    let api_srv = stand_in(block.clone()).await;
    let api = OwnerApi::new(&api_srv.url(), quick()).expect("client");
    let local = LocalSchedule::new(
        PhaseSchedule::default(),
        Arc::new(AtomicHead(block.clone())),
        vec!["5Val".into()],
    );
    let sources: [&dyn PhaseSource; 2] = [&api, &local];
    for b in [0, 19, 20, 1320, 1321, 8_081_325, 8_081_499, 8_081_500] {
        block.store(b, Ordering::SeqCst);
        let a = sources[0].current_phase(None).await.expect("api phase");
        let l = sources[1].current_phase(None).await.expect("local phase");
        assert_eq!(a, l, "block {b}");
        let skew = phase_skew(&a, &l);
        assert_eq!((skew.blocks, skew.same_phase), (0, true));
        assert_eq!(
            sources[0].next_phases(None).await.expect("api"),
            sources[1].next_phases(None).await.expect("local")
        );
        assert_eq!(
            sources[0].previous_phases(None).await.expect("api"),
            sources[1].previous_phases(None).await.expect("local")
        );
    }
    block.store(8_081_325, Ordering::SeqCst);
    assert_eq!(
        api.get_phase(None).await.expect("phase").phase_name,
        PhaseName::MinerCommit1
    );
    assert_eq!(
        api.validator_whitelist(None).await.expect("whitelist"),
        vec!["5Val".to_string()]
    );
    assert_eq!((api.name(), local.name()), ("owner-api", "local"));
}

#[tokio::test]
async fn outage_is_retried_then_answered() {
    let block = Arc::new(AtomicU64::new(1000));
    let srv = stand_in(block).await;
    srv.set_down(503);
    let api = OwnerApi::new(&srv.url(), quick()).expect("client");
    let fut = tokio::spawn(async move { api.get_phase(None).await });
    tokio::time::sleep(Duration::from_millis(120)).await;
    srv.set_up();
    let info = fut.await.expect("join").expect("answered after the outage");
    assert_eq!(info.phase_name, PhaseName::Distribute);
    assert!(
        srv.hits() >= 2,
        "at least one retry, got {} hits",
        srv.hits()
    );
}

#[tokio::test]
async fn down_api_fails_within_the_deadline() {
    let srv = stand_in(Arc::new(AtomicU64::new(1000))).await;
    srv.set_down(503);
    // The reference policy (10 s, 5 retries, 2^n s backoff) but a 1.5 s deadline.
    let api = OwnerApi::new(&srv.url(), RetryPolicy::phase_api()).expect("client");
    let started = Instant::now();
    let err = api
        .get_phase(Some(started + Duration::from_millis(1500)))
        .await
        .expect_err("down");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
    match &err {
        PhaseApiError::Deadline {
            url,
            attempts,
            last,
        } => {
            assert!(url.ends_with("/get_phase"));
            assert_eq!(*attempts, 1, "a 2 s backoff does not fit in 1.5 s");
            assert!(last.as_deref().is_some_and(|l| l.contains("503")), "{err}");
        }
        other => panic!("expected a deadline error, got {other}"),
    }
}

#[tokio::test]
async fn unreachable_api_fails_within_the_deadline() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let api = OwnerApi::new(
        &format!("http://127.0.0.1:{port}"),
        RetryPolicy::phase_api(),
    )
    .expect("client");
    let started = Instant::now();
    let err = api
        .blocks_until_next_phase(Some(started + Duration::from_secs(3)))
        .await
        .expect_err("unreachable");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        matches!(err, PhaseApiError::Deadline { attempts: 2, .. }),
        "{err}"
    );
    // And through the PhaseSource trait.
    let src: &dyn PhaseSource = &api;
    let err = src
        .current_phase(Some(Instant::now() + Duration::from_millis(300)))
        .await
        .expect_err("unreachable");
    assert!(
        matches!(err, PhaseSourceError::Api(PhaseApiError::Deadline { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn not_found_is_not_retried() {
    let srv = stand_in(Arc::new(AtomicU64::new(1000))).await;
    srv.set_down(404);
    let api = OwnerApi::new(&srv.url(), quick()).expect("client");
    let err = api.previous_phase_blocks(None).await.expect_err("404");
    assert!(
        matches!(err, PhaseApiError::Rejected { status: 404, .. }),
        "{err}"
    );
    assert_eq!(srv.hits(), 1);
}

#[tokio::test]
async fn malformed_answer_is_an_error_not_a_retry() {
    // A server that answers the wrong shape on /get_phase (the whitelist route's list).
    let srv = stand_in(Arc::new(AtomicU64::new(1000))).await;
    let api = OwnerApi::new(
        &format!("{}/get_validator_whitelist?x=", srv.url()),
        quick(),
    )
    .expect("client");
    let err = api.get_phase(None).await.expect_err("bad shape");
    assert!(matches!(err, PhaseApiError::BadResponse { .. }), "{err}");
    assert_eq!(srv.hits(), 1);
}

#[tokio::test]
async fn version_window_through_the_api_matches_the_schedule() {
    let block = Arc::new(AtomicU64::new(0));
    let srv = stand_in(block.clone()).await;
    let api = OwnerApi::new(&srv.url(), quick()).expect("client");
    let s = PhaseSchedule::default();
    for b in [8_081_325, 8_081_505, 8_081_319, 8_081_330] {
        block.store(b, Ordering::SeqCst);
        let w = chainsync_svc::phase::allowed_version_window(&api, 3, None)
            .await
            .expect("answered");
        assert_eq!(w, s.version_window_at(b, 3), "block {b}");
    }
}
