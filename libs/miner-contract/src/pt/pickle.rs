//! Pickle protocol 2, both ways, for torch state dicts only.
//!
//! The writer emits what Python's pickler emits for `torch.save` of a dict of dense tensors
//! (memoized globals and strings, `BININT*` sizes, `TUPLE1/2/3`, batched `SETITEMS`).
//! The reader is a restricted unpickler: it knows the opcodes a state dict uses and only the
//! globals needed to rebuild dense tensors (`torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, `collections.OrderedDict`, the dense `torch.*Storage`
//! classes). Any other global is an error; nothing is ever called or imported.

use std::collections::HashMap;

use super::{DType, TensorMeta, contiguous_strides};

// ---------------------------------------------------------------------------------------------
// Writer

const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const MARK: u8 = b'(';
const EMPTY_DICT: u8 = b'}';
const SETITEMS: u8 = b'u';
const BINUNICODE: u8 = b'X';
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const GLOBAL: u8 = b'c';
const TUPLE: u8 = b't';
const EMPTY_TUPLE: u8 = b')';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const BINPERSID: u8 = b'Q';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const NEWFALSE: u8 = 0x89;
const NEWTRUE: u8 = 0x88;
const REDUCE: u8 = b'R';

struct PickleWriter {
    out: Vec<u8>,
    next_memo: u32,
    /// Memo slots of globals and strings already written (keyed by a tag + text).
    memo: HashMap<String, u32>,
}

impl PickleWriter {
    fn new() -> Self {
        PickleWriter {
            out: vec![PROTO, 2],
            next_memo: 0,
            memo: HashMap::new(),
        }
    }

    fn put(&mut self) -> u32 {
        let i = self.next_memo;
        self.next_memo += 1;
        if i < 256 {
            self.out.extend_from_slice(&[BINPUT, i as u8]);
        } else {
            self.out.push(LONG_BINPUT);
            self.out.extend_from_slice(&i.to_le_bytes());
        }
        i
    }

