//! Test helpers: PyTorch checkpoints written byte by byte (pickle protocol 2, as `torch.save`
//! writes it), in the legacy and the zip container, and the released checkpoint's location.
#![allow(dead_code)]

use std::path::PathBuf;

use eio_spec::config::{ModelConfig, Sharing};
use eio_spec::plan::{Plan, Role};

/// The released checkpoint, or the reason it is not here.
pub fn official_checkpoint() -> Result<PathBuf, String> {
    const FILE: &str = "models/eio-official-resnet20-n2-p3-eps007.pth.tar";
    let shared = match std::env::var_os("EIO_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    };
    let path = shared.join(FILE);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found (set EIO_SHARED to the folder holding models/)",
            path.display()
        ))
    }
}

/// Prints `skipped: <test>: <reason>` straight to stderr, past the test harness's capture, so
/// it shows in a plain `cargo test`.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    let line = format!("\nskipped: {test}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// A pickle protocol 2 writer for exactly what torch.save emits.
#[derive(Default)]
pub struct Pickle {
    pub bytes: Vec<u8>,
    memo: u32,
}

impl Pickle {
    pub fn new() -> Self {
        let mut p = Pickle::default();
        p.bytes.extend([0x80, 2]);
        p
    }
    pub fn op(&mut self, b: u8) -> &mut Self {
        self.bytes.push(b);
        self
    }
    pub fn put(&mut self) -> &mut Self {
        let m = self.memo;
        self.memo += 1;
        if m < 256 {
            self.bytes.extend([b'q', m as u8]);
        } else {
            self.bytes.push(b'r');
            self.bytes.extend(m.to_le_bytes());
        }
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes.push(b'X');
        self.bytes.extend((s.len() as u32).to_le_bytes());
        self.bytes.extend(s.as_bytes());
        self.put()
    }
    pub fn int(&mut self, v: usize) -> &mut Self {
        if v < 256 {
            self.bytes.extend([b'K', v as u8]);
        } else if v < 65536 {
            self.bytes.push(b'M');
            self.bytes.extend((v as u16).to_le_bytes());
        } else {
            self.bytes.push(b'J');
            self.bytes.extend((v as i32).to_le_bytes());
        }
        self
    }
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.bytes.push(b'c');
        self.bytes.extend(format!("{module}\n{name}\n").as_bytes());
        self.put()
    }
    pub fn tuple_of_ints(&mut self, v: &[usize]) -> &mut Self {
        match v.len() {
            0 => {
                self.op(b')');
            }
            1 => {
                self.int(v[0]).op(0x85);
            }
            _ => {
                self.op(b'(');
                for &x in v {
                    self.int(x);
                }
                self.op(b't');
            }
        }
        self.put()
    }
    pub fn stop(&mut self) -> Vec<u8> {
        self.bytes.push(b'.');
        std::mem::take(&mut self.bytes)
    }
}

/// Element type of a synthetic storage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ty {
    F32,
    F64,
    I64,
    F16,
}

impl Ty {
    fn class(self) -> &'static str {
        match self {
            Ty::F32 => "FloatStorage",
            Ty::F64 => "DoubleStorage",
            Ty::I64 => "LongStorage",
            Ty::F16 => "HalfStorage",
        }
    }
    pub fn encode(self, v: &[f64]) -> Vec<u8> {
        match self {
            Ty::F32 => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
            Ty::F64 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
            Ty::I64 => v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect(),
            // only values exactly representable with a 10-bit mantissa and small exponent
            Ty::F16 => v
                .iter()
                .flat_map(|&x| f64_to_f16(x).to_le_bytes())
                .collect(),
        }
    }
}

fn f64_to_f16(x: f64) -> u16 {
    if x == 0.0 {
        return 0;
    }
    let sign = if x < 0.0 { 0x8000 } else { 0 };
    let a = x.abs();
    let e = a.log2().floor() as i32;
    let frac = ((a / 2f64.powi(e) - 1.0) * 1024.0).round() as u16;
    sign | (((e + 15) as u16) << 10) | frac
}

/// One tensor of a synthetic checkpoint: contiguous, offset 0, on storage `storage`.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub storage: String,
    pub offset: usize,
    /// `None`: contiguous.
    pub stride: Option<Vec<usize>>,
}

