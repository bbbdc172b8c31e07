//! The training loop (spec §2.4.3, §8.6), run on its own thread that owns every `tch` object.
//! It polls [`Control`] between micro-batches and publishes a [`StatusSnapshot`] on a `watch`
//! channel after every optimizer step and state change.

pub mod checkpoint;
pub mod csv_log;

/// The model the loop trains.
pub use crate::model;

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use miner_contract::layout::{CheckpointEntry, CheckpointKind, RunDir};
use tch::{Device, Kind, Tensor};
use tokio::sync::watch;

use crate::data::{self, DataPipeline, TextTokenizer, TokenBatch, TrainStream};
use crate::optim::{AdamW, GradScaler, clip_to, cosine_with_warmup, global_norm};
use crate::settings::{Precision, Settings, TokenizerSource, device_name};
use crate::status::{Control, StatusSnapshot, TrainerState};
use checkpoint::TrainerStateFile;
use model::PartialModel;

/// Batches with a non-finite loss in a row before the trainer gives up (reference default).
pub const MAX_CONSECUTIVE_NON_FINITE: u32 = 50;

/// How the loop ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stop requested (signal or RPC); `final_checkpoint` names what was published last.
    Stopped { final_checkpoint: Option<String> },
    /// `--max-steps` reached.
    MaxSteps { final_checkpoint: Option<String> },
}

/// A fatal training error (the process exits non-zero).
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("non-finite loss persisted for {0} consecutive batches")]
    NonFiniteLoss(u32),
    #[error("non-finite trainable parameters detected after optimizer step {0}")]
    NonFiniteParams(u64),
}

struct Baseline {
    global_ver: u64,
    name: String,
    hash: String,
}

/// Everything the loop owns.
struct Trainer {
    s: Settings,
    control: Arc<Control>,
    status_tx: watch::Sender<StatusSnapshot>,
    status: StatusSnapshot,
    run: RunDir,
    model: PartialModel,
    opt: AdamW,
    scaler: GradScaler,
    sched_step: u64,
    inner_opt: u64,
    micro_step: u64,
    data: DataPipeline,
    eval: Vec<TokenBatch>,
    baseline: Baseline,
    last_published: Option<String>,
    csv: csv_log::CsvLog,
    started: Instant,
    last_validator_poll: Option<Instant>,
}

fn compute_kind(s: &Settings) -> Kind {
    match (s.device, s.precision) {
        (Device::Cpu, _) => Kind::Float,
        (_, Precision::Fp16Mixed) => Kind::Half,
        (_, Precision::Bf16Mixed) => Kind::BFloat16,
    }
}

/// The dtype of `model_expgroup_<gid>.pt` and `model_shared.pt`.
pub fn save_kind(s: &Settings) -> Kind {
    match s.precision {
        Precision::Fp16Mixed => Kind::Half,
        Precision::Bf16Mixed => Kind::BFloat16,
    }
}

fn batch_tensors(b: &TokenBatch, device: Device) -> (Tensor, Tensor) {
    let shape = [b.rows as i64, b.seq_len as i64];
    let ids = Tensor::from_slice(&b.input_ids)
        .view(shape)
        .to_device(device);
    let labels = Tensor::from_slice(&b.labels).view(shape).to_device(device);
    (ids, labels)
}

/// Whether `e` comes from a full disk: the up-front free-space check, or ENOSPC / EDQUOT while
/// writing.
fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<miner_contract::PublishError>(),
            Some(miner_contract::PublishError::InsufficientSpace { .. })
        ) || c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|code| code == 28 || code == 122)
    })
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Runs the training loop to its end on the calling thread.
pub fn run(
    settings: Settings,
    control: Arc<Control>,
    status_tx: watch::Sender<StatusSnapshot>,
) -> anyhow::Result<Outcome> {
    let mut t = match Trainer::setup(settings, control, status_tx.clone()) {
        Ok(t) => t,
        Err(e) => {
            status_tx.send_modify(|s| {
                s.state = TrainerState::Failed;
                s.error = format!("{e:#}");
            });
            return Err(e);
        }
    };
    let r = t.train();
    match &r {
        Ok(_) => t.set_state(TrainerState::Stopped),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "Quit training");
            t.status.error = format!("{e:#}");
            t.set_state(TrainerState::Failed);
        }
    }
    r
}

