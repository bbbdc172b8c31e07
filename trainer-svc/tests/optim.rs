//! Optimizer numerics against closed-form values: AdamW, cosine schedule, GradScaler, clipping.

use tch::{Kind, Tensor};
use trainer_svc::optim::{
    AdamW, AdamWConfig, GradScaler, clip_to, cosine_with_warmup, global_norm,
};

fn param(v: &[f32]) -> Tensor {
    Tensor::from_slice(v).set_requires_grad(true)
}

fn set_grad(p: &Tensor, g: &[f32]) {
    // d/dp sum(p * g) = g
    (p * Tensor::from_slice(g)).sum(Kind::Float).backward();
}

fn values(t: &Tensor) -> Vec<f64> {
    let n = t.numel();
    (0..n).map(|i| t.double_value(&[i as i64])).collect()
}

#[test]
fn adamw_matches_the_closed_form_over_two_steps() {
    let cfg = AdamWConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let p = param(&[1.0, -2.0]);
    let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], cfg);
    let (g1, g2) = ([0.5f32, -1.0], [0.25f32, 2.0]);
    set_grad(&p, &g1);
    opt.step(cfg.lr, None);
    opt.zero_grad();
    set_grad(&p, &g2);
    opt.step(cfg.lr, None);

    let mut expect = vec![];
    for i in 0..2 {
        let mut w = [1.0f64, -2.0][i];
        let (mut m, mut v) = (0.0f64, 0.0f64);
        for (t, g) in [(1.0f64, f64::from(g1[i])), (2.0, f64::from(g2[i]))] {
            w *= 1.0 - cfg.lr * cfg.weight_decay;
            m = 0.9 * m + 0.1 * g;
            v = 0.95 * v + 0.05 * g * g;
            let mhat = m / (1.0 - 0.9f64.powf(t));
            let vhat = v / (1.0 - 0.95f64.powf(t));
            w -= cfg.lr * mhat / (vhat.sqrt() + cfg.eps);
        }
        expect.push(w);
    }
    let got = values(&p);
    for (g, e) in got.iter().zip(&expect) {
        assert!((g - e).abs() < 1e-6, "got {got:?}, want {expect:?}");
    }
    assert_eq!(opt.step, 2);

    // Moments round-trip into a fresh optimizer.
    let moments = opt.moments();
    assert_eq!(moments.len(), 2);
    let q = param(&[0.0, 0.0]);
    let mut opt2 = AdamW::new(vec![("w".into(), q)], cfg);
    opt2.load_moments(&moments, opt.step).unwrap();
    let m2 = opt2.moments();
    for ((n1, a), (n2, b)) in moments.iter().zip(&m2) {
        assert_eq!(n1, n2);
        assert!(a.allclose(b, 0.0, 0.0, false));
    }
    // A missing entry is an error naming it.
    let err = opt2.load_moments(&moments[..1], 2).unwrap_err();
    assert!(err.contains("exp_avg_sq.w"), "{err}");
}

#[test]
fn inactive_parameters_are_left_alone() {
    let cfg = AdamWConfig::default();
    let a = param(&[1.0]);
    let b = param(&[1.0]);
    let mut opt = AdamW::new(
        vec![
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ],
        cfg,
    );
    set_grad(&a, &[1.0]);
    set_grad(&b, &[1.0]);
    opt.step(1e-2, Some(&[true, false]));
    assert!(values(&a)[0] < 1.0);
    assert_eq!(values(&b)[0], 1.0);
}

#[test]
fn cosine_schedule_with_warmup_has_the_reference_shape() {
    assert_eq!(cosine_with_warmup(0, 0, 88_000), 1.0);
    assert!((cosine_with_warmup(44_000, 0, 88_000) - 0.5).abs() < 1e-12);
    assert!(cosine_with_warmup(88_000, 0, 88_000).abs() < 1e-12);
    // Past the horizon HF's formula (no clamp of progress) rises again, as the reference does.
    let past = 0.5 * (1.0 + (std::f64::consts::PI * 100_000.0 / 88_000.0).cos());
    assert!((cosine_with_warmup(100_000, 0, 88_000) - past).abs() < 1e-12);
    // lr(t) = 0.5 (1 + cos(pi t / T))
    let t = 12_345u64;
    let want = 0.5 * (1.0 + (std::f64::consts::PI * t as f64 / 88_000.0).cos());
    assert!((cosine_with_warmup(t, 0, 88_000) - want).abs() < 1e-12);
    // Linear warmup, then cosine over the rest.
    assert_eq!(cosine_with_warmup(0, 10, 110), 0.0);
    assert!((cosine_with_warmup(5, 10, 110) - 0.5).abs() < 1e-12);
    assert!((cosine_with_warmup(10, 10, 110) - 1.0).abs() < 1e-12);
    assert!((cosine_with_warmup(60, 10, 110) - 0.5).abs() < 1e-12);
}

#[test]
fn grad_scaler_backs_off_on_overflow_and_grows_after_2000_clean_steps() {
    let mut s = GradScaler::new(true);
    assert_eq!(s.loss_factor(), 65536.0);
    s.update(true);
    assert_eq!(s.scale, 32768.0);
    for _ in 0..1999 {
        s.update(false);
    }
    assert_eq!(s.scale, 32768.0);
    s.update(false);
    assert_eq!(s.scale, 65536.0);
    assert_eq!(s.growth_tracker, 0);
    // An overflow resets the growth count.
    for _ in 0..1500 {
        s.update(false);
    }
    s.update(true);
    for _ in 0..1999 {
        s.update(false);
    }
    assert_eq!(s.scale, 32768.0);
    let off = GradScaler::new(false);
    assert_eq!(off.loss_factor(), 1.0);
}

#[test]
fn clipping_reports_the_pre_clip_norm_and_scales_to_max_norm() {
    let mut grads = vec![
        Tensor::from_slice(&[3.0f32, 0.0]),
        Tensor::from_slice(&[0.0f32, 4.0]),
    ];
    let n = global_norm(&grads);
    assert!((n - 5.0).abs() < 1e-6);
    clip_to(&mut grads, n, 1.0);
    let after = global_norm(&grads);
    assert!((after - 1.0).abs() < 1e-5, "{after}");
    // Below the threshold nothing changes.
    let mut small = vec![Tensor::from_slice(&[0.3f32, 0.4])];
    clip_to(&mut small, 0.5, 1.0);
    assert!((values(&small[0])[0] - 0.3).abs() < 1e-7);
    // A non-finite gradient gives a non-finite norm (the loop then skips the step).
    let bad = vec![Tensor::from_slice(&[f32::NAN, 1.0])];
    assert!(!global_norm(&bad).is_finite());
}
