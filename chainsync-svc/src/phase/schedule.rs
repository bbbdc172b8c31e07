//! The subnet cycle as a pure function of the block number (spec §3.1, §3.2, §3.7).
//!
//! Cycles are aligned to absolute block 0. Nothing here reads a clock or does I/O: every
//! answer is a function of `(block, schedule)`, so it can be property-tested and used as a
//! fallback for (and cross-check of) the owner's phase API.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The nine phases of a cycle, in cycle order (the exact strings of the reference's `PhaseNames`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PhaseName {
    Distribute,
    Train,
    MinerCommit1,
    MinerCommit2,
    Submission,
    Validate,
    Merge,
    ValidatorCommit1,
    ValidatorCommit2,
}

impl PhaseName {
    /// All phases in cycle order.
    pub const ALL: [PhaseName; 9] = [
        PhaseName::Distribute,
        PhaseName::Train,
        PhaseName::MinerCommit1,
        PhaseName::MinerCommit2,
        PhaseName::Submission,
        PhaseName::Validate,
        PhaseName::Merge,
        PhaseName::ValidatorCommit1,
        PhaseName::ValidatorCommit2,
    ];

    /// The wire name (`"MinerCommit1"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseName::Distribute => "Distribute",
            PhaseName::Train => "Train",
            PhaseName::MinerCommit1 => "MinerCommit1",
            PhaseName::MinerCommit2 => "MinerCommit2",
            PhaseName::Submission => "Submission",
            PhaseName::Validate => "Validate",
            PhaseName::Merge => "Merge",
            PhaseName::ValidatorCommit1 => "ValidatorCommit1",
            PhaseName::ValidatorCommit2 => "ValidatorCommit2",
        }
    }

    /// Parses a wire name; unknown names give `None`.
    pub fn parse(name: &str) -> Option<PhaseName> {
        PhaseName::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// Position in the cycle (0..9).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for PhaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for PhaseName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PhaseName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PhaseName::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown phase name {s:?}")))
    }
}

/// The phase lengths from the config (`cycle.*_period`, spec §2.2.1). The commit period is
/// shared by MinerCommit1/2 and ValidatorCommit1/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CyclePeriods {
    pub distribute_period: u64,
    pub train_period: u64,
    pub commit_period: u64,
    pub submission_period: u64,
    pub validate_period: u64,
    pub merge_period: u64,
}

impl Default for CyclePeriods {
    /// The live schedule: 20 + 300 + 10 + 10 + 80 + 10 + 50 + 10 + 10 = 500 blocks.
    fn default() -> Self {
        CyclePeriods {
            distribute_period: 20,
            train_period: 300,
            commit_period: 10,
            submission_period: 80,
            validate_period: 10,
            merge_period: 50,
        }
    }
}

/// A schedule that cannot tile a cycle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("phase {0} has length 0")]
    EmptyPhase(PhaseName),
    #[error("cycle length overflows u64")]
    Overflow,
}

/// Where a block sits in the cycle; the exact shape of the owner API's `PhaseResponse`
/// (field order as on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseInfo {
    pub block: u64,
    pub cycle_length: u64,
    pub cycle_index: u64,
    pub cycle_block_index: u64,
    pub phase_name: PhaseName,
    pub phase_index: u64,
    pub phase_start_block: u64,
    /// Inclusive.
    pub phase_end_block: u64,
    pub blocks_into_phase: u64,
    pub blocks_remaining_in_phase: u64,
}

impl PhaseInfo {
    /// Length of the phase in blocks.
    pub fn phase_len(&self) -> u64 {
        self.phase_end_block - self.phase_start_block + 1
    }
}

/// The next occurrence of a phase (from `/blocks_until_next_phase`): `[start, end, blocks_until]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextOccurrence {
    pub start: u64,
    /// Inclusive.
    pub end: u64,
    /// `start - head`; 0 when the head is exactly the phase's first block.
    pub blocks_until: u64,
}

/// A phase occurrence from `/previous_phase_blocks`: `[start, end]`. Signed because the
/// reference answers negative blocks during the first cycle of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseRange {
    pub start: i64,
    /// Inclusive.
    pub end: i64,
}

impl PhaseRange {
    /// Number of blocks in the range.
    pub fn len(&self) -> i64 {
        self.end - self.start + 1
    }

    /// Always false for ranges built by a schedule (phases are non-empty).
    pub fn is_empty(&self) -> bool {
        self.len() <= 0
    }

