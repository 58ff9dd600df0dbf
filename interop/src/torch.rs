//! PyTorch checkpoints as named tensors, read without Python.
//!
//! Three containers are recognised by their first bytes ([`read_state_dict`]):
//!
//! * **legacy** (`torch.save` before PyTorch 1.6, or `_use_new_zipfile_serialization=False`),
//!   the released EIO checkpoint's format (`shared/notes/official-checkpoint.md`, "Container"):
//!   five pickles (magic number `0x1950a86a20f9469cfc6c`, protocol version 1001, sys_info, the
//!   object, the list of storage keys), then for each key an 8-byte little-endian element count
//!   and the raw little-endian elements;
//! * **zip** (PyTorch 1.6+): `<archive>/data.pkl` holds the object and `<archive>/data/<key>` each
//!   storage's raw bytes (`<archive>` is `archive` in current PyTorch, the file's stem in older
//!   versions; `<archive>/byteorder`, when present, must say `little`);
//! * **safetensors** (what `export_dverge` / `export_authors` write, and what
//!   `safetensors.torch.save_file` writes).
//!
//! In both PyTorch formats a tensor is a call of `torch._utils._rebuild_tensor_v2(storage,
//! storage_offset, size, stride, requires_grad, backward_hooks[, metadata])` (or the older
//! `_rebuild_tensor`, or `_rebuild_parameter` around it) whose storage is the persistent id
//! `('storage', torch.<T>Storage, key, location, numel[, view_metadata])`. The location (e.g.
//! `cuda:0`) is recorded and ignored: everything is read to the host. Storages shared by several
//! tensors (the released checkpoint's 19 shared conv weights) are kept once and shared.
//!
//! The state dict is the top-level object when that is a dict of tensors, else the value under
//! `state_dict`, then `model`, then a lone `model_<i>` (DVERGE's `{'model_0': ...}` files).
//!
//! Nothing is allocated from a length the file states before that length has been checked
//! against the bytes present; a tensor's elements are converted only when asked for
//! ([`TorchTensor::to_f64`]), after its view has been checked to lie inside its storage.

use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::sync::Arc;

use crate::pickle::{self, Obj, ObjId};
use crate::InteropError;

/// Most dimensions a PyTorch tensor can have.
const MAX_RANK: usize = 64;
/// Longest storage key or device string accepted (PyTorch writes short decimal keys and tags
/// like `cuda:0`); the bound keeps per-tensor copies of them small.
const MAX_KEY_LEN: usize = 256;

/// The legacy format's first pickle (torch/serialization.py `MAGIC_NUMBER`).
pub const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;
/// The legacy format's second pickle (`PROTOCOL_VERSION`).
pub const LEGACY_PROTOCOL: i128 = 1001;

/// Element types of PyTorch storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchDtype {
    F16,
    Bf16,
    F32,
    F64,
    U8,
    I8,
    I16,
    I32,
    I64,
    Bool,
}

impl TorchDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TorchDtype::U8 | TorchDtype::I8 | TorchDtype::Bool => 1,
            TorchDtype::F16 | TorchDtype::Bf16 | TorchDtype::I16 => 2,
            TorchDtype::F32 | TorchDtype::I32 => 4,
            TorchDtype::F64 | TorchDtype::I64 => 8,
        }
    }

    /// Whether the dtype is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            TorchDtype::F16 | TorchDtype::Bf16 | TorchDtype::F32 | TorchDtype::F64
        )
    }

    /// The dtype of a `torch.<Name>Storage` class.
    pub fn from_storage_class(name: &str) -> Option<TorchDtype> {
        Some(match name {
            "HalfStorage" => TorchDtype::F16,
            "BFloat16Storage" => TorchDtype::Bf16,
            "FloatStorage" => TorchDtype::F32,
            "DoubleStorage" => TorchDtype::F64,
            "ByteStorage" => TorchDtype::U8,
            "CharStorage" => TorchDtype::I8,
            "ShortStorage" => TorchDtype::I16,
            "IntStorage" => TorchDtype::I32,
            "LongStorage" => TorchDtype::I64,
            "BoolStorage" => TorchDtype::Bool,
            _ => return None,
        })
    }

    fn from_safetensors(dtype: safetensors::Dtype) -> Option<TorchDtype> {
        use safetensors::Dtype as D;
        Some(match dtype {
            D::F16 => TorchDtype::F16,
            D::BF16 => TorchDtype::Bf16,
            D::F32 => TorchDtype::F32,
            D::F64 => TorchDtype::F64,
            D::U8 => TorchDtype::U8,
            D::I8 => TorchDtype::I8,
            D::I16 => TorchDtype::I16,
            D::I32 => TorchDtype::I32,
            D::I64 => TorchDtype::I64,
            D::BOOL => TorchDtype::Bool,
            _ => return None,
        })
    }

    /// Element `i` of little-endian `bytes` as f64. `bytes` holds at least `i + 1` elements.
    fn decode(self, bytes: &[u8], i: usize) -> f64 {
        let s = self.size();
        let b = &bytes[i * s..(i + 1) * s];
        match self {
            TorchDtype::F16 => f16_to_f64(u16::from_le_bytes([b[0], b[1]])),
            TorchDtype::Bf16 => f64::from(f32::from_bits(
                u32::from(u16::from_le_bytes([b[0], b[1]])) << 16,
            )),
            TorchDtype::F32 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            TorchDtype::F64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            TorchDtype::U8 => f64::from(b[0]),
            TorchDtype::I8 => f64::from(b[0] as i8),
            TorchDtype::I16 => f64::from(i16::from_le_bytes([b[0], b[1]])),
            TorchDtype::I32 => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            TorchDtype::I64 => {
                i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64
            }
            TorchDtype::Bool => f64::from(u8::from(b[0] != 0)),
        }
    }
}

