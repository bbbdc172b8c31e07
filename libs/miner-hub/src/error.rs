//! Typed Hub errors: what a caller acts on (auth, not found, rate limit, timeout), one escaped line each.

use std::time::Duration;

/// Why a Hub call failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// 401: no token or a bad one (the Hub also answers 401 for a private repo read anonymously).
    #[error("Hub {url}: 401 unauthorized (missing or invalid token){detail}")]
    Unauthorized { url: String, detail: String },
    /// 403: the token may not do this (e.g. a read-only token writing).
    #[error("Hub {url}: 403 forbidden (the token lacks the permission, e.g. write access){detail}")]
    Forbidden { url: String, detail: String },
    /// 404 (`what` is the Hub's `X-Error-Code`, e.g. `RepoNotFound`, `EntryNotFound`, `RevisionNotFound`).
    #[error("Hub {url}: 404 not found ({what}){detail}")]
    NotFound {
        url: String,
        what: String,
        detail: String,
    },
    /// 409 on something other than creating a repo.
    #[error("Hub {url}: 409 conflict{detail}")]
    Conflict { url: String, detail: String },
    /// 429 after the retries (or a `Retry-After` past the deadline).
    #[error("Hub {url}: 429 rate limited (retry after {retry_after:?})")]
    RateLimited {
        url: String,
        retry_after: Option<Duration>,
    },
    /// 5xx after the retries.
    #[error("Hub {url}: server error {status}{detail}")]
    Server {
        url: String,
        status: u16,
        detail: String,
    },
    /// Any other unexpected status.
    #[error("Hub {url}: HTTP {status}{detail}")]
    Status {
        url: String,
        status: u16,
        detail: String,
    },
    /// Connecting or waiting for bytes took longer than the configured timeout.
    #[error("Hub {url}: timed out ({what})")]
    Timeout { url: String, what: String },
    /// A body or file larger than allowed.
    #[error("Hub {what}: too large ({size} bytes > limit {limit})")]
    TooLarge { what: String, size: u64, limit: u64 },
    /// The connection failed (refused, reset, cut mid-body) after the retries.
    #[error("Hub {url}: connection failed: {msg}")]
    Connection { url: String, msg: String },
    /// Local file I/O.
    #[error("Hub local file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The Hub answered something that does not follow the protocol.
    #[error("Hub protocol error: {0}")]
    Protocol(String),
    /// Bad arguments or configuration.
    #[error("Hub client: {0}")]
    Config(String),
}

impl HubError {
    /// True when the miner's own credentials or input are at fault (retrying will not help).
    pub fn is_miner_fault(&self) -> bool {
        matches!(
            self,
            HubError::Unauthorized { .. }
                | HubError::Forbidden { .. }
                | HubError::Config(_)
                | HubError::Io { .. }
        )
    }
    /// True when the same call may succeed later (rate limit, server error, timeout, connection).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HubError::RateLimited { .. }
                | HubError::Server { .. }
                | HubError::Timeout { .. }
                | HubError::Connection { .. }
        )
    }
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        HubError::Io {
            path: crate::escape(&path.display().to_string()),
            source,
        }
    }
}
