//! Optimizer steps/s of the partial model's training step, and of the PyTorch reference loop.
//!
//! One step = `--ga` micro-batches of forward + backward (loss × scale / GA, `loss.item()` each), then
//! what trainer-svc's engine does at an optimizer step: unscale, drop non-finite gradients, global-norm
//! clip to 1.0, `trainer_svc::optim::AdamW`, GradScaler update (fp16 on CUDA only).
//! With `--python` it also runs `tests/py/bench_step.py` (transformers + Connito's partial router, the
//! reference loop without its model hash) on the same config, group, device, precision and batch, and
//! prints the ratio.
//!
//! ```text
//! cargo run --release -p trainer-svc --example bench_step -- --preset tiny --python
//! cargo run --release -p trainer-svc --example bench_step -- --preset small --seq 256 --python
//! # GPU: the real DeepSeek-V2-Lite partial model, group exp_math, seq 4096, fp16 autocast + GradScaler
//! bench_step --preset lite --seq 4096 --device cuda --precision fp16 --checkpointing --python
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use tch::{Device, Kind, Tensor};
use trainer_svc::model::{GroupExperts, ModelConfig, PartialModel};
use trainer_svc::optim::{
    AdamW, AdamWConfig, GradScaler, clip_to, cosine_with_warmup, global_norm,
};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Preset {
    /// `ModelConfig::tiny()`: hidden 64, 3 layers, 16 experts (group owns 4-5 per layer).
    Tiny,
    /// hidden 256, 4 layers, 16 experts of width 128 (group owns 4 per layer), vocab 8192.
    Small,
    /// DeepSeek-V2-Lite with the Connito overrides (27 layers, 64 experts) and the live group
    /// `exp_math` (8 experts in each of layers 1-26): the model a miner trains. Needs a GPU.
    Lite,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Precision {
    /// Everything fp32 (the CPU path).
    Fp32,
    /// Frozen weights fp16, fp32 expert masters, loss scaling (the reference's `fp16-mixed`).
    Fp16,
    /// Frozen weights bf16, fp32 expert masters, no loss scaling (`bf16-mixed`).
    Bf16,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "tiny")]
    preset: Preset,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 4)]
    ga: usize,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed optimizer steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// libtorch intra-op threads (both sides).
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// `cpu` or `cuda` (both sides).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute precision (both sides); fp16/bf16 need `--device cuda`.
    #[arg(long, value_enum, default_value = "fp32")]
    precision: Precision,
    /// Recompute layers in the backward (activation checkpointing).
    #[arg(long)]
    checkpointing: bool,
    /// Also run the PyTorch reference loop and print the speed ratio.
    #[arg(long)]
    python: bool,
}

fn preset(p: Preset, seq: usize) -> (ModelConfig, GroupExperts) {
    match p {
        Preset::Tiny => {
            let mut c = ModelConfig::tiny();
            c.max_position_embeddings = seq;
            let g = [(1, vec![1, 4, 9, 14]), (2, vec![0, 3, 7, 12, 15])]
                .into_iter()
                .collect();
            (c, g)
        }
        Preset::Small => {
            let mut c = ModelConfig::tiny();
            c.max_position_embeddings = seq;
            c.vocab_size = 8192;
            c.hidden_size = 256;
            c.intermediate_size = 1024;
            c.moe_intermediate_size = 128;
            c.num_hidden_layers = 4;
            c.num_attention_heads = 8;
            c.num_key_value_heads = Some(8);
            c.kv_lora_rank = 64;
            c.qk_nope_head_dim = 32;
            c.qk_rope_head_dim = 16;
            c.v_head_dim = 32;
            let g = (1..4)
                .map(|l| (l, (0..4).map(|k| (k * 4 + l) % 16).collect()))
                .collect();
            (c, g)
        }
        Preset::Lite => {
            let c = ModelConfig::deepseek_v2_lite(seq);
            let group = miner_contract::ExpertGroup::builtin("exp_math")
                .expect("the built-in exp_math group parses");
            let g = (1..c.num_hidden_layers)
                .map(|l| (l, group.org_ids(l)))
                .collect();
            (c, g)
        }
    }
}

