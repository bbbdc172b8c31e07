//! Optimizer steps/s of the partial model's training step, and of the PyTorch reference loop.
//!
//! One step = `--ga` micro-batches of forward + backward (loss / GA, `loss.item()` each), then the
//! global-norm clip to 1.0 and an AdamW update of the expert masters (torch's single-tensor AdamW
//! arithmetic, written inline so the benchmark measures the model, not a particular optimizer module).
//! With `--python` it also runs `tests/py/bench_step.py` (transformers 5.4 + Connito's partial router,
//! the reference loop without its model hash) on the same config, group and batch, and prints the ratio.
//!
//! ```text
//! cargo run --release -p trainer-svc --example bench_step -- --preset tiny --python
//! cargo run --release -p trainer-svc --example bench_step -- --preset small --seq 256 --python
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use tch::{Device, Kind, Tensor};
use trainer_svc::model::{GroupExperts, ModelConfig, PartialModel};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Preset {
    /// `ModelConfig::tiny()`: hidden 64, 3 layers, 16 experts (group owns 4-5 per layer).
    Tiny,
    /// hidden 256, 4 layers, 16 experts of width 128 (group owns 4 per layer), vocab 8192.
    Small,
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
    /// `cpu` or `cuda` (the Python counterpart always runs on CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
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
    }
}

/// torch.optim.AdamW (single-tensor path) state for one parameter.
struct AdamState {
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

struct AdamW {
    states: Vec<AdamState>,
    step: i32,
}

impl AdamW {
    const LR: f64 = 1e-5;
    const B1: f64 = 0.9;
    const B2: f64 = 0.95;
    const EPS: f64 = 1e-8;
    const WD: f64 = 0.1;

    fn new(params: Vec<Tensor>) -> Self {
        let states = params
            .into_iter()
            .map(|param| AdamState {
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                param,
            })
            .collect();
        Self { states, step: 0 }
    }

    /// Clip to global norm 1.0 (skipping the step on a non-finite norm), update, zero the grads.
    fn step(&mut self, lr: f64) -> bool {
        let grads: Vec<Tensor> = self
            .states
            .iter()
            .map(|s| s.param.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return false;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        if !total.double_value(&[]).is_finite() {
            self.zero_grad();
            return false;
        }
        let coef = ((total + 1e-6).reciprocal()).clamp_max(1.0);
        self.step += 1;
        let bc1 = 1.0 - Self::B1.powi(self.step);
        let bc2 = 1.0 - Self::B2.powi(self.step);
        tch::no_grad(|| {
            for s in &mut self.states {
                let mut g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                let _ = g.g_mul_(&coef);
                let _ = s.param.g_mul_scalar_(1.0 - lr * Self::WD);
                let _ = s.exp_avg.lerp_(&g, 1.0 - Self::B1);
                let _ = s.exp_avg_sq.g_mul_scalar_(Self::B2);
                let _ = s.exp_avg_sq.addcmul_(&g, &(&g * (1.0 - Self::B2)));
                // param -= (lr / bc1) * exp_avg / (sqrt(v / bc2) + eps), with one temporary.
                let mut denom = s.exp_avg_sq.sqrt();
                let _ = denom.g_div_scalar_(bc2.sqrt());
                let _ = denom.g_add_scalar_(Self::EPS);
                let _ = denom.g_mul_scalar_(-bc1 / lr);
                let _ = s.param.addcdiv_(&s.exp_avg, &denom);
            }
        });
        self.zero_grad();
        true
    }

    fn zero_grad(&mut self) {
        for s in &mut self.states {
            s.param.zero_grad();
        }
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    tch::set_num_threads(a.threads);
    let device = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => bail!("--device {other}: expected cpu or cuda"),
    };
    let (cfg, group) = preset(a.preset, a.seq);
    let mut model = PartialModel::new(&cfg, &group, device, Kind::Float, 0)?;
    model.set_checkpointing(a.checkpointing);
    let n = (a.batch * a.seq) as i64;
    let ids: Vec<i64> = (0..n)
        .map(|i| (i * 7919 + 13) % cfg.vocab_size as i64)
        .collect();
    let ids = Tensor::from_slice(&ids)
        .reshape([a.batch as i64, a.seq as i64])
        .to_device(device);
    let labels = ids.copy();
    let mut opt = AdamW::new(model.trainable().into_iter().map(|(_, t)| t).collect());
    let total_steps = 88_000f64;
    let mut global_step = 0f64;
    let mut last_loss = 0.0;
    let mut opt_seconds = 0.0;
    // Returns the seconds spent in the optimizer update.
    let mut run_step = |opt: &mut AdamW, last_loss: &mut f64| {
        for _ in 0..a.ga {
            let loss = model.forward_backward(&ids, &labels, 1.0 / a.ga as f64);
            *last_loss = loss.double_value(&[]);
        }
        let lr = AdamW::LR * 0.5 * (1.0 + (std::f64::consts::PI * global_step / total_steps).cos());
        let t = Instant::now();
        if opt.step(lr) {
            global_step += 1.0;
        }
        t.elapsed().as_secs_f64()
    };
    for _ in 0..a.warmup {
        run_step(&mut opt, &mut last_loss);
    }
    // Per-step times: the minimum and the median are robust to other processes on shared cores; the
    // thread's CPU time (with one intra-op thread all compute runs on it) is the steadiest measure.
    let mut times = Vec::with_capacity(a.steps);
    let cpu0 = thread_cpu_seconds();
    for _ in 0..a.steps {
        let t0 = Instant::now();
        opt_seconds += run_step(&mut opt, &mut last_loss);
        times.push(t0.elapsed().as_secs_f64());
    }
    let cpu = thread_cpu_seconds()
        .zip(cpu0)
        .map(|(b, a0)| (b - a0) / a.steps as f64);
    let (best, median) = min_median(&mut times);
    println!(
        "rust:    best {:.2} ms/step, median {:.2} ms/step, cpu {} ms/step, optimizer {:.2} ms/step ({} tokens/step, threads {}, final loss {last_loss:.4})",
        1e3 * best,
        1e3 * median,
        cpu.map(|c| format!("{:.2}", 1e3 * c))
            .unwrap_or_else(|| "?".into()),
        1e3 * opt_seconds / a.steps as f64,
        n as usize * a.ga,
        a.threads
    );
    if a.python {
        let py = run_python(&a, &cfg, &group)?;
        println!(
            "pytorch: best {:.2} ms/step, median {:.2} ms/step, cpu {:.2} ms/step",
            1e3 * py.best,
            1e3 * py.median,
            1e3 * py.cpu
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
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/bench_step.py");
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
        .env("OMP_NUM_THREADS", a.threads.to_string())
        .output()
        .context("run the Python benchmark")?;
    if !out.status.success() {
        bail!(
            "Python benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(
        out.stdout
            .split(|&b| b == b'\n')
            .rfind(|l| !l.is_empty())
            .unwrap_or_default(),
    )
    .context("parse the Python benchmark output")?;
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
