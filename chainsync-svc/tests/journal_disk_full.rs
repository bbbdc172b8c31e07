//! The job journal (`chainsync/jobs.jsonl`) on a real full disk: a 64 KiB tmpfs. An append that
//! fails part-way (the line crosses into a page the full filesystem cannot give) is cut back,
//! so the file stays whole, parsable lines; the daemon's records go on in memory; once space is
//! back, appends work again and a restart reads everything without setting anything aside.
//!
//! Mounting needs root (CI runs as root); elsewhere the test says so loudly and returns, unless
//! `MINER_REQUIRE_TMPFS` is set, which makes that a failure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use chainsync_svc::jobs::{JobKind, JobLog, JobOutcome, parse_journal};

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &Path, options: &str) -> Option<Mount> {
    std::fs::create_dir_all(at).unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(at)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(Mount(at.to_owned())),
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                Err(e) => e.to_string(),
            };
            assert!(
                std::env::var_os("MINER_REQUIRE_TMPFS").is_none(),
                "MINER_REQUIRE_TMPFS is set but mounting a tmpfs failed: {why}"
            );
            eprintln!("\n*** SKIPPED: cannot mount a tmpfs here ({why}); run as root (as CI does). ***\n");
            None
        }
    }
}

/// Fills the filesystem of `dir` with one file until the write fails.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = [0u8; 4096];
    loop {
        if f.write(&block).map(|n| n == 0).unwrap_or(true) {
            break;
        }
    }
    let _ = f.sync_all();
    p
}

#[test]
fn a_failed_append_on_a_full_disk_is_cut_back_and_the_journal_stays_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    let Some(_mount) = mount_tmpfs(&disk, "size=64k") else {
        return;
    };
    let run = disk.join("run");
    let log = JobLog::open(&run).expect("open");
    let journal = log.path().to_path_buf();
    // Grow the journal so it ends 96 bytes before a page boundary: the next line (about 300
    // bytes) starts in a page that exists and needs a new one.
    let mut r = log.start(JobKind::Commit1, "MinerCommit1", 1, 100, false);
    r.outcome = JobOutcome::Succeeded;
    log.put(&r);
    let len = std::fs::metadata(&journal).unwrap().len();
    let base = serde_json::to_vec(&r).unwrap().len() as u64 + 1;
    let mut want = (4000 + 4096 - len % 4096) % 4096;
    if want < base {
        want += 4096;
    }
    r.error = "x".repeat((want - base) as usize);
    log.put(&r);
    let len = std::fs::metadata(&journal).unwrap().len();
    assert_eq!(len % 4096, 4000, "set-up: journal of {len} bytes");

    let filler = fill(&disk);
    let before = std::fs::read(&journal).unwrap();
    let mut d = log.start(JobKind::Download, "Distribute", 2, 150, false);
    d.outcome = JobOutcome::Failed;
    d.error = "validator 10.0.0.1:8000: HTTP 503".into();
    log.put(&d);
    let after = std::fs::read(&journal).unwrap();
    assert_eq!(
        after.len(),
        before.len(),
        "a failed append must be cut back (no partial line on a full disk)"
    );
    assert_eq!(after, before);
    // The records are still there in memory.
    assert_eq!(log.get(d.id).map(|j| j.outcome), Some(JobOutcome::Failed));

    // Space again: appends work and a restart reads every record, nothing set aside.
    std::fs::remove_file(&filler).unwrap();
    log.put(&d);
    drop(log);
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(parse_journal(&text, &journal).is_ok());
    let log = JobLog::open(&run).expect("reopen");
    assert_eq!(log.get(d.id).map(|j| j.outcome), Some(JobOutcome::Failed));
    assert_eq!(log.get(r.id).map(|j| j.error.len()), Some(r.error.len()));
    let aside: Vec<_> = std::fs::read_dir(journal.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .collect();
    assert!(aside.is_empty(), "nothing to set aside: {aside:?}");
}
