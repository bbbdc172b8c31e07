//! The pure phase schedule (spec §3.1, §3.2, §3.7): known answers and properties.

use chainsync_svc::phase::{CyclePeriods, PhaseName, PhaseSchedule, version_window};
use proptest::prelude::*;

fn live() -> PhaseSchedule {
    PhaseSchedule::default()
}

#[test]
fn live_schedule_matches_the_spec_table() {
    let s = live();
    assert_eq!(s.cycle_length(), 500);
    let expect = [
        (PhaseName::Distribute, 0, 20),
        (PhaseName::Train, 20, 300),
        (PhaseName::MinerCommit1, 320, 10),
        (PhaseName::MinerCommit2, 330, 10),
        (PhaseName::Submission, 340, 80),
        (PhaseName::Validate, 420, 10),
        (PhaseName::Merge, 430, 50),
        (PhaseName::ValidatorCommit1, 480, 10),
        (PhaseName::ValidatorCommit2, 490, 10),
    ];
    for (p, off, len) in expect {
        assert_eq!(s.phase_offset(p), off, "{p}");
        assert_eq!(s.phase_len(p), len, "{p}");
    }
}

#[test]
fn phase_at_known_blocks() {
    let s = live();
    let p = s.phase_at(8_081_325);
    // 8_081_325 = 16162 * 500 + 325 → MinerCommit1 [8_081_320, 8_081_329]
    assert_eq!(p.phase_name, PhaseName::MinerCommit1);
    assert_eq!((p.cycle_index, p.cycle_block_index), (16_162, 325));
    assert_eq!(
        (p.phase_start_block, p.phase_end_block),
        (8_081_320, 8_081_329)
    );
    assert_eq!((p.blocks_into_phase, p.blocks_remaining_in_phase), (5, 4));
    assert_eq!(p.phase_index, 2);

    let p = s.phase_at(1000);
    assert_eq!(p.phase_name, PhaseName::Distribute);
    assert_eq!(
        (
            p.phase_start_block,
            p.phase_end_block,
            p.blocks_remaining_in_phase
        ),
        (1000, 1019, 19)
    );
    assert_eq!(s.phase_at(1499).phase_name, PhaseName::ValidatorCommit2);
    assert_eq!(s.phase_at(0).phase_name, PhaseName::Distribute);
}

#[test]
fn wire_format_of_phase_response_has_the_reference_field_order() {
    let json = serde_json::to_string(&live().phase_at(1330)).expect("serialize");
    assert_eq!(
        json,
        r#"{"block":1330,"cycle_length":500,"cycle_index":2,"cycle_block_index":330,"phase_name":"MinerCommit2","phase_index":3,"phase_start_block":1330,"phase_end_block":1339,"blocks_into_phase":0,"blocks_remaining_in_phase":9}"#
    );
}

