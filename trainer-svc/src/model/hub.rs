//! Read-only access to Hugging Face Hub repositories (models and datasets) for the trainer's inputs:
//! base weights, the tokenizer and dataset shards.
//!
//! Everything behind [`RemoteRepo`] is hostile: every read is bounded by the caller (`len` bytes
//! exactly, never more), listings are capped, each request has a connect and a per-read stall
//! timeout, and errors are one escaped line. [`HttpRepo`] speaks the Hub's HTTP API (`resolve` with
//! `Range`, `api/<kind>s/<repo>/revision/<rev>`, `api/<kind>s/<repo>/tree/<sha>?recursive=true`); the
//! lead can put `miner-hub`'s client behind the same trait. [`download_range_to`] adds retries that
//! keep the bytes already written (a Hub that fails mid-file loses nothing).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Model or dataset repository (URL prefixes differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn api(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
    fn resolve_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        }
    }
}

/// An error talking to the Hub; `retryable` ones are worth another try.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{what}: not found on the Hub (HTTP 404)")]
    NotFound { what: String },
    #[error("{what}: access denied by the Hub (HTTP {status}); set HF_TOKEN to a token that can read it")]
    Denied { what: String, status: u16 },
    #[error("{what}: Hub answered HTTP {status}")]
    Status { what: String, status: u16 },
    #[error("{what}: cannot reach the Hub at {endpoint:?}: {reason}")]
    Unreachable {
        what: String,
        endpoint: String,
        reason: String,
    },
    #[error("{what}: {reason}")]
    Protocol { what: String, reason: String },
    #[error("{what}: local file: {reason}")]
    Io { what: String, reason: String },
}

impl HubError {
    /// 5xx, 429, timeouts and dropped connections.
    pub fn retryable(&self) -> bool {
        match self {
            HubError::Status { status, .. } => *status >= 500 || *status == 429,
            HubError::Unreachable { .. } => true,
            _ => false,
        }
    }
}

/// One file of a repository listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub path: String,
    pub size: u64,
}

/// A repository pinned at one revision.
pub trait RemoteRepo: Send + Sync {
    /// `owner/name@revision`, for messages and cache paths.
    fn label(&self) -> String;
    /// The commit the revision resolved to (40 hex), used to key caches.
    fn commit(&self) -> Result<String, HubError>;
    /// Every file of the repository at the pinned revision (at most [`MAX_LISTING`]).
    fn list_files(&self) -> Result<Vec<RemoteFile>, HubError>;
    /// Streams exactly `len` bytes of `file` from `start` into `sink`; fewer or more is an error.
    fn read_range(
        &self,
        file: &str,
        start: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), HubError>;
}

/// Most files a listing may have.
pub const MAX_LISTING: usize = 200_000;
/// Most bytes of one in-memory read ([`read_vec`]).
pub const MAX_IN_MEMORY: u64 = 128 << 20;

/// Reads a range into memory (`len <= cap <= MAX_IN_MEMORY`).
pub fn read_vec(
    repo: &dyn RemoteRepo,
    file: &str,
    start: u64,
    len: u64,
    cap: u64,
) -> Result<Vec<u8>, HubError> {
    if len > cap.min(MAX_IN_MEMORY) {
        return Err(HubError::Protocol {
            what: format!("{}/{file:?}", repo.label()),
            reason: format!("{len} bytes is more than the {} allowed", cap.min(MAX_IN_MEMORY)),
        });
    }
    let mut out = Vec::with_capacity(len as usize);
    with_retries(repo, file, || {
        out.clear();
        repo.read_range(file, start, len, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })
    })?;
    Ok(out)
}

/// Attempts per request for retryable errors.
pub const ATTEMPTS: u32 = 5;

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64 << attempt.min(5))
}

