//! Checkpoints: everything a run needs to continue exactly where it stopped, in one
//! safetensors file.
//!
//! # Layout
//! * Tensors. A checkpoint holds one or more models (the members of a baseline ensemble, or one
//!   RGN, or one derived single-path network). With one member the tensors carry the `eio-spec`
//!   parameter names unchanged, so the file is also a plain model state that
//!   [`ModelState::load`] and `eio_reference::state::ModelState::load` read. With M > 1 members,
//!   member m's tensors are `member.<m>.<name>`. SGD momentum buffers are
//!   `optim.<m>.<name>`; Adam's state is `adam.<m>.exp_avg.<name>`,
//!   `adam.<m>.exp_avg_sq.<name>` and its step count `adam.<m>.step.<name>` (int64 scalar). Floats are stored in the dtype the engine ran in (so an f32 run resumes
//!   bit for bit), `num_batches_tracked` as int64 scalars.
//! * Metadata: the safetensors header's `__metadata__` holds one entry, `eio`, a JSON
//!   [`CheckpointMeta`]: format version, the resolved config, what the model is (RGN or a
//!   derived path), and the [`Progress`] of training, which is also the position of every random
//!   stream (each stream of `eio_spec::rng` is indexed by epoch or global iteration, so the
//!   progress counters are exactly where each stream continues). A second entry, `eio.sha256`,
//!   is the checksum of the tensors and the `eio` entry ([`crate::integrity`]), verified on
//!   every load: a flipped bit is [`CheckpointError::Checksum`] naming the file. Files written
//!   before the checksum existed (no `eio.sha256`) still load, unverified.
//!
//! # Atomicity
//! [`Checkpoint::save`] goes through [`crate::safe_write::write_atomically`]: a temporary file
//! beside the target, fsynced, renamed over the target, the folder fsynced. A run killed at any
//! instant leaves either the old or the new checkpoint, never a torn one; a failed write (disk
//! full) leaves the old one and no temporary file.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path as FsPath, PathBuf};

use candle_core::{DType, Device, Tensor};
use eio_spec::config::Config;
use eio_spec::plan::{Plan, Role};
use eio_spec::{Path, PathSpace};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::optim::{Adam, AdamConfig, AdamParamState, Optimiser, Sgd, SgdConfig};
use crate::state::ModelState;

/// The format tag written into every checkpoint; bumped on incompatible changes.
pub const FORMAT: &str = "eio-checkpoint/1";

/// Errors reading or writing a checkpoint; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write checkpoint {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable safetensors file (truncated or corrupted?)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{path} failed its checksum verification")]
    Checksum {
        path: PathBuf,
        #[source]
        source: crate::integrity::IntegrityError,
    },
    #[error("{path} has no eio metadata: it is not an eio checkpoint (import PyTorch files with `eio import`)")]
    NoMetadata { path: PathBuf },
    #[error("{path}: bad eio metadata: {message}")]
    BadMetadata { path: PathBuf, message: String },
    #[error("{path}: tensor {name:?} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: unexpected tensor {name:?} (not part of this model)")]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name:?} has shape {got:?}, the model needs {expected:?}")]
    BadShape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor {name:?} has dtype {got}, expected {expected}")]
    BadDtype {
        path: PathBuf,
        name: String,
        got: String,
        expected: String,
    },
    #[error("{path} was written for a different configuration: {differences}")]
    ConfigMismatch { path: PathBuf, differences: String },
    #[error("tensor operation failed")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Engine(#[from] crate::EngineError),
}

/// What the stored model is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ModelKind {
    /// A whole random gated network (or, with `model.n = 1`, a plain network / ensemble).
    Network,
    /// One path of an RGN, stored as a plain network (`model.n = 1`); `path` is the gate vector
    /// of the RGN it came from (text form), `from` the RGN checkpoint.
    Derived { path: String, from: String },
}

