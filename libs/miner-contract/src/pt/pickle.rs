//! Pickle protocol 2, both ways, for torch state dicts only.
//!
//! The writer emits what Python's pickler emits for `torch.save` of a dict of dense tensors
//! (memoized globals and strings, `BININT*` sizes, `TUPLE1/2/3`, batched `SETITEMS`).
//! The reader is a restricted unpickler: it knows the opcodes a state dict uses and only the
//! globals needed to rebuild dense tensors (`torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, `collections.OrderedDict`, the dense `torch.*Storage`
//! classes). Any other global is an error; nothing is ever called or imported.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

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

/// A storage named by a persistent id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    pub key: String,
    pub dtype: DType,
    pub numel: u64,
}

/// A tensor view on a storage, as `_rebuild_tensor_v2` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    pub storage: Rc<StorageRef>,
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

#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    // Floats and bytes never matter to a state dict; their payload is parsed but unused.
    Float(#[allow(dead_code)] f64),
    Str(String),
    Bytes(#[allow(dead_code)] Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    /// `dict` and `OrderedDict` (items in insertion order; a repeated key appears twice and the
    /// later one wins).
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class/function",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
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
            .ok_or_else(|| UnpickleError::UnknownStorage(format!("torch.{n}"))),
        _ => Err(UnpickleError::Forbidden(format!("{module}.{name}"))),
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

fn bad(msg: impl Into<String>) -> UnpickleError {
    UnpickleError::Bad(msg.into())
}

fn as_usize(v: &Value, what: &str) -> Result<usize, UnpickleError> {
    match v {
        Value::Int(i) if *i >= 0 => {
            usize::try_from(*i).map_err(|_| bad(format!("{what} {i} too large")))
        }
        Value::Bool(b) => Ok(usize::from(*b)),
        other => Err(bad(format!(
            "{what} is a {} not a non-negative int",
            other.kind()
        ))),
    }
}

fn int_tuple(v: &Value, what: &str) -> Result<Vec<usize>, UnpickleError> {
    match v {
        Value::Tuple(items) => items.iter().map(|x| as_usize(x, what)).collect(),
        Value::List(items) => items.borrow().iter().map(|x| as_usize(x, what)).collect(),
        other => Err(bad(format!("{what} is a {} not a tuple", other.kind()))),
    }
}

impl<'a> Unpickler<'a> {
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

    fn pop(&mut self) -> Result<Value, UnpickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(bad("stack underflow (pop past a mark)"));
        }
        self.stack.pop().ok_or_else(|| bad("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value, UnpickleError> {
        self.stack.last_mut().ok_or_else(|| bad("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, UnpickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| bad("no mark on the stack"))?;
        if m > self.stack.len() {
            return Err(bad("mark above the stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, i: u32) -> Result<(), UnpickleError> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| bad("memoize on an empty stack"))?;
        self.memo.insert(i, v);
        Ok(())
    }

    fn memo_get(&mut self, i: u32) -> Result<(), UnpickleError> {
        let v = self
            .memo
            .get(&i)
            .cloned()
            .ok_or_else(|| bad(format!("memo key {i} not defined")))?;
        self.stack.push(v);
        Ok(())
    }

    fn set_items(dict: &Value, items: Vec<Value>) -> Result<(), UnpickleError> {
        let Value::Dict(d) = dict else {
            return Err(bad(format!("SETITEM(S) on a {}", dict.kind())));
        };
        if !items.len().is_multiple_of(2) {
            return Err(bad("SETITEMS with an odd number of items"));
        }
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn reduce(&mut self, func: Value, args: Value) -> Result<Value, UnpickleError> {
        let Value::Tuple(args) = args else {
            return Err(bad(format!(
                "REDUCE arguments are a {} not a tuple",
                args.kind()
            )));
        };
        match func {
            Value::Global(Global::OrderedDict) => {
                let d = Value::Dict(Rc::new(RefCell::new(Vec::new())));
                match args.as_slice() {
                    [] => {}
                    [Value::List(pairs)] => {
                        for p in pairs.borrow().iter() {
                            let (k, v) = match p {
                                Value::Tuple(kv) if kv.len() == 2 => (kv[0].clone(), kv[1].clone()),
                                _ => return Err(bad("OrderedDict item is not a pair")),
                            };
                            Self::set_items(&d, vec![k, v])?;
                        }
                    }
                    _ => return Err(bad("OrderedDict called with unexpected arguments")),
                }
                Ok(d)
            }
            Value::Global(Global::RebuildTensorV2) => {
                if args.len() != 6 && args.len() != 7 {
                    return Err(bad(format!(
                        "_rebuild_tensor_v2 takes 6 or 7 arguments, got {}",
                        args.len()
                    )));
                }
                let Value::Storage(storage) = &args[0] else {
                    return Err(bad(format!(
                        "_rebuild_tensor_v2 storage is a {}",
                        args[0].kind()
                    )));
                };
                let offset = as_usize(&args[1], "storage offset")? as u64;
                let shape = int_tuple(&args[2], "size")?;
                let stride = int_tuple(&args[3], "stride")?;
                if shape.len() != stride.len() {
                    return Err(bad(format!(
                        "size has {} dims but stride has {}",
                        shape.len(),
                        stride.len()
                    )));
                }
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: storage.clone(),
                    offset,
                    shape,
                    stride,
                })))
            }
            Value::Global(Global::RebuildParameter) => match args.first() {
                Some(t @ Value::Tensor(_)) if args.len() == 3 => Ok(t.clone()),
                _ => Err(bad(
                    "_rebuild_parameter expects (tensor, requires_grad, hooks)",
                )),
            },
            Value::Global(Global::Storage(d)) => Err(bad(format!(
                "storage class {} called directly",
                d.storage_class()
            ))),
            other => Err(bad(format!("REDUCE on a {}", other.kind()))),
        }
    }

    fn persistent_load(pid: Value) -> Result<Value, UnpickleError> {
        let Value::Tuple(t) = pid else {
            return Err(bad(format!(
                "persistent id is a {} not a tuple",
                pid.kind()
            )));
        };
        match t.as_slice() {
            [Value::Str(tag), cls, key, _location, numel] if tag == "storage" => {
                let dtype = match cls {
                    Value::Global(Global::Storage(d)) => *d,
                    other => {
                        return Err(bad(format!(
                            "persistent storage type is a {}",
                            other.kind()
                        )));
                    }
                };
                let key = match key {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    other => return Err(bad(format!("storage key is a {}", other.kind()))),
                };
                if key.is_empty() || key.contains('/') || key.contains("..") {
                    return Err(bad(format!("storage key {key:?} is not a record name")));
                }
                let numel = as_usize(numel, "storage size")? as u64;
                Ok(Value::Storage(Rc::new(StorageRef { key, dtype, numel })))
            }
            _ => Err(bad(
                "persistent id is not ('storage', type, key, location, numel)",
            )),
        }
    }

    fn run(mut self) -> Result<Value, UnpickleError> {
        loop {
            let at = self.pos;
            let op = self.u8().map_err(|_| bad("ends without STOP"))?;
            match op {
                PROTO => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(bad(format!("unsupported protocol {v}")));
                    }
                }
                0x95 => {
                    // FRAME: just a length hint.
                    self.u64()?;
                }
                STOP => {
                    let v = self.pop()?;
                    if !self.stack.is_empty() || !self.marks.is_empty() {
                        return Err(bad("STOP with values left on the stack"));
                    }
                    return Ok(v);
                }
                MARK => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                NEWTRUE => self.stack.push(Value::Bool(true)),
                NEWFALSE => self.stack.push(Value::Bool(false)),
                BININT => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                BININT1 => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                BININT2 => {
                    let b = self.take(2)?;
                    self.stack
                        .push(Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))));
                }
                LONG1 | 0x8b => {
                    let n = if op == LONG1 {
                        u64::from(self.u8()?)
                    } else {
                        u64::from(self.u32()?)
                    };
                    let n = self.len_arg(n)?;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(bad(format!("integer of {n} bytes is too large")));
                    }
                    let mut a = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    a[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(a)));
                }
                b'I' => {
                    let s = self.line()?;
                    let v = match s {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(
                            s.trim()
                                .parse()
                                .map_err(|_| bad(format!("bad INT {s:?}")))?,
                        ),
                    };
                    self.stack.push(v);
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                BINUNICODE | 0x8c | 0x8d => {
                    let n = match op {
                        BINUNICODE => u64::from(self.u32()?),
                        0x8c => u64::from(self.u8()?),
                        _ => self.u64()?,
                    };
                    let n = self.len_arg(n)?;
                    let s = std::str::from_utf8(self.take(n)?)
                        .map_err(|_| bad("string is not UTF-8"))?;
                    self.stack.push(Value::Str(s.to_string()));
                }
                b'U' | b'T' => {
                    let n = if op == b'U' {
                        u64::from(self.u8()?)
                    } else {
                        u64::from(self.u32()?)
                    };
                    let n = self.len_arg(n)?;
                    let s: String = self.take(n)?.iter().map(|&c| char::from(c)).collect();
                    self.stack.push(Value::Str(s));
                }
                b'C' | b'B' | 0x8e => {
                    let n = match op {
                        b'C' => u64::from(self.u8()?),
                        b'B' => u64::from(self.u32()?),
                        _ => self.u64()?,
                    };
                    let n = self.len_arg(n)?;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                EMPTY_TUPLE => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                TUPLE => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                TUPLE1 | TUPLE2 | TUPLE3 => {
                    let n = usize::from(op - TUPLE1 + 1);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b']' => self
                    .stack
                    .push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![self.pop()?]
                    } else {
                        self.pop_mark()?
                    };
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        other => return Err(bad(format!("APPEND to a {}", other.kind()))),
                    }
                }
                EMPTY_DICT => self
                    .stack
                    .push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Rc::new(RefCell::new(Vec::new())));
                    Self::set_items(&d, items)?;
                    self.stack.push(d);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?.clone();
                    Self::set_items(&d, vec![k, v])?;
                }
                SETITEMS => {
                    let items = self.pop_mark()?;
                    let d = self.top()?.clone();
                    Self::set_items(&d, items)?;
                }
                GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = resolve_global(module, name)?;
                    self.stack.push(Value::Global(g));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(bad("STACK_GLOBAL operands are not strings"));
                    };
                    let g = resolve_global(&module, &name)?;
                    self.stack.push(Value::Global(g));
                }
                REDUCE => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(func, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: state for an OrderedDict (`_metadata`) or a tensor; ignored.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => return Err(bad(format!("BUILD on a {}", other.kind()))),
                    }
                }
                BINPERSID => {
                    let pid = self.pop()?;
                    let v = Self::persistent_load(pid)?;
                    self.stack.push(v);
                }
                BINPUT => {
                    let i = u32::from(self.u8()?);
                    self.memo_put(i)?;
                }
                LONG_BINPUT => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'p' => {
                    let s = self.line()?;
                    let i = s
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("bad PUT {s:?}")))?;
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
                        .map_err(|_| bad(format!("bad GET {s:?}")))?;
                    self.memo_get(i)?;
                }
                other => {
                    return Err(bad(format!(
                        "unsupported opcode 0x{other:02x} at offset {at}"
                    )));
                }
            }
        }
    }
}

