//! Support for the end-to-end tests in `tests/tests/`: the service binaries as real processes,
//! a run directory on the devnet, the validators' commits, and readers for what a miner and a
//! validator check (the trainer's gRPC status, chainsync's jobs, commitments on chain).
//!
//! The binaries are found next to the test binary (`target/<profile>/`), or in `$MINER_BIN_DIR`.
//! Build them first with the same target dir and profile:
//! `cargo build -p trainer-svc -p chainsync-svc -p minerctl`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chainsync_svc::chain::ChainClient;
use chainsync_svc::phase::{CyclePeriods, PhaseName, PhaseSchedule};
use miner_contract::MinerConfig;
use miner_proto::chainsync::v1 as cpb;
use miner_proto::trainer::v1 as tpb;
use miner_standins::{ChainCheckpointView, OwnerSchedule};
use serde_json::json;

pub mod proxy;
pub mod scenario;

/// The subnet of the devnet seed.
pub const NETUID: u16 = 102;
/// The example wallet's coldkey / hotkey names (uid 0 of the devnet seed).
pub const COLDKEY: &str = "miners";
pub const HOTKEY: &str = "miner_1";

/// The three binaries under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bin {
    Trainer,
    Chainsync,
    Minerctl,
}

impl Bin {
    pub fn name(self) -> &'static str {
        match self {
            Bin::Trainer => "trainer-svc",
            Bin::Chainsync => "chainsync-svc",
            Bin::Minerctl => "minerctl",
        }
    }
}

/// `target/<profile>/<name>` of the running test binary (`target/<profile>/deps/<test>`), or
/// `$MINER_BIN_DIR/<name>`. Errors name the build command when the binary is missing.
pub fn bin_path(bin: Bin) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("MINER_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().context("current_exe")?;
            let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.pop();
            }
            dir
        }
    };
    let p = dir.join(bin.name());
    if !p.is_file() {
        bail!(
            "{} not found; build it first with the same target dir and profile: \
             cargo build -p trainer-svc -p chainsync-svc -p minerctl (or set MINER_BIN_DIR)",
            p.display()
        );
    }
    Ok(p)
}

/// The example wallet root (`shared/devnet/data/example_wallet`).
pub fn wallet_dir() -> PathBuf {
    miner_devnet::kit_dir()
        .expect("shared/devnet")
        .join("data/example_wallet")
}

/// A free loopback port.
pub fn free_port() -> u16 {
    miner_devnet::free_port().expect("free port")
}