    fn get(&mut self, i: u32) {
        if i < 256 {
            self.out.extend_from_slice(&[BINGET, i as u8]);
        } else {
            self.out.push(LONG_BINGET);
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }

    /// A string, fresh each time (dict keys, as Python's pickler does for distinct objects).
    fn string(&mut self, s: &str) {
        self.out.push(BINUNICODE);
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self.put();
    }

    /// A string that Python would share (an interned constant): memoized after first use.
    fn shared_string(&mut self, s: &str) {
        let key = format!("s:{s}");
        if let Some(&i) = self.memo.get(&key) {
            self.get(i);
        } else {
            self.out.push(BINUNICODE);
            self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.out.extend_from_slice(s.as_bytes());
            let i = self.put();
            self.memo.insert(key, i);
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        let key = format!("g:{module}.{name}");
        if let Some(&i) = self.memo.get(&key) {
            self.get(i);
        } else {
            self.out.push(GLOBAL);
            self.out.extend_from_slice(module.as_bytes());
            self.out.push(b'\n');
            self.out.extend_from_slice(name.as_bytes());
            self.out.push(b'\n');
            let i = self.put();
            self.memo.insert(key, i);
        }
    }

    fn int(&mut self, x: u64) {
        if x <= 0xff {
            self.out.extend_from_slice(&[BININT1, x as u8]);
        } else if x <= 0xffff {
            self.out.push(BININT2);
            self.out.extend_from_slice(&(x as u16).to_le_bytes());
        } else if x < 1 << 31 {
            self.out.push(BININT);
            self.out.extend_from_slice(&(x as i32).to_le_bytes());
        } else {
            // LONG1: minimal little-endian two's complement (a positive value keeps a 0 sign byte).
            let mut bytes = x.to_le_bytes().to_vec();
            while bytes.len() > 1
                && bytes[bytes.len() - 1] == 0
                && bytes[bytes.len() - 2] & 0x80 == 0
            {
                bytes.pop();
            }
            if bytes[bytes.len() - 1] & 0x80 != 0 {
                bytes.push(0);
            }
            self.out.push(LONG1);
            self.out.push(bytes.len() as u8);
            self.out.extend_from_slice(&bytes);
        }
    }

    fn int_tuple(&mut self, xs: &[usize]) {
        match xs.len() {
            0 => {
                // Python memoizes nothing for the empty tuple singleton.
                self.out.push(EMPTY_TUPLE);
                return;
            }
            1..=3 => {
                for &x in xs {
                    self.int(x as u64);
                }
                self.out.push([TUPLE1, TUPLE2, TUPLE3][xs.len() - 1]);
            }
            _ => {
                self.out.push(MARK);
                for &x in xs {
                    self.int(x as u64);
                }
                self.out.push(TUPLE);
            }
        }
        self.put();
    }

    /// `torch._utils._rebuild_tensor_v2(persistent storage, 0, size, stride, False, OrderedDict())`.
    fn tensor(&mut self, meta: &TensorMeta, storage_key: &str) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(MARK);
        // The persistent id tuple: ('storage', torch.<X>Storage, key, 'cpu', numel).
        self.out.push(MARK);
        self.shared_string("storage");
        self.global("torch", meta.dtype.storage_class());
        self.string(storage_key);
        self.shared_string("cpu");
        self.int(meta.numel() as u64);
        self.out.push(TUPLE);
        self.put();
        self.out.push(BINPERSID);
        self.int(0);
        self.int_tuple(&meta.shape);
        self.int_tuple(&contiguous_strides(&meta.shape));
        self.out.push(NEWFALSE);
        self.global("collections", "OrderedDict");
        self.out.push(EMPTY_TUPLE);
        self.out.push(REDUCE);
        self.put();
        self.out.push(TUPLE);
        self.put();
        self.out.push(REDUCE);
        self.put();
    }
}

/// `data.pkl` for tensors `metas` (already in file order) whose storages are `data/0`, `data/1`, ...
pub(crate) fn state_dict_pickle(metas: &[TensorMeta], wrap_model_state_dict: bool) -> Vec<u8> {
    let mut w = PickleWriter::new();
    w.out.push(EMPTY_DICT);
    w.put();
    if wrap_model_state_dict {
        w.string("model_state_dict");
        w.out.push(EMPTY_DICT);
        w.put();
    }
    for (batch_index, batch) in metas.chunks(1000).enumerate() {
        w.out.push(MARK);
        for (j, meta) in batch.iter().enumerate() {
            w.string(&meta.name);
            w.tensor(meta, &(batch_index * 1000 + j).to_string());
        }
        w.out.push(SETITEMS);
    }
    if wrap_model_state_dict {
        w.out.push(b's'); // SETITEM into the outer dict
    }
    w.out.push(STOP);
    w.out
}

// ---------------------------------------------------------------------------------------------
// Restricted unpickler
//
// Guards (a hostile `data.pkl` is the input):
// * no recursion anywhere: the object graph is an arena of nodes addressed by index, so
//   building, walking and dropping it are loops however deeply containers nest;
// * no copy per memo lookup or `DUP`: both push the same index, the object is shared;
// * every allocation is charged to a budget proportional to the pickle's length (see
//   [`graph_budget`]), so a small pickle cannot make the reader allocate much;
// * `data.pkl` itself is capped at [`MAX_PICKLE`].

/// Largest `data.pkl` read. The biggest state dict a miner reads is the full
/// DeepSeek-V2-Lite model (~5,200 tensors, about 250 pickle bytes each: ~1.3 MB); an expert
/// group (<= 1,152 tensors) pickles to ~0.3 MB. 4 MiB leaves three times the headroom of the
/// largest and bounds what a hostile pickle can make the reader allocate (see [`graph_budget`]).
pub(crate) const MAX_PICKLE: u64 = 4 << 20;
/// Memory the object graph may take per byte of pickle. A torch state dict needs about 9.3
/// (a tensor's ~140 pickle bytes build ~1.3 KB of nodes, tuples, memo and stack, allocator
/// overhead included; see `real_state_dicts_use_under_two_thirds_of_their_budget`); a 3 MB
/// hostile pickle peaks at ~53 MB (measured in `tests/pt_hostile.rs`), one at the
/// [`MAX_PICKLE`] cap at ~70 MB.
const GRAPH_BYTES_PER_PICKLE_BYTE: usize = 16;
/// Memory any pickle may take, however short.
const GRAPH_BASE_BYTES: usize = 256 << 10;
/// Most dimensions a tensor may have (torch itself caps at 64... and state dicts use <= 4).
const MAX_DIMS: usize = 64;
/// Longest storage key (torch writes decimal indices).
const MAX_KEY_LEN: usize = 64;

/// The allocation budget of the object graph of a pickle of `len` bytes.
pub(crate) fn graph_budget(len: usize) -> usize {
    GRAPH_BASE_BYTES.saturating_add(len.saturating_mul(GRAPH_BYTES_PER_PICKLE_BYTE))
}

/// A storage named by a persistent id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    pub key: String,
    pub dtype: DType,
    /// Elements, as the persistent id claims.
    pub numel: u64,
}

/// A tensor view on a storage, as `_rebuild_tensor_v2` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    /// In elements.
    pub offset: u64,
    pub shape: Vec<usize>,
    /// In elements.
    pub stride: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Global {
    RebuildTensorV2,
    RebuildParameter,
    OrderedDict,
    Storage(DType),
}

/// A value on the stack, in the memo or inside a container: small values inline, everything
/// else an index into the arena ([`Graph::nodes`]). Copying a `Val` shares the object.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Val {
    None,
    Bool(bool),
    Int(i64),
    /// Floats never matter to a state dict; the payload is skipped.
    Float,
    Global(Global),
    Ref(u32),
}

/// An object in the arena. Children are [`Val`]s, so dropping a node never recurses.
#[derive(Debug)]
pub(crate) enum Node {
    Str(Box<str>),
    /// Bytes never matter to a state dict; the payload is skipped.
    Bytes,
    Tuple(Box<[Val]>),
    List(Vec<Val>),
    /// `dict` and `OrderedDict` (items in insertion order; a repeated key appears twice and the
    /// later one wins).
    Dict(Vec<(Val, Val)>),
    Storage(Box<StorageRef>),
    Tensor(Box<TensorRef>),
}

/// An unpickled object: the arena and the root value.
#[derive(Debug)]
pub(crate) struct Graph {
    nodes: Vec<Node>,
    pub root: Val,
}

impl Graph {
    pub(crate) fn node(&self, v: Val) -> Option<&Node> {
        self.nodes.get(ref_index(v))
    }

