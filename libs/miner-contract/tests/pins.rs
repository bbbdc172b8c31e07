//! Pins keep a checkpoint alive while chainsync uses it; dead or expired pins are reclaimed.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use miner_contract::pins::{PinRecord, ProcessIdentity, now_unix_ms};
use miner_contract::pt::{DType, Tensor};
use miner_contract::{CheckpointName, PinError, PublishInfo, RunDir};

fn publish_own(run: &RunDir, gv: u64, io: u64) -> CheckpointName {
    let mut m = BTreeMap::new();
    m.insert(
        "model.layers.1.mlp.experts.4.down_proj".to_string(),
        Tensor {
            dtype: DType::F16,
            shape: vec![8, 8],
            data: vec![io as u8; 128],
        },
    );
    let s = run.stage_own(gv, io).unwrap();
    let h = s.write_model_tensors(0, &m).unwrap();
    s.publish(PublishInfo::own(0, h)).unwrap().name
}

fn own_names(run: &RunDir) -> Vec<String> {
    run.list()
        .unwrap()
        .into_iter()
        .map(|e| e.dir_name)
        .collect()
}

#[test]
fn retention_never_deletes_a_pinned_checkpoint_and_drop_releases_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let committed = publish_own(&run, 1, 10);
    let pin = run
        .pin(&committed, "chainsync-commit", Duration::from_secs(600))
        .unwrap();
    assert_eq!(pin.record().holder, "chainsync-commit");
    assert_eq!(pin.record().pid, std::process::id());
    let entry = run.entry(&committed).unwrap().unwrap();
    assert_eq!(entry.pinned_by, vec!["chainsync-commit".to_string()]);

    publish_own(&run, 1, 20);
    publish_own(&run, 1, 30);
    let report = run.apply_retention(2).unwrap();
    assert!(report.deleted.is_empty());
    assert_eq!(
        report.kept_pinned,
        vec!["globalver_1_inneropt_10".to_string()]
    );
    assert_eq!(
        own_names(&run),
        vec![
            "globalver_1_inneropt_30",
            "globalver_1_inneropt_20",
            "globalver_1_inneropt_10"
        ]
    );

    drop(pin);
    assert!(run.pins().unwrap().is_empty());
    let report = run.apply_retention(2).unwrap();
    assert_eq!(
        report.deleted,
        vec![dir.path().join("globalver_1_inneropt_10")]
    );
    assert_eq!(
        own_names(&run),
        vec!["globalver_1_inneropt_30", "globalver_1_inneropt_20"]
    );
}

