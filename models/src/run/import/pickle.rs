//! A reader of the pickles `torch.save` writes for a state_dict, that executes nothing.
//!
//! A pickle is a program for a small stack machine; Python's own reader runs it, and its
//! GLOBAL and REDUCE opcodes import any function and call it, so loading a pickle from a
//! stranger runs the stranger's code. This reader interprets only the opcodes a saved
//! state_dict uses, builds plain values from them, and treats the few functions a state_dict
//! names (an allow-list: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, the
//! storage classes, and the inert helpers DeepSpeed's checkpoint wrapper pickles) as tags that
//! say which value to build. Any other global, any REDUCE of something not on the list, and
//! any opcode outside the subset is refused, in one line naming it. Nothing is imported or
//! called.
//!
//! Objects are copied out of the memo when fetched again (Python shares them); a state_dict
//! never mutates a container after referring to it twice, so the result is the same.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use tokenformer_core::{Error, Result};

/// The element types a torch storage can hold, as far as this reader knows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    Bf16,
    F64,
    U8,
    I8,
    I16,
    I32,
    I64,
    Bool,
}

impl StorageDtype {
    pub fn size(self) -> u64 {
        match self {
            StorageDtype::U8 | StorageDtype::I8 | StorageDtype::Bool => 1,
            StorageDtype::F16 | StorageDtype::Bf16 | StorageDtype::I16 => 2,
            StorageDtype::F32 | StorageDtype::I32 => 4,
            StorageDtype::F64 | StorageDtype::I64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StorageDtype::F32 => "float32",
            StorageDtype::F16 => "float16",
            StorageDtype::Bf16 => "bfloat16",
            StorageDtype::F64 => "float64",
            StorageDtype::U8 => "uint8",
            StorageDtype::I8 => "int8",
            StorageDtype::I16 => "int16",
            StorageDtype::I32 => "int32",
            StorageDtype::I64 => "int64",
            StorageDtype::Bool => "bool",
        }
    }

    fn from_storage_class(name: &str) -> Option<StorageDtype> {
        Some(match name {
            "FloatStorage" => StorageDtype::F32,
            "HalfStorage" => StorageDtype::F16,
            "BFloat16Storage" => StorageDtype::Bf16,
            "DoubleStorage" => StorageDtype::F64,
            "ByteStorage" => StorageDtype::U8,
            "CharStorage" => StorageDtype::I8,
            "ShortStorage" => StorageDtype::I16,
            "IntStorage" => StorageDtype::I32,
            "LongStorage" => StorageDtype::I64,
            "BoolStorage" => StorageDtype::Bool,
            _ => return None,
        })
    }
}

/// A storage as the pickle refers to it: its bytes are the archive entry `data/<key>`.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: StorageDtype,
    /// Elements the pickle says the storage holds (checked against the entry's size).
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a view of a storage.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub dims: Vec<u64>,
    pub strides: Vec<u64>,
}

/// The globals a state_dict (or DeepSpeed's wrapper around one) may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(StorageDtype),
    /// `torch.Size`: called with a tuple, gives that tuple.
    Size,
    /// `builtins.set` / `frozenset`: called with a list, gives that list.
    Set,
    /// numpy's array and dtype reconstruction and `_codecs.encode`, which DeepSpeed's wrapper
    /// uses for the saved random-generator states: kept as inert values, never inspected.
    Inert(&'static str),
}

const ALLOWED: &[(&str, &str, Global)] = &[
    ("collections", "OrderedDict", Global::OrderedDict),
    ("torch._utils", "_rebuild_tensor_v2", Global::RebuildTensor),
    ("torch._utils", "_rebuild_parameter", Global::RebuildParameter),
    ("torch", "Size", Global::Size),
    ("builtins", "set", Global::Set),
    ("builtins", "frozenset", Global::Set),
    ("__builtin__", "set", Global::Set),
    ("numpy.core.multiarray", "_reconstruct", Global::Inert("numpy array")),
    ("numpy._core.multiarray", "_reconstruct", Global::Inert("numpy array")),
    ("numpy.core.multiarray", "scalar", Global::Inert("numpy scalar")),
    ("numpy._core.multiarray", "scalar", Global::Inert("numpy scalar")),
    ("numpy", "ndarray", Global::Inert("numpy.ndarray")),
    ("numpy", "dtype", Global::Inert("numpy dtype")),
    ("_codecs", "encode", Global::Inert("bytes")),
];