    pub(crate) fn str(&self, v: Val) -> Option<&str> {
        match self.node(v) {
            Some(Node::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn kind(&self, v: Val) -> &'static str {
        kind_of(&self.nodes, v)
    }
}

/// The arena index of a reference (`usize::MAX`, never an index, for an inline value).
fn ref_index(v: Val) -> usize {
    match v {
        Val::Ref(i) => i as usize,
        _ => usize::MAX,
    }
}

/// The Python type name of a value, for error messages.
fn kind_of(nodes: &[Node], v: Val) -> &'static str {
    match v {
        Val::None => "None",
        Val::Bool(_) => "bool",
        Val::Int(_) => "int",
        Val::Float => "float",
        Val::Global(_) => "class/function",
        Val::Ref(i) => match nodes.get(i as usize) {
            Some(Node::Str(_)) => "str",
            Some(Node::Bytes) => "bytes",
            Some(Node::Tuple(_)) => "tuple",
            Some(Node::List(_)) => "list",
            Some(Node::Dict(_)) => "dict",
            Some(Node::Storage(_)) => "storage",
            Some(Node::Tensor(_)) => "tensor",
            None => "dangling reference",
        },
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UnpickleError {
    Bad(String),
    Forbidden(String),
    UnknownStorage(String),
}

fn resolve_global(module: &str, name: &str) -> Result<Global, UnpickleError> {
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch", n) if n.ends_with("Storage") => DType::from_storage_class(n)
            .map(Global::Storage)
            .ok_or_else(|| UnpickleError::UnknownStorage(format!("torch.{}", clip(n)))),
        _ => Err(UnpickleError::Forbidden(format!(
            "{}.{}",
            clip(module),
            clip(name)
        ))),
    }
}

/// At most 200 characters of an untrusted string (for error messages).
fn clip(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// What the allocator really takes for an allocation of `n` bytes (header, 16-byte rounding,
/// 32-byte minimum): a pickle of one-element containers must not cost more than it is charged.
fn heap(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n + 8).next_multiple_of(16).max(32)
    }
}

/// The capacity a vector of `len` items grows to for `extra` more (at least doubling, so
/// appends one at a time stay linear), and the bytes that growth takes, or `None` if it has
/// room already.
fn growth(len: usize, cap: usize, extra: usize, item: usize) -> Option<(usize, usize)> {
    let need = len.checked_add(extra)?;
    if need <= cap {
        return None;
    }
    let new_cap = need.max(cap * 2).max(4);
    Some((new_cap, heap(new_cap * item)))
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Val>,
    marks: Vec<usize>,
    /// Memo slots `0..memo.len()` (pickles number them in order); `memo_sparse` for others.
    memo: Vec<Option<Val>>,
    memo_sparse: HashMap<u32, Val>,
    /// Bytes of graph, stack and memo the pickle may still allocate.
    budget: usize,
    stack_high: usize,
    marks_high: usize,
}

fn bad(msg: impl Into<String>) -> UnpickleError {
    UnpickleError::Bad(msg.into())
}

fn as_usize(v: Val, what: &str) -> Result<usize, UnpickleError> {
    match v {
        Val::Int(i) if i >= 0 => {
            usize::try_from(i).map_err(|_| bad(format!("{what} {i} too large")))
        }
        Val::Bool(b) => Ok(usize::from(b)),
        Val::Int(i) => Err(bad(format!("{what} {i} is negative"))),
        _ => Err(bad(format!("{what} is not a non-negative int"))),
    }
}

impl<'a> Unpickler<'a> {
    fn charge(&mut self, bytes: usize) -> Result<(), UnpickleError> {
        self.budget = self.budget.checked_sub(bytes).ok_or_else(|| {
            bad(format!(
                "building its objects needs more than {} bytes of memory (the limit for a {}-byte pickle)",
                graph_budget(self.data.len()),
                self.data.len()
            ))
        })?;
        Ok(())
    }

    /// `payload`: bytes of the node's own heap allocation (0: none).
    fn alloc(&mut self, node: Node, payload: usize) -> Result<Val, UnpickleError> {
        self.charge(std::mem::size_of::<Node>() + heap(payload))?;
        let i = u32::try_from(self.nodes.len()).map_err(|_| bad("too many objects"))?;
        self.nodes.push(node);
        Ok(Val::Ref(i))
    }

    fn push(&mut self, v: Val) -> Result<(), UnpickleError> {
        if self.stack.len() >= self.stack_high {
            self.charge(std::mem::size_of::<Val>())?;
            self.stack_high = self.stack.len() + 1;
        }
        self.stack.push(v);
        Ok(())
    }

    fn push_node(&mut self, node: Node, payload: usize) -> Result<(), UnpickleError> {
        let v = self.alloc(node, payload)?;
        self.push(v)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], UnpickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                bad(format!(
                    "ends inside an opcode argument at offset {}",
                    self.pos
                ))
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, UnpickleError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, UnpickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, UnpickleError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn line(&mut self) -> Result<&'a str, UnpickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| bad("unterminated text argument"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| bad("text argument is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn len_arg(&mut self, n: u64) -> Result<usize, UnpickleError> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.data.len() - self.pos)
            .ok_or_else(|| bad(format!("length {n} runs past the end of the pickle")))
    }

