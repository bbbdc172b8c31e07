//! Round trips against real PyTorch 2.11: Python loads what we write (weights_only=True, also
//! with mmap=True) and gets the same tensors and model hash; we read what Python's torch.save
//! writes (nested dict, plain dict, module state_dict OrderedDict, strided/offset views, shared
//! storages) and get the same tensors and hash.

mod pt_support;

use std::collections::BTreeMap;

use miner_contract::hash::{hash_pt_file, hash_state_dict};
use miner_contract::pt::{
    DType, PtLayout, PtReader, PtWriteOptions, TensorMeta, read_pt, write_pt, write_pt_tensors,
};
use pt_support::{Bytes, assert_same_tensors, helper};

fn varied_state_dict() -> BTreeMap<String, miner_contract::pt::Tensor> {
    let mut g = Bytes::new(11);
    let specs: &[(&str, DType, &[usize])] = &[
        (
            "model.layers.1.mlp.experts.4.gate_up_proj",
            DType::F16,
            &[6, 5],
        ),
        (
            "model.layers.1.mlp.experts.4.down_proj",
            DType::F16,
            &[5, 3],
        ),
        (
            "model.layers.1.mlp.experts.9.down_proj",
            DType::BF16,
            &[3, 7],
        ),
        ("model.norm.weight", DType::F32, &[13]),
        ("odd.shape", DType::BF16, &[1, 3, 1, 5, 2]),
        ("scalar.f32", DType::F32, &[]),
        ("scalar.bf16", DType::BF16, &[]),
        ("empty.f16", DType::F16, &[0]),
        ("empty.mid", DType::F32, &[4, 0, 3]),
        ("f64", DType::F64, &[3]),
        ("i64", DType::I64, &[2, 2]),
        ("i32", DType::I32, &[3]),
        ("i16", DType::I16, &[2]),
        ("i8", DType::I8, &[5]),
        ("u8", DType::U8, &[7]),
        ("mask", DType::Bool, &[4]),
        ("unicode.é.weight", DType::F16, &[2]),
    ];
    specs
        .iter()
        .map(|(n, d, s)| (n.to_string(), g.tensor(*d, s)))
        .collect()
}

#[test]
fn pytorch_loads_what_we_write() {
    let dir = tempfile::tempdir().unwrap();
    let sd = varied_state_dict();
    let shard = dir.path().join("model_expgroup_0.pt");
    let final_ = dir.path().join("mycelia_final.pt");
    let h1 = write_pt_tensors(&shard, &sd, &PtWriteOptions::default()).unwrap();
    let h2 = write_pt_tensors(
        &final_,
        &sd,
        &PtWriteOptions {
            wrap_model_state_dict: false,
        },
    )
    .unwrap();
    assert_eq!(h1, hash_state_dict(&sd));
    assert_eq!(h1, h2);
    // No partial file is left beside the published ones.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    let out = helper(&["check", shard.to_str().unwrap(), final_.to_str().unwrap()]);
    let d = &out[shard.to_str().unwrap()];
    assert_eq!(d["layout"], "model_state_dict");
    assert_eq!(d["type"], "dict");
    assert_eq!(d["model_hash"], h1.to_hex());
    assert_same_tensors(&sd, d, "shard loaded by torch");
    let d = &out[final_.to_str().unwrap()];
    assert_eq!(d["layout"], "plain");
    assert_eq!(d["model_hash"], h1.to_hex());
    assert_same_tensors(&sd, d, "plain dict loaded by torch");

    // And we read our own files back exactly.
    let r = PtReader::open(&shard).unwrap();
    assert_eq!(r.layout(), PtLayout::ModelStateDict);
    assert_eq!(read_pt(&shard).unwrap(), sd);
    assert_eq!(
        PtReader::open(&final_).unwrap().layout(),
        PtLayout::PlainDict
    );
    assert_eq!(read_pt(&final_).unwrap(), sd);
    assert_eq!(hash_pt_file(&final_).unwrap(), h1);
}

