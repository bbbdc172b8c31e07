//! Unit tests of the partial model on the tiny configuration (CPU, float32).

use super::*;

fn group() -> GroupExperts {
    [(1, vec![1, 4, 9, 14]), (2, vec![0, 3, 7, 12, 15])]
        .into_iter()
        .collect()
}

fn model(seed: i64) -> PartialModel {
    PartialModel::new(
        &ModelConfig::tiny(),
        &group(),
        Device::Cpu,
        Kind::Float,
        seed,
    )
    .expect("model")
}

fn batch(b: i64, t: i64) -> (Tensor, Tensor) {
    let n = b * t;
    let ids: Vec<i64> = (0..n).map(|i| (i * 7919 + 13) % 2048).collect();
    let ids = Tensor::from_slice(&ids).reshape([b, t]);
    let labels = ids.copy();
    (ids, labels)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn forward_gives_float_logits_and_a_near_uniform_initial_loss() {
    let m = model(1);
    let (ids, labels) = batch(2, 16);
    let logits = m.forward(&ids);
    assert_eq!(logits.size(), vec![2, 16, 2048]);
    assert_eq!(logits.kind(), Kind::Float);
    let loss = m.loss(&ids, &labels).double_value(&[]);
    // Random init (std 0.02) predicts nearly uniformly: loss close to ln(vocab).
    assert!((loss - 2048f64.ln()).abs() < 0.5, "loss {loss}");
}

#[test]
fn tensor_names_and_dtypes_follow_spec_7_3() {
    let m = model(1);
    let cfg = ModelConfig::tiny();
    let shared: Vec<(String, Vec<i64>)> = m
        .shared_tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.size()))
        .collect();
    assert_eq!(shared, naming::shared_names(&cfg));
    let experts: Vec<(String, Vec<i64>)> = m
        .expert_tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.size()))
        .collect();
    assert_eq!(experts, naming::expert_names(&cfg, &group()));
    assert_eq!(experts.len(), 2 * 9);
    assert_eq!(experts[0].0, "model.layers.1.mlp.experts.1.gate_up_proj");
    assert_eq!(experts[1].0, "model.layers.1.mlp.experts.1.down_proj");
    for (n, t) in m.trainable() {
        assert!(t.requires_grad(), "{n} must train");
        assert_eq!(t.kind(), Kind::Float, "{n} must be an fp32 master");
    }
    for (n, t) in m.shared_tensors() {
        assert!(!t.requires_grad(), "{n} must be frozen");
    }
}

#[test]
fn init_follows_the_reference_distribution_and_the_seed() {
    let a = model(7);
    let b = model(7);
    let c = model(8);
    let (ids, _) = batch(1, 8);
    assert_eq!(
        max_abs_diff(&a.forward(&ids), &b.forward(&ids)),
        0.0,
        "same seed, same model"
    );
    assert!(max_abs_diff(&a.forward(&ids), &c.forward(&ids)) > 0.0);
    for (n, t) in a.shared_tensors().into_iter().chain(a.expert_tensors()) {
        if n.ends_with("norm.weight") || n.ends_with("layernorm.weight") {
            assert_eq!(t.min().double_value(&[]), 1.0, "{n}");
            assert_eq!(t.max().double_value(&[]), 1.0, "{n}");
        } else {
            let std = t.std(true).double_value(&[]);
            assert!((std - 0.02).abs() < 0.002, "{n}: std {std}");
        }
    }
}

