//! `minerctl hub check|push|pull`: the Hugging Face Hub side of a miner, by hand.
//!
//! * `check --path RUN`: chainsync-svc's start-up checks on demand (token present, accepted,
//!   able to write; repo id within the chain's 32 characters) and whether the repo is public.
//! * `push FILE (--path RUN | --repo REPO)`: uploads a shard and prints `r` and `rv`, the two
//!   values a MinerCommit2 commitment carries.
//! * `pull REPO@REV --group G DIR`: downloads `model_expgroup_<G>.safetensors` (else `.pt`) at a
//!   revision into DIR, verifying it while it streams (routed-expert keys of the group, finite
//!   values, and the hash with `--hash`), and prints its model hash.
//!
//! Exit codes: 64 configuration (token, repo id), 65 a refused file, 66 a missing file or
//! repo, 69 the Hub unreachable, 1 anything else.

use std::io::Write;
use std::path::{Path, PathBuf};

use chainsync_svc::hub::{HubSettings, PreflightError, chain_repo_id, chain_revision, preflight};
use chainsync_svc::transport::hub::{HubFetchError, fetch_into};
use clap::{Args, Subcommand};
use miner_contract::{ExpertGroup, MinerConfig};
use miner_hub::{HubClient, HubConfig, HubError, RepoId, RepoType};
use serde_json::json;

use crate::exit::{CliError, Exit};

