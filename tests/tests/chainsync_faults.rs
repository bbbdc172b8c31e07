//! chainsync-svc killed (SIGKILL) in the middle of a baseline download, on the real devnet:
//! no unverified baseline is ever visible, nothing of the dead process stays pinned, and the
//! restarted process gets the baseline in the next window it has.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chainsync_svc::chain::{ChainClient, Endpoint};
use chainsync_svc::phase::{PhaseName, PhaseSchedule};
use miner_contract::pt::{DType, Tensor};
use miner_contract::{CheckpointKind, ExpertGroup, RunDir};
use miner_keys::Hotkey;
use miner_proto::chainsync::v1 as cpb;
use miner_standins::{Faults, PhaseApiStandIn, ValidatorStandIn, ValidatorStandInConfig};
use miner_tests::*;
use serde_json::json;

/// A baseline of the embedded group: experts 0..3 of layer 1, ~100 KB.
fn baseline() -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    for e in 0..3u16 {
        for (name, rows, cols) in [("gate_up_proj", 64, 128), ("down_proj", 128, 64)] {
            let mut data = Vec::with_capacity(rows * cols * 2);
            for i in 0..rows * cols {
                let v: u16 = 0x3000 | ((i as u16).wrapping_mul(31).wrapping_add(e) & 0x03FF);
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

fn sign_hex(key: &Hotkey, hex: &str) -> String {
    miner_keys::b64url_nopad_encode(&key.sign(hex.as_bytes()))
}

async fn validators_commit(
    chain: &ChainClient,
    head: &AtomicU64,
    sched: &PhaseSchedule,
    keys: [&Hotkey; 2],
    vhash: &str,
) {
    let (vc1_start, _) = wait_for_phase(
        head,
        sched,
        PhaseName::ValidatorCommit1,
        2,
        Duration::from_secs(60),
    )
    .await;
    let k = vc1_start / sched.cycle_length();
    let v = k * sched.cycle_length() + sched.phase_offset(PhaseName::MinerCommit1);
    for key in keys {
        let m = format!(r#"{{"m":"{}"}}"#, sign_hex(key, vhash));
        chain
            .set_commitment(key, NETUID, m.as_bytes())
            .await
            .unwrap();
    }
    wait_for_phase(
        head,
        sched,
        PhaseName::ValidatorCommit2,
        2,
        Duration::from_secs(30),
    )
    .await;
    let text = format!(r#"{{"h":"{vhash}","v":{v},"e":0}}"#);
    for key in keys {
        chain
            .set_commitment(key, NETUID, text.as_bytes())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_a_download_leaves_no_unverified_baseline_and_the_restart_gets_it() {
    let t0 = Instant::now();
    let say = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let d: &'static miner_devnet::Devnet = tokio::task::spawn_blocking(miner_devnet::shared)
        .await
        .expect("devnet");
    let p = short_periods();
    let sched = PhaseSchedule::new(p).unwrap();
    let l = sched.cycle_length();
    let head = Arc::new(AtomicU64::new(d.head().unwrap()));
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
            checkpoint_interval: 1,
        },
    )
    .unwrap();
    let run = RunDir::open(&run_dir).unwrap();
    let group = ExpertGroup::load_dir(&run_dir.join("embedded")).unwrap();
    let vfile = tmp.path().join("baseline.pt");
    let vhash = miner_contract::pt::write_pt_tensors(&vfile, &baseline(), &Default::default())
        .unwrap()
        .to_hex();
    let mut validators = Vec::new();
    for (uri, key) in [("//Bob", &bob), ("//Charlie", &charlie)] {
        let h = head.clone();
        let v = ValidatorStandIn::start(ValidatorStandInConfig {
            hotkey: Hotkey::from_uri(uri).unwrap(),
            serve_file: Some(vfile.clone()),
            submission_dir: tmp.path().join(format!("sub{}", uri.replace('/', "_"))),
            max_submission_bytes: 1 << 30,
            block: Arc::new(move || h.load(Ordering::SeqCst)),
            schedule: owner_schedule(&p),
            check_phase: true,
            assignment: None,
            chain_checkpoint: Arc::new(|_: &str| None),
            expert_group: Some(group.clone()),
        })
        .await
        .unwrap();
        // The download hangs after a few KB.
        v.set_faults(Faults {
            stall_after_bytes: Some(4096),
            ..Default::default()
        });
        d.set_storage(
            json!({"SubtensorModule": {"Axons": [[[NETUID, key.ss58()], {
                "block": 1, "version": 1, "ip": "2130706433", "port": v.port(),
                "ipType": 4, "protocol": 4, "placeholder1": "0x00", "placeholder2": "0x00"
            }]]}}),
        )
        .unwrap();
        validators.push(v);
    }
    let chain = ChainClient::connect(&Endpoint::Url(d.ws_url()))
        .await
        .unwrap()
        .with_tx_timeout(Duration::from_secs(30));

    // A watcher: no validator checkpoint is ever visible unverified.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, run_dir) = (stop.clone(), run_dir.clone());
        std::thread::spawn(move || {
            let run = RunDir::open(&run_dir).unwrap();
            while !stop.load(Ordering::SeqCst) {
                for e in run.list().unwrap_or_default() {
                    if e.kind == CheckpointKind::Validator && !e.is_verified() && e.path.exists() {
                        return Err(format!("{} visible while {:?}", e.dir_name, e.state));
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        })
    };

    let ports = Ports::free();
    let log = tmp.path().join("chainsync.log");
    let mut cs = Service::spawn(
        "chainsync-svc",
        chainsync_command(&run_dir, &ports).unwrap(),
        &log,
    )
    .unwrap();
    wait_some("chainsync's gRPC", Duration::from_secs(30), || {
        chainsync_jobs(ports.chainsync_grpc)
    })
    .await;
    let h0 = d.head().unwrap();
    let k0 = scenario::validator_commit_cycle(&sched, h0);
    // Jump to the block before ValidatorCommit1 of cycle k0.
    let target = k0 * l + sched.phase_offset(PhaseName::ValidatorCommit1) - 1;
    d.new_blocks(u32::try_from(target - h0).unwrap()).unwrap();
    let now = d.head().unwrap();
    head.store(now, Ordering::SeqCst);
    d.set_storage(json!({"SubtensorModule": {"LastUpdate": [[[NETUID], [now, now, now]]]}}))
        .unwrap();
    let ticker = Ticker::start(d.port(), head.clone(), Duration::from_millis(1000));
    validators_commit(&chain, &head, &sched, [&bob, &charlie], &vhash).await;
    say(&format!("validators committed in cycle {k0}"));

    // Cycle k0+1: the download starts and stalls; SIGKILL.
    wait_some("a download request", Duration::from_secs(40), || {
        let n: u64 = validators.iter().map(|v| v.download_requests()).sum();
        async move { (n >= 1).then_some(()) }
    })
    .await;
    let vdir = run_dir.join(miner_contract::layout::VALIDATOR_DIR);
    wait_some(
        "the partial download on disk",
        Duration::from_secs(10),
        || {
            let staging = listdir(&vdir)
                .iter()
                .any(|n| n.starts_with(miner_contract::layout::TMP_PREFIX));
            async move { staging.then_some(()) }
        },
    )
    .await;
    let dead_pid = cs.pid();
    cs.signal("KILL");
    assert!(cs.wait_for(Duration::from_secs(10)).is_some());
    say(&format!(
        "killed chainsync (pid {dead_pid}) during the download"
    ));
    assert!(
        run.best_validator().unwrap().is_none(),
        "no baseline after a killed download"
    );

    // Restart with healthy validators: the baseline arrives in the next window it has.
    for v in &validators {
        v.set_faults(Faults::default());
    }
    let mut cs = Service::spawn(
        "chainsync-svc",
        chainsync_command(&run_dir, &ports).unwrap(),
        &log,
    )
    .unwrap();
    let k1 = k0 + 1;
    let got_early = tokio::time::timeout(Duration::from_secs(20), async {
        wait_some("a download", Duration::from_secs(20), || {
            let b = run.best_validator().ok().flatten();
            async move { b }
        })
        .await
    })
    .await
    .is_ok();
    if !got_early {
        // Past this cycle's Distribute: the validators commit again for the next one.
        validators_commit(&chain, &head, &sched, [&bob, &charlie], &vhash).await;
    }
    let vbest = wait_some("a verified baseline", Duration::from_secs(60), || {
        let b = run.best_validator().ok().flatten();
        async move { b }
    })
    .await;
    say(&format!("baseline {} after the restart", vbest.dir_name));
    assert!(vbest.is_verified());
    assert_eq!(vbest.manifest.as_ref().unwrap().model_hash.to_hex(), vhash);
    let jobs = chainsync_jobs(ports.chainsync_grpc).await.expect("jobs");
    let dl = jobs
        .iter()
        .find(|j| {
            j.kind == cpb::JobKind::Download as i32
                && j.outcome == cpb::JobOutcome::Succeeded as i32
        })
        .expect("a successful download job");
    assert!(dl.cycle_index >= k1, "{dl:#?}");
    assert_eq!(dl.model_hash, vhash);
    let pins = run.pins().unwrap();
    assert!(
        pins.iter().all(|p| p.pid != dead_pid),
        "pins of the killed process are reclaimed: {pins:#?}"
    );
    cs.signal("TERM");
    let st = cs.wait_for(Duration::from_secs(60)).expect("exits");
    assert_eq!(st.code(), Some(0), "{}", cs.log_tail(30));
    drop(ticker);
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        listdir(&vdir),
        vec![vbest.dir_name.clone()],
        "the killed download left nothing behind"
    );
    say("done");
}