/// IEEE half to f64 (exact).
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f64::from(h & 0x3ff);
    match exp {
        0 => sign * frac * 2f64.powi(-24),
        0x1f if frac == 0.0 => sign * f64::INFINITY,
        0x1f => f64::NAN,
        _ => sign * (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
    }
}

/// Which container a checkpoint came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Legacy,
    Zip,
    Safetensors,
}

/// One storage: a typed run of little-endian elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Storage {
    /// The key the file gives it (a decimal string in PyTorch files, the tensor's name in
    /// safetensors).
    pub key: String,
    pub dtype: TorchDtype,
    /// The device tag in the file (`cuda:0`, `cpu`); every storage is read to the host.
    pub location: String,
    /// Number of elements.
    pub numel: usize,
    bytes: Vec<u8>,
}

/// A tensor: a strided view of a (possibly shared) storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensor {
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
    pub offset: usize,
    pub storage: Arc<Storage>,
}

impl TorchTensor {
    pub fn dtype(&self) -> TorchDtype {
        self.storage.dtype
    }

    /// Number of elements (1 for a 0-d tensor).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements in row-major order, converted to f64 (int64 values beyond 2^53 round).
    ///
    /// # Errors
    /// Never for a tensor from [`read_state_dict`] (its view was checked when it was read);
    /// [`InteropError::Tensor`] if the view does not lie inside the storage.
    pub fn to_f64(&self) -> Result<Vec<f64>, InteropError> {
        check_view(&self.shape, &self.stride, self.offset, self.storage.numel).map_err(
            |message| InteropError::Tensor {
                name: self.storage.key.clone(),
                message,
            },
        )?;
        let numel = self.numel();
        let mut out = Vec::with_capacity(numel);
        // Dimensions of size 1 do not move the address; dropping them bounds the rank by
        // log2(numel), so the walk below is O(numel · log numel) whatever the file says.
        let (shape, stride): (Vec<usize>, Vec<usize>) = self
            .shape
            .iter()
            .zip(&self.stride)
            .filter(|(&size, _)| size != 1)
            .map(|(&size, &st)| (size, st))
            .unzip();
        let mut index = vec![0usize; shape.len()];
        for _ in 0..numel {
            let at = self.offset + index.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
            out.push(self.storage.dtype.decode(&self.storage.bytes, at));
            for d in (0..shape.len()).rev() {
                index[d] += 1;
                if index[d] < shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(out)
    }
}

/// Checks that every element of the view lies inside a storage of `storage_numel` elements and
/// that the element count fits in memory arithmetic.
fn check_view(
    shape: &[usize],
    stride: &[usize],
    offset: usize,
    storage_numel: usize,
) -> Result<(), String> {
    if shape.len() != stride.len() {
        return Err(format!(
            "size {shape:?} and stride {stride:?} have different ranks"
        ));
    }
    let mut numel: usize = 1;
    let mut last = offset;
    for (&s, &st) in shape.iter().zip(stride) {
        numel = numel
            .checked_mul(s)
            .ok_or_else(|| format!("size {shape:?} overflows"))?;
        if s > 0 {
            last = (s - 1)
                .checked_mul(st)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(|| format!("stride {stride:?} overflows"))?;
        }
    }
    if numel > 0 && last >= storage_numel {
        return Err(format!(
            "view (offset {offset}, size {shape:?}, stride {stride:?}) reaches element {last} of a storage of {storage_numel}"
        ));
    }
    Ok(())
}

/// A state dict read from a checkpoint: tensors by name, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct StateDict {
    pub container: Container,
    /// Where the state dict sat in the file: `None` at the top level, else the key
    /// (`state_dict`, `model`, `model_0`).
    pub nesting: Option<String>,
    /// Entries in file order (later duplicates of a key replace earlier ones, as in Python).
    pub entries: Vec<(String, TorchTensor)>,
    /// The file's safetensors metadata (empty for PyTorch files).
    pub metadata: BTreeMap<String, String>,
}

impl StateDict {
    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TorchTensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The number of distinct storages the tensors use.
    pub fn storage_count(&self) -> usize {
        let mut keys: Vec<&str> = self
            .entries
            .iter()
            .map(|(_, t)| t.storage.key.as_str())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys.len()
    }

