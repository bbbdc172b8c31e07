//! Writes the hostile `.pt` corpus (`tests/pt_support/hostile.rs`) to a directory, one file
//! per attack, so the CLI can be measured on each:
//!
//! ```text
//! cargo run -p miner-contract --example hostile_pt -- /tmp/hostile
//! for f in /tmp/hostile/*.pt; do /usr/bin/time -f "%e s %M KiB" minerctl checkpoint hash "$f"; echo "exit $?"; done
//! ```
//!
//! With `--check`, also opens each file with the reader here and prints the one-line error,
//! the time taken and the process's peak memory so far.

#[path = "../tests/pt_support/hostile.rs"]
mod hostile;

use std::path::PathBuf;
use std::time::Instant;

fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let check = args.iter().any(|a| a == "--check");
    let Some(dir) = args.iter().find(|a| !a.starts_with("--")) else {
        return Err("usage: hostile_pt [--check] DIR".into());
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir)?;
    for h in hostile::corpus() {
        let path = dir.join(format!("{}.pt", h.name));
        std::fs::write(&path, &h.bytes)?;
        if check {
            let t = Instant::now();
            let r = miner_contract::hash::hash_pt_file(&path);
            let took = t.elapsed();
            let msg = match r {
                Ok(hash) => format!("ACCEPTED {hash}"),
                Err(e) => e.to_string(),
            };
            println!(
                "{:>9} bytes {:>7.3} s peak {:>7} KiB  {msg}",
                h.bytes.len(),
                took.as_secs_f64(),
                peak_kib()
            );
        } else {
            println!("{}", path.display());
        }
    }
    Ok(())
}
