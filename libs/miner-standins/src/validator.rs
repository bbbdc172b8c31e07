//! `ValidatorStandIn`: a validator's historical HTTP server (spec §5.3 `GET /get-checkpoint`,
//! §6.2 `POST /submit-checkpoint`) on 127.0.0.1, with fault knobs and a record of requests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use miner_contract::ExpertGroup;
use miner_contract::hash::ModelHasher;
use miner_contract::shard::{ShardFormat, ShardReader, escape_name};
use miner_keys::Hotkey;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::BlockSource;
use crate::owner_schedule::OwnerSchedule;

/// What the chain says about a miner (its MinerCommit1 signature and MinerCommit2 hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainCheckpointView {
    pub signed_model_hash: String,
    pub model_hash: String,
    pub expert_group: u32,
}

/// Looks up the chain checkpoint of a miner hotkey (SS58); `None` = no complete commitment.
pub type ChainLookup = Arc<dyn Fn(&str) -> Option<ChainCheckpointView> + Send + Sync>;

/// How the stand-in behaves.
pub struct ValidatorStandInConfig {
    /// The validator's own key (target-hotkey checks).
    pub hotkey: Hotkey,
    /// The file `GET /get-checkpoint` serves; `None` → 503 "no checkpoint".
    pub serve_file: Option<PathBuf>,
    /// Where accepted submissions are stored.
    pub submission_dir: PathBuf,
    /// `max_submission_bytes` (413 above it).
    pub max_submission_bytes: u64,
    /// The chain head as the validator sees it.
    pub block: BlockSource,
    pub schedule: OwnerSchedule,
    /// Enforce "phase is Submission" (409) and "origin_block inside it" (400).
    pub check_phase: bool,
    /// The miners assigned to this validator (`None` = do not check).
    pub assignment: Option<Vec<String>>,
    /// The chain commitments of miners.
    pub chain_checkpoint: ChainLookup,
    /// Check that every submitted key is a routed expert of this group.
    pub expert_group: Option<ExpertGroup>,
}

/// Fault knobs; the test may change them between requests.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer the next `fail_times` requests (either route) with `fail_status`.
    pub fail_times: u32,
    pub fail_status: u16,
    /// Sleep this long before answering any request.
    pub delay_response: Option<Duration>,
    /// Download: send this many body bytes, then hang forever.
    pub stall_after_bytes: Option<u64>,
    /// Download: send this many body bytes, then drop the connection.
    pub close_after_bytes: Option<u64>,
    /// Download: serve this file instead of the configured `serve_file` (e.g. one with a
    /// wrong hash, foreign keys or NaNs).
    pub serve_file: Option<PathBuf>,
    /// Submission only: answer the next `fail_submit_times` submissions with
    /// `fail_submit_status` (after reading the upload), downloads unaffected.
    pub fail_submit_times: u32,
    pub fail_submit_status: u16,
}

/// One `GET /get-checkpoint` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadRecord {
    pub target_hotkey_ss58: String,
    pub origin_hotkey_ss58: String,
    pub expert_group_id: String,
    pub origin_block: u64,
    pub status: u16,
}

/// One accepted `POST /submit-checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmissionRecord {
    pub origin_hotkey_ss58: String,
    pub origin_block: u64,
    pub model_hex: String,
    pub block_hex: String,
    pub file_name: String,
    pub stored_path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

struct Shared {
    cfg: ValidatorStandInConfig,
    faults: Mutex<Faults>,
    downloads: Mutex<Vec<DownloadRecord>>,
    submissions: Mutex<Vec<SubmissionRecord>>,
    download_requests: AtomicU64,
    submit_requests: AtomicU64,
    tmp_counter: AtomicU64,
}

/// A validator's HTTP server stand-in; stops accepting when dropped.
pub struct ValidatorStandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

