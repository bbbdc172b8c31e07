//! The daemon's cycle over the Hugging Face Hub transport on the real devnet: validator
//! stand-ins publish their baselines to a `HubStandIn` and commit `{"m"}` / `{"h","v","e","s",
//! "r","rv"}`; the miner downloads the baseline at `r@rv` (first candidate refused: another
//! hash), commits `{"m"}`, uploads its shard, commits `{"e","h","v","r","rv"}`; then the test,
//! as a validator, fetches the file at `r@rv` **without a token** and checks the signature and
//! the model hash (§7.5) against the two commitments. A copier polls the miner's repo without a
//! token through MinerCommit1 and never sees the file or its size before MinerCommit1's last
//! block is over (copy guard). Faults of the Hub end in the right job record with nothing
//! half-published.

mod cycle_support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chainsync_svc::config::Settings;
use chainsync_svc::hub::HubSettings;
use chainsync_svc::jobs::Policies;
use chainsync_svc::phase::PhaseName;
use miner_contract::shard::ShardFormat;
use miner_contract::{MinerConfig, RunDir};
use miner_hub::{HubClient, HubConfig, HubError, RepoId, RepoType};
use miner_keys::Hotkey;
use miner_proto::chainsync::v1 as pb;
use miner_proto::chainsync::v1::chain_sync_client::ChainSyncClient;
use miner_standins::PhaseApiStandIn;
use miner_standins::hub::{
    FaultAction, HubFault, HubRoute, HubStandIn, HubStandInOptions, RepoKind,
};

use cycle_support::*;

/// Tests that commit with the miner's key (uid 0) run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOKEN: &str = "hf_miner_write";
const READ_TOKEN: &str = "hf_miner_read";
const USER: &str = "miner";
const REPO: &str = "miner/co";
const BLOCK_MS: u64 = 400;

/// What a test changes in the set-up.
#[derive(Clone, Default)]
struct Opts {
    copy_guard: bool,
    /// The token the miner uses (default: the write token).
    token: Option<&'static str>,
    /// Seed the miner's repo as it was before (e.g. private with the guard off, or public
    /// from an earlier cycle with the guard on): `Some(private)`.
    repo_before: Option<bool>,
    /// The good validator commits a revision whose file is missing (the other is refused).
    missing_at_revision: bool,
    /// The good validator publishes its baseline only as `.pt` (default: only as
    /// `.safetensors`, which the stock miner never asks for).
    baseline_pt: bool,
    /// Our only checkpoint is older than the version window (global_ver 0; the chain is first
    /// moved far enough for the window to exclude it).
    own_out_of_window: bool,
}

struct Bed {
    bed: Devbed,
    hub: HubStandIn,
    _tmp: tempfile::TempDir,
    run_dir: PathBuf,
    run: RunDir,
    _phase_api: PhaseApiStandIn,
    miner: Hotkey,
    own_hash: String,
    own_gv: u64,
    vhash: String,
    /// The baseline's version.
    v_base: u64,
    /// The validator whose baseline is the good one, and the other's.
    good: String,
    good_repo: String,
    wrong: String,
    /// The cycle the daemon works in.
    c1: u64,
    daemon: Option<Daemon>,
}

impl Bed {
    fn mc1_end(&self) -> u64 {
        let s = &self.bed.sched;
        self.c1 * s.cycle_length()
            + s.phase_offset(PhaseName::MinerCommit1)
            + periods().commit_period
            - 1
    }
    fn mc2_end(&self) -> u64 {
        self.mc1_end() + periods().commit_period
    }
    fn anon(&self) -> HubClient {
        HubClient::new(HubConfig {
            endpoint: self.hub.endpoint(),
            read_timeout: Duration::from_secs(5),
            ..HubConfig::default()
        })
        .expect("anonymous Hub client")
    }
    async fn client(&self) -> ChainSyncClient<tonic::transport::Channel> {
        self.daemon.as_ref().expect("daemon").client().await
    }
    async fn job(&self, kind: pb::JobKind) -> pb::Job {
        let mut c = self.client().await;
        wait_job(&mut c, kind, self.c1, Duration::from_secs(90)).await
    }
    /// Our commitment in the post-state of `block` (waits for the block).
    async fn commitment(&self, block: u64) -> Option<String> {
        let t0 = Instant::now();
        while self.bed.head_now() < block {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "block {block} never came"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.bed
            .chain
            .commitments(NETUID, block)
            .await
            .expect("read commitments")
            .into_iter()
            .find(|x| x.hotkey == self.miner.ss58())
            .and_then(|x| x.text().map(str::to_owned))
    }
    async fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop().await;
        }
    }
}

