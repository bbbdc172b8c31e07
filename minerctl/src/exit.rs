//! Exit codes (BSD `sysexits`) and the one-line error report.
//!
//! 64 usage or configuration error, 65 bad input data, 66 missing input, 69 a service is
//! unreachable, 75 a service timed out, 76 an unexpected gRPC error, 77 missing or wrong
//! control token, 1 anything else.

use std::io::ErrorKind;
use std::process::ExitCode;

use miner_contract::LayoutError;
use miner_contract::pt::PtError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// EX_USAGE: bad command line or configuration.
    Usage = 64,
    /// EX_DATAERR: the input exists but is malformed.
    Data = 65,
    /// EX_NOINPUT: the input does not exist or cannot be read.
    NoInput = 66,
    /// EX_UNAVAILABLE: a service is unreachable (not running, refused, no answer).
    Unavailable = 69,
    /// EX_TEMPFAIL: a service answered too late (per-host timeout, deadline).
    TempFail = 75,
    /// EX_PROTOCOL: a service answered with an unexpected gRPC error.
    Protocol = 76,
    /// EX_NOPERM: the control token is missing or wrong.
    NoPerm = 77,
    /// Anything else (I/O failures, bugs).
    Other = 1,
}

impl Exit {
    /// Of two failures, the one to report (the more actionable).
    pub fn worse(self, other: Exit) -> Exit {
        fn rank(e: Exit) -> u8 {
            match e {
                Exit::Other => 1,
                Exit::Protocol => 2,
                Exit::TempFail => 3,
                Exit::Unavailable => 4,
                Exit::NoPerm => 5,
                Exit::Data => 6,
                Exit::NoInput => 7,
                Exit::Usage => 8,
            }
        }
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// An error to report on one line with an exit code.
#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
}

impl CliError {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        CliError {
            exit,
            message: message.into(),
        }
    }
}

fn io_exit(kind: ErrorKind) -> Exit {
    match kind {
        ErrorKind::NotFound | ErrorKind::PermissionDenied => Exit::NoInput,
        _ => Exit::Other,
    }
}

impl From<PtError> for CliError {
    fn from(e: PtError) -> Self {
        let exit = match &e {
            PtError::Io { source, .. } => io_exit(source.kind()),
            PtError::NotZip { .. }
            | PtError::Truncated { .. }
            | PtError::CorruptZip { .. }
            | PtError::BadPickle { .. }
            | PtError::ForbiddenGlobal { .. }
            | PtError::UnknownStorage { .. }
            | PtError::NotACheckpoint { .. }
            | PtError::OutOfBounds { .. }
            | PtError::NoSuchTensor { .. }
            | PtError::InvalidTensor { .. } => Exit::Data,
        };
        CliError::new(exit, e.to_string())
    }
}

impl From<miner_contract::st::StError> for CliError {
    fn from(e: miner_contract::st::StError) -> Self {
        let exit = match &e {
            miner_contract::st::StError::Io { source, .. } => io_exit(source.kind()),
            _ => Exit::Data,
        };
        CliError::new(exit, e.to_string())
    }
}

impl From<miner_contract::shard::ShardError> for CliError {
    fn from(e: miner_contract::shard::ShardError) -> Self {
        use miner_contract::shard::ShardError;
        match e {
            ShardError::Pt(e) => e.into(),
            ShardError::Safetensors(e) => e.into(),
            other @ ShardError::UnknownFormat { .. } => {
                CliError::new(Exit::Data, other.to_string())
            }
        }
    }
}

impl From<LayoutError> for CliError {
    fn from(e: LayoutError) -> Self {
        let exit = match &e {
            LayoutError::Missing { .. } => Exit::NoInput,
            LayoutError::NotADirectory { .. } => Exit::Usage,
            LayoutError::Io { source, .. } => io_exit(source.kind()),
        };
        CliError::new(exit, e.to_string())
    }
}

/// Prints `minerctl: <message>` (newlines folded) and maps to the exit code.
pub fn report(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let one_line = e.message.replace('\n', " ");
            eprintln!("minerctl: {one_line}");
            ExitCode::from(e.exit as u8)
        }
    }
}

/// Help and version go to stdout with 0; a bad command line exits 64.
pub fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind as K;
    match e.kind() {
        K::DisplayHelp | K::DisplayVersion | K::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == K::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(Exit::Usage as u8)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            let _ = e.print();
            ExitCode::from(Exit::Usage as u8)
        }
    }
}
