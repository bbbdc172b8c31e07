//! Shared machinery of the daemon-level devnet tests: the short schedule, a block ticker,
//! small real shards, phase waits, the devnet set-up (`Devbed`), validator and phase API
//! stand-ins, a run directory, and the daemon in-process (`Daemon`) with its gRPC client.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chainsync_svc::chain::{ChainClient, Endpoint};
use chainsync_svc::config::{Cli, LogFormat, Settings, TransportKind};
use chainsync_svc::jobs::Policies;
use chainsync_svc::phase::{CyclePeriods, PhaseName, PhaseSchedule, PhaseSourceKind};
use chainsync_svc::service::{Listeners, Overrides, run_with};
use chainsync_svc::transport::{Backoff, RetryPolicy};
use miner_contract::pt::{DType, Tensor};
use miner_contract::{ExpertGroup, MinerConfig, PublishInfo, RunDir};
use miner_devnet::Devnet;
use miner_keys::Hotkey;
use miner_proto::chainsync::v1 as pb;
use miner_proto::chainsync::v1::chain_sync_client::ChainSyncClient;
use miner_standins::{
    ChainCheckpointView, OwnerSchedule, PhaseApiStandIn, ValidatorStandIn, ValidatorStandInConfig,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub const NETUID: u16 = 102;
pub const BOB: &str = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty";

pub fn periods() -> CyclePeriods {
    CyclePeriods {
        distribute_period: 4,
        train_period: 2,
        commit_period: 4,
        submission_period: 3,
        validate_period: 1,
        merge_period: 1,
    }
}

pub fn owner_schedule() -> OwnerSchedule {
    let p = periods();
    OwnerSchedule::new(&[
        ("Distribute", p.distribute_period),
        ("Train", p.train_period),
        ("MinerCommit1", p.commit_period),
        ("MinerCommit2", p.commit_period),
        ("Submission", p.submission_period),
        ("Validate", p.validate_period),
        ("Merge", p.merge_period),
        ("ValidatorCommit1", p.commit_period),
        ("ValidatorCommit2", p.commit_period),
    ])
}

pub fn shard(seed: u16) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    for (k, e) in [22, 17, 44].into_iter().enumerate() {
        for (proj, rows, cols) in [("gate_up_proj", 32, 64), ("down_proj", 64, 16)] {
            let s = seed + k as u16 + if proj == "down_proj" { 7 } else { 0 };
            let data = (0..rows * cols)
                .flat_map(|i: usize| {
                    (0x3000u16 | ((i as u16).wrapping_mul(31).wrapping_add(s) & 0x03FF))
                        .to_le_bytes()
                })
                .collect();
            m.insert(
                format!("model.layers.1.mlp.experts.{e}.{proj}"),
                Tensor {
                    dtype: DType::F16,
                    shape: vec![rows, cols],
                    data,
                },
            );
        }
    }
    m
}

pub fn sign_hex(key: &Hotkey, hex: &str) -> String {
    miner_keys::b64url_nopad_encode(&key.sign(hex.as_bytes()))
}

