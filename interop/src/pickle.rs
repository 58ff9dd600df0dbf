//! A small, bounded pickle reader: exactly the opcodes `torch.save` writes (pickle protocol 2,
//! plus the protocol-4 forms of the same operations), nothing else.
//!
//! Why hand-written (see the crate docs): the pickle readers on crates.io either cover only
//! PyTorch's zip format (candle's `pickle` module) or allocate from unchecked lengths and clone
//! memoised objects (so a 20-byte pickle can ask for gigabytes). This one
//!
//! * keeps every object in an arena ([`Machine::objects`]) and puts *ids* on the stack and in
//!   the memo, so `BINGET` / `DUP` are O(1) and the arena grows by at most one object per
//!   opcode: memory is linear in the input length;
//! * checks every length prefix against the bytes that remain *before* allocating;
//! * never recurses (marks live on their own stack, as in CPython's `metastack`);
//! * returns a [`PickleError`] with the byte offset for every malformed input, never panics.
//!
//! Calls (`REDUCE`, `NEWOBJ`) and persistent ids are not executed; they are recorded as
//! [`Obj::Call`] and [`Obj::PersistentId`] and interpreted by the caller (`torch.rs`), which
//! knows the handful of PyTorch globals a state dict uses. `BUILD` (setting an object's
//! `__dict__`, e.g. an `OrderedDict`'s `_metadata`) is recorded and otherwise ignored.

use std::collections::HashMap;

/// Index of an object in [`Machine::objects`].
pub type ObjId = usize;

/// One unpickled object.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj {
    None,
    Bool(bool),
    /// Python int; `LONG1`/`LONG4` values beyond 128 bits are rejected.
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<ObjId>),
    List(Vec<ObjId>),
    /// Items in insertion order (a later `SETITEM` of an equal key does not replace; the
    /// caller dedupes with last-wins, as Python's dict would).
    Dict(Vec<(ObjId, ObjId)>),
    /// `GLOBAL module name` / `STACK_GLOBAL`.
    Global {
        module: String,
        name: String,
    },
    /// `REDUCE` / `NEWOBJ`: `callable(*args)`, not executed.
    Call {
        callable: ObjId,
        args: ObjId,
    },
    /// `BINPERSID`: the persistent id object (PyTorch's storage descriptor).
    PersistentId(ObjId),
}

/// A malformed or unsupported pickle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pickle byte {offset}: {message}")]
pub struct PickleError {
    /// Offset of the failing opcode from the start of the pickle.
    pub offset: usize,
    pub message: String,
}

/// The pickle virtual machine's state after a run.
#[derive(Debug, Default)]
pub struct Machine {
    /// Every object created, in creation order.
    pub objects: Vec<Obj>,
}

impl Machine {
    /// The object `id`.
    ///
    /// Ids come from this machine, so they are always in range.
    pub fn get(&self, id: ObjId) -> &Obj {
        &self.objects[id]
    }

    fn alloc(&mut self, obj: Obj) -> ObjId {
        self.objects.push(obj);
        self.objects.len() - 1
    }
}

