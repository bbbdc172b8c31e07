//! Property tests for the `.pt` codec: random state dicts round-trip exactly, and the hash read
//! back from the file equals the hash the write returned and the in-memory hash.

mod pt_support;

use std::collections::BTreeMap;

use miner_contract::hash::{hash_pt_file, hash_state_dict};
use miner_contract::pt::{
    DType, PtError, PtReader, PtWriteOptions, Tensor, read_pt, write_pt_tensors,
};
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn tensor() -> impl Strategy<Value = Tensor> {
    (dtype(), prop::collection::vec(0usize..5, 0..4)).prop_flat_map(|(dtype, shape)| {
        let n: usize = shape.iter().product::<usize>() * dtype.elem_size();
        prop::collection::vec(any::<u8>(), n).prop_map(move |mut data| {
            if dtype == DType::Bool {
                data.iter_mut().for_each(|b| *b &= 1);
            }
            Tensor {
                dtype,
                shape: shape.clone(),
                data,
            }
        })
    })
}

fn state_dict() -> impl Strategy<Value = BTreeMap<String, Tensor>> {
    // Names: dotted ASCII plus the odd non-ASCII character; sorted order must be byte order.
    prop::collection::btree_map("[a-z0-9_.é]{1,24}", tensor(), 1..12)
}

#[test]
fn reader_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PtReader>();
    assert_send_sync::<PtError>();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_state_dicts_round_trip(sd in state_dict(), wrap in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model_expgroup_1.pt");
        let opts = PtWriteOptions { wrap_model_state_dict: wrap };
        let written = write_pt_tensors(&path, &sd, &opts).unwrap();
        prop_assert_eq!(written, hash_state_dict(&sd));
        prop_assert_eq!(hash_pt_file(&path).unwrap(), written);
        let back = read_pt(&path).unwrap();
        prop_assert_eq!(&back, &sd);
        let reader = PtReader::open(&path).unwrap();
        let names: Vec<&str> = reader.entries().iter().map(|m| m.name.as_str()).collect();
        let want: Vec<&str> = sd.keys().map(String::as_str).collect();
        prop_assert_eq!(names, want);
        for m in reader.entries() {
            prop_assert_eq!(m.nbytes(), sd[&m.name].data.len());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Corrupted files (bytes overwritten anywhere, or cut short) give an error or, where the
    /// damage hit only tensor bytes, a readable file; the reader never panics.
    #[test]
    fn corrupted_files_never_panic_the_reader(
        sd in state_dict(),
        hits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model_expgroup_0.pt");
        write_pt_tensors(&path, &sd, &PtWriteOptions::default()).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, val) in &hits {
            let i = at.index(bytes.len());
            bytes[i] = *val;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(r) = PtReader::open(&path) {
            for m in r.entries() {
                if let Ok(t) = r.read(&m.name) {
                    prop_assert_eq!(t.data.len(), m.nbytes());
                }
            }
            let _ = r.model_hash();
        } else {
            let e = PtReader::open(&path).unwrap_err();
            prop_assert!(e.to_string().contains("model_expgroup_0.pt"));
            prop_assert!(!e.to_string().contains('\n'));
        }
    }
}
