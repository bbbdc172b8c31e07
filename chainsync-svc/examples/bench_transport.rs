//! Benchmark of the validator HTTP transport on loopback, against curl, on a real `.pt`
//! checkpoint (fp16 routed-expert tensors of `exp_math`, written with `write_pt`):
//!
//! 1. Submission (`POST /submit-checkpoint`): our `submit_checkpoint` against `curl -F` posting
//!    the same file with the same multipart fields (a valid request: same signatures), to
//!    (a) a `ValidatorStandIn` (multipart parse, sha256, store, fsync, then hash/signature
//!    verification; identical work for both clients) and (b) a raw HTTP sink that only
//!    streams the body to a file and fsyncs (so the client's own cost is not diluted by the
//!    server's verification). Also the peak RSS growth of this process during our upload
//!    (`/proc/self/clear_refs` + `VmHWM`, as `tests/transport_submit_memory.rs`).
//! 2. Download (`GET /get-checkpoint` from the stand-in): our `download_checkpoint`
//!    (download + verify while streaming + publish) against `curl -o` of the same route,
//!    against our client streaming the body to disk + fsync without verifying (the target is
//!    at most 1.1x of this), and against that stream followed by a separate verification pass
//!    (`verify_checkpoint_file`, the sequential way); plus the verification pass alone.
//!
//! The servers run in a child process (this binary with `--serve`), so the memory figure is
//! the submitting process alone. Runs alternate which client goes first. Run through
//! `scripts/bench-transport.sh` (release build, waits for a quiet machine).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chainsync_svc::commitment::{ChainCheckpoint, Role};
use chainsync_svc::transport::{
    Backoff, Peer, RetryPolicy, Submission, block_message, download_checkpoint, http_client,
    submit_checkpoint, verify_checkpoint_file,
};
use clap::Parser;
use miner_contract::hash::{ModelHash, ModelHasher};
use miner_contract::layout::model_file_name;
use miner_contract::pt::{DType, PtWriteOptions, TensorMeta, write_pt};
use miner_contract::shard::ShardFormat;
use miner_contract::{ExpertGroup, RunDir};
use miner_keys::Hotkey;
use miner_standins::{
    ChainCheckpointView, OwnerSchedule, ValidatorStandIn, ValidatorStandInConfig,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const GROUP: u32 = 0;
const ORIGIN_BLOCK: u64 = 8_081_345;
const GLOBAL_VER: u64 = 8_081_320;
/// Each tensor is 16 MiB of f16.
const TENSOR_ROWS: usize = 2048;
const TENSOR_COLS: usize = 4096;
const TENSOR_BYTES: u64 = (TENSOR_ROWS * TENSOR_COLS * 2) as u64;

#[derive(Parser, Debug)]
#[command(about = "Benchmark the validator HTTP transport against curl on loopback")]
struct Args {
    /// Working directory for the checkpoint, uploads and downloads (needs about 4x the size free).
    #[arg(long)]
    dir: PathBuf,
    /// Checkpoint size in MiB (a multiple of 16).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Runs of each measurement.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Only the download measurements (skip the submissions).
    #[arg(long)]
    download_only: bool,
    /// Internal: run the servers (stand-in and sink) for the driver process.
    #[arg(long, hide = true)]
    serve: bool,
    /// Internal (with --serve): the model hash of the served file.
    #[arg(long, hide = true)]
    hash: Option<String>,
}

fn validator_key() -> Result<Hotkey> {
    Hotkey::from_uri("//Alice").context("dev key //Alice")
}

fn miner_key() -> Result<Hotkey> {
    Hotkey::from_uri("//Bob").context("dev key //Bob")
}

fn group() -> Result<ExpertGroup> {
    ExpertGroup::builtin("exp_math").context("built-in expert group exp_math")
}

fn model_path(dir: &Path) -> PathBuf {
    dir.join(model_file_name(GROUP, ShardFormat::Pt))
}

fn sign_hash(key: &Hotkey, hash_hex: &str) -> String {
    miner_keys::b64url_nopad_encode(&key.sign(hash_hex.as_bytes()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // `RUST_LOG=chainsync_svc=debug` shows, per download, how much was hashed after the last byte.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    if args.serve {
        let hash = args.hash.context("--serve needs --hash")?;
        return serve(&args.dir, &hash).await;
    }
    drive(&args).await
}

// ---------------------------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------------------------

/// Runs the stand-in and the sink until stdin closes; prints `READY <stand-in port> <sink port>`.
async fn serve(dir: &Path, hash_hex: &str) -> Result<()> {
    let validator = validator_key()?;
    let chain = ChainCheckpointView {
        signed_model_hash: sign_hash(&miner_key()?, hash_hex),
        model_hash: hash_hex.to_owned(),
        expert_group: GROUP,
    };
    let standin = ValidatorStandIn::start(ValidatorStandInConfig {
        hotkey: validator,
        serve_file: Some(model_path(dir)),
        submission_dir: dir.join("standin_submissions"),
        max_submission_bytes: 64 << 30,
        block: Arc::new(|| ORIGIN_BLOCK),
        schedule: OwnerSchedule::default(),
        check_phase: false,
        assignment: None,
        chain_checkpoint: Arc::new(move |_hk: &str| Some(chain.clone())),
        expert_group: Some(group()?),
    })
    .await
    .context("start ValidatorStandIn")?;
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind sink")?;
    let sink_port = sink.local_addr()?.port();
    let sink_file = dir.join("sink_upload.bin");
    tokio::spawn(async move {
        while let Ok((sock, _)) = sink.accept().await {
            let path = sink_file.clone();
            tokio::spawn(async move {
                if let Err(e) = sink_conn(sock, &path).await {
                    eprintln!("sink: {e:#}");
                }
            });
        }
    });
    println!("READY {} {sink_port}", standin.port());
    std::io::stdout().flush()?;
    // Serve until the driver closes our stdin.
    let _ = tokio::task::spawn_blocking(|| {
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest)
    })
    .await;
    drop(standin);
    Ok(())
}

/// One HTTP/1.1 request on the sink: read the headers, answer `Expect: 100-continue`, stream
/// `Content-Length` bytes to `path`, fsync, answer 200 with a small JSON body, close.
async fn sink_conn(mut sock: tokio::net::TcpStream, path: &Path) -> Result<()> {
    let (rd, mut wr) = sock.split();
    let mut rd = tokio::io::BufReader::with_capacity(256 * 1024, rd);
    let mut line = String::new();
    rd.read_line(&mut line).await?;
    let mut len: Option<u64> = None;
    let mut expect_continue = false;
    loop {
        line.clear();
        if rd.read_line(&mut line).await? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "content-length" {
                len = value.parse().ok();
            } else if name == "expect" && value.eq_ignore_ascii_case("100-continue") {
                expect_continue = true;
            }
        }
    }
    let Some(len) = len else {
        wr.write_all(
            b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await?;
        bail!("request without Content-Length");
    };
    if expect_continue {
        wr.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let mut file = tokio::fs::File::create(path).await?;
    let mut body = (&mut rd).take(len);
    let got = tokio::io::copy_buf(&mut body, &mut file).await?;
    file.sync_all().await?;
    ensure!(got == len, "body ended after {got} of {len} bytes");
    let json = format!("{{\"status\":\"ok\",\"bytes\":{got}}}");
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
    wr.write_all(resp.as_bytes()).await?;
    wr.shutdown().await?;
    Ok(())
}

/// The server child; killed if the driver fails before closing its stdin.
struct ServerChild(std::process::Child);

impl Drop for ServerChild {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_servers(dir: &Path, hash: &ModelHash) -> Result<(ServerChild, u16, u16)> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut child = std::process::Command::new(exe)
        .arg("--serve")
        .arg("--dir")
        .arg(dir)
        .arg("--hash")
        .arg(hash.to_hex())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn server process")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let child = ServerChild(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .context("read server READY line")?;
    let mut it = line.split_whitespace();
    let (Some("READY"), Some(a), Some(b)) = (it.next(), it.next(), it.next()) else {
        bail!("server process said {line:?} instead of READY <port> <port>");
    };
    Ok((child, a.parse()?, b.parse()?))
}

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

fn status_kib(field: &str) -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / secs
}

/// Writes the checkpoint: `size_mib / 16` tensors of 16 MiB finite f16, routed experts of
/// exp_math (`gate_up_proj` and `down_proj` of each expert, layer by layer).
fn write_checkpoint(path: &Path, size_mib: u64, group: &ExpertGroup) -> Result<ModelHash> {
    let n = (size_mib << 20) / TENSOR_BYTES;
    let mut metas = Vec::new();
    'outer: for layer in 0..1000 {
        for e in group.org_ids(layer) {
            for proj in ["gate_up_proj", "down_proj"] {
                if metas.len() as u64 == n {
                    break 'outer;
                }
                metas.push(TensorMeta::new(
                    format!("model.layers.{layer}.mlp.experts.{e}.{proj}"),
                    DType::F16,
                    vec![TENSOR_ROWS, TENSOR_COLS],
                ));
            }
        }
    }
    ensure!(
        metas.len() as u64 == n,
        "exp_math has too few experts for {size_mib} MiB"
    );
    let mut k = 0u16;
    let hash = write_pt(
        path,
        metas,
        &PtWriteOptions::default(),
        |_m, w: &mut dyn Write| {
            k = k.wrapping_add(1);
            let row: Vec<u8> = (0..TENSOR_COLS as u16)
                .flat_map(|i| {
                    (0x3000u16 | (i.wrapping_mul(31).wrapping_add(k) & 0x3FF)).to_le_bytes()
                })
                .collect();
            for _ in 0..TENSOR_ROWS {
                w.write_all(&row)?;
            }
            Ok(())
        },
    )?;
    Ok(hash)
}

