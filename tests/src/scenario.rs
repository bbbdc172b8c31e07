//! The scene most chain-facing end-to-end tests share: the devnet with its block clock, the
//! owner phase-API stand-in, two validator stand-ins (//Bob uid 1, //Charlie uid 2) that commit
//! a baseline on chain like validators do, and a run directory for the example wallet (uid 0).
//! Checkpoints are written through `miner-contract` (the code the trainer publishes with) where
//! a test needs no trainer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chainsync_svc::chain::{ChainClient, Endpoint};
use chainsync_svc::phase::{CyclePeriods, PhaseName, PhaseSchedule};
use miner_contract::pt::{DType, Tensor};
use miner_contract::{ExpertGroup, PublishInfo, RunDir};
use miner_keys::Hotkey;
use miner_proto::chainsync::v1 as cpb;
use miner_standins::{PhaseApiStandIn, ValidatorStandIn, ValidatorStandInConfig};
use serde_json::json;

use crate::*;

/// `base64url(sign(hex))`, the `m` of a MinerCommit1 / ValidatorCommit1.
pub fn sign_hex(key: &Hotkey, hex: &str) -> String {
    miner_keys::b64url_nopad_encode(&key.sign(hex.as_bytes()))
}

/// Seeds a loopback axon for `hotkey` (the runtime refuses `serve_axon` with a loopback IP).
pub fn seed_axon(d: &miner_devnet::Devnet, hotkey: &str, port: u16) {
    d.set_storage(json!({"SubtensorModule": {"Axons": [[[NETUID, hotkey], {
        "block": 1, "version": 1, "ip": "2130706433", "port": port,
        "ipType": 4, "protocol": 4, "placeholder1": "0x00", "placeholder2": "0x00"
    }]]}}))
    .expect("seed axon");
}

