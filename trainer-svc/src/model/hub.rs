//! Read-only access to Hugging Face Hub repositories (models and datasets) for the trainer's inputs:
//! base weights, the tokenizer and dataset shards.
//!
//! Everything behind [`RemoteRepo`] is hostile: every read is bounded by the caller (`len` bytes
//! exactly, never more), listings are capped, each request has a connect and a per-read stall
//! timeout, and errors are one escaped line. [`HttpRepo`] adapts `miner-hub`'s client (revision →
//! commit, tree listing, bounded `Range` reads of at most 16 MiB each, pinned to the commit).
//! [`download_range_to`] adds retries that keep the bytes already written (a Hub that fails
//! mid-file loses nothing).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Model or dataset repository (URL prefixes differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

/// An error talking to the Hub; `retryable` ones are worth another try.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{what}: not found on the Hub (HTTP 404)")]
    NotFound { what: String },
    #[error(
        "{what}: access denied by the Hub (HTTP {status}); set HF_TOKEN to a token that can read it"
    )]
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
    /// The files under directory `prefix` (a large dataset repo lists one config, not all).
    fn list_files_under(&self, prefix: &str) -> Result<Vec<RemoteFile>, HubError> {
        let dir = format!("{}/", prefix.trim_matches('/'));
        Ok(self
            .list_files()?
            .into_iter()
            .filter(|f| f.path.starts_with(&dir))
            .collect())
    }
    /// The size of `file`, `None` if the repository has no such file.
    fn file_size(&self, file: &str) -> Result<Option<u64>, HubError> {
        Ok(self
            .list_files()?
            .into_iter()
            .find(|f| f.path == file)
            .map(|f| f.size))
    }
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
            reason: format!(
                "{len} bytes is more than the {} allowed",
                cap.min(MAX_IN_MEMORY)
            ),
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

/// A Hub repository through `miner-hub`'s client, pinned at the commit its revision resolved to
/// on first use.
pub struct HttpRepo {
    client: miner_hub::HubClient,
    kind: RepoKind,
    repo: miner_hub::RepoId,
    revision: String,
    rt: tokio::runtime::Runtime,
    commit: std::sync::OnceLock<String>,
    endpoint: String,
}

/// Largest single `Range` request (the client caps one read at 64 MiB).
const RANGE_CHUNK: u64 = 16 << 20;

impl HttpRepo {
    /// Builds the client (no network yet). Call from a plain thread, not inside an async runtime.
    pub fn new(
        ep: &HubEndpoint,
        kind: RepoKind,
        repo: &str,
        revision: &str,
    ) -> Result<Self, HubError> {
        let what = format!("{repo}@{revision}");
        let proto = |reason: String| HubError::Protocol {
            what: what.clone(),
            reason,
        };
        let repo_id: miner_hub::RepoId = repo
            .parse()
            .map_err(|e: miner_hub::InvalidRepoId| proto(e.to_string()))?;
        let cfg = miner_hub::HubConfig {
            endpoint: ep.url.clone(),
            token: ep.token.clone(),
            connect_timeout: ep.connect_timeout,
            read_timeout: ep.read_timeout,
            // Retries that keep downloaded bytes happen here ([`download_range_to`]).
            max_retries: 2,
            ..miner_hub::HubConfig::default()
        };
        let client = miner_hub::HubClient::new(cfg).map_err(|e| proto(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| proto(format!("start HTTP runtime: {e}")))?;
        Ok(HttpRepo {
            client,
            kind,
            repo: repo_id,
            revision: revision.to_string(),
            rt,
            commit: std::sync::OnceLock::new(),
            endpoint: ep.url.clone(),
        })
    }

    fn list(&self, prefix: Option<&str>) -> Result<Vec<RemoteFile>, HubError> {
        let sha = self.commit()?;
        let files = self
            .rt
            .block_on(
                self.client
                    .list_files(&self.repo, self.hub_kind(), &sha, prefix),
            )
            .map_err(|e| self.map(&format!("{} file list", self.label()), e))?;
        if files.len() > MAX_LISTING {
            return Err(HubError::Protocol {
                what: self.label(),
                reason: format!("more than {MAX_LISTING} files"),
            });
        }
        Ok(files
            .into_iter()
            .map(|f| RemoteFile {
                path: f.path,
                size: f.size,
            })
            .collect())
    }

    fn hub_kind(&self) -> miner_hub::RepoType {
        match self.kind {
            RepoKind::Model => miner_hub::RepoType::Model,
            RepoKind::Dataset => miner_hub::RepoType::Dataset,
        }
    }

    fn map(&self, what: &str, e: miner_hub::HubError) -> HubError {
        use miner_hub::HubError as E;
        let what = what.to_string();
        match e {
            E::NotFound { .. } => HubError::NotFound { what },
            E::Unauthorized { .. } => HubError::Denied { what, status: 401 },
            E::Forbidden { .. } => HubError::Denied { what, status: 403 },
            E::RateLimited { .. } => HubError::Status { what, status: 429 },
            E::Server { status, .. } => HubError::Status { what, status },
            E::Timeout { .. } | E::Connection { .. } => HubError::Unreachable {
                what,
                endpoint: self.endpoint.clone(),
                reason: e.to_string(),
            },
            other => HubError::Protocol {
                what,
                reason: other.to_string(),
            },
        }
    }
}

impl RemoteRepo for HttpRepo {
    fn label(&self) -> String {
        format!("{}@{}", self.repo, self.revision)
    }