    /// The block whose post-state holds the commitments made during this phase
    /// (`end + 1`, spec §4.4), or `None` when the occurrence predates block 0.
    pub fn read_block(&self) -> Option<u64> {
        if self.start < 0 {
            None
        } else {
            u64::try_from(self.end + 1).ok()
        }
    }
}

/// Every phase's next occurrence, in cycle order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextPhases(pub Vec<(PhaseName, NextOccurrence)>);

impl NextPhases {
    pub fn get(&self, phase: PhaseName) -> Option<NextOccurrence> {
        self.0.iter().find(|(p, _)| *p == phase).map(|(_, o)| *o)
    }
}

/// Every phase's previous occurrence (see [`PhaseSchedule::previous_phase_blocks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousPhases(pub Vec<(PhaseName, PhaseRange)>);

impl PreviousPhases {
    pub fn get(&self, phase: PhaseName) -> Option<PhaseRange> {
        self.0.iter().find(|(p, _)| *p == phase).map(|(_, r)| *r)
    }

    /// Σ (end − start + 1): the cycle length as the reference derives it.
    pub fn total_len(&self) -> i64 {
        self.0.iter().map(|(_, r)| r.len()).sum()
    }
}

// Wire formats: JSON objects keyed by phase name, in cycle order.
impl Serialize for NextPhases {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (p, o) in &self.0 {
            m.serialize_entry(p.as_str(), &[o.start, o.end, o.blocks_until])?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for NextPhases {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, (u64, u64, u64)>::deserialize(d)?;
        let mut out = Vec::with_capacity(PhaseName::ALL.len());
        for p in PhaseName::ALL {
            let (start, end, blocks_until) = raw
                .get(p.as_str())
                .copied()
                .ok_or_else(|| serde::de::Error::custom(format!("missing phase {p}")))?;
            out.push((
                p,
                NextOccurrence {
                    start,
                    end,
                    blocks_until,
                },
            ));
        }
        Ok(NextPhases(out))
    }
}

impl Serialize for PreviousPhases {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (p, r) in &self.0 {
            m.serialize_entry(p.as_str(), &[r.start, r.end])?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for PreviousPhases {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, (i64, i64)>::deserialize(d)?;
        let mut out = Vec::with_capacity(PhaseName::ALL.len());
        for p in PhaseName::ALL {
            let (start, end) = raw
                .get(p.as_str())
                .copied()
                .ok_or_else(|| serde::de::Error::custom(format!("missing phase {p}")))?;
            out.push((p, PhaseRange { start, end }));
        }
        Ok(PreviousPhases(out))
    }
}

/// The accepted `global_ver` range (spec §3.7), inclusive at both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionWindow {
    pub min: i64,
    pub max: i64,
}

impl VersionWindow {
    pub fn contains(&self, global_ver: u64) -> bool {
        i64::try_from(global_ver).is_ok_and(|v| self.min <= v && v <= self.max)
    }
}

/// The reference's default `cycle.version_range_cycles`.
pub const DEFAULT_VERSION_RANGE_CYCLES: u64 = 3;

/// `get_allowed_version_range` (spec §3.7) from a current phase and the previous ranges.
/// In `MinerCommit1` the window ends at the current phase's start; otherwise at the previous
/// `MinerCommit1` start, with the cycle length derived from the previous ranges.
pub fn version_window(
    current: &PhaseInfo,
    previous: &PreviousPhases,
    range_cycles: u64,
) -> Option<VersionWindow> {
    let cycles = i64::try_from(range_cycles).ok()?;
    let (max, len) = if current.phase_name == PhaseName::MinerCommit1 {
        (
            i64::try_from(current.phase_start_block).ok()?,
            i64::try_from(current.cycle_length).ok()?,
        )
    } else {
        (
            previous.get(PhaseName::MinerCommit1)?.start,
            previous.total_len(),
        )
    };
    Some(VersionWindow {
        min: max - len.checked_mul(cycles)?,
        max,
    })
}

/// Phase order and lengths; `start_i = Σ_{j<i} len_j`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseSchedule {
    lens: [u64; 9],
    starts: [u64; 9],
    cycle_length: u64,
}

impl Default for PhaseSchedule {
    fn default() -> Self {
        match PhaseSchedule::new(CyclePeriods::default()) {
            Ok(s) => s,
            // The default periods are non-zero constants.
            Err(_) => unreachable!("default periods are valid"),
        }
    }
}