/// One storage of a synthetic checkpoint.
#[derive(Clone, Debug)]
pub struct StorageData {
    pub key: String,
    pub ty: Ty,
    pub values: Vec<f64>,
}

/// A synthetic checkpoint: tensors on storages (several tensors may share a storage).
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    pub entries: Vec<Entry>,
    pub storages: Vec<StorageData>,
    /// Wrap every tensor in `torch._utils._rebuild_parameter(t, True, OrderedDict())`, as
    /// `torch.save` writes an `nn.Parameter`.
    pub parameters: bool,
}

/// Where the state dict sits in the pickled object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Nesting {
    Top,
    /// `{'state_dict': sd, 'train': False, 'dataset': 'cifar10'}` like the released file.
    StateDict,
    /// `{'model': sd, 'epoch': 3}`.
    Model,
}

impl Checkpoint {
    pub fn add(&mut self, name: &str, ty: Ty, shape: &[usize], values: Vec<f64>) {
        // A key no storage has (not the count: a removed storage would make it collide).
        let next = self
            .storages
            .iter()
            .filter_map(|s| s.key.parse::<usize>().ok())
            .max()
            .map_or(94_000_000, |k| k + 1);
        let key = next.to_string();
        self.storages.push(StorageData {
            key: key.clone(),
            ty,
            values,
        });
        self.entries.push(Entry {
            name: name.to_string(),
            shape: shape.to_vec(),
            storage: key,
            offset: 0,
            stride: None,
        });
    }

    /// Another tensor on the storage of `existing` (PyTorch aliasing).
    pub fn alias(&mut self, name: &str, existing: &str) {
        let e = self
            .entries
            .iter()
            .find(|e| e.name == existing)
            .expect("aliased entry exists")
            .clone();
        self.entries.push(Entry {
            name: name.to_string(),
            ..e
        });
    }

    /// Removes the entry `name` (and its storage when no other entry uses it).
    pub fn remove(&mut self, name: &str) {
        let i = self
            .entries
            .iter()
            .position(|e| e.name == name)
            .expect("removed entry exists");
        let e = self.entries.remove(i);
        if !self.entries.iter().any(|o| o.storage == e.storage) {
            self.storages.retain(|s| s.key != e.storage);
        }
    }

    /// The values of entry `name`'s storage, to change.
    pub fn values_mut(&mut self, name: &str) -> &mut Vec<f64> {
        let key = self
            .entries
            .iter()
            .find(|e| e.name == name)
            .expect("entry exists")
            .storage
            .clone();
        &mut self
            .storages
            .iter_mut()
            .find(|s| s.key == key)
            .expect("storage exists")
            .values
    }

    /// Renames every entry with `f`.
    pub fn rename(&mut self, f: impl Fn(&str) -> String) {
        for e in &mut self.entries {
            e.name = f(&e.name);
        }
    }

    fn storage(&self, key: &str) -> &StorageData {
        self.storages
            .iter()
            .find(|s| s.key == key)
            .expect("storage exists")
    }

    /// The object pickle (protocol 2), as torch.save writes it. `zip` uses the zip format's
    /// 5-field persistent id, else the legacy 6-field one.
    pub fn object_pickle(&self, nesting: Nesting, zip: bool) -> Vec<u8> {
        let mut p = Pickle::new();
        match nesting {
            Nesting::Top => {}
            Nesting::StateDict => {
                p.op(b'}').put().op(b'(').str("state_dict");
            }
            Nesting::Model => {
                p.op(b'}').put().op(b'(').str("model");
            }
        }
        self.write_state_dict(&mut p, zip);
        match nesting {
            Nesting::Top => {}
            Nesting::StateDict => {
                p.str("train")
                    .op(0x89)
                    .str("dataset")
                    .str("cifar10")
                    .op(b'u');
            }
            Nesting::Model => {
                p.str("epoch").int(3).op(b'u');
            }
        }
        p.stop()
    }

