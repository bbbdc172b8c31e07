//! Job records: kept in memory and appended to `<run>/chainsync/jobs.jsonl` (one JSON object a
//! line, `O_APPEND` + fsync), so the history and the "already done this cycle" decisions survive
//! restarts. A record is appended on every state change; on reading, the last line of an id
//! wins and a torn last line (a crash mid-write) is ignored.
//!
//! **The journal never stops the daemon:** an append that fails part-way (a full disk) is cut
//! back to the length before it, so the file stays whole lines; a journal with lines that do
//! not parse (anywhere, or not UTF-8) is copied aside as `jobs.jsonl.corrupt-<unix time>` with a
//! warning and rewritten with the lines that do, instead of failing the start (which systemd
//! would restart in a loop).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Subdirectory of the run directory owned by chainsync.
pub const STATE_DIR: &str = "chainsync";
/// The job journal inside [`STATE_DIR`].
pub const JOBS_FILE: &str = "jobs.jsonl";
/// Jobs kept in memory (the newest; about 250 cycles of four jobs).
pub const MAX_KEPT: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobKind {
    Download,
    Commit1,
    Commit2,
    Submit,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Download => "DOWNLOAD",
            JobKind::Commit1 => "COMMIT1",
            JobKind::Commit2 => "COMMIT2",
            JobKind::Submit => "SUBMIT",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobOutcome {
    Running,
    Succeeded,
    Failed,
    /// Not started, or abandoned, because it could not finish inside its phase.
    Missed,
    /// Nothing to do.
    Skipped,
    Cancelled,
}

impl JobOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Running => "RUNNING",
            JobOutcome::Succeeded => "SUCCEEDED",
            JobOutcome::Failed => "FAILED",
            JobOutcome::Missed => "MISSED",
            JobOutcome::Skipped => "SKIPPED",
            JobOutcome::Cancelled => "CANCELLED",
        }
    }

    pub fn is_final(self) -> bool {
        self != JobOutcome::Running
    }
}

/// One job: what it did, where, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    pub kind: JobKind,
    /// Phase name the job belongs to.
    pub phase: String,
    pub cycle_index: u64,
    pub started_block: u64,
    /// 0 while running.
    pub finished_block: u64,
    #[serde(default)]
    pub model_hash: String,
    /// The checkpoint directory involved (path).
    #[serde(default)]
    pub checkpoint: String,
    /// Validator hotkey (download source or submission destination).
    #[serde(default)]
    pub destination: String,
    pub outcome: JobOutcome,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub included_block: Option<u64>,
    #[serde(default)]
    pub attempts: u32,
    pub started_unix: i64,
    #[serde(default)]
    pub finished_unix: i64,
    /// Global version of the checkpoint involved (commit/submit jobs; restart recovery).
    #[serde(default)]
    pub global_ver: Option<u64>,
    /// Started by a `LoadBaseline` request rather than by the scheduler.
    #[serde(default)]
    pub manual: bool,
    /// Hub transport: the repo the shard went to or came from (`owner/name`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hf_repo: String,
    /// Hub transport: the 7-character revision (`rv`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hf_revision: String,
    /// Bytes of the shard transferred so far, and its size (0: unknown).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_done: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_total: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("job journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("job journal {path} line {line}: {message}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Parses journal text: last record per id wins; an unparsable *last* line is a torn write and
/// is skipped; an unparsable line elsewhere is an error naming the line.
pub fn parse_journal(text: &str, path: &Path) -> Result<Vec<JobRecord>, JournalError> {
    let lines: Vec<&str> = text.split('\n').collect();
    let last_nonempty = lines.iter().rposition(|l| !l.trim().is_empty());
    let mut out: Vec<JobRecord> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<JobRecord>(line) {
            Ok(r) => match out.iter_mut().find(|o| o.id == r.id) {
                Some(o) => *o = r,
                None => out.push(r),
            },
            Err(e) => {
                let torn = Some(i) == last_nonempty && !text.ends_with('\n');
                if torn {
                    tracing::warn!(path = %path.display(), line = i + 1, "ignoring a torn last line of the job journal");
                    continue;
                }
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                });
            }
        }
    }
    out.sort_by_key(|r| r.id);
    Ok(out)
}

