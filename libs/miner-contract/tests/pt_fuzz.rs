//! Structured fuzzing of the `.pt` reader and follower, run by `cargo test` (no nightly
//! toolchain needed): proptest builds pickles from the opcodes and argument values that have
//! hurt readers (deep nesting, memo/`DUP` amplification, views that overflow or exceed their
//! storage, forbidden globals, junk), wraps them in zip archives that may lie (sizes, offsets,
//! names, entry counts) and may be cut short, then checks that the reader and the follower never
//! panic, answer within a time bound, and give one-line errors without raw control characters.
//! The hand-made worst cases (1-3 MB, memory measured) are in `pt_hostile.rs`.

mod pt_support;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use miner_contract::pt::{FollowCheck, PtError, PtFollower, PtLayout, PtReader, TensorMeta};
use proptest::prelude::*;
use pt_support::hostile::{Pkl, ZipLies, rec, zip};

const TIME_LIMIT: Duration = Duration::from_secs(if cfg!(debug_assertions) { 6 } else { 2 });

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

/// Opcode snippets that build, nest, share, discard or break things.
const SNIPPETS: &[&[u8]] = &[
    b"]",
    b"}",
    b")",
    b"(",
    b"N",
    b"a",
    b"e",
    b"s",
    b"u",
    b"t",
    b"l",
    b"d",
    b"0",
    b"1",
    b"2",
    b"\x85",
    b"\x86",
    b"\x87",
    b"q\x00",
    b"h\x00",
    b"r\x01\x00\x00\x00",
    b"j\x01\x00\x00\x00",
    b"\x94",
    b"K\x07",
    b"\x88",
    b"\x89",
    b"R",
    b"b",
    b"Q",
    b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"ccollections\nOrderedDict\n",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch._utils\n_rebuild_parameter\n",
    b"ctorch\nHalfStorage\n",
    b"cos\nsystem\n",
    b"X\x07\x00\x00\x00storage",
    b"X\x03\x00\x00\x00cpu",
    b"X\x01\x00\x00\x000",
    b"X\x03\x00\x00\x00a\n\x1b",
    b"\x8c\x10model_state_dict",
    b"\x95\x00\x00\x00\x00\x00\x00\x00\x00",
    b"X\xff\xff\xff\xff",
    b"I01\n",
    b"g0\n",
    b"p5\n",
];

/// Interesting sizes, offsets and strides.
const NUMBERS: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    64,
    255,
    256,
    65_535,
    1 << 20,
    (1 << 31) - 1,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 62,
    u64::MAX >> 1,
];

#[derive(Debug, Clone)]
enum Block {
    Repeat(usize, usize),
    Tensor([usize; 6], usize),
    Bytes(Vec<u8>),
}

fn block() -> impl Strategy<Value = Block> {
    prop_oneof![
        4 => (0..SNIPPETS.len(), prop_oneof![1usize..4, 1usize..100, 1000usize..40_000])
            .prop_map(|(s, n)| Block::Repeat(s, n)),
        2 => (prop::array::uniform6(0..NUMBERS.len()), 0usize..4)
            .prop_map(|(n, dims)| Block::Tensor(n, dims)),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Block::Bytes),
    ]
}

fn pickle(blocks: &[Block], wrap: bool, stop: bool) -> Vec<u8> {
    let mut p = Pkl::new();
    if wrap {
        p.op(b'}').str("model_state_dict").op(b'}').str("w");
    }
    for b in blocks {
        match b {
            Block::Repeat(s, n) => {
                p.repeat(SNIPPETS[*s], *n);
            }
            Block::Tensor(n, dims) => {
                let x = |i: usize| NUMBERS[n[i]];
                let shape: Vec<u64> = (0..*dims).map(|d| x(2 + d % 2)).collect();
                let stride: Vec<u64> = (0..*dims).map(|d| x(4 + d % 2)).collect();
                p.tensor("0", x(0), x(1), &shape, &stride);
            }
            Block::Bytes(b) => {
                p.ops(b);
            }
        }
    }
    if wrap {
        p.ops(b"ss");
    }
    if stop { p.done() } else { p.0 }
}

#[derive(Debug, Clone)]
struct Archive {
    storage_len: usize,
    lie: u8,
    lie_value: u64,
    cut: Option<prop::sample::Index>,
    flips: Vec<(prop::sample::Index, u8)>,
}

fn archive() -> impl Strategy<Value = Archive> {
    (
        prop_oneof![Just(0usize), Just(8), 0usize..4096],
        0u8..8,
        prop::sample::select(NUMBERS.to_vec()),
        prop::option::weighted(0.3, any::<prop::sample::Index>()),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    )
        .prop_map(|(storage_len, lie, lie_value, cut, flips)| Archive {
            storage_len,
            lie,
            lie_value,
            cut,
            flips,
        })
}

