//! Online commands: gRPC to trainer-svc and chainsync-svc, on one host or a whole fleet
//! (concurrently, each host with its own time limit). Every call carries the caller's trace
//! context (W3C `traceparent`) and, when known, the control token.

use std::time::{Duration, Instant};

use miner_proto::chainsync::v1 as cpb;
use miner_proto::common::v1 as common;
use miner_proto::trainer::v1 as tpb;
use miner_service::TraceContextInterceptor;
use serde::Serialize;
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::cli::{Command, TargetArgs, Which};
use crate::exit::{CliError, Exit};
use crate::fleet::{Host, ServiceTarget, Slot};

type Svc = InterceptedService<Channel, TraceContextInterceptor>;
type TrainerClient = tpb::trainer_client::TrainerClient<Svc>;
type ChainClient = cpb::chain_sync_client::ChainSyncClient<Svc>;

const TRAINER: &str = "trainer-svc";
const CHAINSYNC: &str = "chainsync-svc";

/// A failure talking to one service: a one-line hint and an exit code.
#[derive(Debug, Clone)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure {
            exit,
            message: message.into(),
        }
    }
}

/// Maps a gRPC status to a one-line hint.
pub fn hint(binary: &str, uri: &str, s: &tonic::Status) -> Failure {
    use tonic::Code as C;
    let msg = s.message().replace('\n', " ");
    match s.code() {
        C::Unavailable => Failure::new(
            Exit::Unavailable,
            format!("Unavailable: is {binary} running at {uri}?"),
        ),
        C::Unauthenticated | C::PermissionDenied => Failure::new(
            Exit::NoPerm,
            format!(
                "Unauthenticated: {binary} at {uri} needs the control token ({msg}); pass --path RUN or --token-file FILE"
            ),
        ),
        C::DeadlineExceeded | C::Cancelled => Failure::new(
            Exit::TempFail,
            format!("DeadlineExceeded: {binary} at {uri} did not answer in time"),
        ),
        C::Unimplemented => Failure::new(
            Exit::Protocol,
            format!("Unimplemented: {uri} does not serve {binary}'s API (wrong port?)"),
        ),
        C::NotFound => Failure::new(Exit::Other, format!("NotFound: {binary} at {uri}: {msg}")),
        c => Failure::new(Exit::Protocol, format!("{c:?}: {binary} at {uri}: {msg}")),
    }
}

/// Whether `uri` is plain `http://` to a host that is not loopback (where a token would cross
/// the network in plaintext).
fn plaintext_off_loopback(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

async fn channel(binary: &str, t: &ServiceTarget, timeout: Duration) -> Result<Channel, Failure> {
    // The control token never crosses the network in plaintext.
    if t.token.is_some() && plaintext_off_loopback(&t.uri) {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "refusing to send the control token in plaintext to {}: use https:// with --ca FILE (the service needs --tls-cert/--tls-key), or a loopback address",
                t.uri
            ),
        ));
    }
    let mut ep = Endpoint::from_shared(t.uri.clone())
        .map_err(|e| Failure::new(Exit::Usage, format!("bad address {}: {e}", t.uri)))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if t.uri.starts_with("https://") {
        let Some(ca) = &t.ca else {
            return Err(Failure::new(
                Exit::Usage,
                format!(
                    "{} uses TLS: pass --ca FILE (or `ca` in the hosts file)",
                    t.uri
                ),
            ));
        };
        let tls = miner_service::listen::client_tls(ca, t.tls_domain.as_deref())
            .map_err(|e| Failure::new(Exit::NoInput, e.to_string()))?;
        ep = ep
            .tls_config(tls)
            .map_err(|e| Failure::new(Exit::Usage, format!("TLS for {}: {e}", t.uri)))?;
    }
    match tokio::time::timeout(timeout, ep.connect()).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => {
            // The innermost cause reads best ("Connection refused (os error 111)").
            let mut detail = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                detail = s.to_string();
                src = s.source();
            }
            Err(Failure::new(
                Exit::Unavailable,
                format!("Unavailable: is {binary} running at {}? ({detail})", t.uri),
            ))
        }
        Err(_) => Err(Failure::new(
            Exit::TempFail,
            format!(
                "DeadlineExceeded: no connection to {binary} at {} within {timeout:?}",
                t.uri
            ),
        )),
    }
}

/// A connected (or failed) service of one host.
enum Conn<C> {
    Up(C, ServiceTarget),
    NotConfigured,
    Down(Failure),
}

impl<C> Conn<C> {
    fn uri(&self) -> Option<&str> {
        match self {
            Conn::Up(_, t) => Some(&t.uri),
            _ => None,
        }
    }
}

/// Connects `slot` and wraps the channel in a client (`make`) that carries the trace context
/// and the slot's token.
async fn connect<C>(
    service: &str,
    slot: &Slot,
    timeout: Duration,
    make: impl FnOnce(Channel, TraceContextInterceptor) -> C,
) -> Conn<C> {
    match slot {
        Slot::None => Conn::NotConfigured,
        Slot::Down(why) => Conn::Down(Failure::new(Exit::Unavailable, why.clone())),
        Slot::Target(t) => match channel(service, t, timeout).await {
            Ok(ch) => Conn::Up(
                make(ch, TraceContextInterceptor::with_token(t.token.as_ref())),
                t.clone(),
            ),
            Err(f) => Conn::Down(f),
        },
    }
}

