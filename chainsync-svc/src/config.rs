//! Command line and resolved settings of the daemon. Everything an operator can get wrong
//! (config file, wallet, network, addresses) is checked here, before anything is bound or
//! written; a [`SettingsError`] names the field or file and maps to exit status 64.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use miner_contract::{ExpertGroup, MinerConfig};
use miner_keys::Hotkey;

use crate::chain::Endpoint;
use crate::phase::{CyclePeriods, PhaseSchedule, PhaseSourceKind};
use crate::transport::Backoff;

pub use miner_service::LogFormat;

/// `chainsync-svc` flags (each also readable from the environment).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "chainsync-svc",
    version,
    about = "Follows the subnet's phases; downloads the validator baseline, commits and submits"
)]
pub struct Cli {
    /// The Connito `config.yaml`, or the run directory holding it.
    #[arg(long, env = "CHAINSYNC_PATH")]
    pub path: PathBuf,
    /// Root of the bittensor wallets (`<root>/<coldkey>/hotkeys/<hotkey>`).
    #[arg(long, env = "BT_WALLET_PATH", default_value = "~/.bittensor/wallets")]
    pub wallet_path: PathBuf,
    /// Name of an environment variable holding the password of an encrypted hotkey.
    #[arg(long, env = "CHAINSYNC_PASSWORD_ENV")]
    pub password_env: Option<String>,
    /// A file holding the password of an encrypted hotkey (mode 0600; one line). Wins over
    /// the systemd credential and `--password-env`.
    #[arg(long, env = "CHAINSYNC_WALLET_PASSWORD_FILE", value_name = "FILE")]
    pub wallet_password_file: Option<PathBuf>,
    /// The systemd credential holding the password (`LoadCredential=NAME:...` in the unit):
    /// read from `$CREDENTIALS_DIRECTORY/NAME` when that is set and holds it.
    #[arg(
        long,
        env = "CHAINSYNC_WALLET_PASSWORD_CREDENTIAL",
        default_value = "wallet-password",
        value_name = "NAME"
    )]
    pub wallet_password_credential: String,
    /// `finney`, `test`, `archive`, `local` or a ws:// / wss:// URL (default: `chain.network` of the config).
    #[arg(long, env = "CHAINSYNC_NETWORK")]
    pub network: Option<String>,
    /// Where the phase comes from.
    #[arg(
        long,
        env = "CHAINSYNC_PHASE_SOURCE",
        value_enum,
        default_value = "owner-api"
    )]
    pub phase_source: PhaseSourceKind,
    /// The owner phase API (default: `cycle.owner_url` of the config).
    #[arg(long, env = "CHAINSYNC_OWNER_URL")]
    pub owner_url: Option<String>,
    /// Validator hotkeys (SS58, comma-separated; `@FILE` reads one per line, `#` comments) that
    /// count as validators when the owner phase API does not name them: always with
    /// `--phase-source local`, and as a fallback when the API's whitelist is unavailable.
    /// Without a whitelist, role gating is off: downloads consider every neuron's commitment and
    /// the submission job finds no validator to submit to.
    #[arg(
        long,
        env = "CHAINSYNC_VALIDATOR_WHITELIST",
        value_delimiter = ',',
        value_name = "SS58,..|@FILE"
    )]
    pub validator_whitelist: Vec<String>,
    /// gRPC address.
    #[arg(long, env = "CHAINSYNC_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,
    /// Prometheus exposition address.
    #[arg(
        long,
        env = "CHAINSYNC_METRICS_LISTEN",
        default_value = "127.0.0.1:8101"
    )]
    pub metrics_listen: SocketAddr,
    /// `text` or `json` log lines.
    #[arg(long, env = "CHAINSYNC_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// OTLP/gRPC collector for spans, e.g. `http://127.0.0.1:4317` (off when unset).
    #[arg(long, env = "CHAINSYNC_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// PEM certificate chain for TLS on the gRPC listener (with `--tls-key`). Required to
    /// listen on a non-loopback address.
    #[arg(long, env = "CHAINSYNC_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "CHAINSYNC_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Pause between attempts to submit the checkpoint to the validator, in milliseconds
    /// (default: the reference's 60 s). For tests with short phases and for slow links; a retry
    /// is never started past the Submission phase's end either way.
    #[arg(long, env = "CHAINSYNC_SUBMIT_RETRY_BACKOFF_MS", value_name = "MS")]
    pub submit_retry_backoff_ms: Option<u64>,
    /// Pause between attempts to download the validator baseline, in milliseconds (default:
    /// the reference's 10 s). For tests with short phases and for slow links.
    #[arg(long, env = "CHAINSYNC_DOWNLOAD_RETRY_BACKOFF_MS", value_name = "MS")]
    pub download_retry_backoff_ms: Option<u64>,
    /// The chain's block time in milliseconds (default: 12000, Bittensor's). Transfer deadlines
    /// are estimated with it, and, while neither the chain nor the phase source can be read,
    /// when a phase is over. For devnets and tests with faster blocks.
    #[arg(long, env = "CHAINSYNC_BLOCK_TIME_MS", value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub block_time_ms: Option<u64>,
    /// How baselines and submissions travel: `hub` (the live subnet since 2026-04-27: the
    /// Hugging Face Hub plus the two commitments) or `http` (the validators' historical
    /// `GET /get-checkpoint` and `POST /submit-checkpoint`, for networks that still run them).
    #[arg(long, env = "CHAINSYNC_TRANSPORT", value_enum, default_value = "hub")]
    pub transport: TransportKind,
    /// The Hugging Face Hub endpoint (default: `hf.endpoint` of the config, else
    /// https://huggingface.co).
    #[arg(long, env = "HF_ENDPOINT")]
    pub hf_endpoint: Option<String>,
}

