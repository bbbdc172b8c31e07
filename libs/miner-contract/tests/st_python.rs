//! `.safetensors` against the real Python `safetensors` (the `.deps/venv` one): Python loads what
//! we write and, saving the same tensors again, writes the very same bytes; we read what Python
//! writes (all model dtypes, odd names, `__metadata__`) and get the same tensors; the model hash
//! is Python's reference hash (spec §7.5 over `load_file`) and the same for the same tensors in
//! `.pt` and `.safetensors`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use miner_contract::hash::{ModelHasher, hash_state_dict};
use miner_contract::pt::{DType, PtWriteOptions, Tensor, TensorMeta, write_pt_tensors};
use miner_contract::shard::{self, ShardFormat, ShardLayout, ShardReader};
use miner_contract::st::{
    StReader, read_safetensors, write_safetensors, write_safetensors_tensors,
};
use serde_json::Value;

fn python() -> PathBuf {
    let p = match std::env::var_os("MINER_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps/venv/bin/python"),
    };
    assert!(
        p.exists(),
        "Python with safetensors not found at {} (set MINER_PYTHON or run scripts/setup-python.sh)",
        p.display()
    );
    p
}

/// Runs `tests/py/st_helper.py <args>` and parses its JSON output.
fn helper(args: &[&Path]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/st_helper.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "st_helper.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("st_helper.py prints JSON")
}

fn digest(data: &[u8]) -> String {
    let mut h = ModelHasher::new();
    h.update(data);
    h.finalize().to_hex()
}

fn torch_dtype(d: DType) -> &'static str {
    d.torch_name().trim_start_matches("torch.")
}

/// Asserts that `sd` holds exactly the tensors Python described.
fn assert_same(sd: &BTreeMap<String, Tensor>, desc: &Value, what: &str) {
    let t = desc["tensors"].as_object().expect("tensors");
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    assert_eq!(sd.keys().collect::<Vec<_>>(), names, "{what}: names");
    for (name, tensor) in sd {
        let d = &t[name];
        assert_eq!(
            d["dtype"],
            torch_dtype(tensor.dtype),
            "{what}: {name:?} dtype"
        );
        assert_eq!(
            d["shape"],
            serde_json::json!(tensor.shape),
            "{what}: {name:?} shape"
        );
        assert_eq!(d["digest"], digest(&tensor.data), "{what}: {name:?} bytes");
    }
}

/// Deterministic bytes for test tensors.
fn tensor(dtype: DType, shape: &[usize], seed: u8) -> Tensor {
    let n = shape.iter().product::<usize>() * dtype.elem_size();
    let data = (0..n)
        .map(|i| {
            let b = (i as u8).wrapping_mul(37).wrapping_add(seed);
            // Keep bools 0/1 and floats finite (exponent bits never all ones).
            match dtype {
                DType::Bool => b & 1,
                _ => b & 0x3f,
            }
        })
        .collect();
    Tensor {
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

fn varied() -> BTreeMap<String, Tensor> {
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
        ("empty.f16", DType::F16, &[0]),
        ("empty.mid", DType::F32, &[4, 0, 3]),
        ("f64", DType::F64, &[3]),
        ("i64", DType::I64, &[2, 2]),
        ("i32", DType::I32, &[3]),
        ("i16", DType::I16, &[2]),
        ("i8", DType::I8, &[5]),
        ("u8", DType::U8, &[7]),
        ("mask", DType::Bool, &[4]),
        ("unicode.é.中", DType::F16, &[2]),
        ("quote\"back\\slash\nnewline\ttab\u{1}", DType::F16, &[1]),
    ];
    specs
        .iter()
        .enumerate()
        .map(|(i, (n, d, s))| (n.to_string(), tensor(*d, s, i as u8)))
        .collect()
}

fn expert_shard(seed: u8) -> BTreeMap<String, Tensor> {
    let mut sd = BTreeMap::new();
    for layer in [1usize, 2, 10] {
        for e in [4usize, 17, 63] {
            let p = format!("model.layers.{layer}.mlp.experts.{e}");
            sd.insert(
                format!("{p}.gate_up_proj"),
                tensor(DType::F16, &[16, 8], seed),
            );
            sd.insert(
                format!("{p}.down_proj"),
                tensor(DType::F16, &[8, 8], seed ^ 5),
            );
        }
    }
    sd
}

#[test]
fn python_loads_what_we_write_and_resaving_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    for (what, sd) in [
        ("varied dtypes", varied()),
        ("expert shard", expert_shard(3)),
    ] {
        let ours = dir.path().join("model_expgroup_0.safetensors");
        let hash = write_safetensors_tensors(&ours, &sd).unwrap();
        assert_eq!(hash, hash_state_dict(&sd), "{what}: hash in the write pass");
        let theirs = dir.path().join("resaved.safetensors");
        let desc = helper(&[Path::new("resave"), &ours, &theirs]);
        assert_same(&sd, &desc, what);
        assert_eq!(
            desc["hash"],
            hash.to_hex(),
            "{what}: Python's reference hash"
        );
        let a = std::fs::read(&ours).unwrap();
        let b = std::fs::read(&theirs).unwrap();
        assert!(
            a == b,
            "{what}: save_file of the same tensors wrote other bytes"
        );
        let n = u64::from_le_bytes(a[..8].try_into().unwrap());
        assert_eq!(
            n % 8,
            0,
            "{what}: the header is padded so the data starts 8-byte aligned"
        );
        let header = &a[8..8 + n as usize];
        let json_end = header.iter().rposition(|&b| b == b'}').unwrap() + 1;
        assert!(
            header[json_end..].iter().all(|&b| b == b' '),
            "{what}: space padding"
        );
        assert!(header.len() - json_end < 8, "{what}: minimal padding");
    }
}

