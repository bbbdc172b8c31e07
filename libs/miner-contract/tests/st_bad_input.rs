//! Hostile `.safetensors` files: every bad header, offset, dtype, length and name gets a clear
//! one-line error (untrusted text escaped) from the reader, the download follower and the shard
//! layer alike, and nothing panics or allocates what a header merely claims. A property test
//! mutates valid files at random; whatever our reader accepts, Hugging Face's own `safetensors`
//! crate accepts too, with the same tensors.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use miner_contract::hash::hash_state_dict;
use miner_contract::pt::{DType, Followed, Tensor, TensorMeta};
use miner_contract::shard::{ShardCheck, ShardError, ShardFollower, ShardLayout, ShardReader};
use miner_contract::st::{MAX_HEADER, StError, StReader, write_safetensors_tensors};
use proptest::prelude::*;

/// A file from a header (unpadded) and data.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// Records what it is shown; never refuses.
#[derive(Default)]
struct Seen {
    entries: Vec<String>,
    bytes: u64,
}

impl ShardCheck for Seen {
    type Error = ShardError;
    fn entries(&mut self, _l: ShardLayout, e: &[TensorMeta]) -> Result<(), ShardError> {
        self.entries = e.iter().map(|m| m.name.clone()).collect();
        Ok(())
    }
    fn data(&mut self, m: &TensorMeta, b: &[u8]) -> Result<(), ShardError> {
        assert_eq!(b.len() % m.dtype.elem_size(), 0, "whole elements");
        self.bytes += b.len() as u64;
        Ok(())
    }
}

/// Writes `bytes` to `dst` in `piece`-byte steps, following it; the follower's first error (or
/// its result).
fn follow(dst: &Path, bytes: &[u8], piece: usize) -> Result<Followed, ShardError> {
    let mut out = std::fs::File::create(dst).unwrap();
    let mut f = ShardFollower::new(dst, Seen::default())?;
    let mut written = 0u64;
    for chunk in bytes.chunks(piece.max(1)) {
        out.write_all(chunk).unwrap();
        written += chunk.len() as u64;
        f.advance(written)?;
    }
    f.finish(written)
}

fn assert_one_line(e: &dyn std::fmt::Display, path: &Path, what: &str) -> String {
    let msg = e.to_string();
    assert!(
        !msg.contains('\n') && !msg.contains('\r'),
        "{what}: not one line: {msg:?}"
    );
    assert!(
        !msg.chars().any(|c| c.is_control()),
        "{what}: control chars: {msg:?}"
    );
    assert!(
        msg.contains(&path.display().to_string()),
        "{what}: names no file: {msg}"
    );
    msg
}

