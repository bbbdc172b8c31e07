//! Bad input: every malformed file kind gives the variant a caller acts on, with a one-line
//! message that names the file; bad writer input leaves nothing behind.

mod pt_support;

use std::collections::BTreeMap;
use std::path::Path;

use miner_contract::hash::hash_pt_file;
use miner_contract::pt::{
    DType, PtError, PtReader, PtWriteOptions, Tensor, TensorMeta, write_pt, write_pt_tensors,
};
use pt_support::helper;

fn open_err(path: &Path) -> PtError {
    let err = PtReader::open(path).expect_err("a bad file must not open");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "message does not name the file: {msg}"
    );
    assert!(!msg.contains('\n'), "message is not one line: {msg}");
    assert_eq!(err.path(), path);
    // Hashing the file fails the same way.
    assert_eq!(
        hash_pt_file(path)
            .expect_err("hash of a bad file")
            .to_string(),
        msg
    );
    err
}

fn good_file(dir: &Path) -> std::path::PathBuf {
    let mut sd = BTreeMap::new();
    sd.insert(
        "w".to_string(),
        Tensor {
            dtype: DType::F16,
            shape: vec![64, 64],
            data: vec![0x3c; 64 * 64 * 2],
        },
    );
    let p = dir.join("model_expgroup_0.pt");
    write_pt_tensors(&p, &sd, &PtWriteOptions::default()).unwrap();
    p
}

#[test]
fn files_from_python_with_each_defect() {
    let dir = tempfile::tempdir().unwrap();
    let bad = helper(&["bad", dir.path().to_str().unwrap()]);
    let path = |k: &str| std::path::PathBuf::from(bad[k].as_str().unwrap());

    let e = open_err(&path("forbidden_global"));
    assert!(
        matches!(&e, PtError::ForbiddenGlobal { global, .. } if global == "os.system"),
        "{e}"
    );
    let e = open_err(&path("unknown_storage"));
    assert!(
        matches!(&e, PtError::UnknownStorage { storage, .. } if storage == "torch.ComplexFloatStorage"),
        "{e}"
    );
    let e = open_err(&path("bad_pickle"));
    assert!(matches!(e, PtError::BadPickle { .. }), "{e}");
    let e = open_err(&path("out_of_bounds"));
    assert!(
        matches!(&e, PtError::OutOfBounds { name, .. } if name == "w"),
        "{e}"
    );
    let e = open_err(&path("missing_storage"));
    assert!(matches!(e, PtError::CorruptZip { .. }), "{e}");
    for k in [
        "not_checkpoint_ints",
        "not_checkpoint_list",
        "not_checkpoint_empty",
        "optimizer_like",
    ] {
        let e = open_err(&path(k));
        assert!(matches!(e, PtError::NotACheckpoint { .. }), "{k}: {e}");
    }
    let e = open_err(&path("compressed"));
    assert!(matches!(e, PtError::CorruptZip { .. }), "{e}");
    for k in ["expanded_small", "expanded_huge"] {
        let e = open_err(&path(k));
        assert!(
            matches!(&e, PtError::OutOfBounds { name, .. } if name == "w"),
            "{k}: {e}"
        );
    }
    let e = open_err(&path("legacy"));
    assert!(matches!(e, PtError::NotZip { .. }), "{e}");
}

#[test]
fn truncated_files_are_reported_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let good = good_file(dir.path());
    let bytes = std::fs::read(&good).unwrap();
    assert!(PtReader::open(&good).is_ok());
    // Cut inside the data, inside the central directory, and in the end records.
    for cut in [
        100,
        bytes.len() / 2,
        bytes.len() - 200,
        bytes.len() - 50,
        bytes.len() - 1,
    ] {
        let p = dir.path().join(format!("cut_{cut}.pt"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = open_err(&p);
        assert!(matches!(e, PtError::Truncated { .. }), "cut at {cut}: {e}");
    }
}

#[test]
fn non_zip_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.pt");
    std::fs::write(&p, "this is a text file, not a checkpoint\n").unwrap();
    let e = open_err(&p);
    assert!(matches!(e, PtError::NotZip { .. }), "{e}");
    let p = dir.path().join("empty.pt");
    std::fs::write(&p, b"").unwrap();
    let e = open_err(&p);
    assert!(matches!(e, PtError::NotZip { .. }), "{e}");
    let p = dir.path().join("absent.pt");
    let e = open_err(&p);
    assert!(
        matches!(&e, PtError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{e}"
    );
}

#[test]
fn asking_for_an_absent_tensor_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let good = good_file(dir.path());
    let r = PtReader::open(&good).unwrap();
    let e = r.read("nope").unwrap_err();
    assert!(
        matches!(&e, PtError::NoSuchTensor { name, .. } if name == "nope"),
        "{e}"
    );
    assert!(e.to_string().contains("model_expgroup_0.pt"));
}

#[test]
fn bad_writer_input_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model_expgroup_2.pt");
    let metas = vec![TensorMeta::new("a", DType::F32, vec![4])];

    // Too few bytes.
    let e = write_pt(
        &path,
        metas.clone(),
        &PtWriteOptions::default(),
        |_, out| out.write_all(&[0u8; 12]),
    )
    .unwrap_err();
    assert!(matches!(e, PtError::InvalidTensor { .. }), "{e}");
    assert!(e.to_string().contains("12 of the 16 bytes"), "{e}");
    // Too many bytes.
    let e = write_pt(
        &path,
        metas.clone(),
        &PtWriteOptions::default(),
        |_, out| out.write_all(&[0u8; 20]),
    )
    .unwrap_err();
    assert!(matches!(e, PtError::InvalidTensor { .. }), "{e}");
    // The source of the bytes fails.
    let e = write_pt(&path, metas.clone(), &PtWriteOptions::default(), |_, _| {
        Err(std::io::Error::other("source went away"))
    })
    .unwrap_err();
    assert!(matches!(e, PtError::Io { .. }), "{e}");
    assert!(e.to_string().contains("source went away"), "{e}");
    // Duplicate names.
    let dup = vec![metas[0].clone(), metas[0].clone()];
    let e = write_pt(&path, dup, &PtWriteOptions::default(), |_, out| {
        out.write_all(&[0u8; 16])
    })
    .unwrap_err();
    assert!(matches!(e, PtError::InvalidTensor { .. }), "{e}");
    // Data that does not match the shape.
    let mut sd = BTreeMap::new();
    sd.insert(
        "b".to_string(),
        Tensor {
            dtype: DType::BF16,
            shape: vec![3],
            data: vec![0; 5],
        },
    );
    let e = write_pt_tensors(&path, &sd, &PtWriteOptions::default()).unwrap_err();
    assert!(matches!(e, PtError::InvalidTensor { .. }), "{e}");

    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn failed_rewrite_keeps_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = good_file(dir.path());
    let before = std::fs::read(&good).unwrap();
    let e = write_pt(
        &good,
        vec![TensorMeta::new("a", DType::F32, vec![4])],
        &PtWriteOptions::default(),
        |_, _| Err(std::io::Error::other("boom")),
    )
    .unwrap_err();
    assert!(matches!(e, PtError::Io { .. }));
    assert_eq!(std::fs::read(&good).unwrap(), before);
}
