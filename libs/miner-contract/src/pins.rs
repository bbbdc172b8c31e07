//! Pins: leases that keep a checkpoint directory alive while another process uses it
//! (chainsync hashing, signing and uploading the checkpoint it committed, spec §11.2 item 1).
//!
//! A pin is a file `<run>/.pins/<checkpoint>.<holder>.<pid>.<nonce>.json` holding a
//! [`PinRecord`], created atomically (temp + fsync + rename) under an exclusive `flock` on
//! `<run>/.pins/.lock`. Retention takes the same lock while it decides and renames its victims
//! away, so a checkpoint is either pinned before retention looks, or gone before the pin is
//! taken (and [`RunDir::pin`] then fails) — never deleted under a fresh pin.
//!
//! **Invariant:** a pin counts only while its holder process is alive (`kill(pid, 0)` plus the
//! process start time from `/proc`, so a reused pid does not keep a dead holder's pin) and its
//! expiry has not passed. Dead or expired pins are reclaimed by anyone.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::layout::{CheckpointKind, CheckpointName, EntryState, RunDir};

/// Subdirectory of the run directory holding pin files.
pub const PINS_DIR: &str = ".pins";
const LOCK_FILE: &str = ".lock";

/// The contents of a pin file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// Directory name of the pinned checkpoint.
    pub checkpoint: String,
    pub kind: CheckpointKind,
    /// Who holds it (e.g. `chainsync-commit`).
    pub holder: String,
    pub pid: u32,
    /// The holder's start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    #[serde(default)]
    pub start_time: Option<u64>,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
}

impl PinRecord {
    /// Whether the pin still protects its checkpoint at `now_unix_ms`.
    pub fn is_live(&self, now_unix_ms: u64) -> bool {
        now_unix_ms < self.expires_unix_ms
            && ProcessIdentity {
                pid: self.pid,
                start_time: self.start_time,
            }
            .is_alive()
    }
}

/// Errors taking, renewing or reading pins.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("pin {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot pin checkpoint {checkpoint}: {reason}")]
    NotPinnable { checkpoint: String, reason: String },
    #[error("invalid pin holder name {0:?}: use 1-64 letters, digits, '-' or '_'")]
    BadHolder(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A process, identified by pid and (on Linux) its start time so pid reuse is detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub start_time: Option<u64>,
}

impl ProcessIdentity {
    /// This process.
    pub fn current() -> ProcessIdentity {
        static CURRENT: OnceLock<ProcessIdentity> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            let pid = std::process::id();
            ProcessIdentity {
                pid,
                start_time: proc_stat(pid).map(|s| s.start_time),
            }
        })
    }

    /// Another process by pid (with its start time when `/proc` has it).
    pub fn of(pid: u32) -> ProcessIdentity {
        ProcessIdentity {
            pid,
            start_time: proc_stat(pid).map(|s| s.start_time),
        }
    }

    /// Whether this process still runs: `kill(pid, 0)` succeeds (or is refused with EPERM), it is
    /// not a zombie, and its start time (when known) is unchanged.
    pub fn is_alive(&self) -> bool {
        let Some(pid) = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return false;
        };
        match rustix::process::test_kill_process(pid) {
            Ok(()) | Err(rustix::io::Errno::PERM) => {}
            Err(_) => return false,
        }
        match proc_stat(self.pid) {
            Some(stat) => {
                !matches!(stat.state, 'Z' | 'X')
                    && self.start_time.is_none_or(|t| t == stat.start_time)
            }
            // No /proc entry: trust kill(2) (non-Linux, or /proc not mounted).
            None => !Path::new("/proc/self/stat").exists(),
        }
    }

    /// `<pid>-<start_time>` (start time 0 when unknown), used in temporary directory names.
    pub(crate) fn tag(&self) -> String {
        format!("{}-{}", self.pid, self.start_time.unwrap_or(0))
    }

    pub(crate) fn parse_tag(tag: &str) -> Option<ProcessIdentity> {
        let (pid, start) = tag.split_once('-')?;
        let start: u64 = start.parse().ok()?;
        Some(ProcessIdentity {
            pid: pid.parse().ok()?,
            start_time: (start != 0).then_some(start),
        })
    }
}