    /// Groups of entry names that share one storage (groups of two or more), by storage key.
    pub fn shared_storages(&self) -> BTreeMap<String, Vec<String>> {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, t) in &self.entries {
            groups
                .entry(t.storage.key.clone())
                .or_default()
                .push(name.clone());
        }
        groups.retain(|_, names| names.len() > 1);
        groups
    }

    /// Converts every tensor, stopping with an error once more than `max_elements` elements
    /// in total would be produced (a fuzzing and sanity bound: views may repeat storages).
    ///
    /// # Errors
    /// [`InteropError::TooLarge`] past the bound.
    pub fn materialize(
        &self,
        max_elements: usize,
    ) -> Result<Vec<(String, Vec<f64>)>, InteropError> {
        let mut total = 0usize;
        let mut out = Vec::with_capacity(self.entries.len());
        for (name, t) in &self.entries {
            total = total.saturating_add(t.numel());
            if total > max_elements {
                return Err(InteropError::TooLarge {
                    what: format!("tensor {name:?}"),
                    limit: max_elements,
                });
            }
            out.push((name.clone(), t.to_f64()?));
        }
        Ok(out)
    }
}

/// Reads the state dict of a legacy, zip or safetensors checkpoint held in `bytes`.
///
/// `origin` names the file in error messages.
///
/// # Errors
/// [`InteropError`] naming `origin`: unknown container ([`InteropError::NotACheckpoint`]),
/// truncation, a malformed pickle or zip, unsupported storage types, views outside their
/// storage, or no state dict in the object (a DVERGE ensemble file, whose several
/// `model_<i>` models [`read_models`] reads, is such an error here).
pub fn read_state_dict(bytes: &[u8], origin: &str) -> Result<StateDict, InteropError> {
    let mut found = read(bytes, origin, false)?;
    debug_assert_eq!(found.len(), 1);
    Ok(found.swap_remove(0))
}

/// Reads a checkpoint file from disk ([`read_state_dict`] on its bytes).
///
/// # Errors
/// [`InteropError::Read`] if the file cannot be read, else as [`read_state_dict`].
pub fn read_state_dict_file(path: &std::path::Path) -> Result<StateDict, InteropError> {
    let origin = path.display().to_string();
    read_state_dict(&read_file(path)?, &origin)
}

/// Reads every model of a checkpoint held in `bytes`: one state dict wherever
/// [`read_state_dict`] finds one (the same result, also for a lone `model_<i>`), else, for a
/// DVERGE ensemble file (`torch.save({'model_0': m0.state_dict(), 'model_1': ...})`, as its
/// trainers' `save` writes it), one state dict per `model_<i>` key in index order, each with
/// [`StateDict::nesting`] `model_<i>`. Storages the models share (DVERGE's members share one
/// normaliser module) are read once and shared.
///
/// # Errors
/// As [`read_state_dict`]; for an ensemble, also keys that are not exactly `model_0` to
/// `model_<N-1>` (the message names the missing key) and a `model_<i>` whose value is not a
/// dict of tensors (named).
pub fn read_models(bytes: &[u8], origin: &str) -> Result<Vec<StateDict>, InteropError> {
    read(bytes, origin, true)
}

/// Reads every model of a checkpoint file ([`read_models`] on its bytes).
///
/// # Errors
/// [`InteropError::Read`] if the file cannot be read, else as [`read_models`].
pub fn read_models_file(path: &std::path::Path) -> Result<Vec<StateDict>, InteropError> {
    let origin = path.display().to_string();
    read_models(&read_file(path)?, &origin)
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, InteropError> {
    std::fs::read(path).map_err(|source| InteropError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The state dicts of `bytes`: exactly one unless `ensembles` lets a DVERGE ensemble file give
/// all of its models.
fn read(bytes: &[u8], origin: &str, ensembles: bool) -> Result<Vec<StateDict>, InteropError> {
    let ctx = |e: FileError| e.into_error(origin);
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        read_zip(bytes, ensembles).map_err(ctx)
    } else if bytes.first() == Some(&0x80) {
        read_legacy(bytes, ensembles).map_err(ctx)
    } else if looks_like_safetensors(bytes) {
        read_safetensors(bytes).map(|d| vec![d]).map_err(ctx)
    } else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Err(InteropError::NotACheckpoint {
            origin: origin.to_string(),
            head: head.join(" "),
        })
    }
}

/// The fuzzing entry point: reads every model of `bytes` ([`read_models`], which reads
/// whatever [`read_state_dict`] reads, and ensemble files too) and converts every tensor (at
/// most `1 << 22` elements in total). Returns the number of tensors. Malformed input gives an
/// error; a panic, hang or unbounded allocation here is a bug.
///
/// # Errors
/// As [`read_models`] and [`StateDict::materialize`].
pub fn check_bytes(bytes: &[u8]) -> Result<usize, InteropError> {
    const LIMIT: usize = 1 << 22;
    let mut left = LIMIT;
    let mut tensors = 0;
    for dict in read_models(bytes, "fuzz input")? {
        let values = dict.materialize(left).map_err(|e| match e {
            InteropError::TooLarge { what, .. } => InteropError::TooLarge { what, limit: LIMIT },
            other => other,
        })?;
        left -= values.iter().map(|(_, v)| v.len()).sum::<usize>();
        tensors += values.len();
    }
    Ok(tensors)
}

fn looks_like_safetensors(bytes: &[u8]) -> bool {
    bytes.len() >= 9 && bytes[8] == b'{'
}

/// A reading failure before the origin is attached.
pub(crate) enum FileError {
    Truncated {
        what: String,
        needed: u64,
        available: u64,
    },
    Format(String),
    Pickle {
        what: &'static str,
        source: pickle::PickleError,
    },
    Zip {
        what: String,
        source: zip::result::ZipError,
    },
    ZipIo {
        what: String,
        source: std::io::Error,
    },
    Safetensors(safetensors::SafeTensorError),
}

impl FileError {
    fn into_error(self, origin: &str) -> InteropError {
        let origin = origin.to_string();
        match self {
            FileError::Truncated {
                what,
                needed,
                available,
            } => InteropError::Truncated {
                origin,
                what,
                needed,
                available,
            },
            FileError::Format(message) => InteropError::Format { origin, message },
            FileError::Pickle { what, source } => InteropError::Pickle {
                origin,
                what,
                source,
            },
            FileError::Zip { what, source } => InteropError::Zip {
                origin,
                what,
                source,
            },
            FileError::ZipIo { what, source } => InteropError::ZipEntry {
                origin,
                what,
                source,
            },
            FileError::Safetensors(source) => InteropError::Safetensors { origin, source },
        }
    }
}

fn format_err<T>(message: impl Into<String>) -> Result<T, FileError> {
    Err(FileError::Format(message.into()))
}

/// A storage as the pickle describes it, before its bytes are attached.
#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    key: String,
    dtype: TorchDtype,
    location: String,
    numel: usize,
}

