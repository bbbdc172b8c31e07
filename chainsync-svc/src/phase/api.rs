//! Client for the subnet owner's phase service (spec §3.3).
//!
//! Same retry policy as the reference (`_get_with_retry`): per-request timeout, no retry on
//! {400,401,403,404,405,409,422}, exponential backoff, plus a caller-given deadline that no
//! attempt or sleep runs past. Answers are read up to [`MAX_JSON_BODY`]; redirects are not
//! followed.

use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::Instrument;

use super::schedule::{NextPhases, PhaseInfo, PreviousPhases};
use crate::transport::http_client;
use crate::transport::limits::{BodyError, MAX_JSON_BODY, read_body_limited};
use crate::transport::retry::{AttemptError, RetryError, RetryPolicy, is_non_retryable, retry};

/// The live owner API (spec §2.2.1 `cycle.owner_url`).
pub const DEFAULT_OWNER_URL: &str = "https://cycle-api.connito.ai:443";

/// Why a phase-API call produced no answer.
#[derive(Debug, thiserror::Error)]
pub enum PhaseApiError {
    #[error("phase API {url}: HTTP {status}, not retried")]
    Rejected { url: String, status: u16 },
    #[error("phase API {url}: no answer after {attempts} attempts: {last}")]
    Unavailable {
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("phase API {url}: deadline reached after {attempts} attempts{}", last.as_deref().map(|l| format!(": {l}")).unwrap_or_default())]
    Deadline {
        url: String,
        attempts: u32,
        last: Option<String>,
    },
    #[error("phase API {url}: malformed response: {reason}")]
    BadResponse { url: String, reason: String },
    #[error("phase API: cannot build HTTP client: {0}")]
    Client(String),
}

/// The owner phase service at `base_url`.
#[derive(Debug, Clone)]
pub struct OwnerApi {
    base_url: String,
    policy: RetryPolicy,
    client: reqwest::Client,
}

impl OwnerApi {
    /// A client for `base_url` (no trailing slash needed) with the given retry policy.
    pub fn new(base_url: &str, policy: RetryPolicy) -> Result<Self, PhaseApiError> {
        let client = http_client().map_err(|e| PhaseApiError::Client(e.to_string()))?;
        Ok(OwnerApi {
            base_url: base_url.trim_end_matches('/').to_owned(),
            policy,
            client,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `GET /get_phase`.
    pub async fn get_phase(&self, deadline: Option<Instant>) -> Result<PhaseInfo, PhaseApiError> {
        self.get_json("/get_phase", deadline).await
    }

    /// `GET /blocks_until_next_phase`.
    pub async fn blocks_until_next_phase(
        &self,
        deadline: Option<Instant>,
    ) -> Result<NextPhases, PhaseApiError> {
        self.get_json("/blocks_until_next_phase", deadline).await
    }

    /// `GET /previous_phase_blocks`.
    pub async fn previous_phase_blocks(
        &self,
        deadline: Option<Instant>,
    ) -> Result<PreviousPhases, PhaseApiError> {
        self.get_json("/previous_phase_blocks", deadline).await
    }

    /// `GET /get_validator_whitelist`: the whitelisted validator hotkeys (SS58).
    pub async fn validator_whitelist(
        &self,
        deadline: Option<Instant>,
    ) -> Result<Vec<String>, PhaseApiError> {
        self.get_json("/get_validator_whitelist", deadline).await
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        route: &str,
        deadline: Option<Instant>,
    ) -> Result<T, PhaseApiError> {
        let url = format!("{}{}", self.base_url, route);
        let outcome = retry(&self.policy, deadline, |attempt, timeout: Duration| {
            let req = self.client.get(&url).timeout(timeout);
            // Inside a job the request is a child span of it; the scheduler's polls are not traced.
            let span = if tracing::Span::current().is_none() {
                tracing::Span::none()
            } else {
                crate::transport::http_span("GET", route, &url, attempt)
            };
            let attempt = async move {
                let resp = req
                    .send()
                    .await
                    .map_err(|e| AttemptError::Retryable(Failure::Io(e.to_string())))?;
                let status = resp.status().as_u16();
                tracing::Span::current().record("http.response.status_code", status);
                if status >= 400 {
                    return Err(if is_non_retryable(status) {
                        AttemptError::Fatal(Failure::Status(status))
                    } else {
                        AttemptError::Retryable(Failure::Status(status))
                    });
                }
                let body = read_body_limited(resp, MAX_JSON_BODY, timeout, false)
                    .await
                    .map_err(|e| match e {
                        BodyError::TooLarge { .. } => AttemptError::Fatal(Failure::Shape(e.to_string())),
                        other => AttemptError::Retryable(Failure::Io(other.to_string())),
                    })?;
                serde_json::from_slice::<T>(&body)
                    .map_err(|e| AttemptError::Fatal(Failure::Shape(e.to_string())))
            };
            async move {
                let r = attempt.await;
                crate::transport::record_attempt(&r);
                r
            }
            .instrument(span)
        })
        .await;
        outcome.map_err(|e| match e {
            RetryError::Fatal {
                error: Failure::Status(status),
                ..
            } => PhaseApiError::Rejected { url, status },
            RetryError::Fatal { error, attempts } => match error {
                Failure::Shape(reason) => PhaseApiError::BadResponse { url, reason },
                other => PhaseApiError::Unavailable {
                    url,
                    attempts,
                    last: other.to_string(),
                },
            },
            RetryError::Exhausted { attempts, last } => PhaseApiError::Unavailable {
                url,
                attempts,
                last: last.to_string(),
            },
            RetryError::Deadline { attempts, last } => PhaseApiError::Deadline {
                url,
                attempts,
                last: last.map(|l| l.to_string()),
            },
        })
    }
}

/// How one request failed.
#[derive(Debug)]
enum Failure {
    Status(u16),
    Shape(String),
    Io(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status(s) => write!(f, "HTTP {s}"),
            Failure::Shape(r) => write!(f, "malformed response: {r}"),
            Failure::Io(m) => f.write_str(m),
        }
    }
}
