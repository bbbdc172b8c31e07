//! The whole daemon through one real cycle: the in-process service against the real devnet
//! (subtensor runtime under chopsticks), a `PhaseApiStandIn` fed by the devnet head with a short
//! schedule, and two `ValidatorStandIn`s for the seeded neurons uid 1 (//Bob) and uid 2
//! (//Charlie), both whitelisted, their axons seeded to the stand-ins' ports. Blocks are built
//! by a ticker thread.
//!
//! Cycle k: both validators commit VC1 `{"m"}` and VC2 `{"h","v","e"}` of one baseline. Cycle
//! k+1: the daemon tries the first candidate (which serves a file with another hash: rejected,
//! nothing left on disk), then the second (503 once, then OK), publishes the verified baseline,
//! commits MinerCommit1/2 of its own checkpoint, and submits it to its assigned validator. Then
//! Stop (control token), clean exit, pins released.

mod cycle_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chainsync_svc::chain::{ChainClient, Endpoint};
use chainsync_svc::config::{Cli, Settings};
use chainsync_svc::jobs::Policies;
use chainsync_svc::phase::{CyclePeriods, PhaseName, PhaseSchedule, PhaseSourceKind};
use miner_contract::{MinerConfig, RunDir};
use miner_devnet::Devnet;
use miner_keys::Hotkey;
use miner_proto::chainsync::v1 as pb;
use miner_proto::chainsync::v1::chain_sync_client::ChainSyncClient;
use miner_standins::{ChainCheckpointView, Faults, ValidatorStandInConfig};
use serde_json::json;

use cycle_support::*;

/// Tests that commit with the miner's key (uid 0) run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn our_commitment(c: &ChainClient, who: &str, block: u64) -> Option<String> {
    c.commitments(NETUID, block)
        .await
        .expect("read commitments")
        .into_iter()
        .find(|x| x.hotkey == who)
        .and_then(|x| x.text().map(str::to_owned))
}

fn job(jobs: &[pb::Job], kind: pb::JobKind, cycle: u64) -> Option<&pb::Job> {
    jobs.iter()
        .find(|j| j.kind == kind as i32 && j.cycle_index == cycle)
}