struct ProcStat {
    state: char,
    start_time: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and ')'; fields after the last ')' are fixed.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 is `state`; `starttime` is field 22, i.e. 19 fields later.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

/// An exclusive `flock` on `<run>/.pins/.lock`, released on drop.
pub(crate) struct PinsLock {
    _file: File,
}

pub(crate) fn lock_pins(pins_dir: &Path) -> Result<PinsLock, PinError> {
    std::fs::create_dir_all(pins_dir).map_err(io_err(pins_dir))?;
    let path = pins_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
        PinError::Io {
            path: path.clone(),
            source: e.into(),
        }
    })?;
    Ok(PinsLock { _file: file })
}

/// Every pin file in `pins_dir` (live or not) with its path; `None` for an unparseable pin file
/// or a temporary left by a dead writer.
fn read_all_pins(pins_dir: &Path) -> Result<Vec<(PathBuf, Option<PinRecord>)>, PinError> {
    let rd = match std::fs::read_dir(pins_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(pins_dir)(e)),
    };
    let mut out = Vec::new();
    for dent in rd {
        let dent = dent.map_err(io_err(pins_dir))?;
        let name = dent.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = dent.path();
        if let Some(rest) = name.strip_prefix(".tmp-") {
            // A pin being written; left behind only if its writer died mid-write.
            let owner = rest
                .rsplit_once('-')
                .and_then(|(tag, _)| ProcessIdentity::parse_tag(tag));
            if !owner.is_some_and(|o| o.is_alive()) {
                out.push((path, None));
            }
            continue;
        }
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let record = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<PinRecord>(&bytes).ok(),
            // Released between readdir and read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path)(e)),
        };
        out.push((path, record));
    }
    Ok(out)
}

/// The pins in `pins_dir` that still protect their checkpoint.
pub fn read_live_pins(pins_dir: &Path) -> Result<Vec<PinRecord>, PinError> {
    let now = now_unix_ms();
    Ok(read_all_pins(pins_dir)?
        .into_iter()
        .filter_map(|(_, r)| r)
        .filter(|r| r.is_live(now))
        .collect())
}

/// Removes pins whose holder died or whose expiry passed (and unparseable pin files);
/// returns the reclaimed records.
pub fn reclaim_stale_pins(pins_dir: &Path) -> Result<Vec<PinRecord>, PinError> {
    let now = now_unix_ms();
    let mut reclaimed = Vec::new();
    for (path, record) in read_all_pins(pins_dir)? {
        if record.as_ref().is_some_and(|r| r.is_live(now)) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        if let Some(r) = record {
            tracing::info!(checkpoint = %r.checkpoint, holder = %r.holder, pid = r.pid, "reclaimed stale pin");
            reclaimed.push(r);
        }
    }
    Ok(reclaimed)
}