#[test]
fn we_read_what_python_writes_with_and_without_metadata() {
    let dir = tempfile::tempdir().unwrap();
    for with_meta in [false, true] {
        let path = dir.path().join(format!("py_{with_meta}.safetensors"));
        let desc = if with_meta {
            helper(&[Path::new("write"), &path, Path::new("meta")])
        } else {
            helper(&[Path::new("write"), &path])
        };
        let r = StReader::open(&path).unwrap();
        assert_eq!(r.metadata().is_some(), with_meta);
        let sd = r.read_all().unwrap();
        assert_same(&sd, &desc, "python file");
        assert_eq!(r.model_hash().unwrap().to_hex(), desc["hash"]);
        assert_eq!(
            shard::hash_shard_file(&path).unwrap().to_hex(),
            desc["hash"]
        );
        // One tensor on its own, and an absent one.
        let name = "model.layers.3.mlp.experts.7.down_proj";
        assert_eq!(&r.read(name).unwrap(), &sd[name]);
        let e = r.read("absent\nname").unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains("absent\\nname"), "{e}");
        // Written again by us: Python's bytes exactly (without the metadata it does not need).
        if !with_meta {
            let again = dir.path().join("again.safetensors");
            write_safetensors_tensors(&again, &sd).unwrap();
            assert!(std::fs::read(&again).unwrap() == std::fs::read(&path).unwrap());
        }
    }
}

#[test]
fn the_model_hash_is_the_same_in_both_formats_and_in_python() {
    let dir = tempfile::tempdir().unwrap();
    let sd = expert_shard(9);
    let st = dir.path().join("model_expgroup_0.safetensors");
    let pt = dir.path().join("model_expgroup_0.pt");
    let h_st = shard::write_shard_tensors(&st, ShardFormat::Safetensors, &sd).unwrap();
    let h_pt = shard::write_shard_tensors(&pt, ShardFormat::Pt, &sd).unwrap();
    assert_eq!(h_st, h_pt);
    assert_eq!(h_st, hash_state_dict(&sd));
    for (path, format, layout) in [
        (&st, ShardFormat::Safetensors, ShardLayout::Flat),
        (&pt, ShardFormat::Pt, ShardLayout::PtModelStateDict),
    ] {
        let r = ShardReader::open(path).unwrap();
        assert_eq!((r.format(), r.layout()), (format, layout));
        assert_eq!(r.read_all().unwrap(), sd);
        assert_eq!(r.model_hash().unwrap(), h_st);
    }
    // Python: the .pt converted by torch.load + save_file is our .safetensors, byte for byte,
    // and its reference hash over load_file is ours.
    let converted = dir.path().join("converted.safetensors");
    let desc = helper(&[Path::new("pt2st"), &pt, &converted]);
    assert_eq!(desc["hash"], h_st.to_hex());
    assert!(std::fs::read(&converted).unwrap() == std::fs::read(&st).unwrap());
    // A plain-dict .pt (no wrapper) holds the same state dict: same hash.
    let plain = dir.path().join("plain.pt");
    let opts = PtWriteOptions {
        wrap_model_state_dict: false,
    };
    assert_eq!(write_pt_tensors(&plain, &sd, &opts).unwrap(), h_st);
    let r = ShardReader::open(&plain).unwrap();
    assert_eq!(r.layout(), ShardLayout::PtPlainDict);
}

#[test]
fn the_writer_streams_fill_order_and_refuses_wrong_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let metas = vec![
        TensorMeta::new("b", DType::F16, vec![2, 3]),
        TensorMeta::new("a", DType::F16, vec![4]),
        TensorMeta::new("c", DType::F32, vec![2]),
    ];
    // Mixed dtypes: F32 first (alignment), then F16 by name, as save_file lays them out.
    let mut order = Vec::new();
    let h = write_safetensors(&path, metas.clone(), |m, w| {
        order.push(m.name.clone());
        w.write_all(&vec![1u8; m.nbytes()])
    })
    .unwrap();
    assert_eq!(order, ["c", "a", "b"]);
    assert_eq!(h, StReader::open(&path).unwrap().model_hash().unwrap());
    let sd = read_safetensors(&path).unwrap();
    assert_eq!(sd["b"].data, vec![1u8; 12]);

    // Short and long fills, duplicates: refused, nothing left behind.
    let short = write_safetensors(
        &path.with_file_name("s.safetensors"),
        metas.clone(),
        |m, w| w.write_all(&vec![0u8; m.nbytes() - 1]),
    );
    assert!(
        short.unwrap_err().to_string().contains("fill wrote"),
        "short"
    );
    let long = write_safetensors(
        &path.with_file_name("l.safetensors"),
        metas.clone(),
        |m, w| w.write_all(&vec![0u8; m.nbytes() + 1]),
    );
    assert!(long.unwrap_err().to_string().contains("more than"), "long");
    let mut dup = metas.clone();
    dup.push(TensorMeta::new("a", DType::F16, vec![4]));
    let e = write_safetensors(&path.with_file_name("d.safetensors"), dup, |_, _| Ok(()));
    assert!(e.unwrap_err().to_string().contains("twice"));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["m.safetensors"], "partial files removed");
}