/// Which part of a training run the progress counters refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// EIO clean pre-training (Algorithm 1 lines 1-7).
    Pretrain,
    /// The method's main epochs (Algorithm 1 lines 8-25, baseline or AdvT training).
    Main,
    /// Fine-tuning a derived path.
    Finetune,
    /// Nothing left to run.
    Done,
}

/// Where training stands. `epoch` and `batch` are the next ones to run (phase-local epoch), and
/// `iteration` counts every batch run so far over all phases: the index of the per-iteration
/// random streams (`Layer`, `Paths`, `Gates`, `DistillStart`) for the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub epoch: usize,
    pub batch: usize,
    pub iteration: u64,
    /// Epochs run over all phases: the index of the per-epoch streams (`DataOrder`,
    /// `Augmentation`, `TargetPairing`) of the epoch in progress.
    pub global_epoch: usize,
    /// Figures of the epoch in progress so far.
    pub totals: EpochTotals,
}

impl Progress {
    /// The start of a run whose first phase is `phase`.
    pub fn start(phase: Phase) -> Self {
        Progress {
            phase,
            epoch: 0,
            batch: 0,
            iteration: 0,
            global_epoch: 0,
            totals: EpochTotals::default(),
        }
    }
}

/// Accumulated figures of the epoch in progress (kept in the checkpoint, so an epoch resumed
/// mid-way reports the same figures as an uninterrupted one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochTotals {
    /// Sum over batches of (mean batch loss × batch images).
    pub loss_sum: f64,
    /// Correct clean predictions (clean steps only).
    pub correct: usize,
    /// Images whose predictions were counted in `correct`.
    pub counted: usize,
    /// Images trained on.
    pub images: usize,
    /// Sum of Eq. 2 feature losses (last step, mean over paths) × batch images (EIO only).
    pub distill_sum: f64,
    /// Sign ties in distillation (|g| below the tie threshold).
    pub sign_ties: usize,
    /// Seconds spent on batches.
    pub seconds: f64,
}

/// The JSON in a checkpoint's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// [`FORMAT`].
    pub format: String,
    /// The eio version that wrote it.
    pub writer: String,
    /// The resolved config of the run (the model is `config.model`).
    pub config: Config,
    pub model: ModelKind,
    /// Models stored (ensemble members).
    pub members: usize,
    pub progress: Progress,
    /// `f32` or `f64`: the float dtype the run used.
    pub dtype: String,
    /// Whether momentum buffers are stored.
    pub optimiser: bool,
    /// The `metrics.jsonl` line (JSON of a [`crate::train::EpochRecord`], without the newline)
    /// of the last finished epoch, so a resumed run can restore a record lost from the file (a
    /// torn last line) byte for byte; absent in checkpoints of older eio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_record: Option<String>,
}

/// A checkpoint in memory: metadata, the member states and their optimisers.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub members: Vec<ModelState>,
    /// One per member when training state is kept; empty for a finished model.
    pub optimisers: Vec<Optimiser>,
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F64 => "f64",
        _ => "f32",
    }
}

impl Checkpoint {
    /// The plan of the stored model.
    ///
    /// # Errors
    /// If the stored config's model cannot be built (never for a checkpoint eio wrote).
    pub fn plan(&self) -> Result<Plan, eio_spec::plan::PlanError> {
        self.meta.config.plan()
    }

    /// The path to run for member evaluation: all zeros (a plain or derived network has only
    /// candidate 0).
    pub fn plain_path(plan: &Plan) -> Path {
        Path::new(vec![0; plan.k()])
    }

    fn tensor_name(&self, member: usize, name: &str) -> String {
        if self.meta.members == 1 {
            name.to_string()
        } else {
            format!("member.{member}.{name}")
        }
    }