impl ValidatorStandIn {
    /// Binds 127.0.0.1:0.
    pub async fn start(cfg: ValidatorStandInConfig) -> std::io::Result<Self> {
        std::fs::create_dir_all(&cfg.submission_dir)?;
        let shared = Arc::new(Shared {
            cfg,
            faults: Mutex::new(Faults::default()),
            downloads: Mutex::new(Vec::new()),
            submissions: Mutex::new(Vec::new()),
            download_requests: AtomicU64::new(0),
            submit_requests: AtomicU64::new(0),
            tmp_counter: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/get-checkpoint", get(get_checkpoint))
            .route("/submit-checkpoint", post(submit_checkpoint))
            .route(
                "/ping",
                get(|| async { axum::Json(json!({"status": "ok"})) }),
            )
            .layer(DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(ValidatorStandIn {
            addr,
            shared,
            _stop: tx,
        })
    }

    pub fn ip(&self) -> String {
        self.addr.ip().to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn hotkey_ss58(&self) -> String {
        self.shared.cfg.hotkey.ss58().to_owned()
    }

    pub fn set_faults(&self, f: Faults) {
        if let Ok(mut g) = self.shared.faults.lock() {
            *g = f;
        }
    }

    pub fn downloads(&self) -> Vec<DownloadRecord> {
        self.shared
            .downloads
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    pub fn submissions(&self) -> Vec<SubmissionRecord> {
        self.shared
            .submissions
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    /// Requests received on `GET /get-checkpoint` (including refused ones).
    pub fn download_requests(&self) -> u64 {
        self.shared.download_requests.load(Ordering::SeqCst)
    }

    /// Requests received on `POST /submit-checkpoint` (including refused ones).
    pub fn submit_requests(&self) -> u64 {
        self.shared.submit_requests.load(Ordering::SeqCst)
    }
}

fn status(code: u16, detail: &str) -> Response {
    let s = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (s, axum::Json(json!({ "detail": detail }))).into_response()
}

/// Applies the "fail N times" and "delay" knobs; returns the faults for the body stream.
async fn gate(sh: &Shared) -> Result<Faults, Response> {
    let (faults, fail) = {
        let mut g = sh
            .faults
            .lock()
            .map_err(|_| status(500, "fault knobs poisoned"))?;
        let fail = if g.fail_times > 0 {
            g.fail_times -= 1;
            Some(g.fail_status)
        } else {
            None
        };
        (g.clone(), fail)
    };
    if let Some(d) = faults.delay_response {
        tokio::time::sleep(d).await;
    }
    if let Some(code) = fail {
        return Err(status(code, "injected failure"));
    }
    Ok(faults)
}

fn decode_sig(b64: &str) -> Option<[u8; 64]> {
    miner_keys::b64url_nopad_decode(b64).ok()?.try_into().ok()
}

async fn get_checkpoint(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    sh.download_requests.fetch_add(1, Ordering::SeqCst);
    let faults = match gate(&sh).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    // The reference client sends a form-encoded body on the GET.
    let Ok(form) = serde_urlencoded::from_bytes::<HashMap<String, String>>(&body) else {
        return status(422, "bad form body");
    };
    let field = |k: &str| form.get(k).cloned();
    let (Some(target), Some(origin), Some(gid), Some(block), Some(sig)) = (
        field("target_hotkey_ss58"),
        field("origin_hotkey_ss58"),
        field("expert_group_id"),
        field("origin_block"),
        field("signature"),
    ) else {
        return status(422, "missing form field");
    };
    let Ok(origin_block) = block.parse::<u64>() else {
        return status(422, "origin_block is not an integer");
    };
    let record = |code: u16| {
        if let Ok(mut g) = sh.downloads.lock() {
            g.push(DownloadRecord {
                target_hotkey_ss58: target.clone(),
                origin_hotkey_ss58: origin.clone(),
                expert_group_id: gid.clone(),
                origin_block,
                status: code,
            });
        }
    };
    // Signature: origin signs target_pubkey(32) ‖ u64_be(origin_block).
    let valid = match (
        miner_keys::ss58_decode(&origin),
        miner_keys::ss58_decode(&target),
        decode_sig(&sig),
    ) {
        (Ok(origin_pub), Ok(target_pub), Some(sig)) => {
            let mut msg = target_pub.to_vec();
            msg.extend_from_slice(&origin_block.to_be_bytes());
            miner_keys::verify(&origin_pub, &msg, &sig)
        }
        _ => false,
    };
    if !valid {
        record(403);
        return status(403, "Invalid checkpoint download signature");
    }
    if target != sh.cfg.hotkey.ss58() {
        record(403);
        return status(403, "target hotkey is not this validator");
    }
    let Some(path) = faults
        .serve_file
        .clone()
        .or_else(|| sh.cfg.serve_file.clone())
    else {
        record(503);
        return status(503, "no checkpoint available");
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => {
            record(404);
            return status(404, "checkpoint file not found");
        }
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(_) => return status(500, "stat failed"),
    };
    record(200);
    let stream = futures::stream::unfold(
        (file, 0u64, faults, false),
        |(mut f, sent, faults, done)| async move {
            if done {
                return None;
            }
            if faults.close_after_bytes.is_some_and(|n| sent >= n) {
                let err = std::io::Error::other("stand-in closes the connection mid-body");
                return Some((Err(err), (f, sent, faults, true)));
            }
            if faults.stall_after_bytes.is_some_and(|n| sent >= n) {
                futures::future::pending::<()>().await;
            }
            let boundary = [faults.close_after_bytes, faults.stall_after_bytes]
                .into_iter()
                .flatten()
                .filter(|n| *n > sent)
                .min()
                .map(|n| (n - sent) as usize);
            let cap = boundary.unwrap_or(256 * 1024).min(256 * 1024);
            let mut buf = vec![0u8; cap];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(k) => {
                    buf.truncate(k);
                    Some((Ok(Bytes::from(buf)), (f, sent + k as u64, faults, false)))
                }
                Err(e) => Some((Err(e), (f, sent, faults, true))),
            }
        },
    );
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && [".pt", ".bin", ".ckpt", ".safetensors", ".tar"]
            .iter()
            .any(|e| name.ends_with(e))
}

/// A refusal to send (boxed: a `Response` is large).
type Refusal = Box<Response>;

/// The `(start, end)` of the current Submission phase, or the 409 to send.
fn submission_window(sh: &Shared) -> Result<(u64, u64), Refusal> {
    let (name, _, start, end) = sh.cfg.schedule.phase_of((sh.cfg.block)());
    if name != "Submission" {
        return Err(Box::new(status(
            409,
            &format!("not in Submission phase (current phase {name})"),
        )));
    }
    Ok((start, end))
}

/// The checks of §6.2 steps 1-3 that need only the form fields.
fn pre_checks(sh: &Shared, fields: &HashMap<String, String>) -> Result<(), Refusal> {
    let get = |k: &str| fields.get(k).map(String::as_str);
    let (Some(target), Some(origin), Some(block)) = (
        get("target_hotkey_ss58"),
        get("origin_hotkey_ss58"),
        get("origin_block"),
    ) else {
        return Err(Box::new(status(422, "missing form field")));
    };
    let origin_block: u64 = block
        .parse()
        .map_err(|_| Box::new(status(422, "origin_block is not an integer")))?;
    if target != sh.cfg.hotkey.ss58() {
        return Err(Box::new(status(403, "target hotkey is not this validator")));
    }
    if sh.cfg.check_phase {
        let (start, end) = submission_window(sh)?;
        if !(start <= origin_block && origin_block <= end) {
            return Err(Box::new(status(
                400,
                "origin_block outside the Submission phase",
            )));
        }
        if already_submitted(&sh.cfg.submission_dir, origin, start, end) {
            return Err(Box::new(status(
                409,
                "Miner already submitted during this phase",
            )));
        }
    }
    if let Some(list) = &sh.cfg.assignment
        && !list.iter().any(|m| m == origin)
    {
        return Err(Box::new(status(
            403,
            "miner not assigned to this validator",
        )));
    }
    if (sh.cfg.chain_checkpoint)(origin).is_none() {
        return Err(Box::new(status(400, "no chain checkpoint for this miner")));
    }
    Ok(())
}

fn already_submitted(dir: &Path, origin: &str, start: u64, end: u64) -> bool {
    let prefix = format!("hotkey_{origin}_block_");
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.strip_prefix(&prefix)
            .and_then(|r| {
                r.strip_suffix(".pt")
                    .or_else(|| r.strip_suffix(".safetensors"))
            })
            .and_then(|b| b.parse::<u64>().ok())
            .is_some_and(|b| start <= b && b <= end)
    })
}

struct Upload {
    tmp: PathBuf,
    file_name: String,
    bytes: u64,
    sha256: String,
}

/// Reads and discards the rest of a multipart body.
async fn drain(mp: &mut Multipart) {
    while let Ok(Some(mut field)) = mp.next_field().await {
        while let Ok(Some(_)) = field.chunk().await {}
    }
}

/// Removes the temporary upload unless disarmed.
struct TmpGuard(Option<PathBuf>);

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The submission-only "fail N times" knob: the injected failure, if one is due.
fn submit_fault(sh: &Shared) -> Option<Response> {
    let Ok(mut g) = sh.faults.lock() else {
        return Some(status(500, "fault knobs poisoned"));
    };
    if g.fail_submit_times == 0 {
        return None;
    }
    g.fail_submit_times -= 1;
    Some(status(g.fail_submit_status, "injected submission failure"))
}

async fn submit_checkpoint(State(sh): State<Arc<Shared>>, mut mp: Multipart) -> Response {
    sh.submit_requests.fetch_add(1, Ordering::SeqCst);
    let refused = match gate(&sh).await {
        Ok(_) => submit_fault(&sh),
        Err(r) => Some(r),
    };
    if let Some(r) = refused {
        // Like the reference's FastAPI route, whose form parameters are parsed before the handler
        // runs, read the whole body before refusing: answering mid-upload resets the connection
        // and the client would see a transport error instead of the status.
        drain(&mut mp).await;
        return r;
    }
    let mut fields: HashMap<String, String> = HashMap::new();
    let mut upload: Option<Upload> = None;
    let mut guard = TmpGuard(None);
    loop {
        let mut field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return status(400, &format!("bad multipart body: {e}")),
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name != "file" {
            match field.text().await {
                Ok(t) => {
                    fields.insert(name, t);
                }
                Err(e) => return status(400, &format!("bad form field: {e}")),
            }
            continue;
        }
        // The fields come first from the reference client: refuse before reading the file.
        if fields.contains_key("origin_hotkey_ss58")
            && let Err(r) = pre_checks(&sh, &fields)
        {
            drop(field);
            drain(&mut mp).await;
            return *r;
        }
        let file_name = field.file_name().unwrap_or_default().to_owned();
        if !valid_file_name(&file_name) {
            drop(field);
            drain(&mut mp).await;
            return status(400, "invalid file name or extension");
        }
        let n = sh.tmp_counter.fetch_add(1, Ordering::SeqCst);
        let tmp = sh.cfg.submission_dir.join(format!(".tmp_upload_{n}.pt"));
        let mut out = match tokio::fs::File::create(&tmp).await {
            Ok(f) => f,
            Err(e) => return status(500, &format!("create temp file: {e}")),
        };
        guard.0 = Some(tmp.clone());
        let mut sha = Sha256::new();
        let mut bytes = 0u64;
        loop {
            match field.chunk().await {
                Ok(Some(c)) => {
                    bytes += c.len() as u64;
                    if bytes > sh.cfg.max_submission_bytes {
                        return status(413, "submission too large");
                    }
                    sha.update(&c);
                    if let Err(e) = out.write_all(&c).await {
                        return status(500, &format!("write: {e}"));
                    }
                }
                Ok(None) => break,
                Err(e) => return status(400, &format!("upload interrupted: {e}")),
            }
        }
        if let Err(e) = out.sync_all().await {
            return status(500, &format!("fsync: {e}"));
        }
        upload = Some(Upload {
            tmp,
            file_name,
            bytes,
            sha256: hex::encode(sha.finalize()),
        });
    }
    if let Err(r) = pre_checks(&sh, &fields) {
        return *r;
    }
    let Some(upload) = upload else {
        return status(422, "missing file part");
    };
    let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let (origin, model_hex, block_hex, sig) = (
        get("origin_hotkey_ss58"),
        get("model_hex"),
        get("block_hex"),
        get("signature"),
    );
    let origin_block: u64 = get("origin_block").parse().unwrap_or(0);
    let validator_block = (sh.cfg.block)();
    // Stored under the uploaded file's format (addendum A1: `.safetensors` or `.pt`).
    let ext = ShardFormat::of_path(Path::new(&upload.file_name))
        .unwrap_or(ShardFormat::Pt)
        .extension();
    let stored = sh
        .cfg
        .submission_dir
        .join(format!("hotkey_{origin}_block_{validator_block}.{ext}"));
    if let Err(e) = tokio::fs::rename(&upload.tmp, &stored).await {
        return status(500, &format!("rename: {e}"));
    }
    guard.0 = Some(stored.clone());

    // §6.2 step 6: chain checkpoint (signature over h, file hash == h, keys) and the message signature.
    let Some(chain) = (sh.cfg.chain_checkpoint)(&origin) else {
        return status(400, "no chain checkpoint for this miner");
    };
    let group = sh.cfg.expert_group.clone();
    let path = stored.clone();
    let verdict = tokio::task::spawn_blocking(move || {
        verify_submission(
            &path,
            &origin,
            &chain,
            group.as_ref(),
            &model_hex,
            &block_hex,
            &sig,
        )
    })
    .await
    .unwrap_or_else(|e| Err(format!("verifier panicked: {e}")));
    if let Err(reason) = verdict {
        tracing::info!(%reason, "stand-in rejects submission");
        return status(400, "Submitted checkpoint failed validation.");
    }
    guard.0 = None;
    let record = SubmissionRecord {
        origin_hotkey_ss58: get("origin_hotkey_ss58"),
        origin_block,
        model_hex: get("model_hex"),
        block_hex: get("block_hex"),
        file_name: upload.file_name,
        stored_path: stored.clone(),
        bytes: upload.bytes,
        sha256: upload.sha256.clone(),
    };
    if let Ok(mut g) = sh.submissions.lock() {
        g.push(record);
    }
    axum::Json(json!({
        "status": "ok",
        "stored_path": stored.display().to_string(),
        "bytes": upload.bytes,
        "sha256": upload.sha256,
    }))
    .into_response()
}

fn verify_submission(
    path: &Path,
    origin: &str,
    chain: &ChainCheckpointView,
    group: Option<&ExpertGroup>,
    model_hex: &str,
    block_hex: &str,
    sig: &str,
) -> Result<(), String> {
    let origin_pub = miner_keys::ss58_decode(origin).map_err(|e| format!("origin hotkey: {e}"))?;
    let chain_sig = decode_sig(&chain.signed_model_hash)
        .ok_or("chain signature is not 64 bytes of base64url")?;
    if !miner_keys::verify(&origin_pub, chain.model_hash.as_bytes(), &chain_sig) {
        return Err("chain signature over h does not verify".into());
    }
    let reader = ShardReader::open(path).map_err(|e| e.to_string())?;
    let mut hasher = ModelHasher::new();
    for meta in reader.entries() {
        if let Some(g) = group
            && !g.is_group_key(&meta.name)
        {
            return Err(format!(
                "tensor {} is not a routed expert of group {}",
                escape_name(&meta.name),
                g.group_id
            ));
        }
        let t = reader.read(&meta.name).map_err(|e| e.to_string())?;
        hasher.update_tensor(&meta.name, &t.data);
    }
    let actual = hasher.finalize().to_hex();
    if actual != chain.model_hash {
        return Err(format!(
            "file hash {actual} != chain hash {}",
            chain.model_hash
        ));
    }
    let mut msg = hex::decode(model_hex).map_err(|_| "model_hex is not hex")?;
    msg.extend(hex::decode(block_hex).map_err(|_| "block_hex is not hex")?);
    let sig = decode_sig(sig).ok_or("signature is not 64 bytes of base64url")?;
    if !miner_keys::verify(&origin_pub, &msg, &sig) {
        return Err("signature over model_hex ‖ block_hex does not verify".into());
    }
    Ok(())
}
