//! What the training thread tells the rest of the service (a `watch` snapshot) and what the rest
//! of the service can ask of it (the [`Control`] flags it polls between micro-batches).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Coarse state of the trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrainerState {
    #[default]
    Starting,
    Training,
    Evaluating,
    Saving,
    Reloading,
    Stopping,
    Stopped,
    Failed,
}

/// One snapshot of the training state (domain type; the `api` layer maps it to the wire).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusSnapshot {
    pub state: TrainerState,
    /// Micro-batches since this baseline.
    pub step: u64,
    /// Optimizer steps (the `N` of `globalver_<V>_inneropt_<N>`).
    pub inner_opt_step: u64,
    pub loss: f64,
    pub val_loss: Option<f64>,
    pub learning_rate: f64,
    pub tokens_per_sec: f64,
    /// Pre-clip global gradient norm of the last step.
    pub grad_norm: f64,
    pub loss_scale: f64,
    pub baseline_version: u64,
    pub baseline_hash: String,
    pub baseline_name: String,
    pub device: String,
    pub memory_allocated_bytes: u64,
    pub memory_peak_bytes: u64,
    pub expert_group_id: u32,
    pub expert_group_name: String,
    pub last_checkpoint: String,
    /// Phase name as last streamed by chainsync-svc; empty while it is unreachable
    /// (set by [`crate::phase_watch`], never by the training thread).
    pub phase: String,
    /// Chain head block with that phase; 0 while chainsync-svc is unreachable.
    pub block: u64,
    /// The whole phase (for the `subnet_*` gauges); `None` while chainsync-svc is unreachable.
    pub chain_phase: Option<crate::phase_watch::ChainPhase>,
    pub consecutive_non_finite: u32,
    pub started_unix: i64,
    pub error: String,
    pub total_tokens: u64,
    pub total_samples: u64,
    pub grad_accum_steps: u64,
    pub step_time_hours: f64,
    pub total_training_time_hours: f64,
    pub param_sum: f64,
}

/// Requests to the training thread. Owned jointly (`Arc`) by the service and the thread; the
/// thread polls it between micro-batches and never blocks on it.
#[derive(Debug, Default)]
pub struct Control {
    stop: AtomicBool,
    final_save: AtomicBool,
    /// `Some(name)` asks for a baseline reload at the next step boundary (`""` = best verified).
    load_baseline: Mutex<Option<String>>,
}

impl Control {
    /// Asks the loop to stop at the next micro-batch boundary; `final_save` publishes a final
    /// checkpoint and `mycelia_final.pt` first. A later request can only add the save.
    pub fn request_stop(&self, final_save: bool) {
        if final_save {
            self.final_save.store(true, Ordering::SeqCst);
        }
        self.stop.store(true, Ordering::SeqCst);
    }
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    pub fn final_save_requested(&self) -> bool {
        self.final_save.load(Ordering::SeqCst)
    }
    pub fn request_load_baseline(&self, name: String) {
        if let Ok(mut g) = self.load_baseline.lock() {
            *g = Some(name);
        }
    }
    pub fn take_load_baseline(&self) -> Option<String> {
        self.load_baseline.lock().ok().and_then(|mut g| g.take())
    }
}