fn listdir(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// 1+1+4+4+1+1+1+4+4 = 21 blocks per cycle.
fn periods_21() -> CyclePeriods {
    CyclePeriods {
        distribute_period: 1,
        train_period: 1,
        commit_period: 4,
        submission_period: 1,
        validate_period: 1,
        merge_period: 1,
    }
}

/// `chainsync-svc`'s flags for the local phase source, `--path` the run directory itself.
fn local_cli(run_dir: &Path) -> Cli {
    Cli {
        path: run_dir.to_path_buf(),
        phase_source: PhaseSourceKind::Local,
        owner_url: None,
        ..owner_api_cli(run_dir, String::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_cycle_downloads_commits_submits_and_stops_cleanly() {
    full_cycle(PhaseSourceKind::OwnerApi).await;
}

/// The same cycle with `--phase-source local`: the validators come from
/// `--validator-whitelist` (without it, role gating is off and nobody is assigned to us, so the
/// submission would be skipped); the download, both commits and the submission succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_local_phase_source_with_a_validator_whitelist_submits() {
    full_cycle(PhaseSourceKind::Local).await;
}

async fn full_cycle(source: PhaseSourceKind) {
    let _serial = SERIAL.lock().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter("chainsync_svc=info")
        .with_test_writer()
        .try_init();
    let t0 = Instant::now();
    // The blocks before the first ValidatorCommit1 in one burst; validators pass the role gate
    // (updated within 448 blocks).
    let bed = Devbed::start(Duration::from_millis(300)).await;
    let (d, sched, head, chain) = (bed.d, &bed.sched, &bed.head, &bed.chain);
    let l = sched.cycle_length();
    eprintln!("[{:?}] devnet at head {}", t0.elapsed(), bed.head_now());
    let tmp = tempfile::tempdir().unwrap();

    // Keys: our miner is uid 0 (example wallet miners/miner_1); validators are uid 1 (//Bob)
    // and uid 2 (//Charlie), both whitelisted, both announcing the same baseline hash.
    let miner = Hotkey::load(&wallet_dir(), "miners", "miner_1", None).expect("example wallet");
    let bob = Hotkey::from_uri("//Bob").unwrap();
    let charlie = Hotkey::from_uri("//Charlie").unwrap();
    assert_eq!(bob.ss58(), BOB);
    // Charlie pays fees.
    fund(d, charlie.ss58());

    // The baseline, and a different file with the same tensor names (the "wrong-hash" server).
    let vfile = tmp.path().join("validator_model.pt");
    let vhash = miner_contract::pt::write_pt_tensors(&vfile, &shard(100), &Default::default())
        .unwrap()
        .to_hex();
    let wrong = tmp.path().join("wrong_model.pt");
    miner_contract::pt::write_pt_tensors(&wrong, &shard(300), &Default::default()).unwrap();

    // Our run directory: config + one own checkpoint (trained from the version before the baseline).
    let run_dir = tmp.path().join("run");
    let p = periods();
    let run = create_run(&run_dir, d.ws_url(), "cycletest", &p);

    let phase_api = phase_api(head, vec![BOB.to_owned(), charlie.ss58().to_owned()]).await;

    // Cycle k: both validators commit the baseline. Its version is the MinerCommit1 start of cycle k.
    let (vc1_start, vc1_end) = bed.wait_for_phase(PhaseName::ValidatorCommit1, 2).await;
    eprintln!(
        "[{:?}] VC1 of cycle {} at head {}",
        t0.elapsed(),
        vc1_start / l,
        bed.head_now()
    );
    let k = vc1_start / l;
    let v_base = k * l + sched.phase_offset(PhaseName::MinerCommit1);
    let own_gv = v_base - 1;
    let vc1_bob = vc1_text(&bob, &vhash);
    let vc1_charlie = vc1_text(&charlie, &vhash);
    let (r1, r2) = tokio::join!(
        chain.set_commitment(&bob, NETUID, vc1_bob.as_bytes()),
        chain.set_commitment(&charlie, NETUID, vc1_charlie.as_bytes())
    );
    assert!(
        r1.unwrap().block <= vc1_end + 1 && r2.unwrap().block <= vc1_end + 1,
        "VC1 too late"
    );

    // Candidates are tried in storage-key order: the first one serves the wrong file.
    let order: Vec<String> = chain
        .commitments(NETUID, chain.head().await.unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.hotkey)
        .filter(|h| h == BOB || h == charlie.ss58())
        .collect();
    assert_eq!(order.len(), 2, "{order:?}");
    let uri = |ss58: &str| if ss58 == BOB { "//Bob" } else { "//Charlie" };
    let (first, second) = (order[0].clone(), order[1].clone());
    let own_hash = publish_own(&run, own_gv, 5, 7);
    let lookup: Arc<Mutex<Option<ChainCheckpointView>>> =
        Arc::new(Mutex::new(Some(ChainCheckpointView {
            signed_model_hash: sign_hex(&miner, &own_hash),
            model_hash: own_hash.clone(),
            expert_group: 0,
        })));
    // The validators check the phase of each request and look our checkpoint up.
    let validator = |key_uri: &str, serve: &Path, dir: &Path| {
        let lookup = lookup.clone();
        start_validator(ValidatorStandInConfig {
            check_phase: true,
            chain_checkpoint: Arc::new(move |_who: &str| lookup.lock().ok()?.clone()),
            ..validator_config(key_uri, serve, dir, head)
        })
    };
    let wrong_server = validator(uri(&first), &wrong, &tmp.path().join("sub_a")).await;
    let good_server = validator(uri(&second), &vfile, &tmp.path().join("sub_b")).await;
    seed_axon(d, &first, wrong_server.port());
    seed_axon(d, &second, good_server.port());
    // The good validator first answers 503, then serves.
    good_server.set_faults(Faults {
        fail_times: 1,
        fail_status: 503,
        ..Default::default()
    });

    bed.wait_for_phase(PhaseName::ValidatorCommit2, 1).await;
    let vc2 = vc2_text(&vhash, v_base);
    let (r1, r2) = tokio::join!(
        chain.set_commitment(&bob, NETUID, vc2.as_bytes()),
        chain.set_commitment(&charlie, NETUID, vc2.as_bytes())
    );
    r1.unwrap();
    r2.unwrap();

    // Start the daemon before cycle k+1.
    let cli = Cli {
        phase_source: source,
        validator_whitelist: if source == PhaseSourceKind::Local {
            vec![BOB.to_owned(), charlie.ss58().to_owned()]
        } else {
            Vec::new()
        },
        ..owner_api_cli(&run_dir, phase_api.url())
    };
    let fast = retry_policy(Duration::from_secs(5), 2, Duration::from_millis(200));
    let policies = Policies {
        download: fast,
        submit: fast,
        commit_attempts: 3,
    };
    let daemon = Daemon::start_with(&cli, Some(policies), true).await;
    let (grpc_addr, metrics_addr) = (daemon.grpc_addr, daemon.metrics_addr.expect("metrics"));
    let mut client = daemon.client().await;
    eprintln!(
        "[{:?}] daemon started at head {}",
        t0.elapsed(),
        bed.head_now()
    );

    // Cycle k+1 runs: wait for its SUBMIT job to end.
    let c1 = k + 1;
    wait_job(
        &mut client,
        pb::JobKind::Submit,
        c1,
        Duration::from_secs(60),
    )
    .await;
    let jobs = jobs_of(&mut client).await;
    eprintln!(
        "[{:?}] cycle {c1} done at head {}",
        t0.elapsed(),
        bed.head_now()
    );
    for kind in [
        pb::JobKind::Download,
        pb::JobKind::Commit1,
        pb::JobKind::Commit2,
        pb::JobKind::Submit,
    ] {
        let j = job(&jobs, kind, c1)
            .unwrap_or_else(|| panic!("no {kind:?} job in cycle {c1}: {jobs:#?}"));
        assert_eq!(
            j.outcome,
            pb::JobOutcome::Succeeded as i32,
            "{kind:?}: {j:#?}"
        );
    }
    // DOWNLOAD: the wrong-hash candidate was tried first and rejected; the good one answered
    // 503, then served; the baseline is verified and published; nothing else on disk.
    let dl = job(&jobs, pb::JobKind::Download, c1).unwrap();
    assert_eq!(dl.model_hash, vhash);
    assert_eq!(dl.destination, second);
    assert_eq!(dl.attempts, 2, "two candidates tried");
    assert_eq!(
        wrong_server.download_requests(),
        1,
        "the wrong-hash candidate was tried"
    );
    assert_eq!(good_server.download_requests(), 2, "one 503, one OK");
    let vbest = run
        .best_validator()
        .unwrap()
        .expect("a validator checkpoint");
    assert!(vbest.is_verified());
    assert_eq!(vbest.global_ver, v_base);
    assert_eq!(vbest.manifest.as_ref().unwrap().model_hash.to_hex(), vhash);
    assert_eq!(dl.checkpoint, vbest.path.display().to_string());
    assert!(vbest.dir_name.contains(&second), "{}", vbest.dir_name);
    let vdir = run_dir.join("validator_checkpoint");
    assert_eq!(
        listdir(&vdir),
        vec![vbest.dir_name.clone()],
        "the rejected candidate left nothing behind"
    );

    // COMMIT1 / COMMIT2: on chain where validators read them, in the exact formats.
    let mc1_end = c1 * l + sched.phase_offset(PhaseName::MinerCommit1) + p.commit_period - 1;
    let mc2_end = mc1_end + p.commit_period;
    let m = our_commitment(chain, miner.ss58(), mc1_end + 1)
        .await
        .expect("commit 1 on chain");
    assert_eq!(m.len(), 94, "{m}");
    let parsed: serde_json::Value = serde_json::from_str(&m).unwrap();
    let sig = parsed["m"].as_str().unwrap();
    assert_eq!(m, format!(r#"{{"m":"{sig}"}}"#));
    let sig_bytes: [u8; 64] = miner_keys::b64url_nopad_decode(sig)
        .unwrap()
        .try_into()
        .unwrap();
    assert!(
        miner_keys::verify(&miner.public(), own_hash.as_bytes(), &sig_bytes),
        "commit-1 signs the hash"
    );
    let h = our_commitment(chain, miner.ss58(), mc2_end + 1)
        .await
        .expect("commit 2 on chain");
    assert_eq!(h, format!(r#"{{"e":0,"h":"{own_hash}","v":{own_gv}}}"#));
    let c1j = job(&jobs, pb::JobKind::Commit1, c1).unwrap();
    let c2j = job(&jobs, pb::JobKind::Commit2, c1).unwrap();
    assert!(c1j.included_block.unwrap() <= mc1_end + 1);
    assert!(
        c2j.included_block.unwrap() > mc1_end + 1 && c2j.included_block.unwrap() <= mc2_end + 1
    );
    assert_eq!(c1j.model_hash, own_hash);

    // SUBMIT: the assigned validator received our file, whose hash is the committed h, and accepted it.
    let sj = job(&jobs, pb::JobKind::Submit, c1).unwrap();
    let (dest, other) = if sj.destination == first {
        (&wrong_server, &good_server)
    } else {
        (&good_server, &wrong_server)
    };
    let subs = dest.submissions();
    assert_eq!(subs.len(), 1, "{subs:#?}");
    assert!(other.submissions().is_empty());
    assert_eq!(subs[0].origin_hotkey_ss58, miner.ss58());
    assert_eq!(&subs[0].model_hex[..], own_hash);
    // The commit pin is gone after the submission.
    wait_until(
        "the commit pin to be released",
        Duration::from_secs(5),
        || run.pins().unwrap().is_empty(),
    )
    .await;

    // ListCheckpoints shows the committed and submitted state.
    let cps = client
        .list_checkpoints(pb::ListCheckpointsRequest {})
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    let own = cps
        .iter()
        .find(|c| c.global_ver == own_gv)
        .expect("own checkpoint listed");
    assert!(own.committed && own.submitted && own.verified, "{own:#?}");
    assert_eq!(own.model_hash, own_hash);
    // GetPhase / metrics follow the head.
    let ph = client
        .get_phase(pb::GetPhaseRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ph.cycle_length, l);
    assert!(ph.block + 3 >= head.load(Ordering::SeqCst), "{ph:?}");
    let text = http_get(metrics_addr).await;
    for name in [
        "subnet_current_block ",
        "chain_commit_latency_seconds_count 2",
        "chainsync_commits_total{outcome=\"succeeded\"} 2",
        "chainsync_downloads_total{outcome=\"succeeded\"} 1",
        "chainsync_submissions_total{outcome=\"succeeded\"} 1",
    ] {
        assert!(text.contains(name), "metrics lack {name:?}:\n{text}");
    }

    // WatchPhase: one message per new block.
    let mut watch = client
        .watch_phase(pb::WatchPhaseRequest {})
        .await
        .unwrap()
        .into_inner();
    let a = watch.message().await.unwrap().expect("first phase");
    let b = watch.message().await.unwrap().expect("second phase");
    assert!(b.block > a.block, "{a:?} then {b:?}");
    drop(watch);

    // LoadBaseline needs the token (`authorization: Bearer`, from `<run>/control/token`, 0600);
    // with the newest baseline already held it has nothing to do.
    let token_path = run_dir.join("control/token");
    let mode = std::fs::metadata(&token_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", token_path.display());
    let bearer = format!(
        "Bearer {}",
        std::fs::read_to_string(&token_path).unwrap().trim()
    );
    assert!(
        run_dir.join("control/chainsync.json").exists(),
        "endpoints file written for minerctl"
    );
    let err = client
        .load_baseline(pb::LoadBaselineRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::LoadBaselineRequest {});
    req.metadata_mut()
        .insert("authorization", bearer.parse().unwrap());
    let started = client
        .load_baseline(req)
        .await
        .unwrap()
        .into_inner()
        .job
        .expect("job");
    assert_eq!(started.kind, pb::JobKind::Download as i32);
    let lb = wait_final(
        &mut client,
        "the LoadBaseline job",
        Duration::from_secs(20),
        |j| j.id == started.id,
    )
    .await;
    assert_eq!(lb.outcome, pb::JobOutcome::Skipped as i32, "{lb:#?}");
    assert_eq!(
        good_server.download_requests(),
        2,
        "nothing downloaded again"
    );

    // Stop needs the control token, then ends the daemon cleanly.
    let err = client.stop(pb::StopRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::StopRequest {});
    req.metadata_mut()
        .insert("authorization", bearer.parse().unwrap());
    assert!(client.stop(req).await.unwrap().into_inner().accepted);
    daemon.exited().await;
    assert!(run.pins().unwrap().is_empty(), "pins released");
    assert!(
        !run_dir.join("control/chainsync.json").exists(),
        "endpoints file removed on a clean exit"
    );
    assert!(
        tokio::net::TcpStream::connect(grpc_addr).await.is_err(),
        "gRPC closed"
    );
    // The journal survived: every job of cycle k+1 is in it as SUCCEEDED.
    let journal = std::fs::read_to_string(run_dir.join("chainsync/jobs.jsonl")).unwrap();
    let recs = chainsync_svc::jobs::parse_journal(&journal, Path::new("jobs.jsonl")).unwrap();
    let done = recs
        .iter()
        .filter(|r| r.cycle_index == c1 && r.outcome == chainsync_svc::jobs::JobOutcome::Succeeded)
        .count();
    assert_eq!(done, 4, "{recs:#?}");
    eprintln!("[{:?}] done", t0.elapsed());
}

async fn http_get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary against the devnet with the local phase source: serves health, phase and
/// metrics; SIGTERM ends it with status 0, no job left RUNNING, no pin left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_binary_with_status_0() {
    let d: &'static Devnet = tokio::task::spawn_blocking(miner_devnet::shared)
        .await
        .expect("devnet");
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let mut cfg = MinerConfig::new_run("miners", "miner_1", "sigterm");
    cfg.chain.network = d.ws_url();
    cfg.write(&run_dir).unwrap();
    let (grpc_port, metrics_port) = (free_port(), free_port());
    let log = tmp.path().join("chainsync.log");
    let log_tail = || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        t[t.len().saturating_sub(3000)..].to_owned()
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chainsync-svc"))
        .arg("--path")
        .arg(run_dir.join("config.yaml"))
        .arg("--wallet-path")
        .arg(wallet_dir())
        .args(["--phase-source", "local", "--log-format", "json"])
        .args(["--transport", "http"])
        .args(["--listen", &format!("127.0.0.1:{grpc_port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start chainsync-svc");

    // Health turns SERVING and the phase comes from the local schedule over the devnet head.
    let start = Instant::now();
    let phase = loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the daemon never served a phase; its log:\n{}",
            log_tail()
        );
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the daemon exited with {st}; its log:\n{}", log_tail());
        }
        if let Ok(mut c) = ChainSyncClient::connect(format!("http://127.0.0.1:{grpc_port}")).await
            && let Ok(p) = c.get_phase(pb::GetPhaseRequest {}).await
        {
            break p.into_inner();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(phase.source, pb::PhaseSource::Local as i32);
    assert_eq!(phase.cycle_length, 500);
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "miner.chainsync.v1.ChainSync".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let text = http_get(format!("127.0.0.1:{metrics_port}").parse().unwrap()).await;
    assert!(text.contains("subnet_current_block "), "{text}");

    let pid = child.id().expect("pid").to_string();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let run = RunDir::open(&run_dir).unwrap();
    assert!(run.pins().unwrap().is_empty());
    if let Ok(journal) = std::fs::read_to_string(run_dir.join("chainsync/jobs.jsonl")) {
        let recs = chainsync_svc::jobs::parse_journal(&journal, Path::new("jobs.jsonl")).unwrap();
        assert!(
            recs.iter()
                .all(|r| r.outcome != chainsync_svc::jobs::JobOutcome::Running),
            "{recs:#?}"
        );
    }
}

/// A restart in the middle of a cycle: the commitment already on chain is found (no second
/// extrinsic, even with the job journal lost), and MinerCommit2 after the restart commits the
/// checkpoint the first process committed in MinerCommit1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_finds_its_commitment_on_chain_and_continues_the_cycle() {
    let _serial = SERIAL.lock().await;
    let d: &'static Devnet = tokio::task::spawn_blocking(miner_devnet::shared)
        .await
        .expect("devnet");
    let head = Arc::new(AtomicU64::new(d.head().expect("head")));
    let ticker = Ticker::start(d.port(), head.clone(), Duration::from_millis(300));
    let miner = Hotkey::load(&wallet_dir(), "miners", "miner_1", None).expect("example wallet");
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let p = CyclePeriods {
        distribute_period: 2,
        train_period: 2,
        commit_period: 6,
        submission_period: 2,
        validate_period: 1,
        merge_period: 1,
    };
    let run = create_run(&run_dir, d.ws_url(), "restart", &p);
    let sched = PhaseSchedule::new(p).unwrap();
    let own_hash = publish_own(&run, 1, 20, 9);
    let cli = local_cli(&run_dir);

    // First process: starts in Train, commits in MinerCommit1.
    wait_for_phase(&head, &sched, PhaseName::Train, 1).await;
    let daemon = Daemon::start_with(&cli, None, false).await;
    let mut client = daemon.client().await;
    let cycle = sched.phase_at(head.load(Ordering::SeqCst)).cycle_index;
    let c1 = wait_job(
        &mut client,
        pb::JobKind::Commit1,
        cycle,
        Duration::from_secs(40),
    )
    .await;
    // Hold the chain in MinerCommit1 while the daemon restarts.
    ticker.paused.store(true, Ordering::SeqCst);
    assert_eq!(c1.outcome, pb::JobOutcome::Succeeded as i32, "{c1:#?}");
    let included = c1.included_block.expect("included block");
    assert_eq!(
        run.pins().unwrap().len(),
        1,
        "the committed checkpoint is pinned"
    );
    daemon.stop().await;
    assert!(run.pins().unwrap().is_empty(), "pins released on stop");
    let chain = ChainClient::connect(&Endpoint::Url(d.ws_url()))
        .await
        .unwrap();
    let at = chain.head().await.unwrap();
    let info = sched.phase_at(at);
    assert_eq!(
        info.phase_name,
        PhaseName::MinerCommit1,
        "still in MinerCommit1 at {at}"
    );
    let before = chain.commitments(NETUID, at).await.unwrap();
    let mine = before
        .iter()
        .find(|c| c.hotkey == miner.ss58())
        .expect("our commitment");
    assert_eq!(mine.block, Some(included));

    // The journal is lost; the second process must look at the chain.
    std::fs::remove_file(run_dir.join("chainsync/jobs.jsonl")).unwrap();
    let daemon = Daemon::start_with(&cli, None, false).await;
    let mut client = daemon.client().await;
    let again = wait_job(
        &mut client,
        pb::JobKind::Commit1,
        cycle,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        again.outcome,
        pb::JobOutcome::Succeeded as i32,
        "{again:#?}"
    );
    assert_eq!(
        again.included_block,
        Some(included),
        "the commitment on chain was recognised"
    );
    assert_eq!(again.attempts, 0, "no second extrinsic");
    assert_eq!(again.model_hash, own_hash);
    let still = chain
        .commitments(NETUID, chain.head().await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        still
            .iter()
            .find(|c| c.hotkey == miner.ss58())
            .unwrap()
            .block,
        Some(included)
    );

    // MinerCommit2 commits the same checkpoint.
    ticker.paused.store(false, Ordering::SeqCst);
    let c2 = wait_job(
        &mut client,
        pb::JobKind::Commit2,
        cycle,
        Duration::from_secs(40),
    )
    .await;
    assert_eq!(c2.outcome, pb::JobOutcome::Succeeded as i32, "{c2:#?}");
    let mc2_end = info.phase_end_block + p.commit_period;
    let b = c2.included_block.unwrap();
    assert!(
        b > info.phase_end_block + 1 && b <= mc2_end + 1,
        "included at {b}"
    );
    let text = our_commitment(&chain, miner.ss58(), b).await.unwrap();
    assert_eq!(text, format!(r#"{{"e":0,"h":"{own_hash}","v":1}}"#));
    daemon.stop().await;
    assert!(run.pins().unwrap().is_empty(), "pins released on stop");
}

/// Deadline awareness: a commit that cannot be included inside MinerCommit1 is not sent and is
/// recorded MISSED with the reason; MinerCommit2 then has nothing to reveal (SKIPPED); no pin
/// is left and nothing of ours appears on chain in that cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_that_cannot_finish_in_its_phase_is_missed_not_sent() {
    let _serial = SERIAL.lock().await;
    let d: &'static Devnet = tokio::task::spawn_blocking(miner_devnet::shared)
        .await
        .expect("devnet");
    let head = Arc::new(AtomicU64::new(d.head().expect("head")));
    let _ticker = Ticker::start(d.port(), head.clone(), Duration::from_millis(300));
    let miner = Hotkey::load(&wallet_dir(), "miners", "miner_1", None).expect("example wallet");
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    // 21 blocks: MinerCommit1 comes soon after any head.
    let p = periods_21();
    let run = create_run(&run_dir, d.ws_url(), "missed", &p);
    let sched = PhaseSchedule::new(p).unwrap();
    publish_own(&run, 1, 30, 11);
    // The default block time (12 s), polling every 100 ms.
    let mut settings = Settings::from_cli(&local_cli(&run_dir)).expect("settings");
    settings.timing.poll = Duration::from_millis(100);
    // A commit needs more blocks than the phase has.
    settings.timing.min_commit_blocks = 2 * p.commit_period;
    let (train_start, _) = wait_for_phase(&head, &sched, PhaseName::Train, 0).await;
    let cycle = train_start / sched.cycle_length();
    let daemon = Daemon::start_settings(settings, None, false).await;
    let mut client = daemon.client().await;
    let c1 = wait_job(
        &mut client,
        pb::JobKind::Commit1,
        cycle,
        Duration::from_secs(40),
    )
    .await;
    assert_eq!(c1.outcome, pb::JobOutcome::Missed as i32, "{c1:#?}");
    assert!(
        c1.error.contains("MinerCommit1") && c1.error.contains("a commit needs 8"),
        "{}",
        c1.error
    );
    assert_eq!(c1.attempts, 0, "nothing sent");
    assert!(c1.included_block.is_none());
    assert!(
        run.pins().unwrap().is_empty(),
        "the pin of a missed commit is released"
    );
    let c2 = wait_job(
        &mut client,
        pb::JobKind::Commit2,
        cycle,
        Duration::from_secs(40),
    )
    .await;
    assert_eq!(c2.outcome, pb::JobOutcome::Skipped as i32, "{c2:#?}");
    let chain = ChainClient::connect(&Endpoint::Url(d.ws_url()))
        .await
        .unwrap();
    let now = chain.head().await.unwrap();
    let mc1 = cycle * sched.cycle_length() + sched.phase_offset(PhaseName::MinerCommit1);
    let ours = chain
        .commitments(NETUID, now)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.hotkey == miner.ss58());
    assert!(
        ours.is_none_or(|c| c.block.is_some_and(|b| b < mc1)),
        "nothing committed in cycle {cycle}"
    );
    daemon.stop().await;
}

/// The minerctl binary built into the same target directory as this test's chainsync-svc.
fn minerctl_bin() -> PathBuf {
    let svc = Path::new(env!("CARGO_BIN_EXE_chainsync-svc"));
    let bin = svc.with_file_name("minerctl");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p minerctl` (same CARGO_TARGET_DIR)",
        bin.display()
    );
    bin
}

fn minerctl(run_dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(minerctl_bin())
        .args(args)
        .arg("--path")
        .arg(run_dir)
        .output()
        .expect("run minerctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The one host's object of `minerctl --json` output (a list with one entry per host); asserts
/// it reports no error.
fn host_json(out: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(out).expect("minerctl --json output");
    let host = v
        .as_array()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_else(|| panic!("one host entry: {out}"));
    assert_eq!(host["host"], "local", "{out}");
    assert_eq!(host["errors"], json!([]), "{out}");
    host
}

/// Kills the daemon if the test fails before it stopped it.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The real `chainsync-svc` binary (local phase source, shared devnet) is found and driven by the
/// real `minerctl --path RUN`: `phase` and `jobs` read it (the endpoints file and the token in
/// `<run>/control`), `stop chainsync` ends it with exit 0 and its endpoints file is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minerctl_reads_and_stops_the_real_daemon_through_the_run_directory() {
    let _serial = SERIAL.lock().await;
    let d: &'static Devnet = tokio::task::spawn_blocking(miner_devnet::shared)
        .await
        .expect("devnet");
    let head = Arc::new(AtomicU64::new(d.head().expect("head")));
    let _ticker = Ticker::start(d.port(), head.clone(), Duration::from_millis(300));
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    // 21 blocks per cycle: jobs appear within a few seconds.
    let p = periods_21();
    create_run(&run_dir, d.ws_url(), "minerctl", &p);
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_chainsync-svc"))
            .arg("--path")
            .arg(&run_dir)
            .arg("--wallet-path")
            .arg(wallet_dir())
            .args([
                "--phase-source",
                "local",
                "--transport",
                "http",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chainsync-svc"),
    );
    let endpoints = run_dir.join("control/chainsync.json");
    let start = Instant::now();
    while !endpoints.exists() {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "chainsync-svc exited early"
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no endpoints file after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run_c = run_dir.clone();
    let ctl = move |args: &'static [&'static str]| {
        let run = run_c.clone();
        tokio::task::spawn_blocking(move || minerctl(&run, args))
    };

    let (code, out, err) = ctl(&["phase", "--json"]).await.unwrap();
    assert_eq!(code, Some(0), "minerctl phase: {out}{err}");
    let v = host_json(&out);
    let name = v["phase"].as_str().unwrap_or("");
    assert!(
        [
            "Distribute",
            "Train",
            "MinerCommit1",
            "MinerCommit2",
            "Submission",
            "Validate",
            "Merge",
            "ValidatorCommit1",
            "ValidatorCommit2"
        ]
        .contains(&name),
        "{out}"
    );
    assert!(v["block"].as_u64().unwrap_or(0) > 0, "{out}");
    let (code, text, err) = ctl(&["phase"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        text.contains(name) && text.contains("blocks left"),
        "{text}"
    );

    // Within one or two cycles the scheduler has recorded jobs (nothing to commit: no checkpoint).
    let start = Instant::now();
    let jobs = loop {
        let (code, out, err) = ctl(&["jobs", "--json"]).await.unwrap();
        assert_eq!(code, Some(0), "minerctl jobs: {out}{err}");
        let v = host_json(&out);
        let jobs = v["jobs"].as_array().expect("a jobs array").clone();
        if !jobs.is_empty() {
            break jobs;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no job listed: {out}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        jobs.iter()
            .all(|j| !j["kind"].as_str().unwrap_or("").is_empty()),
        "{jobs:?}"
    );

    let (code, out, err) = ctl(&["stop", "chainsync", "--wait-timeout", "30"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "minerctl stop: {out}{err}");
    assert!(out.contains("exited"), "{out}");
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "clean exit");
    assert!(
        !endpoints.exists(),
        "endpoints file removed on a clean exit"
    );
}