#[test]
fn tokens_never_route_to_experts_the_group_does_not_own() {
    let partial = model(3);
    let (ids, _) = batch(2, 32);
    // The same weights with every expert owned: the unmasked router picks other experts for some tokens.
    let all: GroupExperts = [(1, (0..16).collect()), (2, (0..16).collect())]
        .into_iter()
        .collect();
    let mut full =
        PartialModel::new(&ModelConfig::tiny(), &all, Device::Cpu, Kind::Float, 99).expect("full");
    full.load_named(partial.shared_tensors()).expect("load");
    let owned = group();
    let mut unmasked_outside = 0;
    for ((l, chosen), (l2, free)) in partial
        .expert_choices(&ids)
        .into_iter()
        .zip(full.expert_choices(&ids))
    {
        assert_eq!(l, l2);
        let chosen = Vec::<i64>::try_from(&chosen).expect("vec");
        let free = Vec::<i64>::try_from(&free).expect("vec");
        assert_eq!(chosen.len(), 64);
        for (c, f) in chosen.iter().zip(&free) {
            assert!(
                owned[&l].contains(&(*c as usize)),
                "layer {l}: token routed to non-owned expert {c}"
            );
            if owned[&l].contains(&(*f as usize)) && l == 1 {
                // Where the free choice is owned, masking changes nothing (layer 1 sees identical input).
                assert_eq!(c, f);
            }
            if !owned[&l].contains(&(*f as usize)) {
                unmasked_outside += 1;
            }
        }
    }
    assert!(unmasked_outside > 0, "test batch must exercise the mask");
}

#[test]
fn single_owned_expert_takes_every_token_and_only_it_gets_gradients() {
    let g: GroupExperts = [(1, vec![5]), (2, vec![0, 11])].into_iter().collect();
    let m =
        PartialModel::new(&ModelConfig::tiny(), &g, Device::Cpu, Kind::Float, 5).expect("model");
    let (ids, labels) = batch(2, 16);
    let choices = m.expert_choices(&ids);
    assert_eq!(
        Vec::<i64>::try_from(&choices[0].1).expect("vec"),
        vec![5i64; 32]
    );
    let _ = m.forward_backward(&ids, &labels, 1.0);
    for (n, t) in m.trainable() {
        let g = t.grad();
        if n.starts_with("model.layers.1.") {
            assert!(
                g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{n} has no gradient"
            );
        }
    }
    for (n, t) in m.shared_tensors() {
        assert!(!t.grad().defined(), "{n} is frozen but got a gradient");
    }
}

#[test]
fn checkpointed_backward_matches_the_plain_backward() {
    let (ids, labels) = batch(2, 24);
    let plain = model(11);
    let mut ckpt = model(11);
    ckpt.set_checkpointing(true);
    let l1 = plain
        .forward_backward(&ids, &labels, 0.25)
        .double_value(&[]);
    let l2 = ckpt.forward_backward(&ids, &labels, 0.25).double_value(&[]);
    assert!((l1 - l2).abs() < 1e-6, "{l1} vs {l2}");
    for ((n, a), (_, b)) in plain.trainable().into_iter().zip(ckpt.trainable()) {
        let (ga, gb) = (a.grad(), b.grad());
        assert_eq!(ga.defined(), gb.defined(), "{n}");
        if ga.defined() {
            let rel = (&ga - &gb).norm().double_value(&[]) / ga.norm().double_value(&[]).max(1e-30);
            assert!(rel < 1e-5, "{n}: relative difference {rel}");
        }
    }
}