/// The engine's optimizer step (trainer-svc/src/engine `optimizer_step`, without its logging):
/// unscale, drop non-finite gradients, clip, AdamW, GradScaler update. Returns whether it stepped.
fn optimizer_step(opt: &mut AdamW, scaler: &mut GradScaler, lr: f64) -> bool {
    let inv_scale = 1.0 / scaler.loss_factor();
    let mut grads = Vec::new();
    let mut active = Vec::new();
    let mut found_inf = false;
    tch::no_grad(|| {
        for (_, p) in opt.params() {
            let mut g = p.grad();
            if !g.defined() {
                active.push(false);
                continue;
            }
            if inv_scale != 1.0 {
                let _ = g.g_mul_scalar_(inv_scale);
            }
            let finite = bool::try_from(g.isfinite().all()).unwrap_or(false);
            if finite {
                grads.push(g);
            } else {
                found_inf = true;
            }
            active.push(finite);
        }
    });
    let mut stepped = false;
    // An fp16 overflow (non-finite gradients with the scaler on) skips the step, as in the engine.
    let overflow = found_inf && scaler.enabled;
    if !overflow && !grads.is_empty() {
        let norm = global_norm(&grads);
        if norm.is_finite() {
            clip_to(&mut grads, norm, 1.0);
            opt.step(lr, Some(&active));
            stepped = true;
        }
    }
    scaler.update(found_inf);
    opt.zero_grad();
    stepped
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    tch::set_num_threads(a.threads);
    let device = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => bail!("--device {other}: expected cpu or cuda"),
    };
    let compute = match a.precision {
        Precision::Fp32 => Kind::Float,
        Precision::Fp16 => Kind::Half,
        Precision::Bf16 => Kind::BFloat16,
    };
    if compute != Kind::Float && device == Device::Cpu {
        bail!("--precision fp16/bf16 needs --device cuda (trainer-svc trains in fp32 on CPU)");
    }
    let (cfg, group) = preset(a.preset, a.seq);
    // On a GPU the reference runs first, in its own process that exits before this one allocates,
    // so each side's GPU memory is its own.
    let py_first = if a.python && device.is_cuda() {
        Some(run_python(&a, &cfg, &group)?)
    } else {
        None
    };
    let t_setup = Instant::now();
    let mut model = PartialModel::new(&cfg, &group, device, compute, 0)?;
    model.set_checkpointing(a.checkpointing);
    let n = (a.batch * a.seq) as i64;
    let ids: Vec<i64> = (0..n)
        .map(|i| (i * 7919 + 13) % cfg.vocab_size as i64)
        .collect();
    let ids = Tensor::from_slice(&ids)
        .reshape([a.batch as i64, a.seq as i64])
        .to_device(device);
    let labels = ids.copy();
    let mut opt = AdamW::new(model.trainable(), AdamWConfig::default());
    let mut scaler = GradScaler::new(device.is_cuda() && a.precision == Precision::Fp16);
    let trainable: i64 = opt.params().map(|(_, t)| t.numel() as i64).sum();
    let total_steps = 88_000u64;
    let mut sched_step = 0u64;
    let mut last_loss = 0.0;
    let mut opt_seconds = 0.0;
    let mut skipped = 0usize;
    // Returns the seconds spent in the optimizer update.
    let mut run_step = |opt: &mut AdamW, scaler: &mut GradScaler, last_loss: &mut f64| {
        let factor = scaler.loss_factor() / a.ga as f64;
        for _ in 0..a.ga {
            let loss = model.forward_backward(&ids, &labels, factor);
            *last_loss = loss.double_value(&[]);
        }
        let lr = AdamWConfig::default().lr * cosine_with_warmup(sched_step, 0, total_steps);
        let t = Instant::now();
        if optimizer_step(opt, scaler, lr) {
            sched_step += 1;
        } else {
            skipped += 1;
        }
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        t.elapsed().as_secs_f64()
    };
    eprintln!(
        "rust: setup {:.1} s, {trainable} trainable parameters, device {device:?}, {:?}",
        t_setup.elapsed().as_secs_f64(),
        a.precision
    );
    for _ in 0..a.warmup {
        run_step(&mut opt, &mut scaler, &mut last_loss);
    }
    // Per-step times: the minimum and the median are robust to other processes on shared cores; the
    // thread's CPU time (with one intra-op thread all compute runs on it) is the steadiest measure.
    let mut times = Vec::with_capacity(a.steps);
    let wall0 = unix_now();
    let cpu0 = thread_cpu_seconds();
    for _ in 0..a.steps {
        let t0 = Instant::now();
        opt_seconds += run_step(&mut opt, &mut scaler, &mut last_loss);
        times.push(t0.elapsed().as_secs_f64());
    }
    let wall1 = unix_now();
    println!("rust timed window (unix s): {wall0:.3} {wall1:.3}");
    let cpu = thread_cpu_seconds()
        .zip(cpu0)
        .map(|(b, a0)| (b - a0) / a.steps as f64);
    let (best, median) = min_median(&mut times);
    let tokens_per_step = n as usize * a.ga;
    println!(
        "rust:    best {:.2} ms/step, median {:.2} ms/step, cpu {} ms/step, optimizer {:.2} ms/step ({tokens_per_step} tokens/step, {:.0} tokens/s median, threads {}, skipped {skipped}, final loss {last_loss:.4})",
        1e3 * best,
        1e3 * median,
        cpu.map(|c| format!("{:.2}", 1e3 * c))
            .unwrap_or_else(|| "?".into()),
        1e3 * opt_seconds / a.steps as f64,
        tokens_per_step as f64 / median,
        a.threads
    );
    if a.python {
        let py = match py_first {
            Some(py) => py,
            None => run_python(&a, &cfg, &group)?,
        };
        println!(
            "pytorch: best {:.2} ms/step, median {:.2} ms/step, cpu {:.2} ms/step ({:.0} tokens/s median)",
            1e3 * py.best,
            1e3 * py.median,
            1e3 * py.cpu,
            tokens_per_step as f64 / py.median
        );
        print!(
            "speedup: {:.2}x (best), {:.2}x (median)",
            py.best / best,
            py.median / median
        );
        match cpu {
            Some(c) => println!(", {:.2}x (cpu time)", py.cpu / c),
            None => println!(),
        }
    }
    Ok(())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn min_median(times: &mut [f64]) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    (
        times.first().copied().unwrap_or(f64::NAN),
        times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
    )
}