fn allowed_global(module: &str, name: &str) -> Option<Global> {
    if module == "torch" {
        if let Some(dtype) = StorageDtype::from_storage_class(name) {
            return Some(Global::Storage(dtype));
        }
    }
    ALLOWED.iter().find(|(m, n, _)| *m == module && *n == name).map(|&(_, _, g)| g)
}

/// A value the pickle built. Containers are shared (`Rc`) so that fetching one from the memo
/// costs nothing, however often a hostile pickle does it.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<Vec<Value>>),
    /// Keys in insertion order (an OrderedDict or a dict: both keep it).
    Dict(Rc<Vec<(Value, Value)>>),
    Global(Global, Rc<str>),
    Storage(StorageRef),
    Tensor(Rc<TensorRef>),
    /// Something this reader does not look into (numpy arrays of an RNG state, …).
    Inert(&'static str),
}

impl Value {
    /// What the value is, for messages.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an integer".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(_, name) => format!("the global {name}"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
            Value::Inert(what) => format!("a {what}"),
        }
    }
}

/// A pickle of more than this is not a state_dict's (the 1.5B model's is well under 1 MB).
pub const PICKLE_LIMIT: u64 = 64 << 20;
/// Bounds on the machine, so that a hostile pickle cannot exhaust memory through them.
const STACK_LIMIT: usize = 1 << 20;
const MEMO_LIMIT: usize = 1 << 22;
const DIMS_LIMIT: usize = 64;
/// Elements copied when a container shared with the memo is changed (copy on write). A
/// state_dict costs none; a pickle that alternates PUT and SETITEM on one large dict would
/// otherwise cost time quadratic in its length.
const COPY_LIMIT: usize = 1 << 24;

/// Runs the pickle `bytes` (from `path`, for messages) and returns the value it leaves.
pub fn load(path: &Path, bytes: &[u8]) -> Result<Value> {
    Machine {
        path,
        bytes,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copied: 0,
    }
    .run()
}

struct Machine<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Elements copied on write so far (see `COPY_LIMIT`).
    copied: usize,
}