async fn connect_trainer(slot: &Slot, timeout: Duration) -> Conn<TrainerClient> {
    connect(
        TRAINER,
        slot,
        timeout,
        tpb::trainer_client::TrainerClient::with_interceptor,
    )
    .await
}

async fn connect_chainsync(slot: &Slot, timeout: Duration) -> Conn<ChainClient> {
    connect(
        CHAINSYNC,
        slot,
        timeout,
        cpb::chain_sync_client::ChainSyncClient::with_interceptor,
    )
    .await
}

/// What one host produced.
struct HostOutput {
    host: String,
    json: Value,
    text: String,
    failures: Vec<Failure>,
}

fn timeout_of(t: &TargetArgs) -> Result<Duration, CliError> {
    if !(t.timeout.is_finite() && t.timeout > 0.0) {
        return Err(CliError::new(
            Exit::Usage,
            "--timeout must be a positive number of seconds",
        ));
    }
    Ok(Duration::from_secs_f64(t.timeout))
}

/// Entry point of every online command.
pub fn run(cmd: Command) -> Result<(), CliError> {
    let target = match &cmd {
        Command::Status(a) => &a.online.target,
        Command::Checkpoints(a) => &a.target,
        Command::Stop(a) => &a.online.target,
        Command::Phase(a) => &a.online.target,
        Command::Jobs(a) => &a.online.target,
        Command::LoadBaseline(a) => &a.online.target,
        Command::Checkpoint(_) | Command::Hub(_) | Command::Completions { .. } => {
            return Err(CliError::new(Exit::Other, "not an online command"));
        }
    };
    let hosts = crate::fleet::resolve(target)?;
    let timeout = timeout_of(target)?;
    let otlp = target.otlp_endpoint.clone().filter(|e| !e.is_empty());
    // Everything minerctl does is waiting on a few connections: one thread is enough and
    // starts fastest. The OTLP exporter flushes from its own thread after the command has run
    // (`telemetry.shutdown()` below), which needs runtime threads of its own.
    let mut builder = if otlp.is_some() {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = builder
        .enable_all()
        .build()
        .map_err(|e| CliError::new(Exit::Other, format!("start the async runtime: {e}")))?;
    let telemetry = {
        let _enter = rt.enter();
        miner_service::init_tracing_with_filter(
            "minerctl",
            miner_service::LogFormat::Text,
            otlp,
            "warn",
        )
        .map_err(|e| CliError::new(Exit::Usage, e.to_string()))?
    };
    let result = match &cmd {
        Command::Status(a) if a.watch => rt.block_on(status_watch(a, target, hosts, timeout)),
        _ => rt.block_on(run_async(cmd, hosts, timeout)),
    };
    telemetry.shutdown();
    result
}

fn command_name(cmd: &Command) -> &'static str {
    match cmd {
        Command::Status(_) => "status",
        Command::Stop(_) => "stop",
        Command::Phase(_) => "phase",
        Command::Checkpoints(_) => "checkpoints",
        Command::Jobs(_) => "jobs",
        Command::LoadBaseline(_) => "load-baseline",
        _ => "other",
    }
}

async fn run_async(cmd: Command, hosts: Vec<Host>, timeout: Duration) -> Result<(), CliError> {
    let name = command_name(&cmd);
    let root =
        tracing::info_span!("minerctl", otel.name = %format!("minerctl {name}"), command = name);
    let json = match &cmd {
        Command::Status(a) => a.online.json,
        Command::Checkpoints(a) => a.json,
        Command::Stop(a) => a.online.json,
        Command::Phase(a) => a.online.json,
        Command::Jobs(a) => a.online.json,
        Command::LoadBaseline(a) => a.online.json,
        _ => false,
    };
    let multi = hosts.len() > 1;
    let futs = hosts.into_iter().map(|h| {
        let cmd = &cmd;
        let span = tracing::info_span!(parent: &root, "host", otel.name = %format!("minerctl {name} {}", h.name), host = %h.name);
        async move {
            let hostname = h.name.clone();
            let limited = !matches!(cmd, Command::Stop(_))
                && !matches!(cmd, Command::Phase(a) if a.watch);
            let fut = one_host(cmd, h, timeout, multi);
            if limited {
                match tokio::time::timeout(timeout + Duration::from_secs(1), fut).await {
                    Ok(o) => o,
                    Err(_) => HostOutput {
                        host: hostname.clone(),
                        json: json!({}),
                        text: String::new(),
                        failures: vec![Failure::new(
                            Exit::TempFail,
                            format!("DeadlineExceeded: {hostname} did not answer within {timeout:?}"),
                        )],
                    },
                }
            } else {
                fut.await
            }
        }
        .instrument(span)
    });
    let outputs = futures::future::join_all(futs).await;
    drop(root);

    let mut stdout = String::new();
    if json {
        stdout = serde_json::to_string_pretty(&outputs_json(&outputs)).unwrap_or_default();
        stdout.push('\n');
    } else {
        for o in &outputs {
            stdout.push_str(&o.text);
        }
    }
    print!("{stdout}");
    outcome(outputs, multi)
}

/// The hosts' JSON documents as one array, each with its `host` and `errors`.
fn outputs_json(outputs: &[HostOutput]) -> Value {
    Value::Array(
        outputs
            .iter()
            .map(|o| {
                let mut v = o.json.clone();
                if let Value::Object(m) = &mut v {
                    m.insert("host".into(), json!(o.host));
                    m.insert(
                        "errors".into(),
                        json!(
                            o.failures
                                .iter()
                                .map(|f| f.message.clone())
                                .collect::<Vec<_>>()
                        ),
                    );
                }
                v
            })
            .collect(),
    )
}