fn vc2_hub_text(hash: &str, version: u64, repo: &str, rv: &str) -> String {
    format!(r#"{{"h":"{hash}","v":{version},"e":0,"s":4242,"r":"{repo}","rv":"{rv}"}}"#)
}

/// Devnet, Hub stand-in, two validators publishing to the Hub, the run directory; the daemon
/// started before cycle k+1 with the Hub transport.
async fn setup(o: Opts) -> Bed {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("chainsync_svc=info")
        .with_test_writer()
        .try_init();
    if o.own_out_of_window {
        let d = tokio::task::spawn_blocking(miner_devnet::shared)
            .await
            .expect("devnet");
        for _ in 0..12 {
            d.new_blocks(10).expect("burst");
        }
    }
    let bed = Devbed::start(Duration::from_millis(BLOCK_MS)).await;
    let l = bed.sched.cycle_length();
    let hub = HubStandIn::start(HubStandInOptions {
        tokens: vec![
            (TOKEN.into(), USER.into(), true),
            (READ_TOKEN.into(), USER.into(), false),
        ],
        lfs_threshold: 1024,
        multipart_chunk_size: 16 << 10,
        ..Default::default()
    })
    .await
    .expect("Hub stand-in");
    let tmp = tempfile::tempdir().unwrap();
    let miner = Hotkey::load(&wallet_dir(), "miners", "miner_1", None).expect("example wallet");
    let bob = Hotkey::from_uri("//Bob").unwrap();
    let charlie = Hotkey::from_uri("//Charlie").unwrap();
    fund(bed.d, charlie.ss58());

    let (vformat, vname) = if o.baseline_pt {
        (ShardFormat::Pt, "model_expgroup_0.pt")
    } else {
        (ShardFormat::Safetensors, "model_expgroup_0.safetensors")
    };
    let vfile = tmp.path().join(vname);
    let vhash = miner_contract::shard::write_shard_tensors(&vfile, vformat, &shard(100))
        .unwrap()
        .to_hex();
    let wrong = tmp.path().join("wrong_model.pt");
    miner_contract::pt::write_pt_tensors(&wrong, &shard(300), &Default::default()).unwrap();

    let run_dir = tmp.path().join("run");
    let run = create_run(&run_dir, bed.d.ws_url(), "hubcycle", &periods());
    let (mut cfg, _) = MinerConfig::load(&run_dir.join("config.yaml")).unwrap();
    cfg.hf.copy_guard = o.copy_guard;
    cfg.write(&run_dir).unwrap();
    if let Some(private) = o.repo_before {
        hub.create_repo(REPO, RepoKind::Model, private);
        hub.put_file(REPO, RepoKind::Model, "README.md", b"earlier cycle\n")
            .unwrap();
    }
    let phase_api = phase_api(&bed.head, vec![BOB.to_owned(), charlie.ss58().to_owned()]).await;

    let (vc1_start, vc1_end) = bed.wait_for_phase(PhaseName::ValidatorCommit1, 2).await;
    let k = vc1_start / l;
    let v_base = k * l + bed.sched.phase_offset(PhaseName::MinerCommit1);
    let own_gv = v_base - 1;
    let (t1, t2) = (vc1_text(&bob, &vhash), vc1_text(&charlie, &vhash));
    let (r1, r2) = tokio::join!(
        bed.chain.set_commitment(&bob, NETUID, t1.as_bytes()),
        bed.chain.set_commitment(&charlie, NETUID, t2.as_bytes())
    );
    assert!(
        r1.unwrap().block <= vc1_end + 1 && r2.unwrap().block <= vc1_end + 1,
        "VC1 too late"
    );
    // Candidates are tried in storage-key order: the first one publishes another file.
    let order: Vec<String> = bed
        .chain
        .commitments(NETUID, bed.chain.head().await.unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.hotkey)
        .filter(|h| h == BOB || h == charlie.ss58())
        .collect();
    assert_eq!(order.len(), 2, "{order:?}");
    let (first, second) = (order[0].clone(), order[1].clone());
    let repo_of = |ss58: &str| {
        if ss58 == BOB {
            "val-bob/ckpt"
        } else {
            "val-charlie/ckpt"
        }
    };
    let rev = |oid: String| oid[..7].to_owned();
    let rv_first = rev(hub
        .put_file(
            repo_of(&first),
            RepoKind::Model,
            "model_expgroup_0.pt",
            &std::fs::read(&wrong).unwrap(),
        )
        .unwrap());
    let good_bytes = std::fs::read(&vfile).unwrap();
    let rv_second = if o.missing_at_revision {
        // The file is committed only after the revision the validator commits.
        let rv = rev(hub
            .put_file(
                repo_of(&second),
                RepoKind::Model,
                "README.md",
                b"baseline soon\n",
            )
            .unwrap());
        hub.put_file(repo_of(&second), RepoKind::Model, vname, &good_bytes)
            .unwrap();
        rv
    } else {
        rev(hub
            .put_file(repo_of(&second), RepoKind::Model, vname, &good_bytes)
            .unwrap())
    };
    let own_gv = if o.own_out_of_window { 0 } else { own_gv };
    let own_hash = publish_own(&run, own_gv, 5, 7);

    bed.wait_for_phase(PhaseName::ValidatorCommit2, 1).await;
    let key = |ss58: &str| {
        if ss58 == BOB {
            bob.clone()
        } else {
            charlie.clone()
        }
    };
    let (k1, k2) = (key(&first), key(&second));
    let t1 = vc2_hub_text(&vhash, v_base, repo_of(&first), &rv_first);
    let t2 = vc2_hub_text(&vhash, v_base, repo_of(&second), &rv_second);
    let (r1, r2) = tokio::join!(
        bed.chain.set_commitment(&k1, NETUID, t1.as_bytes()),
        bed.chain.set_commitment(&k2, NETUID, t2.as_bytes())
    );
    r1.unwrap();
    r2.unwrap();

    let settings = hub_settings(
        &run_dir,
        phase_api.url(),
        hub.endpoint(),
        o.token.unwrap_or(TOKEN),
    );
    let fast = retry_policy(Duration::from_secs(5), 2, Duration::from_millis(200));
    let daemon = Daemon::start_settings(
        settings,
        Some(Policies {
            download: fast,
            submit: fast,
            commit_attempts: 3,
        }),
        false,
    )
    .await;
    Bed {
        bed,
        hub,
        _tmp: tmp,
        run_dir,
        run,
        _phase_api: phase_api,
        miner,
        own_hash,
        own_gv,
        vhash,
        v_base,
        good_repo: repo_of(&second).to_owned(),
        good: second,
        wrong: first,
        c1: k + 1,
        daemon: Some(daemon),
    }
}

/// The daemon's settings with the Hub transport at `endpoint` and `token` (given directly: a
/// test cannot set the process environment).
fn hub_settings(run_dir: &Path, owner_url: String, endpoint: String, token: &str) -> Settings {
    let cli = owner_api_cli(run_dir, owner_url);
    let mut s = Settings::from_cli(&cli).expect("settings");
    let mut hub = HubSettings::with_token(
        &s.config.hf,
        endpoint,
        Some(token.to_owned()),
        &run_dir.join("config.yaml"),
    )
    .expect("hub settings");
    hub.read_timeout = Duration::from_secs(2);
    hub.connect_timeout = Duration::from_secs(2);
    hub.max_retries = 2;
    hub.retry_deadline = Duration::from_secs(2);
    s.hub = Some(hub);
    s.timing.poll = Duration::from_millis(100);
    s.timing.block_time = Duration::from_millis(BLOCK_MS);
    s
}

/// A validator of the Submission phase: reads both commitments where validators read them,
/// fetches `r@rv` without a token, checks the signature over `h` and the model hash of the file.
async fn validate_like_a_validator(b: &Bed) -> (String, String) {
    let m = b
        .commitment(b.mc1_end() + 1)
        .await
        .expect("commit 1 on chain");
    let c2 = b
        .commitment(b.mc2_end() + 1)
        .await
        .expect("commit 2 on chain");
    let v1: serde_json::Value = serde_json::from_str(&m).unwrap();
    let v2: serde_json::Value = serde_json::from_str(&c2).unwrap();
    let sig = v1["m"].as_str().expect("m");
    let h = v2["h"].as_str().expect("h");
    let r = v2["r"].as_str().expect("r");
    let rv = v2["rv"].as_str().expect("rv");
    assert_eq!(rv.len(), 7, "{c2}");
    let sig_bytes: [u8; 64] = miner_keys::b64url_nopad_decode(sig)
        .unwrap()
        .try_into()
        .unwrap();
    assert!(
        miner_keys::verify(&b.miner.public(), h.as_bytes(), &sig_bytes),
        "commit-1 signs commit-2's hash"
    );
    // Validators try `.safetensors`, then `.pt` (addendum A1).
    let repo: RepoId = r.parse().unwrap();
    let anon = b.anon();
    let mut name = None;
    for n in ["model_expgroup_0.safetensors", "model_expgroup_0.pt"] {
        if anon.head_file(&repo, RepoType::Model, rv, n).await.is_ok() {
            name = Some(n);
            break;
        }
    }
    let name = name.expect("a shard at r@rv, fetchable without a token");
    let dest = b._tmp.path().join(format!("validator_fetch_{name}"));
    anon.download_to(&repo, RepoType::Model, rv, name, &dest, 1 << 30)
        .await
        .expect("token-free fetch at r@rv");
    let file_hash = miner_contract::shard::hash_shard_file(&dest)
        .unwrap()
        .to_hex();
    assert_eq!(file_hash, h, "the file at r@rv has the committed hash");
    (m, c2)
}

/// What a copier saw: (chain head after the answer, what, succeeded).
type Seen = Arc<Mutex<Vec<(u64, &'static str, bool, Instant)>>>;

/// Polls the miner's repo without a token (file HEAD and GET at `main`, repo info, tree) until
/// `stop`; records what it got and at which chain head (read after the answer).
fn start_copier(b: &Bed, stop: Arc<AtomicBool>) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let anon = b.anon();
    let ws = b.bed.d.ws_url();
    let s2 = seen.clone();
    let task = tokio::spawn(async move {
        let chain =
            chainsync_svc::chain::ChainClient::connect(&chainsync_svc::chain::Endpoint::Url(ws))
                .await
                .expect("copier's chain client");
        let repo: RepoId = REPO.parse().unwrap();
        let mut turn = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let name = if turn.is_multiple_of(2) {
                "model_expgroup_0.safetensors"
            } else {
                "model_expgroup_0.pt"
            };
            turn += 1;
            let head = anon.head_file(&repo, RepoType::Model, "main", name).await;
            let get = anon
                .get_range(&repo, RepoType::Model, "main", name, 0, 16)
                .await;
            let info = anon.repo_info(&repo, RepoType::Model, None).await;
            let tree = anon.list_files(&repo, RepoType::Model, "main", None).await;
            let at = chain.head().await.unwrap_or(0);
            let now = Instant::now();
            s2.lock().unwrap().extend([
                (at, "HEAD file", head.is_ok(), now),
                (at, "GET file", get.is_ok(), now),
                (at, "repo info", info.is_ok(), now),
                (at, "tree", tree.is_ok_and(|t| !t.is_empty()), now),
            ]);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    (seen, task)
}

fn ok(j: &pb::Job) -> bool {
    j.outcome == pb::JobOutcome::Succeeded as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_cycle_with_the_copy_guard_submits_and_a_copier_sees_nothing_before_mc1_ends() {
    let _serial = SERIAL.lock().await;
    let b = setup(Opts {
        copy_guard: true,
        ..Default::default()
    })
    .await;
    // The copier starts before MinerCommit1 of the daemon's cycle.
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, copier) = start_copier(&b, stop.clone());

    let dl = b.job(pb::JobKind::Download).await;
    assert!(ok(&dl), "{dl:#?}");
    assert_eq!(dl.model_hash, b.vhash);
    assert_eq!(
        dl.destination, b.good,
        "the wrong-hash candidate was refused"
    );
    assert_eq!(dl.attempts, 2);
    assert!(
        dl.hf_repo.ends_with("/ckpt") && dl.hf_revision.len() == 7,
        "{dl:#?}"
    );
    let vbest = b.run.best_validator().unwrap().expect("baseline published");
    assert!(vbest.is_verified());
    assert_eq!(
        vbest.manifest.as_ref().unwrap().model_hash.to_hex(),
        b.vhash
    );
    assert!(
        vbest.path.join("model_expgroup_0.safetensors").is_file(),
        "the .safetensors-only baseline was found and kept in its format"
    );
    assert_eq!(
        std::fs::read_dir(b.run_dir.join("validator_checkpoint"))
            .unwrap()
            .count(),
        1,
        "the refused candidate left nothing behind"
    );

    let c1 = b.job(pb::JobKind::Commit1).await;
    assert!(ok(&c1), "{c1:#?}");
    assert_eq!(c1.hf_repo, REPO);
    assert_eq!(c1.hf_revision.len(), 7);
    assert!(
        c1.bytes_total > 0 && c1.bytes_done == c1.bytes_total,
        "{c1:#?}"
    );
    let c2 = b.job(pb::JobKind::Commit2).await;
    assert!(ok(&c2), "{c2:#?}");
    assert_eq!(c2.hf_revision, c1.hf_revision);
    let sub = b.job(pb::JobKind::Submit).await;
    assert!(ok(&sub), "{sub:#?}");
    assert_eq!(sub.destination, format!("hub:{REPO}@{}", c1.hf_revision));

    // On chain, in the exact formats, where validators read them.
    let (m, c2_text) = validate_like_a_validator(&b).await;
    assert_eq!(m.len(), 94);
    assert_eq!(
        c2_text,
        format!(
            r#"{{"e":0,"h":"{}","v":{},"r":"{REPO}","rv":"{}"}}"#,
            b.own_hash, b.own_gv, c1.hf_revision
        )
    );
    assert!(c2.included_block.unwrap() > b.mc1_end() + 1);
    assert!(c2.included_block.unwrap() <= b.mc2_end() + 1);

    // The copier: nothing about the file (not even its size or the repo) before
    // MinerCommit1's last block was over; fetchable afterwards.
    stop.store(true, Ordering::SeqCst);
    copier.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let mc1_end = b.mc1_end();
    let leaks: Vec<_> = seen
        .iter()
        .filter(|(at, _, ok, _)| *ok && *at <= mc1_end)
        .collect();
    assert!(
        leaks.is_empty(),
        "the copier saw {leaks:?} by block {mc1_end}"
    );
    let polled_in_mc1 = seen
        .iter()
        .filter(|(at, _, _, _)| *at + periods().commit_period > mc1_end && *at <= mc1_end)
        .count();
    assert!(
        polled_in_mc1 > 0,
        "the copier polled during MinerCommit1: {seen:?}"
    );
    let over = seen
        .iter()
        .find(|(at, _, _, _)| *at > mc1_end)
        .map(|s| s.3)
        .expect("the copier saw MinerCommit1 end");
    let fetched = seen
        .iter()
        .find(|(_, w, ok, _)| *ok && *w == "GET file")
        .map(|s| s.3)
        .expect("the copier can fetch the file after MinerCommit1");
    // The measurement the report quotes: MinerCommit1's end (as the copier first saw it) to its
    // first token-free fetch, and what is left of a reference MinerCommit2 (10 blocks of 12 s).
    let took = fetched.saturating_duration_since(over);
    eprintln!(
        "MEASURE copy guard: MinerCommit1 end -> token-free fetch {:.0} ms; commit-2 included {} block(s) before MinerCommit2's end; margin in a 120 s MinerCommit2 before commit-2 is sent: {:.1} s",
        took.as_secs_f64() * 1000.0,
        b.mc2_end() + 1 - c2.included_block.unwrap(),
        120.0 - took.as_secs_f64()
    );
    // Nothing authenticated from the copier reached the Hub (every fetch after MC1 was anonymous).
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_copy_guard_the_upload_is_public_during_mc1_and_commit2_follows() {
    let _serial = SERIAL.lock().await;
    let b = setup(Opts::default()).await;
    let c1 = b.job(pb::JobKind::Commit1).await;
    assert!(ok(&c1), "{c1:#?}");
    let c2 = b.job(pb::JobKind::Commit2).await;
    assert!(ok(&c2), "{c2:#?}");
    validate_like_a_validator(&b).await;
    // The reference's order: the file was public (and fetchable) before commit-2.
    let info = b
        .anon()
        .repo_info(&REPO.parse().unwrap(), RepoType::Model, None)
        .await
        .unwrap();
    assert!(!info.private);
    b.stop().await;
}

/// A private repo with the guard off: validators cannot fetch the file; the miner's fault is
/// named and nothing is committed at MinerCommit2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_repo_without_the_guard_is_reported_as_the_miners_fault() {
    let _serial = SERIAL.lock().await;
    let b = setup(Opts {
        repo_before: Some(true),
        ..Default::default()
    })
    .await;
    let c2 = b.job(pb::JobKind::Commit2).await;
    assert_eq!(c2.outcome, pb::JobOutcome::Failed as i32, "{c2:#?}");
    assert!(
        c2.error.contains("private") && c2.error.contains("miner's fault"),
        "{}",
        c2.error
    );
    let after = b.commitment(b.mc2_end() + 1).await.unwrap_or_default();
    assert!(!after.contains("\"rv\""), "no commit-2: {after}");
    b.stop().await;
}

/// The guard makes a repo left public by an earlier cycle private before the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_guard_makes_a_public_repo_private_before_the_upload() {
    let _serial = SERIAL.lock().await;
    let b = setup(Opts {
        copy_guard: true,
        repo_before: Some(false),
        ..Default::default()
    })
    .await;
    let c1 = b.job(pb::JobKind::Commit1).await;
    assert!(ok(&c1), "{c1:#?}");
    let reqs = b.hub.requests();
    let private_at = reqs
        .iter()
        .position(|r| r.route == HubRoute::Settings)
        .expect("a visibility change");
    let upload_at = reqs
        .iter()
        .position(|r| r.route == HubRoute::Commit)
        .expect("an upload commit");
    assert!(private_at < upload_at, "made private before the upload");
    let c2 = b.job(pb::JobKind::Commit2).await;
    assert!(ok(&c2), "{c2:#?}");
    validate_like_a_validator(&b).await;
    b.stop().await;
}

/// Hub faults on the upload path: 429 then OK on the commit, 503 on an upload part; the
/// visibility change fails (5xx) then succeeds. The cycle still submits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_hub_faults_are_retried_inside_the_phase() {
    let _serial = SERIAL.lock().await;
    let b = setup(Opts {
        copy_guard: true,
        ..Default::default()
    })
    .await;
    b.hub.inject(HubFault::nth(
        HubRoute::Commit,
        1,
        FaultAction::Status {
            status: 429,
            retry_after: Some(0),
        },
    ));
    b.hub.inject(HubFault::nth(
        HubRoute::StoragePartPut,
        2,
        FaultAction::Status {
            status: 503,
            retry_after: None,
        },
    ));
    // The 2nd settings call is the make-public (the 1st: none; the repo is created private).
    b.hub.inject(HubFault {
        route: HubRoute::Settings,
        skip: 0,
        times: 2,
        action: FaultAction::Status {
            status: 502,
            retry_after: None,
        },
    });
    let c1 = b.job(pb::JobKind::Commit1).await;
    assert!(ok(&c1), "{c1:#?}");
    let c2 = b.job(pb::JobKind::Commit2).await;
    assert!(ok(&c2), "{c2:#?}");
    validate_like_a_validator(&b).await;
    let statuses: Vec<(HubRoute, u16)> = b
        .hub
        .requests()
        .iter()
        .map(|r| (r.route, r.status))
        .collect();
    for want in [
        (HubRoute::Commit, 429),
        (HubRoute::StoragePartPut, 503),
        (HubRoute::Settings, 502),
    ] {
        assert!(statuses.contains(&want), "{want:?} not seen: {statuses:?}");
    }
    b.stop().await;
}

/// Right after the visibility change the Hub is slow to serve the file: the first two token-free
/// HEADs answer 404 (what a private file looks like). Under the copy guard COMMIT2 retries them
/// inside MinerCommit2 instead of blaming the miner, and commits once the file is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_public_file_served_late_is_retried_until_it_is() {
    let _serial = SERIAL.lock().await;
    let b = setup(Opts {
        copy_guard: true,
        ..Default::default()
    })
    .await;
    let c1 = b.job(pb::JobKind::Commit1).await;
    assert!(ok(&c1), "{c1:#?}");
    b.hub.inject(HubFault {
        route: HubRoute::ResolveHead,
        skip: 0,
        times: 2,
        action: FaultAction::Status {
            status: 404,
            retry_after: None,
        },
    });
    let c2 = b.job(pb::JobKind::Commit2).await;
    assert!(ok(&c2), "{c2:#?}");
    let head_404s = b
        .hub
        .requests()
        .iter()
        .filter(|r| r.route == HubRoute::ResolveHead && r.status == 404)
        .count();
    assert!(
        head_404s >= 2,
        "both late answers were seen and retried ({head_404s})"
    );
    validate_like_a_validator(&b).await;
    b.stop().await;
}