/// CPU time of the calling thread (Linux `/proc/thread-self/schedstat`, nanoseconds on CPU).
fn thread_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns * 1e-9)
}

/// Seconds per step of the Python loop.
struct PyTimes {
    best: f64,
    median: f64,
    cpu: f64,
}

/// Runs `tests/py/bench_step.py`.
fn run_python(a: &Args, cfg: &ModelConfig, group: &GroupExperts) -> anyhow::Result<PyTimes> {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var_os("MINER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| ws.join(".deps/venv/bin/python"));
    if !python.exists() {
        bail!(
            "{} is missing: run scripts/setup-python.sh (or set MINER_PYTHON)",
            python.display()
        );
    }
    let dir = tempfile::tempdir().context("create a temp dir")?;
    std::fs::write(dir.path().join("config.json"), cfg.to_json_string())
        .context("write config.json")?;
    std::fs::write(dir.path().join("group.json"), serde_json::to_string(group)?)
        .context("write group.json")?;
    // From the current checkout when run from a workspace root (a binary carried to another
    // machine), else from the one it was built in.
    let local = Path::new("trainer-svc/tests/py/bench_step.py");
    let script = if local.exists() {
        local.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/bench_step.py")
    };
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir.path())
        .args([
            "--steps",
            &a.steps.to_string(),
            "--warmup",
            &a.warmup.to_string(),
        ])
        .args([
            "--ga",
            &a.ga.to_string(),
            "--batch",
            &a.batch.to_string(),
            "--seq",
            &a.seq.to_string(),
        ])
        .args(["--threads", &a.threads.to_string()])
        .args(["--device", &a.device])
        .args([
            "--precision",
            match a.precision {
                Precision::Fp32 => "fp32",
                Precision::Fp16 => "fp16",
                Precision::Bf16 => "bf16",
            },
        ])
        .args(a.checkpointing.then_some("--checkpointing"))
        .env("OMP_NUM_THREADS", a.threads.to_string())
        .output()
        .context("run the Python benchmark")?;
    if !out.status.success() {
        bail!(
            "Python benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = out
        .stdout
        .split(|&b| b == b'\n')
        .rfind(|l| !l.is_empty())
        .unwrap_or_default();
    println!("pytorch json: {}", String::from_utf8_lossy(line));
    let v: serde_json::Value =
        serde_json::from_slice(line).context("parse the Python benchmark output")?;
    let best = v["best_s"]
        .as_f64()
        .context("Python benchmark printed no best_s")?;
    let median = v["median_s"]
        .as_f64()
        .context("Python benchmark printed no median_s")?;
    let cpu = v["cpu_s"]
        .as_f64()
        .context("Python benchmark printed no cpu_s")?;
    Ok(PyTimes { best, median, cpu })
}