    fn pop(&mut self) -> Result<Val, UnpickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(bad("stack underflow (pop past a mark)"));
        }
        self.stack.pop().ok_or_else(|| bad("stack underflow"))
    }

    fn top(&self) -> Result<Val, UnpickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(bad("stack underflow (top past a mark)"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| bad("stack underflow"))
    }

    fn push_mark(&mut self) -> Result<(), UnpickleError> {
        if self.marks.len() >= self.marks_high {
            self.charge(std::mem::size_of::<usize>())?;
            self.marks_high = self.marks.len() + 1;
        }
        self.marks.push(self.stack.len());
        Ok(())
    }

    /// Pops everything above the last mark (the items become a container's payload: charged).
    fn pop_mark(&mut self) -> Result<Vec<Val>, UnpickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| bad("no mark on the stack"))?;
        if m > self.stack.len() {
            return Err(bad("mark above the stack"));
        }
        self.charge(heap((self.stack.len() - m) * std::mem::size_of::<Val>()))?;
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, i: u32) -> Result<(), UnpickleError> {
        let v = self
            .stack
            .last()
            .copied()
            .ok_or_else(|| bad("memoize on an empty stack"))?;
        let at = i as usize;
        if at < self.memo.len() {
            self.memo[at] = Some(v);
        } else if at == self.memo.len() {
            self.charge(std::mem::size_of::<Option<Val>>())?;
            self.memo.push(Some(v));
        } else if self.memo_sparse.insert(i, v).is_none() {
            // A hash map entry with its share of empty slots and control bytes.
            self.charge(64)?;
        }
        Ok(())
    }

    fn memo_get(&mut self, i: u32) -> Result<(), UnpickleError> {
        let v = match self.memo.get(i as usize) {
            Some(v) => *v,
            None => self.memo_sparse.get(&i).copied(),
        };
        let v = v.ok_or_else(|| bad(format!("memo key {i} not defined")))?;
        self.push(v)
    }

    fn node_mut(&mut self, v: Val) -> Option<&mut Node> {
        match v {
            Val::Ref(i) => self.nodes.get_mut(i as usize),
            _ => None,
        }
    }

    fn kind(&self, v: Val) -> &'static str {
        kind_of(&self.nodes, v)
    }

    fn set_items(&mut self, dict: Val, items: Vec<Val>) -> Result<(), UnpickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(bad("SETITEMS with an odd number of items"));
        }
        let kind = self.kind(dict);
        let Some(Node::Dict(d)) = self.nodes.get(ref_index(dict)) else {
            return Err(bad(format!("SETITEM(S) on a {kind}")));
        };
        let grow = growth(d.len(), d.capacity(), items.len() / 2, 32);
        if let Some((_, bytes)) = grow {
            self.charge(bytes)?;
        }
        if let Some(Node::Dict(d)) = self.node_mut(dict) {
            if let Some((cap, _)) = grow {
                d.reserve_exact(cap - d.len());
            }
            d.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
        }
        Ok(())
    }

    fn append(&mut self, list: Val, items: Vec<Val>) -> Result<(), UnpickleError> {
        let kind = self.kind(list);
        let Some(Node::List(l)) = self.nodes.get(ref_index(list)) else {
            return Err(bad(format!("APPEND to a {kind}")));
        };
        let grow = growth(l.len(), l.capacity(), items.len(), 16);
        if let Some((_, bytes)) = grow {
            self.charge(bytes)?;
        }
        if let Some(Node::List(l)) = self.node_mut(list) {
            if let Some((cap, _)) = grow {
                l.reserve_exact(cap - l.len());
            }
            l.extend(items);
        }
        Ok(())
    }

    fn tuple_items(&self, v: Val, what: &str) -> Result<&[Val], UnpickleError> {
        match self.nodes.get(ref_index(v)) {
            Some(Node::Tuple(t)) => Ok(t),
            Some(Node::List(l)) => Ok(l),
            _ => Err(bad(format!("{what} is a {} not a tuple", self.kind(v)))),
        }
    }

    fn int_tuple(&mut self, v: Val, what: &str) -> Result<Vec<usize>, UnpickleError> {
        let items = self.tuple_items(v, what)?;
        if items.len() > MAX_DIMS {
            return Err(bad(format!("{what} has {} dimensions", items.len())));
        }
        let out = items
            .iter()
            .map(|&x| as_usize(x, what))
            .collect::<Result<Vec<_>, _>>()?;
        self.charge(heap(out.len() * std::mem::size_of::<usize>()))?;
        Ok(out)
    }

    fn reduce(&mut self, func: Val, args: Val) -> Result<Val, UnpickleError> {
        let Some(Node::Tuple(_)) = self.nodes.get(ref_index(args)) else {
            return Err(bad(format!(
                "REDUCE arguments are a {} not a tuple",
                self.kind(args)
            )));
        };
        match func {
            Val::Global(Global::OrderedDict) => self.ordered_dict(args),
            Val::Global(Global::RebuildTensorV2) => self.rebuild_tensor(args),
            Val::Global(Global::RebuildParameter) => {
                let a = self.tuple_items(args, "arguments")?;
                match a {
                    [t, _, _] if matches!(self.nodes.get(ref_index(*t)), Some(Node::Tensor(_))) => {
                        Ok(*t)
                    }
                    _ => Err(bad(
                        "_rebuild_parameter expects (tensor, requires_grad, hooks)",
                    )),
                }
            }
            Val::Global(Global::Storage(d)) => Err(bad(format!(
                "storage class {} called directly",
                d.storage_class()
            ))),
            other => Err(bad(format!("REDUCE on a {}", self.kind(other)))),
        }
    }

    /// `OrderedDict()` or `OrderedDict([(k, v), ...])`.
    fn ordered_dict(&mut self, args: Val) -> Result<Val, UnpickleError> {
        let pairs = match self.tuple_items(args, "arguments")? {
            [] => Vec::new(),
            [list] => {
                let Some(Node::List(items)) = self.nodes.get(ref_index(*list)) else {
                    return Err(bad("OrderedDict called with unexpected arguments"));
                };
                let mut pairs = Vec::with_capacity(items.len());
                for &p in items {
                    match self.nodes.get(ref_index(p)) {
                        Some(Node::Tuple(kv)) if kv.len() == 2 => pairs.push((kv[0], kv[1])),
                        _ => return Err(bad("OrderedDict item is not a pair")),
                    }
                }
                pairs
            }
            _ => return Err(bad("OrderedDict called with unexpected arguments")),
        };
        let payload = pairs.len() * 2 * std::mem::size_of::<Val>();
        self.alloc(Node::Dict(pairs), payload)
    }

    fn rebuild_tensor(&mut self, args: Val) -> Result<Val, UnpickleError> {
        let a = self.tuple_items(args, "arguments")?;
        if a.len() != 6 && a.len() != 7 {
            return Err(bad(format!(
                "_rebuild_tensor_v2 takes 6 or 7 arguments, got {}",
                a.len()
            )));
        }
        let (storage, offset, size, stride) = (a[0], a[1], a[2], a[3]);
        let Some(Node::Storage(s)) = self.nodes.get(ref_index(storage)) else {
            return Err(bad(format!(
                "_rebuild_tensor_v2 storage is a {}",
                self.kind(storage)
            )));
        };
        let storage = (**s).clone();
        let offset = as_usize(offset, "storage offset")? as u64;
        let shape = self.int_tuple(size, "size")?;
        let stride = self.int_tuple(stride, "stride")?;
        if shape.len() != stride.len() {
            return Err(bad(format!(
                "size has {} dims but stride has {}",
                shape.len(),
                stride.len()
            )));
        }
        self.charge(heap(storage.key.len()))?;
        let payload = std::mem::size_of::<TensorRef>();
        self.alloc(
            Node::Tensor(Box::new(TensorRef {
                storage,
                offset,
                shape,
                stride,
            })),
            payload,
        )
    }

    fn persistent_load(&mut self, pid: Val) -> Result<Val, UnpickleError> {
        let t = match self.nodes.get(ref_index(pid)) {
            Some(Node::Tuple(t)) => t,
            _ => {
                return Err(bad(format!(
                    "persistent id is a {} not a tuple",
                    self.kind(pid)
                )));
            }
        };
        let [tag, cls, key, _location, numel] = **t else {
            return Err(bad(
                "persistent id is not ('storage', type, key, location, numel)",
            ));
        };
        if self.str_of(tag) != Some("storage") {
            return Err(bad(
                "persistent id is not ('storage', type, key, location, numel)",
            ));
        }
        let Val::Global(Global::Storage(dtype)) = cls else {
            return Err(bad(format!(
                "persistent storage type is a {}",
                self.kind(cls)
            )));
        };
        let key = match (key, self.str_of(key)) {
            (_, Some(s)) => s.to_string(),
            (Val::Int(i), None) => i.to_string(),
            (other, None) => return Err(bad(format!("storage key is a {}", self.kind(other)))),
        };
        if key.is_empty()
            || key.len() > MAX_KEY_LEN
            || !key
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        {
            return Err(bad(format!(
                "storage key {:?} is not a record name",
                clip(&key)
            )));
        }
        let numel = as_usize(numel, "storage size")? as u64;
        self.charge(heap(key.len()))?;
        let payload = std::mem::size_of::<StorageRef>();
        self.alloc(
            Node::Storage(Box::new(StorageRef { key, dtype, numel })),
            payload,
        )
    }

    fn str_of(&self, v: Val) -> Option<&str> {
        match self.nodes.get(ref_index(v)) {
            Some(Node::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// Opcodes that push a literal. Returns `false` for an opcode that is not one.
    fn literal(&mut self, op: u8) -> Result<bool, UnpickleError> {
        let v = match op {
            b'N' => Val::None,
            NEWTRUE => Val::Bool(true),
            NEWFALSE => Val::Bool(false),
            BININT => Val::Int(i64::from(self.u32()? as i32)),
            BININT1 => Val::Int(i64::from(self.u8()?)),
            BININT2 => {
                let b = self.take(2)?;
                Val::Int(i64::from(u16::from_le_bytes([b[0], b[1]])))
            }
            LONG1 | 0x8b => {
                let n = if op == LONG1 {
                    u64::from(self.u8()?)
                } else {
                    u64::from(self.u32()?)
                };
                let n = self.len_arg(n)?;
                if n > 8 {
                    return Err(bad(format!("integer of {n} bytes is too large")));
                }
                let b = self.take(n)?;
                let mut a = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                    [0xffu8; 8]
                } else {
                    [0u8; 8]
                };
                a[..n].copy_from_slice(b);
                Val::Int(i64::from_le_bytes(a))
            }
            b'I' => {
                let s = self.line()?;
                match s {
                    "00" => Val::Bool(false),
                    "01" => Val::Bool(true),
                    _ => Val::Int(
                        s.trim()
                            .parse()
                            .map_err(|_| bad(format!("bad INT {:?}", clip(s))))?,
                    ),
                }
            }
            b'G' => {
                self.take(8)?;
                Val::Float
            }
            GLOBAL => {
                let module = self.line()?;
                let name = self.line()?;
                Val::Global(resolve_global(module, name)?)
            }
            _ => return Ok(false),
        };
        self.push(v)?;
        Ok(true)
    }

    /// Opcodes that push a string or bytes. Returns `false` for an opcode that is not one.
    fn text(&mut self, op: u8) -> Result<bool, UnpickleError> {
        match op {
            BINUNICODE | 0x8c | 0x8d => {
                let n = match op {
                    BINUNICODE => u64::from(self.u32()?),
                    0x8c => u64::from(self.u8()?),
                    _ => self.u64()?,
                };
                let n = self.len_arg(n)?;
                let s =
                    std::str::from_utf8(self.take(n)?).map_err(|_| bad("string is not UTF-8"))?;
                self.push_node(Node::Str(s.into()), n)?;
            }
            b'U' | b'T' => {
                let n = if op == b'U' {
                    u64::from(self.u8()?)
                } else {
                    u64::from(self.u32()?)
                };
                let n = self.len_arg(n)?;
                let s: String = self.take(n)?.iter().map(|&c| char::from(c)).collect();
                let len = s.len();
                self.push_node(Node::Str(s.into()), len)?;
            }
            b'C' | b'B' | 0x8e => {
                let n = match op {
                    b'C' => u64::from(self.u8()?),
                    b'B' => u64::from(self.u32()?),
                    _ => self.u64()?,
                };
                let n = self.len_arg(n)?;
                self.take(n)?;
                self.push_node(Node::Bytes, 0)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Opcodes that build or fill containers. Returns `false` for an opcode that is not one.
    fn container(&mut self, op: u8) -> Result<bool, UnpickleError> {
        match op {
            EMPTY_TUPLE => self.push_node(Node::Tuple(Box::new([])), 0)?,
            TUPLE => {
                let items = self.pop_mark()?;
                self.push_node(Node::Tuple(items.into_boxed_slice()), 0)?;
            }
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let n = usize::from(op - TUPLE1 + 1);
                let mut items = vec![Val::None; n];
                for slot in items.iter_mut().rev() {
                    *slot = self.pop()?;
                }
                self.push_node(Node::Tuple(items.into_boxed_slice()), n * 16)?;
            }
            b']' => self.push_node(Node::List(Vec::new()), 0)?,
            b'l' => {
                let items = self.pop_mark()?;
                self.push_node(Node::List(items), 0)?;
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![self.pop()?]
                } else {
                    self.pop_mark()?
                };
                let list = self.top()?;
                self.append(list, items)?;
            }
            EMPTY_DICT => self.push_node(Node::Dict(Vec::new()), 0)?,
            b'd' => {
                let items = self.pop_mark()?;
                let d = self.alloc(Node::Dict(Vec::new()), 0)?;
                self.set_items(d, items)?;
                self.push(d)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let d = self.top()?;
                self.set_items(d, vec![k, v])?;
            }
            SETITEMS => {
                let items = self.pop_mark()?;
                let d = self.top()?;
                self.set_items(d, items)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Memo opcodes. Returns `false` for an opcode that is not one.
    fn memo_op(&mut self, op: u8) -> Result<bool, UnpickleError> {
        match op {
            BINPUT => {
                let i = u32::from(self.u8()?);
                self.memo_put(i)?;
            }
            LONG_BINPUT => {
                let i = self.u32()?;
                self.memo_put(i)?;
            }
            0x94 => {
                let n = self.memo.len() + self.memo_sparse.len();
                let i = u32::try_from(n).map_err(|_| bad("memo overflow"))?;
                self.memo_put(i)?;
            }
            b'p' => {
                let s = self.line()?;
                let i = s
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("bad PUT {:?}", clip(s))))?;
                self.memo_put(i)?;
            }
            BINGET => {
                let i = u32::from(self.u8()?);
                self.memo_get(i)?;
            }
            LONG_BINGET => {
                let i = self.u32()?;
                self.memo_get(i)?;
            }
            b'g' => {
                let s = self.line()?;
                let i = s
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("bad GET {:?}", clip(s))))?;
                self.memo_get(i)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Stack, call and persistent-id opcodes. Returns `false` for an opcode that is not one.
    fn other(&mut self, op: u8) -> Result<bool, UnpickleError> {
        match op {
            PROTO => {
                let v = self.u8()?;
                if v > 5 {
                    return Err(bad(format!("unsupported protocol {v}")));
                }
            }
            // FRAME: just a length hint.
            0x95 => {
                self.u64()?;
            }
            MARK => self.push_mark()?,
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?;
                self.push(v)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Some(module), Some(name)) = (self.str_of(module), self.str_of(name)) else {
                    return Err(bad("STACK_GLOBAL operands are not strings"));
                };
                let g = resolve_global(module, name)?;
                self.push(Val::Global(g))?;
            }
            REDUCE => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = self.reduce(func, args)?;
                self.push(v)?;
            }
            b'b' => {
                // BUILD: state for an OrderedDict (`_metadata`) or a tensor; ignored.
                self.pop()?;
                let top = self.top()?;
                if !matches!(
                    self.nodes.get(ref_index(top)),
                    Some(Node::Dict(_) | Node::Tensor(_))
                ) {
                    return Err(bad(format!("BUILD on a {}", self.kind(top))));
                }
            }
            BINPERSID => {
                let pid = self.pop()?;
                let v = self.persistent_load(pid)?;
                self.push(v)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn run(mut self) -> Result<Graph, UnpickleError> {
        loop {
            let at = self.pos;
            let op = self.u8().map_err(|_| bad("ends without STOP"))?;
            if op == STOP {
                let root = self.pop()?;
                if !self.stack.is_empty() || !self.marks.is_empty() {
                    return Err(bad("STOP with values left on the stack"));
                }
                return Ok(Graph {
                    nodes: self.nodes,
                    root,
                });
            }
            let known = self.literal(op)?
                || self.text(op)?
                || self.container(op)?
                || self.memo_op(op)?
                || self.other(op)?;
            if !known {
                return Err(bad(format!("unsupported opcode 0x{op:02x} at offset {at}")));
            }
        }
    }
}

/// Unpickles `data` with the restricted unpickler.
pub(crate) fn unpickle(data: &[u8]) -> Result<Graph, UnpickleError> {
    unpickle_with_budget(data, graph_budget(data.len()))
}

fn unpickle_with_budget(data: &[u8], budget: usize) -> Result<Graph, UnpickleError> {
    if data.len() as u64 > MAX_PICKLE {
        return Err(bad(format!(
            "data.pkl is {} bytes; state dicts pickle to far less than the {MAX_PICKLE}-byte limit",
            data.len()
        )));
    }
    Unpickler {
        data,
        pos: 0,
        // Reserved, not touched: memory is only used as the pickle fills it, and the vectors
        // never reallocate (a copy would double their peak).
        nodes: Vec::with_capacity(budget / std::mem::size_of::<Node>()),
        stack: Vec::with_capacity(budget / std::mem::size_of::<Val>()),
        marks: Vec::with_capacity(budget / std::mem::size_of::<usize>()),
        memo: Vec::with_capacity(budget / std::mem::size_of::<Option<Val>>()),
        memo_sparse: HashMap::new(),
        budget,
        stack_high: 0,
        marks_high: 0,
    }
    .run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict_items(g: &Graph, v: Val) -> &[(Val, Val)] {
        match g.node(v) {
            Some(Node::Dict(d)) => d,
            _ => panic!("not a dict: {}", g.kind(v)),
        }
    }

    #[test]
    fn writer_output_reads_back() {
        let metas = vec![
            TensorMeta::new("a", DType::F16, vec![2, 2]),
            TensorMeta::new("b", DType::BF16, vec![]),
            TensorMeta::new("c", DType::F32, vec![3, 0, 5, 70_000]),
        ];
        let p = state_dict_pickle(&metas, true);
        let g = unpickle(&p).unwrap();
        let top = dict_items(&g, g.root);
        assert_eq!(top.len(), 1);
        let sd = dict_items(&g, top[0].1);
        assert_eq!(sd.len(), 3);
        let Some(Node::Tensor(c)) = g.node(sd[2].1) else {
            panic!("not a tensor")
        };
        assert_eq!(c.shape, vec![3, 0, 5, 70_000]);
        assert_eq!(c.stride, contiguous_strides(&[3, 0, 5, 70_000]));
        assert_eq!(c.storage.key, "2");
        assert_eq!(c.storage.dtype, DType::F32);
    }

    #[test]
    fn writer_matches_torch_bytes_for_the_spec_example() {
        // data.pkl of the torch 2.11 file described in pt-format-torch-2.11.md, byte for byte
        // (the metas are given in torch's insertion order here; write_pt sorts before this).
        let metas = vec![
            TensorMeta::new(
                "model.layers.1.mlp.experts.4.gate_up_proj",
                DType::F16,
                vec![2, 2],
            ),
            TensorMeta::new(
                "model.layers.1.mlp.experts.4.down_proj",
                DType::BF16,
                vec![1, 2],
            ),
        ];
        let p = state_dict_pickle(&metas, true);
        let torch = hex::decode(concat!(
            "80027d71005810000000",
            "6d6f64656c5f73746174655f64696374",
            "71017d710228",
            "5829000000",
            "6d6f64656c2e6c61796572732e312e6d6c702e657870657274732e342e676174655f75705f70726f6a",
            "7103",
            "63746f7263682e5f7574696c730a5f72656275696c645f74656e736f725f76320a7104",
            "2828",
            "5807000000",
            "73746f72616765",
            "7105",
            "63746f7263680a48616c6653746f726167650a7106",
            "580100000030",
            "7107",
            "5803000000637075",
            "7108",
            "4b04",
            "74",
            "7109",
            "51",
            "4b00",
            "4b024b0286710a",
            "4b024b0186710b",
            "89",
            "63636f6c6c656374696f6e730a4f726465726564446963740a710c",
            "29",
            "52710d",
            "74710e",
            "52710f",
            "5826000000",
            "6d6f64656c2e6c61796572732e312e6d6c702e657870657274732e342e646f776e5f70726f6a",
            "7110",
            "6804",
            "2828",
            "6805",
            "63746f7263680a42466c6f6174313653746f726167650a7111",
            "580100000031",
            "7112",
            "6808",
            "4b02",
            "74",
            "7113",
            "51",
            "4b00",
            "4b014b02867114",
            "4b024b01867115",
            "89",
            "680c",
            "29",
            "527116",
            "747117",
            "527118",
            "75",
            "73",
            "2e"
        ))
        .unwrap();
        assert_eq!(hex::encode(&p), hex::encode(&torch));
    }

    #[test]
    fn rejects_foreign_globals_without_running_them() {
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        assert_eq!(
            unpickle(p).unwrap_err(),
            UnpickleError::Forbidden("os.system".into())
        );
        let p = b"\x80\x02ctorch\nComplexFloatStorage\n.";
        assert_eq!(
            unpickle(p).unwrap_err(),
            UnpickleError::UnknownStorage("torch.ComplexFloatStorage".into())
        );
    }

    /// Ok, or refused for its memory: never a crash.
    fn ok_or_over_budget(p: &[u8]) -> bool {
        match unpickle(p) {
            Ok(_) => true,
            Err(UnpickleError::Bad(m)) => {
                assert!(m.contains("bytes of memory"), "{m}");
                false
            }
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn deeply_nested_containers_do_not_overflow_the_stack() {
        for depth in [10_000, 1_000_000] {
            let mut p = vec![PROTO, 2, BININT1, 0];
            p.extend(std::iter::repeat_n(TUPLE1, depth));
            p.push(STOP);
            ok_or_over_budget(&p);
            // Lists nested by APPEND, then discarded with POP.
            let mut p = vec![PROTO, 2];
            p.extend(std::iter::repeat_n(b']', depth));
            p.extend(std::iter::repeat_n(b'a', depth - 1));
            p.extend_from_slice(&[b'0', b'N', STOP]);
            ok_or_over_budget(&p);
            // Left on the stack by an error.
            let mut p = vec![PROTO, 2];
            p.extend(std::iter::repeat_n(b']', depth / 2));
            p.extend(std::iter::repeat_n(b'a', depth / 2 - 1));
            p.push(0xff);
            assert!(matches!(unpickle(&p), Err(UnpickleError::Bad(_))));
            // Dicts nested by SETITEM.
            let mut p = vec![PROTO, 2];
            for _ in 0..depth / 3 {
                p.extend_from_slice(&[EMPTY_DICT, b'N']);
            }
            p.extend_from_slice(&[EMPTY_DICT]);
            p.extend(std::iter::repeat_n(b's', depth / 3));
            p.push(STOP);
            ok_or_over_budget(&p);
        }
        // 10k levels fit the budget of a pickle that size.
        let mut p = vec![PROTO, 2, BININT1, 0];
        p.extend(std::iter::repeat_n(TUPLE1, 5_000));
        p.push(STOP);
        assert!(ok_or_over_budget(&p));
    }

    #[test]
    fn real_state_dicts_use_under_two_thirds_of_their_budget() {
        // The full DeepSeek-V2-Lite layout: 26 MoE layers x 64 experts x 3 projections, plus
        // attention, norms and gates, in bf16.
        let mut metas = Vec::new();
        for l in 0..27 {
            for e in 0..64 {
                for p in ["gate_proj", "up_proj", "down_proj"] {
                    let name = format!("model.layers.{l}.mlp.experts.{e}.{p}.weight");
                    metas.push(TensorMeta::new(name, DType::BF16, vec![1408, 2048]));
                }
            }
            for p in [
                "self_attn.q_proj",
                "self_attn.kv_a_proj_with_mqa",
                "input_layernorm",
            ] {
                let name = format!("model.layers.{l}.{p}.weight");
                metas.push(TensorMeta::new(name, DType::BF16, vec![2048]));
            }
        }
        metas.sort_by(|a, b| a.name.cmp(&b.name));
        for (n, wrap) in [(metas.len(), true), (200, false), (1, true)] {
            let p = state_dict_pickle(&metas[..n], wrap);
            assert!((p.len() as u64) < MAX_PICKLE / 2, "{}", p.len());
            let part = graph_budget(p.len()) * 2 / 3;
            assert!(
                unpickle_with_budget(&p, part).is_ok(),
                "{n} tensors, {} bytes",
                p.len()
            );
        }
    }

    #[test]
    fn memo_and_dup_share_instead_of_copying() {
        // A 1 MB string fetched 100k times (each BINGET would copy 1 MB if it copied).
        let mut p = vec![PROTO, 2, b']', BINUNICODE];
        p.extend_from_slice(&(1u32 << 20).to_le_bytes());
        p.extend(std::iter::repeat_n(b'x', 1 << 20));
        p.extend_from_slice(&[BINPUT, 0, b'0']);
        for _ in 0..100_000 {
            p.extend_from_slice(&[BINGET, 0, b'a']);
        }
        p.push(STOP);
        let g = unpickle(&p).unwrap();
        assert_eq!(g.kind(g.root), "list");
        // DUP chains.
        let mut p = vec![PROTO, 2, b'N'];
        p.extend(std::iter::repeat_n(b'2', 200_000));
        p.push(b'1');
        assert!(unpickle(&p).is_err());
    }

    #[test]
    fn amplification_beyond_the_budget_is_refused() {
        // OrderedDict(pairs) rebuilt from the same 10k-pair list over and over copies the pairs.
        let mut p = vec![PROTO, 2, GLOBAL];
        p.extend_from_slice(b"collections\nOrderedDict\n");
        p.extend_from_slice(&[BINPUT, 0, b'0', b']']);
        p.extend_from_slice(&[b'N', b'N', TUPLE2, BINPUT, 1, b'0', MARK]);
        p.extend(std::iter::repeat_n([BINGET, 1], 10_000).flatten());
        p.extend_from_slice(&[b'e', BINPUT, 2, b'0']);
        for _ in 0..20_000 {
            p.extend_from_slice(&[BINGET, 0, BINGET, 2, TUPLE1, REDUCE, b'0']);
        }
        p.extend_from_slice(&[b'N', STOP]);
        let e = unpickle(&p).unwrap_err();
        assert!(
            matches!(&e, UnpickleError::Bad(m) if m.contains("bytes of memory")),
            "{e:?}"
        );
    }

    #[test]
    fn truncated_and_garbage_pickles_are_errors() {
        let metas = vec![TensorMeta::new("a", DType::F16, vec![2, 2])];
        let p = state_dict_pickle(&metas, false);
        for cut in 0..p.len() {
            assert!(
                matches!(unpickle(&p[..cut]), Err(UnpickleError::Bad(_))),
                "cut at {cut}"
            );
        }
        assert!(unpickle(b"hello world").is_err());
    }
}