    /// Writes the checkpoint atomically (temporary file, fsync, rename, fsync of the folder).
    ///
    /// # Errors
    /// [`CheckpointError::Write`] naming the file, or a device error.
    pub fn save(&self, path: &FsPath) -> Result<(), CheckpointError> {
        let write_err = |source| CheckpointError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (m, state) in self.members.iter().enumerate() {
            for (name, t) in &state.tensors {
                buffers.push(host_tensor(self.tensor_name(m, name), t)?);
            }
            for (name, &c) in &state.counters {
                buffers.push((
                    self.tensor_name(m, name),
                    Dtype::I64,
                    vec![],
                    c.to_le_bytes().to_vec(),
                ));
            }
        }
        for (m, opt) in self.optimisers.iter().enumerate() {
            match opt {
                Optimiser::Sgd(sgd) => {
                    for (name, t) in sgd.buffers() {
                        buffers.push(host_tensor(format!("optim.{m}.{name}"), t)?);
                    }
                }
                Optimiser::Adam(adam) => {
                    for (name, state) in adam.states() {
                        buffers.push(host_tensor(
                            format!("adam.{m}.exp_avg.{name}"),
                            &state.exp_avg,
                        )?);
                        buffers.push(host_tensor(
                            format!("adam.{m}.exp_avg_sq.{name}"),
                            &state.exp_avg_sq,
                        )?);
                        buffers.push((
                            format!("adam.{m}.step.{name}"),
                            Dtype::I64,
                            vec![],
                            (state.step as i64).to_le_bytes().to_vec(),
                        ));
                    }
                }
            }
        }
        let views: Vec<(String, TensorView<'_>)> = buffers
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| CheckpointError::BadMetadata {
                        path: path.to_path_buf(),
                        message: format!("tensor {name:?}: {e}"),
                    })
            })
            .collect::<Result<_, _>>()?;
        let meta = serde_json::to_string(&self.meta).map_err(|e| CheckpointError::BadMetadata {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let metadata = HashMap::from([("eio".to_string(), meta)]);
        let bytes = crate::integrity::serialize_sealed(views, metadata).map_err(|source| {
            CheckpointError::Corrupt {
                path: path.to_path_buf(),
                source,
            }
        })?;
        write_atomically(path, &bytes).map_err(write_err)
    }

    /// Reads a checkpoint onto `device` in `dtype` (`None`: the dtype it was written in),
    /// verifying its checksum when it has one.
    ///
    /// # Errors
    /// A missing or truncated file, a checksum mismatch, missing metadata, a missing, unexpected or misshapen
    /// tensor: each named with the file.
    pub fn load(
        path: &FsPath,
        device: &Device,
        dtype: Option<DType>,
    ) -> Result<Checkpoint, CheckpointError> {
        let bytes = fs::read(path).map_err(|source| CheckpointError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, path, device, dtype)
    }

    /// [`Checkpoint::load`] from bytes; `path` names them in errors.
    ///
    /// # Errors
    /// As [`Checkpoint::load`].
    pub fn from_bytes(
        bytes: &[u8],
        path: &FsPath,
        device: &Device,
        dtype: Option<DType>,
    ) -> Result<Checkpoint, CheckpointError> {
        let p = || path.to_path_buf();
        let corrupt = |source| CheckpointError::Corrupt { path: p(), source };
        match crate::integrity::check(bytes) {
            Ok(_) => {}
            Err(crate::integrity::IntegrityError::Unreadable(source)) => {
                return Err(corrupt(source))
            }
            Err(source) => return Err(CheckpointError::Checksum { path: p(), source }),
        }
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(corrupt)?;
        let tensors = SafeTensors::deserialize(bytes).map_err(corrupt)?;
        let text = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("eio"))
            .ok_or_else(|| CheckpointError::NoMetadata { path: p() })?;
        let meta: CheckpointMeta =
            serde_json::from_str(text).map_err(|e| CheckpointError::BadMetadata {
                path: p(),
                message: e.to_string(),
            })?;
        if meta.format != FORMAT {
            return Err(CheckpointError::BadMetadata {
                path: p(),
                message: format!("format {:?}, this eio reads {FORMAT:?}", meta.format),
            });
        }
        meta.config
            .validate()
            .map_err(|e| CheckpointError::BadMetadata {
                path: p(),
                message: format!("stored config is invalid: {e}"),
            })?;
        if meta.members == 0 {
            return Err(CheckpointError::BadMetadata {
                path: p(),
                message: "members is 0".into(),
            });
        }
        let plan = meta
            .config
            .plan()
            .map_err(|e| CheckpointError::BadMetadata {
                path: p(),
                message: format!("stored model cannot be built: {e}"),
            })?;
        let stored_dtype = match meta.dtype.as_str() {
            "f32" => DType::F32,
            "f64" => DType::F64,
            other => {
                return Err(CheckpointError::BadMetadata {
                    path: p(),
                    message: format!("dtype {other:?} is not f32 or f64"),
                })
            }
        };
        let dtype = dtype.unwrap_or(stored_dtype);
        let mut expected: Vec<String> = Vec::new();
        let read = |name: &str, shape: &[usize], role: Role| -> Result<Vec<f64>, CheckpointError> {
            let view = tensors
                .tensor(name)
                .map_err(|_| CheckpointError::MissingTensor {
                    path: p(),
                    name: name.to_string(),
                })?;
            if view.shape() != shape {
                return Err(CheckpointError::BadShape {
                    path: p(),
                    name: name.to_string(),
                    got: view.shape().to_vec(),
                    expected: shape.to_vec(),
                });
            }
            host_values(&view, role == Role::Counter).ok_or_else(|| CheckpointError::BadDtype {
                path: p(),
                name: name.to_string(),
                got: format!("{:?}", view.dtype()),
                expected: if role == Role::Counter {
                    "I64"
                } else {
                    "F32 or F64"
                }
                .into(),
            })
        };
        let mut members = Vec::with_capacity(meta.members);
        for m in 0..meta.members {
            let mut values = HashMap::new();
            let mut counters = BTreeMap::new();
            for spec in &plan.params {
                let name = if meta.members == 1 {
                    spec.name.clone()
                } else {
                    format!("member.{m}.{}", spec.name)
                };
                let v = read(&name, &spec.shape, spec.role)?;
                if spec.role == Role::Counter {
                    counters.insert(spec.name.clone(), counter_value(&tensors, &name));
                }
                values.insert(spec.name.clone(), v);
                expected.push(name);
            }
            let mut state = ModelState::from_values(&plan, values, device, dtype)?;
            state.counters = counters;
            members.push(state);
        }
        let mut optimisers = Vec::new();
        if meta.optimiser {
            let adam = optimiser_kind(&meta.config, meta.progress.phase) == OptimiserKind::Adam;
            for m in 0..meta.members {
                let stored = |name: String,
                              spec: &eio_spec::plan::ParamSpec,
                              expected: &mut Vec<String>|
                 -> Result<Option<Tensor>, CheckpointError> {
                    if tensors.tensor(&name).is_err() {
                        return Ok(None);
                    }
                    let v = read(&name, &spec.shape, spec.role)?;
                    expected.push(name);
                    Ok(Some(
                        Tensor::from_vec(v, spec.shape.as_slice(), device)?.to_dtype(dtype)?,
                    ))
                };
                let learnable = plan.params.iter().filter(|s| s.role == Role::Learnable);
                if adam {
                    let mut states = BTreeMap::new();
                    for spec in learnable {
                        let first = stored(
                            format!("adam.{m}.exp_avg.{}", spec.name),
                            spec,
                            &mut expected,
                        )?;
                        let second = stored(
                            format!("adam.{m}.exp_avg_sq.{}", spec.name),
                            spec,
                            &mut expected,
                        )?;
                        let step_name = format!("adam.{m}.step.{}", spec.name);
                        let (Some(exp_avg), Some(exp_avg_sq)) = (first, second) else {
                            continue;
                        };
                        read(&step_name, &[], Role::Counter)?;
                        let step = counter_value(&tensors, &step_name);
                        expected.push(step_name.clone());
                        if step < 1 {
                            return Err(CheckpointError::BadMetadata {
                                path: p(),
                                message: format!("tensor {step_name:?}: Adam step {step} < 1"),
                            });
                        }
                        states.insert(
                            spec.name.clone(),
                            AdamParamState {
                                step: step as u64,
                                exp_avg,
                                exp_avg_sq,
                            },
                        );
                    }
                    optimisers.push(Optimiser::Adam(Adam::with_states(
                        adam_config(&meta.config, 0.0),
                        states,
                    )));
                } else {
                    let mut buffers = BTreeMap::new();
                    for spec in learnable {
                        let name = format!("optim.{m}.{}", spec.name);
                        if let Some(t) = stored(name, spec, &mut expected)? {
                            buffers.insert(spec.name.clone(), t);
                        }
                    }
                    let config = phase_sgd_config(&meta.config, meta.progress.phase, 0.0);
                    optimisers.push(Optimiser::Sgd(Sgd::with_buffers(config, buffers)));
                }
            }
        }
        let expected: std::collections::HashSet<&str> =
            expected.iter().map(String::as_str).collect();
        if let Some(name) = tensors.names().into_iter().find(|n| !expected.contains(*n)) {
            return Err(CheckpointError::UnexpectedTensor {
                path: p(),
                name: name.to_string(),
            });
        }
        Ok(Checkpoint {
            meta,
            members,
            optimisers,
        })
    }

    /// The float dtype named in the metadata.
    pub fn dtype(&self) -> DType {
        if self.meta.dtype == "f64" {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// A fresh checkpoint of `members` models of `config` (dtype as given).
    pub fn new(
        config: &Config,
        model: ModelKind,
        members: Vec<ModelState>,
        optimisers: Vec<Optimiser>,
        progress: Progress,
        dtype: DType,
    ) -> Self {
        Checkpoint {
            meta: CheckpointMeta {
                format: FORMAT.to_string(),
                writer: format!("eio {}", env!("CARGO_PKG_VERSION")),
                config: config.clone(),
                model,
                members: members.len(),
                progress,
                dtype: dtype_name(dtype).to_string(),
                optimiser: !optimisers.is_empty(),
                last_record: None,
            },
            members,
            optimisers,
        }
    }

    /// Refuses to resume this checkpoint under a different `config`: lists every setting that
    /// differs (as dotted keys).
    ///
    /// # Errors
    /// [`CheckpointError::ConfigMismatch`].
    pub fn check_config(&self, config: &Config, path: &FsPath) -> Result<(), CheckpointError> {
        let differences = config_differences(&self.meta.config, config);
        if differences.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::ConfigMismatch {
                path: path.to_path_buf(),
                differences: differences.join(", "),
            })
        }
    }

    /// The gate vector of a derived model, or `None` for a network.
    ///
    /// # Errors
    /// A malformed stored path.
    pub fn derived_path(&self, space: &PathSpace) -> Result<Option<Path>, String> {
        match &self.meta.model {
            ModelKind::Network => Ok(None),
            ModelKind::Derived { path, .. } => {
                space.parse(path).map(Some).map_err(|e| e.to_string())
            }
        }
    }
}