/// The command's result from the hosts' failures: the one failure of a single host as is;
/// several listed on stderr (per host) and the most actionable exit code.
fn outcome(outputs: Vec<HostOutput>, multi: bool) -> Result<(), CliError> {
    let failures: Vec<(String, Failure)> = outputs
        .into_iter()
        .flat_map(|o| {
            let h = o.host;
            o.failures.into_iter().map(move |f| (h.clone(), f))
        })
        .collect();
    match failures.len() {
        0 => Ok(()),
        1 if !multi => {
            let (_, f) = failures.into_iter().next().expect("one failure");
            Err(CliError::new(f.exit, f.message))
        }
        n => {
            let mut exit = failures[0].1.exit;
            for (h, f) in &failures {
                eprintln!("minerctl: {h}: {}", f.message.replace('\n', " "));
                exit = exit.worse(f.exit);
            }
            Err(CliError::new(exit, format!("{n} failure(s), see above")))
        }
    }
}

async fn one_host(cmd: &Command, h: Host, timeout: Duration, multi: bool) -> HostOutput {
    let mut out = HostOutput {
        host: h.name.clone(),
        json: json!({}),
        text: String::new(),
        failures: Vec::new(),
    };
    let prefix = if multi {
        format!("{}: ", h.name)
    } else {
        String::new()
    };
    match cmd {
        Command::Status(_) => status(&h, timeout, &mut out).await,
        Command::Stop(a) => stop(&h, a, timeout, &prefix, &mut out).await,
        Command::Phase(a) => phase(&h, a.watch, timeout, &prefix, &mut out).await,
        Command::Checkpoints(_) => checkpoints(&h, timeout, &prefix, &mut out).await,
        Command::Jobs(a) => jobs(&h, a.limit, timeout, &prefix, &mut out).await,
        Command::LoadBaseline(a) => load_baseline(&h, a, timeout, &prefix, &mut out).await,
        _ => {}
    }
    out
}

fn need<'a, C>(
    conn: &'a mut Conn<C>,
    binary: &str,
    out: &mut HostOutput,
) -> Option<(&'a mut C, ServiceTarget)> {
    match conn {
        Conn::Up(c, t) => Some((c, t.clone())),
        Conn::Down(f) => {
            out.failures.push(f.clone());
            None
        }
        Conn::NotConfigured => {
            out.failures.push(Failure::new(
                Exit::Usage,
                format!(
                    "no {binary} address for {} (pass --path, --{} or a hosts entry)",
                    out.host,
                    binary.trim_end_matches("-svc")
                ),
            ));
            None
        }
    }
}

// ---------------------------------------------------------------- status

#[derive(Debug, Default, Serialize)]
struct TrainerView {
    address: Option<String>,
    reachable: bool,
    error: Option<String>,
    state: Option<String>,
    step: Option<u64>,
    inner_opt_step: Option<u64>,
    loss: Option<f64>,
    val_loss: Option<f64>,
    tokens_per_sec: Option<f64>,
    baseline_version: Option<u64>,
    baseline_name: Option<String>,
    last_checkpoint: Option<String>,
    device: Option<String>,
    own_checkpoints: Option<usize>,
    validator_checkpoints: Option<usize>,
}

#[derive(Debug, Default, Serialize)]
struct JobView {
    kind: String,
    outcome: String,
    phase: String,
    cycle_index: u64,
    checkpoint: String,
    model_hash: String,
    destination: String,
    finished_block: u64,
    error: String,
    /// Hub transport: repo, revision and bytes of the shard's transfer.
    #[serde(skip_serializing_if = "String::is_empty")]
    hf_repo: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    hf_revision: String,
    #[serde(skip_serializing_if = "is_zero")]
    bytes_done: u64,
    #[serde(skip_serializing_if = "is_zero")]
    bytes_total: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Default, Serialize)]
struct ChainView {
    address: Option<String>,
    reachable: bool,
    error: Option<String>,
    phase: Option<String>,
    block: Option<u64>,
    blocks_left: Option<u64>,
    cycle_index: Option<u64>,
    last_download: Option<JobView>,
    last_commit: Option<JobView>,
    last_submission: Option<JobView>,
    /// The newest job with a Hub upload (COMMIT1 uploads the shard; repo, revision, bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_upload: Option<JobView>,
    checkpoints: Option<usize>,
}

fn state_name(s: i32) -> String {
    tpb::TrainerState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("TRAINER_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| format!("state {s}"))
}

fn job_view(j: &cpb::Job) -> JobView {
    JobView {
        kind: cpb::JobKind::try_from(j.kind)
            .map(|k| k.as_str_name().trim_start_matches("JOB_KIND_").to_string())
            .unwrap_or_default(),
        outcome: cpb::JobOutcome::try_from(j.outcome)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("JOB_OUTCOME_")
                    .to_string()
            })
            .unwrap_or_default(),
        phase: j.phase.clone(),
        cycle_index: j.cycle_index,
        checkpoint: j.checkpoint.clone(),
        model_hash: j.model_hash.clone(),
        destination: j.destination.clone(),
        finished_block: j.finished_block,
        error: j.error.clone(),
        hf_repo: j.hf_repo.clone(),
        hf_revision: j.hf_revision.clone(),
        bytes_done: j.bytes_done,
        bytes_total: j.bytes_total,
    }
}

