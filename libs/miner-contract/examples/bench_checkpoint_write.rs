//! Benchmark (not a test): write and hash an fp16 state dict shaped like the real expert shard.
//!
//! `bench_checkpoint_write <dir> <bytes>` builds tensors of [2816,2048] / [2048,1408] fp16 until
//! `<bytes>` are reached, then times `write_pt` (which streams the file, computes the model hash
//! in the same pass and fsyncs) and prints one JSON line. Peak memory above the tensors is
//! VmHWM after the write minus VmRSS once the tensors exist (the high-water mark is reset through
//! /proc/self/clear_refs first). Run it through scripts/bench-checkpoint-write.sh.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use miner_contract::pt::{DType, PtWriteOptions, Tensor, TensorMeta, write_pt};

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: bench_checkpoint_write <dir> <bytes>")?,
    );
    let target: usize = args.next().ok_or("missing <bytes>")?.parse()?;

    // Tensors: pseudo-random fp16 bit patterns with the sign/exponent kept finite.
    let mut sd: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut total = 0usize;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut i = 0usize;
    while total < target {
        let (layer, expert) = (1 + i / 16, i % 16 / 2);
        let (kind, shape) = if i.is_multiple_of(2) {
            ("gate_up_proj", vec![2816, 2048])
        } else {
            ("down_proj", vec![2048, 1408])
        };
        let n: usize = shape.iter().product();
        let mut data = vec![0u8; n * 2];
        for c in data.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            c.copy_from_slice(&(state & 0x3bff_3bff_3bff_3bff).to_le_bytes());
        }
        total += data.len();
        sd.insert(
            format!("model.layers.{layer}.mlp.experts.{expert}.{kind}"),
            Tensor {
                dtype: DType::F16,
                shape,
                data,
            },
        );
        i += 1;
    }
    let rss_tensors = status_kib("VmRSS:");
    // Reset the peak-RSS high-water mark so VmHWM measures only what follows.
    std::fs::write("/proc/self/clear_refs", "5")?;

    let path = dir.join("model_expgroup_0.pt");
    let metas: Vec<TensorMeta> = sd.iter().map(|(n, t)| t.meta(n.as_str())).collect();
    let t0 = Instant::now();
    let hash = write_pt(&path, metas, &PtWriteOptions::default(), |meta, out| {
        out.write_all(&sd[&meta.name].data)
    })?;
    let wall = t0.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:");
    let size = std::fs::metadata(&path)?.len();
    std::fs::remove_file(&path)?;
    println!(
        "{{\"impl\": \"rust\", \"tensors\": {}, \"tensor_bytes\": {total}, \"file_bytes\": {size}, \"wall_s\": {wall:.4}, \"peak_above_tensors_mib\": {:.1}, \"hash\": \"{hash}\"}}",
        sd.len(),
        (peak.saturating_sub(rss_tensors)) as f64 / 1024.0
    );
    Ok(())
}
