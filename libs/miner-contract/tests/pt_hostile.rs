//! Hostile `.pt` files (what a lying validator or network could serve): the reader and the
//! follower refuse each one with a one-line, escaped error, quickly, in bounded memory, and
//! the follower refuses as soon as the offending bytes are in. The corpus is
//! `pt_support/hostile.rs` (also written to disk by `examples/hostile_pt.rs`); files made by
//! real `torch.save` come from `tests/py/pt_helper.py` at test time.

mod pt_support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use miner_contract::hash::hash_pt_file;
use miner_contract::pt::{
    DType, Expected, FollowCheck, PtError, PtFollower, PtLayout, PtReader, PtWriteOptions, Tensor,
    TensorMeta, write_pt_tensors,
};
use pt_support::helper;
use pt_support::hostile::{self, Hostile};

/// Per file, reader or follower: 2 s in an optimized build; the unoptimized test build is
/// ~10x slower on the pickle loop, so it gets 6 s (the attacks it guards against took minutes
/// or aborted).
const TIME_LIMIT: Duration = Duration::from_secs(if cfg!(debug_assertions) { 6 } else { 2 });
/// Peak memory growth allowed while the reader and follower handle one 1-3 MB hostile file.
const MEMORY_LIMIT: u64 = 64 << 20;

/// Accepts everything (the file's own structure is under test).
struct Any;

impl FollowCheck for Any {
    type Error = PtError;
    fn entries(&mut self, _: PtLayout, _: &[TensorMeta]) -> Result<(), PtError> {
        Ok(())
    }
    fn data(&mut self, _: &TensorMeta, _: &[u8]) -> Result<(), PtError> {
        Ok(())
    }
}

/// The message is one line, names the file and carries no raw control characters.
fn assert_clean_message(e: &PtError, path: &Path, what: &str) {
    let msg = e.to_string();
    assert!(
        !msg.chars()
            .any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c)),
        "{what}: raw control characters in {msg:?}"
    );
    assert!(
        msg.contains(&path.display().to_string()),
        "{what}: message does not name the file: {msg}"
    );
}

/// Opens and hashes `path`: must fail, quickly, with a clean message.
fn reader_refuses(path: &Path, what: &str) -> PtError {
    let t = Instant::now();
    let r = PtReader::open(path).and_then(|r| r.model_hash());
    let took = t.elapsed();
    let e = match r {
        Ok(h) => panic!("{what}: the reader accepted it (hash {h})"),
        Err(e) => e,
    };
    assert!(took < TIME_LIMIT, "{what}: reader took {took:?}");
    assert_clean_message(&e, path, what);
    e
}

/// Feeds `bytes` to a follower in `piece`-byte steps as if downloaded. Returns the error and
/// how many bytes were written when it came (`None`: only `finish` refused).
fn follower_refuses(dir: &Path, bytes: &[u8], piece: usize, what: &str) -> (PtError, Option<u64>) {
    let path = dir.join(format!("follow_{what}.pt"));
    let mut out = std::fs::File::create(&path).unwrap();
    let t = Instant::now();
    let mut f = PtFollower::new(&path, Any).unwrap();
    let mut written = 0u64;
    let mut refused = None;
    for chunk in bytes.chunks(piece) {
        out.write_all(chunk).unwrap();
        written += chunk.len() as u64;
        if let Err(e) = f.advance(written) {
            refused = Some((e, Some(written)));
            break;
        }
    }
    let (e, at) = match refused {
        Some(r) => r,
        None => match f.finish(written) {
            Ok(done) => panic!("{what}: the follower accepted it ({done:?})"),
            Err(e) => (e, None),
        },
    };
    let took = t.elapsed();
    assert!(took < TIME_LIMIT, "{what}: follower took {took:?}");
    assert_clean_message(&e, &path, what);
    (e, at)
}

fn write_corpus(dir: &Path) -> Vec<(Hostile, PathBuf)> {
    hostile::corpus()
        .into_iter()
        .map(|h| {
            let p = dir.join(format!("{}.pt", h.name));
            std::fs::write(&p, &h.bytes).unwrap();
            (h, p)
        })
        .collect()
}

