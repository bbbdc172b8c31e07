//! Retention (spec §7.6): keep the newest `k` verified checkpoints of each kind (own and
//! validator separately, default `ckpt.checkpoint_topk = 2`) and never delete a pinned one.
//!
//! [`plan_retention`] is a pure function of (entries, pins, k); [`RunDir::apply_retention`] is
//! the thin step that takes the pin lock, plans, and moves the victims out of sight.
//!
//! Incomplete directories (no valid manifest) are never deleted by retention: nothing this crate
//! writes leaves one under a final name, so they are foreign or legacy and are reported by
//! `minerctl checkpoint list` for the operator instead.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::layout::{CheckpointEntry, CheckpointKind, RunDir, selection_order};
use crate::pins::{self, PinError};
use crate::publish::{self, PublishError};

/// The default number of checkpoints kept per kind.
pub const DEFAULT_KEEP: usize = 2;

/// Which entries to delete: for each kind, the verified entries after the first `keep` in
/// selection order, minus the pinned ones (`pinned` holds directory names). Incomplete entries
/// are never selected. The result is in selection order.
pub fn plan_retention<'a>(
    entries: &'a [CheckpointEntry],
    pinned: &BTreeSet<String>,
    keep: usize,
) -> Vec<&'a CheckpointEntry> {
    let mut verified: Vec<&CheckpointEntry> = entries.iter().filter(|e| e.is_verified()).collect();
    verified.sort_by(|a, b| selection_order((&a.name, &a.dir_name), (&b.name, &b.dir_name)));
    let mut delete = Vec::new();
    for kind in [CheckpointKind::Own, CheckpointKind::Validator] {
        delete.extend(
            verified
                .iter()
                .filter(|e| e.kind == kind)
                .skip(keep)
                .filter(|e| !pinned.contains(&e.dir_name))
                .copied(),
        );
    }
    delete.sort_by(|a, b| selection_order((&a.name, &a.dir_name), (&b.name, &b.dir_name)));
    delete
}

/// What [`RunDir::apply_retention`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Deleted checkpoint directories.
    pub deleted: Vec<PathBuf>,
    /// Checkpoints beyond the top-k kept only because they are pinned.
    pub kept_pinned: Vec<String>,
}

/// Errors applying retention.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
}

impl RunDir {
    /// Applies retention with `keep` per kind: under the pin lock, reclaims dead holders' pins,
    /// plans, and moves victims to hidden trash; then deletes the trash.
    pub fn apply_retention(&self, keep: usize) -> Result<RetentionReport, RetentionError> {
        let pins_dir = self.pins_dir();
        let mut report = RetentionReport::default();
        let mut trash = Vec::new();
        {
            let _lock = pins::lock_pins(&pins_dir)?;
            pins::reclaim_stale_pins(&pins_dir)?;
            let entries = self.list()?;
            let pinned: BTreeSet<String> = pins::read_live_pins(&pins_dir)?
                .into_iter()
                .map(|p| p.checkpoint)
                .collect();
            let victims = plan_retention(&entries, &pinned, keep);
            let unpinned = plan_retention(&entries, &BTreeSet::new(), keep);
            report.kept_pinned = unpinned
                .iter()
                .filter(|e| pinned.contains(&e.dir_name))
                .map(|e| e.dir_name.clone())
                .collect();
            for v in victims {
                if let Some(t) = publish::move_to_trash(&v.path)? {
                    trash.push(t);
                    report.deleted.push(v.path.clone());
                }
            }
        }
        for t in trash {
            publish::remove_trash(&t)?;
        }
        Ok(report)
    }
}