/// The in-memory job list backed by the journal file.
pub struct JobLog {
    path: PathBuf,
    inner: Mutex<Vec<JobRecord>>,
    write: Mutex<()>,
}

impl JobLog {
    /// Opens (creating the directory) and loads `<run>/chainsync/jobs.jsonl`. Unparsable lines
    /// are moved aside (see the module docs); only an unreadable file or directory is an error.
    pub fn open(run_dir: &Path) -> Result<JobLog, JournalError> {
        let dir = run_dir.join(STATE_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| JournalError::Io {
            path: dir.clone(),
            source,
        })?;
        remove_stale_rewrites(&dir);
        let path = dir.join(JOBS_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        let loaded = load_lenient(&bytes);
        if !loaded.bad_lines.is_empty() {
            set_aside(&path, &bytes, &loaded);
        } else if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            // A torn last line is cut off, so the next append starts a clean line.
            let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            if let Err(e) = truncate_to(&path, keep as u64) {
                tracing::warn!(path = %path.display(), error = %e, "could not cut the torn last line of the job journal");
            }
        }
        let mut records = loaded.records;
        // Jobs that were running when the process died never finished.
        let interrupted: Vec<JobRecord> = records
            .iter_mut()
            .filter(|r| r.outcome == JobOutcome::Running)
            .map(|r| {
                r.outcome = JobOutcome::Cancelled;
                r.error = "interrupted: the daemon stopped while the job ran".into();
                r.finished_unix = now_unix();
                r.clone()
            })
            .collect();
        let log = JobLog {
            path,
            inner: Mutex::new(records),
            write: Mutex::new(()),
        };
        for r in &interrupted {
            if let Err(e) = log.append(r) {
                tracing::error!(error = %e, "could not append to the job journal");
            }
        }
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, r: &JobRecord) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(r).map_err(|e| JournalError::Corrupt {
            path: self.path.clone(),
            line: 0,
            message: e.to_string(),
        })?;
        line.push(b'\n');
        let _g = self.write.lock().unwrap_or_else(|p| p.into_inner());
        append_bytes(&self.path, &line)
    }

    /// The next free id.
    pub fn next_id(&self) -> u64 {
        self.with(|v| v.iter().map(|r| r.id).max().unwrap_or(0) + 1)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Vec<JobRecord>) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Stores `r` (new or updated) in memory and appends it to the journal. A journal write
    /// failure is logged, never fatal for the job.
    pub fn put(&self, r: &JobRecord) {
        self.with(|v| match v.iter_mut().find(|o| o.id == r.id) {
            Some(o) => *o = r.clone(),
            None => v.push(r.clone()),
        });
        if let Err(e) = self.append(r) {
            tracing::error!(error = %e, "could not append to the job journal");
        }
    }

    /// Updates a running record in memory only (transfer progress; not worth a journal line
    /// each time). Ignored once the record is final.
    pub fn show(&self, r: &JobRecord) {
        self.with(|v| {
            if let Some(o) = v.iter_mut().find(|o| o.id == r.id)
                && !o.outcome.is_final()
            {
                *o = r.clone();
            }
        });
    }

    /// Allocates an id and records a new running job.
    pub fn start(
        &self,
        kind: JobKind,
        phase: &str,
        cycle_index: u64,
        block: u64,
        manual: bool,
    ) -> JobRecord {
        let r = self.with(|v| {
            let id = v.iter().map(|r| r.id).max().unwrap_or(0) + 1;
            let r = JobRecord {
                id,
                kind,
                phase: phase.to_owned(),
                cycle_index,
                started_block: block,
                finished_block: 0,
                model_hash: String::new(),
                checkpoint: String::new(),
                destination: String::new(),
                outcome: JobOutcome::Running,
                error: String::new(),
                included_block: None,
                attempts: 0,
                started_unix: now_unix(),
                finished_unix: 0,
                global_ver: None,
                manual,
                hf_repo: String::new(),
                hf_revision: String::new(),
                bytes_done: 0,
                bytes_total: 0,
            };
            v.push(r.clone());
            if v.len() > MAX_KEPT {
                let extra = v.len() - MAX_KEPT;
                v.drain(..extra);
            }
            r
        });
        if let Err(e) = self.append(&r) {
            tracing::error!(error = %e, "could not append to the job journal");
        }
        r
    }

    /// All jobs, newest first; at most `limit` (0 = all).
    pub fn newest_first(&self, limit: usize) -> Vec<JobRecord> {
        let mut v = self.with(|v| v.clone());
        v.sort_by_key(|r| std::cmp::Reverse(r.id));
        if limit > 0 {
            v.truncate(limit);
        }
        v
    }

    /// The latest job of `kind` in `cycle` started by the scheduler (not a manual LoadBaseline).
    pub fn find(&self, kind: JobKind, cycle: u64) -> Option<JobRecord> {
        self.with(|v| {
            v.iter()
                .rev()
                .find(|r| r.kind == kind && r.cycle_index == cycle && !r.manual)
                .cloned()
        })
    }

    pub fn get(&self, id: u64) -> Option<JobRecord> {
        self.with(|v| v.iter().find(|r| r.id == id).cloned())
    }
}