#[test]
fn every_hostile_file_is_refused_quickly_by_reader_and_follower() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    assert!(corpus.len() >= 30, "{}", corpus.len());
    for (h, p) in &corpus {
        let e = reader_refuses(p, h.name);
        let (fe, _) = follower_refuses(dir.path(), &h.bytes, 64 << 10, h.name);
        // What each kind is refused for.
        let kind = |e: &PtError| match e {
            PtError::BadPickle { .. } => "pickle",
            PtError::OutOfBounds { .. } => "view",
            PtError::CorruptZip { .. } | PtError::Truncated { .. } | PtError::NotZip { .. } => {
                "zip"
            }
            PtError::NotACheckpoint { .. } => "not a checkpoint",
            other => panic!("{}: unexpected {other}", h.name),
        };
        let want = match h.name {
            n if n.starts_with("deep_")
                || n.starts_with("memo_")
                || n.starts_with("marks_")
                || n.contains("dup")
                || n.contains("copies")
                || n.contains("pickle")
                || n.contains("unterminated") =>
            {
                &["pickle", "not a checkpoint"][..]
            }
            "many_views_of_one_storage" => &["not a checkpoint"][..],
            n if n.contains("view")
                || n.contains("overflow")
                || n.contains("than")
                || n.contains("escapes") =>
            {
                &["view"][..]
            }
            _ => &["zip"][..],
        };
        assert!(want.contains(&kind(&e)), "{}: reader: {e}", h.name);
        assert!(want.contains(&kind(&fe)), "{}: follower: {fe}", h.name);
    }
}

#[test]
fn escaped_names_reach_messages_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let (_, p) = corpus
        .iter()
        .find(|(h, _)| h.name == "name_with_terminal_escapes")
        .unwrap();
    let e = reader_refuses(p, "escapes");
    let PtError::OutOfBounds { name, .. } = &e else {
        panic!("{e}")
    };
    assert!(name.contains('\n'), "the field keeps the raw name");
    let msg = e.to_string();
    assert!(
        msg.contains(r"w\u{a}\u{1b}[31mFAKE LOG LINE\u{202e}"),
        "{msg}"
    );
}

#[test]
fn follower_stops_as_soon_as_the_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let piece = 4096;
    let by_name: BTreeMap<&str, Vec<u8>> = hostile::corpus()
        .into_iter()
        .map(|h| (h.name, h.bytes))
        .collect();
    // Garbage: refused with the first piece.
    let (e, at) = follower_refuses(dir.path(), &by_name["garbage"], piece, "garbage");
    assert!(matches!(e, PtError::NotZip { .. }), "{e}");
    assert_eq!(at, Some(piece as u64));
    // An unparsable pickle: refused once data.pkl is in, long before the file's end.
    let mut p = hostile::Pkl::new();
    p.ops(b"}q\x00(garbage");
    let mut storage = vec![hostile::rec("data.pkl", p.0.clone())];
    storage.push(hostile::rec("data/0", vec![0; 1 << 20]));
    let bad = hostile::zip("archive", &storage, &Default::default());
    let (e, at) = follower_refuses(dir.path(), &bad, piece, "bad_pickle");
    assert!(matches!(e, PtError::BadPickle { .. }), "{e}");
    assert_eq!(at, Some(piece as u64));
    // Valid data followed by junk: refused within the junk's first 100 KB.
    let junk = &by_name["junk_after_a_valid_file"];
    let (e, at) = follower_refuses(dir.path(), junk, piece, "junk");
    assert!(matches!(e, PtError::CorruptZip { .. }), "{e}");
    assert!(at.unwrap() < 100_000, "{at:?}");
    // Junk in place of a record's data descriptor: refused once it is in.
    let pkl = hostile::one_tensor_pickle("w", "0", 1 << 19, 0, &[1 << 19], &[1]);
    let data_pkl_len = 30 + "archive/data.pkl".len() + pkl.len() + 16;
    let recs = [
        hostile::rec("data.pkl", pkl),
        hostile::rec("data/0", vec![0x3c; 1 << 20]),
        hostile::rec("data/1", vec![0x3c; 1 << 20]),
    ];
    let mut bytes = hostile::zip("archive", &recs, &Default::default());
    let junk_at = data_pkl_len + 30 + "archive/data/0".len() + (1 << 20);
    bytes[junk_at..].iter_mut().for_each(|b| *b = 0x77);
    let (e, at) = follower_refuses(dir.path(), &bytes, piece, "junk_inside");
    assert!(matches!(e, PtError::CorruptZip { .. }), "{e}");
    assert!(
        at.unwrap() < (junk_at + 2 * piece) as u64,
        "{at:?} for junk at {junk_at}"
    );
}

