//! `minerctl` online commands as an operator runs them: the real minerctl binary against a real
//! trainer-svc process (the binary built next to this test: `cargo build -p trainer-svc`, or
//! env `TRAINER_SVC_BIN`). Traces go to `OtlpCollectorStandIn`, an in-process OTLP/gRPC trace
//! receiver standing in for an OpenTelemetry collector (none installs and runs here).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use miner_service::Endpoints;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;

const MINERCTL: &str = env!("CARGO_BIN_EXE_minerctl");

fn trainer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TRAINER_SVC_BIN") {
        return PathBuf::from(p);
    }
    // <target>/debug/deps/online-xxxx → <target>/debug/trainer-svc
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("trainer-svc");
    assert!(
        p.is_file(),
        "no trainer-svc binary at {} (run `cargo build -p trainer-svc` with the same target dir, or set TRAINER_SVC_BIN)",
        p.display()
    );
    p
}

/// One exported span: (service.name, trace id, span id, parent span id, name).
type SpanRow = (String, Vec<u8>, Vec<u8>, Vec<u8>, String);

/// Stands in for an OpenTelemetry collector: accepts OTLP/gRPC trace exports on loopback and
/// keeps every span with its resource's `service.name`.
#[derive(Clone, Default)]
struct OtlpCollectorStandIn {
    spans: Arc<Mutex<Vec<SpanRow>>>,
}

#[tonic::async_trait]
impl TraceService for OtlpCollectorStandIn {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((
                        service.clone(),
                        s.trace_id,
                        s.span_id,
                        s.parent_span_id,
                        s.name,
                    ));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpCollectorStandIn {
    /// Serves on 127.0.0.1:0 on `rt`; returns the collector and its endpoint URL.
    fn start(rt: &tokio::runtime::Runtime) -> (OtlpCollectorStandIn, String) {
        let c = OtlpCollectorStandIn::default();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(c.clone());
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream_wrapper(listener)),
        );
        (c, format!("http://{addr}"))
    }
}

