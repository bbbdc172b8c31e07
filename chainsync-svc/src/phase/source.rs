//! Where the daemon learns the phase: the owner API (authoritative, spec §3.1) or the local
//! schedule applied to the chain head (fallback and cross-check, spec §12).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::time::Instant;

use super::api::{OwnerApi, PhaseApiError};
use super::schedule::{NextPhases, PhaseInfo, PhaseSchedule, PreviousPhases};

/// A boxed future, so [`PhaseSource`] and [`ChainHead`] stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a phase source gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum PhaseSourceError {
    #[error(transparent)]
    Api(#[from] PhaseApiError),
    #[error("read chain head: {0}")]
    Head(String),
}

/// The chain's current block number (implemented by the chain client).
pub trait ChainHead: Send + Sync {
    fn head_block(&self) -> BoxFuture<'_, Result<u64, String>>;
}

/// Anything that can answer the three phase questions and name the validator whitelist.
pub trait PhaseSource: Send + Sync {
    /// `/get_phase`.
    fn current_phase(
        &self,
        deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<PhaseInfo, PhaseSourceError>>;
    /// `/blocks_until_next_phase`.
    fn next_phases(
        &self,
        deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<NextPhases, PhaseSourceError>>;
    /// `/previous_phase_blocks`.
    fn previous_phases(
        &self,
        deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<PreviousPhases, PhaseSourceError>>;
    /// `/get_validator_whitelist`.
    fn validator_whitelist(
        &self,
        deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<Vec<String>, PhaseSourceError>>;
    /// A short name for logs (`owner-api`, `local`).
    fn name(&self) -> &'static str;
}

impl PhaseSource for OwnerApi {
    fn current_phase(
        &self,
        deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<PhaseInfo, PhaseSourceError>> {
        Box::pin(async move { Ok(self.get_phase(deadline).await?) })
    }
    fn next_phases(
        &self,
        deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<NextPhases, PhaseSourceError>> {
        Box::pin(async move { Ok(self.blocks_until_next_phase(deadline).await?) })
    }
    fn previous_phases(
        &self,
        deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<PreviousPhases, PhaseSourceError>> {
        Box::pin(async move { Ok(self.previous_phase_blocks(deadline).await?) })
    }
    fn validator_whitelist(
        &self,
        deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<Vec<String>, PhaseSourceError>> {
        Box::pin(async move { Ok(OwnerApi::validator_whitelist(self, deadline).await?) })
    }
    fn name(&self) -> &'static str {
        "owner-api"
    }
}

/// The local schedule applied to the chain head, with a configured whitelist.
pub struct LocalSchedule {
    schedule: PhaseSchedule,
    head: Arc<dyn ChainHead>,
    whitelist: Vec<String>,
}

impl LocalSchedule {
    pub fn new(schedule: PhaseSchedule, head: Arc<dyn ChainHead>, whitelist: Vec<String>) -> Self {
        LocalSchedule {
            schedule,
            head,
            whitelist,
        }
    }

    pub fn schedule(&self) -> &PhaseSchedule {
        &self.schedule
    }

    async fn block(&self, deadline: Option<Instant>) -> Result<u64, PhaseSourceError> {
        let fut = self.head.head_block();
        match deadline {
            Some(d) => tokio::time::timeout_at(d, fut)
                .await
                .map_err(|_| PhaseSourceError::Head("deadline reached".to_owned()))?
                .map_err(PhaseSourceError::Head),
            None => fut.await.map_err(PhaseSourceError::Head),
        }
    }
}

impl PhaseSource for LocalSchedule {
    fn current_phase(
        &self,
        deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<PhaseInfo, PhaseSourceError>> {
        Box::pin(async move { Ok(self.schedule.phase_at(self.block(deadline).await?)) })
    }
    fn next_phases(
        &self,
        deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<NextPhases, PhaseSourceError>> {
        Box::pin(async move {
            Ok(self
                .schedule
                .blocks_until_next_phase(self.block(deadline).await?))
        })
    }
    fn previous_phases(
        &self,
        deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<PreviousPhases, PhaseSourceError>> {
        Box::pin(async move {
            Ok(self
                .schedule
                .previous_phase_blocks(self.block(deadline).await?))
        })
    }
    fn validator_whitelist(
        &self,
        _deadline: Option<Instant>,
    ) -> BoxFuture<'_, Result<Vec<String>, PhaseSourceError>> {
        Box::pin(async move { Ok(self.whitelist.clone()) })
    }
    fn name(&self) -> &'static str {
        "local"
    }
}

/// Which source drives the daemon (a `--phase-source` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PhaseSourceKind {
    /// The owner's phase API (the reference's only source).
    OwnerApi,
    /// The local schedule over the chain head.
    Local,
}

/// How far apart two sources' answers are: `b.block − a.block`, and whether they name the
/// same phase. A skew of one block is normal (spec §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseSkew {
    pub blocks: i64,
    pub same_phase: bool,
}

pub fn phase_skew(a: &PhaseInfo, b: &PhaseInfo) -> PhaseSkew {
    PhaseSkew {
        blocks: b.block as i64 - a.block as i64,
        same_phase: a.phase_name == b.phase_name,
    }
}

/// `get_allowed_version_range` (spec §3.7) through any source: the current phase, plus the
/// previous ranges unless the current phase is MinerCommit1.
pub async fn allowed_version_window(
    src: &dyn PhaseSource,
    range_cycles: u64,
    deadline: Option<Instant>,
) -> Result<Option<super::VersionWindow>, PhaseSourceError> {
    let current = src.current_phase(deadline).await?;
    let previous = if current.phase_name == super::PhaseName::MinerCommit1 {
        super::PreviousPhases(Vec::new())
    } else {
        src.previous_phases(deadline).await?
    };
    Ok(super::version_window(&current, &previous, range_cycles))
}
