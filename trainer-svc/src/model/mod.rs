//! The partial DeepSeek-V2 model (spec §8.1-§8.3): the full decoder with only one expert group's
//! routed experts in memory. The routed experts are fp32 masters that train; everything else is frozen
//! in the compute dtype.
//!
//! **API boundary:** tensor names are those of spec §7.3 ([`naming`]); `model_shared.pt` holds
//! [`PartialModel::shared_tensors`], `model_expgroup_<gid>.pt` holds [`PartialModel::expert_tensors`].

pub mod attention;
pub mod config;
pub mod hub;
pub mod hub_weights;
pub mod moe;
pub mod naming;
pub mod norm;
pub mod rope;
pub mod safetensors_dir;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, bail};
use tch::{Device, Kind, Reduction, Tensor};

use attention::{Attention, AttentionDims};
pub use config::{ModelConfig, RopeScaling};
use moe::{DenseMlp, Mlp, PartialMoe};
use naming::{ExpertPart, HfExpertTensor, HfProj};
use norm::rms_norm;
use rope::Rope;

/// Layer id -> sorted original expert ids owned by the group (from `expert_assignment.json`).
pub type GroupExperts = BTreeMap<usize, Vec<usize>>;

/// What [`PartialModel::load_named`] / [`PartialModel::load_safetensors_dir`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Names overlaid onto the model.
    pub loaded: Vec<String>,
    /// Routed-expert names of experts this group does not own (ignored).
    pub skipped_experts: Vec<String>,
    /// Names the model does not have (ignored).
    pub unknown: Vec<String>,
    /// Model names that were not in the input (they keep their values).
    pub missing: Vec<String>,
}

/// One decoder layer.
#[derive(Debug)]
struct Layer {
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    attn: Attention,
    mlp: Mlp,
}

/// The partial model. Owns its tensors; not `Sync`-shared across threads (tch tensors are `Send`).
#[derive(Debug)]
pub struct PartialModel {
    cfg: ModelConfig,
    device: Device,
    compute: Kind,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: Rope,
    dims: AttentionDims,
    /// Every tensor under its §7.3 name (shallow clones sharing storage with the fields above).
    params: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
    /// Indices into `params` of the trainable expert masters.
    trainable: Vec<usize>,
    checkpointing: bool,
}

/// Serialises seeded initialisation: libtorch's default generator is process-global.
static INIT_LOCK: Mutex<()> = Mutex::new(());

fn normal(shape: &[i64], kind: Kind, device: Device, std: f64) -> Tensor {
    let mut t = Tensor::empty(shape, (kind, device));
    let _ = t.normal_(0.0, std);
    t
}

/// Checks and normalises the group's experts for the MoE layers of `cfg` (entries for other layers,
/// e.g. layer 0 or layers past the model, are ignored as the reference does).
pub fn validate_group_experts(
    cfg: &ModelConfig,
    experts: &GroupExperts,
) -> anyhow::Result<GroupExperts> {
    let mut out = GroupExperts::new();
    for l in 0..cfg.num_hidden_layers {
        if !cfg.is_moe_layer(l) {
            continue;
        }
        let ids = experts
            .get(&l)
            .filter(|v| !v.is_empty())
            .with_context(|| format!("expert group owns no expert in MoE layer {l}"))?;
        let mut ids = ids.clone();
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        if ids.len() != n {
            bail!("expert group lists an expert twice in layer {l}");
        }
        if let Some(&bad) = ids.iter().find(|&&e| e >= cfg.n_routed_experts) {
            bail!(
                "expert id {bad} in layer {l} is out of range (n_routed_experts {})",
                cfg.n_routed_experts
            );
        }
        out.insert(l, ids);
    }
    Ok(out)
}

impl PartialModel {
    /// Builds the partial model with the reference's random initialisation (normal(0, initializer_range)
    /// for linear/embedding/expert weights, ones for RMSNorm), seeded by `seed` (this reseeds libtorch's
    /// global generator). Frozen tensors are in `compute`; the owned experts are fp32 masters.
    pub fn new(
        cfg: &ModelConfig,
        experts: &GroupExperts,
        device: Device,
        compute: Kind,
        seed: i64,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        if !matches!(compute, Kind::Float | Kind::Half | Kind::BFloat16) {
            bail!("compute dtype {compute:?} is not supported (float, half or bfloat16)");
        }
        let experts = validate_group_experts(cfg, experts)?;
        let _guard = INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(seed);
        let std = cfg.initializer_range;
        let lin = |shape: &[i64]| normal(shape, compute, device, std);
        let ones = |n: usize| Tensor::ones([n as i64], (compute, device));
        let mut params: Vec<(String, Tensor)> = Vec::new();
        let mut trainable = Vec::new();
        let names = naming::shared_names(cfg);
        let shape_of = |name: &str| {
            names
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.clone())
                .unwrap_or_default()
        };
        let reg = |params: &mut Vec<(String, Tensor)>, name: String, t: Tensor| {
            let s = t.shallow_clone();
            params.push((name, s));
            t
        };