/// The reader, the shard layer and the follower (at two piece sizes) all refuse `bytes` with a
/// one-line message containing `want`.
fn refused(dir: &Path, what: &str, bytes: &[u8], want: &str) {
    let path = dir.join("bad.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let e = StReader::open(&path).expect_err(what);
    let msg = assert_one_line(&e, &path, what);
    assert!(msg.contains(want), "{what}: {msg:?} lacks {want:?}");
    let e = ShardReader::open(&path).expect_err(what);
    assert_eq!(e.to_string(), msg, "{what}: shard layer");
    for piece in [3, 4096] {
        let dst = dir.join("follow.safetensors");
        let e = follow(&dst, bytes, piece).expect_err(what);
        let msg = assert_one_line(&e, &dst, what);
        assert!(
            msg.contains(want),
            "{what} (follower, {piece}): {msg:?} lacks {want:?}"
        );
    }
}

#[test]
fn bad_headers_offsets_dtypes_and_lengths_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#;
    assert!(
        StReader::open(&{
            let p = d.join("ok.safetensors");
            std::fs::write(&p, file(ok, &[1, 2, 3, 4])).unwrap();
            p
        })
        .is_ok()
    );

    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    refused(d, "u64::MAX header", &huge, "exceeds the limit");
    let mut big = (100_000_000u64).to_le_bytes().to_vec();
    big.extend_from_slice(b"{\"a\":");
    refused(
        d,
        "100 MB header (the crate's limit)",
        &big,
        "exceeds the limit",
    );
    refused(d, "5 bytes", b"\x02\0\0\0\0", "truncated");
    refused(d, "header cut", &file(ok, &[1, 2, 3, 4])[..20], "truncated");
    refused(d, "not JSON", &file("{nope", &[]), "JSON");
    refused(d, "not an object", &file("[1,2]", &[]), "start with '{'");
    refused(d, "array inside", &file("{\"a\":[1]}", &[]), "JSON");
    refused(d, "no tensors", &file("{}", &[]), "holds no tensors");
    refused(
        d,
        "only metadata",
        &file(r#"{"__metadata__":{"a":"b"}}"#, &[]),
        "no tensors",
    );
    let mut non_utf8 = file(
        r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    non_utf8[10] = 0xff;
    refused(d, "non-UTF-8", &non_utf8, "UTF-8");
    refused(
        d,
        "junk after data",
        &file(ok, &[1, 2, 3, 4, 5]),
        "junk after the last tensor",
    );
    refused(d, "data cut", &file(ok, &[1, 2, 3]), "truncated");
    refused(
        d,
        "offset past the data",
        &file(
            r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}}"#,
            &[0; 8],
        ),
        "gap",
    );
    refused(
        d,
        "overlap",
        &file(
            r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}}"#,
            &[0; 6],
        ),
        "overlaps",
    );
    refused(
        d,
        "same range twice",
        &file(
            r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ),
        "overlaps",
    );
    refused(
        d,
        "size mismatch",
        &file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ),
        "does not hold the 8 bytes",
    );
    refused(
        d,
        "end before begin",
        &file(
            r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#,
            &[0; 4],
        ),
        "bad data offsets",
    );
    refused(
        d,
        "overflowing shape",
        &file(
            r#"{"a":{"dtype":"F16","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#,
            &[],
        ),
        "overflows",
    );
    refused(
        d,
        "shape beyond u64",
        &file(
            r#"{"a":{"dtype":"F16","shape":[18446744073709551616],"data_offsets":[0,0]}}"#,
            &[],
        ),
        "JSON",
    );
    refused(
        d,
        "negative offset",
        &file(
            r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[-1,3]}}"#,
            &[0; 4],
        ),
        "JSON",
    );
    for dtype in ["F8_E4M3", "U32", "C64", "U16", "f16"] {
        let h = format!(r#"{{"a":{{"dtype":"{dtype}","shape":[1],"data_offsets":[0,1]}}}}"#);
        refused(d, dtype, &file(&h, &[0]), "unsupported dtype");
    }
    refused(
        d,
        "unknown field",
        &file(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}"#,
            &[0],
        ),
        "unknown field",
    );
    refused(
        d,
        "duplicate name",
        &file(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            &[0; 2],
        ),
        "appears twice",
    );
    refused(
        d,
        "metadata not a string map",
        &file(
            r#"{"__metadata__":{"a":1},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            &[0],
        ),
        "JSON",
    );
    // Deep nesting: serde_json's recursion limit answers, no stack overflow.
    let deep = format!(
        r#"{{"__metadata__":{}{}, "a":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}}}"#,
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    refused(d, "deep nesting", &file(&deep, &[0]), "JSON");
    let deep_value = format!(r#"{{"a":{}}}"#, "{\"a\":".repeat(100_000));
    refused(d, "deep tensor value", &file(&deep_value, &[]), "JSON");
}

#[test]
fn hostile_names_are_escaped_and_unknown_metadata_is_tolerated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A name with a newline, a terminal escape and a quote, in a bad dtype error.
    let h = r#"{"evil\n\u001b[31mname\"":{"dtype":"X","shape":[1],"data_offsets":[0,1]}}"#;
    let path = d.join("n.safetensors");
    std::fs::write(&path, file(h, &[0])).unwrap();
    let msg = StReader::open(&path).unwrap_err().to_string();
    assert!(msg.contains(r#"evil\n\u{1b}[31mname\""#), "{msg}");
    assert_one_line(&msg, &path, "escaped name");

    // Unknown metadata keys: fine (Python's own files carry {"format": "pt"}).
    let h = r#"{"__metadata__":{"format":"pt","anything":"goes\n"},"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
    let path = d.join("m.safetensors");
    std::fs::write(&path, file(h, &[1, 2, 3, 4])).unwrap();
    let r = StReader::open(&path).unwrap();
    assert_eq!(r.metadata().unwrap()["format"], "pt");
    assert_eq!(r.read("w").unwrap().data, [1, 2, 3, 4]);
    let e = r.read("missing").unwrap_err();
    assert!(matches!(e, StError::NoSuchTensor { .. }));
}

#[test]
fn the_follower_refuses_a_bad_header_before_the_data_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dst = d.join("f.safetensors");
    // Only the 8 length bytes: refused at once.
    std::fs::write(&dst, []).unwrap();
    let mut f = ShardFollower::new(&dst, Seen::default()).unwrap();
    std::fs::write(&dst, (MAX_HEADER + 1).to_le_bytes()).unwrap();
    let e = f.advance(8).unwrap_err().to_string();
    assert!(e.contains("exceeds the limit"), "{e}");
    // A tighter limit (sized to an expert group) applies too.
    std::fs::write(&dst, []).unwrap();
    let f = ShardFollower::new(&dst, Seen::default()).unwrap();
    let mut f = f.with_max_header(1000);
    std::fs::write(&dst, 2000u64.to_le_bytes()).unwrap();
    assert!(f.advance(8).is_err());
    // Junk past the promised length: refused as the bytes land, not at the end.
    let ok = r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#;
    let mut bytes = file(ok, &[1, 2, 3, 4]);
    let good_len = bytes.len() as u64;
    bytes.extend_from_slice(&[0; 64]);
    std::fs::write(&dst, &bytes).unwrap();
    let mut f = ShardFollower::new(&dst, Seen::default()).unwrap();
    f.advance(good_len).unwrap();
    let e = f.advance(good_len + 1).unwrap_err().to_string();
    assert!(e.contains("junk after the last tensor"), "{e}");
}

fn tensor(dtype: DType, shape: &[usize], seed: u8) -> Tensor {
    let n = shape.iter().product::<usize>() * dtype.elem_size();
    Tensor {
        dtype,
        shape: shape.to_vec(),
        data: (0..n).map(|i| (i as u8).wrapping_mul(29) ^ seed).collect(),
    }
}

#[test]
fn the_follower_hashes_as_the_file_grows() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("model_expgroup_0.safetensors");
    let mut sd = BTreeMap::new();
    for (i, name) in ["a.big", "b.big", "c.big"].iter().enumerate() {
        sd.insert(name.to_string(), tensor(DType::F16, &[1536, 1024], i as u8));
    }
    sd.insert("d.empty".into(), tensor(DType::F16, &[0, 3], 1));
    sd.insert("e.small".into(), tensor(DType::F16, &[7], 2));
    let h = write_safetensors_tensors(&src, &sd).unwrap();
    let bytes = std::fs::read(&src).unwrap();
    let total: u64 = sd.values().map(|t| t.data.len() as u64).sum();

    let dst = dir.path().join("copy.safetensors");
    let mut out = std::fs::File::create(&dst).unwrap();
    let mut f = ShardFollower::new(&dst, Seen::default()).unwrap();
    let piece = 64 << 10;
    let mut written = 0u64;
    let mut hashed_before_last = 0;
    for chunk in bytes.chunks(piece) {
        out.write_all(chunk).unwrap();
        written += chunk.len() as u64;
        f.advance(written).unwrap();
        if written < bytes.len() as u64 {
            hashed_before_last = f.hashed_bytes();
        }
    }
    // Before the last piece, at most one small piece (under 1 MiB) plus that piece was left.
    assert!(
        hashed_before_last + (1 << 20) + piece as u64 >= total,
        "hashed {hashed_before_last} of {total}"
    );
    let done = f.finish(written).unwrap();
    assert_eq!(done.hash, h);
    assert_eq!(done.hash, hash_state_dict(&sd));
    assert!(done.streamed);
    assert!(done.hashed_at_finish < (1 << 20) + piece as u64);
}

