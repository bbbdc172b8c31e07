//! The owner's `PhaseManager` arithmetic (spec §3.2), as the phase service computes it.

use serde_json::{Map, Value, json};

/// Phase names and lengths in cycle order.
#[derive(Debug, Clone)]
pub struct OwnerSchedule {
    phases: Vec<(String, u64)>,
}

impl Default for OwnerSchedule {
    /// The live 500-block schedule.
    fn default() -> Self {
        OwnerSchedule::new(&[
            ("Distribute", 20),
            ("Train", 300),
            ("MinerCommit1", 10),
            ("MinerCommit2", 10),
            ("Submission", 80),
            ("Validate", 10),
            ("Merge", 50),
            ("ValidatorCommit1", 10),
            ("ValidatorCommit2", 10),
        ])
    }
}

impl OwnerSchedule {
    /// `phases` must be non-empty with non-zero lengths.
    pub fn new(phases: &[(&str, u64)]) -> Self {
        OwnerSchedule {
            phases: phases.iter().map(|(n, l)| (n.to_string(), *l)).collect(),
        }
    }

    pub fn cycle_length(&self) -> u64 {
        self.phases.iter().map(|(_, l)| l).sum()
    }

    fn start_of(&self, i: usize) -> u64 {
        self.phases[..i].iter().map(|(_, l)| l).sum()
    }

    /// `(name, index, start, end)` of the phase containing `block`.
    pub fn phase_of(&self, block: u64) -> (String, usize, u64, u64) {
        let l = self.cycle_length();
        let cbi = block % l;
        let base = block - cbi;
        let mut start = 0;
        for (i, (name, len)) in self.phases.iter().enumerate() {
            if cbi < start + len {
                return (name.clone(), i, base + start, base + start + len - 1);
            }
            start += len;
        }
        // Unreachable for a non-empty schedule: cbi < cycle length.
        let (name, len) = &self.phases[self.phases.len() - 1];
        (
            name.clone(),
            self.phases.len() - 1,
            base + l - len,
            base + l - 1,
        )
    }

    /// `GET /get_phase`.
    pub fn get_phase(&self, block: u64) -> Value {
        let l = self.cycle_length();
        let (name, idx, start, end) = self.phase_of(block);
        json!({
            "block": block,
            "cycle_length": l,
            "cycle_index": block / l,
            "cycle_block_index": block % l,
            "phase_name": name,
            "phase_index": idx,
            "phase_start_block": start,
            "phase_end_block": end,
            "blocks_into_phase": block - start,
            "blocks_remaining_in_phase": end - block,
        })
    }

    /// `GET /blocks_until_next_phase` (`[start, end, blocks_until]` per phase, in order).
    pub fn blocks_until_next_phase(&self, block: u64) -> Value {
        let l = self.cycle_length();
        let cbi = block % l;
        let mut m = Map::new();
        for (i, (name, len)) in self.phases.iter().enumerate() {
            let s = self.start_of(i);
            let start = block - cbi + s + if s >= cbi { 0 } else { l };
            m.insert(name.clone(), json!([start, start + len - 1, start - block]));
        }
        Value::Object(m)
    }

    /// `GET /previous_phase_blocks` (next occurrence minus one cycle; negative early on).
    pub fn previous_phase_blocks(&self, block: u64) -> Value {
        let l = self.cycle_length() as i64;
        let next = self.blocks_until_next_phase(block);
        let mut m = Map::new();
        for (name, _) in &self.phases {
            let s = next[name][0].as_i64().unwrap_or(0);
            let e = next[name][1].as_i64().unwrap_or(0);
            m.insert(name.clone(), json!([s - l, e - l]));
        }
        Value::Object(m)
    }
}
