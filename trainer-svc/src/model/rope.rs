//! Rotary position embedding with YaRN scaling, computed exactly as transformers 5.4's
//! `DeepseekV2RotaryEmbedding` + `_compute_yarn_parameters` + `apply_rotary_emb` do it:
//! float32 inverse frequencies, `attention_factor` multiplied into cos/sin (so it scales q_pe AND
//! k_pe), and rotation of *interleaved* pairs `(x[2i], x[2i+1])` (complex multiplication).
//! Note transformers 5.4 does not fold the YaRN mscale into the softmax scale (the original DeepSeek
//! code did); the softmax scale is `qk_head_dim^-0.5`.

use tch::{Device, Kind, Tensor};

use super::config::ModelConfig;

/// Precomputed rotations `[max_positions, rope_dim/2]` as complex64 `attention_factor * e^{i*pos*freq}`
/// (transformers' `freqs_cis`).
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
    attention_factor: f64,
    freqs_cis: Tensor,
}

/// YaRN / default inverse frequencies (float32, on CPU) and the attention factor.
pub fn inv_freq_and_factor(cfg: &ModelConfig) -> (Tensor, f64) {
    let dim = cfg.qk_rope_head_dim as i64;
    let base = cfg.effective_rope_theta();
    let opts = (Kind::Float, Device::Cpu);
    // pos_freqs = base ** (arange(0, dim, 2).float() / dim), in float32 like torch.
    let exponents = Tensor::arange_start_step(0, dim, 2, opts) / (dim as f64);
    let pos_freqs = Tensor::pow_scalar(base, &exponents);
    let scaling = match &cfg.rope_scaling {
        Some(r) if r.rope_type == "yarn" => r,
        _ => return (pos_freqs.reciprocal(), 1.0),
    };
    let original_max = scaling
        .original_max_position_embeddings
        .unwrap_or(cfg.max_position_embeddings) as f64;
    let factor = scaling
        .factor
        .unwrap_or(cfg.max_position_embeddings as f64 / original_max);
    let get_mscale = |scale: f64, mscale: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * mscale * scale.ln() + 1.0
        }
    };
    let attention_factor = match (
        scaling.attention_factor,
        scaling.mscale,
        scaling.mscale_all_dim,
    ) {
        (Some(a), _, _) => a,
        (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
            get_mscale(factor, m) / get_mscale(factor, ma)
        }
        _ => get_mscale(factor, 1.0),
    };
    let beta_fast = scaling.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0);
    let beta_slow = scaling.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0);
    let dimf = dim as f64;
    let correction_dim = |rotations: f64| {
        (dimf * (original_max / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
    };
    let mut low = correction_dim(beta_fast);
    let mut high = correction_dim(beta_slow);
    if scaling.truncate.unwrap_or(true) {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let mut high = high.min(dimf - 1.0);
    if low == high {
        high += 0.001;
    }
    let ramp = ((Tensor::arange(dim / 2, opts) - low) / (high - low)).clamp(0.0, 1.0);
    let extrapolation_factor = 1.0 - ramp;
    let inv_freq_extrapolation = pos_freqs.reciprocal();
    let inv_freq_interpolation = (&pos_freqs * factor).reciprocal();
    let inv_freq = &inv_freq_interpolation * (1.0 - &extrapolation_factor)
        + &inv_freq_extrapolation * &extrapolation_factor;
    (inv_freq, attention_factor)
}

impl Rope {
    pub fn new(cfg: &ModelConfig, device: Device) -> Self {
        let (inv_freq, attention_factor) = inv_freq_and_factor(cfg);
        let freqs_cis = table(
            &inv_freq,
            attention_factor,
            cfg.max_position_embeddings as i64,
        );
        Self {
            inv_freq,
            attention_factor,
            freqs_cis: freqs_cis.to_device(device),
        }
    }

    pub fn attention_factor(&self) -> f64 {
        self.attention_factor
    }

    /// Rotations `[t, rope_dim/2]` (complex64) for positions `0..t` (computed on the fly past the
    /// precomputed table).
    pub fn freqs(&self, t: i64) -> Tensor {
        if t <= self.freqs_cis.size()[0] {
            self.freqs_cis.narrow(0, 0, t)
        } else {
            table(&self.inv_freq, self.attention_factor, t).to_device(self.freqs_cis.device())
        }
    }

    /// Rotates interleaved pairs of `x [B, heads, T, rope_dim]` as complex numbers in float32
    /// (transformers' `apply_rotary_emb`), returns `x`'s dtype.
    pub fn apply(&self, x: &Tensor, freqs: &Tensor) -> Tensor {
        let kind = x.kind();
        let size = x.size();
        let d = size[size.len() - 1];
        let mut pairs = size.clone();
        pairs.pop();
        pairs.push(d / 2);
        pairs.push(2);
        let xc = x
            .to_kind(Kind::Float)
            .contiguous()
            .view(&pairs[..])
            .view_as_complex();
        (xc * freqs).view_as_real().reshape(&size[..]).to_kind(kind)
    }
}

fn table(inv_freq: &Tensor, attention_factor: f64, t: i64) -> Tensor {
    let pos = Tensor::arange(t, (Kind::Float, Device::Cpu));
    let freqs = pos.unsqueeze(1).matmul(&inv_freq.unsqueeze(0));
    Tensor::polar(&freqs.ones_like(), &freqs) * attention_factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lite_attention_factor_is_one_and_tiny_is_not() {
        let (_, f) = inv_freq_and_factor(&ModelConfig::deepseek_v2_lite(4096));
        assert!((f - 1.0).abs() < 1e-12);
        let (inv, f) = inv_freq_and_factor(&ModelConfig::tiny());
        let expected = (0.1 * 40f64.ln() + 1.0) / (0.1 * 0.707 * 40f64.ln() + 1.0);
        assert!((f - expected).abs() < 1e-12);
        assert_eq!(inv.size(), vec![4]);
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let cfg = ModelConfig::deepseek_v2_lite(4096);
        let (inv, _) = inv_freq_and_factor(&cfg);
        let v = Vec::<f32>::try_from(&inv).expect("vec");
        assert_eq!(v.len(), 32);
        // The first pair is pure extrapolation (1/base^0 = 1), the last pure interpolation (/ factor).
        assert!((v[0] - 1.0).abs() < 1e-7);
        let plain_last = 1.0 / 10_000f64.powf(62.0 / 64.0);
        assert!(((v[31] as f64) - plain_last / 40.0).abs() / (plain_last / 40.0) < 1e-5);
    }

    #[test]
    fn rotation_preserves_norm_scaled_by_attention_factor() {
        let cfg = ModelConfig::tiny();
        let rope = Rope::new(&cfg, Device::Cpu);
        // Deterministic input (the global RNG is shared with tests that seed it).
        let x = (Tensor::arange(80, (Kind::Float, Device::Cpu)) * 0.37)
            .sin()
            .reshape([1, 2, 5, 8]);
        let y = rope.apply(&x, &rope.freqs(5));
        let ratio = y.norm().double_value(&[]) / x.norm().double_value(&[]);
        assert!((ratio - rope.attention_factor()).abs() < 1e-5, "{ratio}");
        // Position 0 is not rotated.
        let d = (y.narrow(2, 0, 1) - x.narrow(2, 0, 1) * rope.attention_factor())
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-6);
    }
}