/// Reads one pickle from the start of `bytes`.
///
/// Returns the machine (the object arena), the id of the unpickled object, and the number of
/// bytes the pickle occupied (through its `STOP`).
///
/// # Errors
/// [`PickleError`] for a truncated pickle, an unknown or unsupported opcode, a stack or memo
/// misuse, or a length prefix longer than what remains.
pub fn load(bytes: &[u8]) -> Result<(Machine, ObjId, usize), PickleError> {
    let mut vm = Vm {
        input: bytes,
        pos: 0,
        op_start: 0,
        machine: Machine::default(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = vm.run()?;
    Ok((vm.machine, root, vm.pos))
}

struct Vm<'a> {
    input: &'a [u8],
    pos: usize,
    op_start: usize,
    machine: Machine,
    stack: Vec<ObjId>,
    marks: Vec<usize>,
    memo: HashMap<u64, ObjId>,
}

impl Vm<'_> {
    fn fail<T>(&self, message: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            offset: self.op_start,
            message: message.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let remaining = self.input.len() - self.pos;
        if n > remaining {
            return self.fail(format!(
                "truncated: the opcode needs {n} more bytes, {remaining} remain"
            ));
        }
        let slice = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A length prefix, checked against the remaining input before anything is allocated.
    fn length(&mut self, raw: u64) -> Result<usize, PickleError> {
        let remaining = (self.input.len() - self.pos) as u64;
        if raw > remaining {
            return self.fail(format!(
                "length prefix {raw} exceeds the {remaining} bytes that remain"
            ));
        }
        Ok(raw as usize)
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.input[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.fail("truncated: GLOBAL line without a newline");
        };
        let text = match std::str::from_utf8(&rest[..end]) {
            Ok(t) => t.to_string(),
            Err(e) => return self.fail(format!("GLOBAL line is not UTF-8: {e}")),
        };
        self.pos += end + 1;
        Ok(text)
    }

    fn string(&mut self, n: usize) -> Result<String, PickleError> {
        let raw = self.take(n)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => self.fail(format!("string is not UTF-8: {e}")),
        }
    }

    fn push(&mut self, obj: Obj) {
        let id = self.machine.alloc(obj);
        self.stack.push(id);
    }

    fn pop(&mut self) -> Result<ObjId, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("stack underflow");
        }
        Ok(self.stack.pop().unwrap_or_default())
    }

    fn top(&self) -> Result<ObjId, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("stack underflow (empty stack where an object was expected)");
        }
        Ok(self.stack[self.stack.len() - 1])
    }

    fn pop_mark(&mut self) -> Result<Vec<ObjId>, PickleError> {
        let Some(mark) = self.marks.pop() else {
            return self.fail("no MARK on the stack");
        };
        Ok(self.stack.split_off(mark))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => self.fail(format!("memo key {key} was never stored")),
        }
    }

    fn int_from_le(&self, raw: &[u8]) -> Result<i128, PickleError> {
        if raw.is_empty() {
            return Ok(0);
        }
        if raw.len() > 16 {
            return self.fail(format!("integer of {} bytes is too large", raw.len()));
        }
        let negative = raw[raw.len() - 1] & 0x80 != 0;
        let mut buf = if negative { [0xffu8; 16] } else { [0u8; 16] };
        buf[..raw.len()].copy_from_slice(raw);
        Ok(i128::from_le_bytes(buf))
    }

    fn append(&mut self, items: Vec<ObjId>) -> Result<(), PickleError> {
        let target = self.top()?;
        match &mut self.machine.objects[target] {
            Obj::List(list) => {
                list.extend(items);
                Ok(())
            }
            _ => self.fail("APPEND to an object that is not a list"),
        }
    }

    fn set_items(&mut self, items: Vec<ObjId>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return self.fail("SETITEMS with an odd number of objects");
        }
        let target = self.top()?;
        match &mut self.machine.objects[target] {
            Obj::Dict(dict) => {
                dict.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            _ => self.fail("SETITEM on an object that is not a dict"),
        }
    }

    fn run(&mut self) -> Result<ObjId, PickleError> {
        loop {
            self.op_start = self.pos;
            let op = self.u8()?;
            match op {
                // PROTO
                0x80 => {
                    let version = self.u8()?;
                    if version > 5 {
                        return self.fail(format!("pickle protocol {version} is not supported"));
                    }
                }
                // FRAME: framing is only a read-ahead hint
                0x95 => {
                    let n = u64::from_le_bytes(self.le::<8>()?);
                    self.length(n)?;
                }
                // STOP
                b'.' => {
                    let root = self.pop()?;
                    if !self.marks.is_empty() {
                        return self.fail("STOP inside an unclosed MARK");
                    }
                    return Ok(root);
                }
                b'(' => self.marks.push(self.stack.len()),
                // POP
                b'0' => {
                    self.pop()?;
                }
                // POP_MARK
                b'1' => {
                    self.pop_mark()?;
                }
                // DUP
                b'2' => {
                    let id = self.top()?;
                    self.stack.push(id);
                }
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = i32::from_le_bytes(self.le::<4>()?);
                    self.push(Obj::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le::<2>()?);
                    self.push(Obj::Int(v.into()));
                }
                // LONG1, LONG4
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        u64::from(self.u8()?)
                    } else {
                        let n = i32::from_le_bytes(self.le::<4>()?);
                        if n < 0 {
                            return self.fail("LONG4 with a negative length");
                        }
                        n as u64
                    };
                    let n = self.length(n)?;
                    let raw = self.take(n)?.to_vec();
                    let v = self.int_from_le(&raw)?;
                    self.push(Obj::Int(v));
                }
                // BINFLOAT (big-endian)
                b'G' => {
                    let v = f64::from_be_bytes(self.le::<8>()?);
                    self.push(Obj::Float(v));
                }
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                b'X' | 0x8c | 0x8d => {
                    let raw = match op {
                        b'X' => u64::from(u32::from_le_bytes(self.le::<4>()?)),
                        0x8c => u64::from(self.u8()?),
                        _ => u64::from_le_bytes(self.le::<8>()?),
                    };
                    let n = self.length(raw)?;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s));
                }
                // BINBYTES, SHORT_BINBYTES, BINBYTES8
                b'B' | b'C' | 0x8e => {
                    let raw = match op {
                        b'B' => u64::from(u32::from_le_bytes(self.le::<4>()?)),
                        b'C' => u64::from(self.u8()?),
                        _ => u64::from_le_bytes(self.le::<8>()?),
                    };
                    let n = self.length(raw)?;
                    let b = self.take(n)?.to_vec();
                    self.push(Obj::Bytes(b));
                }
                b')' => self.push(Obj::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(items));
                }
                b']' => self.push(Obj::List(Vec::new())),
                // LIST
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::List(items));
                }
                b'a' => {
                    let item = self.pop()?;
                    self.append(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => self.push(Obj::Dict(Vec::new())),
                // DICT
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.fail("DICT with an odd number of objects");
                    }
                    let pairs = items.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect();
                    self.push(Obj::Dict(pairs));
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                // GLOBAL
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Obj::Global { module, name });
                }
                // STACK_GLOBAL
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (self.machine.get(module), self.machine.get(name)) {
                        (Obj::Str(m), Obj::Str(n)) if m.len() + n.len() > 4096 => {
                            return self.fail("STACK_GLOBAL name longer than 4096 bytes")
                        }
                        (Obj::Str(m), Obj::Str(n)) => {
                            let (module, name) = (m.clone(), n.clone());
                            self.push(Obj::Global { module, name });
                        }
                        _ => return self.fail("STACK_GLOBAL needs two strings"),
                    }
                }
                // REDUCE, NEWOBJ
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    // OrderedDict() becomes a plain dict (insertion order is kept anyway), so
                    // that the SETITEMS that fill it work.
                    let ordered_dict = matches!(
                        self.machine.get(callable),
                        Obj::Global { module, name } if module == "collections" && name == "OrderedDict"
                    );
                    if ordered_dict {
                        self.push(Obj::Dict(Vec::new()));
                    } else {
                        self.push(Obj::Call { callable, args });
                    }
                }
                // BUILD: the state is dropped (attributes only; see the module docs)
                b'b' => {
                    self.pop()?;
                    self.top()?;
                }
                // BINPERSID
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(Obj::PersistentId(pid));
                }
                // BINPUT, LONG_BINPUT, MEMOIZE
                b'q' => {
                    let key = u64::from(self.u8()?);
                    self.memo_put(key)?;
                }
                b'r' => {
                    let key = u64::from(u32::from_le_bytes(self.le::<4>()?));
                    self.memo_put(key)?;
                }
                0x94 => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?;
                }
                // BINGET, LONG_BINGET
                b'h' => {
                    let key = u64::from(self.u8()?);
                    self.memo_get(key)?;
                }
                b'j' => {
                    let key = u64::from(u32::from_le_bytes(self.le::<4>()?));
                    self.memo_get(key)?;
                }
                other => {
                    return self.fail(format!(
                        "opcode 0x{other:02x} is not one torch.save writes (unsupported)"
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_number_is_a_long1() {
        let bytes = [
            0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
        ];
        let (m, root, used) = load(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(m.get(root), &Obj::Int(0x1950a86a20f9469cfc6c));
    }

    #[test]
    fn huge_length_prefix_is_rejected_without_allocating() {
        let bytes = [
            0x80, 2, 0x8d, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, b'.',
        ];
        let err = load(&bytes).unwrap_err();
        assert!(err.message.contains("exceeds"), "{err}");
    }

    #[test]
    fn memo_get_shares_ids_instead_of_copying() {
        // ] q0 h0 h0 h0 ... a list referenced many times costs one object
        let mut bytes = vec![0x80, 2, b']', b'q', 0, b'('];
        for _ in 0..1000 {
            bytes.extend([b'h', 0]);
        }
        bytes.extend([b't', b'.']);
        let (m, root, _) = load(&bytes).unwrap();
        assert!(m.objects.len() < 5);
        match m.get(root) {
            Obj::Tuple(items) => assert_eq!(items.len(), 1000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stack_underflow_and_unclosed_mark_are_errors() {
        assert!(load(b".").is_err());
        assert!(load(b"(N.").is_err());
        assert!(load(b"N(s.").is_err());
        assert!(load(&[]).is_err());
    }
}