fn valid_holder(holder: &str) -> bool {
    (1..=64).contains(&holder.len())
        && holder
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Writes `record` to `path` atomically (temp + fsync + rename + fsync dir).
fn write_pin_file(pins_dir: &Path, path: &Path, record: &PinRecord) -> Result<(), PinError> {
    let tmp = pins_dir.join(format!(
        ".tmp-{}-{:016x}",
        ProcessIdentity::current().tag(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(record).map_err(io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(pins_dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// A held pin; dropping it releases the pin.
#[derive(Debug)]
pub struct PinGuard {
    path: PathBuf,
    pins_dir: PathBuf,
    record: PinRecord,
    run: RunDir,
}

impl PinGuard {
    pub fn record(&self) -> &PinRecord {
        &self.record
    }

    /// The pin file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Extends the expiry to `ttl` from now (for long uploads). Fails with
    /// [`PinError::NotPinnable`] if the pin had lapsed and the checkpoint was deleted meanwhile.
    pub fn renew(&mut self, ttl: Duration) -> Result<(), PinError> {
        let _lock = lock_pins(&self.pins_dir)?;
        let name = CheckpointName::parse(&self.record.checkpoint);
        let present = match &name {
            Some(n) => self
                .run
                .entry(n)
                .map_err(|e| PinError::NotPinnable {
                    checkpoint: self.record.checkpoint.clone(),
                    reason: e.to_string(),
                })?
                .is_some_and(|e| e.state == EntryState::Verified),
            None => false,
        };
        if !present {
            return Err(PinError::NotPinnable {
                checkpoint: self.record.checkpoint.clone(),
                reason: "it was deleted while the pin had lapsed".into(),
            });
        }
        let mut record = self.record.clone();
        record.expires_unix_ms = now_unix_ms().saturating_add(duration_ms(ttl));
        write_pin_file(&self.pins_dir, &self.path, &record)?;
        self.record = record;
        Ok(())
    }

    /// Releases the pin now, reporting a failure to remove the file.
    pub fn release(self) -> Result<(), PinError> {
        let result = match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&self.path)(e)),
        };
        std::mem::forget(self);
        result
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "release pin"),
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RunDir {
    /// Pins a published, verified checkpoint for `ttl` on behalf of `holder` (this process).
    /// Fails with [`PinError::NotPinnable`] if the checkpoint is gone or incomplete.
    pub fn pin(
        &self,
        name: &CheckpointName,
        holder: &str,
        ttl: Duration,
    ) -> Result<PinGuard, PinError> {
        if !valid_holder(holder) {
            return Err(PinError::BadHolder(holder.to_string()));
        }
        let pins_dir = self.pins_dir();
        let _lock = lock_pins(&pins_dir)?;
        let not_pinnable = |reason: String| PinError::NotPinnable {
            checkpoint: name.dir_name(),
            reason,
        };
        match self.entry(name) {
            Ok(Some(e)) => {
                if let EntryState::Incomplete(reason) = e.state {
                    return Err(not_pinnable(format!("incomplete: {reason}")));
                }
            }
            Ok(None) => return Err(not_pinnable("it does not exist".into())),
            Err(e) => return Err(not_pinnable(e.to_string())),
        }
        let me = ProcessIdentity::current();
        let now = now_unix_ms();
        let record = PinRecord {
            checkpoint: name.dir_name(),
            kind: name.kind(),
            holder: holder.to_string(),
            pid: me.pid,
            start_time: me.start_time,
            created_unix_ms: now,
            expires_unix_ms: now.saturating_add(duration_ms(ttl)),
        };
        let path = pins_dir.join(format!(
            "{}.{}.{}.{:016x}.json",
            record.checkpoint,
            holder,
            me.pid,
            rand::random::<u64>()
        ));
        write_pin_file(&pins_dir, &path, &record)?;
        Ok(PinGuard {
            path,
            pins_dir,
            record,
            run: self.clone(),
        })
    }

    /// The live pins of this run directory.
    pub fn pins(&self) -> Result<Vec<PinRecord>, PinError> {
        read_live_pins(&self.pins_dir())
    }

    /// Removes pins of dead holders and expired pins.
    pub fn reclaim_stale_pins(&self) -> Result<Vec<PinRecord>, PinError> {
        let pins_dir = self.pins_dir();
        let _lock = lock_pins(&pins_dir)?;
        reclaim_stale_pins(&pins_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive_and_identity_round_trips() {
        let me = ProcessIdentity::current();
        assert!(me.is_alive());
        assert!(me.start_time.is_some(), "Linux /proc gives a start time");
        assert_eq!(ProcessIdentity::parse_tag(&me.tag()), Some(me));
        // Same pid, different start time: a reused pid is not the same process.
        let reused = ProcessIdentity {
            pid: me.pid,
            start_time: me.start_time.map(|t| t + 1),
        };
        assert!(!reused.is_alive());
        assert!(
            !ProcessIdentity {
                pid: 0,
                start_time: None
            }
            .is_alive()
        );
    }

    #[test]
    fn holder_names() {
        assert!(valid_holder("chainsync-commit_1"));
        assert!(!valid_holder(""));
        assert!(!valid_holder("a.b"));
        assert!(!valid_holder("../x"));
    }
}