/// A valid small file, with mixed dtypes so the data order differs from the name order.
fn sample() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.safetensors");
    let mut sd = BTreeMap::new();
    sd.insert(
        "model.layers.1.mlp.experts.3.gate_up_proj".into(),
        tensor(DType::F16, &[4, 3], 1),
    );
    sd.insert(
        "model.layers.1.mlp.experts.3.down_proj".into(),
        tensor(DType::F16, &[3, 2], 2),
    );
    sd.insert("b32".into(), tensor(DType::F32, &[2], 3));
    sd.insert("z".into(), tensor(DType::U8, &[], 4));
    write_safetensors_tensors(&p, &sd).unwrap();
    std::fs::read(p).unwrap()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Set { at: usize, byte: u8 },
    Truncate { len: usize },
    Extend { bytes: Vec<u8> },
    HeaderLen { len: u64 },
    Splice { at: usize, text: String },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        (
            any::<usize>(),
            prop::sample::select(b"{}[]\",:0123456789-eE. \\\x00\xff".to_vec())
        )
            .prop_map(|(at, byte)| Mutation::Set { at, byte }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(|bytes| Mutation::Extend { bytes }),
        prop_oneof![any::<u64>(), 0u64..400].prop_map(|len| Mutation::HeaderLen { len }),
        (
            any::<usize>(),
            prop::sample::select(vec![
                "\"dtype\":\"F64\"",
                "[0,0]",
                "99999999999999999999",
                "\"__metadata__\":{},",
                "\"shape\":[]",
                ",\"x\":{}",
                "\\n\\u0000",
            ])
        )
            .prop_map(|(at, t)| Mutation::Splice {
                at,
                text: t.to_string()
            }),
    ]
}