/// How baselines and submissions travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// The Hugging Face Hub and the chain (spec §5.1, §6.1).
    Hub,
    /// The validators' historical HTTP routes (spec §5.3, §6.2).
    Http,
}

/// A setting that cannot be used; names the field or file.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SettingsError {
    pub field: String,
    pub message: String,
}

pub(crate) fn bad(field: impl Into<String>, message: impl Into<String>) -> SettingsError {
    SettingsError {
        field: field.into(),
        message: message.into(),
    }
}

/// How long the scheduler and the jobs wait and how many blocks a job needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// Head polling interval.
    pub poll: Duration,
    /// Expected block time (turns "blocks left" into a wall-clock deadline for HTTP transfers).
    pub block_time: Duration,
    /// A commit is not started with fewer blocks left in its phase (inclusion + finalization).
    pub min_commit_blocks: u64,
    /// A download or submission is not started with fewer blocks left in its phase.
    pub min_transfer_blocks: u64,
    /// Lifetime of the commit pin (renewed never; released after the submission).
    pub pin_ttl: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            poll: Duration::from_secs(1),
            block_time: Duration::from_secs(12),
            min_commit_blocks: 1,
            min_transfer_blocks: 1,
            pin_ttl: Duration::from_secs(3 * 3600),
        }
    }
}

/// Everything the daemon needs, validated.
#[derive(Clone)]
pub struct Settings {
    pub run_dir: PathBuf,
    pub config: MinerConfig,
    pub netuid: u16,
    pub hotkey: Arc<Hotkey>,
    pub endpoint: Endpoint,
    pub phase_source: PhaseSourceKind,
    pub owner_url: String,
    pub schedule: PhaseSchedule,
    pub version_range_cycles: u64,
    pub expert_group: ExpertGroup,
    /// The control token `LoadBaseline` and `Stop` need (`authorization: Bearer <token>`);
    /// `None`: `<run>/control/token`, created when missing.
    pub control_token: Option<miner_service::ControlToken>,
    /// TLS on the gRPC listener.
    pub tls: Option<miner_service::TlsFiles>,
    pub timing: Timing,
    /// `--validator-whitelist`: the validators for the local phase source, and the fallback
    /// when the owner API's whitelist is unavailable.
    pub local_whitelist: Vec<String>,
    /// Most miners one validator takes in the §6.2 assignment.
    pub max_miners_per_validator: Option<usize>,
    /// Transfer retry policies and commit attempts (the reference's, unless shortened by
    /// `--submit-retry-backoff-ms` / `--download-retry-backoff-ms`).
    pub policies: crate::jobs::Policies,
    /// The Hub transport's settings; `None` with `--transport http`.
    pub hub: Option<crate::hub::HubSettings>,
    /// Which validator axon addresses may be connected to: global unicast only, unless the
    /// chain is reached on loopback or a private address (a devnet).
    pub peer_addresses: crate::transport::PeerAddresses,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("run_dir", &self.run_dir)
            .field("netuid", &self.netuid)
            .field("hotkey", &self.hotkey.ss58())
            .field("endpoint", &self.endpoint)
            .field("phase_source", &self.phase_source)
            .field("owner_url", &self.owner_url)
            .field("expert_group", &self.expert_group.group_id)
            .finish_non_exhaustive()
    }
}

