//! The Hugging Face Hub transport's settings and start-up checks (spec §5.2, §6.1; addendum
//! A1, B, C).
//!
//! What it guards: a miner that cannot publish never starts as if it could. Before anything is
//! bound or written the daemon refuses (exit 64, one line naming the field) a missing token, a
//! token the Hub rejects or that cannot write, and a repo id the chain cannot carry (over 32
//! characters, `CHAIN_COMMIT_MAX_HF_REPO_ID_CHARS`). The token never reaches a log, a trace, a
//! job record or an error message.

use std::path::Path;
use std::time::Duration;

use miner_contract::config::HfCfg;
use miner_hub::{HubClient, HubConfig, HubError, RepoId, RepoType};

use crate::commitment::{CHAIN_COMMIT_MAX_HF_REPO_ID_CHARS, HF_CHAIN_REVISION_LENGTH};
use crate::config::{SettingsError, bad};

/// Every repo this daemon touches is a model repo.
pub const KIND: RepoType = RepoType::Model;

/// The Hub transport's settings (validated; the token is never printed).
#[derive(Clone)]
pub struct HubSettings {
    /// Base URL of the Hub (`--hf-endpoint`/`HF_ENDPOINT`, else `hf.endpoint`, else the public Hub).
    pub endpoint: String,
    /// The environment variable the token came from (for messages).
    pub token_env_var: String,
    token: String,
    /// `hf.checkpoint_repo`, when set.
    pub checkpoint_repo: Option<RepoId>,
    /// `hf.default_repo_name`: the repo is `<whoami name>/<this>` without `checkpoint_repo`.
    pub default_repo_name: String,
    /// `hf.copy_guard`: keep the repo private until MinerCommit1 is over.
    pub copy_guard: bool,
    /// The repo shards are uploaded to, once resolved ([`preflight`]).
    pub repo: Option<RepoId>,
    /// Per-request timeouts and retries of the Hub client (tests shorten them).
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub max_retries: u32,
    pub retry_deadline: Duration,
}

impl std::fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("token_env_var", &self.token_env_var)
            .field("token", &"<redacted>")
            .field("repo", &self.repo)
            .field("copy_guard", &self.copy_guard)
            .finish_non_exhaustive()
    }
}

/// Checks a repo id the chain has to carry: `owner/name`, at most 32 characters.
pub fn chain_repo_id(s: &str) -> Result<RepoId, String> {
    let repo: RepoId = s
        .parse()
        .map_err(|e: miner_hub::InvalidRepoId| e.to_string())?;
    let len = s.chars().count();
    if len > CHAIN_COMMIT_MAX_HF_REPO_ID_CHARS {
        return Err(format!(
            "repo id {s:?} is {len} characters; the chain commitment carries at most {CHAIN_COMMIT_MAX_HF_REPO_ID_CHARS}"
        ));
    }
    Ok(repo)
}

/// The revision put on chain: the first 7 characters of a commit oid.
pub fn chain_revision(oid: &str) -> String {
    oid.chars().take(HF_CHAIN_REVISION_LENGTH).collect()
}

impl HubSettings {
    /// Validates the `hf.*` section (`file` names the config in errors) and reads the token.
    /// Touches no network.
    pub fn from_config(
        hf: &HfCfg,
        endpoint_flag: Option<&str>,
        file: &Path,
    ) -> Result<HubSettings, SettingsError> {
        let field = |f: &str| format!("{}: hf.{f}", file.display());
        let endpoint = endpoint_flag
            .map(str::to_owned)
            .or_else(|| hf.endpoint.clone())
            .unwrap_or_else(|| miner_hub::DEFAULT_ENDPOINT.to_owned());
        let endpoint = endpoint.trim().trim_end_matches('/').to_owned();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            let f = if endpoint_flag.is_some() {
                "--hf-endpoint".to_owned()
            } else {
                field("endpoint")
            };
            return Err(bad(f, format!("{endpoint:?} is not an http(s) URL")));
        }
        let var = hf.token_env_var.trim();
        if var.is_empty() || var.contains('=') || var.contains('\0') {
            return Err(bad(
                field("token_env_var"),
                format!("{var:?} is not an environment variable name"),
            ));
        }
        Self::with_token(hf, endpoint, std::env::var(var).ok(), file)
    }

    /// [`Self::from_config`] with the endpoint resolved and the token given (`None`: missing).
    pub fn with_token(
        hf: &HfCfg,
        endpoint: String,
        token: Option<String>,
        file: &Path,
    ) -> Result<HubSettings, SettingsError> {
        let field = |f: &str| format!("{}: hf.{f}", file.display());
        let var = hf.token_env_var.trim();
        let token = token
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                bad(
                    field("token_env_var"),
                    format!(
                        "no Hugging Face token in ${var}: the Hub transport uploads the shard with a write token \
                         (set {var}, or run with --transport http on a network that still has the HTTP routes)"
                    ),
                )
            })?;
        let checkpoint_repo = match hf.checkpoint_repo.as_deref().map(str::trim) {
            None | Some("") | Some("null") | Some("None") => None,
            Some(r) => Some(chain_repo_id(r).map_err(|e| bad(field("checkpoint_repo"), e))?),
        };
        let name = hf.default_repo_name.trim();
        if checkpoint_repo.is_none() && format!("x/{name}").parse::<RepoId>().is_err() {
            return Err(bad(
                field("default_repo_name"),
                format!("{name:?} is not a repo name (no '/', [A-Za-z0-9._-])"),
            ));
        }
        let d = HubConfig::default();
        Ok(HubSettings {
            endpoint,
            token_env_var: var.to_owned(),
            token,
            checkpoint_repo,
            default_repo_name: name.to_owned(),
            copy_guard: hf.copy_guard,
            repo: None,
            connect_timeout: d.connect_timeout,
            read_timeout: d.read_timeout,
            max_retries: d.max_retries,
            retry_deadline: d.retry_deadline,
        })
    }

    /// The Hub client with the token.
    pub fn client(&self) -> Result<HubClient, HubError> {
        HubClient::new(HubConfig {
            endpoint: self.endpoint.clone(),
            token: Some(self.token.clone()),
            connect_timeout: self.connect_timeout,
            read_timeout: self.read_timeout,
            max_retries: self.max_retries,
            retry_deadline: self.retry_deadline,
            ..HubConfig::default()
        })
    }
}