/// ` hub REPO@REV (DONE/TOTAL bytes)` for a job with a Hub transfer, else empty.
fn fmt_hub(repo: &str, rev: &str, done: u64, total: u64) -> String {
    if repo.is_empty() {
        return String::new();
    }
    let mut s = format!(" hub {repo}");
    if !rev.is_empty() {
        s.push_str(&format!("@{rev}"));
    }
    if total > 0 {
        s.push_str(&format!(" ({done}/{total} bytes)"));
    } else if done > 0 {
        s.push_str(&format!(" ({done} bytes)"));
    }
    s
}

async fn trainer_view(conn: &mut Conn<TrainerClient>) -> (TrainerView, Option<Failure>) {
    let mut v = TrainerView {
        address: conn.uri().map(str::to_string),
        ..Default::default()
    };
    let (c, t) = match conn {
        Conn::Up(c, t) => (c, t),
        Conn::Down(f) => {
            v.error = Some(f.message.clone());
            return (v, Some(f.clone()));
        }
        Conn::NotConfigured => return (v, None),
    };
    let (st, list) = {
        let mut c2 = c.clone();
        tokio::join!(
            c.get_status(tpb::GetStatusRequest {}),
            c2.list_checkpoints(tpb::ListCheckpointsRequest {})
        )
    };
    match st {
        Ok(s) => {
            let s = s.into_inner();
            v.reachable = true;
            v.state = Some(state_name(s.state));
            v.step = Some(s.step);
            v.inner_opt_step = Some(s.inner_opt_step);
            v.loss = Some(s.loss);
            v.val_loss = s.val_loss;
            v.tokens_per_sec = Some(s.tokens_per_sec);
            v.baseline_version = Some(s.baseline_version);
            v.baseline_name = Some(s.baseline_name);
            v.last_checkpoint = Some(s.last_checkpoint);
            v.device = Some(s.device);
        }
        Err(e) => {
            let f = hint(TRAINER, &t.uri, &e);
            v.error = Some(f.message.clone());
            return (v, Some(f));
        }
    }
    if let Ok(l) = list {
        let l = l.into_inner().checkpoints;
        let own = common::CheckpointOrigin::Own as i32;
        v.own_checkpoints = Some(l.iter().filter(|c| c.origin == own).count());
        v.validator_checkpoints = Some(l.iter().filter(|c| c.origin != own).count());
    }
    (v, None)
}

async fn chain_view(conn: &mut Conn<ChainClient>) -> (ChainView, Option<Failure>) {
    let mut v = ChainView {
        address: conn.uri().map(str::to_string),
        ..Default::default()
    };
    let (c, t) = match conn {
        Conn::Up(c, t) => (c, t),
        Conn::Down(f) => {
            v.error = Some(f.message.clone());
            return (v, Some(f.clone()));
        }
        Conn::NotConfigured => return (v, None),
    };
    let (phase, jobs, list) = {
        let mut c2 = c.clone();
        let mut c3 = c.clone();
        tokio::join!(
            c.get_phase(cpb::GetPhaseRequest {}),
            c2.get_jobs(cpb::GetJobsRequest { limit: 0 }),
            c3.list_checkpoints(cpb::ListCheckpointsRequest {})
        )
    };
    match phase {
        Ok(p) => {
            let p = p.into_inner();
            v.reachable = true;
            v.phase = Some(p.name);
            v.block = Some(p.block);
            v.blocks_left = Some(p.blocks_remaining);
            v.cycle_index = Some(p.cycle_index);
        }
        Err(e) => {
            let f = hint(CHAINSYNC, &t.uri, &e);
            v.error = Some(f.message.clone());
            return (v, Some(f));
        }
    }
    if let Ok(j) = jobs {
        let jobs = j.into_inner().jobs;
        let find = |kinds: &[cpb::JobKind]| {
            jobs.iter()
                .find(|j| kinds.iter().any(|k| *k as i32 == j.kind))
                .map(job_view)
        };
        v.last_download = find(&[cpb::JobKind::Download]);
        v.last_commit = find(&[cpb::JobKind::Commit1, cpb::JobKind::Commit2]);
        v.last_submission = find(&[cpb::JobKind::Submit]);
        v.last_upload = jobs
            .iter()
            .find(|j| j.kind == cpb::JobKind::Commit1 as i32 && !j.hf_repo.is_empty())
            .map(job_view);
    }
    if let Ok(l) = list {
        v.checkpoints = Some(l.into_inner().checkpoints.len());
    }
    (v, None)
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), |x| x.to_string())
}

fn fmt_job(j: &Option<JobView>) -> String {
    match j {
        None => "-".into(),
        Some(j) => {
            let mut s = format!(
                "{} {} (cycle {}, {})",
                j.kind, j.outcome, j.cycle_index, j.phase
            );
            if !j.checkpoint.is_empty() {
                s.push_str(&format!(" {}", j.checkpoint));
            }
            s.push_str(&fmt_hub(
                &j.hf_repo,
                &j.hf_revision,
                j.bytes_done,
                j.bytes_total,
            ));
            if !j.error.is_empty() {
                s.push_str(&format!(": {}", j.error));
            }
            s
        }
    }
}