use pt_support::Bytes;

#[test]
fn truncation_at_every_offset_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = BTreeMap::new();
    sd.insert("a".to_string(), Bytes::new(3).tensor(DType::F32, &[3, 5]));
    sd.insert("b".to_string(), Bytes::new(4).tensor(DType::BF16, &[7]));
    let good = dir.path().join("good.pt");
    write_pt_tensors(&good, &sd, &PtWriteOptions::default()).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    assert!(PtReader::open(&good).is_ok());
    for cut in 0..bytes.len() {
        let p = dir.path().join("cut.pt");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let what = format!("cut at {cut}");
        reader_refuses(&p, &what);
        follower_refuses(dir.path(), &bytes[..cut], 97, "cut");
    }
}

#[test]
fn torch_saved_expanded_views_are_refused_before_any_read() {
    let dir = tempfile::tempdir().unwrap();
    let bad = helper(&["bad", dir.path().to_str().unwrap()]);
    for k in ["expanded_small", "expanded_huge"] {
        let p = PathBuf::from(bad[k].as_str().unwrap());
        let size = std::fs::metadata(&p).unwrap().len();
        assert!(size < 4096, "{k}: {size} bytes");
        let e = reader_refuses(&p, k);
        assert!(matches!(e, PtError::OutOfBounds { .. }), "{k}: {e}");
        assert!(
            e.to_string().contains("stride 0") || e.to_string().contains("elements"),
            "{e}"
        );
        let (fe, at) = follower_refuses(dir.path(), &std::fs::read(&p).unwrap(), 256, k);
        assert!(matches!(fe, PtError::OutOfBounds { .. }), "{k}: {fe}");
        assert!(at.is_some(), "{k}: refused only at finish");
    }
}

#[test]
fn expected_tensors_are_checked_before_any_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = BTreeMap::new();
    sd.insert("a".to_string(), Bytes::new(5).tensor(DType::F16, &[4, 8]));
    sd.insert("b".to_string(), Bytes::new(6).tensor(DType::BF16, &[8]));
    let p = dir.path().join("m.pt");
    write_pt_tensors(&p, &sd, &PtWriteOptions::default()).unwrap();
    let ok = Expected::default()
        .with("a", &[DType::F16, DType::BF16], &[4, 8])
        .with("b", &[], &[8]);
    let ok = Expected {
        require_all: true,
        ..ok
    };
    assert_eq!(
        PtReader::open_expecting(&p, &ok).unwrap().entries().len(),
        2
    );
    let cases = [
        (
            Expected::default().with("a", &[DType::F16], &[4, 8]),
            "\"b\" is not expected",
        ),
        (
            ok.clone().with("a", &[DType::F32], &[4, 8]),
            "is torch.float16",
        ),
        (
            ok.clone().with("b", &[], &[9]),
            "has shape [8], expected [9]",
        ),
        (ok.clone().with("c", &[], &[1]), "\"c\" is missing"),
    ];
    for (exp, want) in cases {
        let e = PtReader::open_expecting(&p, &exp).unwrap_err();
        assert!(matches!(e, PtError::NotACheckpoint { .. }), "{e}");
        assert!(e.to_string().contains(want), "{e} lacks {want}");
        // The follower refuses with the tensor list, before the data.
        let bytes = std::fs::read(&p).unwrap();
        let fp = dir.path().join("f.pt");
        let mut out = std::fs::File::create(&fp).unwrap();
        let mut f = PtFollower::new(&fp, Any).unwrap().expecting(exp);
        out.write_all(&bytes[..1024]).unwrap();
        let e = f.advance(1024).unwrap_err();
        assert!(e.to_string().contains(want), "{e} lacks {want}");
    }
}

