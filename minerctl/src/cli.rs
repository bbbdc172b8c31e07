//! Command-line grammar (clap derive) and dispatch.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::checkpoint_cmd;
use crate::exit::CliError;

/// Operate a Connito (SN 102) miner: inspect checkpoints offline, control the services.
#[derive(Debug, Parser)]
#[command(name = "minerctl", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Offline checkpoint tools (no service needs to run).
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Phase, training and job state of each trainer/chainsync pair (a table, or --json);
    /// --watch refreshes it over the same connections.
    Status(StatusArgs),
    /// Stop services gracefully and wait until their processes have exited.
    Stop(StopArgs),
    /// The current phase of the subnet cycle (from chainsync-svc); --watch follows it.
    Phase(PhaseArgs),
    /// Checkpoints as the running services see them.
    Checkpoints(OnlineArgs),
    /// Download, commit and submission jobs (from chainsync-svc), newest first.
    Jobs(JobsArgs),
    /// Reload the baseline now: the trainer loads a verified checkpoint, chainsync downloads
    /// the validator's newest.
    LoadBaseline(LoadBaselineArgs),
    /// The Hugging Face Hub side: start-up checks, upload a shard, download and verify one.
    #[command(subcommand)]
    Hub(crate::hub_cmd::HubCommand),
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

/// Which services a command talks to, and how.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// A local run directory: reads <run>/control/{trainer,chainsync}.json and <run>/control/token.
    #[arg(long, env = "MINERCTL_PATH", conflicts_with = "hosts")]
    pub path: Option<PathBuf>,
    /// trainer-svc address (host:port or http(s)://host:port).
    #[arg(long, env = "MINERCTL_TRAINER", conflicts_with_all = ["path", "hosts"])]
    pub trainer: Option<String>,
    /// chainsync-svc address (host:port or http(s)://host:port).
    #[arg(long, env = "MINERCTL_CHAINSYNC", conflicts_with_all = ["path", "hosts"])]
    pub chainsync: Option<String>,
    /// File holding the control token (mode 0600).
    #[arg(long, env = "MINERCTL_TOKEN_FILE", conflicts_with = "hosts")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate to verify TLS services (implies https).
    #[arg(long, env = "MINERCTL_CA", conflicts_with = "hosts")]
    pub ca: Option<PathBuf>,
    /// Name to expect in the services' TLS certificates (default: the host of the address).
    #[arg(long, env = "MINERCTL_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// A fleet file (TOML or YAML): one entry per miner; the command runs on all concurrently.
    #[arg(long, env = "MINERCTL_HOSTS")]
    pub hosts: Option<PathBuf>,
    /// Per-host time limit in seconds (connect and calls).
    #[arg(long, env = "MINERCTL_TIMEOUT", default_value_t = 10.0)]
    pub timeout: f64,
    /// Export this command's spans to an OTLP/gRPC collector (e.g. http://127.0.0.1:4317).
    #[arg(long, env = "MINERCTL_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct OnlineArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Machine-readable output.
    #[arg(long, env = "MINERCTL_JSON")]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub online: OnlineArgs,
    /// Refresh every --interval seconds over the same connections until interrupted (or
    /// --count refreshes); with --json one JSON line per refresh.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch (0: back to back).
    #[arg(long, default_value_t = 2.0, requires = "watch")]
    pub interval: f64,
    /// With --watch, stop after this many refreshes (0: until interrupted); the exit status is
    /// the last refresh's.
    #[arg(long, default_value_t = 0, requires = "watch")]
    pub count: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Trainer,
    Chainsync,
    All,
}

#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    /// Which service to stop.
    #[arg(value_enum, default_value = "all")]
    pub which: Which,
    /// Stop the trainer without its final checkpoint.
    #[arg(long)]
    pub no_final_save: bool,
    /// Return once the stop is accepted instead of waiting for the process to exit.
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for each process to exit.
    #[arg(long, default_value_t = 300.0)]
    pub wait_timeout: f64,
    #[command(flatten)]
    pub online: OnlineArgs,
}

#[derive(Debug, Clone, Args)]
pub struct PhaseArgs {
    /// Print every change until interrupted.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub online: OnlineArgs,
}

#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    /// At most this many jobs per host (0 = all kept).
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    #[command(flatten)]
    pub online: OnlineArgs,
}

#[derive(Debug, Clone, Args)]
pub struct LoadBaselineArgs {
    /// `trainer` (load a verified checkpoint) or `chainsync` (download the validator baseline).
    #[arg(value_enum, default_value = "trainer")]
    pub which: Which,
    /// Checkpoint directory name for the trainer (default: the best verified one).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub online: OnlineArgs,
}

#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Print the 48-hex model hash (spec §7.5) of a .pt file or of the model_expgroup_<gid>.pt
    /// inside a checkpoint directory.
    Hash(HashArgs),
    /// List the tensors of a .pt file (name, dtype, shape), its parameter count and hash.
    Inspect(InspectArgs),
    /// List own and validator checkpoints of a run directory in selection order.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct HashArgs {
    /// A .pt file, or a checkpoint directory holding one model_expgroup_<gid>.pt.
    pub path: PathBuf,
    /// Expert group to hash when a directory holds several shards.
    #[arg(long, env = "MINERCTL_GROUP")]
    pub group: Option<u32>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A .pt file, or a checkpoint directory holding one model_expgroup_<gid>.pt.
    pub path: PathBuf,
    /// Expert group to inspect when a directory holds several shards.
    #[arg(long, env = "MINERCTL_GROUP")]
    pub group: Option<u32>,
    /// Machine-readable output.
    #[arg(long, env = "MINERCTL_JSON")]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// The run directory (checkpoints/miner/<coldkey>/<hotkey>/<run>) or its config.yaml.
    #[arg(long, env = "MINERCTL_PATH")]
    pub path: PathBuf,
    /// Machine-readable output.
    #[arg(long, env = "MINERCTL_JSON")]
    pub json: bool,
}

/// Runs a parsed command, writing results to stdout.
pub fn run(cli: Cli) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "minerctl", &mut buf);
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut out, &buf);
            Ok(())
        }
        c @ (Command::Status(_)
        | Command::Stop(_)
        | Command::Phase(_)
        | Command::Checkpoints(_)
        | Command::Jobs(_)
        | Command::LoadBaseline(_)) => {
            drop(out);
            crate::online::run(c)
        }
        Command::Hub(c) => crate::hub_cmd::run(c, &mut out),
        Command::Checkpoint(CheckpointCommand::Hash(a)) => {
            checkpoint_cmd::hash(&a.path, a.group, &mut out)
        }
        Command::Checkpoint(CheckpointCommand::Inspect(a)) => {
            checkpoint_cmd::inspect(&a.path, a.group, a.json, &mut out)
        }
        Command::Checkpoint(CheckpointCommand::List(a)) => {
            checkpoint_cmd::list(&a.path, a.json, &mut out)
        }
    }
}
