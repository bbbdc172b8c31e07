//! Hostile `.pt` files: what a lying validator or network could serve. Shared by the tests
//! (`tests/pt_hostile.rs`) and `examples/hostile_pt.rs` (which writes them to a directory so
//! `minerctl checkpoint hash` can be measured on each).
//!
//! Every file here must be refused by the reader and the follower, quickly, in bounded memory.

#![allow(dead_code)]

// Pickle opcodes.
const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const MARK: u8 = b'(';
const EMPTY_DICT: u8 = b'}';
const EMPTY_LIST: u8 = b']';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';
const APPEND: u8 = b'a';
const APPENDS: u8 = b'e';
const BINUNICODE: u8 = b'X';
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const BINGET: u8 = b'h';
const GLOBAL: u8 = b'c';
const TUPLE: u8 = b't';
const EMPTY_TUPLE: u8 = b')';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const BINPERSID: u8 = b'Q';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const LONG1: u8 = 0x8a;
const NEWFALSE: u8 = 0x89;
const REDUCE: u8 = b'R';
const POP: u8 = b'0';
const DUP: u8 = b'2';
const NONE: u8 = b'N';

/// A minimal pickle builder for hostile content.
#[derive(Default)]
pub struct Pkl(pub Vec<u8>);

impl Pkl {
    pub fn new() -> Self {
        Pkl(vec![PROTO, 2])
    }
    pub fn op(&mut self, op: u8) -> &mut Self {
        self.0.push(op);
        self
    }
    pub fn ops(&mut self, ops: &[u8]) -> &mut Self {
        self.0.extend_from_slice(ops);
        self
    }
    pub fn repeat(&mut self, ops: &[u8], n: usize) -> &mut Self {
        for _ in 0..n {
            self.0.extend_from_slice(ops);
        }
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(BINUNICODE);
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(GLOBAL);
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    /// Any non-negative integer (LONG1, 8 bytes + sign byte when needed).
    pub fn int(&mut self, x: u64) -> &mut Self {
        if x < 256 {
            self.ops(&[BININT1, x as u8])
        } else if x < 1 << 31 {
            self.op(BININT).ops(&(x as u32).to_le_bytes())
        } else {
            let mut b = x.to_le_bytes().to_vec();
            if b[7] & 0x80 != 0 {
                b.push(0);
            }
            self.ops(&[LONG1, b.len() as u8]).ops(&b)
        }
    }
    pub fn int_tuple(&mut self, xs: &[u64]) -> &mut Self {
        self.op(MARK);
        for &x in xs {
            self.int(x);
        }
        self.op(TUPLE)
    }
    /// `_rebuild_tensor_v2(storage(key, numel, HalfStorage), offset, shape, stride, False, OrderedDict())`.
    pub fn tensor(
        &mut self,
        key: &str,
        numel: u64,
        offset: u64,
        shape: &[u64],
        stride: &[u64],
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(MARK);
        self.op(MARK)
            .str("storage")
            .global("torch", "HalfStorage")
            .str(key)
            .str("cpu")
            .int(numel)
            .op(TUPLE);
        self.op(BINPERSID)
            .int(offset)
            .int_tuple(shape)
            .int_tuple(stride)
            .op(NEWFALSE);
        self.global("collections", "OrderedDict")
            .op(EMPTY_TUPLE)
            .op(REDUCE)
            .op(TUPLE)
            .op(REDUCE)
    }
    pub fn done(&mut self) -> Vec<u8> {
        self.0.push(STOP);
        std::mem::take(&mut self.0)
    }
}

/// `{"model_state_dict": {name: tensor}}` with one tensor (see [`Pkl::tensor`]).
pub fn one_tensor_pickle(
    name: &str,
    key: &str,
    numel: u64,
    offset: u64,
    shape: &[u64],
    stride: &[u64],
) -> Vec<u8> {
    let mut p = Pkl::new();
    p.op(EMPTY_DICT)
        .str("model_state_dict")
        .op(EMPTY_DICT)
        .str(name);
    p.tensor(key, numel, offset, shape, stride);
    p.op(SETITEM).op(SETITEM).done()
}

/// One zip record: name (without the root folder) and data.
pub struct Rec {
    pub name: String,
    pub data: Vec<u8>,
}

pub fn rec(name: &str, data: Vec<u8>) -> Rec {
    Rec {
        name: name.into(),
        data,
    }
}

/// Knobs to make the zip lie.
#[derive(Default, Clone)]
pub struct ZipLies {
    /// Central directory entry `i` claims this size.
    pub size_of: Option<(usize, u64)>,
    /// Central directory entry `i` points at entry `j`'s local header.
    pub header_of: Option<(usize, usize)>,
    /// Local header of entry `i` names something else.
    pub local_name: Option<(usize, String)>,
    /// The end record claims this central directory size.
    pub cd_size: Option<u32>,
    /// The end record claims this many entries.
    pub entries: Option<u16>,
}

fn p16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn p32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// A stored zip (torch layout: root folder, data descriptors) of `recs`, with `lies` applied.
pub fn zip(root: &str, recs: &[Rec], lies: &ZipLies) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offsets = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        offsets.push(out.len() as u32);
        let full = match &lies.local_name {
            Some((j, n)) if *j == i => format!("{root}/{n}"),
            _ => format!("{root}/{}", r.name),
        };
        p32(&mut out, 0x0403_4b50);
        p16(&mut out, 0);
        p16(&mut out, 0x0808);
        p16(&mut out, 0);
        p32(&mut out, 0);
        p32(&mut out, 0);
        p32(&mut out, 0);
        p32(&mut out, 0);
        p16(&mut out, full.len() as u16);
        p16(&mut out, 0);
        out.extend_from_slice(full.as_bytes());
        out.extend_from_slice(&r.data);
        p32(&mut out, 0x0807_4b50);
        p32(&mut out, 0);
        p32(&mut out, r.data.len() as u32);
        p32(&mut out, r.data.len() as u32);
    }
    let cd_start = out.len();
    for (i, r) in recs.iter().enumerate() {
        let full = format!("{root}/{}", r.name);
        let size = match lies.size_of {
            Some((j, s)) if j == i => s as u32,
            _ => r.data.len() as u32,
        };
        let offset = match lies.header_of {
            Some((j, k)) if j == i => offsets[k],
            _ => offsets[i],
        };
        p32(&mut out, 0x0201_4b50);
        p16(&mut out, 0);
        p16(&mut out, 0);
        p16(&mut out, 0x0808);
        p16(&mut out, 0);
        p32(&mut out, 0);
        p32(&mut out, 0);
        p32(&mut out, size);
        p32(&mut out, size);
        p16(&mut out, full.len() as u16);
        p16(&mut out, 0);
        p16(&mut out, 0);
        p16(&mut out, 0);
        p16(&mut out, 0);
        p32(&mut out, 0);
        p32(&mut out, offset);
        out.extend_from_slice(full.as_bytes());
    }
    let cd_size = (out.len() - cd_start) as u32;
    p32(&mut out, 0x0605_4b50);
    p16(&mut out, 0);
    p16(&mut out, 0);
    let n = lies.entries.unwrap_or(recs.len() as u16);
    p16(&mut out, n);
    p16(&mut out, n);
    p32(&mut out, lies.cd_size.unwrap_or(cd_size));
    p32(&mut out, cd_start as u32);
    p16(&mut out, 0);
    out
}