/// The SGD settings of pre-training and the main phase at learning rate `lr`: `train`'s
/// momentum, weight decay and Nesterov switch. [`phase_sgd_config`] gives any phase's.
pub fn sgd_config(config: &Config, lr: f64) -> SgdConfig {
    phase_sgd_config(config, Phase::Main, lr)
}

/// The SGD settings of `phase` at learning rate `lr`: `train.momentum` and
/// `train.weight_decay` in every phase (the paper fine-tunes with "momentum 0.9 and weight
/// decay 0.0001", Sec. 4.1); Nesterov from `train.nesterov` for pre-training and the main phase
/// and from `derive.nesterov` for fine-tuning (the authors' `finetune.py` uses plain momentum
/// while their EIO training uses Nesterov).
pub fn phase_sgd_config(config: &Config, phase: Phase, lr: f64) -> SgdConfig {
    SgdConfig {
        lr,
        momentum: config.train.momentum,
        weight_decay: config.train.weight_decay,
        nesterov: match phase {
            Phase::Finetune => config.derive.nesterov,
            Phase::Pretrain | Phase::Main | Phase::Done => config.train.nesterov,
        },
    }
}

/// Which optimiser a phase of a config runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimiserKind {
    Sgd,
    Adam,
}

/// The main phase runs `train.optimizer`; EIO's pre-training and fine-tuning run SGD.
pub fn optimiser_kind(config: &Config, phase: Phase) -> OptimiserKind {
    match (phase, config.train.optimizer) {
        (Phase::Main, eio_spec::config::Optimizer::Adam) => OptimiserKind::Adam,
        _ => OptimiserKind::Sgd,
    }
}