/// The state dict's tensors and where the dict sat (see [`StateDict::nesting`]).
type Found = (Option<String>, Vec<(String, TensorRef)>);

/// A tensor as the pickle describes it.
#[derive(Debug, Clone)]
struct TensorRef {
    storage: String,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Interprets the unpickled object: finds the state dict and collects its tensors and the
/// storages they use.
struct Interpreter<'m> {
    m: &'m pickle::Machine,
    /// Every storage any persistent id in the pickle describes.
    storages: HashMap<String, StorageRef>,
    /// Keys of the storages the state dict's tensors use, first use first.
    used: Vec<String>,
    used_set: std::collections::HashSet<String>,
}

impl<'m> Interpreter<'m> {
    fn new(m: &'m pickle::Machine) -> Self {
        Interpreter {
            m,
            storages: HashMap::new(),
            used: Vec::new(),
            used_set: std::collections::HashSet::new(),
        }
    }

    /// Registers the storage of every persistent id in the pickle (also those outside the
    /// state dict, e.g. optimiser state, whose bytes the legacy format stores too).
    fn register_all(&mut self) -> Result<(), FileError> {
        for id in 0..self.m.objects.len() {
            if matches!(self.m.get(id), Obj::PersistentId(_)) {
                self.storage(id)?;
            }
        }
        Ok(())
    }

    fn str_of(&self, id: ObjId) -> Option<&'m str> {
        match self.m.get(id) {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }

    fn int_of(&self, id: ObjId) -> Option<i128> {
        match self.m.get(id) {
            Obj::Int(v) => Some(*v),
            Obj::Bool(b) => Some(i128::from(*b)),
            _ => None,
        }
    }

    fn usize_of(&self, id: ObjId, what: &str) -> Result<usize, FileError> {
        match self.int_of(id) {
            Some(v) if v >= 0 && v <= usize::MAX as i128 => Ok(v as usize),
            Some(v) => format_err(format!("{what} {v} is negative or too large")),
            None => format_err(format!("{what} is not an integer")),
        }
    }

    fn usizes_of(&self, id: ObjId, what: &str) -> Result<Vec<usize>, FileError> {
        match self.m.get(id) {
            Obj::Tuple(items) | Obj::List(items) if items.len() > MAX_RANK => format_err(format!(
                "{what} has {} dimensions; PyTorch allows at most {MAX_RANK}",
                items.len()
            )),
            Obj::Tuple(items) | Obj::List(items) => {
                items.iter().map(|&i| self.usize_of(i, what)).collect()
            }
            _ => format_err(format!("{what} is not a tuple of integers")),
        }
    }