#[test]
fn pytorch_loads_a_file_with_many_tensors() {
    // 1100 tensors: memo indices past 255 (LONG_BINPUT/LONG_BINGET) and two SETITEMS batches.
    let dir = tempfile::tempdir().unwrap();
    let mut g = Bytes::new(5);
    let sd: BTreeMap<_, _> = (0..1100)
        .map(|i| {
            let dtype = [DType::F16, DType::BF16, DType::F32][i % 3];
            (format!("model.layers.{i}.w"), g.tensor(dtype, &[i % 4, 2]))
        })
        .collect();
    let path = dir.path().join("model_shared.pt");
    let h = write_pt_tensors(&path, &sd, &PtWriteOptions::default()).unwrap();
    let out = helper(&["check", path.to_str().unwrap()]);
    let d = &out[path.to_str().unwrap()];
    assert_eq!(d["model_hash"], h.to_hex());
    assert_same_tensors(&sd, d, "many tensors loaded by torch");
    assert_eq!(read_pt(&path).unwrap(), sd);
}

#[test]
fn streamed_shard_of_tens_of_megabytes_matches_pytorch() {
    // Shapes of the real shard, streamed through `fill` in 1 MiB pieces.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model_expgroup_3.pt");
    let mut metas = Vec::new();
    for e in [7, 2] {
        metas.push(TensorMeta::new(
            format!("model.layers.5.mlp.experts.{e}.gate_up_proj"),
            DType::F16,
            vec![2816, 2048],
        ));
        metas.push(TensorMeta::new(
            format!("model.layers.5.mlp.experts.{e}.down_proj"),
            DType::F16,
            vec![2048, 1408],
        ));
    }
    let mut order = Vec::new();
    let hash = write_pt(&path, metas, &PtWriteOptions::default(), |meta, out| {
        order.push(meta.name.clone());
        let mut g = Bytes::new(meta.name.len() as u64 + meta.shape[0] as u64);
        let mut chunk = vec![0u8; 1 << 20];
        let mut left = meta.nbytes();
        while left > 0 {
            let n = left.min(chunk.len());
            g.fill(&mut chunk[..n]);
            out.write_all(&chunk[..n])?;
            left -= n;
        }
        Ok(())
    })
    .unwrap();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "fill is called in sorted-name order");
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size > 34_000_000, "{size}");

    assert_eq!(hash_pt_file(&path).unwrap(), hash);
    let out = helper(&["check", path.to_str().unwrap()]);
    let d = &out[path.to_str().unwrap()];
    assert_eq!(d["model_hash"], hash.to_hex());
    let sd = read_pt(&path).unwrap();
    assert_same_tensors(&sd, d, "streamed shard");
}

#[test]
fn we_read_what_pytorch_writes() {
    let dir = tempfile::tempdir().unwrap();
    let made = helper(&["make", dir.path().to_str().unwrap()]);
    let made = made.as_object().unwrap();
    assert!(made.len() >= 6);
    for (path, desc) in made {
        let p = std::path::Path::new(path);
        let reader = PtReader::open(p).unwrap_or_else(|e| panic!("{e}"));
        let want_layout = if desc["layout"] == "model_state_dict" {
            PtLayout::ModelStateDict
        } else {
            PtLayout::PlainDict
        };
        assert_eq!(reader.layout(), want_layout, "{path}");
        let sd = reader.read_all().unwrap();
        assert_same_tensors(&sd, desc, path);
        assert_eq!(
            reader.model_hash().unwrap().to_hex(),
            desc["model_hash"],
            "{path}"
        );
        assert_eq!(
            hash_pt_file(p).unwrap().to_hex(),
            desc["model_hash"],
            "{path}"
        );

        // Re-written by us, the same state dict keeps its hash.
        let again = dir.path().join("again").join(p.file_name().unwrap());
        std::fs::create_dir_all(again.parent().unwrap()).unwrap();
        let h = write_pt_tensors(&again, &sd, &PtWriteOptions::default()).unwrap();
        assert_eq!(h.to_hex(), desc["model_hash"], "{path} rewritten");
    }
}
