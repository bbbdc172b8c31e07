//! Phase awareness: the trainer follows chainsync-svc's `WatchPhase` (found through the run
//! directory's `control/chainsync.json`), shows it in GetStatus and the `subnet_*` gauges, keeps
//! training while chainsync is away (phase cleared), and reconnects when chainsync comes back on
//! another port. chainsync-svc's real phase stream needs the devnet, so a `ChainSyncPhaseStandIn`
//! (real gRPC on 127.0.0.1, `WatchPhase` only) stands in for it.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::Stream;
use miner_proto::chainsync::v1 as cs;
use miner_proto::trainer::v1 as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use trainer_svc::{Control, Handles, Listeners, StatusSnapshot};

/// Stands in for chainsync-svc: streams `phases` (one every 50 ms) and then holds the stream
/// open until stopped, when it ends it with UNAVAILABLE and closes its listener.
#[derive(Clone)]
struct ChainSyncPhaseStandIn {
    phases: Vec<cs::Phase>,
    stop: CancellationToken,
}

type PhaseStream = Pin<Box<dyn Stream<Item = Result<cs::Phase, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl cs::chain_sync_server::ChainSync for ChainSyncPhaseStandIn {
    async fn get_phase(
        &self,
        _r: Request<cs::GetPhaseRequest>,
    ) -> Result<Response<cs::Phase>, Status> {
        Err(Status::unimplemented("stand-in: WatchPhase only"))
    }

    type WatchPhaseStream = PhaseStream;

    async fn watch_phase(
        &self,
        _r: Request<cs::WatchPhaseRequest>,
    ) -> Result<Response<PhaseStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let phases = self.phases.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            for p in phases {
                if tx.send(Ok(p)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            stop.cancelled().await;
            let _ = tx
                .send(Err(Status::unavailable("chainsync-svc is stopping")))
                .await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_checkpoints(
        &self,
        _r: Request<cs::ListCheckpointsRequest>,
    ) -> Result<Response<cs::ListCheckpointsResponse>, Status> {
        Err(Status::unimplemented("stand-in: WatchPhase only"))
    }

    async fn get_jobs(
        &self,
        _r: Request<cs::GetJobsRequest>,
    ) -> Result<Response<cs::GetJobsResponse>, Status> {
        Err(Status::unimplemented("stand-in: WatchPhase only"))
    }

    async fn load_baseline(
        &self,
        _r: Request<cs::LoadBaselineRequest>,
    ) -> Result<Response<cs::LoadBaselineResponse>, Status> {
        Err(Status::unimplemented("stand-in: WatchPhase only"))
    }

    async fn stop(
        &self,
        _r: Request<cs::StopRequest>,
    ) -> Result<Response<cs::StopResponse>, Status> {
        Err(Status::unimplemented("stand-in: WatchPhase only"))
    }
}

/// A phase as chainsync computes it locally, for a cycle of 50 blocks starting at block 100.
fn phase(block: u64, name: &str, index: u32, start: u64, end: u64) -> cs::Phase {
    cs::Phase {
        block,
        name: name.into(),
        index,
        start_block: start,
        end_block: end,
        blocks_into_phase: block - start,
        blocks_remaining: end - block,
        cycle_index: 2,
        cycle_length: 50,
        source: cs::PhaseSource::Local as i32,
        skew_blocks: None,
    }
}

struct StandIn {
    addr: SocketAddr,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

async fn start_stand_in(phases: Vec<cs::Phase>) -> StandIn {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let svc = ChainSyncPhaseStandIn {
        phases,
        stop: stop.clone(),
    };
    let s = stop.clone();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(cs::chain_sync_server::ChainSyncServer::new(svc))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                s.cancelled_owned(),
            )
            .await
            .unwrap();
    });
    StandIn { addr, stop, server }
}