    fn global_of(&self, id: ObjId) -> Option<(&'m str, &'m str)> {
        match self.m.get(id) {
            Obj::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// Dict items (a dict literal, or an `OrderedDict()`, which the pickle reader turns into
    /// a dict).
    fn dict_items(&self, id: ObjId) -> Option<&'m [(ObjId, ObjId)]> {
        match self.m.get(id) {
            Obj::Dict(items) => Some(items),
            _ => None,
        }
    }

    /// Resolves a tensor expression: `_rebuild_tensor_v2(...)`, `_rebuild_tensor(...)`,
    /// `_rebuild_parameter(tensor, ...)`. `Ok(None)` if `id` is not a tensor call at all.
    fn tensor(&mut self, id: ObjId) -> Result<Option<TensorRef>, FileError> {
        let Obj::Call { callable, args } = self.m.get(id) else {
            return Ok(None);
        };
        let Some((module, name)) = self.global_of(*callable) else {
            return Ok(None);
        };
        let Obj::Tuple(args) = self.m.get(*args) else {
            return format_err(format!("{module}.{name} called without an argument tuple"));
        };
        match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                if args.len() < 4 {
                    return format_err(format!(
                        "{name} has {} arguments, expected at least 4",
                        args.len()
                    ));
                }
                let storage = self.storage(args[0])?;
                if self.used_set.insert(storage.clone()) {
                    self.used.push(storage.clone());
                }
                let offset = self.usize_of(args[1], "storage_offset")?;
                let shape = self.usizes_of(args[2], "size")?;
                let stride = self.usizes_of(args[3], "stride")?;
                Ok(Some(TensorRef {
                    storage,
                    offset,
                    shape,
                    stride,
                }))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                // Unwrap nested parameters iteratively (ids strictly decrease, so this ends).
                let mut inner = match args.first() {
                    Some(&inner) => inner,
                    None => return format_err("_rebuild_parameter without arguments"),
                };
                loop {
                    if let Obj::Call { callable, args } = self.m.get(inner) {
                        if let (
                            Some((
                                "torch._utils",
                                "_rebuild_parameter" | "_rebuild_parameter_with_state",
                            )),
                            Obj::Tuple(a),
                        ) = (self.global_of(*callable), self.m.get(*args))
                        {
                            match a.first() {
                                Some(&next) => {
                                    inner = next;
                                    continue;
                                }
                                None => return format_err("_rebuild_parameter without arguments"),
                            }
                        }
                    }
                    break;
                }
                match self.tensor(inner)? {
                    Some(t) => Ok(Some(t)),
                    None => format_err("_rebuild_parameter around something that is not a tensor"),
                }
            }
            _ => Ok(None),
        }
    }

    /// Resolves `('storage', torch.<T>Storage, key, location, numel[, view_metadata])`.
    fn storage(&mut self, id: ObjId) -> Result<String, FileError> {
        let Obj::PersistentId(pid) = self.m.get(id) else {
            return format_err("tensor storage is not a persistent id");
        };
        let Obj::Tuple(fields) = self.m.get(*pid) else {
            return format_err("storage persistent id is not a tuple");
        };
        if fields.len() < 5 || self.str_of(fields[0]) != Some("storage") {
            return format_err(
                "persistent id is not ('storage', type, key, location, numel[, view])",
            );
        }
        let dtype = match self.global_of(fields[1]) {
            Some(("torch", class)) => match TorchDtype::from_storage_class(class) {
                Some(d) => d,
                None => return format_err(format!("storage type torch.{class} is not supported")),
            },
            Some((m, c)) => return format_err(format!("storage type {m}.{c} is not supported")),
            None => return format_err("storage type is not a class"),
        };
        let Some(key) = self.str_of(fields[2]) else {
            return format_err("storage key is not a string");
        };
        let location = self.str_of(fields[3]).unwrap_or("unknown");
        if key.len() > MAX_KEY_LEN || location.len() > MAX_KEY_LEN {
            return format_err(format!(
                "storage key or location longer than {MAX_KEY_LEN} bytes"
            ));
        }
        let location = location.to_string();
        let numel = self.usize_of(fields[4], "storage numel")?;
        if let Some(&view) = fields.get(5) {
            if self.m.get(view) != &Obj::None {
                return format_err(format!(
                    "storage {key} is a storage view (view_metadata), which is not supported"
                ));
            }
        }
        let found = StorageRef {
            key: key.to_string(),
            dtype,
            location,
            numel,
        };
        match self.storages.get(key) {
            Some(existing) if existing.dtype != dtype || existing.numel != numel => format_err(
                format!("storage {key} is described twice with different types or sizes"),
            ),
            Some(_) => Ok(key.to_string()),
            None => {
                self.storages.insert(key.to_string(), found);
                Ok(key.to_string())
            }
        }
    }

    /// The dict(s) of tensors under the root: `(nesting, entries)` each. One state dict (the
    /// top level, `state_dict`, `model`, or a lone `model_<i>`); with `ensembles`, a file whose
    /// top level has no such dict but several `model_<i>` keys gives every model, in index
    /// order (see [`read_models`]).
    fn state_dicts(&mut self, root: ObjId, ensembles: bool) -> Result<Vec<Found>, FileError> {
        let Some(items) = self.dict_items(root) else {
            return format_err(format!(
                "the checkpoint object is not a dict ({})",
                kind(self.m.get(root))
            ));
        };
        if let Some(entries) = self.tensor_dict(items)? {
            return Ok(vec![(None, entries)]);
        }
        // Each string key once, in first-appearance order, with its last value (as Python's
        // dict keeps it).
        let mut keys: Vec<&str> = Vec::new();
        let mut last: HashMap<&str, ObjId> = HashMap::new();
        for &(k, v) in items {
            if let Some(key) = self.str_of(k) {
                if last.insert(key, v).is_none() {
                    keys.push(key);
                }
            }
        }
        let models: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| {
                k.strip_prefix("model_")
                    .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect();
        let mut candidates = vec!["state_dict", "model"];
        if models.len() == 1 {
            candidates.push(models[0]);
        }
        for wanted in candidates {
            if let Some(&value) = last.get(wanted) {
                return Ok(vec![self.model(wanted, value)?]);
            }
        }
        if ensembles && models.len() > 1 {
            // DVERGE's `{'model_%d' % i: m.state_dict() for i, m in enumerate(models)}`:
            // model_0 to model_<N-1>, read in index order.
            let wanted: Vec<String> = (0..models.len()).map(|i| format!("model_{i}")).collect();
            let absent: Vec<&str> = wanted
                .iter()
                .map(String::as_str)
                .filter(|k| !last.contains_key(k))
                .collect();
            if !absent.is_empty() {
                return format_err(format!(
                    "the file holds {} models ({}) but no {}: an ensemble's models must be model_0 to model_{}",
                    models.len(),
                    models.join(", "),
                    absent.join(", "),
                    models.len() - 1
                ));
            }
            let mut found = Vec::with_capacity(wanted.len());
            for key in &wanted {
                found.push(self.model(key, last[key.as_str()])?);
            }
            return Ok(found);
        }
        let mut message = format!("no state dict found: top-level keys are {keys:?}");
        if models.len() > 1 {
            message.push_str(&format!(
                "; the file holds {} models ({}), an ensemble: read it with read_models (eio import imports every model, --member I one)",
                models.len(),
                models.join(", ")
            ));
        }
        format_err(message)
    }

    /// The state dict `value` found under the top-level key `key`.
    fn model(&mut self, key: &str, value: ObjId) -> Result<Found, FileError> {
        let Some(inner) = self.dict_items(value) else {
            return format_err(format!(
                "{key:?} is not a dict ({})",
                kind(self.m.get(value))
            ));
        };
        match self.tensor_dict(inner)? {
            Some(entries) => Ok((Some(key.to_string()), entries)),
            None => format_err(format!(
                "{key:?} is not a dict of tensors (one value is not a tensor)"
            )),
        }
    }

    /// `Some(entries)` if every value of the dict is a tensor and every key a string (an empty
    /// dict counts), `None` if some value is not a tensor.
    fn tensor_dict(
        &mut self,
        items: &[(ObjId, ObjId)],
    ) -> Result<Option<Vec<(String, TensorRef)>>, FileError> {
        let mut entries: Vec<(String, TensorRef)> = Vec::with_capacity(items.len());
        let mut index: HashMap<String, usize> = HashMap::new();
        for &(k, v) in items {
            let Some(tensor) = self.tensor(v)? else {
                return Ok(None);
            };
            let Some(key) = self.str_of(k) else {
                return format_err(format!(
                    "a tensor's key is not a string ({})",
                    kind(self.m.get(k))
                ));
            };
            match index.get(key) {
                Some(&i) => entries[i].1 = tensor,
                None => {
                    index.insert(key.to_string(), entries.len());
                    entries.push((key.to_string(), tensor));
                }
            }
        }
        Ok(Some(entries))
    }
}