impl Machine<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(self.path.display(), format!("pickle: {msg}"))
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.err(format!(
                "truncated: an opcode at byte {} wants {n} more bytes than the pickle has",
                self.pos
            )));
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.bytes[self.pos..];
        let Some(len) = rest.iter().take(256).position(|&b| b == b'\n') else {
            return Err(self.err("truncated or overlong name after GLOBAL"));
        };
        let text = String::from_utf8(rest[..len].to_vec())
            .map_err(|_| self.err("a GLOBAL name that is not UTF-8"))?;
        self.pos += len + 1;
        Ok(text)
    }

    fn text(&mut self, len: u64) -> Result<Value> {
        let len = usize::try_from(len).map_err(|_| self.err("string length overflows"))?;
        let at = self.pos;
        let b = self.take(len)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(s.into())),
            Err(_) => Err(self.err(format!("the string at byte {at} is not UTF-8"))),
        }
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= STACK_LIMIT {
            return Err(self.err(format!("the stack grows past {STACK_LIMIT} values")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(format!("stack underflow at byte {}", self.pos)));
        }
        Ok(self.stack.pop().expect("checked"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(format!("stack underflow at byte {}", self.pos)));
        }
        Ok(self.stack.last_mut().expect("checked"))
    }

    /// The values pushed since the last MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let Some(height) = self.marks.pop() else {
            return Err(self.err(format!("an opcode at byte {} needs a MARK", self.pos)));
        };
        Ok(self.stack.split_off(height))
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let v = self.top()?.clone();
        if self.memo.len() >= MEMO_LIMIT && !self.memo.contains_key(&key) {
            return Err(self.err(format!("the memo grows past {MEMO_LIMIT} entries")));
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<()> {
        let v =
            self.memo.get(&key).cloned().ok_or_else(|| {
                self.err(format!("memo entry {key} is fetched before it is stored"))
            })?;
        self.push(v)
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO: torch.save writes 2; 3–5 only add opcodes this reader also knows.
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.err(format!("unknown pickle protocol {proto}")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint for buffered readers.
                }
                b'.' => {
                    // STOP
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => {
                    self.marks.push(self.stack.len());
                    if self.marks.len() > STACK_LIMIT {
                        return Err(self.err("too many nested MARKs"));
                    }
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v.into()))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v.into()))?
                }
                0x8a => {
                    // LONG1: a little-endian two's-complement integer of n bytes.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    if n > 8 {
                        return Err(self.err(format!("an integer of {n} bytes at byte {at}")));
                    }
                    let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xff } else { 0 };
                    let mut full = [fill; 8];
                    full[..n].copy_from_slice(&b);
                    self.push(Value::Int(i64::from_le_bytes(full)))?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.push(Value::Float(v))?
                }
                b'X' => {
                    let len = self.u32()?;
                    let v = self.text(len.into())?;
                    self.push(v)?
                }
                0x8c => {
                    let len = self.u8()?;
                    let v = self.text(len.into())?;
                    self.push(v)?
                }
                0x8d => {
                    let len = self.u64()?;
                    let v = self.text(len)?;
                    self.push(v)?
                }
                b'C' | b'B' | 0x8e => {
                    // SHORT_BINBYTES, BINBYTES, BINBYTES8
                    let len = match op {
                        b'C' => u64::from(self.u8()?),
                        b'B' => u64::from(self.u32()?),
                        _ => self.u64()?,
                    };
                    let len =
                        usize::try_from(len).map_err(|_| self.err("bytes length overflows"))?;
                    let b: Rc<[u8]> = self.take(len)?.into();
                    self.push(Value::Bytes(b))?
                }
                b')' => self.push(Value::Tuple(Rc::new(Vec::new())))?,
                b']' => self.push(Value::List(Rc::new(Vec::new())))?,
                b'}' => self.push(Value::Dict(Rc::new(Vec::new())))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Rc::new(items)))?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(items)))?
                }
                b'a' => {
                    let item = self.pop()?;
                    self.append(vec![item])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Rc::new(Vec::new())))?;
                    self.set_items(items)?
                }
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(k.into())?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()?;
                    self.memo_get(k.into())?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let v = self.global(&module, &name)?;
                    self.push(v)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.err("STACK_GLOBAL wants two strings"));
                    };
                    let v = self.global(module, name)?;
                    self.push(v)?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v)?
                }
                b'b' => {
                    let state = self.pop()?;
                    self.build(state)?
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?
                }
                b'1' => {
                    self.pop_mark()?;
                }
                _ => {
                    return Err(self.err(format!(
                        "opcode {} (0x{op:02x}) at byte {at} is outside the subset a saved \
                         state_dict uses; refused, nothing was executed",
                        opcode_name(op)
                    )))
                }
            }
        }
    }

    fn global(&self, module: &str, name: &str) -> Result<Value> {
        match allowed_global(module, name) {
            Some(g) => Ok(Value::Global(g, format!("{module}.{name}").into())),
            None => Err(self.err(format!(
                "GLOBAL {module}.{name} is not allowed (a state_dict names only \
                 collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch storage \
                 classes); refused, nothing was imported or executed"
            ))),
        }
    }

    /// Counts the elements `Rc::make_mut` is about to copy when `len` elements are shared.
    fn copy_on_write(&mut self, shared: bool, len: usize) -> Result<()> {
        if shared {
            self.copied += len;
            if self.copied > COPY_LIMIT {
                return Err(self.err(format!(
                    "more than {COPY_LIMIT} elements copied while building containers; not a \
                     state_dict's pickle"
                )));
            }
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        let (shared, len) = match self.top()? {
            Value::List(list) => (Rc::strong_count(list) > 1, list.len()),
            _ => (false, 0),
        };
        self.copy_on_write(shared, len)?;
        match self.top()? {
            Value::List(list) => {
                Rc::make_mut(list).extend(items);
                Ok(())
            }
            other => {
                let kind = other.kind();
                Err(self.err(format!("APPEND to {kind}, not a list")))
            }
        }
    }

    /// SETITEM(S): `items` alternate keys and values. (A name set twice is found later, where
    /// the state_dict's names are collected.)
    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with a key and no value"));
        }
        let (shared, len) = match self.top()? {
            Value::Dict(dict) => (Rc::strong_count(dict) > 1, dict.len()),
            _ => (false, 0),
        };
        self.copy_on_write(shared, len)?;
        let Value::Dict(dict) = self.top()? else {
            return Err(self.err("SETITEMS on something that is not a dict"));
        };
        let dict = Rc::make_mut(dict);
        let mut items = items.into_iter();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            dict.push((key, value));
        }
        Ok(())
    }

    /// BINPERSID: `('storage', <storage class>, key, location, numel)`, what torch.save writes
    /// for each storage.
    fn persistent_load(&self, pid: Value) -> Result<Value> {
        let bad = || {
            self.err(format!(
                "a persistent id that is not ('storage', <storage class>, key, location, numel): \
                 {}",
                pid.kind()
            ))
        };
        let Value::Tuple(items) = &pid else { return Err(bad()) };
        match items.as_slice() {
            [Value::Str(tag), Value::Global(Global::Storage(dtype), _), Value::Str(key), _, Value::Int(numel)]
                if &**tag == "storage" && *numel >= 0 =>
            {
                if key.contains('/') || key.contains("..") || key.is_empty() {
                    return Err(self.err(format!("a storage key '{key}' that is not a plain name")));
                }
                Ok(Value::Storage(StorageRef {
                    key: key.to_string(),
                    dtype: *dtype,
                    numel: *numel as u64,
                }))
            }
            _ => Err(bad()),
        }
    }

    fn reduce(&self, callable: Value, args: Value) -> Result<Value> {
        let (global, name) = match &callable {
            Value::Global(Global::Storage(_), name) => {
                return Err(self.err(format!(
                    "REDUCE of {name}, which is not a callable this reader allows (a storage \
                     class only tags a persistent id); refused, nothing was executed"
                )))
            }
            Value::Global(global, name) => (global, name),
            other => {
                return Err(self.err(format!(
                    "REDUCE of {}, which is not a callable this reader allows; refused, nothing \
                     was executed",
                    other.kind()
                )))
            }
        };
        let Value::Tuple(args) = &args else {
            return Err(self.err(format!("REDUCE of {name} with {} for arguments", args.kind())));
        };
        match (global, args.as_slice()) {
            (Global::OrderedDict, []) => Ok(Value::Dict(Rc::new(Vec::new()))),
            (Global::OrderedDict, [Value::List(pairs)]) => {
                let mut dict = Vec::with_capacity(pairs.len());
                for pair in pairs.iter() {
                    match pair {
                        Value::Tuple(kv) if kv.len() == 2 => {
                            dict.push((kv[0].clone(), kv[1].clone()))
                        }
                        _ => return Err(self.err("OrderedDict built from something not pairs")),
                    }
                }
                Ok(Value::Dict(Rc::new(dict)))
            }
            (
                Global::RebuildTensor,
                [storage, offset, size, stride, _requires_grad, _hooks, ..],
            ) => self.rebuild_tensor(storage, offset, size, stride),
            (Global::RebuildParameter, [tensor @ Value::Tensor(_), ..]) => Ok(tensor.clone()),
            (Global::Size, [Value::Tuple(dims)]) => Ok(Value::Tuple(dims.clone())),
            (Global::Size, []) => Ok(Value::Tuple(Rc::new(Vec::new()))),
            (Global::Set, [Value::List(items)]) => Ok(Value::List(items.clone())),
            (Global::Set, []) => Ok(Value::List(Rc::new(Vec::new()))),
            (Global::Inert(what), _) => Ok(Value::Inert(what)),
            _ => Err(self.err(format!(
                "REDUCE of {name} with arguments it does not take ({} of them); refused",
                args.len()
            ))),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, …)`, checked against the storage's
    /// declared length: the view must not read past its end.
    fn rebuild_tensor(
        &self,
        storage: &Value,
        offset: &Value,
        size: &Value,
        stride: &Value,
    ) -> Result<Value> {
        let Value::Storage(storage) = storage else {
            return Err(
                self.err(format!("_rebuild_tensor_v2 of {}, not a storage", storage.kind()))
            );
        };
        let ints = |v: &Value, what: &str| -> Result<Vec<u64>> {
            let Value::Tuple(items) = v else {
                return Err(self.err(format!("_rebuild_tensor_v2: its {what} is {}", v.kind())));
            };
            if items.len() > DIMS_LIMIT {
                return Err(self.err(format!("_rebuild_tensor_v2: {} dims", items.len())));
            }
            items
                .iter()
                .map(|x| match x {
                    Value::Int(n) if *n >= 0 => Ok(*n as u64),
                    other => Err(self.err(format!(
                        "_rebuild_tensor_v2: its {what} holds {}, not a non-negative integer",
                        other.kind()
                    ))),
                })
                .collect()
        };
        let Value::Int(offset) = offset else {
            return Err(self.err("_rebuild_tensor_v2: its offset is not an integer"));
        };
        let offset = u64::try_from(*offset)
            .map_err(|_| self.err(format!("_rebuild_tensor_v2: negative offset {offset}")))?;
        let dims = ints(size, "size")?;
        let strides = ints(stride, "stride")?;
        if dims.len() != strides.len() {
            return Err(self.err(format!(
                "_rebuild_tensor_v2: size {dims:?} and stride {strides:?} differ in length"
            )));
        }
        // The furthest element the view reads: offset + Σ (dim − 1)·stride (nothing when a dim
        // is 0).
        let empty = dims.contains(&0);
        let last = dims.iter().zip(&strides).try_fold(offset, |acc, (&d, &s)| {
            d.saturating_sub(1).checked_mul(s).and_then(|x| acc.checked_add(x))
        });
        match last {
            _ if empty => {}
            Some(last) if last < storage.numel => {}
            _ => {
                return Err(self.err(format!(
                    "a tensor of size {dims:?}, stride {strides:?} at offset {offset} reads past \
                     the end of storage '{}' ({} elements)",
                    storage.key, storage.numel
                )))
            }
        }
        Ok(Value::Tensor(Rc::new(TensorRef { storage: storage.clone(), offset, dims, strides })))
    }

    /// BUILD sets an object's attributes: an OrderedDict's (a state_dict's `_metadata`) and
    /// numpy's are of no interest and dropped; anything else is refused.
    fn build(&mut self, _state: Value) -> Result<()> {
        match self.top()? {
            Value::Dict(_) | Value::Inert(_) => Ok(()),
            other => {
                let kind = other.kind();
                Err(self.err(format!("BUILD on {kind}; refused")))
            }
        }
    }
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'R' => "REDUCE",
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        b'P' => "PERSID",
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'g' => "GET",
        b'p' => "PUT",
        0x82..=0x84 => "EXT",
        0x8b => "LONG4",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Value> {
        load(Path::new("test.pkl"), bytes)
    }

    #[test]
    fn a_dict_changed_after_every_memo_put_is_stopped_by_the_copy_budget() {
        // {} PUT 0, then 2·10⁴ times: key value SETITEM PUT 0. Each SETITEM copies the whole
        // dict (the memo shares it): ~2·10⁸ copies in all, past the budget.
        let mut p = vec![0x80, 2, b'}', b'q', 0];
        for i in 0..20_000u32 {
            p.push(b'J');
            p.extend_from_slice(&i.to_le_bytes());
            p.push(b'N');
            p.extend_from_slice(&[b's', b'q', 0]);
        }
        p.push(b'.');
        let e = run(&p).unwrap_err().to_string();
        assert!(e.contains("elements copied"), "{e}");
        // The same dict filled without memo puts in between is read in full.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        for i in 0..20_000u32 {
            p.push(b'J');
            p.extend_from_slice(&i.to_le_bytes());
            p.push(b'N');
        }
        p.extend_from_slice(b"u.");
        let Value::Dict(d) = run(&p).unwrap() else { panic!("not a dict") };
        assert_eq!(d.len(), 20_000);
    }

    #[test]
    fn memo_fetches_share_instead_of_copying() {
        // A tuple of itself, 60 times over: 2⁶⁰ leaves if copied, two pointers each if shared.
        let mut p = vec![0x80, 2, b')', b'q', 0];
        for _ in 0..60 {
            p.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        assert!(matches!(run(&p).unwrap(), Value::Tuple(_)));
    }
}
