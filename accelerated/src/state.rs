//! The named tensors of one RGN on a device, and their safetensors form.
//!
//! Names, shapes and initial values come from the `eio-spec` plan
//! ([`eio_spec::Plan::initial_values`]), so this engine starts from exactly the numbers the
//! reference starts from. The safetensors layout is the one `eio-reference` writes: one tensor
//! per plan entry, `num_batches_tracked` as an int64 scalar.

use std::collections::{BTreeMap, HashMap};
use std::path::Path as FsPath;

use candle_core::{DType, Device, Tensor};
use eio_spec::plan::{Plan, Role};
use eio_spec::rng::Seeds;

use crate::EngineError;

/// Every tensor of a model, by name, on one device in one float dtype.
#[derive(Debug, Clone)]
pub struct ModelState {
    /// Learnable parameters, running statistics and constants.
    pub tensors: BTreeMap<String, Tensor>,
    /// BatchNorm `num_batches_tracked` counters.
    pub counters: BTreeMap<String, i64>,
}

impl ModelState {
    /// The initial state of `plan` for ensemble member `member` (the plan's seeded values).
    ///
    /// # Errors
    /// If the device cannot hold the tensors.
    pub fn init(
        plan: &Plan,
        seeds: &Seeds,
        member: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, EngineError> {
        let values = plan.initial_values(seeds, member);
        Self::from_values(plan, values.into_iter().collect(), device, dtype)
    }

    /// A state from host values by name (row-major f64, counters as their value).
    ///
    /// # Errors
    /// [`EngineError::MissingTensor`] / [`EngineError::BadShape`] naming the tensor.
    pub fn from_values(
        plan: &Plan,
        mut values: HashMap<String, Vec<f64>>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, EngineError> {
        let mut state = ModelState {
            tensors: BTreeMap::new(),
            counters: BTreeMap::new(),
        };
        for spec in &plan.params {
            let data = values
                .remove(&spec.name)
                .ok_or_else(|| EngineError::MissingTensor {
                    name: spec.name.clone(),
                })?;
            if data.len() != spec.numel() {
                return Err(EngineError::BadShape {
                    name: spec.name.clone(),
                    got: vec![data.len()],
                    expected: spec.shape.clone(),
                });
            }
            if spec.role == Role::Counter {
                state.counters.insert(spec.name.clone(), data[0] as i64);
            } else {
                let t = Tensor::from_vec(data, spec.shape.as_slice(), device)?.to_dtype(dtype)?;
                state.tensors.insert(spec.name.clone(), t);
            }
        }
        Ok(state)
    }

    /// Every tensor as host f64 values, by name (counters as one value), for comparison with
    /// the reference and for checkpoints.
    ///
    /// # Errors
    /// If a tensor cannot be read back from the device.
    pub fn to_values(&self) -> Result<BTreeMap<String, Vec<f64>>, EngineError> {
        let mut out = BTreeMap::new();
        for (name, t) in &self.tensors {
            out.insert(
                name.clone(),
                t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            );
        }
        for (name, &c) in &self.counters {
            out.insert(name.clone(), vec![c as f64]);
        }
        Ok(out)
    }

    /// The tensor called `name`.
    ///
    /// # Panics
    /// If there is none: names come from the same plan, so this is a bug.
    pub fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("model state has no tensor {name:?}"))
    }

    /// Writes the state as safetensors (f32 or f64 as held, counters int64) with its checksum
    /// ([`crate::integrity`]), through [`crate::safe_write::write_atomically`].
    ///
    /// # Errors
    /// [`EngineError::Io`] naming the path, or a device error.
    pub fn save(&self, path: &FsPath) -> Result<(), EngineError> {
        let tensors: Vec<(String, &Tensor)> =
            self.tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        let counters: Vec<(String, i64)> =
            self.counters.iter().map(|(n, &c)| (n.clone(), c)).collect();
        write_tensors(path, &tensors, &counters)
    }

    /// Reads a safetensors state for `plan` (written by either engine) onto `device`.
    ///
    /// # Errors
    /// A missing, unexpected or misshapen tensor, named; an unreadable file.
    pub fn load(
        plan: &Plan,
        path: &FsPath,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, EngineError> {
        let loaded = candle_core::safetensors::load(path, &Device::Cpu)?;
        if let Some(name) = loaded.keys().find(|k| plan.param(k).is_none()) {
            return Err(EngineError::UnexpectedTensor { name: name.clone() });
        }
        let mut values = HashMap::new();
        let mut counters = BTreeMap::new();
        for spec in &plan.params {
            let t = loaded
                .get(&spec.name)
                .ok_or_else(|| EngineError::MissingTensor {
                    name: spec.name.clone(),
                })?;
            if t.dims() != spec.shape.as_slice() {
                return Err(EngineError::BadShape {
                    name: spec.name.clone(),
                    got: t.dims().to_vec(),
                    expected: spec.shape.clone(),
                });
            }
            let v = if spec.role == Role::Counter {
                // Kept as read: an int64 beyond 2^53 does not survive the f64 of `values`.
                let count = t.to_dtype(DType::I64)?.to_scalar::<i64>()?;
                counters.insert(spec.name.clone(), count);
                vec![count as f64]
            } else {
                t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?
            };
            values.insert(spec.name.clone(), v);
        }
        let mut state = Self::from_values(plan, values, device, dtype)?;
        state.counters = counters;
        Ok(state)
    }
}

/// Writes `tensors` (f64 as f64, every other float as f32) and int64 `counters` as one
/// safetensors file with its checksum ([`crate::integrity`]), through
/// [`crate::safe_write::write_atomically`].
///
/// # Errors
/// [`EngineError::Io`] naming the file, or a device error.
pub(crate) fn write_tensors(
    path: &FsPath,
    tensors: &[(String, &Tensor)],
    counters: &[(String, i64)],
) -> Result<(), EngineError> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut buffers = tensors
        .iter()
        .map(|(name, t)| crate::checkpoint::host_tensor(name.clone(), t))
        .collect::<Result<Vec<_>, _>>()?;
    for (name, c) in counters {
        buffers.push((name.clone(), Dtype::I64, vec![], c.to_le_bytes().to_vec()));
    }
    let io = |message: String| EngineError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(message),
    };
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| io(format!("tensor {name:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes =
        crate::integrity::serialize_sealed(views, HashMap::new()).map_err(|e| io(e.to_string()))?;
    crate::safe_write::write_atomically(path, &bytes).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        source,
    })
}
