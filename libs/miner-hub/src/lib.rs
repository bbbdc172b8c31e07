//! A Hugging Face Hub client for the miner, on the workspace's HTTP stack (reqwest + rustls, tokio).
//!
//! What it guards:
//! * **Bounded memory.** Uploads stream from disk (the sha256 oid is computed streaming before the
//!   LFS batch; multipart parts are read slice by slice) and downloads stream to disk, so memory does
//!   not grow with the file. Every response body is read with a cap ([`MAX_JSON_BYTES`] for JSON,
//!   [`MAX_ERROR_BYTES`] for error bodies).
//! * **Bounded time.** A connect timeout, a per-read stall timeout ([`HubError::Timeout`]), and
//!   retries on 429/5xx that honour `Retry-After` but never wait past [`HubConfig::retry_deadline`].
//! * **Credentials stay home.** The token is only sent to the configured endpoint's origin: storage
//!   URLs from the LFS batch and CDN redirects on downloads never see it. Redirects are followed at
//!   most [`MAX_REDIRECTS`] times and never from https to http.
//! * **Clear errors.** [`HubError`]'s `Display` is one line; strings from the network are escaped.
//!
//! Why not the `hf-hub` crate (Hugging Face's own, 1.0.0, read from its source): its upload offers
//! `["basic", "multipart", "xet"]` to the LFS batch but only transfers when the Hub picks `xet`
//! (through the `hf-xet` 1.5 dependency); otherwise it logs a warning and commits the file inline
//! as base64 after `std::fs::read` of the whole file, so a 1 GiB shard would sit in memory (x2.3)
//! and no `basic`/`multipart` PUT is ever made. We need LFS `basic`/`multipart` (what
//! huggingface_hub without `hf_xet` does, and what the stand-in serves), streaming from disk.

mod client;
mod download;
mod error;
mod upload;

pub use client::HubClient;
pub use download::FileBody;
pub use error::HubError;

use std::str::FromStr;
use std::time::Duration;

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Cap on a JSON reply (whoami, batch, commit, one tree page).
pub const MAX_JSON_BYTES: usize = 8 << 20;
/// Cap on an error body kept for the message.
pub const MAX_ERROR_BYTES: usize = 4 << 10;
/// Redirects followed on one request.
pub const MAX_REDIRECTS: usize = 5;
/// Cap on [`HubClient::get_range`].
pub const MAX_RANGE_BYTES: u64 = 64 << 20;
/// Files up to this size may be committed inline (base64) when the Hub says `regular`.
pub const MAX_REGULAR_BYTES: u64 = 10 << 20;

/// Model or dataset repository; decides the URL prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RepoType {
    Model,
    Dataset,
}

impl RepoType {
    /// `models` / `datasets` as in `/api/<kind>s/<repo>`.
    pub fn api_plural(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }
    /// The prefix of git-side URLs: `` for models, `datasets/` for datasets.
    pub fn url_prefix(self) -> &'static str {
        match self {
            RepoType::Model => "",
            RepoType::Dataset => "datasets/",
        }
    }
    /// The `type` field of `repos/create` (`None` for models).
    pub fn create_type(self) -> Option<&'static str> {
        match self {
            RepoType::Model => None,
            RepoType::Dataset => Some("dataset"),
        }
    }
}

/// A validated `owner/name` repository id (charset `[A-Za-z0-9._-]`, exactly one `/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoId(String);

impl RepoId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn owner(&self) -> &str {
        self.0.split_once('/').map(|(o, _)| o).unwrap_or("")
    }
    pub fn name(&self) -> &str {
        self.0.split_once('/').map(|(_, n)| n).unwrap_or("")
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a repo id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid Hub repo id {0:?}: expected owner/name with [A-Za-z0-9._-], at most 96 characters each"
)]
pub struct InvalidRepoId(pub String);

impl FromStr for RepoId {
    type Err = InvalidRepoId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok_part = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && p != "."
                && p != ".."
                && !p.starts_with('-')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        match s.split_once('/') {
            Some((o, n)) if ok_part(o) && ok_part(n) => Ok(RepoId(s.to_string())),
            _ => Err(InvalidRepoId(s.chars().take(200).collect())),
        }
    }
}

/// How to reach the Hub.
#[derive(Clone)]
pub struct HubConfig {
    /// Base URL, default [`DEFAULT_ENDPOINT`]; `HF_ENDPOINT` overrides it in [`HubConfig::from_env`].
    pub endpoint: String,
    /// Bearer token (from the env var that `hf.token_env_var` names).
    pub token: Option<String>,
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response (stall timeout), also for the headers.
    pub read_timeout: Duration,
    /// Retries of one request on 429/5xx/connection failures.
    pub max_retries: u32,
    /// Longest total time spent waiting between retries of one request (caps `Retry-After`).
    pub retry_deadline: Duration,
    /// Upload slice size for basic PUTs and multipart parts when streaming from disk.
    pub io_buffer: usize,
    /// Multipart part PUTs in flight at once (each holds at most ~5 `io_buffer`s).
    pub parallel_parts: usize,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_deadline", &self.retry_deadline)
            .field("parallel_parts", &self.parallel_parts)
            .finish()
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            max_retries: 5,
            retry_deadline: Duration::from_secs(120),
            io_buffer: 1 << 20,
            parallel_parts: 4,
        }
    }
}

impl HubConfig {
    /// Endpoint: `endpoint` if given, else `HF_ENDPOINT`, else the public Hub. Token: the env var
    /// `token_env_var` (default `HF_TOKEN` when empty), ignored when empty.
    pub fn from_env(endpoint: Option<&str>, token_env_var: &str) -> Self {
        let endpoint = endpoint
            .map(str::to_string)
            .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let var = if token_env_var.is_empty() {
            "HF_TOKEN"
        } else {
            token_env_var
        };
        let token = std::env::var(var)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        HubConfig {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            ..Default::default()
        }
    }
}

/// `GET /api/whoami-v2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoAmI {
    pub name: String,
    /// False only when the Hub says the token's role is `read`.
    pub can_write: bool,
}

/// `GET /api/<kind>s/<repo>[/revision/<rev>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoInfo {
    /// The 40-hex commit the revision points at.
    pub sha: String,
    pub private: bool,
}

/// The commit an upload created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// 40 lowercase hex.
    pub oid: String,
    pub url: Option<String>,
}

/// What `HEAD .../resolve/<rev>/<file>` says about a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    /// The 40-hex commit `rev` resolved to (`X-Repo-Commit`).
    pub commit: String,
    /// `X-Linked-Etag` (the sha256 for LFS files) or `ETag`, quotes removed.
    pub etag: String,
    pub size: u64,
}

/// One file of a tree listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    pub path: String,
    pub size: u64,
    /// The sha256 of an LFS file.
    pub lfs_oid: Option<String>,
}

/// Escapes an untrusted string for a one-line message (and truncates it).
pub(crate) fn escape(s: &str) -> String {
    let mut out: String = s.chars().take(300).flat_map(char::escape_debug).collect();
    if s.chars().count() > 300 {
        out.push('…');
    }
    out
}

/// True for 40 lowercase hex digits (a full commit oid).
pub fn is_commit_oid(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!("alice/co".parse::<RepoId>().is_ok());
        assert!("a.b-c_d/E.9".parse::<RepoId>().is_ok());
        for bad in [
            "", "alice", "a/b/c", "a/", "/b", "a/..", "a b/c", "a/b\n", "a/-x",
        ] {
            assert!(bad.parse::<RepoId>().is_err(), "{bad:?}");
        }
    }
}
