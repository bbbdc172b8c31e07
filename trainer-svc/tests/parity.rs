//! Numerics parity of the partial DeepSeek-V2 model against PyTorch + transformers 5.4.
//!
//! The Rust model (tiny config, float32, CPU) writes its weights, config and a batch to a temp dir;
//! `tests/py/deepseek_v2_reference.py` rebuilds the model from transformers' `DeepseekV2` modules with
//! Connito's partial router and writes loss, logits, routing and expert gradients back. They must agree
//! to a relative error below 1e-4, with and without activation checkpointing.

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{Device, Kind, Tensor};
use trainer_svc::model::{GroupExperts, ModelConfig, PartialModel};

/// `MINER_PYTHON`, else `<workspace>/.deps/venv/bin/python`; panics naming the setup script if absent.
fn python() -> PathBuf {
    let p = match std::env::var_os("MINER_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/venv/bin/python"),
    };
    assert!(
        p.exists(),
        "Python reference interpreter {} is missing: run scripts/setup-python.sh (or set MINER_PYTHON)",
        p.display()
    );
    p
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    let ours = ours.to_kind(Kind::Double);
    let reference = reference.to_kind(Kind::Double);
    (&ours - &reference).norm().double_value(&[]) / reference.norm().double_value(&[]).max(1e-30)
}

fn group() -> GroupExperts {
    [(1, vec![1, 4, 9, 14]), (2, vec![0, 3, 7, 12, 15])]
        .into_iter()
        .collect()
}

/// Two sequences of 40 tokens; the second is right-padded (labels -100) like the collator does.
fn batch(vocab: i64) -> (Tensor, Tensor) {
    let (b, t) = (2i64, 40i64);
    let ids: Vec<i64> = (0..b * t).map(|i| (i * 104_729 + 7) % vocab).collect();
    let ids = Tensor::from_slice(&ids).reshape([b, t]);
    let labels = ids.copy();
    let _ = labels.get(1).narrow(0, 30, 10).fill_(-100);
    (ids, labels)
}

fn run_reference(dir: &Path) -> Vec<(String, Tensor)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/deepseek_v2_reference.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(dir)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("start the Python reference");
    assert!(
        out.status.success(),
        "Python reference failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Tensor::read_safetensors(dir.join("reference.safetensors")).expect("read reference output")
}

#[test]
fn loss_logits_routing_and_expert_grads_match_transformers() {
    let cfg = ModelConfig::tiny();
    let mut model =
        PartialModel::new(&cfg, &group(), Device::Cpu, Kind::Float, 1234).expect("model");
    let (ids, labels) = batch(cfg.vocab_size as i64);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("config.json"), cfg.to_json_string()).expect("write config");
    let mut weights = model.shared_tensors();
    weights.extend(model.expert_tensors());
    Tensor::write_safetensors(&weights, dir.path().join("weights.safetensors"))
        .expect("write weights");
    Tensor::write_safetensors(
        &[("input_ids", &ids), ("labels", &labels)],
        dir.path().join("batch.safetensors"),
    )
    .expect("write batch");

    let reference = run_reference(dir.path());
    let get = |name: &str| {
        reference
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .unwrap_or_else(|| panic!("reference output lacks {name}"))
    };

    // Routing: the same expert for every token in every MoE layer.
    for (layer, chosen) in model.expert_choices(&ids) {
        let want = get(&format!("routing.{layer}"));
        assert_eq!(
            Vec::<i64>::try_from(&chosen).expect("vec"),
            Vec::<i64>::try_from(&want).expect("vec"),
            "routing differs in layer {layer}"
        );
    }

    let logits = tch::no_grad(|| model.forward(&ids));
    let e = rel_err(&logits, &get("logits"));
    eprintln!("logits relative error {e:.3e}");
    assert!(e < 1e-4, "logits relative error {e}");

    let ref_loss = get("loss").double_value(&[0]);
    let mut grads_checked = 0;
    let mut worst = 0f64;
    for checkpointing in [false, true] {
        model.set_checkpointing(checkpointing);
        for (_, mut t) in model.trainable() {
            t.zero_grad();
        }
        let loss = model.forward_backward(&ids, &labels, 1.0).double_value(&[]);
        let e = (loss - ref_loss).abs() / ref_loss.abs();
        assert!(
            e < 1e-4,
            "checkpointing={checkpointing}: loss {loss} vs reference {ref_loss} (rel {e})"
        );
        for (name, t) in model.trainable() {
            let want = get(&name);
            let got = t.grad();
            if want.abs().max().double_value(&[]) == 0.0 {
                // An expert no token reached: no gradient on either side.
                assert!(
                    !got.defined() || got.abs().max().double_value(&[]) == 0.0,
                    "{name}"
                );
                continue;
            }
            assert!(
                got.defined(),
                "checkpointing={checkpointing}: {name} has no gradient"
            );
            let e = rel_err(&got, &want);
            worst = worst.max(e);
            assert!(
                e < 1e-4,
                "checkpointing={checkpointing}: {name} gradient relative error {e}"
            );
            grads_checked += 1;
        }
    }
    eprintln!(
        "loss {ref_loss}, worst expert-gradient relative error {worst:.3e} over {grads_checked}"
    );
    // Most owned experts receive tokens, so the comparison is not vacuous.
    assert!(
        grads_checked >= 2 * 2 * 6,
        "only {grads_checked} gradients compared"
    );
}
