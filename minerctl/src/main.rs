//! `minerctl`: the operator's command-line client. Offline commands (`checkpoint ...`) read the
//! run directory directly; online commands ([`online`]: `status`, `stop`, `phase`,
//! `checkpoints`, `jobs`, `load-baseline`) talk gRPC to trainer-svc / chainsync-svc on the hosts
//! [`fleet`] resolves (`--path RUN`, `--trainer/--chainsync ADDR`, or a `--hosts` fleet file).

mod checkpoint_cmd;
mod cli;
mod exit;
mod fleet;
mod hub_cmd;
mod online;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return exit::clap_error(e),
    };
    exit::report(cli::run(cli))
}