    fn commit(&self) -> Result<String, HubError> {
        if let Some(c) = self.commit.get() {
            return Ok(c.clone());
        }
        let info = self
            .rt
            .block_on(
                self.client
                    .repo_info(&self.repo, self.hub_kind(), Some(&self.revision)),
            )
            .map_err(|e| self.map(&self.label(), e))?;
        Ok(self
            .commit
            .get_or_init(|| info.sha.to_ascii_lowercase())
            .clone())
    }

    fn list_files(&self) -> Result<Vec<RemoteFile>, HubError> {
        self.list(None)
    }

    fn list_files_under(&self, prefix: &str) -> Result<Vec<RemoteFile>, HubError> {
        match self.list(Some(prefix)) {
            Err(HubError::NotFound { .. }) => Ok(Vec::new()),
            r => r,
        }
    }

    fn file_size(&self, file: &str) -> Result<Option<u64>, HubError> {
        let sha = self.commit()?;
        match self.rt.block_on(
            self.client
                .head_file(&self.repo, self.hub_kind(), &sha, file),
        ) {
            Ok(m) => Ok(Some(m.size)),
            Err(miner_hub::HubError::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.map(&format!("{}/{file:?}", self.label()), e)),
        }
    }

    fn read_range(
        &self,
        file: &str,
        start: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), HubError> {
        let what = format!("{}/{file:?}", self.label());
        let sha = self.commit()?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(RANGE_CHUNK);
            let bytes = self
                .rt
                .block_on(self.client.get_range(
                    &self.repo,
                    self.hub_kind(),
                    &sha,
                    file,
                    start + done,
                    n,
                ))
                .map_err(|e| self.map(&what, e))?;
            if bytes.len() as u64 != n {
                return Err(HubError::Unreachable {
                    what,
                    endpoint: self.endpoint.clone(),
                    reason: format!("range read returned {} of {n} bytes", bytes.len()),
                });
            }
            sink(&bytes).map_err(|e| HubError::Io {
                what: what.clone(),
                reason: e.to_string(),
            })?;
            done += n;
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
            Some((
                "a/b".into(),
                "604d5664dddd88a0433dbae533b7fe9472482de0".into()
            ))
        );
        for bad in [
            "/x", "a/b/c", "a", "a/b@", "a/b@../x", "a b/c", "./c", "a/b@x y",
        ] {
            assert_eq!(parse_repo_ref(bad), None, "{bad}");
        }
    }
}