    /// The state dict, an `OrderedDict` of tensors, onto `p`.
    pub fn write_state_dict(&self, p: &mut Pickle, zip: bool) {
        p.global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .put();
        p.op(b'(');
        for e in &self.entries {
            let s = self.storage(&e.storage);
            p.str(&e.name);
            if self.parameters {
                p.global("torch._utils", "_rebuild_parameter").op(b'(');
            }
            p.global("torch._utils", "_rebuild_tensor_v2");
            p.op(b'(');
            // persistent id
            p.op(b'(')
                .str("storage")
                .global("torch", s.ty.class())
                .str(&s.key);
            p.str("cuda:0").int(s.values.len());
            if !zip {
                p.op(b'N');
            }
            p.op(b't').put().op(b'Q');
            p.int(e.offset);
            p.tuple_of_ints(&e.shape);
            let stride = e.stride.clone().unwrap_or_else(|| {
                let mut stride = vec![1usize; e.shape.len()];
                for d in (0..e.shape.len().saturating_sub(1)).rev() {
                    stride[d] = stride[d + 1] * e.shape[d + 1];
                }
                stride
            });
            p.tuple_of_ints(&stride);
            p.op(0x89);
            p.global("collections", "OrderedDict")
                .op(b')')
                .op(b'R')
                .put();
            p.op(b't').put().op(b'R').put();
            if self.parameters {
                p.op(0x88);
                p.global("collections", "OrderedDict")
                    .op(b')')
                    .op(b'R')
                    .put();
                p.op(b't').put().op(b'R').put();
            }
        }
        p.op(b'u');
        // OrderedDict _metadata via BUILD, like a real state_dict()
        p.op(b'}').put().op(b'b');
    }

    /// Storage keys in first-use order.
    fn storage_order(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for e in &self.entries {
            if !keys.contains(&e.storage) {
                keys.push(e.storage.clone());
            }
        }
        keys
    }

    /// The legacy container (fact sheet, "Container").
    pub fn legacy(&self, nesting: Nesting) -> Vec<u8> {
        let storages: Vec<&StorageData> = self
            .storage_order()
            .iter()
            .map(|k| self.storage(k))
            .collect();
        legacy_container(self.object_pickle(nesting, false), &storages)
    }

    /// The zip container (`archive/data.pkl`, `archive/data/<key>`, `archive/version`).
    pub fn zip(&self, nesting: Nesting) -> Vec<u8> {
        let storages: Vec<&StorageData> = self
            .storage_order()
            .iter()
            .map(|k| self.storage(k))
            .collect();
        zip_container(self.object_pickle(nesting, true), &storages)
    }

    /// Renames every storage key with `f` (entries follow), e.g. to keep the keys of several
    /// models in one file apart.
    pub fn rekey(&mut self, f: impl Fn(&str) -> String) {
        for s in &mut self.storages {
            s.key = f(&s.key);
        }
        for e in &mut self.entries {
            e.storage = f(&e.storage);
        }
    }
}

/// DVERGE's ensemble file, as its trainers' `save` writes it:
/// `torch.save({'model_0': m0.state_dict(), 'model_1': ...}, 'epoch_200.pth')`.
#[derive(Clone, Debug, Default)]
pub struct Ensemble {
    /// The top-level keys and their state dicts, in file order. A storage key used by several
    /// models is one storage (DVERGE's members share one normaliser module): its values must
    /// agree.
    pub models: Vec<(String, Checkpoint)>,
    /// More top-level entries with int values, after the models (`('epoch', 200)`, or a
    /// `model_<i>` that is not a state dict).
    pub extra: Vec<(String, usize)>,
}

impl Ensemble {
    /// The models under `model_0`, `model_1`, ...
    pub fn of(models: Vec<Checkpoint>) -> Self {
        Ensemble {
            models: models
                .into_iter()
                .enumerate()
                .map(|(i, ck)| (format!("model_{i}"), ck))
                .collect(),
            extra: Vec::new(),
        }
    }

    pub fn object_pickle(&self, zip: bool) -> Vec<u8> {
        let mut p = Pickle::new();
        p.op(b'}').put().op(b'(');
        for (key, ck) in &self.models {
            p.str(key);
            ck.write_state_dict(&mut p, zip);
        }
        for (key, v) in &self.extra {
            p.str(key).int(*v);
        }
        p.op(b'u');
        p.stop()
    }