impl PhaseSchedule {
    /// Builds the schedule; every period must be at least one block.
    pub fn new(p: CyclePeriods) -> Result<Self, ScheduleError> {
        let c = p.commit_period;
        let lens = [
            p.distribute_period,
            p.train_period,
            c,
            c,
            p.submission_period,
            p.validate_period,
            p.merge_period,
            c,
            c,
        ];
        let mut starts = [0u64; 9];
        let mut acc = 0u64;
        for (i, len) in lens.iter().enumerate() {
            if *len == 0 {
                return Err(ScheduleError::EmptyPhase(PhaseName::ALL[i]));
            }
            starts[i] = acc;
            acc = acc.checked_add(*len).ok_or(ScheduleError::Overflow)?;
        }
        Ok(PhaseSchedule {
            lens,
            starts,
            cycle_length: acc,
        })
    }

    /// Σ of the phase lengths (500 with the live periods).
    pub fn cycle_length(&self) -> u64 {
        self.cycle_length
    }

    /// Length of one phase.
    pub fn phase_len(&self, phase: PhaseName) -> u64 {
        self.lens[phase.index()]
    }

    /// Offset of a phase's first block inside the cycle.
    pub fn phase_offset(&self, phase: PhaseName) -> u64 {
        self.starts[phase.index()]
    }

    /// `get_phase(block)`.
    pub fn phase_at(&self, block: u64) -> PhaseInfo {
        let l = self.cycle_length;
        let cycle_index = block / l;
        let cbi = block % l;
        // The last phase whose start is <= cbi (phases are non-empty, so exactly one matches).
        let i = self.starts.iter().rposition(|s| *s <= cbi).unwrap_or(0);
        let start_i = self.starts[i];
        let len_i = self.lens[i];
        let base = block - cbi;
        PhaseInfo {
            block,
            cycle_length: l,
            cycle_index,
            cycle_block_index: cbi,
            phase_name: PhaseName::ALL[i],
            phase_index: i as u64,
            phase_start_block: base + start_i,
            phase_end_block: base + start_i + len_i - 1,
            blocks_into_phase: cbi - start_i,
            blocks_remaining_in_phase: start_i + len_i - cbi - 1,
        }
    }

    /// `blocks_until_next_phase()` at head `block`: for every phase its next occurrence that
    /// starts at or after `block` (a phase in progress past its first block is next cycle's).
    pub fn blocks_until_next_phase(&self, block: u64) -> NextPhases {
        let l = self.cycle_length;
        let cbi = block % l;
        let base = block - cbi;
        NextPhases(
            PhaseName::ALL
                .into_iter()
                .map(|p| {
                    let s = self.starts[p.index()];
                    let start = if s >= cbi { base + s } else { base + s + l };
                    let occ = NextOccurrence {
                        start,
                        end: start + self.lens[p.index()] - 1,
                        blocks_until: start - block,
                    };
                    (p, occ)
                })
                .collect(),
        )
    }

    /// `previous_phase_block_ranges()`: the next occurrence minus one cycle, for every phase.
    /// For the phase in progress (past its first block) this is the current, unfinished
    /// occurrence (reference behaviour); during the first cycle the ranges are negative.
    pub fn previous_phase_blocks(&self, block: u64) -> PreviousPhases {
        let l = self.cycle_length as i64;
        PreviousPhases(
            self.blocks_until_next_phase(block)
                .0
                .into_iter()
                .map(|(p, o)| {
                    (
                        p,
                        PhaseRange {
                            start: o.start as i64 - l,
                            end: o.end as i64 - l,
                        },
                    )
                })
                .collect(),
        )
    }

    /// The version window at `block` (spec §3.7) computed from this schedule alone.
    pub fn version_window_at(&self, block: u64, range_cycles: u64) -> Option<VersionWindow> {
        version_window(
            &self.phase_at(block),
            &self.previous_phase_blocks(block),
            range_cycles,
        )
    }

    /// The start and (inclusive) end of the most recent *completed* occurrence of `phase`
    /// at `block`, or `None` when it has never completed. Unlike `previous_phase_blocks`
    /// this never returns the occurrence still in progress.
    pub fn last_completed(&self, phase: PhaseName, block: u64) -> Option<(u64, u64)> {
        let l = self.cycle_length;
        let s = self.starts[phase.index()];
        let len = self.lens[phase.index()];
        // Occurrence k covers [k*l + s, k*l + s + len - 1]; completed iff end < block.
        let end_needed = block.checked_sub(1)?; // end <= block - 1
        let k = end_needed.checked_sub(s + len - 1)? / l;
        let start = k * l + s;
        Some((start, start + len - 1))
    }
}