fn with_retries<T>(
    repo: &dyn RemoteRepo,
    file: &str,
    mut f: impl FnMut() -> Result<T, HubError>,
) -> Result<T, HubError> {
    let mut attempt = 0;
    loop {
        match f() {
            Err(e) if e.retryable() && attempt + 1 < ATTEMPTS => {
                tracing::warn!(repo = %repo.label(), file = ?file, attempt, error = %e, "Hub read failed; retrying");
                std::thread::sleep(backoff(attempt));
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// Downloads bytes `start..start+len` of `file` to `part` (appending; a partial `part` from an
/// earlier try or run is continued, not restarted). Retries keep what was written. On success
/// `part` holds exactly `len` bytes.
pub fn download_range_to(
    repo: &dyn RemoteRepo,
    file: &str,
    start: u64,
    len: u64,
    part: &Path,
) -> Result<(), HubError> {
    let io = |e: std::io::Error| HubError::Io {
        what: part.display().to_string(),
        reason: e.to_string(),
    };
    let mut attempt = 0;
    loop {
        let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if have > len {
            std::fs::remove_file(part).map_err(io)?;
            continue;
        }
        if have == len {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .map_err(io)?;
        let r = repo.read_range(file, start + have, len - have, &mut |b| f.write_all(b));
        f.flush().map_err(io)?;
        match r {
            Ok(()) => {}
            // A retry continues after the bytes already written.
            Err(e) if e.retryable() && attempt + 1 < ATTEMPTS => {
                tracing::warn!(repo = %repo.label(), file = ?file, attempt, error = %e, "Hub download interrupted; resuming");
                std::thread::sleep(backoff(attempt));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Splits `owner/name[@rev]` (revision default `main`); `None` if it is not a valid repo id.
pub fn parse_repo_ref(s: &str) -> Option<(String, String)> {
    let (repo, rev) = match s.split_once('@') {
        Some((r, v)) => (r, v),
        None => (s, "main"),
    };
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    let (owner, name) = repo.split_once('/')?;
    let rev_ok = !rev.is_empty()
        && rev.len() <= 128
        && !rev.contains("..")
        && rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    (ok_part(owner) && ok_part(name) && rev_ok).then(|| (repo.to_string(), rev.to_string()))
}

/// Where and how to reach the Hub.
#[derive(Clone, PartialEq, Eq)]
pub struct HubEndpoint {
    /// `https://huggingface.co` unless `HF_ENDPOINT` says otherwise.
    pub url: String,
    pub token: Option<String>,
    pub connect_timeout: Duration,
    /// A read that stalls this long fails (and is retried).
    pub read_timeout: Duration,
}

impl std::fmt::Debug for HubEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubEndpoint")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .finish()
    }
}

/// Opens a Hub repository pinned at `revision` (the one place that picks the HTTP client).
pub fn open_repo(
    ep: &HubEndpoint,
    kind: RepoKind,
    repo: &str,
    revision: &str,
) -> Result<Box<dyn RemoteRepo>, HubError> {
    Ok(Box::new(HttpRepo::new(ep, kind, repo, revision)?))
}

impl HubEndpoint {
    pub const DEFAULT_URL: &'static str = "https://huggingface.co";

    pub fn new(url: Option<&str>, token: Option<String>) -> Self {
        HubEndpoint {
            url: url
                .filter(|u| !u.is_empty())
                .unwrap_or(Self::DEFAULT_URL)
                .trim_end_matches('/')
                .to_string(),
            token: token.filter(|t| !t.is_empty()),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// A Hub repository over HTTP, pinned at the commit its revision resolved to on first use.
pub struct HttpRepo {
    ep: HubEndpoint,
    kind: RepoKind,
    repo: String,
    revision: String,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
    commit: std::sync::OnceLock<String>,
}

/// Percent-encodes a repository path, keeping `/`.
fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl HttpRepo {
    /// Builds the client (no network yet). Call from a plain thread, not inside an async runtime.
    pub fn new(
        ep: &HubEndpoint,
        kind: RepoKind,
        repo: &str,
        revision: &str,
    ) -> Result<Self, HubError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let what = format!("{repo}@{revision}");
        let proto = |reason: String| HubError::Protocol {
            what: what.clone(),
            reason,
        };
        let client = reqwest::Client::builder()
            .connect_timeout(ep.connect_timeout)
            .read_timeout(ep.read_timeout)
            .user_agent(concat!("trainer-svc/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| proto(format!("build HTTP client: {e}")))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| proto(format!("start HTTP runtime: {e}")))?;
        Ok(HttpRepo {
            ep: ep.clone(),
            kind,
            repo: repo.to_string(),
            revision: revision.to_string(),
            client,
            rt,
            commit: std::sync::OnceLock::new(),
        })
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let r = self.client.get(url);
        match &self.ep.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn send(&self, what: &str, req: reqwest::RequestBuilder) -> Result<reqwest::Response, HubError> {
        let resp = self.rt.block_on(req.send()).map_err(|e| HubError::Unreachable {
            what: what.to_string(),
            endpoint: self.ep.url.clone(),
            reason: one_line(&e),
        })?;
        let status = resp.status().as_u16();
        match status {
            200..=299 => Ok(resp),
            404 => Err(HubError::NotFound {
                what: what.to_string(),
            }),
            401 | 403 => Err(HubError::Denied {
                what: what.to_string(),
                status,
            }),
            _ => Err(HubError::Status {
                what: what.to_string(),
                status,
            }),
        }
    }

    /// Reads a JSON body of at most `cap` bytes.
    fn get_json(&self, what: &str, url: &str, cap: usize) -> Result<(serde_json::Value, Option<String>), HubError> {
        let mut resp = self.send(what, self.get(url))?;
        let next = resp
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .and_then(next_link);
        let mut body = Vec::new();
        while let Some(c) = self.chunk(what, &mut resp)? {
            if body.len() + c.len() > cap {
                return Err(HubError::Protocol {
                    what: what.to_string(),
                    reason: format!("answer is larger than {cap} bytes"),
                });
            }
            body.extend_from_slice(&c);
        }
        let v = serde_json::from_slice(&body).map_err(|e| HubError::Protocol {
            what: what.to_string(),
            reason: format!("invalid JSON: {e}"),
        })?;
        Ok((v, next))
    }

    fn chunk(&self, what: &str, resp: &mut reqwest::Response) -> Result<Option<bytes::Bytes>, HubError> {
        self.rt.block_on(resp.chunk()).map_err(|e| HubError::Unreachable {
            what: what.to_string(),
            endpoint: self.ep.url.clone(),
            reason: one_line(&e),
        })
    }
}

/// An error and its causes on one line, control characters escaped.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s.escape_debug().to_string()
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(h: &str) -> Option<String> {
    h.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .contains("rel=\"next\"")
            .then(|| url.trim().trim_start_matches('<').trim_end_matches('>').to_string())
    })
}

impl RemoteRepo for HttpRepo {
    fn label(&self) -> String {
        format!("{}@{}", self.repo, self.revision)
    }

    fn commit(&self) -> Result<String, HubError> {
        if let Some(c) = self.commit.get() {
            return Ok(c.clone());
        }
        let what = self.label();
        let url = format!(
            "{}/api/{}/{}/revision/{}",
            self.ep.url,
            self.kind.api(),
            self.repo,
            encode_path(&self.revision)
        );
        let (v, _) = with_retries(self, "", || self.get_json(&what, &url, 16 << 20))?;
        let sha = v
            .get("sha")
            .and_then(|s| s.as_str())
            .filter(|s| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| HubError::Protocol {
                what: what.clone(),
                reason: "revision answer has no 40-hex `sha`".into(),
            })?;
        Ok(self.commit.get_or_init(|| sha.to_ascii_lowercase()).clone())
    }

    fn list_files(&self) -> Result<Vec<RemoteFile>, HubError> {
        let sha = self.commit()?;
        let what = format!("{} file list", self.label());
        let mut url = format!(
            "{}/api/{}/{}/tree/{sha}?recursive=true",
            self.ep.url,
            self.kind.api(),
            self.repo
        );
        let mut out = Vec::new();
        for _page in 0..10_000 {
            let (v, next) = with_retries(self, "", || self.get_json(&what, &url, 64 << 20))?;
            let items = v.as_array().ok_or_else(|| HubError::Protocol {
                what: what.clone(),
                reason: "tree answer is not a JSON array".into(),
            })?;
            for it in items {
                if it.get("type").and_then(|t| t.as_str()) != Some("file") {
                    continue;
                }
                let (Some(path), Some(size)) = (
                    it.get("path").and_then(|p| p.as_str()),
                    it.get("size").and_then(|s| s.as_u64()),
                ) else {
                    continue;
                };
                out.push(RemoteFile {
                    path: path.to_string(),
                    size,
                });
                if out.len() > MAX_LISTING {
                    return Err(HubError::Protocol {
                        what,
                        reason: format!("more than {MAX_LISTING} files"),
                    });
                }
            }
            match next {
                Some(n) if n.starts_with(&self.ep.url) => url = n,
                _ => return Ok(out),
            }
        }
        Ok(out)
    }

    fn read_range(
        &self,
        file: &str,
        start: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), HubError> {
        let what = format!("{}/{file:?}", self.label());
        if len == 0 {
            return Ok(());
        }
        let sha = self.commit()?;
        let url = format!(
            "{}/{}{}/resolve/{sha}/{}",
            self.ep.url,
            self.kind.resolve_prefix(),
            self.repo,
            encode_path(file)
        );
        let end = start + len - 1;
        let req = self.get(&url).header("range", format!("bytes={start}-{end}"));
        let mut resp = self.send(&what, req)?;
        // 206 is the answer to a range; a 200 is the whole file, acceptable from offset 0 only.
        if resp.status().as_u16() != 206 && start != 0 {
            return Err(HubError::Protocol {
                what,
                reason: format!("asked for a byte range, got HTTP {}", resp.status().as_u16()),
            });
        }
        let mut got = 0u64;
        while got < len {
            let Some(c) = self.chunk(&what, &mut resp)? else {
                return Err(HubError::Unreachable {
                    what,
                    endpoint: self.ep.url.clone(),
                    reason: format!("connection closed after {got} of {len} bytes"),
                });
            };
            let take = (c.len() as u64).min(len - got) as usize;
            sink(&c[..take]).map_err(|e| HubError::Io {
                what: what.clone(),
                reason: e.to_string(),
            })?;
            got += take as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_refs() {
        assert_eq!(
            parse_repo_ref("deepseek-ai/DeepSeek-V2-Lite"),
            Some(("deepseek-ai/DeepSeek-V2-Lite".into(), "main".into()))
        );
        assert_eq!(
            parse_repo_ref("a/b@604d5664dddd88a0433dbae533b7fe9472482de0"),
            Some(("a/b".into(), "604d5664dddd88a0433dbae533b7fe9472482de0".into()))
        );
        for bad in ["/x", "a/b/c", "a", "a/b@", "a/b@../x", "a b/c", "./c", "a/b@x y"] {
            assert_eq!(parse_repo_ref(bad), None, "{bad}");
        }
    }

    #[test]
    fn link_header() {
        assert_eq!(
            next_link("<http://h/api/x?cursor=2>; rel=\"next\""),
            Some("http://h/api/x?cursor=2".into())
        );
        assert_eq!(next_link("<http://h/a>; rel=\"prev\""), None);
        assert_eq!(encode_path("en/c4 x.json.gz"), "en/c4%20x.json.gz");
    }
}