        // One tensor holding several named weights stacked on dim 0; the names register views.
        let fused = |params: &mut Vec<(String, Tensor)>, parts: &[(String, Vec<i64>)]| {
            let rows: i64 = parts.iter().map(|(_, s)| s[0]).sum();
            let cols = parts.first().map(|(_, s)| s[1]).unwrap_or(0);
            let all = lin(&[rows, cols]);
            let mut off = 0;
            for (name, s) in parts {
                params.push((name.clone(), all.narrow(0, off, s[0])));
                off += s[0];
            }
            all
        };
        let dense = |params: &mut Vec<(String, Tensor)>, prefix: &str| {
            let g = format!("{prefix}.gate_proj.weight");
            let u = format!("{prefix}.up_proj.weight");
            let d = format!("{prefix}.down_proj.weight");
            let intermediate = shape_of(&g)[0];
            let gate_up = fused(
                params,
                &[(g.clone(), shape_of(&g)), (u.clone(), shape_of(&u))],
            );
            let down_proj = reg(params, d.clone(), lin(&shape_of(&d)));
            DenseMlp {
                gate_up,
                down_proj,
                intermediate,
            }
        };

        let embed_tokens = reg(
            &mut params,
            "model.embed_tokens.weight".into(),
            lin(&shape_of("model.embed_tokens.weight")),
        );
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let w = |params: &mut Vec<(String, Tensor)>, suffix: &str| {
                let name = format!("{p}.{suffix}");
                let t = lin(&shape_of(&name));
                reg(params, name, t)
            };
            let q_kv_a = fused(
                &mut params,
                &[
                    (
                        format!("{p}.self_attn.q_proj.weight"),
                        shape_of(&format!("{p}.self_attn.q_proj.weight")),
                    ),
                    (
                        format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
                        shape_of(&format!("{p}.self_attn.kv_a_proj_with_mqa.weight")),
                    ),
                ],
            );
            let kv_a_layernorm = reg(
                &mut params,
                format!("{p}.self_attn.kv_a_layernorm.weight"),
                ones(cfg.kv_lora_rank),
            );
            let kv_b_proj = w(&mut params, "self_attn.kv_b_proj.weight");
            let o_proj = w(&mut params, "self_attn.o_proj.weight");
            let attn = Attention {
                q_kv_a,
                kv_a_layernorm,
                kv_b_proj,
                o_proj,
            };
            let mlp = if cfg.is_moe_layer(l) {
                let gate = w(&mut params, "mlp.gate.weight");
                let shared_experts = dense(&mut params, &format!("{p}.mlp.shared_experts"));
                let ids = experts.get(&l).cloned().unwrap_or_default();
                let i = cfg.moe_intermediate_size as i64;
                let h = cfg.hidden_size as i64;
                let mut gate_up_proj = Vec::with_capacity(ids.len());
                let mut down_proj = Vec::with_capacity(ids.len());
                for &e in &ids {
                    let gu = normal(&[2 * i, h], Kind::Float, device, std).set_requires_grad(true);
                    trainable.push(params.len());
                    gate_up_proj.push(reg(
                        &mut params,
                        naming::expert_key(l, e, ExpertPart::GateUp),
                        gu,
                    ));
                    let dn = normal(&[h, i], Kind::Float, device, std).set_requires_grad(true);
                    trainable.push(params.len());
                    down_proj.push(reg(
                        &mut params,
                        naming::expert_key(l, e, ExpertPart::Down),
                        dn,
                    ));
                }
                let idx: Vec<i64> = ids.iter().map(|&e| e as i64).collect();
                Mlp::Moe(PartialMoe {
                    gate,
                    shared_experts,
                    owned_index: Tensor::from_slice(&idx).to_device(device),
                    expert_ids: ids,
                    gate_up_proj,
                    down_proj,
                    intermediate: i,
                    routed_scaling_factor: cfg.routed_scaling_factor,
                })
            } else {
                Mlp::Dense(dense(&mut params, &format!("{p}.mlp")))
            };
            let input_layernorm = reg(
                &mut params,
                format!("{p}.input_layernorm.weight"),
                ones(cfg.hidden_size),
            );
            let post_attention_layernorm = reg(
                &mut params,
                format!("{p}.post_attention_layernorm.weight"),
                ones(cfg.hidden_size),
            );
            layers.push(Layer {
                input_layernorm,
                post_attention_layernorm,
                attn,
                mlp,
            });
        }
        let norm = reg(
            &mut params,
            "model.norm.weight".into(),
            ones(cfg.hidden_size),
        );
        let lm_head = reg(
            &mut params,
            "lm_head.weight".into(),
            lin(&shape_of("lm_head.weight")),
        );
        drop(_guard);

        let index = params
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            device,
            compute,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg, device),
            dims: AttentionDims::new(cfg),
            params,
            index,
            trainable,
            checkpointing: false,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The dtype of the frozen tensors and of the activations.
    pub fn compute_kind(&self) -> Kind {
        self.compute
    }

    /// Activation checkpointing for [`PartialModel::forward_backward`]: keep only each layer's input
    /// during the forward and recompute one layer at a time during the backward.
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// The owned expert ids per MoE layer.
    pub fn group_experts(&self) -> GroupExperts {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(l, layer)| match &layer.mlp {
                Mlp::Moe(m) => Some((l, m.expert_ids.clone())),
                Mlp::Dense(_) => None,
            })
            .collect()
    }

    fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(
            &self.embed_tokens,
            &input_ids.to_device(self.device),
            -1,
            false,
            false,
        )
    }

    fn layer_forward(&self, layer: &Layer, x: &Tensor, freqs: &Tensor) -> Tensor {
        let eps = self.cfg.rms_norm_eps;
        let a = layer.attn.forward(
            &rms_norm(x, &layer.input_layernorm, eps),
            &self.dims,
            &self.rope,
            freqs,
        );
        let h = x + a;
        let m = layer
            .mlp
            .forward(&rms_norm(&h, &layer.post_attention_layernorm, eps));
        h + m
    }

    /// Final hidden states `[B, T, H]` (after `model.norm`), compute dtype.
    pub fn hidden_states(&self, input_ids: &Tensor) -> Tensor {
        let t = input_ids.size()[1];
        let freqs = self.rope.freqs(t);
        let mut x = self.embed(input_ids);
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, &freqs);
        }
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// The original expert id each token is routed to, per MoE layer (`[B*T]` int64, no autograd).
    /// Diagnostic: runs the forward once more.
    pub fn expert_choices(&self, input_ids: &Tensor) -> Vec<(usize, Tensor)> {
        tch::no_grad(|| {
            let t = input_ids.size()[1];
            let freqs = self.rope.freqs(t);
            let eps = self.cfg.rms_norm_eps;
            let mut x = self.embed(input_ids);
            let mut out = Vec::new();
            for (l, layer) in self.layers.iter().enumerate() {
                if let Mlp::Moe(m) = &layer.mlp {
                    let h = &x
                        + layer.attn.forward(
                            &rms_norm(&x, &layer.input_layernorm, eps),
                            &self.dims,
                            &self.rope,
                            &freqs,
                        );
                    let normed = rms_norm(&h, &layer.post_attention_layernorm, eps);
                    let hs = normed.size();
                    let routing = m.route(&normed.reshape([-1, hs[hs.len() - 1]]));
                    out.push((l, m.owned_index.index_select(0, &routing.local)));
                }
                x = self.layer_forward(layer, &x, &freqs);
            }
            out
        })
    }

    /// Logits `[B, T, vocab]` (float32).
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        self.hidden_states(input_ids)
            .linear::<Tensor>(&self.lm_head, None)
            .to_kind(Kind::Float)
    }

    /// Causal-LM loss from final hidden states: position `t` predicts `labels[t+1]`, mean over labels
    /// != -100 (HuggingFace `ForCausalLMLoss`). Only the `T-1` predicting positions go through `lm_head`.
    fn head_loss(&self, hidden: &Tensor, labels: &Tensor) -> Tensor {
        let t = hidden.size()[1];
        let v = self.cfg.vocab_size as i64;
        let logits = hidden
            .narrow(1, 0, t - 1)
            .linear::<Tensor>(&self.lm_head, None)
            .to_kind(Kind::Float)
            .reshape([-1, v]);
        let targets = labels
            .to_device(self.device)
            .narrow(1, 1, t - 1)
            .reshape([-1]);
        logits.cross_entropy_loss::<Tensor>(&targets, None, Reduction::Mean, -100, 0.0)
    }

    /// Causal-LM loss: shifted, mean over labels != -100 (HF semantics). `labels [B, T]` int64.
    pub fn loss(&self, input_ids: &Tensor, labels: &Tensor) -> Tensor {
        self.head_loss(&self.hidden_states(input_ids), labels)
    }

    /// Loss, then `backward` of `loss * loss_scale` into the experts' `.grad` (accumulating).
    /// Returns the unscaled loss (detached, on the model device; no host sync). With
    /// [`PartialModel::set_checkpointing`] the layers are recomputed one at a time in the backward.
    pub fn forward_backward(&self, input_ids: &Tensor, labels: &Tensor, loss_scale: f64) -> Tensor {
        if !self.checkpointing {
            let loss = self.loss(input_ids, labels);
            (&loss * loss_scale).backward();
            return loss.detach();
        }
        let t = input_ids.size()[1];
        let freqs = self.rope.freqs(t);
        // Forward without a graph, keeping each layer's input.
        let (inputs, last) = tch::no_grad(|| {
            let mut x = self.embed(input_ids);
            let mut inputs = Vec::with_capacity(self.layers.len());
            for layer in &self.layers {
                let y = self.layer_forward(layer, &x, &freqs);
                inputs.push(x);
                x = y;
            }
            (inputs, x)
        });
        // Nothing below the first MoE layer trains.
        let first_trainable = self.cfg.first_k_dense_replace.min(self.layers.len());
        let top = last.detach().set_requires_grad(true);
        let loss = self.head_loss(&rms_norm(&top, &self.norm, self.cfg.rms_norm_eps), labels);
        (&loss * loss_scale).backward();
        let mut grad = top.grad();
        for l in (first_trainable..self.layers.len()).rev() {
            let need_input_grad = l > first_trainable;
            let x = inputs[l].detach().set_requires_grad(need_input_grad);
            let y = self.layer_forward(&self.layers[l], &x, &freqs);
            (y * &grad).sum(Kind::Float).backward();
            if need_input_grad {
                grad = x.grad();
            }
        }
        loss.detach()
    }

    /// The fp32 trainable expert masters (layers ascending, experts ascending, `gate_up_proj` then
    /// `down_proj`), under their per-expert §7.3 names. The tensors share storage with the model.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.trainable
            .iter()
            .map(|&i| (self.params[i].0.clone(), self.params[i].1.shallow_clone()))
            .collect()
    }

    /// Per-expert tensors under their §7.3 names (detached fp32 masters sharing storage; the saver
    /// casts them to the save dtype).
    pub fn expert_tensors(&self) -> Vec<(String, Tensor)> {
        self.trainable
            .iter()
            .map(|&i| (self.params[i].0.clone(), self.params[i].1.detach()))
            .collect()
    }

    /// Every non-expert tensor under its `model_shared.pt` name, in HuggingFace order (detached,
    /// sharing storage).
    pub fn shared_tensors(&self) -> Vec<(String, Tensor)> {
        let mut t = vec![false; self.params.len()];
        for &i in &self.trainable {
            t[i] = true;
        }
        let order: HashMap<String, usize> = naming::shared_names(&self.cfg)
            .into_iter()
            .enumerate()
            .map(|(i, (n, _))| (n, i))
            .collect();
        let mut out: Vec<(String, Tensor)> = self
            .params
            .iter()
            .enumerate()
            .filter(|(i, _)| !t[*i])
            .map(|(_, (n, p))| (n.clone(), p.detach()))
            .collect();
        out.sort_by_key(|(n, _)| order.get(n).copied().unwrap_or(usize::MAX));
        out
    }

    /// Overlays tensors by name (expert or shared), casting dtype and device, copying in place without
    /// autograd. All shapes are checked before anything is copied: a shape mismatch is an error and
    /// changes nothing. Unknown names and experts the group does not own are reported and ignored.
    pub fn load_named(&mut self, named: Vec<(String, Tensor)>) -> anyhow::Result<LoadReport> {
        let mut report = LoadReport::default();
        let mut mismatches = Vec::new();
        let mut to_copy = Vec::new();
        for (name, src) in named {
            match self.index.get(&name) {
                Some(&i) => {
                    let want = self.params[i].1.size();
                    if src.size() != want {
                        mismatches.push(format!(
                            "{name}: model has {want:?}, input has {:?}",
                            src.size()
                        ));
                    } else {
                        to_copy.push((i, name, src));
                    }
                }
                None if naming::parse_expert_key(&name).is_some() => {
                    report.skipped_experts.push(name)
                }
                None => report.unknown.push(name),
            }
        }
        if !mismatches.is_empty() {
            bail!("shape mismatch, nothing loaded: {}", mismatches.join("; "));
        }
        let mut seen = vec![false; self.params.len()];
        tch::no_grad(|| -> anyhow::Result<()> {
            for (i, name, src) in to_copy {
                let mut dst = self.params[i].1.shallow_clone();
                dst.f_copy_(&src)
                    .with_context(|| format!("copy tensor {name}"))?;
                seen[i] = true;
                report.loaded.push(name);
            }
            Ok(())
        })?;
        report.missing = self
            .params
            .iter()
            .zip(&seen)
            .filter(|(_, s)| !**s)
            .map(|((n, _), _)| n.clone())
            .collect();
        Ok(report)
    }

    /// Loads HuggingFace base weights from `dir/*.safetensors` (`--base-weights DIR`): every non-expert
    /// tensor the model has, and this group's routed experts, either per expert
    /// (`model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight`, gate and up concatenated into
    /// `gate_up_proj`) or stacked (`model.layers.{L}.mlp.experts.{gate_up_proj,down_proj}`). Only the
    /// needed byte ranges are read.
    pub fn load_safetensors_dir(&mut self, dir: &Path) -> anyhow::Result<LoadReport> {
        let headers = safetensors_dir::read_dir_headers(dir)?;
        self.load_tensor_infos(&headers, &dir.display().to_string())
    }

    /// [`Self::load_safetensors_dir`] on tensors already located (a directory's headers, or the
    /// verified Hub cache of [`hub_weights`]); `label` names the source in errors.
    pub fn load_tensor_infos(
        &mut self,
        headers: &BTreeMap<String, safetensors_dir::TensorInfo>,
        label: &str,
    ) -> anyhow::Result<LoadReport> {
        let owned = self.group_experts();
        let owns = |l: usize, e: usize| owned.get(&l).is_some_and(|v| v.binary_search(&e).is_ok());
        let mut named = Vec::new();
        let mut skipped = Vec::new();
        let mut unknown = Vec::new();
        // (layer, expert) -> (gate, up)
        let mut halves: BTreeMap<(usize, usize), (Option<Tensor>, Option<Tensor>)> =
            BTreeMap::new();
        for (name, info) in headers {
            if self.index.contains_key(name) && naming::parse_expert_key(name).is_none() {
                named.push((name.clone(), safetensors_dir::read_tensor(info)?));
                continue;
            }
            match naming::parse_hf_expert_name(name) {
                Some(HfExpertTensor::PerExpert {
                    layer,
                    expert,
                    proj,
                }) => {
                    if !owns(layer, expert) {
                        skipped.push(name.clone());
                        continue;
                    }
                    let t = safetensors_dir::read_tensor(info)?;
                    match proj {
                        HfProj::Down => {
                            named.push((naming::expert_key(layer, expert, ExpertPart::Down), t))
                        }
                        HfProj::Gate => halves.entry((layer, expert)).or_default().0 = Some(t),
                        HfProj::Up => halves.entry((layer, expert)).or_default().1 = Some(t),
                    }
                }
                Some(HfExpertTensor::Stacked { layer, part }) => {
                    let Some(ids) = owned.get(&layer) else {
                        skipped.push(name.clone());
                        continue;
                    };
                    let t = safetensors_dir::read_tensor(info)?;
                    if t.dim() != 3 || t.size()[0] != self.cfg.n_routed_experts as i64 {
                        bail!(
                            "{}: stacked tensor {name} has shape {:?}",
                            info.file.display(),
                            t.size()
                        );
                    }
                    for &e in ids {
                        named.push((naming::expert_key(layer, e, part), t.get(e as i64)));
                    }
                }
                None => unknown.push(name.clone()),
            }
        }
        for ((layer, expert), pair) in halves {
            match pair {
                (Some(g), Some(u)) => {
                    named.push((
                        naming::expert_key(layer, expert, ExpertPart::GateUp),
                        Tensor::cat(&[g, u], 0),
                    ));
                }
                _ => bail!(
                    "{label}: expert {expert} of layer {layer} lacks its gate_proj or up_proj"
                ),
            }
        }
        let mut report = self
            .load_named(named)
            .with_context(|| format!("load base weights from {label}"))?;
        report.skipped_experts.extend(skipped);
        report.unknown.extend(unknown);
        Ok(report)
    }
}