fn kind(obj: &Obj) -> &'static str {
    match obj {
        Obj::None => "None",
        Obj::Bool(_) => "a bool",
        Obj::Int(_) => "an int",
        Obj::Float(_) => "a float",
        Obj::Str(_) => "a str",
        Obj::Bytes(_) => "bytes",
        Obj::Tuple(_) => "a tuple",
        Obj::List(_) => "a list",
        Obj::Dict(_) => "a dict",
        Obj::Global { .. } => "a class",
        Obj::Call { .. } => "an object",
        Obj::PersistentId(_) => "a persistent id",
    }
}

/// Assembles the state dict from the tensors and storage bytes.
fn assemble(
    container: Container,
    nesting: Option<String>,
    tensors: Vec<(String, TensorRef)>,
    storages: &HashMap<String, Arc<Storage>>,
) -> Result<StateDict, FileError> {
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let Some(storage) = storages.get(&t.storage) else {
            return format_err(format!(
                "tensor {name:?}: storage {} has no data",
                t.storage
            ));
        };
        if let Err(message) = check_view(&t.shape, &t.stride, t.offset, storage.numel) {
            return format_err(format!("tensor {name:?}: {message}"));
        }
        entries.push((
            name,
            TorchTensor {
                shape: t.shape,
                stride: t.stride,
                offset: t.offset,
                storage: Arc::clone(storage),
            },
        ));
    }
    Ok(StateDict {
        container,
        nesting,
        entries,
        metadata: BTreeMap::new(),
    })
}