/// Unpickles `data` with the restricted unpickler.
/// The object graph is torn down by [`dismantle`] when this is dropped.
pub(crate) fn unpickle(data: &[u8]) -> Result<Unpickled, UnpickleError> {
    Unpickler {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
    .map(Unpickled)
}

/// An unpickled object whose drop cannot overflow the stack however deeply it nests.
#[derive(Debug)]
pub(crate) struct Unpickled(pub Value);

impl std::ops::Deref for Unpickled {
    type Target = Value;
    fn deref(&self) -> &Value {
        &self.0
    }
}

impl Drop for Unpickled {
    fn drop(&mut self) {
        dismantle(std::mem::replace(&mut self.0, Value::None));
    }
}

impl Drop for Unpickler<'_> {
    fn drop(&mut self) {
        for v in self.stack.drain(..) {
            dismantle(v);
        }
        for (_, v) in self.memo.drain() {
            dismantle(v);
        }
    }
}

/// Drops a value without recursion: a hostile pickle can nest containers millions deep (two
/// bytes per level), and the derived recursive drop would overflow the stack.
pub(crate) fn dismantle(root: Value) {
    let mut work = vec![root];
    while let Some(v) = work.pop() {
        match v {
            // Only the last owner takes the children apart; other owners just decrement.
            Value::Tuple(rc) => {
                if let Ok(items) = Rc::try_unwrap(rc) {
                    work.extend(items);
                }
            }
            Value::List(rc) => {
                if let Ok(items) = Rc::try_unwrap(rc) {
                    work.extend(items.into_inner());
                }
            }
            Value::Dict(rc) => {
                if let Ok(items) = Rc::try_unwrap(rc) {
                    for (k, v) in items.into_inner() {
                        work.push(k);
                        work.push(v);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_output_reads_back() {
        let metas = vec![
            TensorMeta::new("a", DType::F16, vec![2, 2]),
            TensorMeta::new("b", DType::BF16, vec![]),
            TensorMeta::new("c", DType::F32, vec![3, 0, 5, 70_000]),
        ];
        let p = state_dict_pickle(&metas, true);
        let v = unpickle(&p).unwrap();
        let Value::Dict(top) = &*v else {
            panic!("not a dict")
        };
        let top = top.borrow();
        assert_eq!(top.len(), 1);
        let Value::Dict(sd) = &top[0].1 else {
            panic!("inner not a dict")
        };
        let sd = sd.borrow();
        assert_eq!(sd.len(), 3);
        let Value::Tensor(c) = &sd[2].1 else {
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

    #[test]
    fn deeply_nested_containers_do_not_overflow_the_stack() {
        let depth = 1_000_000;
        let mut p = vec![PROTO, 2, BININT1, 0];
        p.extend(std::iter::repeat_n(TUPLE1, depth));
        p.push(STOP);
        let v = unpickle(&p).unwrap();
        assert_eq!(v.kind(), "tuple");
        drop(v);
        // Lists nested by APPEND, left on the stack by an error.
        let mut p = vec![PROTO, 2];
        p.extend(std::iter::repeat_n(b']', depth / 2));
        p.extend(std::iter::repeat_n(b'a', depth / 2 - 1));
        p.push(0xff);
        assert!(matches!(unpickle(&p), Err(UnpickleError::Bad(_))));
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