/// Builds one block every `every` and mirrors the head into an atomic.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    /// While set, no blocks are requested (transactions still build theirs).
    pub paused: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    pub fn start(port: u16, head: Arc<AtomicU64>, every: Duration) -> Ticker {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let (s, pa) = (stop.clone(), paused.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let t = Instant::now();
                if !pa.load(Ordering::SeqCst) {
                    let _ = miner_devnet::rpc_call(port, "dev_newBlock", json!([{"count": 1}]));
                }
                if let Ok(h) = miner_devnet::rpc_call(port, "chain_getHeader", json!([]))
                    && let Some(n) = h.get("number").and_then(|n| n.as_str())
                    && let Ok(n) = u64::from_str_radix(n.trim_start_matches("0x"), 16)
                {
                    head.store(n, Ordering::SeqCst);
                }
                std::thread::sleep(every.saturating_sub(t.elapsed()));
            }
        });
        Ticker {
            stop,
            paused,
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub async fn wait_for_phase(
    head: &AtomicU64,
    sched: &PhaseSchedule,
    phase: PhaseName,
    min_left: u64,
) -> (u64, u64) {
    let start = Instant::now();
    loop {
        let info = sched.phase_at(head.load(Ordering::SeqCst));
        if info.phase_name == phase && info.blocks_remaining_in_phase >= min_left {
            return (info.phase_start_block, info.phase_end_block);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {}",
            phase.as_str()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn wallet_dir() -> PathBuf {
    miner_devnet::kit_dir()
        .expect("shared/devnet")
        .join("data/example_wallet")
}

/// Seeds `hotkey`'s axon on the netuid to 127.0.0.1:`port`.
pub fn seed_axon(d: &miner_devnet::Devnet, hotkey: &str, port: u16) {
    d.set_storage(json!({"SubtensorModule": {"Axons": [[[NETUID, hotkey], {
        "block": 1, "version": 1, "ip": "2130706433", "port": port,
        "ipType": 4, "protocol": 4, "placeholder1": "0x00", "placeholder2": "0x00"
    }]]}}))
    .expect("seed an axon");
}

/// Builds blocks in one burst until the head is just before the next ValidatorCommit1.
pub fn burst_to_vc1(d: &miner_devnet::Devnet, sched: &PhaseSchedule) {
    let l = sched.cycle_length();
    let h0 = d.head().expect("head");
    let vc1_first = (h0 / l) * l + sched.phase_offset(PhaseName::ValidatorCommit1);
    let target = if vc1_first > h0 {
        vc1_first
    } else {
        vc1_first + l
    };
    if target > h0 + 1 {
        d.new_blocks(u32::try_from(target - h0 - 1).unwrap())
            .expect("burst");
    }
}

/// The expert group the tests' shards belong to.
pub fn exp_math() -> ExpertGroup {
    ExpertGroup::builtin("exp_math").expect("built-in group")
}

/// Gives `ss58` a free balance so it can pay transaction fees.
pub fn fund(d: &Devnet, ss58: &str) {
    d.set_storage(json!({"System": {"Account": [[[ss58], {"providers": 1, "data": {"free": "1000000000000"}}]]}}))
        .expect("fund an account");
}

/// The devnet a daemon-level test runs on: blocks built in one burst to just before a
/// ValidatorCommit1, then one block every `every` (the head mirrored into `head`); the
/// validators' `LastUpdate` seeded (role gate), and a chain client for their commitments.
pub struct Devbed {
    pub d: &'static Devnet,
    pub sched: PhaseSchedule,
    pub head: Arc<AtomicU64>,
    pub chain: ChainClient,
    _ticker: Ticker,
}

impl Devbed {
    pub async fn start(every: Duration) -> Devbed {
        let d = tokio::task::spawn_blocking(miner_devnet::shared)
            .await
            .expect("devnet");
        let sched = PhaseSchedule::new(periods()).expect("schedule");
        burst_to_vc1(d, &sched);
        let head = Arc::new(AtomicU64::new(d.head().expect("head")));
        let ticker = Ticker::start(d.port(), head.clone(), every);
        let now = head.load(Ordering::SeqCst);
        d.set_storage(json!({"SubtensorModule": {"LastUpdate": [[[NETUID], [now, now, now]]]}}))
            .expect("seed LastUpdate");
        let chain = ChainClient::connect(&Endpoint::Url(d.ws_url()))
            .await
            .expect("chain client")
            .with_tx_timeout(Duration::from_secs(30));
        Devbed {
            d,
            sched,
            head,
            chain,
            _ticker: ticker,
        }
    }

    pub fn head_now(&self) -> u64 {
        self.head.load(Ordering::SeqCst)
    }

    pub async fn wait_for_phase(&self, phase: PhaseName, min_left: u64) -> (u64, u64) {
        wait_for_phase(&self.head, &self.sched, phase, min_left).await
    }

    /// Each `(key, text)` sets its commitment, all at once; every one must be included.
    pub async fn commit_all(&self, commits: &[(&Hotkey, String)]) {
        let results = futures::future::join_all(
            commits
                .iter()
                .map(|(key, text)| self.chain.set_commitment(key, NETUID, text.as_bytes())),
        )
        .await;
        for ((key, text), r) in commits.iter().zip(results) {
            if let Err(e) = r {
                panic!("commitment {text:?} of {}: {e}", key.ss58());
            }
        }
    }
}

/// A validator's ValidatorCommit1 text: `{"m"}`, its signature over `hash`.
pub fn vc1_text(key: &Hotkey, hash: &str) -> String {
    format!(r#"{{"m":"{}"}}"#, sign_hex(key, hash))
}

/// A validator's ValidatorCommit2 text: `{"h","v","e"}` for expert group 0.
pub fn vc2_text(hash: &str, version: u64) -> String {
    format!(r#"{{"h":"{hash}","v":{version},"e":0}}"#)
}

/// Creates `run_dir` with a config (wallet miners/miner_1) for the schedule `p` on the chain at
/// `ws_url`.
pub fn create_run(run_dir: &Path, ws_url: String, name: &str, p: &CyclePeriods) -> RunDir {
    let run = RunDir::create(run_dir).expect("run dir");
    let mut cfg = MinerConfig::new_run("miners", "miner_1", name);
    cfg.cycle.distribute_period = p.distribute_period;
    cfg.cycle.train_period = p.train_period;
    cfg.cycle.commit_period = p.commit_period;
    cfg.cycle.submission_period = p.submission_period;
    cfg.cycle.validate_period = p.validate_period;
    cfg.cycle.merge_period = p.merge_period;
    cfg.chain.network = ws_url;
    cfg.write(run_dir).expect("write the config");
    run
}

/// Publishes our own exp_math checkpoint of `shard(seed)`; returns its hash.
pub fn publish_own(run: &RunDir, global_ver: u64, inner_opt: u64, seed: u16) -> String {
    let group = exp_math();
    let staged = run.stage_own(global_ver, inner_opt).expect("stage");
    let h = staged
        .write_model_tensors(group.group_id, &shard(seed))
        .expect("write the shard");
    staged
        .publish(PublishInfo::own(group.group_id, h))
        .expect("publish");
    h.to_hex()
}

/// The owner's phase API on the short schedule, its head from `head`.
pub async fn phase_api(head: &Arc<AtomicU64>, whitelist: Vec<String>) -> PhaseApiStandIn {
    let h = head.clone();
    PhaseApiStandIn::start(
        owner_schedule(),
        Arc::new(move || h.load(Ordering::SeqCst)),
        whitelist,
    )
    .await
    .expect("phase API stand-in")
}

/// A validator stand-in's config: `key_uri` serving `serve` for exp_math on the short schedule,
/// its head from `head`; phases not checked, no chain checkpoint to look up.
pub fn validator_config(
    key_uri: &str,
    serve: &Path,
    submission_dir: &Path,
    head: &Arc<AtomicU64>,
) -> ValidatorStandInConfig {
    let h = head.clone();
    ValidatorStandInConfig {
        hotkey: Hotkey::from_uri(key_uri).expect("dev key"),
        serve_file: Some(serve.to_path_buf()),
        submission_dir: submission_dir.to_path_buf(),
        max_submission_bytes: 1 << 30,
        block: Arc::new(move || h.load(Ordering::SeqCst)),
        schedule: owner_schedule(),
        check_phase: false,
        assignment: None,
        chain_checkpoint: Arc::new(|_who: &str| None::<ChainCheckpointView>),
        expert_group: Some(exp_math()),
    }
}

pub async fn start_validator(cfg: ValidatorStandInConfig) -> ValidatorStandIn {
    ValidatorStandIn::start(cfg)
        .await
        .expect("validator stand-in")
}

/// `chainsync-svc`'s flags for `run_dir`'s config, phases from the owner API at `owner_url`.
pub fn owner_api_cli(run_dir: &Path, owner_url: String) -> Cli {
    Cli {
        path: run_dir.join("config.yaml"),
        wallet_path: wallet_dir(),
        password_env: None,
        wallet_password_file: None,
        wallet_password_credential: "wallet-password".into(),
        network: None,
        phase_source: PhaseSourceKind::OwnerApi,
        owner_url: Some(owner_url),
        validator_whitelist: Vec::new(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        log_format: LogFormat::Text,
        otlp_endpoint: None,
        tls_cert: None,
        tls_key: None,
        submit_retry_backoff_ms: None,
        download_retry_backoff_ms: None,
        block_time_ms: None,
        transport: TransportKind::Http,
        hf_endpoint: None,
    }
}

/// The daemon running in-process (`run_with`) on loopback listeners.
pub struct Daemon {
    pub grpc_addr: SocketAddr,
    /// The Prometheus listener's address, where one was asked for.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Starts the daemon with `cli`'s settings, polling every 100 ms with 1 s blocks, `policy`
    /// for downloads and submissions and 3 commit attempts.
    pub async fn start(cli: &Cli, policy: RetryPolicy) -> Daemon {
        let policies = Policies {
            download: policy,
            submit: policy,
            commit_attempts: 3,
        };
        Daemon::start_with(cli, Some(policies), false).await
    }

    /// Starts the daemon with `cli`'s settings, polling every 100 ms with 1 s blocks, with
    /// `policies` (else the defaults), and a metrics listener if `metrics`.
    pub async fn start_with(cli: &Cli, policies: Option<Policies>, metrics: bool) -> Daemon {
        let mut settings = Settings::from_cli(cli).expect("settings");
        settings.timing.poll = Duration::from_millis(100);
        settings.timing.block_time = Duration::from_millis(1000);
        Daemon::start_settings(settings, policies, metrics).await
    }

    /// Starts the daemon with `settings` as given, with `policies` (else the defaults), and a
    /// metrics listener if `metrics`.
    pub async fn start_settings(
        settings: Settings,
        policies: Option<Policies>,
        metrics: bool,
    ) -> Daemon {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gRPC");
        let grpc_addr = grpc.local_addr().expect("gRPC address");
        let metrics = if metrics {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind metrics");
            Some(l)
        } else {
            None
        };
        let metrics_addr = metrics
            .as_ref()
            .map(|l| l.local_addr().expect("metrics address"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with(
            settings,
            Listeners { grpc, metrics },
            shutdown.clone(),
            Overrides { policies },
        ));
        Daemon {
            grpc_addr,
            metrics_addr,
            shutdown,
            task,
        }
    }

    /// A gRPC client, once the daemon answers (within 20 s).
    pub async fn client(&self) -> ChainSyncClient<tonic::transport::Channel> {
        connect(self.grpc_addr).await
    }

    /// Cancels the daemon and waits (30 s at most) for its clean exit.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.exited().await;
    }

    /// Waits (30 s at most) for the daemon's clean exit, without asking it to stop.
    pub async fn exited(self) {
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("daemon stops")
            .expect("daemon task")
            .expect("clean exit");
    }
}

/// A gRPC client of the daemon at `addr`, once it answers (within 20 s).
pub async fn connect(addr: SocketAddr) -> ChainSyncClient<tonic::transport::Channel> {
    let start = Instant::now();
    loop {
        match ChainSyncClient::connect(format!("http://{addr}")).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(20), "no gRPC: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn jobs_of(client: &mut ChainSyncClient<tonic::transport::Channel>) -> Vec<pb::Job> {
    client
        .get_jobs(pb::GetJobsRequest { limit: 0 })
        .await
        .expect("GetJobs")
        .into_inner()
        .jobs
}

/// Waits until a job matching `pick` has a final outcome; returns it.
pub async fn wait_final(
    client: &mut ChainSyncClient<tonic::transport::Channel>,
    what: &str,
    limit: Duration,
    pick: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    let start = Instant::now();
    loop {
        let jobs = jobs_of(client).await;
        if let Some(j) = jobs
            .iter()
            .find(|j| pick(j) && j.outcome != pb::JobOutcome::Running as i32)
        {
            return j.clone();
        }
        assert!(
            start.elapsed() < limit,
            "{what} did not finish within {limit:?}: {jobs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (`limit` at most) until the `kind` job of `cycle` has a final outcome; returns it.
pub async fn wait_job(
    client: &mut ChainSyncClient<tonic::transport::Channel>,
    kind: pb::JobKind,
    cycle: u64,
    limit: Duration,
) -> pb::Job {
    let what = format!("the {kind:?} job of cycle {cycle}");
    wait_final(client, &what, limit, |j| {
        j.kind == kind as i32 && j.cycle_index == cycle
    })
    .await
}

/// Attempts of `attempt_timeout`, `retries` more after the first, a fixed `backoff` between.
pub fn retry_policy(attempt_timeout: Duration, retries: u32, backoff: Duration) -> RetryPolicy {
    RetryPolicy {
        attempt_timeout,
        retries,
        backoff: Backoff::Fixed(backoff),
    }
}
