//! PyTorch interoperability for eio: read PyTorch checkpoints without Python, map them onto an
//! `eio-spec` [`Plan`], and export eio models under the names PyTorch code loads.
//!
//! # Reading ([`torch`])
//! [`read_state_dict`] reads PyTorch's legacy (pre-1.6) format, the format of the authors'
//! released RGN (`shared/notes/official-checkpoint.md`, "Container"), PyTorch's zip format
//! (`<archive>/data.pkl` + `<archive>/data/<key>`), and safetensors. The state dict may sit at
//! the top level or under `state_dict`, `model` or a lone `model_<i>`; storages on `cuda:N` are
//! read to the host; float16/bfloat16/float32/float64 and the integer and bool storages are
//! supported. [`read_models`] also reads DVERGE's ensemble files,
//! `{'model_0': m0.state_dict(), 'model_1': ...}` (its trainers' `save`): one state dict per
//! member, in index order (keys must be `model_0` to `model_<N-1>`). The pickles are read by
//! [`pickle`], a small reader of exactly the opcodes `torch.save` writes, with every length
//! checked before anything is allocated (fuzzed by `fuzz/fuzz_targets/pytorch_import.rs`
//! through [`torch::check_bytes`]).
//!
//! Why not a pickle crate: candle's `candle_core::pickle` reads only the zip format and
//! allocates a string's stated length before reading it (`vec![0u8; len]` from a fuzzed u32)
//! and clones memoised objects; `serde-pickle` has no persistent ids; `repugnant-pickle` (0.0.1)
//! calls itself "low effort scraping". The hand-written reader ([`pickle`], about 450 lines) never recurses and
//! uses memory linear in the input length.
//!
//! # Importing ([`import_state_dict`])
//! Two key layouts, detected from the names (or forced with [`ImportOptions::layout`]):
//!
//! * **authors** ([`SourceLayout::Authors`]): the released checkpoint's keys
//!   `net.model.<module>.candidate_ops.<c>.{0,1}.*`, `net.model.layer{2,3}.0.downsample.*`,
//!   `net.model.fc.*`, `net.normalizer.{mean,std}` (fact sheet, "Key naming"), also without the
//!   `net.` prefix and behind any number of DataParallel `module.` prefixes. The gate
//!   parameters `AP_path_alpha` / `AP_path_wb` of the authors' training-time module are skipped
//!   and listed in [`Imported::ignored`]. For a `shared-conv` plan the n conv copies of every
//!   RGB must be bit-identical (the released file aliases one storage; formats without aliasing
//!   repeat it) and one is stored; for an `independent` plan each copy is kept.
//! * **DVERGE** ([`SourceLayout::Dverge`]): DVERGE's plain CIFAR ResNet (`models/resnet.py`):
//!   `conv1.weight`, `bn1.*`, `layer{S}.{B}.conv{1,2}.weight`, `layer{S}.{B}.bn{1,2}.*`,
//!   `layer{S}.{B}.downsample.0.weight`, `layer{S}.{B}.downsample.1.*`, `fc.{weight,bias}`;
//!   optionally behind DVERGE's `ModelWrapper` (`model.` prefix, plus `normalizer.{mean,std}`)
//!   and `module.` prefixes. It is one model, so its conv and BN initialise **every**
//!   candidate of each RGB (for n > 1 all paths start equal; EIO training then diversifies
//!   them).
//!
//! Every plan tensor must be found with the plan's shape: all missing, unexpected and
//! mis-shaped keys are reported together in one [`InteropError::Mismatch`]. The normaliser is
//! checked against the plan (built from the config) and a mismatch is an error that gives both
//! values, unless [`NormalizerPolicy::FromFile`] asks to take the file's values (the caller
//! then sets `model.mean` / `model.std` from [`Imported::normalizer`]).
//!
//! [`import_members`] maps each member of an ensemble file onto the plan exactly as
//! [`import_state_dict`] maps one state dict; an error names the member's key.
//!
//! # Exporting ([`export_dverge`], [`export_authors`])
//! Both write safetensors (float32 or float64; `num_batches_tracked` as int64 scalars) that
//! `safetensors.torch.load_file` reads and `load_state_dict` accepts:
//!
//! * [`export_dverge`]: one path (a gate vector) as DVERGE's ResNet: the names above, the
//!   chosen candidate's conv and BN under `conv{1,2}` / `bn{1,2}`; [`DvergeNames::Wrapper`]
//!   prefixes `model.` and adds `normalizer.{mean,std}` (DVERGE's `ModelWrapper`).
//! * [`export_authors`]: the whole RGN under the authors' `net.model.*` / `net.normalizer.*`
//!   keys, the shared conv repeated for every candidate, as their `EnsembleInOneNets` module
//!   expects (their loader uses `strict=False`, since it has the gate parameters too).