#[derive(Debug, Subcommand)]
pub enum HubCommand {
    /// chainsync-svc's Hub start-up checks on demand: token present, accepted and able to
    /// write; repo id (hf.checkpoint_repo or <user>/<hf.default_repo_name>) at most 32
    /// characters; and whether the repo is public.
    Check(CheckArgs),
    /// Upload a shard (model_expgroup_<gid>.pt or .safetensors) to the miner's repo; prints
    /// `r` and `rv` (the 7-character revision) for a MinerCommit2 commitment.
    Push(PushArgs),
    /// Download and verify one shard at REPO@REV into DIR (.safetensors first, then .pt).
    Pull(PullArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The run directory (or its config.yaml): its `hf.*` settings.
    #[arg(long, env = "MINERCTL_PATH")]
    pub path: PathBuf,
    /// The Hub endpoint (default: hf.endpoint of the config, else https://huggingface.co).
    #[arg(long, env = "HF_ENDPOINT")]
    pub hf_endpoint: Option<String>,
    #[arg(long, env = "MINERCTL_JSON")]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("dest").required(true).args(["path", "repo"])))]
pub struct PushArgs {
    /// The shard file.
    pub file: PathBuf,
    /// Upload to the run directory's repo (hf.checkpoint_repo or <user>/<hf.default_repo_name>).
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// Upload to this repo ("owner/name", at most 32 characters).
    #[arg(long)]
    pub repo: Option<String>,
    /// Create the repo private if it does not exist yet.
    #[arg(long)]
    pub private: bool,
    /// The environment variable holding the write token (default: hf.token_env_var of the
    /// config, else HF_TOKEN).
    #[arg(long)]
    pub token_env_var: Option<String>,
    #[arg(long, env = "HF_ENDPOINT")]
    pub hf_endpoint: Option<String>,
    #[arg(long, env = "MINERCTL_JSON")]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// `owner/name@revision` (a commit, a 7+ hex prefix, or a branch).
    pub source: String,
    /// The expert group id of the shard.
    #[arg(long)]
    pub group: u32,
    /// The directory to write the shard into (created if missing).
    pub dir: PathBuf,
    /// The model hash the file must have (48 hex), e.g. a commitment's `h`.
    #[arg(long)]
    pub hash: Option<String>,
    /// The expert group definition from this run directory (default: the built-in groups).
    #[arg(long)]
    pub path: Option<PathBuf>,
    #[arg(long, env = "HF_ENDPOINT")]
    pub hf_endpoint: Option<String>,
    #[arg(long, env = "MINERCTL_JSON")]
    pub json: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(Exit::Other, format!("start the async runtime: {e}")))
}

fn load_config(path: &Path) -> Result<(MinerConfig, PathBuf, PathBuf), CliError> {
    let (file, dir) = chainsync_svc::config::resolve_path(path);
    let (cfg, _) = MinerConfig::load(&file)
        .map_err(|e| CliError::new(Exit::Usage, format!("{}: {e}", file.display())))?;
    Ok((cfg, file, dir))
}

fn hub_exit(e: &HubError) -> Exit {
    match e {
        HubError::Unauthorized { .. } | HubError::Forbidden { .. } | HubError::Config(_) => {
            Exit::Usage
        }
        HubError::NotFound { .. } => Exit::NoInput,
        HubError::Io { .. } => Exit::NoInput,
        e if e.is_transient() => Exit::Unavailable,
        _ => Exit::Other,
    }
}

fn preflight_error(e: PreflightError) -> CliError {
    match e {
        PreflightError::Config(e) => CliError::new(Exit::Usage, e.to_string()),
        e @ PreflightError::Unreachable { .. } => CliError::new(Exit::Unavailable, e.to_string()),
    }
}

/// `minerctl hub ...`.
pub fn run(cmd: HubCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let rt = runtime()?;
    match cmd {
        HubCommand::Check(a) => rt.block_on(check(&a, out)),
        HubCommand::Push(a) => rt.block_on(push(&a, out)),
        HubCommand::Pull(a) => rt.block_on(pull(&a, out)),
    }
}

fn emit(out: &mut dyn Write, json: bool, text: String, value: serde_json::Value) {
    let _ = if json {
        writeln!(out, "{value}")
    } else {
        write!(out, "{text}")
    };
}

async fn check(a: &CheckArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let (cfg, file, _) = load_config(&a.path)?;
    let mut hub = HubSettings::from_config(&cfg.hf, a.hf_endpoint.as_deref(), &file)
        .map_err(|e| CliError::new(Exit::Usage, e.to_string()))?;
    let p = preflight(&mut hub).await.map_err(preflight_error)?;
    let visibility = match p.private {
        Some(true) => "private",
        Some(false) => "public",
        None => "not created yet",
    };
    let guard = if hub.copy_guard {
        "on (private during MinerCommit1, public after)"
    } else {
        "off (public during MinerCommit1)"
    };
    let text = format!(
        "endpoint    {}\ntoken       ${} of user {:?}: can write\nrepo        {} ({} characters; the chain allows 32)\nvisibility  {visibility}\ncopy guard  {guard}\n",
        hub.endpoint,
        hub.token_env_var,
        p.user,
        p.repo,
        p.repo.as_str().chars().count()
    );
    emit(
        out,
        a.json,
        text,
        json!({"endpoint": hub.endpoint, "user": p.user, "can_write": true, "repo": p.repo.as_str(),
               "exists": p.private.is_some(), "public": p.private == Some(false), "copy_guard": hub.copy_guard}),
    );
    Ok(())
}

/// `model_expgroup_<gid>.pt|.safetensors` or a usage error.
fn shard_name(file: &Path) -> Result<String, CliError> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ok = ["pt", "safetensors"].iter().any(|ext| {
        name.strip_prefix("model_expgroup_")
            .and_then(|r| r.strip_suffix(&format!(".{ext}")))
            .is_some_and(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
    });
    if !ok {
        return Err(CliError::new(
            Exit::Usage,
            format!("{name:?} is not a shard name (model_expgroup_<gid>.pt or .safetensors)"),
        ));
    }
    Ok(name)
}

async fn push(a: &PushArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let name = shard_name(&a.file)?;
    let size = std::fs::metadata(&a.file)
        .map_err(|e| CliError::new(Exit::NoInput, format!("{}: {e}", a.file.display())))?
        .len();
    let (client, repo) = match (&a.path, &a.repo) {
        (Some(path), _) => {
            let (mut cfg, file, _) = load_config(path)?;
            if let Some(v) = &a.token_env_var {
                cfg.hf.token_env_var = v.clone();
            }
            let mut hub = HubSettings::from_config(&cfg.hf, a.hf_endpoint.as_deref(), &file)
                .map_err(|e| CliError::new(Exit::Usage, e.to_string()))?;
            let p = preflight(&mut hub).await.map_err(preflight_error)?;
            let client = hub
                .client()
                .map_err(|e| CliError::new(Exit::Usage, e.to_string()))?;
            (client, p.repo)
        }
        (None, Some(r)) => {
            let repo = chain_repo_id(r).map_err(|e| CliError::new(Exit::Usage, e))?;
            let var = a.token_env_var.as_deref().unwrap_or("HF_TOKEN");
            let cfg = HubConfig::from_env(a.hf_endpoint.as_deref(), var);
            if cfg.token.is_none() {
                return Err(CliError::new(
                    Exit::Usage,
                    format!("no Hugging Face token in ${var} (uploads need a write token)"),
                ));
            }
            let client =
                HubClient::new(cfg).map_err(|e| CliError::new(Exit::Usage, e.to_string()))?;
            (client, repo)
        }
        (None, None) => return Err(CliError::new(Exit::Usage, "--path or --repo is required")),
    };
    let fail = |what: &str, e: HubError| CliError::new(hub_exit(&e), format!("{what}: {e}"));
    client
        .create_repo(&repo, RepoType::Model, a.private)
        .await
        .map_err(|e| fail(&format!("create {repo}"), e))?;
    let summary = format!("minerctl hub push {name}");
    let ci = client
        .upload_file(&repo, RepoType::Model, &a.file, &name, &summary, None)
        .await
        .map_err(|e| fail(&format!("upload {name} to {repo}"), e))?;
    let rv = chain_revision(&ci.oid);
    let text = format!(
        "r       {repo}\nrv      {rv}\ncommit  {}\nfile    {name} ({size} bytes)\n",
        ci.oid
    );
    emit(
        out,
        a.json,
        text,
        json!({"r": repo.as_str(), "rv": rv, "commit": ci.oid, "file": name, "bytes": size}),
    );
    Ok(())
}

fn group_for(a: &PullArgs) -> Result<ExpertGroup, CliError> {
    if let Some(path) = &a.path {
        let (cfg, file, dir) = load_config(path)?;
        let g = cfg.expert_group(Some(&dir)).map_err(|e| {
            CliError::new(
                Exit::Usage,
                format!("{}: task.expert_group_name: {e}", file.display()),
            )
        })?;
        if g.group_id != a.group {
            return Err(CliError::new(
                Exit::Usage,
                format!(
                    "the run directory's expert group is {}, not {}",
                    g.group_id, a.group
                ),
            ));
        }
        return Ok(g);
    }
    ExpertGroup::builtin_names()
        .into_iter()
        .filter_map(|n| ExpertGroup::builtin(n).ok())
        .find(|g| g.group_id == a.group)
        .ok_or_else(|| {
            CliError::new(
                Exit::Usage,
                format!(
                    "no built-in expert group {} (pass --path RUN for its definition)",
                    a.group
                ),
            )
        })
}

async fn pull(a: &PullArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let Some((repo, rev)) = a.source.split_once('@') else {
        return Err(CliError::new(Exit::Usage, "expected REPO@REVISION"));
    };
    let repo: RepoId = repo
        .parse()
        .map_err(|e: miner_hub::InvalidRepoId| CliError::new(Exit::Usage, e.to_string()))?;
    if rev.is_empty()
        || rev.len() > 100
        || !rev
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
    {
        return Err(CliError::new(Exit::Usage, format!("bad revision {rev:?}")));
    }
    let expected = match &a.hash {
        Some(h) => Some(h.parse().map_err(|_| {
            CliError::new(
                Exit::Usage,
                format!("--hash {h:?} is not 48 hex characters"),
            )
        })?),
        None => None,
    };
    let group = group_for(a)?;
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| CliError::new(Exit::NoInput, format!("{}: {e}", a.dir.display())))?;
    let client = HubClient::new(HubConfig::from_env(a.hf_endpoint.as_deref(), "HF_TOKEN"))
        .map_err(|e| CliError::new(Exit::Usage, e.to_string()))?;
    let progress = |_: &chainsync_svc::transport::hub::HubFetchProgress| {};
    // Into a private staging directory first: a refused or partial file never lands in DIR.
    let stage = a.dir.join(format!(".minerctl-pull.{}", std::process::id()));
    std::fs::create_dir_all(&stage)
        .map_err(|e| CliError::new(Exit::NoInput, format!("{}: {e}", stage.display())))?;
    let fetched = fetch_into(
        &client,
        repo.as_str(),
        &repo,
        rev,
        &group,
        &stage,
        expected,
        None,
        &progress,
    )
    .await;
    let result = match fetched {
        Ok((f, h)) => {
            let dest = a.dir.join(f.file_name().unwrap_or_default());
            std::fs::rename(&f, &dest)
                .map(|()| (dest.clone(), h))
                .map_err(|e| CliError::new(Exit::Other, format!("{}: {e}", dest.display())))
        }
        Err(e) => {
            let exit = match &e {
                HubFetchError::Rejected { .. } | HubFetchError::TooLarge { .. } => Exit::Data,
                HubFetchError::Missing { .. } => Exit::NoInput,
                HubFetchError::Hub { source, .. } => hub_exit(source),
                HubFetchError::Local { .. } => Exit::NoInput,
                _ => Exit::Other,
            };
            Err(CliError::new(exit, e.to_string()))
        }
    };
    let _ = std::fs::remove_dir_all(&stage);
    let (file, hash) = result?;
    let text = format!("file  {}\nhash  {}\n", file.display(), hash.to_hex());
    emit(
        out,
        a.json,
        text,
        json!({"file": file.display().to_string(), "hash": hash.to_hex(), "repo": repo.as_str(), "revision": rev}),
    );
    Ok(())
}