    /// Every storage once, in first-use order.
    fn storages(&self) -> Vec<&StorageData> {
        let mut out: Vec<&StorageData> = Vec::new();
        for (_, ck) in &self.models {
            for k in ck.storage_order() {
                let s = ck.storage(&k);
                match out.iter().find(|o| o.key == s.key) {
                    Some(o) => {
                        assert_eq!(o.values, s.values, "storage {k} shared with other values")
                    }
                    None => out.push(s),
                }
            }
        }
        out
    }

    pub fn legacy(&self) -> Vec<u8> {
        legacy_container(self.object_pickle(false), &self.storages())
    }

    pub fn zip(&self) -> Vec<u8> {
        zip_container(self.object_pickle(true), &self.storages())
    }
}

/// The legacy container around an object pickle written with legacy persistent ids.
fn legacy_container(object: Vec<u8>, storages: &[&StorageData]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend([
        0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
    ]);
    out.extend([0x80, 2, b'M', 0xe9, 0x03, b'.']);
    let mut p = Pickle::new();
    p.op(b'}').put().op(b'(');
    p.str("protocol_version").int(1001);
    p.str("little_endian").op(0x88);
    p.str("type_sizes").op(b'}').put().op(b'(');
    p.str("short").int(2).str("int").int(4).str("long").int(4);
    p.op(b'u').op(b'u');
    out.extend(p.stop());
    out.extend(object);
    let mut p = Pickle::new();
    p.op(b']').put().op(b'(');
    for s in storages {
        p.str(&s.key);
    }
    p.op(b'e');
    out.extend(p.stop());
    for s in storages {
        out.extend((s.values.len() as u64).to_le_bytes());
        out.extend(s.ty.encode(&s.values));
    }
    out
}

/// The zip container around an object pickle written with zip persistent ids.
fn zip_container(object: Vec<u8>, storages: &[&StorageData]) -> Vec<u8> {
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("archive/data.pkl".into(), object),
        ("archive/byteorder".into(), b"little".to_vec()),
    ];
    for s in storages {
        files.push((format!("archive/data/{}", s.key), s.ty.encode(&s.values)));
    }
    files.push(("archive/version".into(), b"3\n".to_vec()));
    zip_stored(&files)
}