impl Trainer {
    fn setup(
        s: Settings,
        control: Arc<Control>,
        status_tx: watch::Sender<StatusSnapshot>,
    ) -> anyhow::Result<Trainer> {
        tracing::info!("(0) Setup training");
        tch::manual_seed(s.seed);
        let run = RunDir::create(&s.run_dir)
            .with_context(|| format!("create run directory {}", s.run_dir.display()))?;
        let tokenizer = match &s.data.tokenizer {
            TokenizerSource::Embedded => TextTokenizer::embedded()?,
            TokenizerSource::File(p) => TextTokenizer::from_file(p)?,
        };
        if tokenizer.vocab_size() > s.model.vocab_size {
            bail!(
                "tokenizer has {} ids but the model's vocabulary is {}",
                tokenizer.vocab_size(),
                s.model.vocab_size
            );
        }
        let eval_docs = data::held_out_docs(
            &s.data.sources,
            s.data.vali_fraction,
            s.data.eval_batches * s.data.rows,
        )?;
        let eval = eval_docs
            .chunks(s.data.rows)
            .map(|c| data::make_batch(&tokenizer, c, s.data.sequence_length))
            .collect::<Result<Vec<_>, _>>()?;

        let mut model = PartialModel::new(&s.model, &s.experts, s.device, compute_kind(&s), s.seed)
            .context("build the partial model")?;
        model.set_checkpointing(s.device.is_cuda());
        if let Some(dir) = &s.base_weights {
            model
                .load_safetensors_dir(dir)
                .with_context(|| format!("load base weights from {}", dir.display()))?;
        }
        let trainable = model.trainable();
        let n_train: i64 = trainable.iter().map(|(_, t)| t.numel() as i64).sum();
        let n_total: i64 = n_train
            + model
                .shared_tensors()
                .iter()
                .map(|(_, t)| t.numel() as i64)
                .sum::<i64>();
        tracing::info!(
            trainable = n_train,
            total = n_total,
            "trainable params: {n_train} / total: {n_total}"
        );
        let opt = AdamW::new(trainable, s.adamw);
        let scaler = GradScaler::new(s.device.is_cuda() && s.precision == Precision::Fp16Mixed);
        tracing::info!(enabled = scaler.enabled, precision = ?s.precision, "inner scaler configured");

        let stream = TrainStream::new(&s.data.sources, s.data.vali_fraction)?;
        let data = DataPipeline::new(tokenizer, stream, s.data.sequence_length, s.data.rows);
        let csv = csv_log::CsvLog::open(&s.metric_csv)?;
        let status = StatusSnapshot {
            state: TrainerState::Starting,
            device: device_name(s.device),
            expert_group_id: s.expert_group_id,
            expert_group_name: s.expert_group_name.clone(),
            loss_scale: scaler.loss_factor(),
            grad_accum_steps: s.grad_accum,
            started_unix: now_unix(),
            learning_rate: s.adamw.lr * cosine_with_warmup(0, s.warmup_steps, s.total_steps),
            ..StatusSnapshot::default()
        };
        let mut t = Trainer {
            s,
            control,
            status_tx,
            status,
            run,
            model,
            opt,
            scaler,
            sched_step: 0,
            inner_opt: 0,
            micro_step: 0,
            data,
            eval,
            baseline: Baseline {
                global_ver: 0,
                name: String::new(),
                hash: String::new(),
            },
            last_published: None,
            csv,
            started: Instant::now(),
            last_validator_poll: None,
        };
        t.publish_status();
        t.resume()?;
        Ok(t)
    }