/// The visibility change never succeeds: COMMIT2 is MISSED with the reason, nothing committed,
/// the file never public.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repo_that_cannot_be_made_public_misses_commit2_and_stays_private() {
    let _serial = SERIAL.lock().await;
    let b = setup(Opts {
        copy_guard: true,
        ..Default::default()
    })
    .await;
    b.hub.inject(HubFault {
        route: HubRoute::Settings,
        skip: 0,
        times: 10_000,
        action: FaultAction::Status {
            status: 503,
            retry_after: None,
        },
    });
    let c2 = b.job(pb::JobKind::Commit2).await;
    assert_eq!(c2.outcome, pb::JobOutcome::Missed as i32, "{c2:#?}");
    assert!(c2.error.contains("public"), "{}", c2.error);
    let after = b.commitment(b.mc2_end() + 1).await.unwrap_or_default();
    assert!(!after.contains("\"rv\""), "no commit-2: {after}");
    let e = b
        .anon()
        .head_file(
            &REPO.parse().unwrap(),
            RepoType::Model,
            "main",
            "model_expgroup_0.safetensors",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, HubError::Unauthorized { .. } | HubError::NotFound { .. }),
        "{e}"
    );
    b.stop().await;
}

/// An upload that stalls past MinerCommit2: COMMIT1 and COMMIT2 MISSED with the bytes sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_stalled_past_the_deadline_is_missed() {
    let _serial = SERIAL.lock().await;
    let b = setup(Opts {
        copy_guard: true,
        ..Default::default()
    })
    .await;
    b.hub.inject(HubFault {
        route: HubRoute::StoragePartPut,
        skip: 1,
        times: 10_000,
        action: FaultAction::Stall(Duration::from_secs(60)),
    });
    // While it runs, the job shows the repo and the bytes sent so far (what `minerctl status`
    // and `jobs` print).
    let mut client = b.client().await;
    let t0 = Instant::now();
    let running = loop {
        let jobs = jobs_of(&mut client).await;
        if let Some(j) = jobs.iter().find(|j| {
            j.kind == pb::JobKind::Commit1 as i32
                && j.cycle_index == b.c1
                && j.outcome == pb::JobOutcome::Running as i32
                && j.bytes_done > 0
        }) {
            break j.clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{jobs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(running.hf_repo, REPO);
    // The bytes handed to the stalled request count as sent; no revision before the commit.
    assert!(
        running.bytes_total > 0 && running.bytes_done <= running.bytes_total,
        "{running:#?}"
    );
    assert!(running.hf_revision.is_empty(), "{running:#?}");
    let c1 = b.job(pb::JobKind::Commit1).await;
    assert_eq!(c1.outcome, pb::JobOutcome::Missed as i32, "{c1:#?}");
    assert!(c1.error.contains("MinerCommit2 ended"), "{}", c1.error);
    let c2 = b.job(pb::JobKind::Commit2).await;
    assert_ne!(c2.outcome, pb::JobOutcome::Succeeded as i32, "{c2:#?}");
    let after = b.commitment(b.mc2_end() + 1).await.unwrap_or_default();
    assert!(!after.contains("\"rv\""), "no commit-2: {after}");
    b.stop().await;
}

/// A validator's commit whose file is missing at its revision: the candidate fails (named),
/// nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_validator_revision_without_the_file_is_refused_and_leaves_nothing() {
    let _serial = SERIAL.lock().await;
    let b = setup(Opts {
        missing_at_revision: true,
        ..Default::default()
    })
    .await;
    let dl = b.job(pb::JobKind::Download).await;
    assert_eq!(dl.outcome, pb::JobOutcome::Failed as i32, "{dl:#?}");
    assert!(dl.error.contains("holds neither"), "{}", dl.error);
    assert!(b.run.best_validator().unwrap().is_none());
    let left: Vec<_> = std::fs::read_dir(b.run_dir.join("validator_checkpoint"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let _ = &b.wrong;
    b.stop().await;
}

/// A baseline published only as `.pt`: the miner falls back to it (and, by default, the
/// other tests' baselines are only `.safetensors`, which the stock miner never asks for).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_baseline_published_only_as_pt_is_downloaded() {
    let _serial = SERIAL.lock().await;
    let b = setup(Opts {
        baseline_pt: true,
        ..Default::default()
    })
    .await;
    let dl = b.job(pb::JobKind::Download).await;
    assert!(ok(&dl), "{dl:#?}");
    assert_eq!(dl.model_hash, b.vhash);
    let v = b.run.best_validator().unwrap().expect("baseline published");
    assert!(
        v.path.join("model_expgroup_0.pt").is_file(),
        "{}",
        v.path.display()
    );
    let asked: Vec<String> = b
        .hub
        .requests()
        .iter()
        .filter(|r| r.route == HubRoute::ResolveHead && r.path.contains(&b.good_repo))
        .map(|r| r.path.clone())
        .collect();
    assert!(
        asked[0].ends_with(".safetensors") && asked.iter().any(|p| p.ends_with(".pt")),
        ".safetensors asked first, then .pt: {asked:?}"
    );
    b.stop().await;
}

/// The best own checkpoint is older than the version window while a newer baseline is loaded:
/// COMMIT1 waits (inside MinerCommit1) for the trainer's first checkpoint from that baseline and
/// commits it, not the old one validators would refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit1_waits_for_a_checkpoint_from_the_new_baseline() {
    let _serial = SERIAL.lock().await;
    let b = setup(Opts {
        own_out_of_window: true,
        ..Default::default()
    })
    .await;
    let dl = b.job(pb::JobKind::Download).await;
    assert!(ok(&dl), "{dl:#?}");
    // The "trainer" publishes its first checkpoint from the new baseline half a block into
    // MinerCommit1.
    let mc1_start = b.mc1_end() + 1 - periods().commit_period;
    while b.bed.head_now() < mc1_start {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(BLOCK_MS / 2)).await;
    let new_hash = publish_own(&b.run, b.v_base, 1, 9);
    let c1 = b.job(pb::JobKind::Commit1).await;
    assert!(ok(&c1), "{c1:#?}");
    assert!(
        c1.checkpoint.contains(&format!("globalver_{}_", b.v_base)),
        "{}",
        c1.checkpoint
    );
    assert_eq!(c1.model_hash, new_hash);
    let c2 = b.job(pb::JobKind::Commit2).await;
    assert!(ok(&c2), "{c2:#?}");
    let (_, c2_text) = validate_like_a_validator(&b).await;
    assert!(
        c2_text.contains(&format!(r#""v":{}"#, b.v_base)),
        "{c2_text}"
    );
    assert_ne!(b.own_hash, new_hash);
    b.stop().await;
}
