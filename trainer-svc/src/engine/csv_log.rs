//! The metric CSV (spec §9.2): one row per logging step, appended (a header only when the file
//! is new or empty), flushed per row.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::status::StatusSnapshot;

pub const CSV_HEADER: &str = "unix_time,step,inner_opt_step,lr,loss,perplexity,val_loss,grad_norm,tokens_per_second,total_samples,total_tokens,param_sum,gradient_accumulation_steps,expert_group_name,baseline_version";

pub struct CsvLog {
    file: File,
    path: std::path::PathBuf,
}

impl CsvLog {
    pub fn open(path: &Path) -> anyhow::Result<CsvLog> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open metric log {}", path.display()))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len == 0 {
            writeln!(file, "{CSV_HEADER}").with_context(|| format!("write {}", path.display()))?;
        }
        Ok(CsvLog {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn append(&mut self, s: &StatusSnapshot) -> anyhow::Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let val = s.val_loss.map(|v| format!("{v:.6}")).unwrap_or_default();
        writeln!(
            self.file,
            "{now:.3},{},{},{:e},{:.6},{:.6},{val},{:.6},{:.3},{},{},{:.6},{},{},{}",
            s.step,
            s.inner_opt_step,
            s.learning_rate,
            s.loss,
            s.loss.exp(),
            s.grad_norm,
            s.tokens_per_sec,
            s.total_samples,
            s.total_tokens,
            s.param_sum,
            s.grad_accum_steps,
            s.expert_group_name,
            s.baseline_version
        )
        .with_context(|| format!("append {}", self.path.display()))?;
        self.file
            .flush()
            .with_context(|| format!("flush {}", self.path.display()))
    }
}