    /// Startup selection: resume the newest own checkpoint for real; if a verified validator
    /// checkpoint is newer, load its weights instead (keeping the own data position).
    fn resume(&mut self) -> anyhow::Result<()> {
        let entries = self.run.list().context("list checkpoints")?;
        let own = entries
            .iter()
            .find(|e| e.is_verified() && e.kind == CheckpointKind::Own)
            .cloned();
        let val = entries
            .iter()
            .find(|e| e.is_verified() && e.kind == CheckpointKind::Validator)
            .cloned();
        if let Some(o) = &own {
            self.set_state(TrainerState::Reloading);
            let state = checkpoint::load_own(o, &mut self.model, &mut self.opt, self.s.device)?;
            if let Some(st) = state {
                self.restore_state(&st)?;
            } else {
                self.inner_opt = o.inner_opt;
            }
            self.baseline.global_ver = o.global_ver;
            self.last_published = Some(o.dir_name.clone());
            self.status.last_checkpoint = o.dir_name.clone();
            tracing::info!(checkpoint = %o.dir_name, inner_opt = self.inner_opt, "resumed from own checkpoint");
        }
        if let Some(v) = val
            && own.as_ref().is_none_or(|o| v.global_ver > o.global_ver)
        {
            self.load_baseline(&v)?;
        }
        Ok(())
    }

    fn restore_state(&mut self, st: &TrainerStateFile) -> anyhow::Result<()> {
        self.inner_opt = st.inner_opt_step;
        self.micro_step = st.micro_step;
        self.sched_step = st.sched_step;
        self.scaler = st.scaler;
        self.baseline = Baseline {
            global_ver: st.global_ver,
            name: st.baseline_name.clone(),
            hash: st.baseline_hash.clone(),
        };
        self.status.total_samples = st.total_samples;
        self.status.total_tokens = st.total_tokens;
        self.status.loss = st.loss;
        let stream =
            TrainStream::resume(&self.s.data.sources, self.s.data.vali_fraction, &st.data)?;
        self.data.set_stream(stream);
        Ok(())
    }

    /// Loads a validator baseline in-process: its experts (and `model_shared.pt` if present),
    /// fresh optimizer, schedule and scaler; the data position is kept.
    fn load_baseline(&mut self, e: &CheckpointEntry) -> anyhow::Result<()> {
        tracing::info!(checkpoint = %e.dir_name, global_ver = e.global_ver, "(5) Reload Model");
        self.set_state(TrainerState::Reloading);
        checkpoint::load_weights(e, &mut self.model, self.s.device)?;
        self.opt = AdamW::new(self.model.trainable(), self.s.adamw);
        self.sched_step = 0;
        self.scaler = GradScaler::new(self.scaler.enabled);
        self.baseline = Baseline {
            global_ver: e.global_ver,
            name: e.dir_name.clone(),
            hash: e
                .manifest
                .as_ref()
                .map(|m| m.model_hash.to_hex())
                .unwrap_or_default(),
        };
        self.status.baseline_version = e.global_ver;
        self.status.baseline_name = e.dir_name.clone();
        self.status.baseline_hash = self.baseline.hash.clone();
        self.set_state(TrainerState::Training);
        Ok(())
    }

    fn set_state(&mut self, st: TrainerState) {
        self.status.state = st;
        self.publish_status();
    }

    fn publish_status(&mut self) {
        self.status.inner_opt_step = self.inner_opt;
        self.status.step = self.micro_step;
        self.status.baseline_version = self.baseline.global_ver;
        self.status.baseline_name = self.baseline.name.clone();
        self.status.baseline_hash = self.baseline.hash.clone();
        self.status.loss_scale = self.scaler.loss_factor();
        self.status.total_training_time_hours = self.started.elapsed().as_secs_f64() / 3600.0;
        let _ = self.status_tx.send_replace(self.status.clone());
    }

