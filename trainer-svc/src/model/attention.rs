//! Multi-head latent attention (MLA) of DeepSeek-V2 with `q_lora_rank = null`, as transformers 5.4's
//! `DeepseekV2Attention` computes it, using the fused `scaled_dot_product_attention` (causal).

use tch::Tensor;

use super::config::ModelConfig;
use super::norm::rms_norm;
use super::rope::Rope;

/// Frozen MLA weights of one layer (HuggingFace names under `self_attn.`).
#[derive(Debug)]
pub struct Attention {
    /// `[q_proj.weight; kv_a_proj_with_mqa.weight]`, `[heads*(nope+rope) + kv_lora_rank + rope, H]`:
    /// both projections read the same input, so one matmul computes them (the named tensors are views).
    pub q_kv_a: Tensor,
    /// `kv_a_layernorm.weight [kv_lora_rank]`
    pub kv_a_layernorm: Tensor,
    /// `kv_b_proj.weight [heads*(nope+v), kv_lora_rank]`
    pub kv_b_proj: Tensor,
    /// `o_proj.weight [H, heads*v]`
    pub o_proj: Tensor,
}

/// Shapes the attention needs from the config.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDims {
    heads: i64,
    nope: i64,
    rope: i64,
    v: i64,
    kv_lora_rank: i64,
    eps: f64,
    scale: f64,
}

impl AttentionDims {
    pub fn new(cfg: &ModelConfig) -> Self {
        Self {
            heads: cfg.num_attention_heads as i64,
            nope: cfg.qk_nope_head_dim as i64,
            rope: cfg.qk_rope_head_dim as i64,
            v: cfg.v_head_dim as i64,
            kv_lora_rank: cfg.kv_lora_rank as i64,
            eps: cfg.rms_norm_eps,
            scale: (cfg.qk_head_dim() as f64).powf(-0.5),
        }
    }
}

impl Attention {
    /// `x [B, T, H]` (compute dtype) -> `[B, T, H]`.
    pub fn forward(&self, x: &Tensor, d: &AttentionDims, rope: &Rope, freqs: &Tensor) -> Tensor {
        let size = x.size();
        let (b, t) = (size[0], size[1]);
        let q_width = d.heads * (d.nope + d.rope);
        let fused = x.linear::<Tensor>(&self.q_kv_a, None);
        let q = fused
            .narrow(-1, 0, q_width)
            .view([b, t, d.heads, d.nope + d.rope])
            .transpose(1, 2);
        let q_nope = q.narrow(-1, 0, d.nope);
        let q_pe = q.narrow(-1, d.nope, d.rope);

        let compressed = fused.narrow(-1, q_width, d.kv_lora_rank + d.rope);
        let latent = compressed.narrow(-1, 0, d.kv_lora_rank);
        let k_pe = compressed.narrow(-1, d.kv_lora_rank, d.rope).unsqueeze(1);
        let kv = rms_norm(&latent, &self.kv_a_layernorm, d.eps)
            .linear::<Tensor>(&self.kv_b_proj, None)
            .view([b, t, d.heads, d.nope + d.v])
            .transpose(1, 2);
        let k_nope = kv.narrow(-1, 0, d.nope);
        let value = kv.narrow(-1, d.nope, d.v);

        let q_pe = rope.apply(&q_pe, freqs);
        let k_pe = rope
            .apply(&k_pe, freqs)
            .expand([b, d.heads, t, d.rope], false);
        let query = Tensor::cat(&[q_nope, q_pe], -1);
        let key = Tensor::cat(&[k_nope, k_pe], -1);
        // Zero-pad V to the q/k head size (as transformers does for flash attention): the fused
        // flash kernels (CPU and CUDA) need equal head sizes, and the extra output columns are
        // dropped. Without it SDPA falls back to the slower unfused math path for MLA's 192/128.
        let qk = d.nope + d.rope;
        let value = if qk > d.v {
            value.constant_pad_nd([0, qk - d.v])
        } else {
            value.contiguous()
        };
        let out = Tensor::scaled_dot_product_attention(
            &query,
            &key,
            &value,
            None::<Tensor>,
            0.0,
            true,
            Some(d.scale),
            false,
        )
        .narrow(-1, 0, d.v);
        out.transpose(1, 2)
            .reshape([b, t, d.heads * d.v])
            .linear::<Tensor>(&self.o_proj, None)
    }
}