struct Ctx {
    dir: PathBuf,
    file: PathBuf,
    size: u64,
    hash: ModelHash,
    group: ExpertGroup,
    client: reqwest::Client,
    miner: Hotkey,
    validator_ss58: String,
    standin_port: u16,
}

/// The multipart text fields of a submission, exactly as `submit_checkpoint` builds them.
fn submit_fields(ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
    let target = miner_keys::ss58_decode(&ctx.validator_ss58)?;
    let block_bytes = block_message(&target, ORIGIN_BLOCK);
    let mut msg = ctx.hash.0.to_vec();
    msg.extend_from_slice(&block_bytes);
    Ok(vec![
        ("target_hotkey_ss58", ctx.validator_ss58.clone()),
        ("origin_hotkey_ss58", ctx.miner.ss58().to_owned()),
        ("origin_block", ORIGIN_BLOCK.to_string()),
        (
            "signature",
            miner_keys::b64url_nopad_encode(&ctx.miner.sign(&msg)),
        ),
        ("model_hex", hex::encode(ctx.hash.0)),
        ("block_hex", hex::encode(block_bytes)),
    ])
}

/// The form of a download request, exactly as `download_checkpoint` builds it.
fn download_fields(ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
    let target = miner_keys::ss58_decode(&ctx.validator_ss58)?;
    let sig = ctx.miner.sign(&block_message(&target, ORIGIN_BLOCK));
    Ok(vec![
        ("target_hotkey_ss58", ctx.validator_ss58.clone()),
        ("origin_hotkey_ss58", ctx.miner.ss58().to_owned()),
        ("expert_group_id", GROUP.to_string()),
        ("origin_block", ORIGIN_BLOCK.to_string()),
        ("signature", miner_keys::b64url_nopad_encode(&sig)),
    ])
}