/// The hotkeys of `--validator-whitelist`: SS58 addresses, or `@FILE` with one per line
/// (blank lines and `#` comments ignored); each must decode. Duplicates are dropped.
pub fn parse_whitelist(items: &[String]) -> Result<Vec<String>, SettingsError> {
    const FIELD: &str = "--validator-whitelist";
    let mut out: Vec<String> = Vec::new();
    let mut add = |hk: &str, from: &str| -> Result<(), SettingsError> {
        miner_keys::ss58_decode(hk)
            .map_err(|e| bad(FIELD, format!("{from}{hk:?} is not an SS58 hotkey: {e}")))?;
        if !out.iter().any(|h| h == hk) {
            out.push(hk.to_owned());
        }
        Ok(())
    };
    for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
        match item.strip_prefix('@') {
            Some(file) => {
                let path = miner_keys::expand_home(Path::new(file));
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| bad(FIELD, format!("{}: {e}", path.display())))?;
                for (n, line) in text.lines().enumerate() {
                    let line = line.split('#').next().unwrap_or("").trim();
                    if !line.is_empty() {
                        add(line, &format!("{} line {}: ", path.display(), n + 1))?;
                    }
                }
            }
            None => add(item, "")?,
        }
    }
    Ok(out)
}

/// The config file and the run directory `--path` names (the file itself or a directory
/// holding `config.yaml`; the run directory is the file's directory).
pub fn resolve_path(path: &Path) -> (PathBuf, PathBuf) {
    if path.is_dir() {
        (
            path.join(miner_contract::layout::CONFIG_FILE),
            path.to_path_buf(),
        )
    } else {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (path.to_path_buf(), dir)
    }
}