    fn lr(&self) -> f64 {
        self.s.adamw.lr
            * cosine_with_warmup(self.sched_step, self.s.warmup_steps, self.s.total_steps)
    }

    fn train(&mut self) -> anyhow::Result<Outcome> {
        let ga = self.s.grad_accum;
        let mut consecutive_non_finite: u32 = 0;
        let mut steps_this_run: u64 = 0;
        let mut loss_sum = 0.0;
        let mut loss_count = 0u64;
        let mut micro_in_window = 0u64;
        let mut step_started = Instant::now();
        self.opt.zero_grad();
        self.set_state(TrainerState::Training);
        loop {
            if self.control.stop_requested() {
                let final_save = self.control.final_save_requested();
                return self
                    .finish(final_save)
                    .map(|final_checkpoint| Outcome::Stopped { final_checkpoint });
            }
            if micro_in_window == 0 {
                self.step_boundary()?;
            }
            let batch = self.data.next_batch()?;
            if batch.all_masked() {
                continue;
            }
            let (ids, labels) = batch_tensors(&batch, self.s.device);
            let factor = self.scaler.loss_factor() / ga as f64;
            // With activation checkpointing (CUDA) the backward runs inside the model; a
            // non-finite loss then leaves non-finite gradients, which the step drops.
            let (loss, pending_backward) = if self.model.checkpointing() {
                (self.model.forward_backward(&ids, &labels, factor), false)
            } else {
                (self.model.loss(&ids, &labels), true)
            };
            let loss_val = loss.double_value(&[]);
            self.micro_step += 1;
            if !loss_val.is_finite() {
                consecutive_non_finite += 1;
                self.status.consecutive_non_finite = consecutive_non_finite;
                tracing::warn!(
                    loss = loss_val,
                    consecutive = consecutive_non_finite,
                    "non-finite loss; batch skipped"
                );
                if consecutive_non_finite >= MAX_CONSECUTIVE_NON_FINITE {
                    return Err(TrainError::NonFiniteLoss(consecutive_non_finite).into());
                }
                continue;
            }
            consecutive_non_finite = 0;
            self.status.consecutive_non_finite = 0;
            tracing::debug!(
                loss = loss_val,
                inner_opt_step = self.inner_opt,
                "batch loss"
            );
            if pending_backward {
                (loss * factor).backward();
            }
            loss_sum += loss_val;
            loss_count += 1;
            micro_in_window += 1;
            if micro_in_window < ga {
                continue;
            }
            micro_in_window = 0;
            let mean_loss = loss_sum / loss_count.max(1) as f64;
            loss_sum = 0.0;
            loss_count = 0;
            self.optimizer_step(mean_loss)?;
            steps_this_run += 1;
            let elapsed = step_started.elapsed().as_secs_f64();
            step_started = Instant::now();
            let samples = (self.s.data.rows as u64) * ga;
            self.status.total_samples += samples;
            self.status.total_tokens += samples * self.s.data.sequence_length as u64;
            self.status.tokens_per_sec =
                (samples * self.s.data.sequence_length as u64) as f64 / elapsed.max(1e-9);
            self.status.step_time_hours = elapsed / 3600.0;
            self.status.loss = mean_loss;
            self.status.learning_rate = self.lr();
            self.after_step()?;
            if self.s.max_steps.is_some_and(|m| steps_this_run >= m) {
                tracing::info!(steps = steps_this_run, "max steps reached");
                return self
                    .finish(true)
                    .map(|final_checkpoint| Outcome::MaxSteps { final_checkpoint });
            }
        }
    }

