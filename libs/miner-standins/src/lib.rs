//! Stand-ins for the remote peers a miner talks to, for tests on loopback:
//!
//! * [`ValidatorStandIn`]: the server side of a validator's historical HTTP routes
//!   `GET /get-checkpoint` (spec §5.3) and `POST /submit-checkpoint` (spec §6.2), with
//!   fault knobs (5xx N times, stall, close mid-body) and a record of what it received.
//! * [`PhaseApiStandIn`]: the subnet owner's phase service (spec §3.3), computed from a
//!   block source the test controls, with a "down" knob.
//! * [`hub::HubStandIn`]: the Hugging Face Hub's HTTP API as huggingface_hub 1.10.1 uses it
//!   (addendum part C), with an LFS storage listener, faults and a request log.
//!
//! Both follow the reference's Python behaviour as the spec describes it; they are written
//! independently of the miner's own code so that a test using them cross-checks it.

pub mod hub;
mod owner_schedule;
mod phase_api;
mod validator;

pub use owner_schedule::OwnerSchedule;
pub use phase_api::{PhaseApiStandIn, PhaseApiState};
pub use validator::{
    ChainCheckpointView, DownloadRecord, Faults, SubmissionRecord, ValidatorStandIn,
    ValidatorStandInConfig,
};

/// A source of the current block number (a closure over an atomic the test sets, or the devnet head).
pub type BlockSource = std::sync::Arc<dyn Fn() -> u64 + Send + Sync>;