/// Expert tensors of the embedded group (experts 0..3 of layer 1, ~100 KB); `seed` varies the
/// values, so two seeds give two files with the same names and different hashes.
pub fn expert_tensors(seed: u16) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    for e in 0..3u16 {
        for (name, rows, cols) in [("gate_up_proj", 64, 128), ("down_proj", 128, 64)] {
            let mut data = Vec::with_capacity(rows * cols * 2);
            for i in 0..rows * cols {
                let v: u16 = 0x3000
                    | ((i as u16)
                        .wrapping_mul(31)
                        .wrapping_add(e)
                        .wrapping_add(seed.wrapping_mul(7))
                        & 0x03FF);
                data.extend_from_slice(&v.to_le_bytes());
            }
            m.insert(
                format!("model.layers.1.mlp.experts.{e}.{name}"),
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

/// Writes [`expert_tensors`]`(seed)` as a `.pt` file; returns its model hash (hex).
pub fn write_expert_file(path: &Path, seed: u16) -> String {
    miner_contract::pt::write_pt_tensors(path, &expert_tensors(seed), &Default::default())
        .expect("write expert file")
        .to_hex()
}

/// The first cycle whose ValidatorCommit1 starts at least two blocks after `head`: the cycle
/// a test jumps into (chopsticks builds about one block a second, so the jump is kept short).
pub fn validator_commit_cycle(sched: &PhaseSchedule, head: u64) -> u64 {
    let vc1 = sched.phase_offset(PhaseName::ValidatorCommit1);
    let c = head / sched.cycle_length();
    if c * sched.cycle_length() + vc1 >= head + 2 {
        c
    } else {
        c + 1
    }
}

/// The devnet, the phase API and a run directory, with the block clock not yet running.
pub struct Scene {
    pub d: &'static miner_devnet::Devnet,
    pub periods: CyclePeriods,
    pub sched: PhaseSchedule,
    /// The head as the test drives it (what the stand-ins see).
    pub head: Arc<AtomicU64>,
    pub miner: Hotkey,
    pub bob: Hotkey,
    pub charlie: Hotkey,
    pub tmp: tempfile::TempDir,
    pub phase_api: PhaseApiStandIn,
    pub run_dir: PathBuf,
    pub run: RunDir,
    pub group: ExpertGroup,
    /// A client of the test's own (directly to the devnet).
    pub chain: Arc<ChainClient>,
    pub ports: Ports,
}

impl Scene {
    /// Starts (or reuses) the devnet, funds //Charlie, starts the phase API and creates the run
    /// directory; chainsync-svc will use `network` (the devnet's URL when `None`).
    pub async fn new(network: Option<String>, checkpoint_interval: u64) -> Scene {
        Scene::with_periods(network, checkpoint_interval, short_periods()).await
    }

    /// As [`Scene::new`] with other cycle periods.
    pub async fn with_periods(
        network: Option<String>,
        checkpoint_interval: u64,
        periods: CyclePeriods,
    ) -> Scene {
        let d: &'static miner_devnet::Devnet = tokio::task::spawn_blocking(miner_devnet::shared)
            .await
            .expect("devnet");
        let sched = PhaseSchedule::new(periods).unwrap();
        let head = Arc::new(AtomicU64::new(d.head().unwrap()));
        let miner = Hotkey::load(&wallet_dir(), COLDKEY, HOTKEY, None).expect("example wallet");
        let bob = Hotkey::from_uri("//Bob").unwrap();
        let charlie = Hotkey::from_uri("//Charlie").unwrap();
        d.set_storage(json!({"System": {"Account": [[[charlie.ss58()], {"providers": 1, "data": {"free": "1000000000000"}}]]}}))
            .expect("fund Charlie");
        let tmp = tempfile::tempdir().unwrap();
        let h2 = head.clone();
        let phase_api = PhaseApiStandIn::start(
            owner_schedule(&periods),
            Arc::new(move || h2.load(Ordering::SeqCst)),
            vec![bob.ss58().to_owned(), charlie.ss58().to_owned()],
        )
        .await
        .unwrap();
        let run_dir = create_run(
            tmp.path(),
            &RunSpec {
                ws_url: network.unwrap_or_else(|| d.ws_url()),
                owner_url: phase_api.url(),
                periods,
                checkpoint_interval,
            },
        )
        .unwrap();
        let run = RunDir::open(&run_dir).unwrap();
        let group = ExpertGroup::load_dir(&run_dir.join("embedded")).expect("embedded group");
        let chain = Arc::new(
            ChainClient::connect(&Endpoint::Url(d.ws_url()))
                .await
                .unwrap()
                .with_tx_timeout(Duration::from_secs(30)),
        );
        Scene {
            d,
            periods,
            sched,
            head,
            miner,
            bob,
            charlie,
            tmp,
            phase_api,
            run_dir,
            run,
            group,
            chain,
            ports: Ports::free(),
        }
    }

    pub fn cycle_length(&self) -> u64 {
        self.sched.cycle_length()
    }

    /// First block of `phase` in cycle `k`.
    pub fn phase_start(&self, k: u64, phase: PhaseName) -> u64 {
        k * self.cycle_length() + self.sched.phase_offset(phase)
    }

    /// The version validators commit in cycle `k` (MinerCommit1 start of `k`).
    pub fn baseline_version(&self, k: u64) -> u64 {
        self.phase_start(k, PhaseName::MinerCommit1)
    }

    /// A validator stand-in for `key_uri` serving `serve`, that verifies submissions against
    /// the chain; its axon is seeded on chain.
    pub async fn start_validator(&self, key_uri: &str, serve: &Path) -> ValidatorStandIn {
        let h = self.head.clone();
        let v = ValidatorStandIn::start(ValidatorStandInConfig {
            hotkey: Hotkey::from_uri(key_uri).unwrap(),
            serve_file: Some(serve.to_path_buf()),
            submission_dir: self
                .tmp
                .path()
                .join(format!("sub{}", key_uri.replace('/', "_"))),
            max_submission_bytes: 1 << 30,
            block: Arc::new(move || h.load(Ordering::SeqCst)),
            schedule: owner_schedule(&self.periods),
            check_phase: true,
            assignment: None,
            chain_checkpoint: chain_lookup(
                self.chain.clone(),
                self.head.clone(),
                self.sched.clone(),
            ),
            expert_group: Some(self.group.clone()),
        })
        .await
        .expect("validator stand-in");
        let key = Hotkey::from_uri(key_uri).unwrap();
        seed_axon(self.d, key.ss58(), v.port());
        v
    }

    /// Jumps the chain to the block before ValidatorCommit1 of the next cycle `c` that still has
    /// one ahead (see [`validator_commit_cycle`]), marks the validators as recently updated (role
    /// gate) and returns `c`. Start the clock next.
    pub fn jump_before_validator_commit(&self) -> u64 {
        let h0 = self.d.head().unwrap();
        let c = validator_commit_cycle(&self.sched, h0);
        let target = self.phase_start(c, PhaseName::ValidatorCommit1) - 1;
        if target > h0 {
            self.d
                .new_blocks(u32::try_from(target - h0).unwrap())
                .unwrap();
        }
        let now = self.d.head().unwrap();
        self.head.store(now, Ordering::SeqCst);
        self.d
            .set_storage(json!({"SubtensorModule": {"LastUpdate": [[[NETUID], [now, now, now]]]}}))
            .expect("seed LastUpdate");
        c
    }

    /// One block every `every`, mirrored into `head`.
    pub fn start_clock(&self, every: Duration) -> Ticker {
        Ticker::start(self.d.port(), self.head.clone(), every)
    }

    /// Waits for the next ValidatorCommit1 / ValidatorCommit2 and commits `{"m"}` then
    /// `{"h","v","e":0}` of `vhash` for both validators, as validators do. Returns the version
    /// committed (MinerCommit1 start of that cycle).
    pub async fn validators_commit(&self, vhash: &str) -> u64 {
        let v = self.validators_commit1(vhash).await;
        self.validators_commit2(vhash, v).await;
        v
    }

    /// The ValidatorCommit1 half of [`Scene::validators_commit`]: waits for the phase, commits
    /// `{"m"}` of both validators; returns the version they will commit.
    pub async fn validators_commit1(&self, vhash: &str) -> u64 {
        let (vc1_start, vc1_end) = wait_for_phase(
            &self.head,
            &self.sched,
            PhaseName::ValidatorCommit1,
            2,
            Duration::from_secs(60),
        )
        .await;
        let m_b = format!(r#"{{"m":"{}"}}"#, sign_hex(&self.bob, vhash));
        let m_c = format!(r#"{{"m":"{}"}}"#, sign_hex(&self.charlie, vhash));
        let (r1, r2) = tokio::join!(
            self.chain.set_commitment(&self.bob, NETUID, m_b.as_bytes()),
            self.chain
                .set_commitment(&self.charlie, NETUID, m_c.as_bytes())
        );
        assert!(
            r1.unwrap().block <= vc1_end + 1 && r2.unwrap().block <= vc1_end + 1,
            "ValidatorCommit1 too late"
        );
        self.baseline_version(vc1_start / self.cycle_length())
    }

    /// The ValidatorCommit2 half: waits for the phase, commits `{"h","v","e":0}`.
    pub async fn validators_commit2(&self, vhash: &str, v: u64) {
        wait_for_phase(
            &self.head,
            &self.sched,
            PhaseName::ValidatorCommit2,
            2,
            Duration::from_secs(30),
        )
        .await;
        let text = format!(r#"{{"h":"{vhash}","v":{v},"e":0}}"#);
        let (r1, r2) = tokio::join!(
            self.chain
                .set_commitment(&self.bob, NETUID, text.as_bytes()),
            self.chain
                .set_commitment(&self.charlie, NETUID, text.as_bytes())
        );
        r1.unwrap();
        r2.unwrap();
    }

    /// The validators' hotkeys in the order chainsync tries them as download candidates
    /// (storage-key order of their commitments; call once both have committed).
    pub async fn candidate_order(&self) -> Vec<String> {
        let (b, c) = (self.bob.ss58(), self.charlie.ss58());
        let head = self.chain.head().await.unwrap();
        self.chain
            .commitments(NETUID, head)
            .await
            .unwrap()
            .into_iter()
            .map(|x| x.hotkey)
            .filter(|h| h == b || h == c)
            .collect()
    }

    /// Publishes an own checkpoint `globalver_<gv>_inneropt_<n>` holding [`expert_tensors`]`(seed)`;
    /// returns its model hash (hex).
    pub fn publish_own(&self, gv: u64, n: u64, seed: u16) -> String {
        let staged = self.run.stage_own(gv, n).unwrap();
        let h = staged
            .write_model_tensors(self.group.group_id, &expert_tensors(seed))
            .unwrap();
        staged
            .publish(PublishInfo::own(self.group.group_id, h))
            .unwrap();
        h.to_hex()
    }

    /// chainsync-svc on this run directory, logging to `<tmp>/<log>`.
    pub fn spawn_chainsync(&self, log: &str) -> Service {
        self.spawn_chainsync_with(log, &[])
    }

    /// As [`Scene::spawn_chainsync`] with extra flags (e.g. shorter retry backoffs).
    pub fn spawn_chainsync_with(&self, log: &str, args: &[&str]) -> Service {
        let mut cmd = chainsync_command(&self.run_dir, &self.ports).unwrap();
        cmd.args(args);
        Service::spawn("chainsync-svc", cmd, &self.tmp.path().join(log)).unwrap()
    }

    /// chainsync's jobs once its gRPC answers.
    pub async fn jobs(&self) -> Vec<cpb::Job> {
        let port = self.ports.chainsync_grpc;
        wait_some("chainsync's GetJobs", Duration::from_secs(30), || {
            chainsync_jobs(port)
        })
        .await
    }

    /// Waits until the job of `kind` in `cycle` has finished; returns it.
    pub async fn wait_job(&self, kind: cpb::JobKind, cycle: u64, limit: Duration) -> cpb::Job {
        let port = self.ports.chainsync_grpc;
        wait_some(
            &format!("the {kind:?} job of cycle {cycle} to finish"),
            limit,
            || async move { finished_job(&chainsync_jobs(port).await?, kind, cycle) },
        )
        .await
    }

    /// Our commitment text at `block`.
    pub async fn our_commitment(&self, block: u64) -> Option<String> {
        commitment_at(&self.chain, self.miner.ss58(), block).await
    }

    /// Staging (`.tmp_`) and deletion (`.trash_`) directories left in the run directory or its
    /// validator folder.
    pub fn staged_leftovers(&self) -> Vec<String> {
        use miner_contract::layout::{TMP_PREFIX, TRASH_PREFIX, VALIDATOR_DIR};
        let vdir = self.run_dir.join(VALIDATOR_DIR);
        listdir(&self.run_dir)
            .into_iter()
            .chain(listdir(&vdir))
            .filter(|n| n.starts_with(TMP_PREFIX) || n.starts_with(TRASH_PREFIX))
            .collect()
    }

    /// Pin files in `.pins/` (any process's, live or not).
    pub fn pin_files(&self) -> Vec<String> {
        listdir(&self.run.pins_dir())
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect()
    }

    /// chainsync's job journal, parsed (an error if any line is not a record).
    pub fn journal(&self) -> Vec<chainsync_svc::jobs::JobRecord> {
        let p = self
            .run_dir
            .join(chainsync_svc::jobs::STATE_DIR)
            .join(chainsync_svc::jobs::JOBS_FILE);
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        chainsync_svc::jobs::parse_journal(&text, &p)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", p.display()))
    }
}