/// Reads one pickle at `*pos`, advancing it.
fn next_pickle(
    bytes: &[u8],
    pos: &mut usize,
    what: &'static str,
) -> Result<(pickle::Machine, ObjId), FileError> {
    let (m, root, used) = pickle::load(&bytes[*pos..]).map_err(|source| FileError::Pickle {
        what,
        source: pickle::PickleError {
            offset: source.offset + *pos,
            message: source.message,
        },
    })?;
    *pos += used;
    Ok((m, root))
}

/// The legacy format (fact sheet, "Container").
fn read_legacy(bytes: &[u8], ensembles: bool) -> Result<Vec<StateDict>, FileError> {
    let mut pos = 0;
    let (m, root) = next_pickle(bytes, &mut pos, "magic number")?;
    if m.get(root) != &Obj::Int(LEGACY_MAGIC) {
        return format_err(format!(
            "bad magic number: not a legacy PyTorch checkpoint (expected 0x1950a86a20f9469cfc6c, found {})",
            match m.get(root) {
                Obj::Int(v) => format!("{v:#x}"),
                other => kind(other).to_string(),
            }
        ));
    }
    let (m, root) = next_pickle(bytes, &mut pos, "protocol version")?;
    if m.get(root) != &Obj::Int(LEGACY_PROTOCOL) {
        return format_err(format!(
            "legacy protocol version is {:?}, expected 1001",
            m.get(root)
        ));
    }
    let (m, root) = next_pickle(bytes, &mut pos, "sys_info")?;
    if let Obj::Dict(items) = m.get(root) {
        for &(k, v) in items {
            if m.get(k) == &Obj::Str("little_endian".into()) && m.get(v) == &Obj::Bool(false) {
                return format_err("big-endian checkpoints are not supported");
            }
        }
    } else {
        return format_err("sys_info is not a dict");
    }
    let (m, root) = next_pickle(bytes, &mut pos, "checkpoint object")?;
    let mut interp = Interpreter::new(&m);
    interp.register_all()?;
    let found = interp.state_dicts(root, ensembles)?;
    let described = std::mem::take(&mut interp.storages);
    let (keys_m, keys_root) = next_pickle(bytes, &mut pos, "storage key list")?;
    let Obj::List(key_ids) = keys_m.get(keys_root) else {
        return format_err("the storage key list is not a list");
    };
    let mut storages: HashMap<String, Arc<Storage>> = HashMap::new();
    for &kid in key_ids {
        let Obj::Str(key) = keys_m.get(kid) else {
            return format_err("a storage key is not a string");
        };
        let count_bytes = take(bytes, &mut pos, 8, || {
            format!("element count of storage {key}")
        })?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(count_bytes);
        let count = u64::from_le_bytes(raw);
        let Some(desc) = described.get(key) else {
            return format_err(format!(
                "storage {key} is listed but no persistent id describes it (its element type is unknown)"
            ));
        };
        if count != desc.numel as u64 {
            return format_err(format!(
                "storage {key}: the file says {count} elements, the pickle says {}",
                desc.numel
            ));
        }
        let nbytes = desc
            .numel
            .checked_mul(desc.dtype.size())
            .ok_or_else(|| FileError::Format(format!("storage {key}: byte size overflows")))?;
        let data = take(bytes, &mut pos, nbytes, || format!("data of storage {key}"))?;
        if storages.contains_key(key) {
            return format_err(format!("storage {key} is listed twice"));
        }
        storages.insert(
            key.clone(),
            Arc::new(Storage {
                key: key.clone(),
                dtype: desc.dtype,
                location: desc.location.clone(),
                numel: desc.numel,
                bytes: data.to_vec(),
            }),
        );
    }
    for key in described.keys() {
        if !storages.contains_key(key) {
            return format_err(format!(
                "storage {key} is used by a tensor but missing from the storage list"
            ));
        }
    }
    found
        .into_iter()
        .map(|(nesting, tensors)| assemble(Container::Legacy, nesting, tensors, &storages))
        .collect()
}

fn take<'a>(
    bytes: &'a [u8],
    pos: &mut usize,
    n: usize,
    what: impl FnOnce() -> String,
) -> Result<&'a [u8], FileError> {
    let available = bytes.len() - *pos;
    if n > available {
        return Err(FileError::Truncated {
            what: what(),
            needed: n as u64,
            available: available as u64,
        });
    }
    let out = &bytes[*pos..*pos + n];
    *pos += n;
    Ok(out)
}

/// Reads a whole zip entry, refusing entries larger than the archive itself.
fn zip_entry(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    limit: usize,
) -> Result<Option<Vec<u8>>, FileError> {
    let mut file = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(source) => {
            return Err(FileError::Zip {
                what: format!("entry {name}"),
                source,
            })
        }
    };
    if file.compression() != zip::CompressionMethod::Stored {
        return format_err(format!(
            "zip entry {name} is compressed ({:?}); PyTorch writes stored entries",
            file.compression()
        ));
    }
    let size = file.size();
    if size > limit as u64 {
        return Err(FileError::Truncated {
            what: format!("zip entry {name} (declared {size} bytes)"),
            needed: size,
            available: limit as u64,
        });
    }
    let mut data = Vec::with_capacity(size as usize);
    file.by_ref()
        .take(size)
        .read_to_end(&mut data)
        .map_err(|source| FileError::ZipIo {
            what: format!("entry {name}"),
            source,
        })?;
    Ok(Some(data))
}

