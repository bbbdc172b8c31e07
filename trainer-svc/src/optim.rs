//! Optimizer numerics (spec §8.6): AdamW on tensors (moments exportable for checkpoints), the
//! cosine schedule with warmup (a pure function), a GradScaler, and global-norm clipping.

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// AdamW hyper-parameters; defaults are the reference's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

struct ParamState {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Decoupled-weight-decay Adam, as `torch.optim.AdamW` (one parameter group).
pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<ParamState>,
    /// Optimizer steps taken (bias correction uses it); shared by all parameters.
    pub step: u64,
}

impl AdamW {
    /// `params` are leaf tensors with `requires_grad`, named for checkpointing.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        let params = params
            .into_iter()
            .map(|(name, param)| {
                let exp_avg = param.zeros_like().detach();
                let exp_avg_sq = param.zeros_like().detach();
                ParamState {
                    name,
                    param,
                    exp_avg,
                    exp_avg_sq,
                }
            })
            .collect();
        AdamW {
            cfg,
            params,
            step: 0,
        }
    }

    pub fn params(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.param))
    }

    /// Sets every gradient to `None`.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.param.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// One AdamW step at learning rate `lr` over parameters that have a defined gradient and,
    /// when `active` is given, are marked `true` in it (non-finite gradients are dropped that way).
    pub fn step(&mut self, lr: f64, active: Option<&[bool]>) {
        self.step += 1;
        let t = self.step as f64;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powf(t);
        let bc2_sqrt = (1.0 - c.beta2.powf(t)).sqrt();
        tch::no_grad(|| {
            for (i, p) in self.params.iter_mut().enumerate() {
                if active.is_some_and(|a| !a.get(i).copied().unwrap_or(false)) {
                    continue;
                }
                let g = p.param.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(p.exp_avg.kind());
                let _ = p.param.g_mul_scalar_(1.0 - lr * c.weight_decay);
                let _ = p.exp_avg.g_mul_scalar_(c.beta1);
                let _ = p.exp_avg.g_add_(&(&g * (1.0 - c.beta1)));
                let _ = p.exp_avg_sq.g_mul_scalar_(c.beta2);
                let _ = p.exp_avg_sq.g_add_(&(&g * &g * (1.0 - c.beta2)));
                let denom = p.exp_avg_sq.sqrt() / bc2_sqrt + c.eps;
                let update = &p.exp_avg / denom * (lr / bc1);
                let _ = p.param.g_sub_(&update);
            }
        });
    }

    /// Moments as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`), on the CPU.
    pub fn moments(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.params.len() * 2);
        for p in &self.params {
            out.push((
                format!("exp_avg.{}", p.name),
                p.exp_avg.to_device(tch::Device::Cpu),
            ));
            out.push((
                format!("exp_avg_sq.{}", p.name),
                p.exp_avg_sq.to_device(tch::Device::Cpu),
            ));
        }
        out
    }

    /// Restores moments saved by [`AdamW::moments`]; every parameter must be present with its shape.
    pub fn load_moments(&mut self, named: &[(String, Tensor)], step: u64) -> Result<(), String> {
        let find = |k: &str| named.iter().find(|(n, _)| n == k).map(|(_, t)| t);
        for p in &mut self.params {
            for (prefix, dst) in [
                ("exp_avg", &mut p.exp_avg),
                ("exp_avg_sq", &mut p.exp_avg_sq),
            ] {
                let key = format!("{prefix}.{}", p.name);
                let src = find(&key).ok_or_else(|| format!("missing {key}"))?;
                if src.size() != dst.size() {
                    return Err(format!(
                        "{key}: shape {:?}, expected {:?}",
                        src.size(),
                        dst.size()
                    ));
                }
                tch::no_grad(|| dst.copy_(src));
            }
        }
        self.step = step;
        Ok(())
    }
}

/// `get_cosine_schedule_with_warmup` (half a cosine down to 0 at `total`): the multiplier at
/// `step`. Like HF, progress is not clamped, so past `total` the multiplier rises again.
pub fn cosine_with_warmup(step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

/// Dynamic loss scaling state, as `torch.amp.GradScaler` with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    pub enabled: bool,
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    /// Consecutive steps without overflow since the last change of scale.
    pub growth_tracker: u64,
}

impl GradScaler {
    pub fn new(enabled: bool) -> Self {
        GradScaler {
            enabled,
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
        }
    }

    /// The factor the loss is multiplied by before `backward` (1 when disabled).
    pub fn loss_factor(&self) -> f64 {
        if self.enabled { self.scale } else { 1.0 }
    }

    /// After a step: back off on overflow, grow after `growth_interval` clean steps.
    pub fn update(&mut self, found_inf: bool) {
        if !self.enabled {
            return;
        }
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == self.growth_interval {
                self.scale *= self.growth_factor;
                self.growth_tracker = 0;
            }
        }
    }
}

/// Global L2 norm of `grads` (in fp32); non-finite if any element is.
pub fn global_norm(grads: &[Tensor]) -> f64 {
    if grads.is_empty() {
        return 0.0;
    }
    tch::no_grad(|| {
        let sq: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(tch::Kind::Float).square().sum(tch::Kind::Float))
            .collect();
        Tensor::stack(&sq, 0)
            .sum(tch::Kind::Float)
            .sqrt()
            .double_value(&[])
    })
}

/// Scales `grads` so their global norm is at most `max_norm` (as `clip_grad_norm_`, eps 1e-6).
pub fn clip_to(grads: &mut [Tensor], total_norm: f64, max_norm: f64) {
    let coef = max_norm / (total_norm + 1e-6);
    if coef < 1.0 {
        tch::no_grad(|| {
            for g in grads.iter_mut() {
                let _ = g.g_mul_scalar_(coef);
            }
        });
    }
}