impl Settings {
    /// Validates the flags and the config, loads the hotkey. Binds and writes nothing.
    pub fn from_cli(cli: &Cli) -> Result<Settings, SettingsError> {
        let tls =
            miner_service::TlsFiles::from_flags(cli.tls_cert.as_deref(), cli.tls_key.as_deref())
                .map_err(|e| bad("--tls-cert", e.to_string()))?;
        if let Some(t) = &tls {
            t.server_config()
                .map_err(|e| bad("--tls-cert", e.to_string()))?;
        }
        // The daemon always has a token (from the run directory), so only TLS is in question.
        miner_service::check_listen(cli.listen, tls.is_some(), true)
            .map_err(|e| bad("--listen", e.to_string()))?;
        // The metrics address follows the same policy (it serves plain HTTP without a token).
        miner_service::check_listen(cli.metrics_listen, tls.is_some(), true)
            .map_err(|e| bad("--metrics-listen", e.to_string()))?;
        let (file, run_dir) = resolve_path(&cli.path);
        let (config, _) = MinerConfig::load(&file).map_err(|e| bad("--path", e.to_string()))?;
        let network = cli
            .network
            .clone()
            .unwrap_or_else(|| config.chain.network.clone());
        let endpoint: Endpoint = network.parse().map_err(|e: crate::chain::ChainError| {
            let field = if cli.network.is_some() {
                "--network".to_owned()
            } else {
                format!("{}: chain.network", file.display())
            };
            bad(field, e.to_string())
        })?;
        let c = &config.cycle;
        let periods = CyclePeriods {
            distribute_period: c.distribute_period,
            train_period: c.train_period,
            commit_period: c.commit_period,
            submission_period: c.submission_period,
            validate_period: c.validate_period,
            merge_period: c.merge_period,
        };
        let schedule = PhaseSchedule::new(periods)
            .map_err(|e| bad(format!("{}: cycle", file.display()), e.to_string()))?;
        let owner_url = cli
            .owner_url
            .clone()
            .unwrap_or_else(|| config.cycle.owner_url.clone());
        if cli.phase_source == PhaseSourceKind::OwnerApi
            && !(owner_url.starts_with("http://") || owner_url.starts_with("https://"))
        {
            let field = if cli.owner_url.is_some() {
                "--owner-url".to_owned()
            } else {
                format!("{}: cycle.owner_url", file.display())
            };
            return Err(bad(field, format!("{owner_url:?} is not an http(s) URL")));
        }
        let expert_group = config.expert_group(Some(&run_dir)).map_err(|e| {
            bad(
                format!("{}: task.expert_group_name", file.display()),
                e.to_string(),
            )
        })?;
        for (field, what, v) in [
            ("chain.coldkey_name", "coldkey", &config.chain.coldkey_name),
            ("chain.hotkey_name", "hotkey", &config.chain.hotkey_name),
        ] {
            miner_keys::check_wallet_name(what, v)
                .map_err(|e| bad(format!("{}: {field}", file.display()), e.to_string()))?;
        }
        let wallet_path = miner_keys::expand_home(&cli.wallet_path);
        let password = miner_keys::PasswordSource {
            file: cli
                .wallet_password_file
                .as_deref()
                .map(miner_keys::expand_home),
            credential: Some(cli.wallet_password_credential.clone()),
            credentials_dir: miner_keys::PasswordSource::credentials_dir_from_env(),
            env: cli.password_env.clone(),
        };
        let hotkey = Hotkey::load_from(
            &wallet_path,
            &config.chain.coldkey_name,
            &config.chain.hotkey_name,
            &password,
        )
        .map_err(|e| {
            let key = miner_keys::hotkey_path(
                &wallet_path,
                &config.chain.coldkey_name,
                &config.chain.hotkey_name,
            );
            bad(format!("--wallet-path ({})", key.display()), e.to_string())
        })?;
        let local_whitelist = parse_whitelist(&cli.validator_whitelist)?;
        let mut policies = crate::jobs::Policies::default();
        if let Some(ms) = cli.submit_retry_backoff_ms {
            policies.submit.backoff = Backoff::Fixed(Duration::from_millis(ms));
        }
        if let Some(ms) = cli.download_retry_backoff_ms {
            policies.download.backoff = Backoff::Fixed(Duration::from_millis(ms));
        }
        let mut timing = Timing::default();
        if let Some(ms) = cli.block_time_ms {
            timing.block_time = Duration::from_millis(ms);
        }
        let hub = match cli.transport {
            TransportKind::Http => None,
            TransportKind::Hub => Some(crate::hub::HubSettings::from_config(
                &config.hf,
                cli.hf_endpoint.as_deref(),
                &file,
            )?),
        };
        // Keep the pin over a whole cycle at the configured block time (plus slack).
        let cycle_secs = schedule
            .cycle_length()
            .saturating_mul(timing.block_time.as_secs());
        timing.pin_ttl = timing
            .pin_ttl
            .max(Duration::from_secs(cycle_secs.saturating_mul(2)));
        Ok(Settings {
            run_dir,
            netuid: config.chain.netuid,
            hotkey: Arc::new(hotkey),
            phase_source: cli.phase_source,
            owner_url,
            schedule,
            version_range_cycles: config.cycle.version_range_cycles,
            expert_group,
            control_token: None,
            tls,
            timing,
            local_whitelist,
            max_miners_per_validator: Some(5),
            policies,
            hub,
            peer_addresses: crate::transport::PeerAddresses::for_chain_url(endpoint.url()),
            endpoint,
            config,
        })
    }
}
