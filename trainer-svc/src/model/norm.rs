//! RMSNorm as transformers' `DeepseekV2RMSNorm`: statistics in float32, `weight * x.to(input_dtype)`.

use tch::{Kind, Tensor};

/// `weight * (x / sqrt(mean(x^2) + eps))`, normalising over the last dimension in float32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let variance = xf.square().mean_dim(-1, true, Kind::Float);
    let normed = xf * (variance + eps).rsqrt();
    weight * normed.to_kind(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn unit_weight_gives_unit_rms() {
        let x = (Tensor::arange(48, (Kind::Float, Device::Cpu)) * 0.61)
            .sin()
            .reshape([3, 16])
            * 7.0;
        let w = Tensor::ones([16], (Kind::Float, Device::Cpu));
        let y = rms_norm(&x, &w, 1e-6);
        let rms = y.square().mean_dim(-1, false, Kind::Float).sqrt();
        let dev = (rms - 1.0).abs().max().double_value(&[]);
        assert!(dev < 1e-4, "{dev}");
    }
}