/// Adam's settings of the main phase at learning rate `lr`: `train.adam` with
/// `train.weight_decay` as coupled L2 decay.
pub fn adam_config(config: &Config, lr: f64) -> AdamConfig {
    let t = &config.train;
    AdamConfig {
        lr,
        beta1: t.adam.beta1,
        beta2: t.adam.beta2,
        eps: t.adam.eps,
        weight_decay: t.weight_decay,
    }
}

/// A fresh optimiser for `phase` at learning rate `lr` ([`optimiser_kind`]).
pub fn phase_optimiser(config: &Config, phase: Phase, lr: f64) -> Optimiser {
    match optimiser_kind(config, phase) {
        OptimiserKind::Sgd => Optimiser::Sgd(Sgd::new(phase_sgd_config(config, phase, lr))),
        OptimiserKind::Adam => Optimiser::Adam(Adam::new(adam_config(config, lr))),
    }
}

/// Sets an optimiser to `phase`'s settings at learning rate `lr`, keeping its state (the
/// schedule's per-epoch update; fine-tuning's own Nesterov switch).
pub fn configure_optimiser(optimiser: &mut Optimiser, config: &Config, phase: Phase, lr: f64) {
    match optimiser {
        Optimiser::Sgd(sgd) => sgd.config = phase_sgd_config(config, phase, lr),
        Optimiser::Adam(adam) => adam.config = adam_config(config, lr),
    }
}