/// A checkpoint zip whose `data.pkl` is `pkl` and whose storage records are `storages`.
pub fn checkpoint(pkl: Vec<u8>, storages: Vec<Rec>) -> Vec<u8> {
    let mut recs = vec![rec("data.pkl", pkl)];
    recs.extend(storages);
    recs.push(rec("version", b"3\n".to_vec()));
    zip("archive", &recs, &ZipLies::default())
}

/// What a hostile file must give: refused (with the error text containing this) or,
/// for a few, a readable file.
pub struct Hostile {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

/// About `target` bytes of pickle nesting: `depth` containers built by `unit`.
fn deep(prefix: &[u8], unit: &[u8], close: &[u8], target: usize) -> Vec<u8> {
    let n = target / (unit.len() + close.len());
    let mut p = Pkl::new();
    p.ops(prefix).repeat(unit, n).repeat(close, n);
    p.op(POP).op(NONE).done()
}

/// The synthetic hostile corpus (1-3 MB where size matters).
pub fn corpus() -> Vec<Hostile> {
    let mut v = nesting_attacks();
    v.extend(amplification_attacks());
    v.extend(view_attacks());
    v.extend(zip_attacks());
    v
}

fn storage(key: &str, n: usize) -> Rec {
    rec(&format!("data/{key}"), vec![0x3c; n])
}

/// Deep nesting, discarded or left open.
#[allow(unused_variables)]
fn nesting_attacks() -> Vec<Hostile> {
    let mb = 1 << 20;
    let mut v = Vec::new();
    let mut add = |name: &'static str, bytes: Vec<u8>| v.push(Hostile { name, bytes });

    // Deep nesting, then discarded with POP (the drop of a nested value must not recurse).
    let mut p = Pkl::new();
    p.op(BININT1)
        .op(0)
        .repeat(&[TUPLE1], 3 * mb)
        .op(POP)
        .op(NONE);
    add("deep_tuples", checkpoint(p.done(), vec![]));
    add(
        "deep_lists",
        checkpoint(deep(&[], &[EMPTY_LIST], &[APPEND], 3 * mb / 2 - 64), vec![]),
    );
    add(
        "deep_lists_1mb",
        checkpoint(deep(&[], &[EMPTY_LIST], &[APPEND], mb / 2), vec![]),
    );
    add(
        "deep_dicts",
        checkpoint(
            deep(&[], &[EMPTY_DICT, NONE], &[SETITEM], 3 * mb / 3 - 64),
            vec![],
        ),
    );
    let mut p = Pkl::new();
    p.repeat(&[MARK, NONE], 3 * mb / 2 - 64);
    add("marks_left_open", checkpoint(p.done(), vec![]));
    let mut p = Pkl::new();
    p.repeat(&[EMPTY_LIST, MARK], mb).repeat(&[APPENDS], mb);
    add(
        "deep_appends",
        checkpoint(p.op(POP).op(NONE).done(), vec![]),
    );
    v
}

/// Memo, DUP and copy amplification.
#[allow(unused_variables)]
fn amplification_attacks() -> Vec<Hostile> {
    let mb = 1 << 20;
    let mut v = Vec::new();
    let mut add = |name: &'static str, bytes: Vec<u8>| v.push(Hostile { name, bytes });
    // Memo / DUP amplification.
    let mut p = Pkl::new();
    p.op(EMPTY_LIST)
        .str(&"x".repeat(mb))
        .ops(&[BINPUT, 0, POP])
        .repeat(&[BINGET, 0, APPEND], 600_000);
    add(
        "memo_string_fetched_600k_times",
        checkpoint(p.done(), vec![]),
    );
    let mut p = Pkl::new();
    p.op(NONE).repeat(&[DUP], 3 * mb - 16);
    add("dup_chain", checkpoint(p.done(), vec![]));
    let mut p = Pkl::new();
    p.op(NONE);
    for i in 0..(3 * mb / 5 - 16) as u32 {
        p.op(LONG_BINPUT).ops(&i.to_le_bytes());
    }
    add("memo_puts", checkpoint(p.done(), vec![]));
    // OrderedDict(pairs) rebuilt over and over from one 10k-pair list (copies the pairs).
    let mut p = Pkl::new();
    p.global("collections", "OrderedDict")
        .ops(&[BINPUT, 0, POP, EMPTY_LIST]);
    p.ops(&[NONE, NONE, TUPLE2, BINPUT, 1, POP, MARK])
        .repeat(&[BINGET, 1], 10_000);
    p.ops(&[APPENDS, BINPUT, 2, POP])
        .repeat(&[BINGET, 0, BINGET, 2, TUPLE1, REDUCE, POP], 250_000);
    add("ordered_dict_copies", checkpoint(p.op(NONE).done(), vec![]));
    // 20k full views of one 2 MiB storage: hashing them would read 40 GB from a 2 MB file.
    let mut p = Pkl::new();
    p.op(EMPTY_DICT)
        .str("model_state_dict")
        .op(EMPTY_DICT)
        .op(MARK);
    for i in 0..20_000u32 {
        p.str(&format!("t{i}"))
            .tensor("0", 1 << 20, 0, &[1 << 20], &[1]);
    }
    p.op(SETITEMS).op(SETITEM);
    add(
        "many_views_of_one_storage",
        checkpoint(p.done(), vec![storage("0", 2 << 20)]),
    );
    v
}

/// Views that do not fit their storage; untrusted names.
#[allow(unused_variables)]
fn view_attacks() -> Vec<Hostile> {
    let mb = 1 << 20;
    let mut v = Vec::new();
    let mut add = |name: &'static str, bytes: Vec<u8>| v.push(Hostile { name, bytes });
    // Views that do not fit their storage.
    add(
        "expanded_view",
        checkpoint(
            one_tensor_pickle("w", "0", 1, 0, &[1 << 20, 1 << 20], &[0, 0]),
            vec![storage("0", 2)],
        ),
    );
    add(
        "more_elements_than_storage",
        checkpoint(
            one_tensor_pickle("w", "0", 4, 0, &[1000, 1000], &[1, 1]),
            vec![storage("0", 8)],
        ),
    );
    add(
        "shape_overflows",
        checkpoint(
            one_tensor_pickle("w", "0", 4, 0, &[1 << 62, 1 << 62], &[1, 1]),
            vec![storage("0", 8)],
        ),
    );
    add(
        "offset_overflows",
        checkpoint(
            one_tensor_pickle("w", "0", 4, u64::MAX >> 1, &[2], &[1]),
            vec![storage("0", 8)],
        ),
    );
    add(
        "stride_overflows",
        checkpoint(
            one_tensor_pickle("w", "0", 4, 0, &[2, 2], &[1 << 62, 1]),
            vec![storage("0", 8)],
        ),
    );
    add(
        "storage_numel_overflows",
        checkpoint(
            one_tensor_pickle("w", "0", u64::MAX >> 1, 0, &[2], &[1]),
            vec![storage("0", 8)],
        ),
    );
    add(
        "storage_bigger_than_record",
        checkpoint(
            one_tensor_pickle("w", "0", 1 << 40, 0, &[1 << 20, 1 << 20], &[1 << 20, 1]),
            vec![storage("0", 8)],
        ),
    );
    add(
        "name_with_terminal_escapes",
        checkpoint(
            one_tensor_pickle("w\n\u{1b}[31mFAKE LOG LINE\u{202e}", "0", 4, 2, &[4], &[1]),
            vec![storage("0", 8)],
        ),
    );
    v
}

/// Zip archives that lie, and junk.
#[allow(unused_variables)]
fn zip_attacks() -> Vec<Hostile> {
    let mb = 1 << 20;
    let mut v = Vec::new();
    let mut add = |name: &'static str, bytes: Vec<u8>| v.push(Hostile { name, bytes });
    // Zip lies.
    let pkl = || one_tensor_pickle("w", "0", 4, 0, &[4], &[1]);
    let recs = || {
        vec![
            rec("data.pkl", pkl()),
            storage("0", 8),
            rec("version", b"3\n".to_vec()),
        ]
    };
    add(
        "overlapping_records",
        zip(
            "archive",
            &recs(),
            &ZipLies {
                size_of: Some((1, 40)),
                ..Default::default()
            },
        ),
    );
    add(
        "directory_points_at_another_header",
        zip(
            "archive",
            &recs(),
            &ZipLies {
                header_of: Some((2, 1)),
                ..Default::default()
            },
        ),
    );
    add(
        "local_name_differs",
        zip(
            "archive",
            &recs(),
            &ZipLies {
                local_name: Some((1, "data/1".into())),
                ..Default::default()
            },
        ),
    );
    add(
        "huge_claimed_size",
        zip(
            "archive",
            &recs(),
            &ZipLies {
                size_of: Some((1, 0xFFFF_FFF0)),
                ..Default::default()
            },
        ),
    );
    add(
        "record_runs_into_next",
        zip(
            "archive",
            &recs(),
            &ZipLies {
                size_of: Some((0, 200_000)),
                ..Default::default()
            },
        ),
    );
    add(
        "huge_central_directory",
        zip(
            "archive",
            &recs(),
            &ZipLies {
                cd_size: Some(0xFFFF_FFF0),
                ..Default::default()
            },
        ),
    );
    add(
        "too_many_entries",
        zip(
            "archive",
            &recs(),
            &ZipLies {
                entries: Some(0xFFFF),
                ..Default::default()
            },
        ),
    );
    let mut twice = recs();
    twice.push(storage("0", 8));
    add("record_twice", zip("archive", &twice, &ZipLies::default()));
    let mut big = Pkl::new();
    big.op(EMPTY_LIST).str(&"y".repeat(5 * mb)).op(APPEND);
    add("pickle_over_the_cap", checkpoint(big.done(), vec![]));
    let mut junk = zip("archive", &recs(), &ZipLies::default());
    junk.extend(std::iter::repeat_n(0x5a, mb));
    add("junk_after_a_valid_file", junk);
    let mut garbage = vec![0u8; mb];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in garbage.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    add("garbage", garbage);
    add(
        "unterminated_global",
        checkpoint(
            {
                let mut p = Pkl::new();
                p.op(GLOBAL).ops(&vec![b'a'; 2 * mb]);
                p.0
            },
            vec![],
        ),
    );
    v
}