/// The 1-3 MB hostile files, each opened, hashed and followed in a child process whose peak
/// memory growth is measured (`VmHWM` after a reset, against `VmRSS` before).
#[test]
fn hostile_files_stay_within_memory() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let big: Vec<_> = corpus
        .iter()
        .filter(|(h, _)| h.bytes.len() >= 1 << 20)
        .collect();
    assert!(big.len() >= 10, "{}", big.len());
    let exe = std::env::current_exe().unwrap();
    let mut report = Vec::new();
    for ((h, p), mode) in big
        .iter()
        .flat_map(|hp| [(*hp, "reader"), (*hp, "follower")])
    {
        let out = std::process::Command::new(&exe)
            .args(["--exact", "memory_child", "--nocapture", "--test-threads=1"])
            .env("PT_HOSTILE_CHILD", p)
            .env("PT_HOSTILE_MODE", mode)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: child failed: {stdout}{}",
            h.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let growth: u64 = stdout
            .lines()
            .find_map(|l| l.split_once("PEAK_GROWTH ").map(|(_, v)| v))
            .unwrap_or_else(|| panic!("{}: no measurement in {stdout}", h.name))
            .trim()
            .parse()
            .unwrap();
        report.push(format!(
            "{} ({} bytes) {mode}: +{} KiB",
            h.name,
            h.bytes.len(),
            growth >> 10
        ));
        assert!(
            growth < MEMORY_LIMIT,
            "{}: peak grew by {growth} bytes",
            h.name
        );
    }
    eprintln!("{}", report.join("\n"));
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/self/status"))
}

/// Child side of [`hostile_files_stay_within_memory`] (a no-op unless `PT_HOSTILE_CHILD`
/// names a file): resets the peak, runs the reader and the hash (`PT_HOSTILE_MODE=reader`, as
/// `minerctl checkpoint hash` does) or the follower (as a download's verifier does) on the
/// file, prints the peak's growth.
#[test]
fn memory_child() {
    let Some(path) = std::env::var_os("PT_HOSTILE_CHILD") else {
        return;
    };
    let path = PathBuf::from(path);
    let bytes = std::fs::read(&path).unwrap();
    let copy = path.with_extension("following");
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let before = status_kib("VmRSS:");
    if std::env::var("PT_HOSTILE_MODE").as_deref() == Ok("reader") {
        assert!(hash_pt_file(&path).is_err(), "accepted");
        let peak = status_kib("VmHWM:");
        println!("PEAK_GROWTH {}", peak.saturating_sub(before) * 1024);
        return;
    }
    let mut out = std::fs::File::create(&copy).unwrap();
    let mut f = PtFollower::new(&copy, Any).unwrap();
    let mut w = 0;
    let mut refused = false;
    for c in bytes.chunks(64 << 10) {
        out.write_all(c).unwrap();
        w += c.len() as u64;
        if f.advance(w).is_err() {
            refused = true;
            break;
        }
    }
    if !refused {
        assert!(f.finish(w).is_err(), "follower accepted");
    }
    let peak = status_kib("VmHWM:");
    println!("PEAK_GROWTH {}", peak.saturating_sub(before) * 1024);
}

#[test]
fn valid_files_still_read_after_the_hardening() {
    // Shared storage within the view factor, a non-contiguous view, many tensors.
    let dir = tempfile::tempdir().unwrap();
    let mut sd = BTreeMap::new();
    for i in 0..2000 {
        sd.insert(
            format!("model.layers.{i}.w"),
            Bytes::new(i as u64).tensor(DType::BF16, &[3, 2]),
        );
    }
    let p = dir.path().join("many.pt");
    let h = write_pt_tensors(&p, &sd, &PtWriteOptions::default()).unwrap();
    assert_eq!(hash_pt_file(&p).unwrap(), h);
    let t: Tensor = PtReader::open(&p)
        .unwrap()
        .read("model.layers.7.w")
        .unwrap();
    assert_eq!(t, sd["model.layers.7.w"]);
}