/// Appends `bytes` and fsyncs. On failure (ENOSPC, EDQUOT, EIO) the file is cut back to its
/// length before the append, so a partial line never stays behind.
fn append_bytes(path: &Path, bytes: &[u8]) -> Result<(), JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    let before = f.metadata().map_err(io)?.len();
    let written = f.write_all(bytes).and_then(|_| f.sync_data());
    if let Err(e) = written {
        if let Err(cut) = f.set_len(before).and_then(|_| f.sync_data()) {
            tracing::warn!(path = %path.display(), error = %cut, "could not cut a failed append back");
        }
        return Err(io(e));
    }
    Ok(())
}

fn truncate_to(path: &Path, len: u64) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_data()
}

/// What [`load_lenient`] found.
struct Loaded {
    records: Vec<JobRecord>,
    /// 1-based numbers of the lines that do not parse (a torn last line not counted).
    bad_lines: Vec<usize>,
    /// The lines that parse, in order, each with its newline.
    good: Vec<u8>,
}

/// Parses journal bytes line by line: last record per id wins; an unparsable last line without
/// a newline is a torn write (dropped silently); other unparsable lines are collected.
fn load_lenient(bytes: &[u8]) -> Loaded {
    let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    let last = lines.iter().rposition(|l| !l.trim_ascii().is_empty());
    let mut out = Loaded {
        records: Vec::new(),
        bad_lines: Vec::new(),
        good: Vec::new(),
    };
    for (i, line) in lines.iter().enumerate() {
        if line.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice::<JobRecord>(line) {
            Ok(r) => {
                out.good.extend_from_slice(line);
                out.good.push(b'\n');
                match out.records.iter_mut().find(|o| o.id == r.id) {
                    Some(o) => *o = r,
                    None => out.records.push(r),
                }
            }
            Err(_) if Some(i) == last && !bytes.ends_with(b"\n") => {
                tracing::warn!(line = i + 1, "ignoring a torn last line of the job journal");
            }
            Err(_) => out.bad_lines.push(i + 1),
        }
    }
    out.records.sort_by_key(|r| r.id);
    if out.records.len() > MAX_KEPT {
        let extra = out.records.len() - MAX_KEPT;
        out.records.drain(..extra);
    }
    out
}

