//! The pickle of a checkpoint (`data.pkl`): the decoded values, with tensors and storages as
//! lazy references, and the small virtual machine that runs exactly the opcodes and globals
//! `torch.save` emits for state dicts and training checkpoints.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use crate::error::{Error, Result};

use super::{err, DType};

#[derive(Debug)]
pub(super) struct StorageRef {
    pub(super) key: String,
    pub(super) dtype: DType,
    pub(super) numel: usize,
}

#[derive(Debug)]
pub(super) struct TensorRef {
    pub(super) storage: Rc<StorageRef>,
    pub(super) offset: usize,
    pub(super) size: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

pub(super) type Dict = Rc<RefCell<Vec<(Value, Value)>>>;

#[derive(Clone, Debug)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(usize),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Dict),
    /// A `module.name` global.
    Global(String),
    /// The result of calling a global we do not model (kept opaque; an error only if the state
    /// dict needs it).
    Object(String),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    pub(super) fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("the bool {b}"),
            Value::Int(_) => "an int".into(),
            Value::Float(f) => format!("the float {f}"),
            Value::Str(_) => "a string".into(),
            Value::Bytes(n) => format!("{n} bytes"),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(g) => format!("the global `{g}`"),
            Value::Object(g) => format!("a `{g}` object (unsupported pickle global `{g}`)"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
        }
    }
}

/// The unpickled object with the [`Arena`] that owns its containers; see there for why they
/// travel together. Field order matters: `value` drops first, while the arena still holds
/// every container, so its drop never recurses.
pub(super) struct Pickled {
    pub(super) value: Value,
    _arena: Arena,
}

/// A tuple, list or dict the VM made.
enum Node {
    // Never read: held only so that the tuple outlives every value pointing at it.
    #[allow(dead_code)]
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Dict),
}

/// Every tuple, list and dict the VM made, in creation order, torn down without recursion.
///
/// Two things in hostile pickles would otherwise go wrong when the values are dropped: a list
/// or dict can be put inside itself (DUP, then APPEND), a cycle `Rc` never frees (a leak per
/// file); and a few hundred kilobytes of TUPLE1 opcodes nest values so deep that the default
/// recursive drop overflows the stack (an abort, not an `Err`). Holding a strong reference to
/// each container here means no drop elsewhere ever frees a nested one; this drop then empties
/// the lists and dicts (breaking every cycle: tuples are immutable and only hold older values)
/// and frees the containers newest first, so each free only decrements children still held.
#[derive(Default)]
struct Arena {
    nodes: Vec<Node>,
}

impl Arena {
    fn tuple(&mut self, items: Vec<Value>) -> Value {
        let t = Rc::new(items);
        self.nodes.push(Node::Tuple(t.clone()));
        Value::Tuple(t)
    }
    fn list(&mut self) -> Value {
        let l: Rc<RefCell<Vec<Value>>> = Default::default();
        self.nodes.push(Node::List(l.clone()));
        Value::List(l)
    }
    fn dict(&mut self) -> Dict {
        let d: Dict = Default::default();
        self.nodes.push(Node::Dict(d.clone()));
        d
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let mut loose = Vec::new();
        for n in &self.nodes {
            match n {
                Node::List(l) => loose.append(&mut l.borrow_mut()),
                Node::Dict(d) => loose.extend(d.borrow_mut().drain(..).flat_map(|(k, v)| [k, v])),
                Node::Tuple(_) => {}
            }
        }
        drop(loose);
        while let Some(n) = self.nodes.pop() {
            drop(n);
        }
    }
}

pub(super) struct Vm<'a> {
    path: &'a Path,
    code: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Last, so it drops after the stack and memo on an early `Err` (see [`Arena`]).
    arena: Arena,
}