pub mod export;
pub mod import;
pub mod pickle;
pub mod torch;

pub use eio_spec::plan::Plan;
pub use export::{export_authors, export_dverge, DvergeNames, ExportDtype, ExportOptions};
pub use import::{
    import_members, import_state_dict, ImportOptions, Imported, Normalizer, NormalizerPolicy,
    NormalizerSource, ShapeMismatch, SourceLayout,
};
pub use torch::{
    read_models, read_models_file, read_state_dict, read_state_dict_file, StateDict, TorchDtype,
    TorchTensor,
};

/// Everything that can go wrong reading, importing or exporting.
#[derive(Debug, thiserror::Error)]
pub enum InteropError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: not a PyTorch checkpoint (legacy, zip) or safetensors file; it starts with {head}")]
    NotACheckpoint { origin: String, head: String },
    #[error("{origin}: truncated: {what} needs {needed} bytes, {available} remain")]
    Truncated {
        origin: String,
        what: String,
        needed: u64,
        available: u64,
    },
    #[error("{origin}: {message}")]
    Format { origin: String, message: String },
    #[error("{origin}: malformed {what} pickle")]
    Pickle {
        origin: String,
        what: &'static str,
        #[source]
        source: pickle::PickleError,
    },
    #[error("{origin}: malformed zip archive ({what})")]
    Zip {
        origin: String,
        what: String,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("{origin}: cannot read zip {what}")]
    ZipEntry {
        origin: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: malformed safetensors file")]
    Safetensors {
        origin: String,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("tensor {name:?}: {message}")]
    Tensor { name: String, message: String },
    #[error("{what} exceeds the limit of {limit} elements")]
    TooLarge { what: String, limit: usize },
    #[error("{0}")]
    Mismatch(Box<KeyMismatch>),
    #[error("{first:?} and {other:?} should hold the same shared conv weight (model.sharing = \"shared-conv\") but differ by up to {max_abs_diff:e} (first at element {index}); import with model.sharing = \"independent\" to keep both")]
    SharedConvDiffers {
        first: String,
        other: String,
        max_abs_diff: f64,
        index: usize,
    },
    #[error("the file's normaliser mean {file_mean:?} / std {file_std:?} differs from the config's mean {config_mean:?} / std {config_std:?}: set model.mean and model.std to the file's values (or import with the normaliser taken from the file)")]
    NormalizerMismatch {
        file_mean: Vec<f64>,
        file_std: Vec<f64>,
        config_mean: Vec<f64>,
        config_std: Vec<f64>,
    },
    #[error("the {layout} layout cannot describe the {plan} plan: {reason}")]
    UnsupportedPlan {
        layout: String,
        plan: String,
        reason: String,
    },
    #[error("gate vector {path:?} does not fit the plan (K = {k} gates, n = {n} candidates)")]
    BadPath {
        path: Vec<usize>,
        k: usize,
        n: usize,
    },
    #[error("value {name:?}: {message}")]
    Value { name: String, message: String },
    /// An error importing one model of an ensemble file, under its key (`model_<i>`).
    #[error("{key}: {error}")]
    Member {
        key: String,
        error: Box<InteropError>,
    },
}

/// Keys of a state dict that do not fit a plan: all of them, reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMismatch {
    /// The target plan, e.g. `resnet20 (n = 2, SharedConv)`.
    pub plan: String,
    /// The source key layout.
    pub layout: String,
    /// Source keys the plan needs that the file lacks.
    pub missing: Vec<String>,
    /// Keys in the file the plan has no place for.
    pub unexpected: Vec<String>,
    /// Keys whose shape differs from the plan's.
    pub shapes: Vec<ShapeMismatch>,
}

impl std::fmt::Display for KeyMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the state dict does not fit the {} plan ({} layout):",
            self.plan, self.layout
        )?;
        if !self.missing.is_empty() {
            write!(
                f,
                "\n  missing ({}): {}",
                self.missing.len(),
                self.missing.join(", ")
            )?;
        }
        if !self.unexpected.is_empty() {
            write!(
                f,
                "\n  unexpected ({}): {}",
                self.unexpected.len(),
                self.unexpected.join(", ")
            )?;
        }
        for m in &self.shapes {
            write!(
                f,
                "\n  shape: {} is {:?} in the file, the plan's {} is {:?}",
                m.key, m.file, m.param, m.plan
            )?;
        }
        Ok(())
    }
}