fn apply(mut v: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        match m {
            Mutation::Flip { at, xor } if !v.is_empty() => {
                let i = at % v.len();
                v[i] ^= xor;
            }
            Mutation::Set { at, byte } if !v.is_empty() => {
                let i = at % v.len();
                v[i] = *byte;
            }
            Mutation::Truncate { len } => v.truncate(len % (v.len() + 1)),
            Mutation::Extend { bytes } => v.extend_from_slice(bytes),
            Mutation::HeaderLen { len } if v.len() >= 8 => {
                v[..8].copy_from_slice(&len.to_le_bytes());
            }
            Mutation::Splice { at, text } => {
                let i = at % (v.len() + 1);
                v.splice(i..i, text.bytes());
            }
            _ => {}
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    /// Mutated files never panic anywhere; errors are one line naming the file; reader and
    /// follower agree; what we accept, Hugging Face's crate accepts with the same tensors.
    #[test]
    fn mutated_files_never_panic_and_acceptance_implies_the_reference_accepts(
        muts in prop::collection::vec(mutation(), 1..4),
        piece in 1usize..200,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = apply(sample(), &muts);
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let ours = StReader::open(&path).and_then(|r| Ok((r.read_all()?, r.model_hash()?)));
        let followed = follow(&dir.path().join("f.safetensors"), &bytes, piece);
        match &ours {
            Ok((sd, hash)) => {
                let f = followed.unwrap_or_else(|e| panic!("reader accepts, follower: {e}"));
                prop_assert_eq!(f.hash, *hash);
                prop_assert_eq!(hash_state_dict(sd), *hash);
                let theirs = safetensors::SafeTensors::deserialize(&bytes);
                let theirs = theirs.unwrap_or_else(|e| panic!("we accept, the crate: {e:?}"));
                prop_assert_eq!(theirs.len(), sd.len());
                for (name, t) in sd {
                    let v = theirs.tensor(name).unwrap();
                    prop_assert_eq!(v.data(), &t.data[..]);
                    prop_assert_eq!(v.shape(), &t.shape[..]);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(!msg.contains('\n'), "{}", msg);
                prop_assert!(!msg.chars().any(|c| c.is_control()), "{}", msg);
                prop_assert!(followed.is_err(), "reader refuses ({}), follower accepts", msg);
            }
        }
    }
}