fn build(pkl: Vec<u8>, a: &Archive) -> Vec<u8> {
    let recs = vec![
        rec("data.pkl", pkl),
        rec("data/0", vec![0x3c; a.storage_len]),
        rec("version", b"3\n".to_vec()),
    ];
    let v = a.lie_value;
    let lies = match a.lie {
        0 => ZipLies {
            size_of: Some(((v % 3) as usize, v)),
            ..Default::default()
        },
        1 => ZipLies {
            header_of: Some(((v % 3) as usize, ((v + 1) % 3) as usize)),
            ..Default::default()
        },
        2 => ZipLies {
            local_name: Some(((v % 3) as usize, "data/1".into())),
            ..Default::default()
        },
        3 => ZipLies {
            cd_size: Some(v as u32),
            ..Default::default()
        },
        4 => ZipLies {
            entries: Some(v as u16),
            ..Default::default()
        },
        _ => ZipLies::default(),
    };
    let mut bytes = zip("archive", &recs, &lies);
    for (at, val) in &a.flips {
        let i = at.index(bytes.len());
        bytes[i] = *val;
    }
    if let Some(c) = &a.cut {
        bytes.truncate(c.index(bytes.len()));
    }
    bytes
}

fn clean(e: &PtError, path: &Path) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(
        !msg.chars().any(char::is_control),
        "raw control character in {:?}",
        msg
    );
    prop_assert!(msg.contains(&path.display().to_string()), "{}", msg);
    Ok(())
}

fn run(bytes: &[u8], piece: usize) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model_expgroup_0.pt");
    std::fs::write(&path, bytes).unwrap();
    let t = Instant::now();
    let read = PtReader::open(&path).and_then(|r| r.model_hash().map(|h| (r, h)));
    prop_assert!(t.elapsed() < TIME_LIMIT, "reader took {:?}", t.elapsed());
    if let Err(e) = &read {
        clean(e, &path)?;
    }
    // The follower, fed as a download.
    let fpath = dir.path().join("following.pt");
    let mut out = std::fs::File::create(&fpath).unwrap();
    let t = Instant::now();
    let mut f = PtFollower::new(&fpath, Any).unwrap();
    let mut w = 0u64;
    let mut refused = None;
    for c in bytes.chunks(piece) {
        out.write_all(c).unwrap();
        w += c.len() as u64;
        if let Err(e) = f.advance(w) {
            refused = Some(e);
            break;
        }
    }
    let followed = match refused {
        Some(e) => Err(e),
        None => f.finish(w),
    };
    prop_assert!(t.elapsed() < TIME_LIMIT, "follower took {:?}", t.elapsed());
    match (&read, &followed) {
        (Ok((_, h)), Ok(done)) => prop_assert_eq!(*h, done.hash),
        (Err(_), Ok(done)) => prop_assert!(
            false,
            "follower accepted what the reader refused: {:?}",
            done
        ),
        (Ok(_), Err(e)) => prop_assert!(false, "follower refused what the reader accepted: {}", e),
        (Err(_), Err(e)) => clean(e, &fpath)?,
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1200, ..ProptestConfig::default() })]

    /// Random pickles from hostile building blocks, in honest or lying archives.
    #[test]
    fn generated_pickles_and_archives_never_hurt_the_reader_or_follower(
        blocks in prop::collection::vec(block(), 0..12),
        wrap in any::<bool>(),
        stop in prop::bool::weighted(0.9),
        a in archive(),
        piece in prop_oneof![Just(1usize << 16), 1usize..5000],
    ) {
        let bytes = build(pickle(&blocks, wrap, stop), &a);
        run(&bytes, piece)?;
    }

    /// Well-formed one-tensor checkpoints with random view geometry: accepted exactly when the
    /// view fits its storage (and then hashed the same by reader and follower).
    #[test]
    fn random_views_are_accepted_only_when_they_fit(
        n in prop::array::uniform6(0..NUMBERS.len()),
        dims in 0usize..4,
        storage_len in prop_oneof![Just(0usize), Just(8), Just(4096)],
        piece in 1usize..3000,
    ) {
        let blocks = [Block::Tensor(n, dims)];
        let a = Archive { storage_len, lie: 7, lie_value: 0, cut: None, flips: vec![] };
        let bytes = build(pickle(&blocks, true, true), &a);
        run(&bytes, piece)?;
        // The model of what fits: the record holds the storage, the view lies inside it, no
        // expanded (stride 0) dimension, no more elements than the storage.
        let x = |i: usize| u128::from(NUMBERS[n[i]]);
        let (numel_s, offset) = (x(0), x(1));
        let shape: Vec<u128> = (0..dims).map(|d| x(2 + d % 2)).collect();
        let stride: Vec<u128> = (0..dims).map(|d| x(4 + d % 2)).collect();
        let numel = shape.iter().fold(1u128, |a, &d| a.saturating_mul(d));
        let last = shape
            .iter()
            .zip(&stride)
            .fold(offset, |a, (&d, &s)| a.saturating_add(d.saturating_sub(1).saturating_mul(s)));
        let record_ok = numel_s * 2 == storage_len as u128;
        let view_ok = offset <= numel_s && numel == 0
            || (numel <= numel_s
                && last < numel_s
                && !shape.iter().zip(&stride).any(|(&d, &s)| d > 1 && s == 0));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.pt");
        std::fs::write(&path, &bytes).unwrap();
        let r = PtReader::open(&path);
        prop_assert_eq!(r.is_ok(), record_ok && view_ok, "{:?}", r.err().map(|e| e.to_string()));
    }
}