/// The stand-in stores the file part (`size` bytes); the sink the whole multipart body (the
/// file plus the text fields and boundaries, under 64 KiB more).
fn stored_ok(bytes: Option<u64>, size: u64) -> bool {
    bytes.is_some_and(|b| b >= size && b < size + (64 << 10))
}

/// Our `submit_checkpoint`: seconds and peak RSS growth (MiB) above the RSS just before.
async fn ours_submit(ctx: &Ctx, port: u16) -> Result<(f64, f64)> {
    let policy = RetryPolicy {
        attempt_timeout: Duration::from_secs(300),
        retries: 0,
        backoff: Backoff::Fixed(Duration::from_secs(1)),
    };
    let sub = Submission {
        peer: Peer {
            ip: "127.0.0.1".into(),
            port,
            hotkey_ss58: ctx.validator_ss58.clone(),
        },
        file: &ctx.file,
        expert_group: GROUP,
        model_hash: ctx.hash,
        origin_block: ORIGIN_BLOCK,
    };
    std::fs::write("/proc/self/clear_refs", "5").context("reset VmHWM (/proc/self/clear_refs)")?;
    let base = status_kib("VmRSS:")?;
    let t = Instant::now();
    let receipt = submit_checkpoint(&ctx.client, &ctx.miner, &sub, &policy, None)
        .await
        .context("submit_checkpoint")?;
    let secs = t.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:")?;
    let bytes = receipt.body.get("bytes").and_then(|b| b.as_u64());
    ensure!(
        stored_ok(bytes, ctx.size),
        "server stored {bytes:?} bytes of {}",
        ctx.size
    );
    Ok((secs, peak.saturating_sub(base) as f64 / 1024.0))
}

