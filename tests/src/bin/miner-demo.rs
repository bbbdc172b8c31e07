//! `miner-demo`: a miner through live cycles on the local devnet. Starts the devnet, the owner
//! phase API stand-in, two validator stand-ins (//Bob, //Charlie) that every cycle commit a
//! baseline (the miner's newest expert file, as a merge would give back) and verify
//! submissions against the chain, then trainer-svc and chainsync-svc as processes sharing one
//! run directory, and prints the state every few blocks until Ctrl-C, when it stops the
//! services (SIGTERM: final checkpoint) and the chain.
//!
//! `scripts/demo.sh` builds and runs it. Arguments: `[WORK_DIR]` (default: a temp dir),
//! env `DEMO_BLOCK_MS` (block interval, default 1000).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use chainsync_svc::chain::{ChainClient, Endpoint};
use chainsync_svc::phase::{PhaseName, PhaseSchedule};
use miner_contract::{ExpertGroup, RunDir};
use miner_keys::Hotkey;
use miner_proto::chainsync::v1 as cpb;
use miner_standins::{PhaseApiStandIn, ValidatorStandIn, ValidatorStandInConfig};
use miner_tests::*;
use serde_json::json;

fn sign_hex(key: &Hotkey, hex: &str) -> String {
    miner_keys::b64url_nopad_encode(&key.sign(hex.as_bytes()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let keep;
    let work: PathBuf = match std::env::args().nth(1) {
        Some(p) => {
            keep = None;
            PathBuf::from(p)
        }
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_path_buf();
            keep = Some(t);
            p
        }
    };
    std::fs::create_dir_all(&work)?;
    let block_ms: u64 = std::env::var("DEMO_BLOCK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    println!("work dir {}", work.display());
    println!("starting the devnet (first run: npm ci, 1-2 min)...");
    let port = free_port();
    let devnet = {
        let w = work.join("devnet");
        tokio::task::spawn_blocking(move || miner_devnet::Devnet::start(&w, port)).await??
    };
    println!("devnet on {}", devnet.ws_url());
    let p = short_periods();
    let sched = PhaseSchedule::new(p)?;
    let l = sched.cycle_length();
    let head = Arc::new(AtomicU64::new(devnet.head()?));
    let bob = Hotkey::from_uri("//Bob")?;
    let charlie = Hotkey::from_uri("//Charlie")?;
    devnet.set_storage(json!({"System": {"Account": [[[charlie.ss58()], {"providers": 1, "data": {"free": "1000000000000"}}]]}}))?;
    let h2 = head.clone();
    let phase_api = PhaseApiStandIn::start(
        owner_schedule(&p),
        Arc::new(move || h2.load(Ordering::SeqCst)),
        vec![bob.ss58().to_owned(), charlie.ss58().to_owned()],
    )
    .await?;
    let run_dir = create_run(
        &work,
        &RunSpec {
            ws_url: devnet.ws_url(),
            owner_url: phase_api.url(),
            periods: p,
            checkpoint_interval: 5,
        },
    )?;
    let run = RunDir::open(&run_dir)?;
    let group = ExpertGroup::load_dir(&run_dir.join("embedded"))?;
    let chain = Arc::new(ChainClient::connect(&Endpoint::Url(devnet.ws_url())).await?);

    // Validators: serve `baseline.shard` (the miner's newest shard, `.safetensors` or `.pt`,
    // replaced atomically each cycle), check submissions against the miner's commitments on chain.
    let serve = work.join("baseline.shard");
    let lookup = chain_lookup(chain.clone(), head.clone(), sched.clone());
    let mut validators = Vec::new();
    for (uri, key) in [("//Bob", &bob), ("//Charlie", &charlie)] {
        let h = head.clone();
        let v = ValidatorStandIn::start(ValidatorStandInConfig {
            hotkey: Hotkey::from_uri(uri)?,
            serve_file: Some(serve.clone()),
            submission_dir: work.join(format!("submissions{}", uri.replace('/', "_"))),
            max_submission_bytes: 1 << 30,
            block: Arc::new(move || h.load(Ordering::SeqCst)),
            schedule: owner_schedule(&p),
            check_phase: true,
            assignment: None,
            chain_checkpoint: lookup.clone(),
            expert_group: Some(group.clone()),
        })
        .await?;
        devnet.set_storage(
            json!({"SubtensorModule": {"Axons": [[[NETUID, key.ss58()], {
                "block": 1, "version": 1, "ip": "2130706433", "port": v.port(),
                "ipType": 4, "protocol": 4, "placeholder1": "0x00", "placeholder2": "0x00"
            }]]}}),
        )?;
        validators.push(v);
    }

    let ports = Ports::free();
    let mut trainer = Service::spawn(
        "trainer-svc",
        trainer_command(&run_dir, &ports)?,
        &work.join("trainer.log"),
    )?;
    let mut chainsync = Service::spawn(
        "chainsync-svc",
        chainsync_command(&run_dir, &ports)?,
        &work.join("chainsync.log"),
    )?;
    println!(
        "run dir {}\ntrainer-svc  gRPC 127.0.0.1:{}  log {}\nchainsync-svc gRPC 127.0.0.1:{}  log {}",
        run_dir.display(),
        ports.trainer_grpc,
        trainer.log.display(),
        ports.chainsync_grpc,
        chainsync.log.display()
    );
    let now = devnet.head()?;
    devnet
        .set_storage(json!({"SubtensorModule": {"LastUpdate": [[[NETUID], [now, now, now]]]}}))?;
    let _ticker = Ticker::start(devnet.port(), head.clone(), Duration::from_millis(block_ms));
    println!("cycle length {l} blocks, one block every {block_ms} ms; Ctrl-C to stop");

    let mut last_block = 0;
    let mut committed: Option<(u64, String)> = None; // (cycle, hash) of the validators' VC1
    let mut revealed: Option<u64> = None; // cycle of the validators' last VC2
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if !trainer.running() || !chainsync.running() {
                anyhow::bail!(
                    "a service ended:\n--- trainer ---\n{}\n--- chainsync ---\n{}",
                    trainer.log_tail(15),
                    chainsync.log_tail(15)
                );
            }
            let h = head.load(Ordering::SeqCst);
            if h == last_block {
                continue;
            }
            last_block = h;
            let info = sched.phase_at(h);
            let k = info.cycle_index;
            // The validators' commits: VC1 {"m"} of the newest miner expert file, VC2 {"h","v","e"}.
            if info.phase_name == PhaseName::ValidatorCommit1
                && committed.as_ref().is_none_or(|(c, _)| *c != k)
                && let Some(best) = run.best_own().ok().flatten()
            {
                let src = best
                    .model_path()
                    .context("best checkpoint has a manifest")?;
                let tmp = work.join(".baseline.tmp");
                if std::fs::copy(&src, &tmp).is_ok() {
                    let hash = miner_contract::shard::hash_shard_file(&src)?.to_hex();
                    std::fs::rename(&tmp, &serve)?;
                    let mb = format!(r#"{{"m":"{}"}}"#, sign_hex(&bob, &hash));
                    let mc = format!(r#"{{"m":"{}"}}"#, sign_hex(&charlie, &hash));
                    let (r1, r2) = tokio::join!(
                        chain.set_commitment(&bob, NETUID, mb.as_bytes()),
                        chain.set_commitment(&charlie, NETUID, mc.as_bytes())
                    );
                    r1.context("VC1 //Bob")?;
                    r2.context("VC1 //Charlie")?;
                    println!("  validators: ValidatorCommit1 of baseline {hash}");
                    committed = Some((k, hash));
                }
            }
            if info.phase_name == PhaseName::ValidatorCommit2
                && revealed != Some(k)
                && let Some((c, hash)) = committed.as_ref().filter(|(c, _)| *c == k)
            {
                let v = c * l + sched.phase_offset(PhaseName::MinerCommit1);
                let text = format!(r#"{{"h":"{hash}","v":{v},"e":0}}"#);
                let (r1, r2) = tokio::join!(
                    chain.set_commitment(&bob, NETUID, text.as_bytes()),
                    chain.set_commitment(&charlie, NETUID, text.as_bytes())
                );
                r1.context("VC2 //Bob")?;
                r2.context("VC2 //Charlie")?;
                println!("  validators: ValidatorCommit2 {text}");
                revealed = Some(k);
            }
            if h.is_multiple_of(3) || info.phase_start_block == h {
                print_status(h, &info, &ports).await;
            }
        }
        Ok(())
    }
    .await;

    println!("stopping...");
    trainer.signal("TERM");
    chainsync.signal("TERM");
    let ts = trainer.wait_for(Duration::from_secs(60));
    let cs = chainsync.wait_for(Duration::from_secs(60));
    println!("trainer-svc exit {ts:?}, chainsync-svc exit {cs:?}");
    let subs: usize = validators.iter().map(|v| v.submissions().len()).sum();
    println!("accepted submissions: {subs}");
    if let Some(t) = keep {
        println!("(work dir removed)");
        drop(t);
    }
    drop(devnet);
    result
}

async fn print_status(h: u64, info: &chainsync_svc::phase::PhaseInfo, ports: &Ports) {
    let st = trainer_status(ports.trainer_grpc).await;
    let jobs = chainsync_jobs(ports.chainsync_grpc)
        .await
        .unwrap_or_default();
    let train = st.map_or_else(
        || "trainer: starting".to_owned(),
        |s| {
            format!(
                "trainer: step {} inner {} loss {:.3} baseline v{} last {}",
                s.step, s.inner_opt_step, s.loss, s.baseline_version, s.last_checkpoint
            )
        },
    );
    let last_jobs: Vec<String> = jobs
        .iter()
        .take(4)
        .map(|j| {
            format!(
                "{}#{}:{}",
                cpb::JobKind::try_from(j.kind)
                    .map_or("?", |k| k.as_str_name().trim_start_matches("JOB_KIND_")),
                j.cycle_index,
                cpb::JobOutcome::try_from(j.outcome)
                    .map_or("?", |o| o.as_str_name().trim_start_matches("JOB_OUTCOME_"))
            )
        })
        .collect();
    println!(
        "block {h} cycle {} {:<16} | {train} | jobs {}",
        info.cycle_index,
        info.phase_name.as_str(),
        last_jobs.join(" ")
    );
}
