//! Names, listing and "best" selection over a real run directory.

use std::collections::BTreeMap;

use miner_contract::layout::{NameValue, parse_dynamic_filename};
use miner_contract::pt::{DType, Tensor};
use miner_contract::{CheckpointKind, CheckpointName, LayoutError, PublishInfo, RunDir};
use proptest::prelude::*;

proptest! {
    #[test]
    fn own_names_round_trip(gv in any::<u64>(), io in any::<u64>()) {
        let n = CheckpointName::own(gv, io);
        prop_assert_eq!(n.dir_name(), format!("globalver_{gv}_inneropt_{io}"));
        prop_assert_eq!(CheckpointName::parse(&n.dir_name()), Some(n));
    }

    #[test]
    fn validator_names_round_trip(uid in any::<u16>(), hk in "[1-9A-HJ-NP-Za-km-z]{1,48}", gv in any::<u64>()) {
        let n = CheckpointName::validator(uid, &hk, gv).unwrap();
        prop_assert_eq!(n.inner_opt(), 0);
        prop_assert_eq!(CheckpointName::parse(&n.dir_name()), Some(n));
    }

    /// Whatever the name, parsing never panics, and accepted names are never dotfiles.
    #[test]
    fn parsing_arbitrary_names_is_total(name in "[._a-z0-9]{0,40}") {
        let parsed = CheckpointName::parse(&name);
        if parsed.is_some() {
            prop_assert!(!name.starts_with('.'));
        }
        let _ = parse_dynamic_filename(&name);
    }
}

#[test]
fn dynamic_filename_values_are_ints_when_they_parse() {
    let m = parse_dynamic_filename("uid_13_hotkey_5FnRrH_block_5759026.pt");
    assert_eq!(m["uid"], NameValue::Int(13));
    assert_eq!(m["block"], NameValue::Int(5759026));
    assert_eq!(m["hotkey"], NameValue::Str("5FnRrH".into()));
    // Leading zeros parse as ints, as in Python; the on-disk name is kept as found.
    assert_eq!(
        CheckpointName::parse("globalver_007_inneropt_01"),
        Some(CheckpointName::own(7, 1))
    );
}

fn publish(run: &RunDir, name: CheckpointName) {
    let mut m = BTreeMap::new();
    m.insert(
        "model.layers.1.mlp.experts.4.down_proj".to_string(),
        Tensor {
            dtype: DType::F32,
            shape: vec![1],
            data: vec![0, 0, 128, 63],
        },
    );
    let s = run.stage(name.clone()).unwrap();
    let h = s.write_model_tensors(0, &m).unwrap();
    let info = match name {
        CheckpointName::Own { .. } => PublishInfo::own(0, h),
        CheckpointName::Validator { .. } => PublishInfo::verified_download(0, h, "sig".into()),
    };
    s.publish(info).unwrap();
}

#[test]
fn best_prefers_higher_version_and_own_on_a_tie_among_verified_only() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    publish(&run, CheckpointName::own(100, 40));
    publish(&run, CheckpointName::validator(3, "5Val", 200).unwrap());
    publish(&run, CheckpointName::own(200, 0));
    // Newer but unverified: ignored by selection.
    std::fs::create_dir_all(run.validator_dir().join("uid_4_hotkey_5New_globalver_300")).unwrap();

    let list = run.list().unwrap();
    let order: Vec<(&str, CheckpointKind, bool)> = list
        .iter()
        .map(|e| (e.dir_name.as_str(), e.kind, e.is_verified()))
        .collect();
    assert_eq!(
        order,
        vec![
            (
                "uid_4_hotkey_5New_globalver_300",
                CheckpointKind::Validator,
                false
            ),
            ("globalver_200_inneropt_0", CheckpointKind::Own, true),
            (
                "uid_3_hotkey_5Val_globalver_200",
                CheckpointKind::Validator,
                true
            ),
            ("globalver_100_inneropt_40", CheckpointKind::Own, true),
        ]
    );
    assert_eq!(
        run.best().unwrap().unwrap().dir_name,
        "globalver_200_inneropt_0"
    );
    assert_eq!(
        run.best_own().unwrap().unwrap().dir_name,
        "globalver_200_inneropt_0"
    );
    assert_eq!(
        run.best_validator().unwrap().unwrap().dir_name,
        "uid_3_hotkey_5Val_globalver_200"
    );

    // A newer own step wins over the validator tie.
    publish(&run, CheckpointName::own(200, 20));
    assert_eq!(
        run.best().unwrap().unwrap().dir_name,
        "globalver_200_inneropt_20"
    );
}

#[test]
fn run_dir_opens_from_directory_or_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    std::fs::write(run.config_file(), "{}\n").unwrap();
    assert_eq!(RunDir::open(dir.path()).unwrap(), run);
    assert_eq!(RunDir::open(&run.config_file()).unwrap(), run);
    let missing = dir.path().join("nope");
    let err = RunDir::open(&missing).unwrap_err();
    assert!(matches!(err, LayoutError::Missing { .. }));
    assert!(err.to_string().contains("nope"), "{err}");
    // Validator downloads are per miner, inside the run directory.
    assert_eq!(run.validator_dir(), dir.path().join("validator_checkpoint"));
}
