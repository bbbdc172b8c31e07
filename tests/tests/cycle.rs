//! A whole subnet cycle, twice, with the real processes: trainer-svc and chainsync-svc (built
//! binaries) sharing one run directory, against the real devnet (subtensor runtime under
//! chopsticks), an owner-phase-API stand-in fed by the chain head and two validator stand-ins
//! (//Bob uid 1, //Charlie uid 2) that commit their baseline like validators do and verify
//! submissions against the chain. The miner is the example wallet (uid 0).
//!
//! Cycle c: at its end both validators commit ValidatorCommit1 `{"m"}` / ValidatorCommit2
//! `{"h","v","e"}` of a baseline (a copy of the trainer's first expert file, as a merged model
//! would be). Cycle c+1: chainsync downloads, verifies and publishes the baseline, the trainer
//! loads it, and the miner commits and submits. Cycle c+2: a newer checkpoint is
//! committed and submitted. Then `minerctl stop all` ends both, the trainer with a final checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chainsync_svc::chain::{ChainClient, Endpoint};
use chainsync_svc::phase::{PhaseName, PhaseSchedule};
use miner_contract::{ExpertGroup, RunDir};
use miner_keys::Hotkey;
use miner_proto::chainsync::v1 as cpb;
use miner_standins::{PhaseApiStandIn, SubmissionRecord, ValidatorStandIn, ValidatorStandInConfig};
use miner_tests::*;
use serde_json::{Value, json};

const BLOCK_EVERY: Duration = Duration::from_millis(1000);

fn seed_axon(d: &miner_devnet::Devnet, hotkey: &str, port: u16) {
    d.set_storage(json!({"SubtensorModule": {"Axons": [[[NETUID, hotkey], {
        "block": 1, "version": 1, "ip": "2130706433", "port": port,
        "ipType": 4, "protocol": 4, "placeholder1": "0x00", "placeholder2": "0x00"
    }]]}}))
    .expect("seed axon");
}

fn sign_hex(key: &Hotkey, hex: &str) -> String {
    miner_keys::b64url_nopad_encode(&key.sign(hex.as_bytes()))
}

struct Cycle {
    hash: String,
    global_ver: u64,
    inner_opt: u64,
    submission: SubmissionRecord,
}

