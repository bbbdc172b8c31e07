//! Runs a stand-in as its own process (so a test or benchmark can measure a client without the
//! server in the same address space). `miner-standins hub --listen 127.0.0.1:0 --data DIR
//! [--token TOKEN:USER:write|read ...]` prints the endpoint URL as stdout's first line and serves
//! until killed or until stdin closes.

use clap::{Parser, Subcommand};
use miner_standins::hub::{HubStandIn, HubStandInOptions};
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "miner-standins", about = "Test stand-ins for remote peers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The Hugging Face Hub stand-in.
    Hub {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:0")]
        storage_listen: SocketAddr,
        /// Blob directory (created); a temporary one when absent.
        #[arg(long)]
        data: Option<PathBuf>,
        /// TOKEN:USER:write or TOKEN:USER:read (repeatable).
        #[arg(long = "token")]
        tokens: Vec<String>,
        /// Files at least this large are LFS.
        #[arg(long, default_value_t = 10 << 20)]
        lfs_threshold: u64,
        /// Multipart chunk size (objects larger than this upload in parts).
        #[arg(long, default_value_t = 64 << 20)]
        chunk_size: u64,
        /// Exit when stdin reaches EOF (the parent died).
        #[arg(long)]
        exit_on_stdin_eof: bool,
    },
}

fn parse_token(s: &str) -> Result<(String, String, bool), String> {
    let mut it = s.splitn(3, ':');
    match (it.next(), it.next(), it.next()) {
        (Some(t), Some(u), Some(m @ ("write" | "read"))) if !t.is_empty() && !u.is_empty() => {
            Ok((t.into(), u.into(), m == "write"))
        }
        _ => Err(format!("--token {s:?}: expected TOKEN:USER:write|read")),
    }
}

#[tokio::main]
async fn main() {
    let Cmd::Hub {
        listen,
        storage_listen,
        data,
        tokens,
        lfs_threshold,
        chunk_size,
        exit_on_stdin_eof,
    } = Cli::parse().cmd;
    let tokens = match tokens
        .iter()
        .map(|t| parse_token(t))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("miner-standins: {e}");
            std::process::exit(2);
        }
    };
    let opts = HubStandInOptions {
        data_dir: data,
        listen,
        storage_listen,
        lfs_threshold,
        multipart_chunk_size: chunk_size,
        tokens,
        ..Default::default()
    };
    let hub = match HubStandIn::start(opts).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("miner-standins: cannot start the Hub stand-in: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", hub.endpoint());
    if exit_on_stdin_eof {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while stdin.read(&mut buf).is_ok_and(|n| n > 0) {}
            let _ = tx.send(());
        });
        tokio::select! {
            _ = rx => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    } else {
        let _ = tokio::signal::ctrl_c().await;
    }
    drop(hub);
}