impl<'a> Vm<'a> {
    pub(super) fn new(path: &'a Path, code: &'a [u8]) -> Self {
        Vm {
            path,
            code,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            arena: Arena::default(),
        }
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        err(
            self.path,
            format!("data.pkl at byte {}: {}", self.pos, msg.into()),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let code = self.code;
        let s = self
            .pos
            .checked_add(n)
            .and_then(|e| code.get(self.pos..e))
            .ok_or_else(|| self.err("pickle truncated"))?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.code[self.pos.min(self.code.len())..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| self.err("pickle truncated in a GLOBAL"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: u64) -> Result<String> {
        let n = usize::try_from(n).map_err(|_| self.err("string length overflows"))?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    fn pop(&mut self) -> Result<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.err("stack underflow (pop past a MARK)"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    fn top(&mut self) -> Result<&mut Value> {
        let pos = self.pos;
        self.stack.last_mut().ok_or_else(|| {
            err(
                self.path,
                format!("data.pkl at byte {pos}: stack underflow"),
            )
        })
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.err("MARK past the stack"));
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_get(&self, i: u32) -> Result<Value> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| self.err(format!("memo entry {i} is not set")))
    }
    fn memo_put(&mut self, i: u32) -> Result<()> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| self.err("stack underflow"))?;
        self.memo.insert(i, v);
        Ok(())
    }

    pub(super) fn run(mut self) -> Result<Pickled> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if !(2..=5).contains(&v) {
                        return Err(self.err(format!("unsupported pickle protocol {v}")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a size hint
                }
                b'}' => {
                    let d = self.arena.dict();
                    self.stack.push(Value::Dict(d));
                }
                b']' => {
                    let l = self.arena.list();
                    self.stack.push(l);
                }
                b')' => {
                    let t = self.arena.tuple(Vec::new());
                    self.stack.push(t);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'X' => {
                    let n = self.u32()? as u64;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8d => {
                    let n = self.u64()?;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'C' | b'B' | 0x8e => {
                    // SHORT_BINBYTES / BINBYTES / BINBYTES8: kept as a length only.
                    let n = match op {
                        b'C' => self.u8()? as u64,
                        b'B' => self.u32()? as u64,
                        _ => self.u64()?,
                    };
                    let n = usize::try_from(n).map_err(|_| self.err("bytes length overflows"))?;
                    self.take(n)?;
                    self.stack.push(Value::Bytes(n));
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(self.err(format!("LONG1 of {n} bytes is too large")));
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xFF; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'N' => self.stack.push(Value::None),
                b't' => {
                    let items = self.pop_mark()?;
                    let t = self.arena.tuple(items);
                    self.stack.push(t);
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let t = self.arena.tuple(items);
                    self.stack.push(t);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(format!("{module}.{name}")));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(format!("{m}.{n}")))
                        }
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(f, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args), only for objects we keep opaque.
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let v = match cls {
                        Value::Global(g) => Value::Object(g),
                        other => {
                            return Err(
                                self.err(format!("NEWOBJ on {}, expected a class", other.kind()))
                            )
                        }
                    };
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: set state. Dict attributes (OrderedDict `_metadata`) and opaque
                    // objects' state are not needed.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Object(_) => {}
                        other => {
                            let k = other.kind();
                            return Err(self.err(format!("BUILD on {k}")));
                        }
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'.' => {
                    let value = self.pop()?;
                    return Ok(Pickled {
                        value,
                        _arena: std::mem::take(&mut self.arena),
                    });
                }
                _ => {
                    self.pos = at;
                    return Err(self.err(format!(
                        "unsupported pickle opcode 0x{op:02x} ({:?}): not a torch.save state dict",
                        op as char
                    )));
                }
            }
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        let d = match self.top()? {
            Value::Dict(d) => d.clone(),
            Value::Object(_) => return Ok(()), // a dict subclass we keep opaque
            other => {
                let k = other.kind();
                return Err(self.err(format!("SETITEM on {k}")));
            }
        };
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let existing = match &k {
                Value::Str(s) => d
                    .iter()
                    .position(|(x, _)| matches!(x, Value::Str(y) if y == s)),
                _ => None,
            };
            match existing {
                Some(i) => d[i].1 = v,
                None => d.push((k, v)),
            }
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            Value::Object(_) => Ok(()),
            other => {
                let k = other.kind();
                Err(self.err(format!("APPEND on {k}")))
            }
        }
    }

    fn call(&mut self, f: Value, args: Value) -> Result<Value> {
        let g = match f {
            Value::Global(g) => g,
            Value::Object(g) => return Ok(Value::Object(g)),
            other => return Err(self.err(format!("REDUCE on {}", other.kind()))),
        };
        let args = match args {
            Value::Tuple(t) => t,
            other => {
                return Err(self.err(format!(
                    "REDUCE `{g}` with {} arguments, expected a tuple",
                    other.kind()
                )))
            }
        };
        match g.as_str() {
            "collections.OrderedDict" | "builtins.dict" | "__builtin__.dict" => {
                let d = self.arena.dict();
                if let Some(Value::List(items)) = args.first() {
                    for it in items.borrow().iter() {
                        if let Value::Tuple(kv) = it {
                            if kv.len() == 2 {
                                d.borrow_mut().push((kv[0].clone(), kv[1].clone()));
                            }
                        }
                    }
                }
                Ok(Value::Dict(d))
            }
            "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
                if args.len() < 4 {
                    return Err(self.err(format!("`{g}` with {} arguments", args.len())));
                }
                let storage = match &args[0] {
                    Value::Storage(s) => s.clone(),
                    other => {
                        return Err(
                            self.err(format!("`{g}`: expected a storage, found {}", other.kind()))
                        )
                    }
                };
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage,
                    offset: self.index(&args[1], "storage offset")?,
                    size: self.indices(&args[2], "size")?,
                    stride: self.indices(&args[3], "stride")?,
                })))
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                match args.first() {
                    Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                    _ => Err(self.err(format!("`{g}` without a tensor"))),
                }
            }
            _ => Ok(Value::Object(g)),
        }
    }

    fn index(&self, v: &Value, what: &str) -> Result<usize> {
        match v {
            Value::Int(i) => {
                usize::try_from(*i).map_err(|_| self.err(format!("tensor {what} {i} is negative")))
            }
            other => Err(self.err(format!(
                "tensor {what} is {}, expected an int",
                other.kind()
            ))),
        }
    }

    fn indices(&self, v: &Value, what: &str) -> Result<Vec<usize>> {
        match v {
            Value::Tuple(t) => t.iter().map(|x| self.index(x, what)).collect(),
            other => Err(self.err(format!(
                "tensor {what} is {}, expected a tuple",
                other.kind()
            ))),
        }
    }

    fn persistent_load(&self, pid: Value) -> Result<Value> {
        let t = match &pid {
            Value::Tuple(t) => t,
            other => {
                return Err(self.err(format!(
                    "persistent id is {}, expected a tuple",
                    other.kind()
                )))
            }
        };
        match t.as_slice() {
            [Value::Str(tag), Value::Global(ty), Value::Str(key), _location, Value::Int(numel)]
                if tag == "storage" =>
            {
                let dtype = ty
                    .strip_prefix("torch.")
                    .and_then(DType::from_storage)
                    .ok_or_else(|| self.err(format!("unsupported storage type `{ty}`")))?;
                let numel = usize::try_from(*numel)
                    .map_err(|_| self.err(format!("storage `{key}` has {numel} elements")))?;
                Ok(Value::Storage(Rc::new(StorageRef {
                    key: key.clone(),
                    dtype,
                    numel,
                })))
            }
            _ => Err(self.err(format!(
                "unsupported persistent id ({} items), expected ('storage', type, key, location, numel)",
                t.len()
            ))),
        }
    }
}