/// The open connections of one host's pair (kept across `status --watch` refreshes).
struct PairConns {
    trainer: Conn<TrainerClient>,
    chainsync: Conn<ChainClient>,
}

/// Connects to both services of `h` at once.
async fn connect_pair(h: &Host, timeout: Duration) -> PairConns {
    let (trainer, chainsync) = tokio::join!(
        connect_trainer(&h.trainer, timeout),
        connect_chainsync(&h.chainsync, timeout)
    );
    PairConns { trainer, chainsync }
}

/// One `status` of one host: connect to both services concurrently, query, render.
async fn status(h: &Host, timeout: Duration, out: &mut HostOutput) {
    let started = Instant::now();
    let mut conns = connect_pair(h, timeout).await;
    status_query(h, &mut conns, started, out).await;
}

/// Queries both services of `h` over `conns` (all calls concurrently) and renders the table
/// and the JSON; `round_trip_ms` is the time since `started`. Returns whether the trainer's
/// and the chainsync's part failed.
async fn status_query(
    h: &Host,
    conns: &mut PairConns,
    started: Instant,
    out: &mut HostOutput,
) -> (bool, bool) {
    let ((tv, tf), (cv, cf)) = tokio::join!(
        trainer_view(&mut conns.trainer),
        chain_view(&mut conns.chainsync)
    );
    let round_trip_ms = started.elapsed().as_secs_f64() * 1e3;
    let failed = (tf.is_some(), cf.is_some());
    out.failures.extend(tf);
    out.failures.extend(cf);
    let mut t = format!("== {}\n", h.name);
    let up = |reachable: bool, addr: &Option<String>, err: &Option<String>| match (reachable, err) {
        (true, _) => format!("up at {}", opt(addr)),
        (false, Some(e)) => format!("UNREACHABLE: {e}"),
        (false, None) => "not configured".into(),
    };
    t.push_str(&format!(
        "  {:<15}{}\n",
        "trainer-svc",
        up(tv.reachable, &tv.address, &tv.error)
    ));
    if tv.reachable {
        t.push_str(&format!(
            "  {:<15}{}  step {}  inner_opt {}  loss {}  val_loss {}  tokens/s {}\n",
            "training",
            opt(&tv.state),
            opt(&tv.step),
            opt(&tv.inner_opt_step),
            tv.loss.map_or("-".into(), |x| format!("{x:.4}")),
            tv.val_loss.map_or("-".into(), |x| format!("{x:.4}")),
            tv.tokens_per_sec.map_or("-".into(), |x| format!("{x:.1}")),
        ));
        t.push_str(&format!(
            "  {:<15}version {}  {}\n",
            "baseline",
            opt(&tv.baseline_version),
            tv.baseline_name
                .as_deref()
                .filter(|s| !s.is_empty())
                .unwrap_or("(none)")
        ));
        t.push_str(&format!(
            "  {:<15}own {}  validator {}  last {}\n",
            "checkpoints",
            opt(&tv.own_checkpoints),
            opt(&tv.validator_checkpoints),
            tv.last_checkpoint
                .as_deref()
                .filter(|s| !s.is_empty())
                .unwrap_or("-")
        ));
    }
    t.push_str(&format!(
        "  {:<15}{}\n",
        "chainsync-svc",
        up(cv.reachable, &cv.address, &cv.error)
    ));
    if cv.reachable {
        t.push_str(&format!(
            "  {:<15}{}  block {}  blocks left {}  cycle {}\n",
            "phase",
            opt(&cv.phase),
            opt(&cv.block),
            opt(&cv.blocks_left),
            opt(&cv.cycle_index)
        ));
        t.push_str(&format!(
            "  {:<15}{}\n",
            "last download",
            fmt_job(&cv.last_download)
        ));
        t.push_str(&format!(
            "  {:<15}{}\n",
            "last commit",
            fmt_job(&cv.last_commit)
        ));
        t.push_str(&format!(
            "  {:<15}{}\n",
            "last submission",
            fmt_job(&cv.last_submission)
        ));
        if cv.last_upload.is_some() {
            t.push_str(&format!(
                "  {:<15}{}\n",
                "last upload",
                fmt_job(&cv.last_upload)
            ));
        }
    }
    t.push_str(&format!("  {:<15}{round_trip_ms:.1} ms\n", "round trip"));
    out.text = t;
    out.json = json!({ "trainer": tv, "chainsync": cv, "round_trip_ms": round_trip_ms });
    failed
}

