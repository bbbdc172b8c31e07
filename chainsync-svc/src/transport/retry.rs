//! Deadline-aware retries shared by the phase-API client and the validator transport.
//!
//! **Invariant:** no attempt starts, and no backoff sleep is taken, that would end after the
//! caller's deadline; each attempt's timeout is clipped to the time left.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// HTTP statuses the reference never retries (spec §3.3, §6.2).
pub const NON_RETRYABLE_STATUSES: [u16; 7] = [400, 401, 403, 404, 405, 409, 422];

/// True when a failed request with this status must not be retried.
pub fn is_non_retryable(status: u16) -> bool {
    NON_RETRYABLE_STATUSES.contains(&status)
}

/// Sleep between attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Backoff {
    /// `base^attempt` seconds after failed attempt `attempt` (1-based): 2, 4, 8, ... for base 2.
    Exponential { base_secs: f64 },
    /// The same sleep every time.
    Fixed(Duration),
}

impl Backoff {
    /// Sleep after the `attempt`-th failed attempt (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        match *self {
            Backoff::Exponential { base_secs } => {
                let secs = base_secs.max(0.0).powi(attempt.min(64) as i32);
                Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
            }
            Backoff::Fixed(d) => d,
        }
    }
}

/// Timeout per attempt, number of retries after the first attempt, and the backoff.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub attempt_timeout: Duration,
    pub retries: u32,
    pub backoff: Backoff,
}

impl RetryPolicy {
    /// The owner phase API's policy: 10 s per request, 5 retries, `2^attempt` s (spec §3.3).
    pub fn phase_api() -> Self {
        RetryPolicy {
            attempt_timeout: Duration::from_secs(10),
            retries: 5,
            backoff: Backoff::Exponential { base_secs: 2.0 },
        }
    }

    /// The historical HTTP submission policy: 300 s per attempt, 3 retries, 60 s apart (spec §6.2).
    pub fn submit() -> Self {
        RetryPolicy {
            attempt_timeout: Duration::from_secs(300),
            retries: 3,
            backoff: Backoff::Fixed(Duration::from_secs(60)),
        }
    }

    /// Download from a validator: 30 s without progress ends an attempt; 2 attempts 10 s apart
    /// (the reference's current download policy, spec §5.1).
    pub fn download() -> Self {
        RetryPolicy {
            attempt_timeout: Duration::from_secs(30),
            retries: 1,
            backoff: Backoff::Fixed(Duration::from_secs(10)),
        }
    }
}

/// How one attempt failed.
#[derive(Debug)]
pub enum AttemptError<E> {
    /// Worth another attempt (timeout, connection error, 5xx).
    Retryable(E),
    /// Never retried (a non-retryable status, a bad signature, ...).
    Fatal(E),
}

/// Why [`retry`] gave up.
#[derive(Debug)]
pub enum RetryError<E> {
    /// An attempt failed with a non-retryable error.
    Fatal { attempts: u32, error: E },
    /// All `1 + retries` attempts failed.
    Exhausted { attempts: u32, last: E },
    /// The deadline left no room for (another) attempt; `last` is the last failure, if any.
    Deadline { attempts: u32, last: Option<E> },
}

/// Runs `op(attempt, attempt_timeout)` until it succeeds, fails fatally, runs out of retries or
/// would run past `deadline`. `op` must itself respect the timeout it is given.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    deadline: Option<Instant>,
    mut op: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut(u32, Duration) -> Fut,
    Fut: Future<Output = Result<T, AttemptError<E>>>,
{
    let mut attempt: u32 = 0;
    let mut last: Option<E> = None;
    loop {
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(RetryError::Deadline {
                        attempts: attempt,
                        last,
                    });
                }
                left.min(policy.attempt_timeout)
            }
            None => policy.attempt_timeout,
        };
        attempt += 1;
        match op(attempt, timeout).await {
            Ok(v) => return Ok(v),
            Err(AttemptError::Fatal(error)) => {
                return Err(RetryError::Fatal {
                    attempts: attempt,
                    error,
                });
            }
            Err(AttemptError::Retryable(e)) => {
                if attempt > policy.retries {
                    return Err(RetryError::Exhausted {
                        attempts: attempt,
                        last: e,
                    });
                }
                let sleep = policy.backoff.delay(attempt);
                if let Some(d) = deadline {
                    // Sleeping past the deadline would only lead to a refused attempt.
                    if Instant::now() + sleep >= d {
                        return Err(RetryError::Deadline {
                            attempts: attempt,
                            last: Some(e),
                        });
                    }
                }
                tracing::debug!(
                    attempt,
                    sleep_ms = sleep.as_millis() as u64,
                    "retrying after failed attempt"
                );
                last = Some(e);
                tokio::time::sleep(sleep).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_api_backoff_is_2_4_8_16_32() {
        let p = RetryPolicy::phase_api();
        let secs: Vec<u64> = (1..=p.retries)
            .map(|a| p.backoff.delay(a).as_secs())
            .collect();
        assert_eq!(secs, [2, 4, 8, 16, 32]);
        assert_eq!(
            RetryPolicy::submit().backoff.delay(3),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn non_retryable_set_matches_the_reference() {
        for s in [400, 401, 403, 404, 405, 409, 422] {
            assert!(is_non_retryable(s));
        }
        for s in [408, 413, 429, 500, 502, 503, 504] {
            assert!(!is_non_retryable(s));
        }
    }

    #[tokio::test]
    async fn exhausts_after_one_plus_retries_attempts() {
        let policy = RetryPolicy {
            attempt_timeout: Duration::from_secs(1),
            retries: 2,
            backoff: Backoff::Fixed(Duration::ZERO),
        };
        let mut calls = 0;
        let r: Result<(), _> = retry(&policy, None, |_, _| {
            calls += 1;
            async { Err(AttemptError::Retryable("boom")) }
        })
        .await;
        assert!(matches!(
            r,
            Err(RetryError::Exhausted {
                attempts: 3,
                last: "boom"
            })
        ));
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    async fn passed_deadline_makes_no_attempt() {
        let policy = RetryPolicy::phase_api();
        let mut calls = 0;
        let r: Result<(), RetryError<&str>> = retry(&policy, Some(Instant::now()), |_, _| {
            calls += 1;
            async { Ok(()) }
        })
        .await;
        assert!(matches!(
            r,
            Err(RetryError::Deadline {
                attempts: 0,
                last: None
            })
        ));
        assert_eq!(calls, 0);
    }
}
