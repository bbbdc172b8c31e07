//! `HubStandIn`: the Hugging Face Hub's HTTP API as huggingface_hub 1.10.1 uses it without Xet
//! (addendum part C), on two loopback listeners: the Hub itself and a "storage" host (like the
//! CDN / S3) that LFS PUTs and downloads are redirected to.
//!
//! It serves whoami-v2, repos/create, settings, repo info, preupload, LFS batch (`basic` and
//! `multipart` with `chunk_size` and part URLs, completion and verify), NDJSON commits (`lfsFile`
//! and inline base64 `file`), resolve by branch / full oid / 7+ hex prefix (HEAD headers, Range
//! GETs, LFS via a redirect to storage) and paginated tree listings. Private repos refuse
//! strangers as the Hub does (401 anonymous, 404 for another user, both `X-Error-Code:
//! RepoNotFound`); read-only tokens get 403 on writes. Faults ([`HubFault`]) and a request log
//! ([`HubRequest`]) serve assertions. Blobs live on disk and bodies stream (no whole-file buffers).

mod handlers;
mod lfs;
mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, Uri};
use axum::response::Response;

pub use store::RepoKind;
use store::Store;

/// Which route a request hit (for faults and the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HubRoute {
    WhoAmI,
    CreateRepo,
    Settings,
    RepoInfo,
    Preupload,
    Commit,
    Tree,
    LfsBatch,
    LfsComplete,
    LfsVerify,
    /// HEAD on `/<repo>/resolve/<rev>/<file>`.
    ResolveHead,
    /// GET on `/<repo>/resolve/<rev>/<file>`.
    ResolveGet,
    /// Storage: a `basic` PUT.
    StoragePut,
    /// Storage: one multipart part PUT.
    StoragePartPut,
    /// Storage: an LFS download.
    StorageGet,
    Unknown,
}

