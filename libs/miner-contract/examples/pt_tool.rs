//! Manual checks of the `.pt` codec on files too big for CI (ZIP64: > 4 GiB).
//!
//! * `pt_tool write-big <path> <bytes>`: streams fp16 tensors shaped like the real shard (data
//!   generated on the fly, so memory stays flat) until `<bytes>`, prints the model hash.
//! * `pt_tool hash <path>`: prints the streamed model hash of any `.pt` file and its tensor count.

use std::path::Path;

use miner_contract::hash::hash_pt_file;
use miner_contract::pt::{DType, PtReader, PtWriteOptions, TensorMeta, write_pt};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["write-big", path, bytes] => {
            let target: usize = bytes.parse()?;
            let mut metas = Vec::new();
            let mut total = 0;
            let mut i = 0;
            while total < target {
                let (kind, shape) = if i % 2 == 0 {
                    ("gate_up_proj", vec![2816, 2048])
                } else {
                    ("down_proj", vec![2048, 1408])
                };
                let m = TensorMeta::new(
                    format!(
                        "model.layers.{}.mlp.experts.{}.{kind}",
                        1 + i / 16,
                        i % 16 / 2
                    ),
                    DType::F16,
                    shape,
                );
                total += m.nbytes();
                metas.push(m);
                i += 1;
            }
            let mut state = 0x2545_F491_4F6C_DD1Du64;
            let mut chunk = vec![0u8; 1 << 20];
            let hash = write_pt(
                Path::new(path),
                metas,
                &PtWriteOptions::default(),
                |m, out| {
                    let mut left = m.nbytes();
                    while left > 0 {
                        let n = left.min(chunk.len());
                        for c in chunk[..n].chunks_exact_mut(8) {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            c.copy_from_slice(&(state & 0x3bff_3bff_3bff_3bff).to_le_bytes());
                        }
                        out.write_all(&chunk[..n])?;
                        left -= n;
                    }
                    Ok(())
                },
            )?;
            println!("{hash}");
        }
        ["hash", path] => {
            let n = PtReader::open(Path::new(path))?.entries().len();
            println!("{} {n}", hash_pt_file(Path::new(path))?);
        }
        _ => return Err("usage: pt_tool write-big <path> <bytes> | pt_tool hash <path>".into()),
    }
    Ok(())
}