#[test]
fn next_and_previous_follow_the_reference_quirks() {
    let s = live();
    // Exactly on the first block of MinerCommit1: blocks_until == 0.
    let next = s.blocks_until_next_phase(1320);
    assert_eq!(
        next.get(PhaseName::MinerCommit1)
            .map(|o| (o.start, o.end, o.blocks_until)),
        Some((1320, 1329, 0))
    );
    // One block in: the next MinerCommit1 is next cycle's.
    let next = s.blocks_until_next_phase(1321);
    assert_eq!(
        next.get(PhaseName::MinerCommit1).map(|o| o.start),
        Some(1820)
    );
    // ...and "previous" is the current, unfinished one.
    let prev = s.previous_phase_blocks(1321);
    assert_eq!(
        prev.get(PhaseName::MinerCommit1).map(|r| (r.start, r.end)),
        Some((1320, 1329))
    );
    // First cycle of a chain: negative ranges, no readable block.
    let prev = s.previous_phase_blocks(100);
    let vc2 = prev
        .get(PhaseName::ValidatorCommit2)
        .expect("phase present");
    assert_eq!((vc2.start, vc2.end), (-10, -1));
    assert_eq!(vc2.read_block(), None);
    let json = serde_json::to_string(&s.blocks_until_next_phase(1000)).expect("serialize");
    assert!(
        json.starts_with(r#"{"Distribute":[1000,1019,0],"Train":[1020,1319,20],"#),
        "{json}"
    );
}

#[test]
fn version_window_known_answers() {
    let s = live();
    // In MinerCommit1: max = its start; min = max - 3 * 500.
    let w = s.version_window_at(8_081_325, 3).expect("window");
    assert_eq!((w.min, w.max), (8_081_320 - 1500, 8_081_320));
    assert!(
        w.contains(8_081_320)
            && w.contains(8_079_820)
            && !w.contains(8_079_819)
            && !w.contains(8_081_321)
    );
    // In Distribute of the next cycle: max = the previous MinerCommit1 start.
    let w = s.version_window_at(8_081_505, 3).expect("window");
    assert_eq!((w.min, w.max), (8_081_320 - 1500, 8_081_320));
    // Same answer through the API-shaped inputs.
    let w2 = version_window(
        &s.phase_at(8_081_505),
        &s.previous_phase_blocks(8_081_505),
        3,
    )
    .expect("window");
    assert_eq!(w, w2);
}

#[test]
fn zero_length_phase_is_rejected() {
    let p = CyclePeriods {
        merge_period: 0,
        ..CyclePeriods::default()
    };
    assert!(PhaseSchedule::new(p).is_err());
}

fn periods() -> impl Strategy<Value = CyclePeriods> {
    (1u64..60, 1u64..400, 1u64..30, 1u64..100, 1u64..30, 1u64..80).prop_map(|(d, t, c, s, v, m)| {
        CyclePeriods {
            distribute_period: d,
            train_period: t,
            commit_period: c,
            submission_period: s,
            validate_period: v,
            merge_period: m,
        }
    })
}

proptest! {
    #[test]
    fn phases_tile_the_cycle(p in periods(), cycle in 0u64..1_000_000) {
        let s = PhaseSchedule::new(p).expect("valid");
        let l = s.cycle_length();
        let base = cycle * l;
        let mut counts = [0u64; 9];
        let mut last_idx = 0u64;
        for b in base..base + l {
            let info = s.phase_at(b);
            prop_assert!(info.phase_index >= last_idx, "phase order goes back at block {}", b);
            last_idx = info.phase_index;
            counts[info.phase_name.index()] += 1;
        }
        for ph in PhaseName::ALL {
            prop_assert_eq!(counts[ph.index()], s.phase_len(ph));
        }
    }

    #[test]
    fn phase_at_is_self_consistent(p in periods(), block in 0u64..2_000_000_000) {
        let s = PhaseSchedule::new(p).expect("valid");
        let i = s.phase_at(block);
        prop_assert!(i.phase_start_block <= block && block <= i.phase_end_block);
        prop_assert_eq!(i.blocks_into_phase + i.blocks_remaining_in_phase + 1, s.phase_len(i.phase_name));
        prop_assert_eq!(i.phase_len(), s.phase_len(i.phase_name));
        prop_assert_eq!(i.cycle_index * i.cycle_length + i.cycle_block_index, block);
        prop_assert_eq!(i.phase_start_block, i.cycle_index * i.cycle_length + s.phase_offset(i.phase_name));
        prop_assert_eq!(i.blocks_into_phase, block - i.phase_start_block);
    }

    #[test]
    fn next_occurrence_starts_that_phase(p in periods(), block in 0u64..2_000_000_000) {
        let s = PhaseSchedule::new(p).expect("valid");
        let l = s.cycle_length();
        for (ph, o) in s.blocks_until_next_phase(block).0 {
            prop_assert!(o.blocks_until < l);
            prop_assert_eq!(o.start, block + o.blocks_until);
            let at = s.phase_at(o.start);
            prop_assert_eq!(at.phase_name, ph);
            prop_assert_eq!(at.blocks_into_phase, 0);
            prop_assert_eq!(o.end, at.phase_end_block);
            prop_assert_eq!(o.blocks_until == 0, s.phase_at(block).phase_name == ph && s.phase_at(block).blocks_into_phase == 0);
        }
    }

    #[test]
    fn previous_is_one_cycle_before_next(p in periods(), block in 0u64..2_000_000_000) {
        let s = PhaseSchedule::new(p).expect("valid");
        let l = s.cycle_length() as i64;
        let next = s.blocks_until_next_phase(block);
        let prev = s.previous_phase_blocks(block);
        prop_assert_eq!(prev.total_len(), l);
        for ph in PhaseName::ALL {
            let (n, r) = (next.get(ph).expect("n"), prev.get(ph).expect("p"));
            prop_assert_eq!(r.start, n.start as i64 - l);
            prop_assert_eq!(r.len(), s.phase_len(ph) as i64);
            prop_assert!(r.start <= block as i64 && r.start >= block as i64 - l);
        }
    }

    #[test]
    fn last_completed_is_complete_and_latest(p in periods(), block in 0u64..2_000_000_000) {
        let s = PhaseSchedule::new(p).expect("valid");
        let l = s.cycle_length();
        for ph in PhaseName::ALL {
            match s.last_completed(ph, block) {
                Some((start, end)) => {
                    prop_assert!(end < block);
                    prop_assert_eq!(end - start + 1, s.phase_len(ph));
                    prop_assert_eq!(s.phase_at(start).phase_name, ph);
                    prop_assert!(end + l >= block, "a later occurrence also completed");
                }
                None => prop_assert!(s.phase_offset(ph) + s.phase_len(ph) > block),
            }
        }
    }

    #[test]
    fn version_window_spans_range_cycles(p in periods(), block in 0u64..2_000_000_000, cycles in 0u64..6) {
        let s = PhaseSchedule::new(p).expect("valid");
        let w = s.version_window_at(block, cycles).expect("window");
        prop_assert_eq!(w.max - w.min, (s.cycle_length() * cycles) as i64);
        prop_assert_eq!(s.phase_at(w.max.max(0) as u64).phase_name == PhaseName::MinerCommit1 || w.max < 0, true);
        prop_assert!(w.max <= block as i64);
    }
}