async fn wait_for(
    rx: &mut watch::Receiver<StatusSnapshot>,
    what: &str,
    f: impl Fn(&StatusSnapshot) -> bool,
) -> StatusSnapshot {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        {
            let s = rx.borrow_and_update();
            if f(&s) {
                return s.clone();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out waiting for {what}: {:?}",
            *rx.borrow()
        );
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

async fn http_get(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of an unlabelled gauge in an exposition text.
fn gauge(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

async fn grpc_status(addr: SocketAddr) -> pb::TrainerStatus {
    let mut client = pb::trainer_client::TrainerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

struct Trainer {
    grpc: SocketAddr,
    metrics: SocketAddr,
    rx: watch::Receiver<StatusSnapshot>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<trainer_svc::Outcome>>,
}

async fn start_trainer(settings: trainer_svc::Settings) -> Trainer {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ga, ma) = (grpc.local_addr().unwrap(), metrics.local_addr().unwrap());
    let (tx, rx) = watch::channel(StatusSnapshot::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(trainer_svc::run_with(
        settings,
        Listeners {
            grpc,
            metrics: Some(metrics),
        },
        shutdown.clone(),
        Handles {
            control: Arc::new(Control::default()),
            status: rx.clone(),
        },
        tx,
    ));
    Trainer {
        grpc: ga,
        metrics: ma,
        rx,
        shutdown,
        task,
    }
}

async fn stop_trainer(t: Trainer) {
    t.shutdown.cancel();
    let out = tokio::time::timeout(Duration::from_secs(40), t.task)
        .await
        .expect("trainer did not stop")
        .unwrap();
    assert!(out.is_ok(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_chainsync_phase_survives_its_absence_and_reconnects() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 1000, "");
    let settings = common::settings(&run, None);

    let first = start_stand_in(vec![
        phase(118, "Distribute", 0, 100, 119),
        phase(119, "Distribute", 0, 100, 119),
        phase(120, "Train", 1, 120, 127),
    ])
    .await;
    let ep = miner_service::Endpoints::new("chainsync", first.addr, None, false);
    let mut ep_file = ep.write(&run).unwrap();

    let mut t = start_trainer(settings).await;

    // The phase shows in the status (API and watch) and in the gauges.
    wait_for(&mut t.rx, "the streamed phase", |s| {
        s.phase == "Train" && s.block == 120
    })
    .await;
    let st = grpc_status(t.grpc).await;
    assert_eq!((st.phase.as_str(), st.block), ("Train", 120));
    let body = http_get(t.metrics).await;
    assert_eq!(gauge(&body, "subnet_current_block"), Some(120.0), "{body}");
    assert_eq!(
        gauge(&body, "subnet_current_phase_index"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        gauge(&body, "subnet_blocks_remaining_in_phase"),
        Some(7.0),
        "{body}"
    );
    assert_eq!(
        gauge(&body, "miner_chainsync_connected"),
        Some(1.0),
        "{body}"
    );

    // chainsync goes away: the phase is cleared, the gauges disappear, training goes on.
    first.stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), first.server)
        .await
        .expect("stand-in did not stop")
        .unwrap();
    let away = wait_for(&mut t.rx, "the phase to be cleared", |s| {
        s.phase.is_empty() && s.block == 0
    })
    .await;
    let st = grpc_status(t.grpc).await;
    assert_eq!((st.phase.as_str(), st.block), ("", 0));
    let body = http_get(t.metrics).await;
    assert_eq!(
        gauge(&body, "miner_chainsync_connected"),
        Some(0.0),
        "{body}"
    );
    for g in [
        "subnet_current_block",
        "subnet_current_phase_index",
        "subnet_blocks_remaining_in_phase",
    ] {
        assert_eq!(gauge(&body, g), None, "{g} still exported:\n{body}");
    }
    wait_for(&mut t.rx, "training to go on without chainsync", |s| {
        s.inner_opt_step >= away.inner_opt_step + 2 && s.phase.is_empty()
    })
    .await;

    // chainsync comes back on another port: the trainer re-reads the endpoints file.
    let second = start_stand_in(vec![phase(130, "MinerCommit1", 2, 128, 137)]).await;
    assert_ne!(second.addr, first.addr);
    drop(ep_file);
    ep_file = miner_service::Endpoints::new("chainsync", second.addr, None, false)
        .write(&run)
        .unwrap();
    wait_for(&mut t.rx, "the reconnect", |s| {
        s.phase == "MinerCommit1" && s.block == 130
    })
    .await;
    let st = grpc_status(t.grpc).await;
    assert_eq!((st.phase.as_str(), st.block), ("MinerCommit1", 130));
    let body = http_get(t.metrics).await;
    assert_eq!(
        gauge(&body, "subnet_current_phase_index"),
        Some(2.0),
        "{body}"
    );

    stop_trainer(t).await;
    second.stop.cancel();
    drop(ep_file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chainsync_flag_overrides_the_endpoints_file() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 1000, "");
    let stand_in = start_stand_in(vec![phase(121, "Train", 1, 120, 127)]).await;
    // The endpoints file names a port nobody listens on.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let _ep = miner_service::Endpoints::new("chainsync", dead_addr, None, false)
        .write(&run)
        .unwrap();
    let cli = trainer_svc::Cli::try_parse_from([
        "trainer-svc".to_string(),
        "--device".into(),
        "cpu".into(),
        "--path".into(),
        run.display().to_string(),
        "--chainsync".into(),
        stand_in.addr.to_string(),
    ])
    .unwrap();
    let settings = trainer_svc::Settings::from_cli(&cli).unwrap();
    let mut t = start_trainer(settings).await;
    wait_for(&mut t.rx, "the phase from --chainsync", |s| {
        s.phase == "Train" && s.block == 121
    })
    .await;
    stop_trainer(t).await;
    stand_in.stop.cancel();
}

#[test]
fn a_bad_chainsync_flag_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 1000, "");
    for bad in ["https://127.0.0.1:1", "not an address", "127.0.0.1"] {
        let cli = trainer_svc::Cli::try_parse_from([
            "trainer-svc",
            "--device",
            "cpu",
            "--path",
            run.to_str().unwrap(),
            "--chainsync",
            bad,
        ])
        .unwrap();
        let e = trainer_svc::Settings::from_cli(&cli).unwrap_err();
        assert_eq!(e.field, "--chainsync", "{bad}: {e}");
    }
}