    /// Gradient hygiene, clipping, the AdamW step and the schedule (spec §2.4.3 step (1)).
    fn optimizer_step(&mut self, mean_loss: f64) -> anyhow::Result<()> {
        tracing::debug!("(1) Start epoch training");
        let inv_scale = 1.0 / self.scaler.loss_factor();
        let mut grads = Vec::new();
        let mut active = Vec::new();
        let mut found_inf = false;
        tch::no_grad(|| {
            for (_, p) in self.opt.params() {
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
        let scale_before = self.scaler.loss_factor();
        let mut skipped = false;
        let mut norm = 0.0;
        if found_inf && self.scaler.enabled {
            // fp16 overflow: skip the step, back the scale off.
            skipped = true;
        } else if grads.is_empty() {
            skipped = true;
        } else {
            if found_inf {
                tracing::warn!("dropped non-finite gradients");
            }
            norm = global_norm(&grads);
            if !norm.is_finite() {
                tracing::warn!(grad_norm = norm, "non-finite gradient norm; step skipped");
                skipped = true;
            } else {
                clip_to(&mut grads, norm, self.s.max_grad_norm);
                let lr = self.lr();
                self.opt.step(lr, Some(&active));
                self.sched_step += 1;
                tracing::debug!(lr = self.lr(), "scheduler step");
            }
        }
        self.scaler.update(found_inf);
        tracing::debug!(
            grad_norm = norm,
            scale_before,
            scale_after = self.scaler.loss_factor(),
            skipped,
            "GradScaler for optimizer step"
        );
        self.opt.zero_grad();
        self.inner_opt += 1;
        self.status.grad_norm = norm;
        if !skipped && !self.params_finite() {
            return Err(TrainError::NonFiniteParams(self.inner_opt).into());
        }
        tracing::info!(
            inner_opt_step = self.inner_opt,
            loss = mean_loss,
            grad_norm = norm,
            lr = self.lr(),
            skipped,
            "optimizer step"
        );
        Ok(())
    }

    fn params_finite(&self) -> bool {
        tch::no_grad(|| {
            self.opt
                .params()
                .all(|(_, p)| bool::try_from(p.isfinite().all()).unwrap_or(false))
        })
    }

    /// Logging, evaluation and checkpointing on their intervals (steps (2)-(4)).
    fn after_step(&mut self) -> anyhow::Result<()> {
        let n = self.inner_opt;
        if n.is_multiple_of(self.s.metric_interval) {
            tracing::info!("(3) Local evaluation");
            self.set_state(TrainerState::Evaluating);
            let v = self.evaluate();
            tracing::info!(val_loss = v, inner_opt_step = n, "local evaluation");
            self.status.val_loss = Some(v);
            self.status.state = TrainerState::Training;
        }
        if n.is_multiple_of(self.s.log_interval) || n.is_multiple_of(self.s.metric_interval) {
            tracing::debug!("(2) Logging step");
            self.status.param_sum = tch::no_grad(|| {
                self.opt
                    .params()
                    .map(|(_, p)| p.sum(Kind::Float).double_value(&[]))
                    .sum()
            });
            self.csv.append(&self.status)?;
        }
        if n.is_multiple_of(self.s.checkpoint_interval) {
            match self.save_checkpoint() {
                Ok(_) => {}
                // A full disk is not a reason to throw away the weights in memory: the earlier
                // checkpoints are intact (publishing is atomic), so keep training and try again
                // at the next interval, with the error in the status until a save succeeds.
                Err(e) if is_disk_full(&e) => {
                    tracing::error!(
                        error = %format!("{e:#}"),
                        inner_opt_step = n,
                        "checkpoint not saved: disk full; training continues, retrying at the next checkpoint interval"
                    );
                    self.status.error = format!(
                        "checkpoint at step {n} not saved (disk full): {e:#}; retrying at the next interval"
                    );
                    self.status.state = TrainerState::Training;
                }
                Err(e) => return Err(e),
            }
        }
        self.publish_status();
        Ok(())
    }

    /// Mean held-out loss over the evaluation batches; non-finite batches are excluded.
    pub fn evaluate(&mut self) -> f64 {
        let mut sum = 0.0;
        let mut n = 0u32;
        tch::no_grad(|| {
            for b in &self.eval {
                if b.all_masked() {
                    continue;
                }
                let (ids, labels) = batch_tensors(b, self.s.device);
                let l = self.model.loss(&ids, &labels).double_value(&[]);
                if l.is_finite() {
                    sum += l;
                    n += 1;
                }
            }
        });
        if n == 0 {
            f64::INFINITY
        } else {
            sum / f64::from(n)
        }
    }

    fn save_checkpoint(&mut self) -> anyhow::Result<String> {
        tracing::info!("(4) Saving checkpoint");
        let prev = self.status.state;
        self.set_state(TrainerState::Saving);
        let state = TrainerStateFile {
            format: checkpoint::STATE_FORMAT,
            inner_opt_step: self.inner_opt,
            micro_step: self.micro_step,
            sched_step: self.sched_step,
            adam_step: self.opt.step,
            scaler: self.scaler,
            data: self.data.position(),
            loss: self.status.loss,
            global_ver: self.baseline.global_ver,
            baseline_name: self.baseline.name.clone(),
            baseline_hash: self.baseline.hash.clone(),
            total_samples: self.status.total_samples,
            total_tokens: self.status.total_tokens,
        };
        let published = checkpoint::publish_own(
            &self.run,
            self.baseline.global_ver,
            self.inner_opt,
            self.s.expert_group_id,
            &self.model,
            &self.opt,
            &state,
            save_kind(&self.s),
            self.s.shard_format,
        )?;
        tracing::info!(
            group_id = self.s.expert_group_id,
            model_hash = %&published.model_hash[..6.min(published.model_hash.len())],
            "Saving expert group checkpoint"
        );
        tracing::info!(path = %published.path.display(), "Checkpoint saved to {}", published.path.display());
        let deleted = checkpoint::retain(&self.run, self.s.checkpoint_topk)?;
        if !deleted.is_empty() {
            tracing::info!(deleted = ?deleted, "Deleted old checkpoints: {deleted:?}");
        }
        self.last_published = Some(published.name.clone());
        self.status.last_checkpoint = published.name.clone();
        self.status.error.clear();
        self.status.state = prev;
        self.publish_status();
        Ok(published.name)
    }

    /// At a step boundary: a baseline reload request, or a newer verified validator checkpoint.
    fn step_boundary(&mut self) -> anyhow::Result<()> {
        if let Some(name) = self.control.take_load_baseline() {
            let entries = self.run.list()?;
            let pick = entries
                .into_iter()
                .find(|e| e.is_verified() && (name.is_empty() || e.dir_name == name));
            match pick {
                Some(e) => self.load_baseline(&e)?,
                None => tracing::warn!(name = %name, "LoadBaseline: no such verified checkpoint"),
            }
            return Ok(());
        }
        let due = self
            .last_validator_poll
            .is_none_or(|t| t.elapsed().as_secs_f64() >= self.s.validator_poll_secs);
        if !due {
            return Ok(());
        }
        self.last_validator_poll = Some(Instant::now());
        match self.run.best_validator() {
            Ok(Some(v)) if v.global_ver > self.baseline.global_ver => {
                tracing::info!(checkpoint = %v.dir_name, "Should reload model");
                self.load_baseline(&v)?;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "poll validator checkpoints"),
        }
        Ok(())
    }

    /// Graceful end: publish a final checkpoint (unless this exact step is already published)
    /// and `mycelia_final.pt` in the run directory.
    fn finish(&mut self, final_save: bool) -> anyhow::Result<Option<String>> {
        self.set_state(TrainerState::Stopping);
        if !final_save {
            return Ok(self.last_published.clone());
        }
        let name =
            miner_contract::layout::CheckpointName::own(self.baseline.global_ver, self.inner_opt)
                .dir_name();
        if self.last_published.as_deref() != Some(name.as_str()) {
            self.save_checkpoint()?;
        }
        let path = self.run.path().join("mycelia_final.pt");
        checkpoint::write_final(&path, &self.model)?;
        tracing::info!(path = %path.display(), "wrote mycelia_final.pt");
        Ok(self.last_published.clone())
    }
}
