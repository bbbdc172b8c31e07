//! Atomic publish: readers never see temporaries or manifest-less directories, unpublished
//! stages clean up, published names are never modified, disk-full surfaces clearly.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::process::Command;

use miner_contract::layout::{EntryState, TMP_PREFIX};
use miner_contract::manifest::MANIFEST_FILE;
use miner_contract::pt::{DType, Tensor, TensorMeta};
use miner_contract::shard::{ShardFormat, hash_shard_file};
use miner_contract::{CheckpointKind, PublishError, PublishInfo, Published, RunDir};

fn tiny_model(seed: u8, cols: usize) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    for e in [22usize, 17] {
        m.insert(
            format!("model.layers.1.mlp.experts.{e}.gate_up_proj"),
            Tensor {
                dtype: DType::F16,
                shape: vec![4, cols],
                data: (0..8 * cols)
                    .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(e as u8))
                    .collect(),
            },
        );
    }
    m
}

fn publish_own(run: &RunDir, gv: u64, io: u64) -> Published {
    let s = run.stage_own(gv, io).unwrap();
    let h = s
        .write_model_tensors(0, &tiny_model(3, 16))
        .unwrap_or_else(|e| panic!("write {}: {e:?}", s.path().display()));
    s.publish(PublishInfo::own(0, h))
        .unwrap_or_else(|e| panic!("publish: {e:?}"))
}

fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|d| d.unwrap().file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with(TMP_PREFIX) || n.starts_with(".trash_"))
        .collect()
}

#[test]
fn staged_checkpoint_is_invisible_until_published() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let staged = run.stage_own(7, 40).unwrap();
    assert!(staged.path().starts_with(dir.path()));
    let hash = staged.write_model_tensors(0, &tiny_model(1, 8)).unwrap();
    staged
        .write_file("inner_optimizer.bin", |w| w.write_all(b"adam"))
        .unwrap();
    // Fully written but unpublished: no reader sees it.
    assert_eq!(run.list().unwrap(), vec![]);
    assert_eq!(run.best().unwrap(), None);
    assert!(!staged.final_path().exists());

    let published = staged.publish(PublishInfo::own(0, hash)).unwrap();
    assert_eq!(published.path, dir.path().join("globalver_7_inneropt_40"));
    let list = run.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].state, EntryState::Verified);
    assert_eq!(list[0].dir_name, "globalver_7_inneropt_40");
    let m = list[0].manifest.as_ref().unwrap();
    assert_eq!(m.model_hash, hash);
    // The default shard format is the live subnet's (addendum A1).
    assert_eq!(m.model_file, "model_expgroup_0.safetensors");
    let names: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        names,
        vec!["inner_optimizer.bin", "model_expgroup_0.safetensors"]
    );
    // The recorded hash is the hash of the file as stored.
    assert_eq!(
        hash_shard_file(&list[0].model_path().unwrap()).unwrap(),
        hash
    );
    assert_eq!(list[0].model_format(), Some(ShardFormat::Safetensors));
    assert_eq!(hidden_entries(dir.path()), Vec::<String>::new());
}

#[test]
fn dropping_an_unpublished_stage_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let staged = run.stage_validator(5, "5FnRrH", 100).unwrap();
    let tmp = staged.path().to_path_buf();
    staged.write_model_tensors(0, &tiny_model(2, 8)).unwrap();
    assert!(tmp.is_dir());
    drop(staged);
    assert!(!tmp.exists());
    assert_eq!(hidden_entries(&run.validator_dir()), Vec::<String>::new());
}

#[test]
fn manifest_less_and_damaged_directories_are_listed_incomplete_and_never_selected() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    publish_own(&run, 5, 10);
    // A newer directory without a manifest (e.g. the reference's non-atomic download).
    let raw = run.validator_dir().join("uid_3_hotkey_5Abc_globalver_9");
    std::fs::create_dir_all(&raw).unwrap();
    std::fs::write(raw.join("model_expgroup_0.pt"), b"partial").unwrap();
    // A newer own checkpoint whose model file was truncated after publish.
    let damaged = publish_own(&run, 8, 0);
    let model = damaged.path.join("model_expgroup_0.safetensors");
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    // A leftover temporary with a complete-looking name inside.
    std::fs::create_dir_all(dir.path().join(".tmp_globalver_99_inneropt_0")).unwrap();

    let list = run.list().unwrap();
    let summary: Vec<(String, bool)> = list
        .iter()
        .map(|e| (e.dir_name.clone(), e.is_verified()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("uid_3_hotkey_5Abc_globalver_9".to_string(), false),
            ("globalver_8_inneropt_0".to_string(), false),
            ("globalver_5_inneropt_10".to_string(), true),
        ]
    );
    assert_eq!(
        list[0].state,
        EntryState::Incomplete("no MANIFEST.json".into())
    );
    let EntryState::Incomplete(reason) = &list[1].state else {
        panic!("damaged checkpoint listed as verified")
    };
    assert!(
        reason.contains("model_expgroup_0.safetensors has"),
        "{reason}"
    );
    assert_eq!(
        run.best().unwrap().unwrap().dir_name,
        "globalver_5_inneropt_10"
    );
    assert_eq!(run.best_validator().unwrap(), None);
}