/// CRC-32 (IEEE), bit by bit.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zip archive of stored (uncompressed) entries, written by hand.
pub fn zip_stored(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in files {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let header = |sig: u32, central: bool| {
            let mut h = Vec::new();
            h.extend(sig.to_le_bytes());
            if central {
                h.extend(20u16.to_le_bytes()); // made by
            }
            h.extend(20u16.to_le_bytes()); // version needed
            h.extend(0u16.to_le_bytes()); // flags
            h.extend(0u16.to_le_bytes()); // stored
            h.extend(0u16.to_le_bytes()); // time
            h.extend(0x21u16.to_le_bytes()); // date
            h.extend(crc.to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((name.len() as u16).to_le_bytes());
            h.extend(0u16.to_le_bytes()); // extra
            if central {
                h.extend(0u16.to_le_bytes()); // comment
                h.extend(0u16.to_le_bytes()); // disk
                h.extend(0u16.to_le_bytes()); // internal attrs
                h.extend(0u32.to_le_bytes()); // external attrs
                h.extend(offset.to_le_bytes());
            }
            h.extend(name.as_bytes());
            h
        };
        out.extend(header(0x0403_4b50, false));
        out.extend(data);
        central.extend(header(0x0201_4b50, true));
    }
    let cd_offset = out.len() as u32;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out.extend((files.len() as u16).to_le_bytes());
    out.extend((files.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

/// A small ResNet-8 model config (channels 4/8/16) for synthetic checkpoints.
pub fn tiny_model(n: usize, sharing: Sharing) -> ModelConfig {
    ModelConfig {
        depth: 8,
        width: 0.25,
        n,
        sharing,
        ..ModelConfig::default()
    }
}

/// Formula-defined values for tensor number `t` (distinct per tensor, f32-exact).
pub fn formula(t: usize, numel: usize) -> Vec<f64> {
    (0..numel)
        .map(|i| (((t * 7 + i * 13) % 29) as f64 - 14.0) / 64.0 + 0.5)
        .collect()
}

/// The authors'-layout checkpoint of a shared-conv or independent plan: every candidate's conv
/// named (shared-conv: aliasing one storage), values by [`formula`], counters int64.
pub fn authors_checkpoint(plan: &Plan) -> Checkpoint {
    let mut ck = Checkpoint::default();
    for (t, p) in plan.params.iter().enumerate() {
        let numel = p.numel();
        if p.name == "net.normalizer.mean" || p.name == "net.normalizer.std" {
            let v = match &p.init {
                eio_spec::plan::Init::Values(v) => v.clone(),
                _ => unreachable!(),
            };
            ck.add(&p.name, Ty::F32, &p.shape, v);
            continue;
        }
        match p.role {
            Role::Counter => ck.add(&p.name, Ty::I64, &p.shape, vec![(1000 + t) as f64]),
            Role::RunningStat if p.name.ends_with("running_var") => {
                ck.add(&p.name, Ty::F32, &p.shape, vec![0.75; numel])
            }
            _ => ck.add(&p.name, Ty::F32, &p.shape, formula(t, numel)),
        }
        if plan.sharing == Sharing::SharedConv
            && p.candidate.is_none()
            && p.name.ends_with(".candidate_ops.0.0.weight")
        {
            let stem = p.name.trim_end_matches(".candidate_ops.0.0.weight");
            for c in 1..plan.n {
                ck.alias(&format!("{stem}.candidate_ops.{c}.0.weight"), &p.name);
            }
        }
    }
    ck
}

/// The DVERGE ResNet name of an authors' key (candidate 0), written independently of the
/// library's mapping; `None` for the normaliser.
pub fn dverge_key(authors: &str) -> Option<String> {
    if authors.starts_with("net.normalizer.") {
        return None;
    }
    let k = authors.trim_start_matches("net.model.");
    let k = k.replace(".candidate_ops.0.0.weight", ".weight");
    let k = k
        .replace("conv1.candidate_ops.0.1.", "bn1.")
        .replace("conv2.candidate_ops.0.1.", "bn2.");
    Some(k)
}

/// DVERGE's ResNet state dict of the tiny model (`model.n = 1`): bare, or with `wrapper` as
/// its `ModelWrapper` writes it (`model.` prefix, `normalizer.{mean,std}`); and that plan.
pub fn dverge_checkpoint(wrapper: bool) -> (Checkpoint, Plan) {
    let single = Plan::build(&tiny_model(1, Sharing::SharedConv)).unwrap();
    let mut ck = authors_checkpoint(&single);
    if !wrapper {
        ck.remove("net.normalizer.mean");
        ck.remove("net.normalizer.std");
    }
    ck.rename(|n| match dverge_key(n) {
        Some(k) if wrapper => format!("model.{k}"),
        Some(k) => k,
        None => n.trim_start_matches("net.").to_string(),
    });
    (ck, single)
}

/// Member `m` of a DVERGE ensemble ([`dverge_checkpoint`]): every float value shifted by m/8
/// and every counter by 100·m (f32-exact, distinct per member), storage keys of its own except
/// the normaliser's, which all members share (DVERGE's `get_models` gives every
/// `ModelWrapper` one `NormalizeByChannelMeanStd`).
pub fn dverge_member(wrapper: bool, m: usize) -> Checkpoint {
    let (mut ck, _) = dverge_checkpoint(wrapper);
    let shared: Vec<String> = ck
        .entries
        .iter()
        .filter(|e| e.name.starts_with("normalizer."))
        .map(|e| e.storage.clone())
        .collect();
    for s in &mut ck.storages {
        if shared.contains(&s.key) {
            continue;
        }
        for v in &mut s.values {
            *v += if s.ty == Ty::I64 {
                100.0 * m as f64
            } else {
                m as f64 / 8.0
            };
        }
    }
    ck.rekey(|k| {
        if shared.iter().any(|s| s == k) {
            k.to_string()
        } else {
            (k.parse::<usize>().unwrap() + 1_000_000 * (m + 1)).to_string()
        }
    });
    ck
}

/// The values of entry `name` as the file holds them (float32 storages rounded).
pub fn stored_values(ck: &Checkpoint, name: &str) -> Vec<f64> {
    let e = ck
        .entries
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no entry {name}"));
    let s = ck.storage(&e.storage);
    match s.ty {
        Ty::F32 => s.values.iter().map(|&v| f64::from(v as f32)).collect(),
        _ => s.values.clone(),
    }
}
