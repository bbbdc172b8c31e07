//! Shared support for the `.pt` codec tests: the real PyTorch interpreter and comparisons.

#![allow(dead_code)] // each test binary uses a different part

pub mod hostile;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use miner_contract::hash::ModelHasher;
use miner_contract::pt::{DType, Tensor};
use serde_json::Value;

/// The Python with real PyTorch 2.11: `MINER_PYTHON`, else `<workspace>/.deps/venv/bin/python`.
pub fn python() -> PathBuf {
    let p = match std::env::var_os("MINER_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps/venv/bin/python"),
    };
    assert!(
        p.exists(),
        "Python with PyTorch not found at {} (set MINER_PYTHON or run scripts/setup-python.sh)",
        p.display()
    );
    p
}

/// Runs `tests/py/pt_helper.py <args>` and parses its JSON output.
pub fn helper(args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/pt_helper.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "pt_helper.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("pt_helper.py prints JSON")
}

/// BLAKE2b-24 of a tensor's raw bytes (what pt_helper.py reports as "digest").
pub fn digest(data: &[u8]) -> String {
    let mut h = ModelHasher::new();
    h.update(data);
    h.finalize().to_hex()
}

/// Asserts that `sd` holds exactly the tensors Python described (dtype, shape, bytes).
pub fn assert_same_tensors(sd: &BTreeMap<String, Tensor>, desc: &Value, what: &str) {
    let tensors = desc["tensors"].as_object().expect("tensors object");
    assert_eq!(
        sd.keys().collect::<Vec<_>>(),
        {
            let mut k: Vec<_> = tensors.keys().collect();
            k.sort();
            k
        },
        "{what}: tensor names differ"
    );
    for (name, t) in sd {
        let d = &tensors[name];
        assert_eq!(t.dtype.torch_name(), d["dtype"], "{what}: {name} dtype");
        let shape: Vec<usize> = d["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{what}: {name} shape");
        assert_eq!(digest(&t.data), d["digest"], "{what}: {name} bytes");
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), valid for every dtype (bool gets 0/1).
pub struct Bytes(u64);

impl Bytes {
    pub fn new(seed: u64) -> Self {
        Bytes(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn tensor(&mut self, dtype: DType, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let mut data = vec![0u8; n * dtype.elem_size()];
        self.fill(&mut data);
        if dtype == DType::Bool {
            data.iter_mut().for_each(|b| *b &= 1);
        }
        Tensor {
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }
}