/// The zip format (PyTorch 1.6+).
fn read_zip(bytes: &[u8], ensembles: bool) -> Result<Vec<StateDict>, FileError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|source| FileError::Zip {
        what: "archive".into(),
        source,
    })?;
    let pkl_names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| {
            n.strip_suffix("/data.pkl")
                .is_some_and(|prefix| !prefix.is_empty() && !prefix.contains('/'))
        })
        .map(|n| n.to_string())
        .collect();
    let prefix = match pkl_names.as_slice() {
        [one] => one.trim_end_matches("/data.pkl").to_string(),
        [] => {
            return format_err("zip archive without <archive>/data.pkl: not a PyTorch checkpoint")
        }
        many => {
            return format_err(format!(
                "zip archive with several data.pkl entries: {many:?}"
            ))
        }
    };
    if let Some(order) = zip_entry(&mut zip, &format!("{prefix}/byteorder"), bytes.len())? {
        if order.as_slice() != b"little" {
            return format_err(format!(
                "byteorder is {:?}; only little-endian checkpoints are supported",
                String::from_utf8_lossy(&order)
            ));
        }
    }
    let Some(pkl) = zip_entry(&mut zip, &format!("{prefix}/data.pkl"), bytes.len())? else {
        return format_err(format!("{prefix}/data.pkl cannot be opened"));
    };
    let (m, root, _) = pickle::load(&pkl).map_err(|source| FileError::Pickle {
        what: "data.pkl",
        source,
    })?;
    let mut interp = Interpreter::new(&m);
    interp.register_all()?;
    let found = interp.state_dicts(root, ensembles)?;
    let mut storages: HashMap<String, Arc<Storage>> = HashMap::new();
    for key in &interp.used {
        let desc = &interp.storages[key];
        let name = format!("{prefix}/data/{key}");
        let Some(data) = zip_entry(&mut zip, &name, bytes.len())? else {
            return format_err(format!("storage {key}: zip entry {name} is missing"));
        };
        let nbytes = desc
            .numel
            .checked_mul(desc.dtype.size())
            .ok_or_else(|| FileError::Format(format!("storage {key}: byte size overflows")))?;
        if data.len() < nbytes {
            return Err(FileError::Truncated {
                what: format!("storage {key} ({name})"),
                needed: nbytes as u64,
                available: data.len() as u64,
            });
        }
        let mut data = data;
        data.truncate(nbytes);
        storages.insert(
            key.clone(),
            Arc::new(Storage {
                key: key.clone(),
                dtype: desc.dtype,
                location: desc.location.clone(),
                numel: desc.numel,
                bytes: data,
            }),
        );
    }
    found
        .into_iter()
        .map(|(nesting, tensors)| assemble(Container::Zip, nesting, tensors, &storages))
        .collect()
}

/// A safetensors file: every tensor its own storage (keyed by its name).
fn read_safetensors(bytes: &[u8]) -> Result<StateDict, FileError> {
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(FileError::Safetensors)?;
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(FileError::Safetensors)?;
    let mut entries = Vec::new();
    for name in meta.offset_keys() {
        let view = file.tensor(&name).map_err(FileError::Safetensors)?;
        let Some(dtype) = TorchDtype::from_safetensors(view.dtype()) else {
            return format_err(format!(
                "tensor {name:?}: dtype {:?} is not supported",
                view.dtype()
            ));
        };
        let shape = view.shape().to_vec();
        let numel: usize = shape.iter().product();
        let mut stride = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        entries.push((
            name.clone(),
            TorchTensor {
                shape,
                stride,
                offset: 0,
                storage: Arc::new(Storage {
                    key: name,
                    dtype,
                    location: "cpu".into(),
                    numel,
                    bytes: view.data().to_vec(),
                }),
            },
        ));
    }
    let metadata = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok(StateDict {
        container: Container::Safetensors,
        nesting: None,
        entries,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_decodes_exactly() {
        assert_eq!(f16_to_f64(0x3c00), 1.0);
        assert_eq!(f16_to_f64(0xc000), -2.0);
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
        assert_eq!(f16_to_f64(0x7c00), f64::INFINITY);
        assert!(f16_to_f64(0x7e00).is_nan());
    }

    #[test]
    fn views_outside_storage_are_rejected() {
        assert!(check_view(&[2, 3], &[3, 1], 0, 6).is_ok());
        assert!(check_view(&[2, 3], &[3, 1], 1, 6).is_err());
        assert!(check_view(&[0, 3], &[3, 1], 100, 6).is_ok());
        assert!(check_view(&[usize::MAX, 3], &[3, 1], 0, 6).is_err());
        assert!(check_view(&[2], &[usize::MAX], 0, 6).is_err());
        assert!(check_view(&[2], &[1, 1], 0, 6).is_err());
    }
}
