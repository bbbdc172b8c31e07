//! The subnet cycle: the pure schedule (§3.1, §3.2, §3.7), the owner phase-API client (§3.3)
//! and the [`PhaseSource`] abstraction over both.

pub mod api;
pub mod schedule;
pub mod source;

pub use api::{DEFAULT_OWNER_URL, OwnerApi, PhaseApiError};
pub use schedule::{
    CyclePeriods, DEFAULT_VERSION_RANGE_CYCLES, NextOccurrence, NextPhases, PhaseInfo, PhaseName,
    PhaseRange, PhaseSchedule, PreviousPhases, ScheduleError, VersionWindow, version_window,
};
pub use source::{
    ChainHead, LocalSchedule, PhaseSkew, PhaseSource, PhaseSourceError, PhaseSourceKind,
    allowed_version_window, phase_skew,
};