/// What an injected fault does.
#[derive(Debug, Clone)]
pub enum FaultAction {
    /// Answer this status (with `Retry-After: secs` when given) without handling the request.
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Sleep this long before answering (past a client's read timeout).
    Stall(Duration),
    /// For downloads: send this many body bytes, then cut the connection.
    CutAfter(u64),
}

/// A fault armed on a route: skips the first `skip` matching requests, then acts on `times`.
#[derive(Debug, Clone)]
pub struct HubFault {
    pub route: HubRoute,
    pub skip: u32,
    pub times: u32,
    pub action: FaultAction,
}

impl HubFault {
    /// The `nth` (1-based) request of `route` from now gets `action`, once.
    pub fn nth(route: HubRoute, nth: u32, action: FaultAction) -> Self {
        HubFault {
            route,
            skip: nth.saturating_sub(1),
            times: 1,
            action,
        }
    }
}

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct HubRequest {
    pub method: String,
    /// Path without the query, as sent.
    pub path: String,
    pub route: HubRoute,
    /// True when it came to the storage listener.
    pub storage: bool,
    /// The bearer token sent, if any.
    pub token: Option<String>,
    /// Whether any `Authorization` header was sent.
    pub authorization: bool,
    pub status: u16,
    pub range: Option<String>,
}

/// How to start the stand-in.
#[derive(Debug, Clone)]
pub struct HubStandInOptions {
    /// Where blobs go; `None` = a temporary directory removed on drop.
    pub data_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    pub storage_listen: SocketAddr,
    /// Files at least this large are `lfs` in preupload (as are `*.safetensors`, `*.bin`, `*.pt`, ...).
    pub lfs_threshold: u64,
    /// LFS objects larger than this use `multipart` (when offered) with this `chunk_size`.
    pub multipart_chunk_size: u64,
    /// Entries per tree page.
    pub tree_page_size: usize,
    /// `(token, user, write)`.
    pub tokens: Vec<(String, String, bool)>,
}

impl Default for HubStandInOptions {
    fn default() -> Self {
        HubStandInOptions {
            data_dir: None,
            listen: ([127, 0, 0, 1], 0).into(),
            storage_listen: ([127, 0, 0, 1], 0).into(),
            lfs_threshold: 10 << 20,
            multipart_chunk_size: 64 << 20,
            tree_page_size: 1000,
            tokens: Vec::new(),
        }
    }
}

/// Shared by both listeners.
pub(crate) struct Hub {
    pub(crate) endpoint: String,
    pub(crate) storage: String,
    pub(crate) data: PathBuf,
    pub(crate) opts: HubStandInOptions,
    pub(crate) store: Mutex<Store>,
    pub(crate) tokens: Mutex<HashMap<String, (String, bool)>>,
    faults: Mutex<Vec<HubFault>>,
    log: Mutex<Vec<HubRequest>>,
    /// The `transfers` list of every LFS batch request.
    pub(crate) batch_transfers: Mutex<Vec<Vec<String>>>,
}

/// The running stand-in; stops when dropped.
pub struct HubStandIn {
    hub: Arc<Hub>,
    addr: SocketAddr,
    storage_addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

impl HubStandIn {
    /// Binds both listeners and serves until dropped.
    pub async fn start(opts: HubStandInOptions) -> std::io::Result<HubStandIn> {
        let (tmp, data) = match &opts.data_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        for sub in ["blobs", "tmp"] {
            tokio::fs::create_dir_all(data.join(sub)).await?;
        }
        let main = tokio::net::TcpListener::bind(opts.listen).await?;
        let storage = tokio::net::TcpListener::bind(opts.storage_listen).await?;
        let (addr, storage_addr) = (main.local_addr()?, storage.local_addr()?);
        let tokens = opts
            .tokens
            .iter()
            .map(|(t, u, w)| (t.clone(), (u.clone(), *w)))
            .collect();
        let hub = Arc::new(Hub {
            endpoint: format!("http://{addr}"),
            storage: format!("http://{storage_addr}"),
            data,
            opts,
            store: Mutex::new(Store::default()),
            tokens: Mutex::new(tokens),
            faults: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            batch_transfers: Mutex::new(Vec::new()),
        });
        let mut tasks = Vec::new();
        for (listener, is_storage) in [(main, false), (storage, true)] {
            let app = Router::new()
                .fallback(move |st: State<Arc<Hub>>, req: Request<Body>| entry(st, req, is_storage))
                .with_state(hub.clone());
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }));
        }
        Ok(HubStandIn {
            hub,
            addr,
            storage_addr,
            tasks,
            _tmp: tmp,
        })
    }

    /// `http://127.0.0.1:PORT` (what `HF_ENDPOINT` is set to).
    pub fn endpoint(&self) -> String {
        self.hub.endpoint.clone()
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn storage_addr(&self) -> SocketAddr {
        self.storage_addr
    }
    pub fn data_dir(&self) -> &Path {
        &self.hub.data
    }

    /// Adds a token for `user` (`write` = may create repos and commit).
    pub fn add_token(&self, token: &str, user: &str, write: bool) {
        self.hub
            .tokens
            .lock()
            .unwrap()
            .insert(token.to_string(), (user.to_string(), write));
    }

    /// Creates a repo directly (with its initial `.gitattributes` commit); false if it exists.
    pub fn create_repo(&self, repo: &str, kind: RepoKind, private: bool) -> bool {
        self.hub.store.lock().unwrap().create(kind, repo, private)
    }

    /// Commits `bytes` at `path` on `main` (creating a public repo if needed); returns the commit oid.
    pub fn put_file(
        &self,
        repo: &str,
        kind: RepoKind,
        path: &str,
        bytes: &[u8],
    ) -> std::io::Result<String> {
        let blob = store::write_blob(&self.hub.data, bytes)?;
        let lfs = self.hub.is_lfs(path, bytes.len() as u64);
        let mut st = self.hub.store.lock().unwrap();
        st.create(kind, repo, false);
        let entry = store::Entry::new(bytes.len() as u64, blob, lfs, Some(bytes));
        st.commit(
            kind,
            repo,
            "seed file",
            vec![(path.to_string(), Some(entry))],
        )
        .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// The current `main` commit of a repo.
    pub fn head(&self, repo: &str, kind: RepoKind) -> Option<String> {
        self.hub.store.lock().unwrap().head(kind, repo)
    }

    pub fn inject(&self, fault: HubFault) {
        self.hub.faults.lock().unwrap().push(fault);
    }
    pub fn clear_faults(&self) {
        self.hub.faults.lock().unwrap().clear();
    }
    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<HubRequest> {
        self.hub.log.lock().unwrap().clone()
    }
    /// The `transfers` each LFS batch request offered (e.g. `["basic", "multipart"]`; `"xet"` would
    /// mean the client would use Xet storage instead).
    pub fn lfs_batch_transfers(&self) -> Vec<Vec<String>> {
        self.hub.batch_transfers.lock().unwrap().clone()
    }
    pub fn clear_requests(&self) {
        self.hub.log.lock().unwrap().clear();
    }
}

impl Drop for HubStandIn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Hub {
    /// Preupload's rule: big files and binary weight formats go to LFS.
    pub(crate) fn is_lfs(&self, path: &str, size: u64) -> bool {
        const LFS_EXT: [&str; 10] = [
            ".safetensors",
            ".bin",
            ".pt",
            ".pth",
            ".ckpt",
            ".h5",
            ".gguf",
            ".npy",
            ".onnx",
            ".msgpack",
        ];
        size >= self.opts.lfs_threshold || LFS_EXT.iter().any(|e| path.ends_with(e))
    }

    /// Counts a request of `route` against every armed fault on it (each counts from when it was
    /// injected) and takes the action of the first one due.
    fn due_fault(&self, route: HubRoute) -> Option<FaultAction> {
        let mut faults = self.faults.lock().unwrap();
        let mut action = None;
        for f in faults
            .iter_mut()
            .filter(|f| f.route == route && f.times > 0)
        {
            if f.skip > 0 {
                f.skip -= 1;
            } else if action.is_none() {
                f.times -= 1;
                action = Some(f.action.clone());
            }
        }
        faults.retain(|f| f.times > 0);
        action
    }
}

/// Both listeners' single entry: classify, log, apply faults, dispatch.
async fn entry(State(hub): State<Arc<Hub>>, req: Request<Body>, storage: bool) -> Response {
    let (parts, body) = req.into_parts();
    let route = handlers::classify(&parts.method, parts.uri.path(), storage);
    let auth = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let token = auth
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let range = parts
        .headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut cut = None;
    let resp = match hub.due_fault(route) {
        Some(FaultAction::Status {
            status,
            retry_after,
        }) => handlers::injected(status, retry_after),
        Some(FaultAction::Stall(d)) => {
            tokio::time::sleep(d).await;
            dispatch(
                &hub,
                route,
                &parts.method,
                &parts.uri,
                &parts.headers,
                body,
                token.clone(),
                None,
            )
            .await
        }
        Some(FaultAction::CutAfter(n)) => {
            cut = Some(n);
            dispatch(
                &hub,
                route,
                &parts.method,
                &parts.uri,
                &parts.headers,
                body,
                token.clone(),
                cut,
            )
            .await
        }
        None => {
            dispatch(
                &hub,
                route,
                &parts.method,
                &parts.uri,
                &parts.headers,
                body,
                token.clone(),
                cut,
            )
            .await
        }
    };
    hub.log.lock().unwrap().push(HubRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        route,
        storage,
        token,
        authorization: auth.is_some(),
        status: resp.status().as_u16(),
        range,
    });
    resp
}

#[allow(clippy::too_many_arguments)]
async fn dispatch(
    hub: &Arc<Hub>,
    route: HubRoute,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    token: Option<String>,
    cut: Option<u64>,
) -> Response {
    let ctx = handlers::Ctx {
        hub: hub.clone(),
        token,
        uri: uri.clone(),
        headers: headers.clone(),
        method: method.clone(),
        cut,
    };
    match handlers::handle(&ctx, route, body).await {
        Ok(r) | Err(r) => r,
    }
}