#[test]
fn a_published_name_is_never_modified_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let first = publish_own(&run, 1, 20);
    let before = std::fs::read(first.path.join(MANIFEST_FILE)).unwrap();

    let again = run.stage_own(1, 20).unwrap();
    let tmp = again.path().to_path_buf();
    let h = again.write_model_tensors(0, &tiny_model(9, 4)).unwrap();
    let err = again.publish(PublishInfo::own(0, h)).unwrap_err();
    assert!(
        matches!(err, PublishError::AlreadyPublished { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("globalver_1_inneropt_20"), "{err}");
    assert_eq!(
        std::fs::read(first.path.join(MANIFEST_FILE)).unwrap(),
        before
    );
    assert!(!tmp.exists(), "failed publish must remove its temporary");
}

#[test]
fn an_incomplete_leftover_under_the_final_name_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let leftover = run.validator_dir().join("uid_4_hotkey_5Xyz_globalver_12");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("model_expgroup_0.pt"), b"junk").unwrap();
    let s = run.stage_validator(4, "5Xyz", 12).unwrap();
    let h = s.write_model_tensors(0, &tiny_model(4, 4)).unwrap();
    let p = s
        .publish(PublishInfo::verified_download(0, h, "c2ln".into()))
        .unwrap();
    let best = run.best_validator().unwrap().unwrap();
    assert_eq!(best.path, p.path);
    let v = best.manifest.unwrap().validator.unwrap();
    assert_eq!((v.uid, v.hotkey.as_str(), v.verified), (4, "5Xyz", true));
}

#[test]
fn validator_checkpoints_publish_only_as_verified_downloads() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let s = run.stage_validator(1, "5Val", 30).unwrap();
    let h = s.write_model_tensors(0, &tiny_model(5, 4)).unwrap();
    let err = s.publish(PublishInfo::own(0, h)).unwrap_err();
    assert!(matches!(
        err,
        PublishError::KindMismatch {
            staged: CheckpointKind::Validator,
            ..
        }
    ));
    assert_eq!(run.list().unwrap(), vec![]);

    // A model file for a different group than announced is refused too.
    let s = run.stage_own(1, 1).unwrap();
    let h = s.write_model_tensors(0, &tiny_model(5, 4)).unwrap();
    let err = s.publish(PublishInfo::own(1, h)).unwrap_err();
    assert!(
        err.to_string()
            .contains("model_expgroup_1.safetensors or model_expgroup_1.pt was not written"),
        "{err}"
    );
    assert!(run.stage_validator(1, "../etc", 3).is_err());
}

#[test]
fn stale_temporaries_of_dead_writers_are_cleaned_and_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    // A writer that has exited: its pid is dead.
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let dead = dir.path().join(format!(
        ".tmp_globalver_3_inneropt_3.{dead_pid}-0.00000000000000aa"
    ));
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(dead.join("model_expgroup_0.pt"), b"half").unwrap();
    // The reference's temporaries carry no owner and are stale by its own rule.
    let legacy = dir.path().join(".tmp_globalver_2_inneropt_2");
    std::fs::create_dir_all(&legacy).unwrap();
    // A concurrent live writer (this process).
    let live = run.stage_own(4, 4).unwrap();

    let next = run.stage_own(5, 5).unwrap();
    assert!(!dead.exists());
    assert!(!legacy.exists());
    assert!(
        live.path().exists(),
        "a live writer's temporary must survive"
    );
    drop(next);
    drop(live);
    assert_eq!(hidden_entries(dir.path()), Vec::<String>::new());
}