/// Runs curl under `/usr/bin/time -f %M`: seconds, HTTP status, curl's max RSS (MiB).
async fn run_curl(ctx: &Ctx, args: &[String], out_body: &Path) -> Result<(f64, u16, f64)> {
    let rss_file = ctx.dir.join("curl_maxrss.txt");
    let mut cmd = tokio::process::Command::new("/usr/bin/time");
    cmd.arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg("curl")
        .args(["-sS", "--no-progress-meter", "-w", "%{http_code}", "-o"])
        .arg(out_body)
        .args(args)
        .stdin(Stdio::null());
    let t = Instant::now();
    let out = cmd.output().await.context("run curl under /usr/bin/time")?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let code: u16 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    let rss_kib: f64 = std::fs::read_to_string(&rss_file)?
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(f64::NAN);
    Ok((secs, code, rss_kib / 1024.0))
}

async fn curl_submit(ctx: &Ctx, port: u16) -> Result<(f64, f64)> {
    let mut args = Vec::new();
    for (k, v) in submit_fields(ctx)? {
        args.push("--form-string".to_owned());
        args.push(format!("{k}={v}"));
    }
    args.push("-F".into());
    args.push(format!(
        "file=@{};filename={};type=application/octet-stream",
        ctx.file.display(),
        model_file_name(GROUP, ShardFormat::Pt)
    ));
    args.push(format!("http://127.0.0.1:{port}/submit-checkpoint"));
    let body = ctx.dir.join("curl_submit_response.json");
    let (secs, code, rss) = run_curl(ctx, &args, &body).await?;
    let resp = std::fs::read_to_string(&body).unwrap_or_default();
    ensure!(code == 200, "curl submit: HTTP {code}: {resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).context("curl submit response")?;
    let bytes = v.get("bytes").and_then(|b| b.as_u64());
    ensure!(
        stored_ok(bytes, ctx.size),
        "curl: server stored {bytes:?} bytes of {}",
        ctx.size
    );
    Ok((secs, rss))
}

/// Our `download_checkpoint` into a fresh run directory (removed afterwards): seconds.
async fn ours_download(ctx: &Ctx, run_no: usize) -> Result<f64> {
    let run_root = ctx.dir.join(format!("run_{run_no}"));
    let run = RunDir::create(&run_root)?;
    let cand = ChainCheckpoint {
        uid: 3,
        hotkey: ctx.validator_ss58.clone(),
        stake: 100.0,
        axon_ip: "127.0.0.1".into(),
        axon_port: ctx.standin_port,
        role: Role::Validator,
        signed_model_hash: sign_hash(&validator_key()?, &ctx.hash.to_hex()),
        model_hash: ctx.hash.to_hex(),
        global_ver: GLOBAL_VER,
        expert_group: GROUP,
        hf_repo_id: None,
        hf_revision: None,
    };
    let policy = RetryPolicy {
        attempt_timeout: Duration::from_secs(30),
        retries: 0,
        backoff: Backoff::Fixed(Duration::from_secs(1)),
    };
    let t = Instant::now();
    let published = download_checkpoint(
        &ctx.client,
        &run,
        &ctx.miner,
        &cand,
        &ctx.group,
        ORIGIN_BLOCK,
        &policy,
        None,
    )
    .await
    .context("download_checkpoint")?;
    let secs = t.elapsed().as_secs_f64();
    let got =
        std::fs::metadata(published.path.join(model_file_name(GROUP, ShardFormat::Pt)))?.len();
    ensure!(got == ctx.size, "published {got} bytes of {}", ctx.size);
    std::fs::remove_dir_all(&run_root)?;
    Ok(secs)
}

async fn curl_download(ctx: &Ctx, out: &Path) -> Result<f64> {
    let mut args = vec!["-X".to_owned(), "GET".to_owned()];
    for (k, v) in download_fields(ctx)? {
        args.push("--data-urlencode".into());
        args.push(format!("{k}={v}"));
    }
    args.push(format!(
        "http://127.0.0.1:{}/get-checkpoint",
        ctx.standin_port
    ));
    let (secs, code, _) = run_curl(ctx, &args, out).await?;
    ensure!(code == 200, "curl download: HTTP {code}");
    let got = std::fs::metadata(out)?.len();
    ensure!(
        got == ctx.size,
        "curl downloaded {got} bytes of {}",
        ctx.size
    );
    Ok(secs)
}

/// Our client, streaming the body to a file and fsyncing, as `download_checkpoint` does
/// before it verifies (1 MiB `BufWriter` over a tokio file).
async fn stream_download(ctx: &Ctx, out: &Path) -> Result<f64> {
    let t = Instant::now();
    let mut resp = ctx
        .client
        .get(format!(
            "http://127.0.0.1:{}/get-checkpoint",
            ctx.standin_port
        ))
        .form(&download_fields(ctx)?)
        .send()
        .await?
        .error_for_status()?;
    let file = tokio::fs::File::create(out).await?;
    let mut w = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        got += chunk.len() as u64;
        w.write_all(&chunk).await?;
    }
    w.flush().await?;
    w.get_ref().sync_all().await?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(got == ctx.size, "streamed {got} bytes of {}", ctx.size);
    Ok(secs)
}

