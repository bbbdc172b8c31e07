//! The jobs' traces, as a real OpenTelemetry collector (rotel) receives them: each job is a span
//! `job <kind>` with `block`, `phase`, `cycle` and `hash` attributes, and its HTTP calls (phase
//! API, `GET /get-checkpoint`) and chain calls (commitment reads, `set_commitment`) are child
//! spans of it in the same trace.
//!
//! The daemon runs in-process against the real devnet with OTLP export to rotel, a
//! `PhaseApiStandIn` (short schedule) and one `ValidatorStandIn` (//Bob, whitelisted), which
//! committed a baseline in the cycle before. In the next cycle the daemon downloads it
//! (DOWNLOAD) and commits its own checkpoint (COMMIT1); then it stops and the spans are read
//! from rotel's debug output.

mod cycle_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chainsync_svc::config::LogFormat;
use chainsync_svc::phase::PhaseName;
use cycle_support::*;
use miner_keys::Hotkey;
use miner_proto::chainsync::v1 as pb;
use miner_standins::ValidatorStandInConfig;

/// rotel's agent: env `ROTEL_AGENT`, else `<workspace>/.deps/rotel/rotel-agent`
/// (`scripts/setup-rotel.sh`).
fn rotel_agent() -> PathBuf {
    let p = std::env::var_os("ROTEL_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/rotel/rotel-agent")
        });
    assert!(
        p.is_file(),
        "no rotel collector at {} (run scripts/setup-rotel.sh or set ROTEL_AGENT)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    // Never the same port twice in this process (consecutive bind(0)s can repeat one).
    miner_devnet::free_port().expect("free port")
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One span of rotel's detailed debug log.
#[derive(Debug, Clone, Default)]
struct SpanRow {
    service: String,
    trace: String,
    id: String,
    parent: String,
    name: String,
    attrs: BTreeMap<String, String>,
}

/// Spans from rotel's detailed debug log (resource `service.name`, ids, name, attributes).
fn parse_rotel_debug(log: &str) -> Vec<SpanRow> {
    let mut out: Vec<SpanRow> = Vec::new();
    let mut service = String::new();
    let mut cur = SpanRow::default();
    let mut in_span = false;
    for line in log.lines() {
        let t = line.trim();
        if let Some(s) = t.strip_prefix("-> service.name: Str(") {
            service = s.trim_end_matches(')').to_string();
            continue;
        }
        if let Some(rest) = t.strip_prefix("-> ") {
            if in_span && let Some((k, v)) = rest.split_once(": ") {
                // `Str(x)`, `Int(5)`, `Bool(true)`: keep the inner value.
                let v = v
                    .split_once('(')
                    .map(|(_, inner)| inner.strip_suffix(')').unwrap_or(inner))
                    .unwrap_or(v);
                cur.attrs.insert(k.to_string(), v.to_string());
            }
            continue;
        }
        let Some((k, v)) = t.split_once(':') else {
            continue;
        };
        let v = v.trim().to_string();
        match k.trim() {
            "Trace ID" => {
                if in_span {
                    out.push(std::mem::take(&mut cur));
                }
                in_span = true;
                cur.service = service.clone();
                cur.trace = v;
            }
            "Parent ID" => cur.parent = v,
            "ID" => cur.id = v,
            "Name" => cur.name = v,
            _ => {}
        }
    }
    if in_span {
        out.push(cur);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_job_is_a_span_with_its_http_and_chain_calls_as_children() {
    // --- the collector, and this process exporting to it -----------------------------------
    let tmp = tempfile::tempdir().unwrap();
    let grpc = free_port();
    let debug = tmp.path().join("rotel.out");
    let mut rotel = KillOnDrop(
        Command::new(rotel_agent())
            .args([
                "start",
                "--otlp-grpc-endpoint",
                &format!("127.0.0.1:{grpc}"),
                "--otlp-http-endpoint",
                &format!("127.0.0.1:{}", free_port()),
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
                "--log-file",
                tmp.path().join("rotel.log").to_str().unwrap(),
            ])
            .stdout(std::fs::File::create(&debug).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(rotel.0.try_wait().unwrap().is_none(), "rotel exited");
        assert!(Instant::now() < deadline, "rotel does not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let telemetry = miner_service::init_tracing(
        "chainsync-svc",
        LogFormat::Text,
        Some(format!("http://127.0.0.1:{grpc}")),
    )
    .expect("tracing with OTLP export");

    // --- devnet, stand-ins, a baseline committed by //Bob in cycle k -------------------------
    let bed = Devbed::start(Duration::from_millis(300)).await;
    let (d, sched) = (bed.d, &bed.sched);
    let l = sched.cycle_length();
    let bob = Hotkey::from_uri("//Bob").unwrap();
    assert_eq!(bob.ss58(), BOB);

    let vfile = tmp.path().join("validator_model.pt");
    let vhash = miner_contract::pt::write_pt_tensors(&vfile, &shard(100), &Default::default())
        .unwrap()
        .to_hex();
    let run_dir = tmp.path().join("run");
    let run = create_run(&run_dir, d.ws_url(), "spantest", &periods());
    let phase_api = phase_api(&bed.head, vec![BOB.to_owned()]).await;

    let (vc1_start, _) = bed.wait_for_phase(PhaseName::ValidatorCommit1, 2).await;
    let k = vc1_start / l;
    let v_base = k * l + sched.phase_offset(PhaseName::MinerCommit1);
    bed.commit_all(&[(&bob, vc1_text(&bob, &vhash))]).await;
    let own_hash = publish_own(&run, v_base - 1, 5, 7);
    let validator = start_validator(ValidatorStandInConfig {
        check_phase: true,
        ..validator_config("//Bob", &vfile, &tmp.path().join("submissions"), &bed.head)
    })
    .await;
    seed_axon(d, BOB, validator.port());
    bed.wait_for_phase(PhaseName::ValidatorCommit2, 1).await;
    bed.commit_all(&[(&bob, vc2_text(&vhash, v_base))]).await;

    // --- the daemon through DOWNLOAD and COMMIT1 of cycle k+1 ------------------------------
    let fast = retry_policy(Duration::from_secs(5), 2, Duration::from_millis(200));
    let daemon = Daemon::start(&owner_api_cli(&run_dir, phase_api.url()), fast).await;
    let mut client = daemon.client().await;
    let c1 = k + 1;
    let start = Instant::now();
    let jobs = loop {
        let jobs = jobs_of(&mut client).await;
        let done = |kind: pb::JobKind| {
            jobs.iter().any(|j| {
                j.kind == kind as i32
                    && j.cycle_index == c1
                    && j.outcome != pb::JobOutcome::Running as i32
            })
        };
        if done(pb::JobKind::Download) && done(pb::JobKind::Commit1) {
            break jobs;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "DOWNLOAD and COMMIT1 of cycle {c1} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for j in jobs.iter().filter(|j| j.cycle_index == c1) {
        assert_eq!(j.outcome, pb::JobOutcome::Succeeded as i32, "{j:#?}");
    }
    daemon.stop().await;
    // Export what is buffered, then let rotel flush its debug output (SIGTERM).
    telemetry.shutdown();
    let st = Command::new("kill")
        .args(["-TERM", &rotel.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while rotel.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "rotel did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // --- the span tree ----------------------------------------------------------------------
    let log = std::fs::read_to_string(&debug).unwrap();
    let spans = parse_rotel_debug(&log);
    let job_span = |name: &str| {
        spans
            .iter()
            .find(|s| {
                s.service == "chainsync-svc"
                    && s.name == name
                    && s.attrs.get("cycle") == Some(&c1.to_string())
            })
            .unwrap_or_else(|| panic!("no {name:?} span of cycle {c1} in rotel's output:\n{log}"))
            .clone()
    };
    let children = |parent: &SpanRow| -> Vec<SpanRow> {
        spans
            .iter()
            .filter(|s| s.trace == parent.trace && s.parent == parent.id)
            .cloned()
            .collect()
    };

    let dl = job_span("job download");
    assert_eq!(dl.attrs["phase"], "Distribute", "{dl:#?}");
    assert_eq!(dl.attrs["hash"], vhash, "{dl:#?}");
    assert_eq!(dl.attrs["outcome"], "SUCCEEDED", "{dl:#?}");
    let block: u64 = dl.attrs["block"].parse().expect("block attribute");
    assert_eq!(sched.phase_at(block).cycle_index, c1, "{dl:#?}");
    let kids = children(&dl);
    let names: Vec<&str> = kids.iter().map(|s| s.name.as_str()).collect();
    let get = kids
        .iter()
        .find(|s| s.name == "GET /get-checkpoint")
        .unwrap_or_else(|| panic!("no GET /get-checkpoint child of the download job: {names:?}"));
    assert_eq!(get.attrs["http.response.status_code"], "200", "{get:#?}");
    assert!(
        get.attrs["url.full"].ends_with(&format!(":{}/get-checkpoint", validator.port())),
        "{get:#?}"
    );
    for want in [
        "GET /previous_phase_blocks",
        "GET /get_validator_whitelist",
        "chain commitments",
        "chain metagraph",
    ] {
        assert!(
            names.contains(&want),
            "the download job lacks a {want:?} child: {names:?}"
        );
    }

    let c1_span = job_span("job commit1");
    assert_eq!(c1_span.attrs["phase"], "MinerCommit1", "{c1_span:#?}");
    assert_eq!(c1_span.attrs["hash"], own_hash, "{c1_span:#?}");
    let kids = children(&c1_span);
    let set = kids
        .iter()
        .find(|s| s.name == "chain set_commitment")
        .unwrap_or_else(|| panic!("no set_commitment child of the commit job: {kids:#?}"));
    let included: u64 = set.attrs["included_block"].parse().expect("included block");
    assert_eq!(sched.phase_at(included - 1).cycle_index, c1, "{set:#?}");
    assert_ne!(dl.trace, c1_span.trace, "each job is its own trace");
}
