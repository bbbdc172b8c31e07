//! HTTP transport to validators — the historical routes `GET /get-checkpoint` (download of
//! the validator baseline, spec §5.3) and `POST /submit-checkpoint` (submission of our
//! checkpoint, spec §6.2) — and the retry policy shared with the phase-API client.
//!
//! **Invariant:** a download publishes a validator checkpoint only after the validator's
//! signature over `h`, our model hash of the file, the expert-group keys and finiteness all
//! pass; anything else leaves no directory and no temporary behind.

pub mod download;
pub mod hub;
pub mod limits;
pub mod retry;
pub mod submit;
pub mod verify;

use std::time::Duration;

pub use download::download_checkpoint;
pub use limits::{
    PeerAddresses, check_free_space, check_peer_address, max_shard_bytes, read_body_limited,
};
pub use retry::{Backoff, NON_RETRYABLE_STATUSES, RetryPolicy, is_non_retryable};
pub use submit::{Submission, SubmitReceipt, submit_checkpoint};
pub use verify::{VerifyError, verify_checkpoint_file};

/// A client span for one HTTP request (attempt `attempt` of a call), named `METHOD route`; a
/// child of the current span (a job's). The caller records `http.response.status_code` and,
/// on failure, `error` (see [`record_attempt`]).
pub fn http_span(method: &'static str, route: &str, url: &str, attempt: u32) -> tracing::Span {
    tracing::info_span!(
        "http request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "client",
        http.request.method = method,
        url.full = %url,
        attempt,
        http.response.status_code = tracing::field::Empty,
        error = tracing::field::Empty,
    )
}

/// Records an attempt's failure on the current span.
pub(crate) fn record_attempt<T, E: std::fmt::Display>(r: &Result<T, retry::AttemptError<E>>) {
    if let Err(retry::AttemptError::Fatal(e) | retry::AttemptError::Retryable(e)) = r {
        tracing::Span::current().record("error", tracing::field::display(e));
    }
}

/// The crate's HTTP client (rustls with the `ring` provider, no proxies from the environment,
/// redirects never followed: a validator or the phase API answering 3xx gets an error, so a
/// peer cannot send us to another host or port).
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    // Installing twice is harmless: the first provider stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// A validator's HTTP endpoint (`ip:port` from its axon info) and hotkey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub ip: String,
    pub port: u16,
    pub hotkey_ss58: String,
}

impl Peer {
    pub fn base_url(&self) -> String {
        if self.ip.contains(':') {
            format!("http://[{}]:{}", self.ip, self.port)
        } else {
            format!("http://{}:{}", self.ip, self.port)
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// Why a download or submission failed. Every variant names the peer (`ip:port`).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("validator {peer}: HTTP {status}: {body}")]
    Status {
        peer: String,
        status: u16,
        body: String,
    },
    #[error("validator {peer}: {reason}")]
    Network { peer: String, reason: String },
    #[error("validator {peer}: no data for {after:?} ({what})")]
    Timeout {
        peer: String,
        what: &'static str,
        after: Duration,
    },
    #[error("validator {peer}: body ended after {got} of {expected} bytes")]
    Truncated {
        peer: String,
        got: u64,
        expected: u64,
    },
    #[error("validator {peer}: bad response: {reason}")]
    BadResponse { peer: String, reason: String },
    #[error("validator {peer}: checkpoint rejected: {source}")]
    Rejected {
        peer: String,
        #[source]
        source: VerifyError,
    },
    #[error("validator {peer}: gave up after {attempts} attempts: {last}")]
    Exhausted {
        peer: String,
        attempts: u32,
        last: Box<TransportError>,
    },
    #[error("validator {peer}: deadline reached after {attempts} attempts{}", last.as_ref().map(|l| format!(": {l}")).unwrap_or_default())]
    Deadline {
        peer: String,
        attempts: u32,
        last: Option<Box<TransportError>>,
    },
    #[error("validator {peer}: local file {path}: {reason}")]
    Local {
        peer: String,
        path: String,
        reason: String,
    },
    #[error("validator {peer}: bad request parameters: {reason}")]
    Invalid { peer: String, reason: String },
    /// The body is (or says it is) larger than the expert group's shard can be.
    #[error("validator {peer}: {what} of {got} bytes exceeds the {limit} bytes {why}")]
    TooLarge {
        peer: String,
        what: &'static str,
        got: u64,
        limit: u64,
        why: &'static str,
    },
    /// The validator answered with a redirect (never followed).
    #[error("validator {peer}: HTTP {status} redirect to {location:?} refused")]
    Redirect {
        peer: String,
        status: u16,
        location: String,
    },
}

impl TransportError {
    /// The HTTP status a validator answered, when that is why it failed (looks through retries).
    pub fn status(&self) -> Option<u16> {
        match self {
            TransportError::Status { status, .. } | TransportError::Redirect { status, .. } => {
                Some(*status)
            }
            TransportError::Exhausted { last, .. } => last.status(),
            TransportError::Deadline { last: Some(l), .. } => l.status(),
            _ => None,
        }
    }
}

/// The signed download request message: `target_pubkey(32) ‖ u64_be(block)` (spec §5.3).
pub fn block_message(target_pubkey: &[u8; 32], block: u64) -> [u8; 40] {
    let mut m = [0u8; 40];
    m[..32].copy_from_slice(target_pubkey);
    m[32..].copy_from_slice(&block.to_be_bytes());
    m
}