async fn verify_only(ctx: &Ctx, path: &Path) -> Result<f64> {
    let (path, hex, group) = (path.to_path_buf(), ctx.hash.to_hex(), ctx.group.clone());
    tokio::task::spawn_blocking(move || -> Result<f64> {
        let t = Instant::now();
        verify_checkpoint_file(&path, &hex, &group)?;
        Ok(t.elapsed().as_secs_f64())
    })
    .await?
}

/// Components of the verify pass: a plain sequential read of the file (16 MiB reads, page
/// cache) and blake2b-192 (the model hash) over the same number of bytes in memory.
fn verify_components(path: &Path, size: u64) -> Result<(f64, f64)> {
    let mut buf = vec![0u8; TENSOR_BYTES as usize];
    let mut f = std::fs::File::open(path)?;
    let t = Instant::now();
    let mut read = 0u64;
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        read += n as u64;
    }
    let read_s = t.elapsed().as_secs_f64();
    ensure!(read >= size, "read {read} bytes");
    let t = Instant::now();
    let mut h = ModelHasher::new();
    for _ in 0..size / TENSOR_BYTES {
        h.update(&buf);
    }
    std::hint::black_box(h.finalize());
    Ok((read_s, t.elapsed().as_secs_f64()))
}

async fn drive(args: &Args) -> Result<()> {
    ensure!(
        args.size_mib >= 16 && args.size_mib.is_multiple_of(16),
        "--size-mib must be a positive multiple of 16"
    );
    ensure!(args.runs >= 1, "--runs must be at least 1");
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let size_req = (args.size_mib << 20) * 4 + (256 << 20);
    let free = miner_contract::publish::available_bytes(&dir)?;
    ensure!(
        free >= size_req,
        "{}: {} MiB free, the benchmark needs {} MiB (the file, the stand-in's and the sink's copies, one download)",
        dir.display(),
        free >> 20,
        size_req >> 20
    );
    let group = group()?;
    let file = model_path(&dir);
    println!(
        "writing {} MiB checkpoint {} ...",
        args.size_mib,
        file.display()
    );
    let t = Instant::now();
    let hash = write_checkpoint(&file, args.size_mib, &group)?;
    let size = std::fs::metadata(&file)?.len();
    println!(
        "  {} bytes, model hash {}, written in {:.1} s",
        size,
        hash.to_hex(),
        t.elapsed().as_secs_f64()
    );

    let (server, standin_port, sink_port) = spawn_servers(&dir, &hash)?;
    let ctx = Ctx {
        dir: dir.clone(),
        file,
        size,
        hash,
        group,
        client: http_client()?,
        miner: miner_key()?,
        validator_ss58: validator_key()?.ss58().to_owned(),
        standin_port,
    };
    let curl_version = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    println!(
        "servers: ValidatorStandIn on 127.0.0.1:{standin_port}, raw sink on 127.0.0.1:{sink_port}; {curl_version}; load average {}",
        loadavg()
    );
    let n = args.runs;
    let size = ctx.size;

    // --- 1. Submission ---------------------------------------------------------------------
    let mut sub = Vec::new();
    let mut cold_mem = 0.0;
    let targets = if args.download_only {
        Vec::new()
    } else {
        vec![
            (
                "ValidatorStandIn (multipart+sha256+store+verify)",
                standin_port,
            ),
            ("raw sink (body -> file + fsync)", sink_port),
        ]
    };
    for (label, port) in targets {
        println!("\nsubmit {} MiB to {label}", size >> 20);
        let (mut ours, mut curl, mut mem, mut curl_rss) = (vec![], vec![], vec![], vec![]);
        // One warm-up of each client (connection pool, page cache, allocator), not in the
        // medians; the very first upload of the process shows the memory of a cold process.
        let (ws, wm) = ours_submit(&ctx, port).await?;
        let (cs, _) = curl_submit(&ctx, port).await?;
        println!(
            "  warm-up: ours {ws:.3} s, peak RSS +{wm:.1} MiB{} | curl -F {cs:.3} s",
            if sub.is_empty() {
                " (first upload of this process)"
            } else {
                ""
            }
        );
        if sub.is_empty() {
            cold_mem = wm;
        }
        for i in 0..n {
            let ours_first = i % 2 == 0;
            let mut o = None;
            let mut c = None;
            for step in 0..2 {
                if (step == 0) == ours_first {
                    o = Some(ours_submit(&ctx, port).await?);
                } else {
                    c = Some(curl_submit(&ctx, port).await?);
                }
            }
            let ((os, om), (cs, cm)) = (o.context("ours")?, c.context("curl")?);
            println!(
                "  run {}/{n} ({} first): ours {os:.3} s = {:.0} MiB/s, peak RSS +{om:.1} MiB | curl -F {cs:.3} s = {:.0} MiB/s (curl max RSS {cm:.1} MiB) | throughput ours/curl {:.3}",
                i + 1,
                if ours_first { "ours" } else { "curl" },
                mib_s(size, os),
                mib_s(size, cs),
                cs / os
            );
            ours.push(os);
            curl.push(cs);
            mem.push(om);
            curl_rss.push(cm);
        }
        sub.push((label, ours, curl, mem, curl_rss));
    }

    // --- 2. Download ------------------------------------------------------------------------
    println!(
        "\ndownload {} MiB from ValidatorStandIn GET /get-checkpoint",
        size >> 20
    );
    let curl_out = dir.join("curl_download.pt");
    let stream_out = dir.join("stream_download.pt");
    let (mut d_ours, mut d_curl, mut d_stream, mut d_verify) = (vec![], vec![], vec![], vec![]);
    let mut d_seq = vec![];
    ours_download(&ctx, 0).await?;
    curl_download(&ctx, &curl_out).await?;
    for i in 0..n {
        // Rotate the order of the three.
        let mut o = 0.0;
        let mut c = 0.0;
        let mut s = 0.0;
        let mut q = 0.0;
        for step in 0..4 {
            match (step + i) % 4 {
                0 => o = ours_download(&ctx, i + 1).await?,
                1 => {
                    c = curl_download(&ctx, &curl_out).await?;
                }
                2 => {
                    s = stream_download(&ctx, &stream_out).await?;
                    std::fs::remove_file(&stream_out)?;
                }
                _ => {
                    // The previous way: stream to disk, then one verification pass.
                    let t = Instant::now();
                    stream_download(&ctx, &stream_out).await?;
                    verify_only(&ctx, &stream_out).await?;
                    q = t.elapsed().as_secs_f64();
                    std::fs::remove_file(&stream_out)?;
                }
            }
        }
        let v = verify_only(&ctx, &curl_out).await?;
        println!(
            "  run {}/{n}: ours (download+verify+publish) {o:.3} s | curl -o {c:.3} s | our client stream+fsync {s:.3} s | stream then verify (sequential) {q:.3} s | verify alone {v:.3} s | ours/curl {:.3}, ours/stream {:.3}, sequential/stream {:.3}",
            i + 1,
            o / c,
            o / s,
            q / s
        );
        d_seq.push(q);
        d_ours.push(o);
        d_curl.push(c);
        d_stream.push(s);
        d_verify.push(v);
    }
    let (read_s, blake_s) = verify_components(&curl_out, size)?;
    std::fs::remove_file(&curl_out)?;
    drop(server);

    // --- Summary ----------------------------------------------------------------------------
    println!(
        "\nSUMMARY ({} MiB checkpoint, medians of {n} runs, load average now {})",
        size >> 20,
        loadavg()
    );
    for (label, ours, curl, mem, curl_rss) in &sub {
        let (mo, mc) = (median(ours), median(curl));
        println!(
            "submit -> {label}: ours {mo:.3} s ({:.0} MiB/s), curl -F {mc:.3} s ({:.0} MiB/s); throughput ours/curl = {:.3} (target >= 0.9)",
            mib_s(size, mo),
            mib_s(size, mc),
            mc / mo
        );
        println!(
            "  peak RSS growth of the submitting process: median {:.1} MiB, max {:.1} MiB (target < 64); curl's whole-process max RSS median {:.1} MiB",
            median(mem),
            mem.iter().copied().fold(0.0, f64::max),
            median(curl_rss)
        );
    }
    if !args.download_only {
        println!(
            "  first upload of the process (cold allocator): peak RSS growth {cold_mem:.1} MiB (target < 64)"
        );
    }
    let (mo, mc, ms, mv) = (
        median(&d_ours),
        median(&d_curl),
        median(&d_stream),
        median(&d_verify),
    );
    println!(
        "download: ours (download+verify+publish) {mo:.3} s; curl -o {mc:.3} s; our client stream+fsync {ms:.3} s; verify alone {mv:.3} s"
    );
    println!(
        "  ours / curl -o = {:.3}; ours / stream-only = {:.3} (target <= 1.1)",
        mo / mc,
        mo / ms
    );
    let mq = median(&d_seq);
    println!(
        "  stream then verify in a second pass (the sequential way): {mq:.3} s = {:.3} x stream-only",
        mq / ms
    );
    println!(
        "  verify pass components (one run): sequential read from page cache {read_s:.3} s, blake2b-192 in memory {blake_s:.3} s; rest of verify (finite check, per-tensor Vec) ~{:.3} s",
        (mv - read_s - blake_s).max(0.0)
    );
    Ok(())
}