/// `status --watch`: refreshes every `--interval` over connections kept open between
/// refreshes (a service whose call failed is reconnected, after re-reading the run directory or
/// fleet file, at the next refresh). Text is redrawn on a terminal; `--json` prints one line
/// per refresh. Ends on Ctrl-C (exit 0) or after `--count` refreshes (the last one's status).
async fn status_watch(
    a: &crate::cli::StatusArgs,
    target: &TargetArgs,
    mut hosts: Vec<Host>,
    timeout: Duration,
) -> Result<(), CliError> {
    use std::io::{IsTerminal, Write};
    if !(a.interval.is_finite() && a.interval >= 0.0) {
        return Err(CliError::new(
            Exit::Usage,
            "--interval must be a number of seconds >= 0",
        ));
    }
    let interval = Duration::from_secs_f64(a.interval);
    let json = a.online.json;
    let tty = std::io::stdout().is_terminal();
    let mut trainers: Vec<Option<Conn<TrainerClient>>> = hosts.iter().map(|_| None).collect();
    let mut chains: Vec<Option<Conn<ChainClient>>> = hosts.iter().map(|_| None).collect();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut refresh = 0u64;
    loop {
        let tick = Instant::now();
        refresh += 1;
        // A service that failed last time: its address may have changed (a restart binds a
        // new port and rewrites the endpoints file), so resolve again before reconnecting.
        if refresh > 1
            && (trainers.iter().any(Option::is_none) || chains.iter().any(Option::is_none))
            && let Ok(fresh) = crate::fleet::resolve(target)
        {
            if fresh.len() != hosts.len() {
                trainers = fresh.iter().map(|_| None).collect();
                chains = fresh.iter().map(|_| None).collect();
            }
            hosts = fresh;
        }
        let multi = hosts.len() > 1;
        let root = tracing::info_span!(
            "minerctl",
            otel.name = "minerctl status",
            command = "status",
            refresh
        );
        let futs = hosts
            .iter()
            .zip(trainers.iter_mut().zip(chains.iter_mut()))
            .map(|(h, (tc, cc))| {
                let span = tracing::info_span!(parent: &root, "host", otel.name = %format!("minerctl status {}", h.name), host = %h.name);
                async move {
                    let mut out = HostOutput {
                        host: h.name.clone(),
                        json: json!({}),
                        text: String::new(),
                        failures: Vec::new(),
                    };
                    let started = Instant::now();
                    let query = async {
                        let (t, c) = tokio::join!(
                            async {
                                match tc.take() {
                                    Some(c) => c,
                                    None => connect_trainer(&h.trainer, timeout).await,
                                }
                            },
                            async {
                                match cc.take() {
                                    Some(c) => c,
                                    None => connect_chainsync(&h.chainsync, timeout).await,
                                }
                            }
                        );
                        let mut conns = PairConns {
                            trainer: t,
                            chainsync: c,
                        };
                        let failed = status_query(h, &mut conns, started, &mut out).await;
                        (conns, failed)
                    };
                    match tokio::time::timeout(timeout + Duration::from_secs(1), query).await {
                        Ok((conns, (t_failed, c_failed))) => {
                            // Keep what answered; reconnect the rest next time.
                            if !t_failed {
                                *tc = Some(conns.trainer);
                            }
                            if !c_failed {
                                *cc = Some(conns.chainsync);
                            }
                        }
                        Err(_) => out.failures.push(Failure::new(
                            Exit::TempFail,
                            format!("DeadlineExceeded: {} did not answer within {timeout:?}", h.name),
                        )),
                    }
                    out
                }
                .instrument(span)
            });
        let outputs = futures::future::join_all(futs).await;
        drop(root);
        let mut stdout = String::new();
        if json {
            stdout = serde_json::to_string(&outputs_json(&outputs)).unwrap_or_default();
            stdout.push('\n');
        } else {
            if tty {
                stdout.push_str("\x1b[H\x1b[2J");
            }
            stdout.push_str(&format!(
                "minerctl status --watch: refresh {refresh}, every {:?} (Ctrl-C to stop)\n",
                interval
            ));
            for o in &outputs {
                stdout.push_str(&o.text);
            }
        }
        {
            let mut so = std::io::stdout().lock();
            if so
                .write_all(stdout.as_bytes())
                .and_then(|_| so.flush())
                .is_err()
            {
                // The reader went away (`| head`): nothing more to show.
                return Ok(());
            }
        }
        if a.count != 0 && refresh >= a.count {
            return outcome(outputs, multi);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval.saturating_sub(tick.elapsed())) => {}
            _ = &mut ctrl_c => return Ok(()),
        }
    }
}

// ---------------------------------------------------------------- stop