fn tokio_stream_wrapper(
    l: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A run directory selecting trainer-svc's embedded tiny setup with small, fast knobs.
fn small_run_dir(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let yaml = "task:\n  expert_group_name: embedded\n  exp:\n    data:\n      sequence_length: 32\n      per_device_train_batch_size: 2\n\
         local_par:\n  gradient_accumulation_steps: 2\n\
         log:\n  metric_interval: 1000\n  eval_batches: 2\n\
         ckpt:\n  checkpoint_interval: 1000\n  validator_poll_secs: 0.0\n\
         opt:\n  lr: 0.01\n";
    std::fs::write(run.join("config.yaml"), yaml).unwrap();
    run
}

fn minerctl(args: &[&str]) -> Output {
    Command::new(MINERCTL)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run minerctl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn trainer_step(run: &Path) -> u64 {
    let out = minerctl(&["status", "--json", "--path", run.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    v[0]["trainer"]["inner_opt_step"].as_u64().unwrap_or(0)
}

fn wait_step(run: &Path, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = trainer_step(run);
        if s > above {
            return s;
        }
        assert!(Instant::now() < deadline, "trainer stuck at step {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn operator_session_status_refused_stop_fleet_and_graceful_stop_in_one_trace() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (collector, otlp) = OtlpCollectorStandIn::start(&rt);
    let tmp = tempfile::tempdir().unwrap();
    let run = small_run_dir(tmp.path());
    let run_s = run.to_str().unwrap().to_string();
    let mut child = KillOnDrop(
        Command::new(trainer_bin())
            .args([
                "--device",
                "cpu",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--otlp-endpoint",
                &otlp,
                "--path",
                &run_s,
            ])
            .env("OMP_NUM_THREADS", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let ep = loop {
        if let Ok(Some(e)) = Endpoints::read(&run, "trainer")
            && e.pid == child.0.id()
        {
            break e;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "trainer-svc exited early"
        );
        assert!(Instant::now() < deadline, "no endpoints file");
        std::thread::sleep(Duration::from_millis(50));
    };
    let step = wait_step(&run, 0);

    // status --path: the trainer's step; chainsync is not running (exit 69, shown in the table).
    let out = minerctl(&["status", "--path", &run_s]);
    let so = text(&out.stdout);
    assert_eq!(out.status.code(), Some(69), "{so}{}", text(&out.stderr));
    assert!(
        so.contains("trainer-svc    up at http://127.0.0.1:"),
        "{so}"
    );
    assert!(so.contains("inner_opt "), "{so}");
    assert!(
        so.contains("chainsync-svc  UNREACHABLE: chainsync-svc is not running"),
        "{so}"
    );

    // stop without the token is refused and changes nothing.
    let addr = ep.dial_addr().to_string();
    let out = minerctl(&["stop", "trainer", "--trainer", &addr]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("minerctl: Unauthenticated: trainer-svc at"),
        "{err}"
    );
    let later = wait_step(&run, step);
    assert!(later > step);
    assert!(child.0.try_wait().unwrap().is_none(), "the trainer stopped");

    // A fleet with one unreachable host: both reported, exit non-zero.
    let hosts = tmp.path().join("fleet.toml");
    std::fs::write(
        &hosts,
        format!(
            "[[hosts]]\nname = \"good\"\ntrainer = \"{addr}\"\n\n[[hosts]]\nname = \"gone\"\ntrainer = \"127.0.0.1:1\"\nchainsync = \"127.0.0.1:1\"\n"
        ),
    )
    .unwrap();
    let out = minerctl(&[
        "status",
        "--hosts",
        hosts.to_str().unwrap(),
        "--timeout",
        "5",
    ]);
    let so = text(&out.stdout);
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{so}{se}");
    assert!(so.contains("== good\n  trainer-svc    up at"), "{so}");
    assert!(so.contains("== gone\n  trainer-svc    UNREACHABLE: Unavailable: is trainer-svc running at http://127.0.0.1:1?"), "{so}");
    assert!(se.contains("minerctl: gone: Unavailable"), "{se}");
    assert!(!se.contains("good:"), "{se}");
    // The same fleet as YAML, as JSON.
    let yaml = tmp.path().join("fleet.yaml");
    std::fs::write(
        &yaml,
        format!(
            "hosts:\n  - name: good\n    path: {run_s}\n  - name: gone\n    trainer: 127.0.0.1:1\n"
        ),
    )
    .unwrap();
    let out = minerctl(&["status", "--json", "--hosts", yaml.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(v[0]["trainer"]["reachable"].as_bool().unwrap());
    assert!(v[0]["trainer"]["inner_opt_step"].as_u64().unwrap() >= later);
    assert!(!v[1]["trainer"]["reachable"].as_bool().unwrap());

    // A graceful stop through the run directory: waits for the exit, names the final checkpoint.
    let out = minerctl(&[
        "stop",
        "trainer",
        "--path",
        &run_s,
        "--otlp-endpoint",
        &otlp,
    ]);
    let so = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{so}{}", text(&out.stderr));
    let exit = child.0.try_wait().unwrap().or_else(|| {
        std::thread::sleep(Duration::from_secs(2));
        child.0.try_wait().unwrap()
    });
    assert!(exit.is_some_and(|s| s.success()), "{exit:?} {so}");
    assert!(so.contains("trainer-svc at http://"), "{so}");
    let last = so
        .split("(final checkpoint ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_else(|| panic!("no final checkpoint named: {so}"));
    assert!(last.starts_with("globalver_0_inneropt_"), "{so}");
    assert!(run.join(last).join("MANIFEST.json").is_file(), "{so}");
    assert!(run.join("mycelia_final.pt").is_file());
    assert!(Endpoints::read(&run, "trainer").unwrap().is_none());

    // One trace links minerctl's stop span and trainer-svc's Stop span.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = collector.spans.lock().unwrap().clone();
        let linked = spans.iter().find(|(svc, tid, _, parent, name)| {
            svc == "trainer-svc"
                && name.ends_with("/Stop")
                && spans
                    .iter()
                    .any(|(s2, t2, id2, _, _)| s2 == "minerctl" && t2 == tid && id2 == parent)
        });
        if linked.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no trainer-svc Stop span whose parent is a minerctl span: {:?}",
            spans
                .iter()
                .map(|(s, _, _, _, n)| format!("{s}:{n}"))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts trainer-svc on `run` (loopback, any port) and waits for its endpoints file.
fn start_trainer(run: &Path) -> (KillOnDrop, Endpoints) {
    let mut child = KillOnDrop(
        Command::new(trainer_bin())
            .args(["--device", "cpu", "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0", "--path"])
            .arg(run)
            .env("OMP_NUM_THREADS", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(e)) = Endpoints::read(run, "trainer")
            && e.pid == child.0.id()
        {
            return (child, e);
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "trainer-svc exited early"
        );
        assert!(Instant::now() < deadline, "no endpoints file");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `minerctl status --watch --json` lines until one satisfies `pred` (60 s at most).
fn watch_until(
    lines: &std::sync::mpsc::Receiver<String>,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) => {
                let v: serde_json::Value = serde_json::from_str(&l)
                    .unwrap_or_else(|e| panic!("not one JSON document per line ({e}): {l}"));
                if pred(&v[0]) {
                    return v[0].clone();
                }
                last = l;
            }
            Err(_) => panic!("--watch never showed {what}; last refresh: {last}"),
        }
    }
}

#[test]
fn status_watch_refreshes_over_open_connections_and_follows_a_restarted_trainer() {
    let tmp = tempfile::tempdir().unwrap();
    let run = small_run_dir(tmp.path());
    let run_s = run.to_str().unwrap().to_string();

    // Nothing running: --count refreshes, one JSON line each, the last refresh's exit status.
    let out = minerctl(&[
        "status",
        "--watch",
        "--interval",
        "0",
        "--count",
        "3",
        "--json",
        "--path",
        &run_s,
    ]);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    let so = text(&out.stdout);
    assert_eq!(so.lines().count(), 3, "{so}");
    for l in so.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v[0]["trainer"]["reachable"], false, "{l}");
    }

    let (mut first, ep1) = start_trainer(&run);
    let addr1 = format!("http://{}", ep1.dial_addr());
    let mut watch = KillOnDrop(
        Command::new(MINERCTL)
            .args([
                "status",
                "--watch",
                "--interval",
                "0.05",
                "--json",
                "--path",
            ])
            .arg(&run)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = watch.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    // It follows the training as it goes, with each refresh's round-trip time.
    let a = watch_until(&lines, "a training step", |v| {
        v["trainer"]["inner_opt_step"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(a["trainer"]["address"], addr1.as_str(), "{a}");
    assert!(a["round_trip_ms"].as_f64().unwrap() > 0.0, "{a}");
    let step = a["trainer"]["inner_opt_step"].as_u64().unwrap();
    watch_until(&lines, "the step advancing", |v| {
        v["trainer"]["inner_opt_step"].as_u64().unwrap_or(0) > step
    });

    // The trainer goes away: shown as unreachable, the watch goes on.
    let st = Command::new("kill")
        .args(["-TERM", &first.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(first.0.wait().unwrap().success());
    watch_until(&lines, "the trainer unreachable", |v| {
        v["trainer"]["reachable"] == false
    });
    // A new trainer on another port: found again through the run directory.
    let (_second, ep2) = start_trainer(&run);
    let addr2 = format!("http://{}", ep2.dial_addr());
    assert_ne!(addr1, addr2);
    let b = watch_until(&lines, "the restarted trainer", |v| {
        v["trainer"]["reachable"] == true
    });
    assert_eq!(b["trainer"]["address"], addr2.as_str(), "{b}");
    assert!(watch.0.try_wait().unwrap().is_none(), "--watch exited");

    // Ctrl-C ends it cleanly.
    let st = Command::new("kill")
        .args(["-INT", &watch.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = watch.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "--watch did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn bad_targets_and_completions() {
    let tmp = tempfile::tempdir().unwrap();
    // No target at all: a usage error.
    let out = minerctl(&["status"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--path RUN"));
    // A malformed fleet file names the file.
    let f = tmp.path().join("fleet.toml");
    std::fs::write(&f, "[[hosts]]\nname = 3\n").unwrap();
    let out = minerctl(&["status", "--hosts", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(65));
    assert!(text(&out.stderr).contains(f.to_str().unwrap()));
    // A run directory without services: both reported as not running.
    let out = minerctl(&["status", "--path", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(69));
    assert!(text(&out.stdout).contains("trainer-svc is not running"));
    // Stopping what is not running succeeds and says so.
    let out = minerctl(&["stop", "--path", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).matches("nothing to stop").count(), 2);
    // Completions for the three shells.
    for sh in ["bash", "zsh", "fish"] {
        let out = minerctl(&["completions", sh]);
        assert!(out.status.success());
        let s = text(&out.stdout);
        assert!(
            s.contains("load-baseline") && s.contains("checkpoint"),
            "{sh}"
        );
    }
}

/// rotel's agent (a real OpenTelemetry collector): env `ROTEL_AGENT`, else
/// `<workspace>/.deps/rotel/rotel-agent` from `scripts/setup-rotel.sh`.
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

/// `N` distinct free loopback ports (all bound at once, so the kernel cannot repeat one).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// Spans from rotel's detailed debug log: (service.name, trace id, span id, parent id, name).
fn parse_rotel_debug(log: &str) -> Vec<SpanRow> {
    let mut out = Vec::new();
    let mut service = String::new();
    let (mut trace, mut parent, mut id) = (String::new(), String::new(), String::new());
    for line in log.lines() {
        let t = line.trim();
        if let Some(s) = t.strip_prefix("-> service.name: Str(") {
            service = s.trim_end_matches(')').to_string();
        }
        let Some((k, v)) = t.split_once(':') else {
            continue;
        };
        let v = v.trim().to_string();
        match k.trim() {
            "Trace ID" => trace = v,
            "Parent ID" => parent = v,
            "ID" => id = v,
            "Name" => out.push((
                service.clone(),
                trace.clone().into_bytes(),
                id.clone().into_bytes(),
                parent.clone().into_bytes(),
                v,
            )),
            _ => {}
        }
    }
    out
}

#[test]
fn a_real_rotel_collector_receives_one_trace_linking_minerctl_stop_and_the_trainer() {
    let tmp = tempfile::tempdir().unwrap();
    let [grpc, http] = free_ports();
    let debug = tmp.path().join("rotel.out");
    let mut rotel = KillOnDrop(
        Command::new(rotel_agent())
            .args([
                "start",
                "--otlp-grpc-endpoint",
                &format!("127.0.0.1:{grpc}"),
                "--otlp-http-endpoint",
                &format!("127.0.0.1:{http}"),
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
    // Wait until the collector accepts connections.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(rotel.0.try_wait().unwrap().is_none(), "rotel exited");
        assert!(Instant::now() < deadline, "rotel does not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let otlp = format!("http://127.0.0.1:{grpc}");
    let run = small_run_dir(tmp.path());
    let run_s = run.to_str().unwrap().to_string();
    let mut child = KillOnDrop(
        Command::new(trainer_bin())
            .args([
                "--device",
                "cpu",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--otlp-endpoint",
                &otlp,
                "--path",
                &run_s,
            ])
            .env("OMP_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_step(&run, 0);
    let out = minerctl(&[
        "stop",
        "trainer",
        "--path",
        &run_s,
        "--otlp-endpoint",
        &otlp,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "trainer-svc did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Both processes flushed on exit; SIGTERM makes rotel flush its debug output too.
    let st = Command::new("kill")
        .args(["-TERM", &rotel.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while rotel.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "rotel did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&debug).unwrap();
    let spans = parse_rotel_debug(&log);
    let stop = spans
        .iter()
        .find(|(svc, _, _, _, name)| {
            svc == "trainer-svc" && name == "/miner.trainer.v1.Trainer/Stop"
        })
        .unwrap_or_else(|| panic!("no trainer-svc Stop span in rotel's output:\n{log}"));
    let parent = spans
        .iter()
        .find(|(svc, tid, id, _, _)| svc == "minerctl" && *tid == stop.1 && *id == stop.3)
        .unwrap_or_else(|| panic!("the Stop span's parent is not a minerctl span:\n{log}"));
    assert!(parent.4.starts_with("minerctl stop"), "{}", parent.4);
}