/// `(V, N)` of a `.../globalver_<V>_inneropt_<N>` path.
fn version_of(checkpoint_path: &str) -> (u64, u64) {
    let name = Path::new(checkpoint_path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_prefix("globalver_")
        .and_then(|r| r.split_once("_inneropt_"))
        .and_then(|(v, n)| Some((v.parse().ok()?, n.parse().ok()?)))
        .unwrap_or_else(|| panic!("not an own checkpoint: {checkpoint_path}"))
}

/// Checks cycle `k` the way the validator and the miner would; returns what was committed.
async fn check_cycle(
    k: u64,
    jobs: &[cpb::Job],
    chain: &ChainClient,
    sched: &PhaseSchedule,
    miner: &Hotkey,
    validators: &[&ValidatorStandIn],
) -> Cycle {
    for kind in [
        cpb::JobKind::Commit1,
        cpb::JobKind::Commit2,
        cpb::JobKind::Submit,
    ] {
        let j = finished_job(jobs, kind, k)
            .unwrap_or_else(|| panic!("no finished {kind:?} job in cycle {k}: {jobs:#?}"));
        assert_eq!(
            j.outcome,
            cpb::JobOutcome::Succeeded as i32,
            "cycle {k} {kind:?}: {j:#?}"
        );
    }
    let c1 = finished_job(jobs, cpb::JobKind::Commit1, k).unwrap();
    let hash = c1.model_hash.clone();
    let (mc1_end, mc2_end) = commit_ends(sched, k);
    // MinerCommit1 at its end + 1: {"m": base64url(sign(h))}, exactly.
    let m = commitment_at(chain, miner.ss58(), mc1_end + 1)
        .await
        .unwrap_or_else(|| panic!("no MinerCommit1 of cycle {k} at block {}", mc1_end + 1));
    let v: Value = serde_json::from_str(&m).unwrap();
    let sig = v["m"].as_str().expect("m is a string");
    assert_eq!(m, format!(r#"{{"m":"{sig}"}}"#));
    assert_eq!(m.len(), 94, "{m}");
    let sig_bytes: [u8; 64] = miner_keys::b64url_nopad_decode(sig)
        .unwrap()
        .try_into()
        .unwrap();
    assert!(
        miner_keys::verify(&miner.public(), hash.as_bytes(), &sig_bytes),
        "MinerCommit1 of cycle {k} signs the committed hash"
    );
    // MinerCommit2 at its end + 1: {"e","h","v"}, exactly.
    let c2 = finished_job(jobs, cpb::JobKind::Commit2, k).unwrap();
    let (gv, inner_opt) = version_of(&c1.checkpoint);
    assert_eq!(c2.model_hash, hash, "commit 2 reveals the hash of commit 1");
    let h = commitment_at(chain, miner.ss58(), mc2_end + 1)
        .await
        .unwrap_or_else(|| panic!("no MinerCommit2 of cycle {k} at block {}", mc2_end + 1));
    assert_eq!(h, format!(r#"{{"e":0,"h":"{hash}","v":{gv}}}"#));
    // Exactly one validator received a submission this cycle; it accepted it (only accepted
    // submissions are recorded) and the stored file hashes to the committed h.
    let sub_start = mc2_end + 1;
    let sub_end = sub_start + sched.phase_len(PhaseName::Submission) - 1;
    let subs: Vec<SubmissionRecord> = validators
        .iter()
        .flat_map(|v| v.submissions())
        .filter(|s| (sub_start..=sub_end).contains(&s.origin_block))
        .collect();
    assert_eq!(subs.len(), 1, "cycle {k}: {subs:#?}");
    let s = subs[0].clone();
    assert_eq!(s.origin_hotkey_ss58, miner.ss58());
    assert_eq!(s.model_hex, hash);
    // The trainer's default shard format reaches the validator as such (addendum A1).
    assert_eq!(s.file_name, "model_expgroup_0.safetensors", "{s:#?}");
    let file_hash = miner_contract::shard::hash_shard_file(&s.stored_path)
        .unwrap()
        .to_hex();
    assert_eq!(file_hash, hash, "submitted file hash == committed h");
    let sj = finished_job(jobs, cpb::JobKind::Submit, k).unwrap();
    assert_eq!(sj.model_hash, hash);
    Cycle {
        hash,
        global_ver: gv,
        inner_opt,
        submission: s,
    }
}

async fn start_validator(
    key_uri: &str,
    serve: &Path,
    dir: PathBuf,
    head: &Arc<AtomicU64>,
    lookup: ChainLookup,
    group: &ExpertGroup,
    p: &chainsync_svc::phase::CyclePeriods,
) -> ValidatorStandIn {
    let h = head.clone();
    ValidatorStandIn::start(ValidatorStandInConfig {
        hotkey: Hotkey::from_uri(key_uri).unwrap(),
        serve_file: Some(serve.to_path_buf()),
        submission_dir: dir,
        max_submission_bytes: 1 << 30,
        block: Arc::new(move || h.load(Ordering::SeqCst)),
        schedule: owner_schedule(p),
        check_phase: true,
        assignment: None,
        chain_checkpoint: lookup,
        expert_group: Some(group.clone()),
    })
    .await
    .expect("validator stand-in")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_cycles_with_the_real_services_download_commit_submit_and_stop() {
    let t0 = Instant::now();
    let say = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let trainer_bin = bin_path(Bin::Trainer).expect("binaries");
    let _ = bin_path(Bin::Chainsync).expect("binaries");
    let _ = bin_path(Bin::Minerctl).expect("binaries");
    say(&format!(
        "binaries in {}",
        trainer_bin.parent().unwrap().display()
    ));
    let d: &'static miner_devnet::Devnet = tokio::task::spawn_blocking(miner_devnet::shared)
        .await
        .expect("devnet");
    say(&format!("devnet at head {}", d.head().unwrap()));
    let p = short_periods();
    let sched = PhaseSchedule::new(p).unwrap();
    let l = sched.cycle_length();
    let head = Arc::new(AtomicU64::new(d.head().unwrap()));
    let miner = Hotkey::load(&wallet_dir(), COLDKEY, HOTKEY, None).expect("example wallet");
    let bob = Hotkey::from_uri("//Bob").unwrap();
    let charlie = Hotkey::from_uri("//Charlie").unwrap();
    d.set_storage(json!({"System": {"Account": [[[charlie.ss58()], {"providers": 1, "data": {"free": "1000000000000"}}]]}}))
        .expect("fund Charlie");

    let tmp = tempfile::tempdir().unwrap();
    let h2 = head.clone();
    let phase_api = PhaseApiStandIn::start(
        owner_schedule(&p),
        Arc::new(move || h2.load(Ordering::SeqCst)),
        vec![bob.ss58().to_owned(), charlie.ss58().to_owned()],
    )
    .await
    .unwrap();
    let run_dir = create_run(
        tmp.path(),
        &RunSpec {
            ws_url: d.ws_url(),
            owner_url: phase_api.url(),
            periods: p,
            checkpoint_interval: 3,
        },
    )
    .unwrap();
    let run = RunDir::open(&run_dir).unwrap();
    let group = ExpertGroup::load_dir(&run_dir.join("embedded")).expect("embedded group");
    let ports = Ports::free();

    // The trainer starts first: its first checkpoint becomes the validators' baseline file.
    let mut trainer = Service::spawn(
        "trainer-svc",
        trainer_command(&run_dir, &ports).unwrap(),
        &tmp.path().join("trainer.log"),
    )
    .unwrap();
    // chainsync-svc starts meanwhile (it needs the validators only at its first download).
    let mut chainsync = Service::spawn(
        "chainsync-svc",
        chainsync_command(&run_dir, &ports).unwrap(),
        &tmp.path().join("chainsync.log"),
    )
    .unwrap();
    let first = wait_some(
        "the trainer's first checkpoint",
        Duration::from_secs(90),
        || {
            let r = run.best_own().ok().flatten();
            async move { r }
        },
    )
    .await;
    say(&format!("trainer published {}", first.dir_name));
    let vfile = tmp.path().join("validator_model.safetensors");
    std::fs::copy(
        first.path.join(miner_contract::layout::model_file_name(
            0,
            miner_contract::shard::ShardFormat::Safetensors,
        )),
        &vfile,
    )
    .unwrap();
    let vhash = miner_contract::shard::hash_shard_file(&vfile)
        .unwrap()
        .to_hex();

    let chain = Arc::new(
        ChainClient::connect(&Endpoint::Url(d.ws_url()))
            .await
            .unwrap()
            .with_tx_timeout(Duration::from_secs(30)),
    );
    let lookup = chain_lookup(chain.clone(), head.clone(), sched.clone());
    let v_bob = start_validator(
        "//Bob",
        &vfile,
        tmp.path().join("sub_bob"),
        &head,
        lookup.clone(),
        &group,
        &p,
    )
    .await;
    let v_charlie = start_validator(
        "//Charlie",
        &vfile,
        tmp.path().join("sub_charlie"),
        &head,
        lookup,
        &group,
        &p,
    )
    .await;
    seed_axon(d, bob.ss58(), v_bob.port());
    seed_axon(d, charlie.ss58(), v_charlie.port());

    wait_some("chainsync's gRPC", Duration::from_secs(30), || {
        chainsync_jobs(ports.chainsync_grpc)
    })
    .await;
    say("chainsync-svc answers");

    // Jump to the block before ValidatorCommit1 of cycle c, then one block a second.
    let h0 = d.head().unwrap();
    let c = scenario::validator_commit_cycle(&sched, h0);
    let target = c * l + sched.phase_offset(PhaseName::ValidatorCommit1) - 1;
    d.new_blocks(u32::try_from(target - h0).unwrap()).unwrap();
    let now = d.head().unwrap();
    head.store(now, Ordering::SeqCst);
    // Validators pass the role gate (updated within 448 blocks).
    d.set_storage(json!({"SubtensorModule": {"LastUpdate": [[[NETUID], [now, now, now]]]}}))
        .expect("seed LastUpdate");
    let _ticker = Ticker::start(d.port(), head.clone(), BLOCK_EVERY);

    // End of cycle c: the validators commit the baseline, version = MinerCommit1 start of c.
    let v_base = c * l + sched.phase_offset(PhaseName::MinerCommit1);
    let (_, vc1_end) = wait_for_phase(
        &head,
        &sched,
        PhaseName::ValidatorCommit1,
        2,
        Duration::from_secs(60),
    )
    .await;
    let vc1_b = format!(r#"{{"m":"{}"}}"#, sign_hex(&bob, &vhash));
    let vc1_c = format!(r#"{{"m":"{}"}}"#, sign_hex(&charlie, &vhash));
    let (r1, r2) = tokio::join!(
        chain.set_commitment(&bob, NETUID, vc1_b.as_bytes()),
        chain.set_commitment(&charlie, NETUID, vc1_c.as_bytes())
    );
    assert!(r1.unwrap().block <= vc1_end + 1 && r2.unwrap().block <= vc1_end + 1);
    wait_for_phase(
        &head,
        &sched,
        PhaseName::ValidatorCommit2,
        2,
        Duration::from_secs(30),
    )
    .await;
    let vc2 = format!(r#"{{"h":"{vhash}","v":{v_base},"e":0}}"#);
    let (r1, r2) = tokio::join!(
        chain.set_commitment(&bob, NETUID, vc2.as_bytes()),
        chain.set_commitment(&charlie, NETUID, vc2.as_bytes())
    );
    r1.unwrap();
    r2.unwrap();
    say(&format!("validators committed their baseline in cycle {c}"));

    // Two full cycles: k0 downloads the baseline, both commit and submit.
    let (k0, k1) = (c + 1, c + 2);
    let jobs = wait_some(
        &format!("the SUBMIT job of cycle {k1}"),
        Duration::from_secs(120),
        || async {
            let jobs = chainsync_jobs(ports.chainsync_grpc).await?;
            finished_job(&jobs, cpb::JobKind::Submit, k1).map(|_| jobs)
        },
    )
    .await;
    say(&format!("cycle {k1} submitted"));
    assert!(trainer.running(), "{}", trainer.log_tail(30));
    assert!(chainsync.running(), "{}", chainsync.log_tail(30));

    let validators = [&v_bob, &v_charlie];
    let c0 = check_cycle(k0, &jobs, &chain, &sched, &miner, &validators).await;
    let c1 = check_cycle(k1, &jobs, &chain, &sched, &miner, &validators).await;
    // The second cycle commits a newer checkpoint than the first.
    assert_ne!(c1.hash, c0.hash);
    assert!(
        (c1.global_ver, c1.inner_opt) > (c0.global_ver, c0.inner_opt),
        "cycle {k1} committed v{} n{}, cycle {k0} v{} n{}",
        c1.global_ver,
        c1.inner_opt,
        c0.global_ver,
        c0.inner_opt
    );
    assert!(c0.submission.bytes > 0 && c1.submission.bytes > 0);

    // The baseline was downloaded from a validator, verified and published...
    let dl = finished_job(&jobs, cpb::JobKind::Download, k0).expect("download job");
    assert_eq!(dl.outcome, cpb::JobOutcome::Succeeded as i32, "{dl:#?}");
    assert_eq!(dl.model_hash, vhash);
    let vbest = run
        .best_validator()
        .unwrap()
        .expect("a validator checkpoint");
    assert!(vbest.is_verified());
    assert_eq!(vbest.global_ver, v_base);
    assert_eq!(vbest.manifest.as_ref().unwrap().model_hash.to_hex(), vhash);
    assert_eq!(
        listdir(&run_dir.join("validator_checkpoint")),
        vec![vbest.dir_name.clone()],
        "only the verified baseline is visible"
    );
    assert_eq!(
        v_bob.download_requests() + v_charlie.download_requests(),
        1,
        "one download"
    );
    // ...and the trainer loaded it.
    let st = wait_some(
        "the trainer to load the baseline",
        Duration::from_secs(20),
        || async {
            trainer_status(ports.trainer_grpc)
                .await
                .filter(|s| s.baseline_version == v_base)
        },
    )
    .await;
    assert_eq!(st.baseline_hash, vhash);
    assert_eq!(st.baseline_name, vbest.dir_name);
    say(&format!(
        "trainer on baseline v{} at inner step {}",
        st.baseline_version, st.inner_opt_step
    ));

    // minerctl finds the trainer through the run directory and shows the same.
    let run_s = run_dir.to_str().unwrap();
    let (_, out, err) = minerctl(&["status", "--path", run_s, "--json"]).unwrap();
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("minerctl status --json: {e}:\n{out}{err}"));
    let tv = if v.is_array() {
        &v[0]["trainer"]
    } else {
        &v["trainer"]
    };
    assert_eq!(tv["baseline_version"], json!(v_base), "{out}");
    assert_eq!(tv["baseline_name"], json!(vbest.dir_name), "{out}");

    // minerctl stops both; the trainer writes a final checkpoint.
    let before_stop = run.best_own().unwrap().expect("own checkpoint");
    assert!(
        run_dir.join("control/chainsync.json").is_file(),
        "chainsync-svc publishes its endpoints for minerctl"
    );
    let (s, out, err) = minerctl(&["stop", "all", "--path", run_s]).unwrap();
    assert!(s.success(), "minerctl stop all: {out}{err}");
    assert!(
        out.matches(" exited").count() == 2,
        "minerctl waits for both to exit: {out}{err}"
    );
    let ts = trainer
        .wait_for(Duration::from_secs(60))
        .expect("trainer exits");
    assert_eq!(ts.code(), Some(0), "{}", trainer.log_tail(30));
    let cs = chainsync
        .wait_for(Duration::from_secs(60))
        .expect("chainsync exits");
    assert_eq!(cs.code(), Some(0), "{}", chainsync.log_tail(30));
    let last = run.best_own().unwrap().expect("final checkpoint");
    assert!(last.is_verified());
    assert_eq!(
        last.global_ver, v_base,
        "the final checkpoint trains on the baseline"
    );
    assert!(last.inner_opt >= before_stop.inner_opt);
    assert!(run_dir.join("mycelia_final.pt").is_file());
    assert!(
        run.pins().unwrap().is_empty(),
        "no pin outlives the services"
    );
    for name in ["trainer.json", "chainsync.json"] {
        assert!(
            !run_dir.join("control").join(name).exists(),
            "control/{name} is removed on exit"
        );
    }
    let leftovers: Vec<String> = listdir(&run_dir)
        .into_iter()
        .filter(|n| n.starts_with(miner_contract::layout::TMP_PREFIX))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    say("both services stopped cleanly");
}