/// A service process; killed (SIGKILL) when dropped if still running. Its stdout and stderr go
/// to `log`.
pub struct Service {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Service {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Service> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env("OMP_NUM_THREADS", "1");
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name} ({cmd:?})"))?;
        Ok(Service {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `INT`).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// The exit status once the process has ended, waiting at most `limit`.
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.exited {
                return Some(s);
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                self.exited = Some(s);
                return Some(s);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.wait_for(Duration::ZERO).is_none()
    }

    /// The last `n` lines of its log (for assertion messages).
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Short cycle periods: 3+2+4+4+3+1+1+4+4 = 26 blocks.
pub fn short_periods() -> CyclePeriods {
    CyclePeriods {
        distribute_period: 3,
        train_period: 2,
        commit_period: 4,
        submission_period: 3,
        validate_period: 1,
        merge_period: 1,
    }
}

/// The owner API's schedule for the same periods.
pub fn owner_schedule(p: &CyclePeriods) -> OwnerSchedule {
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

/// What a run directory is set up with.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub ws_url: String,
    pub owner_url: String,
    pub periods: CyclePeriods,
    /// Inner optimizer steps between checkpoints.
    pub checkpoint_interval: u64,
}

/// Creates `<root>/checkpoints/miner/miners/miner_1/e2e/` with a `config.yaml` for the embedded
/// tiny model and the `embedded` expert group description chainsync-svc reads
/// (`<run>/embedded/{config.yaml,expert_assignment.json}`: experts 0..8 of MoE layers 1 and 2,
/// the trainer's embedded group). Returns the run directory.
pub fn create_run(root: &Path, spec: &RunSpec) -> anyhow::Result<PathBuf> {
    let mut cfg = MinerConfig::new_run(COLDKEY, HOTKEY, "e2e");
    let run_dir = cfg.run_dir(root);
    std::fs::create_dir_all(&run_dir)?;
    let p = &spec.periods;
    cfg.cycle.distribute_period = p.distribute_period;
    cfg.cycle.train_period = p.train_period;
    cfg.cycle.commit_period = p.commit_period;
    cfg.cycle.submission_period = p.submission_period;
    cfg.cycle.validate_period = p.validate_period;
    cfg.cycle.merge_period = p.merge_period;
    cfg.cycle.owner_url = spec.owner_url.clone();
    cfg.chain.network = spec.ws_url.clone();
    cfg.task.expert_group_name = "embedded".into();
    cfg.ckpt.checkpoint_interval = spec.checkpoint_interval;
    cfg.log.metric_interval = 1;
    cfg.write(&run_dir)?;
    write_embedded_group(&run_dir)?;
    Ok(run_dir)
}

/// The trainer's embedded expert group as a group directory (`<dir>/embedded/`).
pub fn write_embedded_group(dir: &Path) -> anyhow::Result<()> {
    let g = dir.join("embedded");
    std::fs::create_dir_all(&g)?;
    std::fs::write(g.join("config.yaml"), "group_id: 0\n")?;
    let experts: Vec<[u32; 2]> = (0..8).map(|e| [e, e]).collect();
    let asg = json!({"1": experts, "2": experts});
    std::fs::write(g.join("expert_assignment.json"), asg.to_string())?;
    Ok(())
}

/// Ports of one trainer-svc / chainsync-svc pair.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub trainer_grpc: u16,
    pub trainer_metrics: u16,
    pub chainsync_grpc: u16,
    pub chainsync_metrics: u16,
}

impl Ports {
    pub fn free() -> Ports {
        Ports {
            trainer_grpc: free_port(),
            trainer_metrics: free_port(),
            chainsync_grpc: free_port(),
            chainsync_metrics: free_port(),
        }
    }
}

/// `trainer-svc --path <run> --device cpu` on the given ports.
pub fn trainer_command(run_dir: &Path, ports: &Ports) -> anyhow::Result<Command> {
    let mut cmd = Command::new(bin_path(Bin::Trainer)?);
    cmd.arg("--path")
        .arg(run_dir)
        .args(["--device", "cpu"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", ports.trainer_grpc))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{}", ports.trainer_metrics));
    Ok(cmd)
}

/// `chainsync-svc --path <run>` with the example wallet and the owner phase API.
pub fn chainsync_command(run_dir: &Path, ports: &Ports) -> anyhow::Result<Command> {
    chainsync_command_with_wallets(run_dir, ports, &wallet_dir())
}

/// As [`chainsync_command`] with another wallet root.
pub fn chainsync_command_with_wallets(
    run_dir: &Path,
    ports: &Ports,
    wallets: &Path,
) -> anyhow::Result<Command> {
    let mut cmd = Command::new(bin_path(Bin::Chainsync)?);
    cmd.arg("--path")
        .arg(run_dir)
        .arg("--wallet-path")
        .arg(wallets)
        .args(["--phase-source", "owner-api"])
        // The validator stand-ins serve the historical HTTP routes.
        .args(["--transport", "http"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", ports.chainsync_grpc))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{}", ports.chainsync_metrics));
    Ok(cmd)
}

/// `minerctl <args>`; returns (exit status, stdout, stderr).
pub fn minerctl(args: &[&str]) -> anyhow::Result<(ExitStatus, String, String)> {
    let out = Command::new(bin_path(Bin::Minerctl)?)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run minerctl")?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The trainer's `GetStatus`, or `None` while it is not answering.
pub async fn trainer_status(port: u16) -> Option<tpb::TrainerStatus> {
    let mut c = tpb::trainer_client::TrainerClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .ok()?;
    c.get_status(tpb::GetStatusRequest::default())
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// chainsync's `GetJobs` (all kept), or `None` while it is not answering.
pub async fn chainsync_jobs(port: u16) -> Option<Vec<cpb::Job>> {
    let mut c =
        cpb::chain_sync_client::ChainSyncClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .ok()?;
    c.get_jobs(cpb::GetJobsRequest { limit: 0 })
        .await
        .ok()
        .map(|r| r.into_inner().jobs)
}

/// The finished job of `kind` in `cycle`, if any.
pub fn finished_job(jobs: &[cpb::Job], kind: cpb::JobKind, cycle: u64) -> Option<cpb::Job> {
    jobs.iter()
        .find(|j| {
            j.kind == kind as i32
                && j.cycle_index == cycle
                && j.outcome != cpb::JobOutcome::Running as i32
        })
        .cloned()
}

/// Our commitment text on chain at `block`.
pub async fn commitment_at(c: &ChainClient, who: &str, block: u64) -> Option<String> {
    c.commitments(NETUID, block)
        .await
        .ok()?
        .into_iter()
        .find(|x| x.hotkey == who)
        .and_then(|x| x.text().map(str::to_owned))
}

/// Builds one block every `every` and mirrors the head into `head`.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    pub head: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    pub fn start(port: u16, head: Arc<AtomicU64>, every: Duration) -> Ticker {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, h) = (stop.clone(), head.clone());
        let read_head = move |h: &AtomicU64| {
            if let Ok(v) = miner_devnet::rpc_call(port, "chain_getHeader", json!([]))
                && let Some(n) = v.get("number").and_then(|n| n.as_str())
                && let Ok(n) = u64::from_str_radix(n.trim_start_matches("0x"), 16)
            {
                h.store(n, Ordering::SeqCst);
            }
        };
        read_head(&head);
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let t = Instant::now();
                let _ = miner_devnet::rpc_call(port, "dev_newBlock", json!([{"count": 1}]));
                read_head(&h);
                std::thread::sleep(every.saturating_sub(t.elapsed()));
            }
        });
        Ticker {
            stop,
            head,
            thread: Some(thread),
        }
    }

    pub fn head(&self) -> u64 {
        self.head.load(Ordering::SeqCst)
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

/// Waits until `head` is inside `phase` with at least `min_left` blocks of it left; returns the
/// phase's (start, end) blocks.
pub async fn wait_for_phase(
    head: &AtomicU64,
    sched: &PhaseSchedule,
    phase: PhaseName,
    min_left: u64,
    limit: Duration,
) -> (u64, u64) {
    let start = Instant::now();
    loop {
        let info = sched.phase_at(head.load(Ordering::SeqCst));
        if info.phase_name == phase && info.blocks_remaining_in_phase >= min_left {
            return (info.phase_start_block, info.phase_end_block);
        }
        assert!(
            start.elapsed() < limit,
            "timed out waiting for {} (head {})",
            phase.as_str(),
            head.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `f` every 100 ms until it returns `Some`, failing after `limit` with `what`.
pub async fn wait_some<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Names in a directory, sorted (empty when it does not exist).
pub fn listdir(p: &Path) -> Vec<String> {
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

/// What a validator stand-in consults about a miner.
pub type ChainLookup = Arc<dyn Fn(&str) -> Option<ChainCheckpointView> + Send + Sync>;

/// MinerCommit1 / MinerCommit2 end blocks of cycle `k`.
pub fn commit_ends(sched: &PhaseSchedule, k: u64) -> (u64, u64) {
    let commit = sched.phase_len(PhaseName::MinerCommit1);
    let mc1_end =
        k * sched.cycle_length() + sched.phase_offset(PhaseName::MinerCommit1) + commit - 1;
    (mc1_end, mc1_end + commit)
}

/// A validator's view of a miner's checkpoint, read from the chain the way validators read it:
/// `{"m"}` at MinerCommit1.end+1 and `{"e","h","v"}` at MinerCommit2.end+1 of the head's cycle
/// (`None` before then). Blocks its (multi-thread runtime) worker while it reads.
pub fn chain_lookup(
    chain: Arc<ChainClient>,
    head: Arc<AtomicU64>,
    sched: PhaseSchedule,
) -> ChainLookup {
    let rt = tokio::runtime::Handle::current();
    Arc::new(move |who: &str| {
        let h = head.load(Ordering::SeqCst);
        let (mc1_end, mc2_end) = commit_ends(&sched, h / sched.cycle_length());
        if h < mc2_end + 1 {
            return None;
        }
        tokio::task::block_in_place(|| {
            rt.block_on(async {
                let m: serde_json::Value =
                    serde_json::from_str(&commitment_at(&chain, who, mc1_end + 1).await?).ok()?;
                let hv: serde_json::Value =
                    serde_json::from_str(&commitment_at(&chain, who, mc2_end + 1).await?).ok()?;
                Some(ChainCheckpointView {
                    signed_model_hash: m.get("m")?.as_str()?.to_owned(),
                    model_hash: hv.get("h")?.as_str()?.to_owned(),
                    expert_group: u32::try_from(hv.get("e")?.as_u64()?).ok()?,
                })
            })
        })
    })
}