/// Copies the journal aside as `jobs.jsonl.corrupt-<unix time>` and replaces it (atomically)
/// with its parsable lines. Failures are logged: the daemon runs on the records in memory.
fn set_aside(path: &Path, bytes: &[u8], loaded: &Loaded) {
    let aside = path.with_file_name(format!("{JOBS_FILE}.corrupt-{}", now_unix()));
    let tmp = path.with_file_name(format!(".{JOBS_FILE}.rewrite-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        write_synced(&aside, bytes)?;
        write_synced(&tmp, &loaded.good)?;
        std::fs::rename(&tmp, path)?;
        if let Some(d) = path.parent() {
            std::fs::File::open(d)?.sync_all()?;
        }
        Ok(())
    })();
    let shown: Vec<String> = loaded
        .bad_lines
        .iter()
        .take(10)
        .map(|n| n.to_string())
        .collect();
    match result {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            lines = %shown.join(","),
            bad = loaded.bad_lines.len(),
            kept = loaded.records.len(),
            copy = %aside.display(),
            "the job journal had lines that do not parse; the whole file was copied aside and the journal keeps the others"
        ),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(
                path = %path.display(),
                lines = %shown.join(","),
                error = %e,
                "the job journal has lines that do not parse and could not be rewritten; going on with the others"
            );
        }
    }
}

/// Removes `.jobs.jsonl.rewrite-<pid>` files of processes that died mid-rewrite.
fn remove_stale_rewrites(dir: &Path) {
    let prefix = format!(".{JOBS_FILE}.rewrite-");
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !miner_service::pid_alive(pid)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_record_per_id_wins_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let log = JobLog::open(dir.path()).unwrap();
        let mut r = log.start(JobKind::Commit1, "MinerCommit1", 7, 100, false);
        r.outcome = JobOutcome::Succeeded;
        r.included_block = Some(102);
        log.put(&r);
        let r2 = log.start(JobKind::Download, "Distribute", 8, 150, false);
        // A crash mid-append leaves half a line.
        append_bytes(log.path(), br#"{"id":3,"kind":"SUB"#).unwrap();
        drop(log);

        let log = JobLog::open(dir.path()).unwrap();
        let jobs = log.newest_first(0);
        assert_eq!(jobs.len(), 2, "{jobs:?}");
        assert_eq!(jobs[1].outcome, JobOutcome::Succeeded);
        assert_eq!(jobs[1].included_block, Some(102));
        // The running download was interrupted by the "crash".
        assert_eq!(jobs[0].id, r2.id);
        assert_eq!(jobs[0].outcome, JobOutcome::Cancelled);
        // Appending after the torn line still yields a readable journal.
        let r3 = log.start(JobKind::Submit, "Submission", 8, 160, false);
        drop(log);
        let log = JobLog::open(dir.path()).unwrap();
        assert!(log.get(r3.id).is_some());
        assert_eq!(log.find(JobKind::Commit1, 7).map(|r| r.id), Some(r.id));
    }

    #[test]
    fn a_corrupt_line_is_set_aside_and_the_rest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = JobLog::open(dir.path()).unwrap();
        let mut a = log.start(JobKind::Commit1, "MinerCommit1", 7, 100, false);
        a.outcome = JobOutcome::Succeeded;
        log.put(&a);
        append_bytes(log.path(), b"{\"id\":2,\"kind\":\xff garbage\n").unwrap();
        let b = log.start(JobKind::Download, "Distribute", 8, 150, false);
        let path = log.path().to_path_buf();
        drop(log);
        let before = std::fs::read(&path).unwrap();

        let log = JobLog::open(dir.path()).expect("a corrupt line does not fail the start");
        let ids: Vec<u64> = log.newest_first(0).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![b.id, a.id]);
        let copies: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("jobs.jsonl.corrupt-")
            })
            .collect();
        assert_eq!(copies.len(), 1, "one copy set aside");
        assert_eq!(std::fs::read(copies[0].path()).unwrap(), before);
        // The journal itself is whole lines that parse now.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(parse_journal(&text, &path).is_ok(), "{text}");
        drop(log);
        let again = JobLog::open(dir.path()).unwrap();
        assert_eq!(again.newest_first(0).len(), 2);
    }

    #[test]
    fn a_corrupt_line_in_the_middle_is_an_error_naming_the_line() {
        let err = parse_journal("{}\n{\"id\":1}\n", Path::new("/x/jobs.jsonl")).unwrap_err();
        assert!(err.to_string().contains("/x/jobs.jsonl line 1"), "{err}");
    }
}