/// Why the start-up check failed.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// The operator must fix the token or the config (exit 64).
    #[error(transparent)]
    Config(#[from] SettingsError),
    /// The Hub could not be asked (down, unreachable): not a configuration error.
    #[error("Hugging Face Hub at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
}

/// What the start-up check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// The token's user (`whoami`).
    pub user: String,
    /// The repo shards go to.
    pub repo: RepoId,
    /// Whether the repo exists, and whether it is private (`None`: it does not exist yet).
    pub private: Option<bool>,
}

/// The start-up checks (also `minerctl hub check`): the token is accepted and may write; the
/// repo id (configured, or `<whoami>/<default_repo_name>`) fits the chain. Sets `hub.repo`.
pub async fn preflight(hub: &mut HubSettings) -> Result<Preflight, PreflightError> {
    let var = hub.token_env_var.clone();
    let client = hub
        .client()
        .map_err(|e| bad("--hf-endpoint", e.to_string()))?;
    let unreachable = |e: &HubError| PreflightError::Unreachable {
        endpoint: hub.endpoint.clone(),
        reason: e.to_string(),
    };
    let who = match client.whoami().await {
        Ok(w) => w,
        Err(e @ (HubError::Unauthorized { .. } | HubError::Forbidden { .. })) => {
            return Err(bad(
                format!("${var}"),
                format!("the Hub refused the token ({e})"),
            )
            .into());
        }
        Err(e) => return Err(unreachable(&e)),
    };
    if !who.can_write {
        return Err(bad(
            format!("${var}"),
            format!(
                "the token of Hub user {:?} is read-only; uploading the shard needs a token with write access",
                who.name
            ),
        )
        .into());
    }
    let repo = match &hub.checkpoint_repo {
        Some(r) => r.clone(),
        None => {
            let id = format!("{}/{}", who.name, hub.default_repo_name);
            chain_repo_id(&id).map_err(|e| {
                bad(
                    "hf.default_repo_name",
                    format!("{e} (set hf.checkpoint_repo to a shorter repo)"),
                )
            })?
        }
    };
    let private = match client.repo_info(&repo, KIND, None).await {
        Ok(info) => Some(info.private),
        Err(HubError::NotFound { .. }) => None,
        Err(e) => return Err(unreachable(&e)),
    };
    hub.repo = Some(repo.clone());
    Ok(Preflight {
        user: who.name,
        repo,
        private,
    })
}

/// What the jobs use: the client with the token, the same without (what validators and
/// copiers see), the resolved repo and the copy guard.
#[derive(Clone)]
pub struct HubRuntime {
    pub client: HubClient,
    pub anon: HubClient,
    pub repo: RepoId,
    pub copy_guard: bool,
}

impl HubRuntime {
    /// Needs the repo resolved by [`preflight`].
    pub fn new(s: &HubSettings) -> Result<HubRuntime, HubError> {
        let repo = s
            .repo
            .clone()
            .ok_or_else(|| HubError::Config("the Hub repo is not resolved yet".into()))?;
        let client = s.client()?;
        Ok(HubRuntime {
            anon: client.anonymous(),
            client,
            repo,
            copy_guard: s.copy_guard,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_repo_ids_are_at_most_32_characters() {
        assert!(chain_repo_id("alice/co").is_ok());
        let r32 = format!("{}/{}", "a".repeat(15), "b".repeat(16));
        assert_eq!(r32.len(), 32);
        assert!(chain_repo_id(&r32).is_ok());
        let r33 = format!("{}/{}", "a".repeat(15), "b".repeat(17));
        let e = chain_repo_id(&r33).unwrap_err();
        assert!(e.contains("33 characters"), "{e}");
        assert!(chain_repo_id("no-slash").is_err());
    }

    #[test]
    fn the_chain_revision_is_seven_characters() {
        assert_eq!(
            chain_revision("0123456789abcdef0123456789abcdef01234567"),
            "0123456"
        );
    }
}