async fn wait_gone(t: &ServiceTarget, deadline: Instant) -> Result<(), String> {
    loop {
        let gone = match t.pid {
            Some(pid) => !miner_service::pid_alive(pid),
            None => {
                let hostport = t
                    .uri
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .trim_end_matches('/')
                    .to_string();
                tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(hostport),
                )
                .await
                .is_ok_and(|r| r.is_err())
            }
        };
        if gone {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(match t.pid {
                Some(pid) => format!("still running (pid {pid})"),
                None => format!("still listening at {}", t.uri),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stop(
    h: &Host,
    a: &crate::cli::StopArgs,
    timeout: Duration,
    prefix: &str,
    out: &mut HostOutput,
) {
    let wait = Duration::from_secs_f64(a.wait_timeout.max(0.0));
    let mut report = serde_json::Map::new();
    // A service the run directory shows as not running is already stopped.
    for (slot, which) in [
        (&h.trainer, Which::Trainer),
        (&h.chainsync, Which::Chainsync),
    ] {
        if let Slot::Down(why) = slot
            && (a.which == which || a.which == Which::All)
        {
            out.text
                .push_str(&format!("{prefix}{why}; nothing to stop\n"));
        }
    }
    if matches!(a.which, Which::Trainer | Which::All) && !matches!(h.trainer, Slot::Down(_)) {
        let mut conn = connect_trainer(&h.trainer, timeout).await;
        let skip = matches!(a.which, Which::All) && matches!(conn, Conn::NotConfigured);
        if !skip && let Some((c, target)) = need(&mut conn, TRAINER, out) {
            let uri = target.uri.clone();
            let final_save = !a.no_final_save;
            // Follow the status stream so the final checkpoint's name is known at the end.
            let mut watch = c.clone();
            match c.stop(tpb::StopRequest { final_save }).await {
                Err(e) => out.failures.push(hint(TRAINER, &uri, &e)),
                Ok(r) => {
                    let r = r.into_inner();
                    out.text
                        .push_str(&format!("{prefix}trainer-svc: {}\n", r.message));
                    let mut last = String::new();
                    if !a.no_wait {
                        let follow = async {
                            if let Ok(s) = watch
                                .watch_status(tpb::WatchStatusRequest { min_interval_ms: 0 })
                                .await
                            {
                                let mut s = s.into_inner();
                                while let Ok(Some(m)) = s.message().await {
                                    last = m.last_checkpoint;
                                }
                            }
                        };
                        let _ = tokio::time::timeout(wait, follow).await;
                        match wait_gone(&target, Instant::now() + wait).await {
                            Ok(()) => {
                                out.text.push_str(&format!(
                                    "{prefix}trainer-svc at {uri} exited{}\n",
                                    if final_save && !last.is_empty() {
                                        format!(" (final checkpoint {last})")
                                    } else {
                                        String::new()
                                    }
                                ));
                            }
                            Err(why) => out.failures.push(Failure::new(
                                Exit::TempFail,
                                format!("trainer-svc at {uri} accepted the stop but is {why} after {wait:?}"),
                            )),
                        }
                    }
                    report.insert(
                        "trainer".into(),
                        json!({"accepted": r.accepted, "message": r.message, "final_checkpoint": last}),
                    );
                }
            }
        }
    }
    if matches!(a.which, Which::Chainsync | Which::All) && !matches!(h.chainsync, Slot::Down(_)) {
        let mut conn = connect_chainsync(&h.chainsync, timeout).await;
        let skip = matches!(a.which, Which::All) && matches!(conn, Conn::NotConfigured);
        if !skip && let Some((c, target)) = need(&mut conn, CHAINSYNC, out) {
            let uri = target.uri.clone();
            match c.stop(cpb::StopRequest {}).await {
                Err(e) => out.failures.push(hint(CHAINSYNC, &uri, &e)),
                Ok(r) => {
                    let r = r.into_inner();
                    out.text
                        .push_str(&format!("{prefix}chainsync-svc: {}\n", r.message));
                    if !a.no_wait {
                        match wait_gone(&target, Instant::now() + wait).await {
                            Ok(()) => out
                                .text
                                .push_str(&format!("{prefix}chainsync-svc at {uri} exited\n")),
                            Err(why) => out.failures.push(Failure::new(
                                Exit::TempFail,
                                format!("chainsync-svc at {uri} accepted the stop but is {why} after {wait:?}"),
                            )),
                        }
                    }
                    report.insert(
                        "chainsync".into(),
                        json!({"accepted": r.accepted, "message": r.message}),
                    );
                }
            }
        }
    }
    out.json = Value::Object(report);
}

// ---------------------------------------------------------------- phase, checkpoints, jobs

fn phase_line(p: &cpb::Phase) -> String {
    format!(
        "{}  block {}  blocks left {}  ({}..{}, cycle {})",
        p.name, p.block, p.blocks_remaining, p.start_block, p.end_block, p.cycle_index
    )
}

async fn phase(h: &Host, watch: bool, timeout: Duration, prefix: &str, out: &mut HostOutput) {
    let mut conn = connect_chainsync(&h.chainsync, timeout).await;
    let Some((c, target)) = need(&mut conn, CHAINSYNC, out) else {
        return;
    };
    let uri = target.uri.clone();
    if !watch {
        match c.get_phase(cpb::GetPhaseRequest {}).await {
            Ok(p) => {
                let p = p.into_inner();
                out.text = format!("{prefix}{}\n", phase_line(&p));
                out.json = json!({"phase": p.name, "block": p.block, "blocks_left": p.blocks_remaining,
                    "start_block": p.start_block, "end_block": p.end_block, "cycle_index": p.cycle_index});
            }
            Err(e) => out.failures.push(hint(CHAINSYNC, &uri, &e)),
        }
        return;
    }
    match c.watch_phase(cpb::WatchPhaseRequest {}).await {
        Err(e) => out.failures.push(hint(CHAINSYNC, &uri, &e)),
        Ok(s) => {
            let mut s = s.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(p)) => println!("{prefix}{}", phase_line(&p)),
                    Ok(None) => break,
                    Err(e) => {
                        out.failures.push(hint(CHAINSYNC, &uri, &e));
                        break;
                    }
                }
            }
        }
    }
}

fn checkpoint_rows(list: &[common::Checkpoint], prefix: &str, source: &str) -> String {
    let mut t = format!("{prefix}{source}: {} checkpoint(s)\n", list.len());
    for c in list {
        let origin = if c.origin == common::CheckpointOrigin::Own as i32 {
            "own".to_string()
        } else {
            format!(
                "validator {}",
                c.validator_uid.map_or("-".into(), |u| u.to_string())
            )
        };
        let mut flags = Vec::new();
        if c.verified {
            flags.push("verified".to_string());
        }
        if !c.pinned_by.is_empty() {
            flags.push(format!("pinned by {}", c.pinned_by.join(",")));
        }
        if c.committed {
            flags.push("committed".into());
        }
        if c.submitted {
            flags.push("submitted".into());
        }
        t.push_str(&format!(
            "{prefix}  {:<40} {:<14} {:<48} {}\n",
            c.name,
            origin,
            if c.model_hash.is_empty() {
                "-"
            } else {
                &c.model_hash
            },
            flags.join(" ")
        ));
    }
    t
}

fn checkpoint_json(c: &common::Checkpoint) -> Value {
    json!({"name": c.name, "path": c.path, "own": c.origin == common::CheckpointOrigin::Own as i32,
        "global_ver": c.global_ver, "inner_opt": c.inner_opt, "validator_uid": c.validator_uid,
        "model_hash": c.model_hash, "verified": c.verified, "pinned_by": c.pinned_by,
        "committed": c.committed, "submitted": c.submitted, "size_bytes": c.size_bytes})
}

async fn checkpoints(h: &Host, timeout: Duration, prefix: &str, out: &mut HostOutput) {
    let (mut tc, mut cc) = tokio::join!(
        connect_trainer(&h.trainer, timeout),
        connect_chainsync(&h.chainsync, timeout)
    );
    let mut j = serde_json::Map::new();
    if let Some((c, target)) = need(&mut tc, TRAINER, out) {
        let uri = target.uri.clone();
        match c.list_checkpoints(tpb::ListCheckpointsRequest {}).await {
            Ok(l) => {
                let l = l.into_inner().checkpoints;
                out.text
                    .push_str(&checkpoint_rows(&l, prefix, "trainer-svc"));
                j.insert(
                    "trainer".into(),
                    Value::Array(l.iter().map(checkpoint_json).collect()),
                );
            }
            Err(e) => out.failures.push(hint(TRAINER, &uri, &e)),
        }
    }
    if !matches!(cc, Conn::NotConfigured)
        && let Some((c, target)) = need(&mut cc, CHAINSYNC, out)
    {
        let uri = target.uri.clone();
        match c.list_checkpoints(cpb::ListCheckpointsRequest {}).await {
            Ok(l) => {
                let l = l.into_inner().checkpoints;
                out.text
                    .push_str(&checkpoint_rows(&l, prefix, "chainsync-svc"));
                j.insert(
                    "chainsync".into(),
                    Value::Array(l.iter().map(checkpoint_json).collect()),
                );
            }
            Err(e) => out.failures.push(hint(CHAINSYNC, &uri, &e)),
        }
    }
    out.json = Value::Object(j);
}

async fn jobs(h: &Host, limit: u32, timeout: Duration, prefix: &str, out: &mut HostOutput) {
    let mut conn = connect_chainsync(&h.chainsync, timeout).await;
    let Some((c, target)) = need(&mut conn, CHAINSYNC, out) else {
        return;
    };
    let uri = target.uri.clone();
    match c.get_jobs(cpb::GetJobsRequest { limit }).await {
        Err(e) => out.failures.push(hint(CHAINSYNC, &uri, &e)),
        Ok(r) => {
            let jobs = r.into_inner().jobs;
            let views: Vec<JobView> = jobs.iter().map(job_view).collect();
            for (j, v) in jobs.iter().zip(&views) {
                out.text.push_str(&format!(
                    "{prefix}#{:<5} {:<9} {:<10} {:<8} cycle {:<5} blocks {}..{} {}{} {}\n",
                    j.id,
                    v.kind,
                    v.outcome,
                    v.phase,
                    v.cycle_index,
                    j.started_block,
                    j.finished_block,
                    if v.checkpoint.is_empty() {
                        "-"
                    } else {
                        &v.checkpoint
                    },
                    fmt_hub(&v.hf_repo, &v.hf_revision, v.bytes_done, v.bytes_total),
                    v.error
                ));
            }
            if jobs.is_empty() {
                out.text.push_str(&format!("{prefix}no jobs yet\n"));
            }
            out.json = json!({ "jobs": views });
        }
    }
}

async fn load_baseline(
    h: &Host,
    a: &crate::cli::LoadBaselineArgs,
    timeout: Duration,
    prefix: &str,
    out: &mut HostOutput,
) {
    match a.which {
        Which::Trainer | Which::All => {
            let mut conn = connect_trainer(&h.trainer, timeout).await;
            if let Some((c, target)) = need(&mut conn, TRAINER, out) {
                let uri = target.uri.clone();
                let req = tpb::LoadBaselineRequest {
                    name: a.name.clone().unwrap_or_default(),
                };
                match c.load_baseline(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        out.text
                            .push_str(&format!("{prefix}trainer-svc: {}\n", r.message));
                        out.json = json!({"trainer": {"message": r.message,
                            "loaded": r.loaded.as_ref().map(checkpoint_json)}});
                    }
                    Err(e) => out.failures.push(hint(TRAINER, &uri, &e)),
                }
            }
        }
        Which::Chainsync => {
            let mut conn = connect_chainsync(&h.chainsync, timeout).await;
            if let Some((c, target)) = need(&mut conn, CHAINSYNC, out) {
                let uri = target.uri.clone();
                match c.load_baseline(cpb::LoadBaselineRequest {}).await {
                    Ok(r) => {
                        let job = r.into_inner().job.map(|j| job_view(&j));
                        out.text.push_str(&format!(
                            "{prefix}chainsync-svc: started {}\n",
                            fmt_job(&job)
                        ));
                        out.json = json!({"chainsync": {"job": job}});
                    }
                    Err(e) => out.failures.push(hint(CHAINSYNC, &uri, &e)),
                }
            }
        }
    }
}