#[test]
fn only_published_verified_checkpoints_can_be_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let missing = CheckpointName::own(9, 9);
    let err = run.pin(&missing, "x", Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, PinError::NotPinnable { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");

    std::fs::create_dir_all(dir.path().join("globalver_2_inneropt_2")).unwrap();
    let err = run
        .pin(&CheckpointName::own(2, 2), "x", Duration::from_secs(5))
        .unwrap_err();
    assert!(err.to_string().contains("incomplete"), "{err}");

    let ok = publish_own(&run, 3, 3);
    assert!(matches!(
        run.pin(&ok, "bad holder/..", Duration::from_secs(5)),
        Err(PinError::BadHolder(_))
    ));
}

/// Writes a pin file on behalf of another process, as chainsync would.
fn write_foreign_pin(run: &RunDir, name: &CheckpointName, holder: ProcessIdentity, ttl_ms: u64) {
    let now = now_unix_ms();
    let rec = PinRecord {
        checkpoint: name.dir_name(),
        kind: name.kind(),
        holder: "chainsync-commit".into(),
        pid: holder.pid,
        start_time: holder.start_time,
        created_unix_ms: now,
        expires_unix_ms: now + ttl_ms,
    };
    std::fs::create_dir_all(run.pins_dir()).unwrap();
    std::fs::write(
        run.pins_dir().join(format!(
            "{}.chainsync-commit.{}.1.json",
            rec.checkpoint, rec.pid
        )),
        serde_json::to_vec(&rec).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_pin_whose_holder_died_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let old = publish_own(&run, 1, 1);
    publish_own(&run, 1, 2);
    publish_own(&run, 1, 3);

    let mut holder = Command::new("sleep").arg("30").spawn().unwrap();
    write_foreign_pin(&run, &old, ProcessIdentity::of(holder.id()), 600_000);
    assert_eq!(run.pins().unwrap().len(), 1);
    assert!(run.apply_retention(2).unwrap().deleted.is_empty());
    assert!(dir.path().join("globalver_1_inneropt_1").exists());

    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(
        run.pins().unwrap().is_empty(),
        "a dead holder's pin does not count"
    );
    let report = run.apply_retention(2).unwrap();
    assert_eq!(
        report.deleted,
        vec![dir.path().join("globalver_1_inneropt_1")]
    );
    let pin_files: Vec<_> = std::fs::read_dir(run.pins_dir())
        .unwrap()
        .filter_map(|d| d.ok())
        .filter(|d| d.file_name().to_string_lossy().ends_with(".json"))
        .collect();
    assert!(pin_files.is_empty(), "the stale pin file is reclaimed");

    // A pin half-written by a holder that died mid-write is cleaned too.
    let half = run
        .pins_dir()
        .join(format!(".tmp-{}-0-00000000000000ff", holder.id()));
    std::fs::write(&half, b"{\"checkpoint\":").unwrap();
    assert!(run.pins().unwrap().is_empty());
    run.reclaim_stale_pins().unwrap();
    assert!(!half.exists());
}

#[test]
fn an_expired_pin_is_reclaimed_and_renew_extends_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let a = publish_own(&run, 1, 1);
    publish_own(&run, 1, 2);
    let mut pin = run.pin(&a, "uploader", Duration::from_millis(0)).unwrap();
    assert!(run.pins().unwrap().is_empty(), "expired at once");
    pin.renew(Duration::from_secs(60)).unwrap();
    assert_eq!(run.pins().unwrap().len(), 1);
    assert!(run.apply_retention(1).unwrap().deleted.is_empty());

    write_foreign_pin(&run, &a, ProcessIdentity::current(), 0);
    let reclaimed = run.reclaim_stale_pins().unwrap();
    assert_eq!(reclaimed.len(), 1, "only the expired one");
    pin.release().unwrap();
    assert_eq!(run.apply_retention(1).unwrap().deleted.len(), 1);

    // A lapsed pin whose checkpoint was deleted meanwhile cannot be renewed.
    let b = publish_own(&run, 1, 3);
    let mut lapsed = run.pin(&b, "uploader", Duration::from_millis(0)).unwrap();
    publish_own(&run, 1, 4);
    let deleted = run.apply_retention(1).unwrap().deleted;
    assert!(
        deleted.contains(&dir.path().join(b.dir_name())),
        "{deleted:?}"
    );
    let err = lapsed.renew(Duration::from_secs(60)).unwrap_err();
    assert!(matches!(err, PinError::NotPinnable { .. }), "{err}");
}

/// chainsync pins the best own checkpoint while the trainer keeps publishing and pruning to
/// one: whenever a pin is held, its directory is complete.
#[test]
fn pinning_races_with_retention_safely() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    publish_own(&run, 1, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let trainer = {
        let run = run.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut step = 1;
            while !stop.load(Ordering::Relaxed) {
                publish_own(&run, 1, step);
                run.apply_retention(1).unwrap();
                step += 1;
            }
            step
        })
    };
    let mut pinned = 0;
    for _ in 0..200 {
        let Some(best) = run.best_own().unwrap() else {
            continue;
        };
        match run.pin(&best.name, "chainsync", Duration::from_secs(60)) {
            Ok(pin) => {
                let entry = run.entry(&best.name).unwrap();
                assert!(
                    entry.is_some_and(|e| e.is_verified()),
                    "pinned checkpoint vanished"
                );
                pinned += 1;
                drop(pin);
            }
            // Deleted between selection and pin: the pin is refused, nothing is lost.
            Err(PinError::NotPinnable { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let steps = trainer.join().unwrap();
    assert!(pinned > 0 && steps > 1, "pinned {pinned}, steps {steps}");
}