#[test]
fn load_named_round_trips_and_reports() {
    let a = model(21);
    let mut b = model(22);
    let (ids, _) = batch(1, 12);
    let mut named = a.shared_tensors();
    named.extend(
        a.expert_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.to_kind(Kind::Half))),
    );
    named.push((
        "model.layers.1.mlp.experts.2.down_proj".into(),
        Tensor::zeros([64, 32], (Kind::Float, Device::Cpu)),
    ));
    named.push((
        "optimizer.step".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let report = b.load_named(named).expect("load");
    assert_eq!(
        report.loaded.len(),
        a.shared_tensors().len() + a.expert_tensors().len()
    );
    assert!(report.missing.is_empty(), "{:?}", report.missing);
    assert_eq!(
        report.skipped_experts,
        vec!["model.layers.1.mlp.experts.2.down_proj".to_string()]
    );
    assert_eq!(report.unknown, vec!["optimizer.step".to_string()]);
    // Experts went through fp16, so compare with a tolerance; the masters stay fp32 and trainable.
    let d = max_abs_diff(&a.forward(&ids), &b.forward(&ids));
    assert!(d < 1e-3, "{d}");
    for (_, t) in b.trainable() {
        assert!(t.requires_grad());
        assert_eq!(t.kind(), Kind::Float);
    }

    // A shape mismatch is an error and loads nothing.
    let before = b.forward(&ids);
    let bad = vec![
        (
            "model.norm.weight".to_string(),
            Tensor::zeros([64], (Kind::Float, Device::Cpu)),
        ),
        (
            "lm_head.weight".to_string(),
            Tensor::zeros([10, 64], (Kind::Float, Device::Cpu)),
        ),
    ];
    let err = format!("{:#}", b.load_named(bad).expect_err("mismatch"));
    assert!(err.contains("lm_head.weight"), "{err}");
    assert_eq!(max_abs_diff(&before, &b.forward(&ids)), 0.0);
}

#[test]
fn hf_safetensors_dir_loads_shared_and_owned_experts() {
    let all: GroupExperts = [(1, (0..16).collect()), (2, (0..16).collect())]
        .into_iter()
        .collect();
    let src =
        PartialModel::new(&ModelConfig::tiny(), &all, Device::Cpu, Kind::Float, 31).expect("src");
    let dir = tempfile::tempdir().expect("tempdir");
    // Hub layout, bf16, split over two files: per-expert gate/up/down `.weight` tensors.
    let mut hf: Vec<(String, Tensor)> = src.shared_tensors();
    for (n, t) in src.expert_tensors() {
        let (l, e, part) = naming::parse_expert_key(&n).expect("key");
        let p = format!("model.layers.{l}.mlp.experts.{e}");
        match part {
            ExpertPart::GateUp => {
                hf.push((
                    format!("{p}.gate_proj.weight"),
                    t.narrow(0, 0, 32).contiguous(),
                ));
                hf.push((
                    format!("{p}.up_proj.weight"),
                    t.narrow(0, 32, 32).contiguous(),
                ));
            }
            ExpertPart::Down => hf.push((format!("{p}.down_proj.weight"), t)),
        }
    }
    let hf: Vec<(String, Tensor)> = hf
        .into_iter()
        .map(|(n, t)| (n, t.to_kind(Kind::BFloat16)))
        .collect();
    let (first, second) = hf.split_at(hf.len() / 2);
    Tensor::write_safetensors(first, dir.path().join("model-00001-of-00002.safetensors"))
        .expect("write");
    Tensor::write_safetensors(second, dir.path().join("model-00002-of-00002.safetensors"))
        .expect("write");

    let mut m = model(32);
    let report = m.load_safetensors_dir(dir.path()).expect("load");
    assert!(report.missing.is_empty(), "{:?}", report.missing);
    assert!(report.unknown.is_empty(), "{:?}", report.unknown);
    assert_eq!(report.skipped_experts.len(), 3 * (32 - 9));
    for (n, t) in m.expert_tensors() {
        let want = src
            .expert_tensors()
            .into_iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.to_kind(Kind::BFloat16).to_kind(Kind::Float))
            .expect("src tensor");
        assert_eq!(max_abs_diff(&t, &want), 0.0, "{n}");
    }
    let err = format!(
        "{:#}",
        m.load_safetensors_dir(&dir.path().join("nope"))
            .expect_err("missing dir")
    );
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn group_experts_are_validated() {
    let cfg = ModelConfig::tiny();
    let no_layer2: GroupExperts = [(1, vec![1])].into_iter().collect();
    let err = format!(
        "{:#}",
        validate_group_experts(&cfg, &no_layer2).expect_err("missing layer")
    );
    assert!(err.contains("layer 2"), "{err}");
    let out_of_range: GroupExperts = [(1, vec![1]), (2, vec![16])].into_iter().collect();
    assert!(validate_group_experts(&cfg, &out_of_range).is_err());
    // Entries for the dense layer and past the last layer are ignored (exp_dummy's 48-layer table).
    let extra: GroupExperts = [(0, vec![3]), (1, vec![9, 1]), (2, vec![2]), (40, vec![1])]
        .into_iter()
        .collect();
    let ok = validate_group_experts(&cfg, &extra).expect("valid");
    assert_eq!(ok, [(1, vec![1, 9]), (2, vec![2])].into_iter().collect());
}

#[test]
fn bf16_compute_trains_fp32_masters_and_tracks_the_fp32_loss() {
    let (ids, labels) = batch(2, 16);
    let f32_model = model(41);
    let mut bf16 = PartialModel::new(
        &ModelConfig::tiny(),
        &group(),
        Device::Cpu,
        Kind::BFloat16,
        41,
    )
    .expect("bf16");
    let mut named = f32_model.shared_tensors();
    named.extend(f32_model.expert_tensors());
    bf16.load_named(named).expect("load");
    for (n, t) in bf16.shared_tensors() {
        assert_eq!(t.kind(), Kind::BFloat16, "{n} must be in the compute dtype");
    }
    let want = f32_model.loss(&ids, &labels).double_value(&[]);
    for ckpt in [false, true] {
        bf16.set_checkpointing(ckpt);
        for (_, mut t) in bf16.trainable() {
            t.zero_grad();
        }
        let got = bf16.forward_backward(&ids, &labels, 1.0);
        assert_eq!(got.kind(), Kind::Float);
        let got = got.double_value(&[]);
        assert!(
            (got - want).abs() < 0.05,
            "checkpointing={ckpt}: bf16 loss {got} vs fp32 {want}"
        );
        let mut with_grad = 0;
        for (n, t) in bf16.trainable() {
            let g = t.grad();
            if g.defined() {
                assert_eq!(g.kind(), Kind::Float, "{n}: master gradient must be fp32");
                assert!(bool::try_from(g.isfinite().all()).expect("bool"), "{n}");
                with_grad += 1;
            }
        }
        assert!(with_grad > 0);
    }
}

#[test]
fn lite_layer_dimensions_run_forward_and_backward() {
    // DeepSeek-V2-Lite widths (MLA rank 512, rope 64, 64 experts of 1408, dense 10944) with 2 layers
    // and a small vocabulary, so the real shapes are exercised on CPU (~120 M parameters).
    let mut cfg = ModelConfig::deepseek_v2_lite(4096);
    cfg.num_hidden_layers = 2;
    cfg.vocab_size = 512;
    let g: GroupExperts = [(1, vec![22, 17])].into_iter().collect();
    let m = PartialModel::new(&cfg, &g, Device::Cpu, Kind::Float, 3).expect("model");
    let ids = Tensor::from_slice(&[5i64, 9, 100, 7, 300, 2, 1, 0]).reshape([1, 8]);
    let loss = m.forward_backward(&ids, &ids, 1.0).double_value(&[]);
    assert!((loss - 512f64.ln()).abs() < 0.5, "loss {loss}");
    let names: Vec<String> = m.trainable().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        vec![
            "model.layers.1.mlp.experts.17.gate_up_proj",
            "model.layers.1.mlp.experts.17.down_proj",
            "model.layers.1.mlp.experts.22.gate_up_proj",
            "model.layers.1.mlp.experts.22.down_proj",
        ]
    );
    for (n, t) in m.trainable() {
        let want = if n.ends_with("gate_up_proj") {
            vec![2816, 2048]
        } else {
            vec![2048, 1408]
        };
        assert_eq!(t.size(), want, "{n}");
    }
}
