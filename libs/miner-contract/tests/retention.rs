//! Retention is a pure function: never deletes a pinned, top-k or incomplete checkpoint and
//! deletes exactly the rest; applied on disk it keeps k per kind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use miner_contract::layout::selection_order;
use miner_contract::pt::{DType, Tensor};
use miner_contract::{
    CheckpointEntry, CheckpointKind, CheckpointName, EntryState, PublishInfo, RunDir,
    plan_retention,
};
use proptest::prelude::*;

fn entry(name: CheckpointName, verified: bool) -> CheckpointEntry {
    CheckpointEntry {
        kind: name.kind(),
        dir_name: name.dir_name(),
        path: PathBuf::from("/run").join(name.dir_name()),
        global_ver: name.global_ver(),
        inner_opt: name.inner_opt(),
        state: if verified {
            EntryState::Verified
        } else {
            EntryState::Incomplete("no MANIFEST.json".into())
        },
        manifest: None,
        pinned_by: vec![],
        name,
    }
}

fn arb_entry() -> impl Strategy<Value = CheckpointEntry> {
    let own = (0u64..6, 0u64..6).prop_map(|(g, i)| CheckpointName::own(g, i));
    let val = (0u16..4, "[a-zA-Z0-9]{1,6}", 0u64..6)
        .prop_map(|(u, h, g)| CheckpointName::validator(u, &h, g).unwrap());
    (prop_oneof![own, val], any::<bool>()).prop_map(|(n, v)| entry(n, v))
}

fn dedup(mut v: Vec<CheckpointEntry>) -> Vec<CheckpointEntry> {
    let mut seen = BTreeSet::new();
    v.retain(|e| seen.insert(e.dir_name.clone()));
    v
}

proptest! {
    #[test]
    fn retention_keeps_topk_and_pins_and_deletes_exactly_the_rest(
        entries in prop::collection::vec(arb_entry(), 0..24).prop_map(dedup),
        pin_mask in prop::collection::vec(any::<bool>(), 24),
        keep in 0usize..4,
    ) {
        let pinned: BTreeSet<String> = entries
            .iter()
            .zip(&pin_mask)
            .filter(|(_, p)| **p)
            .map(|(e, _)| e.dir_name.clone())
            .collect();
        let delete: BTreeSet<String> = plan_retention(&entries, &pinned, keep)
            .into_iter()
            .map(|e| e.dir_name.clone())
            .collect();

        // The top-k verified per kind, computed independently: sort by (gv, io) descending.
        let mut protected: BTreeSet<String> = pinned.clone();
        for kind in [CheckpointKind::Own, CheckpointKind::Validator] {
            let mut v: Vec<&CheckpointEntry> = entries
                .iter()
                .filter(|e| e.kind == kind && e.is_verified())
                .collect();
            v.sort_by(|a, b| (b.global_ver, b.inner_opt, &a.dir_name).cmp(&(a.global_ver, a.inner_opt, &b.dir_name)));
            protected.extend(v.iter().take(keep).map(|e| e.dir_name.clone()));
        }
        protected.extend(entries.iter().filter(|e| !e.is_verified()).map(|e| e.dir_name.clone()));

        for d in &delete {
            prop_assert!(!protected.contains(d), "deleted protected {}", d);
        }
        let all: BTreeSet<String> = entries.iter().map(|e| e.dir_name.clone()).collect();
        let rest: BTreeSet<String> = all.difference(&protected).cloned().collect();
        prop_assert_eq!(delete, rest);
    }

    #[test]
    fn selection_order_is_total_and_puts_own_first_on_ties(
        entries in prop::collection::vec(arb_entry(), 1..20).prop_map(dedup),
    ) {
        let mut sorted = entries.clone();
        sorted.sort_by(|a, b| selection_order((&a.name, &a.dir_name), (&b.name, &b.dir_name)));
        for w in sorted.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            prop_assert!((a.global_ver, a.inner_opt) >= (b.global_ver, b.inner_opt));
            if (a.global_ver, a.inner_opt) == (b.global_ver, b.inner_opt) {
                prop_assert!(a.kind <= b.kind, "own before validator on a tie");
            }
        }
        // Best verified = maximum key among verified entries, own preferred on a tie.
        let best = miner_contract::layout::best_of(sorted.clone(), None);
        let expect = entries
            .iter()
            .filter(|e| e.is_verified())
            .map(|e| (e.global_ver, e.inner_opt, e.kind == CheckpointKind::Own))
            .max();
        prop_assert_eq!(best.map(|e| (e.global_ver, e.inner_opt, e.kind == CheckpointKind::Own)), expect);
    }
}

#[test]
fn validator_checkpoints_never_count_against_own_ones() {
    let entries = vec![
        entry(CheckpointName::own(5, 1), true),
        entry(CheckpointName::validator(1, "5A", 9).unwrap(), true),
        entry(CheckpointName::validator(2, "5B", 8).unwrap(), true),
        entry(CheckpointName::own(5, 0), true),
        entry(CheckpointName::own(4, 9), true),
        entry(CheckpointName::own(6, 0), false),
    ];
    let delete: Vec<&str> = plan_retention(&entries, &BTreeSet::new(), 1)
        .into_iter()
        .map(|e| e.dir_name.as_str())
        .collect();
    assert_eq!(
        delete,
        vec![
            "uid_2_hotkey_5B_globalver_8",
            "globalver_5_inneropt_0",
            "globalver_4_inneropt_9"
        ]
    );
}

#[test]
fn applied_on_disk_keeps_two_per_kind_and_leaves_sidecars() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    std::fs::write(run.config_file(), "run:\n  run_name: x\n").unwrap();
    let mut m = BTreeMap::new();
    m.insert(
        "model.layers.1.mlp.experts.4.down_proj".to_string(),
        Tensor {
            dtype: DType::BF16,
            shape: vec![2],
            data: vec![1, 2, 3, 4],
        },
    );
    for i in 0..4 {
        let s = run.stage_own(10, i).unwrap();
        let h = s.write_model_tensors(0, &m).unwrap();
        s.publish(PublishInfo::own(0, h)).unwrap();
        let s = run.stage_validator(7, "5Val", 100 + i).unwrap();
        let h = s.write_model_tensors(0, &m).unwrap();
        s.publish(PublishInfo::verified_download(0, h, "sig".into()))
            .unwrap();
    }
    let report = run.apply_retention(2).unwrap();
    assert_eq!(report.deleted.len(), 4);
    let names: Vec<String> = run
        .list()
        .unwrap()
        .into_iter()
        .map(|e| e.dir_name)
        .collect();
    assert_eq!(
        names,
        vec![
            "uid_7_hotkey_5Val_globalver_103",
            "uid_7_hotkey_5Val_globalver_102",
            "globalver_10_inneropt_3",
            "globalver_10_inneropt_2",
        ]
    );
    assert!(run.config_file().exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|d| d.ok())
        .filter(|d| d.file_name().to_string_lossy().starts_with(".trash_"))
        .collect();
    assert!(leftovers.is_empty());
}
