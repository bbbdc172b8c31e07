//! The HTTP core: one reqwest client per policy, the token only for the endpoint's origin, retries
//! on 429/5xx/connection failures honouring `Retry-After` within a deadline, capped body reads, and
//! the small JSON calls (whoami, repos, settings, info, tree listing).

use crate::{
    HubConfig, HubError, MAX_ERROR_BYTES, MAX_JSON_BYTES, MAX_REDIRECTS, RepoFile, RepoId,
    RepoInfo, RepoType, WhoAmI, escape,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A Hub client. Cheap to clone (the connection pools are shared).
#[derive(Clone)]
pub struct HubClient {
    pub(crate) cfg: Arc<HubConfig>,
    origin: url::Url,
    /// Follows up to [`MAX_REDIRECTS`] redirects, never https -> http (downloads).
    pub(crate) http: reqwest::Client,
    /// Follows none (HEAD on resolve, API calls).
    pub(crate) plain: reqwest::Client,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient").field("cfg", &self.cfg).finish()
    }
}

fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        let from_https = attempt.previous().iter().any(|u| u.scheme() == "https");
        if from_https && attempt.url().scheme() != "https" {
            return attempt.error("refusing a redirect from https to http");
        }
        attempt.follow()
    })
}

impl HubClient {
    /// Builds the client. Proxies come from the environment (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`).
    pub fn new(cfg: HubConfig) -> Result<Self, HubError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let origin = url::Url::parse(&cfg.endpoint)
            .map_err(|e| HubError::Config(format!("endpoint {:?}: {e}", escape(&cfg.endpoint))))?;
        if !matches!(origin.scheme(), "http" | "https") || origin.host_str().is_none() {
            return Err(HubError::Config(format!(
                "endpoint {:?} is not an http(s) URL",
                escape(&cfg.endpoint)
            )));
        }
        let builder = |policy| {
            reqwest::Client::builder()
                .user_agent(concat!("miner-hub/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(cfg.connect_timeout)
                .read_timeout(cfg.read_timeout)
                .redirect(policy)
                .build()
                .map_err(|e| HubError::Config(format!("HTTP client: {e}")))
        };
        let http = builder(redirect_policy())?;
        let plain = builder(reqwest::redirect::Policy::none())?;
        let mut cfg = cfg;
        cfg.endpoint = cfg.endpoint.trim_end_matches('/').to_string();
        Ok(HubClient {
            cfg: Arc::new(cfg),
            origin,
            http,
            plain,
        })
    }

    /// The same endpoint without a token: what validators and copiers see.
    pub fn anonymous(&self) -> HubClient {
        let mut cfg = (*self.cfg).clone();
        cfg.token = None;
        HubClient {
            cfg: Arc::new(cfg),
            ..self.clone()
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.cfg.endpoint
    }

    /// True when `url` has the endpoint's scheme, host and port (the only place the token goes).
    pub(crate) fn same_origin(&self, url: &str) -> bool {
        url::Url::parse(url).is_ok_and(|u| {
            u.scheme() == self.origin.scheme()
                && u.host_str() == self.origin.host_str()
                && u.port_or_known_default() == self.origin.port_or_known_default()
        })
    }

    pub(crate) fn api_url(&self, kind: RepoType, repo: &RepoId, rest: &str) -> String {
        format!(
            "{}/api/{}/{}{}",
            self.cfg.endpoint,
            kind.api_plural(),
            repo,
            rest
        )
    }

    /// Sends the request `build` makes (again on each retry), adding the token for the endpoint's
    /// origin. Retries 429/500/502/503/504 and connection failures (not timeouts) up to
    /// `max_retries`, waiting `Retry-After` (or a backoff) while the total wait stays within
    /// `retry_deadline`. Returns the last response whatever its status.
    pub(crate) async fn send_raw<F>(&self, url: &str, build: F) -> Result<Response, HubError>
    where
        F: Fn() -> Result<RequestBuilder, HubError>,
    {
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            let mut rb = build()?;
            if let Some(t) = self.cfg.token.as_deref().filter(|_| self.same_origin(url)) {
                rb = rb.bearer_auth(t);
            }
            let wait = match rb.send().await {
                Ok(resp) => {
                    let st = resp.status();
                    let retryable = st == StatusCode::TOO_MANY_REQUESTS
                        || matches!(st.as_u16(), 500 | 502 | 503 | 504);
                    if !retryable || attempt >= self.cfg.max_retries {
                        return Ok(resp);
                    }
                    let wait = retry_after(&resp).unwrap_or_else(|| backoff(attempt));
                    if started.elapsed() + wait > self.cfg.retry_deadline {
                        return Ok(resp);
                    }
                    tracing::debug!(url = %escape(url), status = st.as_u16(), ?wait, "Hub: retrying");
                    wait
                }
                Err(e)
                    if !e.is_timeout()
                        && (e.is_connect() || e.is_request())
                        && attempt < self.cfg.max_retries =>
                {
                    let wait = backoff(attempt);
                    if started.elapsed() + wait > self.cfg.retry_deadline {
                        return Err(map_reqwest(url, e));
                    }
                    tracing::debug!(url = %escape(url), error = %e, "Hub: retrying after a connection error");
                    wait
                }
                Err(e) => return Err(map_reqwest(url, e)),
            };
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// [`Self::send_raw`], then any status but 2xx/3xx becomes a [`HubError`].
    pub(crate) async fn send<F>(&self, url: &str, build: F) -> Result<Response, HubError>
    where
        F: Fn() -> Result<RequestBuilder, HubError>,
    {
        let resp = self.send_raw(url, build).await?;
        if resp.status().is_success() || resp.status().is_redirection() {
            Ok(resp)
        } else {
            Err(status_error(url, resp).await)
        }
    }

    /// A JSON call on the plain (non-redirecting) client.
    pub(crate) async fn json(
        &self,
        method: Method,
        url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, HubError> {
        let resp = self
            .send(url, || {
                let rb = self.plain.request(method.clone(), url);
                Ok(match body {
                    Some(b) => rb.json(b),
                    None => rb,
                })
            })
            .await?;
        if resp.status().is_redirection() {
            return Err(HubError::Protocol(format!(
                "unexpected redirect {} from {}",
                resp.status().as_u16(),
                escape(url)
            )));
        }
        read_json(url, resp).await
    }

    /// `GET /api/whoami-v2`.
    pub async fn whoami(&self) -> Result<WhoAmI, HubError> {
        let url = format!("{}/api/whoami-v2", self.cfg.endpoint);
        let v = self.json(Method::GET, &url, None).await?;
        let name = str_field(&v, "name", &url)?.to_string();
        let role = v
            .pointer("/auth/accessToken/role")
            .and_then(|r| r.as_str())
            .unwrap_or("");
        Ok(WhoAmI {
            name,
            can_write: role != "read",
        })
    }

    /// `POST /api/repos/create`; `Ok(false)` when the repo exists already (409).
    pub async fn create_repo(
        &self,
        repo: &RepoId,
        kind: RepoType,
        private: bool,
    ) -> Result<bool, HubError> {
        let url = format!("{}/api/repos/create", self.cfg.endpoint);
        let mut body = serde_json::json!({
            "name": repo.name(),
            "organization": repo.owner(),
            "visibility": if private { "private" } else { "public" },
        });
        if let Some(t) = kind.create_type() {
            body["type"] = t.into();
        }
        let resp = self
            .send_raw(&url, || Ok(self.plain.post(&url).json(&body)))
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::CONFLICT => Ok(false),
            _ => Err(status_error(&url, resp).await),
        }
    }

    /// `PUT /api/<kind>s/<repo>/settings {"visibility": "private"|"public"}`.
    pub async fn set_private(
        &self,
        repo: &RepoId,
        kind: RepoType,
        private: bool,
    ) -> Result<(), HubError> {
        let url = self.api_url(kind, repo, "/settings");
        let body = serde_json::json!({ "visibility": if private { "private" } else { "public" } });
        self.json(Method::PUT, &url, Some(&body)).await.map(|_| ())
    }

    /// `GET /api/<kind>s/<repo>[/revision/<rev>]`: the commit the revision points at, and privacy.
    pub async fn repo_info(
        &self,
        repo: &RepoId,
        kind: RepoType,
        revision: Option<&str>,
    ) -> Result<RepoInfo, HubError> {
        let rest = revision
            .map(|r| format!("/revision/{}", encode(r, false)))
            .unwrap_or_default();
        let url = self.api_url(kind, repo, &rest);
        let v = self.json(Method::GET, &url, None).await?;
        let sha = str_field(&v, "sha", &url)?.to_string();
        if !crate::is_commit_oid(&sha) {
            return Err(HubError::Protocol(format!(
                "{}: sha {:?} is not a 40-hex commit",
                escape(&url),
                escape(&sha)
            )));
        }
        Ok(RepoInfo {
            sha,
            private: v.get("private").and_then(|p| p.as_bool()).unwrap_or(false),
        })
    }

    /// `GET /api/<kind>s/<repo>/tree/<rev>[/<prefix>]?recursive=true`, following `Link: rel="next"`
    /// pages (same origin only). Files only (directories are implied by paths).
    pub async fn list_files(
        &self,
        repo: &RepoId,
        kind: RepoType,
        revision: &str,
        prefix: Option<&str>,
    ) -> Result<Vec<RepoFile>, HubError> {
        const MAX_PAGES: usize = 10_000;
        const MAX_FILES: usize = 1_000_000;
        let prefix = prefix
            .map(|p| format!("/{}", encode(p.trim_matches('/'), true)))
            .unwrap_or_default();
        let mut url = self.api_url(
            kind,
            repo,
            &format!(
                "/tree/{}{}?recursive=true&expand=false",
                encode(revision, false),
                prefix
            ),
        );
        let mut files = Vec::new();
        for _ in 0..MAX_PAGES {
            let resp = self.send(&url, || Ok(self.plain.get(&url))).await?;
            let next = next_link(&resp);
            let page = read_json(&url, resp).await?;
            let entries = page.as_array().ok_or_else(|| {
                HubError::Protocol(format!("{}: tree page is not a list", escape(&url)))
            })?;
            for e in entries {
                if e.get("type").and_then(|t| t.as_str()) != Some("file") {
                    continue;
                }
                let path = str_field(e, "path", &url)?.to_string();
                let size = e.get("size").and_then(|s| s.as_u64()).unwrap_or(0);
                let lfs_oid = e
                    .pointer("/lfs/oid")
                    .and_then(|o| o.as_str())
                    .map(str::to_string);
                files.push(RepoFile {
                    path,
                    size,
                    lfs_oid,
                });
            }
            if files.len() > MAX_FILES {
                return Err(HubError::TooLarge {
                    what: format!("tree of {repo}"),
                    size: files.len() as u64,
                    limit: MAX_FILES as u64,
                });
            }
            match next {
                None => return Ok(files),
                Some(n) if self.same_origin(&n) => url = n,
                Some(n) => {
                    return Err(HubError::Protocol(format!(
                        "tree pagination to another origin: {:?}",
                        escape(&n)
                    )));
                }
            }
        }
        Err(HubError::Protocol(format!(
            "tree of {repo}: more than {MAX_PAGES} pages"
        )))
    }
}

/// `Retry-After` in seconds (HTTP dates are treated as absent).
fn retry_after(resp: &Response) -> Option<Duration> {
    let v = resp.headers().get(header::RETRY_AFTER)?.to_str().ok()?;
    v.trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.min(5))).min(Duration::from_secs(8))
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(resp: &Response) -> Option<String> {
    let v = resp.headers().get(header::LINK)?.to_str().ok()?;
    v.split(',').find_map(|part| {
        let (u, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            u.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

pub(crate) fn map_reqwest(url: &str, e: reqwest::Error) -> HubError {
    let url = escape(url);
    if e.is_timeout() {
        let what = if e.is_connect() {
            "connect"
        } else {
            "no bytes within the read timeout"
        };
        return HubError::Timeout {
            url,
            what: what.to_string(),
        };
    }
    if e.is_redirect() {
        return HubError::Protocol(format!(
            "{url}: redirect refused: {}",
            escape(&full_chain(&e))
        ));
    }
    HubError::Connection {
        url,
        msg: escape(&full_chain(&e)),
    }
}

fn full_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Reads a whole body, refusing more than `limit` bytes.
pub(crate) async fn read_limited(
    url: &str,
    mut resp: Response,
    limit: usize,
) -> Result<Vec<u8>, HubError> {
    if let Some(len) = resp.content_length().filter(|&l| l > limit as u64) {
        return Err(HubError::TooLarge {
            what: format!("reply of {}", escape(url)),
            size: len,
            limit: limit as u64,
        });
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| map_reqwest(url, e))? {
        if out.len() + chunk.len() > limit {
            return Err(HubError::TooLarge {
                what: format!("reply of {}", escape(url)),
                size: (out.len() + chunk.len()) as u64,
                limit: limit as u64,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

pub(crate) async fn read_json(url: &str, resp: Response) -> Result<serde_json::Value, HubError> {
    let body = read_limited(url, resp, MAX_JSON_BYTES).await?;
    serde_json::from_slice(&body)
        .map_err(|e| HubError::Protocol(format!("{}: invalid JSON: {e}", escape(url))))
}

pub(crate) fn str_field<'a>(
    v: &'a serde_json::Value,
    key: &str,
    url: &str,
) -> Result<&'a str, HubError> {
    v.get(key).and_then(|x| x.as_str()).ok_or_else(|| {
        HubError::Protocol(format!(
            "{}: reply lacks the string field {key:?}",
            escape(url)
        ))
    })
}

/// Maps a non-success response to a [`HubError`], reading at most [`MAX_ERROR_BYTES`] of its body.
pub(crate) async fn status_error(url: &str, resp: Response) -> HubError {
    let status = resp.status().as_u16();
    let code = header_str(&resp, "x-error-code").unwrap_or_default();
    let msg = header_str(&resp, "x-error-message");
    let retry = retry_after(&resp);
    let body = read_limited(url, resp, MAX_ERROR_BYTES)
        .await
        .unwrap_or_default();
    let body_msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    let text = msg.unwrap_or(body_msg);
    let detail = if text.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", escape(text.trim()))
    };
    let url = escape(url);
    match status {
        401 => HubError::Unauthorized { url, detail },
        403 => HubError::Forbidden { url, detail },
        404 => HubError::NotFound {
            url,
            what: if code.is_empty() {
                "not found".into()
            } else {
                escape(&code)
            },
            detail,
        },
        409 => HubError::Conflict { url, detail },
        429 => HubError::RateLimited {
            url,
            retry_after: retry,
        },
        500..=599 => HubError::Server {
            url,
            status,
            detail,
        },
        _ => HubError::Status {
            url,
            status,
            detail,
        },
    }
}

pub(crate) fn header_str(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Percent-encodes a path (`keep_slash`) or a revision (slashes encoded too).
pub(crate) fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