/// A writer whose storage fills up mid-write (ENOSPC injected through the fill callback).
#[test]
fn disk_full_while_writing_is_a_clear_error_and_discards_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let earlier = publish_own(&run, 1, 1);
    let staged = run.stage_own(1, 2).unwrap();
    let tmp = staged.path().to_path_buf();
    let metas = vec![TensorMeta::new(
        "model.layers.1.mlp.experts.22.down_proj",
        DType::F16,
        vec![64, 64],
    )];
    for format in ShardFormat::PREFERENCE {
        let err = staged
            .write_model(0, format, metas.clone(), |_, w| {
                w.write_all(&[0u8; 100])?;
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            })
            .unwrap_err();
        assert!(matches!(err, PublishError::DiskFull { .. }), "{err:?}");
        let msg = err.to_string();
        let name = format!("model_expgroup_0.{format}");
        assert!(msg.contains("disk full"), "{msg}");
        assert!(msg.contains(&name), "{msg}");
        assert!(!tmp.join(&name).exists(), "partial file removed at once");
    }
    let err = staged
        .write_file("global_state.bin", |_| {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        })
        .unwrap_err();
    assert!(matches!(err, PublishError::DiskFull { .. }), "{err:?}");
    drop(staged);
    assert!(!tmp.exists());
    assert_eq!(run.best().unwrap().unwrap().path, earlier.path);
}

/// The same on a real full filesystem: a 1 MiB tmpfs (needs CAP_SYS_ADMIN, which the CI
/// container has as root; elsewhere the injected test above covers the logic).
#[test]
fn disk_full_on_a_real_tiny_tmpfs() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tiny");
    std::fs::create_dir_all(&mnt).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status();
    if !status.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var_os("MINER_REQUIRE_TMPFS").is_none(),
            "MINER_REQUIRE_TMPFS is set but mounting a tmpfs failed"
        );
        eprintln!(
            "note: cannot mount a tmpfs here (not privileged); injected ENOSPC test covers this"
        );
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&mnt);
    let run = RunDir::create(&mnt.join("run")).unwrap();
    let earlier = publish_own(&run, 1, 1);
    let staged = run.stage_own(1, 2).unwrap();
    let tmp = staged.path().to_path_buf();
    assert!(matches!(
        staged.ensure_free_space(2 << 20),
        Err(PublishError::InsufficientSpace { .. })
    ));
    // 2 MiB of tensors into a 1 MiB filesystem.
    let err = staged
        .write_model_tensors(0, &tiny_model(7, 128 * 1024))
        .unwrap_err();
    assert!(matches!(err, PublishError::DiskFull { .. }), "{err:?}");
    assert!(err.to_string().contains("disk full"), "{err}");
    drop(staged);
    assert!(!tmp.exists());
    let list = run.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].path, earlier.path);
    assert!(list[0].is_verified());
    // Space was given back: the next checkpoint fits.
    publish_own(&run, 1, 3);
}

#[test]
fn a_pt_shard_publishes_and_safetensors_wins_when_both_are_there() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path()).unwrap();
    let s = run.stage_own(3, 1).unwrap();
    let h = s
        .write_model_tensors_as(0, ShardFormat::Pt, &tiny_model(6, 4))
        .unwrap();
    let p = s.publish(PublishInfo::own(0, h)).unwrap();
    let e = run.best().unwrap().unwrap();
    assert_eq!(e.model_path().unwrap(), p.path.join("model_expgroup_0.pt"));
    assert_eq!(e.model_format(), Some(ShardFormat::Pt));
    assert_eq!(hash_shard_file(&e.model_path().unwrap()).unwrap(), h);

    let s = run.stage_own(3, 2).unwrap();
    let h_pt = s
        .write_model_tensors_as(0, ShardFormat::Pt, &tiny_model(7, 4))
        .unwrap();
    let h_st = s.write_model_tensors(0, &tiny_model(7, 4)).unwrap();
    assert_eq!(h_pt, h_st, "one hash for the same tensors in either format");
    s.publish(PublishInfo::own(0, h_st)).unwrap();
    let e = run.best().unwrap().unwrap();
    assert_eq!(e.dir_name, "globalver_3_inneropt_2");
    assert_eq!(
        e.manifest.as_ref().unwrap().model_file,
        "model_expgroup_0.safetensors"
    );

    // A stage without any shard cannot publish; the error names both accepted names.
    let s = run.stage_own(3, 3).unwrap();
    s.write_file("notes.txt", |w| w.write_all(b"x")).unwrap();
    let err = s.publish(PublishInfo::own(0, h)).unwrap_err().to_string();
    assert!(
        err.contains("model_expgroup_0.safetensors") && err.contains("model_expgroup_0.pt"),
        "{err}"
    );
}