/// Dotted keys (with both values) where two configs differ.
pub fn config_differences(stored: &Config, requested: &Config) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    let null = serde_json::Value::Null;
                    walk(
                        &key,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{prefix}: checkpoint {a}, requested {b}")),
            _ => {}
        }
    }
    let (a, b) = (
        serde_json::to_value(stored).unwrap_or_default(),
        serde_json::to_value(requested).unwrap_or_default(),
    );
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    out
}

/// `t` as safetensors bytes under `name`: f64 as f64, every other float as f32 (little-endian).
///
/// # Errors
/// A device error.
pub(crate) fn host_tensor(
    name: String,
    t: &Tensor,
) -> candle_core::Result<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all()?;
    let (dtype, bytes) = match t.dtype() {
        DType::F64 => (
            Dtype::F64,
            flat.to_vec1::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        _ => (
            Dtype::F32,
            flat.to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    };
    Ok((name, dtype, shape, bytes))
}

/// Float values of a stored tensor (`None` for a dtype this model cannot hold there).
fn host_values(view: &TensorView<'_>, counter: bool) -> Option<Vec<f64>> {
    let data = view.data();
    match (view.dtype(), counter) {
        (Dtype::I64, true) => Some(
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64)
                .collect(),
        ),
        (Dtype::F32, false) => Some(
            data.chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap_or([0; 4]))))
                .collect(),
        ),
        (Dtype::F64, false) => Some(
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        _ => None,
    }
}

/// The exact int64 of a counter already checked by `host_values`.
fn counter_value(tensors: &SafeTensors<'_>, name: &str) -> i64 {
    tensors
        .tensor(name)
        .ok()
        .and_then(|v| v.data().get(..8).map(|b| b.try_into().unwrap_or([0; 8])))
        .map_or(0, i64::from_le_bytes)
}

/// The one safe-write path of eio (kept here so `checkpoint::write_atomically` keeps working).
pub use crate::safe_write::write_atomically;
