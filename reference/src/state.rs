//! The named tensors of one RGN: parameters, BatchNorm buffers and the normaliser, keyed by the
//! `eio-spec` plan's canonical names, and their safetensors form.
//!
//! Every engine and checkpoint shares the safetensors layout: one tensor per
//! [`eio_spec::plan::ParamSpec`], named as the plan names it, f64 here (the reference's dtype),
//! and `num_batches_tracked` as an int64 scalar.

use std::collections::BTreeMap;
use std::path::Path as FsPath;

use eio_spec::plan::{Plan, Role};
use eio_spec::rng::Seeds;
use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, TensorView};

/// Loading or saving a state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{origin}: not a safetensors file")]
    Format {
        origin: String,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{origin}: tensor {name:?} is missing (the {plan} plan needs it)")]
    Missing {
        origin: String,
        name: String,
        plan: String,
    },
    #[error("{origin}: tensor {name:?} has shape {got:?}, the plan says {expected:?}")]
    Shape {
        origin: String,
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{origin}: tensor {name:?} has dtype {got:?}, expected {expected}")]
    Dtype {
        origin: String,
        name: String,
        got: Dtype,
        expected: &'static str,
    },
    #[error("{origin}: tensor {name:?} is not part of the {plan} plan")]
    Unexpected {
        origin: String,
        name: String,
        plan: String,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Every tensor of a model, by name.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelState {
    /// Learnable parameters, running statistics and constants.
    pub tensors: BTreeMap<String, ArrayD<f64>>,
    /// BatchNorm `num_batches_tracked` counters.
    pub counters: BTreeMap<String, i64>,
}

impl ModelState {
    /// The initial state of `plan` for ensemble member `member`, from
    /// [`Plan::initial_values`] (the same numbers every engine starts from).
    pub fn init(plan: &Plan, seeds: &Seeds, member: u64) -> Self {
        let values: BTreeMap<String, Vec<f64>> =
            plan.initial_values(seeds, member).into_iter().collect();
        Self::from_values(plan, &values, "initial values")
            .expect("the plan's initial values match its shapes")
    }

    /// A state from host values by name (row-major; a counter is one value), e.g. an imported
    /// PyTorch checkpoint; `origin` names them in errors.
    ///
    /// # Errors
    /// [`StateError::Missing`] or [`StateError::Shape`] naming the tensor.
    pub fn from_values(
        plan: &Plan,
        values: &BTreeMap<String, Vec<f64>>,
        origin: &str,
    ) -> Result<Self, StateError> {
        let mut state = ModelState {
            tensors: BTreeMap::new(),
            counters: BTreeMap::new(),
        };
        for spec in &plan.params {
            let v = values.get(&spec.name).ok_or_else(|| StateError::Missing {
                origin: origin.to_string(),
                name: spec.name.clone(),
                plan: plan.name.clone(),
            })?;
            if v.len() != spec.numel() {
                return Err(StateError::Shape {
                    origin: origin.to_string(),
                    name: spec.name.clone(),
                    got: vec![v.len()],
                    expected: spec.shape.clone(),
                });
            }
            if spec.role == Role::Counter {
                state.counters.insert(spec.name.clone(), v[0] as i64);
            } else {
                let array = ArrayD::from_shape_vec(IxDyn(&spec.shape), v.clone())
                    .expect("the length was checked against the shape");
                state.tensors.insert(spec.name.clone(), array);
            }
        }
        Ok(state)
    }

    /// The tensor called `name`.
    ///
    /// # Panics
    /// If the state has no such tensor: names come from the same plan, so this is a bug.
    pub fn tensor(&self, name: &str) -> &ArrayD<f64> {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("model state has no tensor {name:?}"))
    }

    /// Serialises to safetensors bytes.
    pub fn to_safetensors(&self) -> Vec<u8> {
        let mut buffers: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
        for (name, array) in &self.tensors {
            let bytes = array.iter().flat_map(|v| v.to_le_bytes()).collect();
            buffers.push((name.clone(), array.shape().to_vec(), Dtype::F64, bytes));
        }
        for (name, &count) in &self.counters {
            buffers.push((
                name.clone(),
                vec![],
                Dtype::I64,
                count.to_le_bytes().to_vec(),
            ));
        }
        let views: Vec<(String, TensorView<'_>)> = buffers
            .iter()
            .map(|(name, shape, dtype, bytes)| {
                let view = TensorView::new(*dtype, shape.clone(), bytes)
                    .expect("shape and byte length agree by construction");
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize(views, None).expect("in-memory serialisation cannot fail")
    }

    /// Parses safetensors bytes, checking every name, shape and dtype against `plan`.
    ///
    /// # Errors
    /// A [`StateError`] naming `origin` and the offending tensor.
    pub fn from_safetensors(plan: &Plan, bytes: &[u8], origin: &str) -> Result<Self, StateError> {
        let file =
            safetensors::SafeTensors::deserialize(bytes).map_err(|source| StateError::Format {
                origin: origin.to_string(),
                source,
            })?;
        for name in file.names() {
            if plan.param(name).is_none() {
                return Err(StateError::Unexpected {
                    origin: origin.to_string(),
                    name: name.to_string(),
                    plan: plan.name.clone(),
                });
            }
        }
        let mut state = ModelState {
            tensors: BTreeMap::new(),
            counters: BTreeMap::new(),
        };
        for spec in &plan.params {
            let view = file.tensor(&spec.name).map_err(|_| StateError::Missing {
                origin: origin.to_string(),
                name: spec.name.clone(),
                plan: plan.name.clone(),
            })?;
            if view.shape() != spec.shape.as_slice() {
                return Err(StateError::Shape {
                    origin: origin.to_string(),
                    name: spec.name.clone(),
                    got: view.shape().to_vec(),
                    expected: spec.shape.clone(),
                });
            }
            let (expected, dtype) = if spec.role == Role::Counter {
                ("I64", Dtype::I64)
            } else {
                ("F64", Dtype::F64)
            };
            if view.dtype() != dtype {
                return Err(StateError::Dtype {
                    origin: origin.to_string(),
                    name: spec.name.clone(),
                    got: view.dtype(),
                    expected,
                });
            }
            let words = view.data().chunks_exact(8).map(|c| {
                let mut word = [0u8; 8];
                word.copy_from_slice(c);
                word
            });
            if spec.role == Role::Counter {
                let count = words.map(i64::from_le_bytes).next().unwrap_or(0);
                state.counters.insert(spec.name.clone(), count);
            } else {
                let values: Vec<f64> = words.map(f64::from_le_bytes).collect();
                let array = ArrayD::from_shape_vec(IxDyn(&spec.shape), values)
                    .expect("shape was checked against the byte count by safetensors");
                state.tensors.insert(spec.name.clone(), array);
            }
        }
        Ok(state)
    }

    /// Writes the state atomically: to a temporary file beside `path`, then renamed over it,
    /// so a killed run leaves either the old file or the new one.
    ///
    /// # Errors
    /// [`StateError::Write`] naming the path.
    pub fn save(&self, path: &FsPath) -> Result<(), StateError> {
        let write_err = |source| StateError::Write {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("safetensors.tmp");
        std::fs::write(&tmp, self.to_safetensors()).map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)
    }

    /// Reads a state written by [`ModelState::save`] (or any engine) for `plan`.
    ///
    /// # Errors
    /// [`StateError::Read`] or any error of [`ModelState::from_safetensors`].
    pub fn load(plan: &Plan, path: &FsPath) -> Result<Self, StateError> {
        let bytes = std::fs::read(path).map_err(|source| StateError::Read {
            path: path.display().to_string(),
            source,
        })?;
        ModelState::from_safetensors(plan, &bytes, &path.display().to_string())
    }
}
