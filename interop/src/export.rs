//! Writing eio models as safetensors under the names PyTorch code loads.
//!
//! [`export_dverge`] writes one path of the RGN as DVERGE's plain ResNet (`models/resnet.py`):
//!
//! | eio tensor (candidate `g[i]` of RGB i) | exported name |
//! |---|---|
//! | `net.model.conv1.candidate_ops.<c>.0.weight` | `conv1.weight` |
//! | `net.model.conv1.candidate_ops.<c>.1.{weight,bias,running_mean,running_var,num_batches_tracked}` | `bn1.*` |
//! | `net.model.layerS.B.convK.candidate_ops.<c>.0.weight` | `layerS.B.convK.weight` |
//! | `net.model.layerS.B.convK.candidate_ops.<c>.1.*` | `layerS.B.bnK.*` |
//! | `net.model.layerS.B.downsample.{0,1}.*` | `layerS.B.downsample.{0,1}.*` |
//! | `net.model.fc.{weight,bias}` | `fc.{weight,bias}` |
//! | `net.normalizer.{mean,std}` | metadata `eio.normalizer.mean` / `.std`, or `normalizer.*` with [`DvergeNames::Wrapper`] |
//!
//! With [`DvergeNames::Wrapper`] every name is prefixed `model.` and `normalizer.mean` /
//! `normalizer.std` are added: the keys of DVERGE's `ModelWrapper(ResNet, normalizer)`, i.e. what
//! one entry `model_<i>` of a DVERGE checkpoint holds.
//!
//! [`export_authors`] writes the whole RGN under the authors' keys (the plan's names), with a
//! shared conv written once per candidate (`candidate_ops.<c>.0.weight` for every c), as the
//! released checkpoint holds it (fact sheet, "Sharing between candidates").
//!
//! Floats are written as float32 ([`ExportDtype::F32`], PyTorch's default) or float64;
//! `num_batches_tracked` as an int64 scalar, as PyTorch keeps it.

use std::collections::{BTreeMap, HashMap};

use eio_spec::config::Sharing;
use eio_spec::plan::{Plan, Role};
use safetensors::tensor::{Dtype, TensorView};

use crate::import::dverge_name;
use crate::InteropError;

/// Which DVERGE module the names are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DvergeNames {
    /// `ResNet(depth)`'s own `state_dict()` keys (`conv1.weight`, …); the normaliser goes into
    /// the safetensors metadata.
    #[default]
    Module,
    /// DVERGE's `ModelWrapper`: `model.` + the module's keys, and `normalizer.{mean,std}`.
    Wrapper,
}

/// Float type of the exported tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportDtype {
    #[default]
    F32,
    F64,
}

/// Export settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportOptions {
    pub dtype: ExportDtype,
    /// Only for [`export_dverge`].
    pub dverge_names: DvergeNames,
}

struct Out {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    bytes: Vec<u8>,
}

fn encode(
    plan: &Plan,
    values: &BTreeMap<String, Vec<f64>>,
    param: &str,
    dtype: ExportDtype,
) -> Result<(Vec<usize>, Dtype, Vec<u8>), InteropError> {
    let spec = plan.param(param).ok_or_else(|| InteropError::Value {
        name: param.to_string(),
        message: "not a tensor of the plan".into(),
    })?;
    let data = values.get(param).ok_or_else(|| InteropError::Value {
        name: param.to_string(),
        message: format!("missing (the {} plan needs it)", plan.name),
    })?;
    if data.len() != spec.numel() {
        return Err(InteropError::Value {
            name: param.to_string(),
            message: format!(
                "{} values, the plan's shape {:?} needs {}",
                data.len(),
                spec.shape,
                spec.numel()
            ),
        });
    }
    let (dt, bytes) = if spec.role == Role::Counter {
        let v = data[0];
        if v.fract() != 0.0 || !(0.0..=9.007_199_254_740_992e15).contains(&v) {
            return Err(InteropError::Value {
                name: param.to_string(),
                message: format!("counter value {v} is not a non-negative integer"),
            });
        }
        (Dtype::I64, (v as i64).to_le_bytes().to_vec())
    } else {
        match dtype {
            ExportDtype::F32 => (
                Dtype::F32,
                data.iter()
                    .flat_map(|&v| (v as f32).to_le_bytes())
                    .collect(),
            ),
            ExportDtype::F64 => (
                Dtype::F64,
                data.iter().flat_map(|&v| v.to_le_bytes()).collect(),
            ),
        }
    };
    Ok((spec.shape.clone(), dt, bytes))
}

fn serialize(
    tensors: Vec<Out>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, InteropError> {
    let mut views = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let view = TensorView::new(t.dtype, t.shape.clone(), &t.bytes).map_err(|source| {
            InteropError::Safetensors {
                origin: format!("export of {}", t.name),
                source,
            }
        })?;
        views.push((t.name.clone(), view));
    }
    safetensors::serialize(views, Some(metadata)).map_err(|source| InteropError::Safetensors {
        origin: "export".into(),
        source,
    })
}

/// One path of the RGN as DVERGE's ResNet, as safetensors bytes (names in the module docs).
///
/// `path` is the gate vector g (fact sheet, "Forward pass of one path"): `path[i]` is the
/// candidate of RGB i, `path.len()` = K. `values` holds every plan tensor by canonical name
/// (an `Imported::values` or an engine state's values).
///
/// # Errors
/// [`InteropError::BadPath`] for a gate vector that does not fit the plan,
/// [`InteropError::UnsupportedPlan`] for a plan DVERGE's ResNet cannot hold (VGG, gated
/// classifier), [`InteropError::Value`] for a missing or mis-sized value.
pub fn export_dverge(
    values: &BTreeMap<String, Vec<f64>>,
    plan: &Plan,
    path: &[usize],
    options: &ExportOptions,
) -> Result<Vec<u8>, InteropError> {
    if path.len() != plan.k() || path.iter().any(|&c| c >= plan.n) {
        return Err(InteropError::BadPath {
            path: path.to_vec(),
            k: plan.k(),
            n: plan.n,
        });
    }
    let wrapper = options.dverge_names == DvergeNames::Wrapper;
    let mut out = Vec::new();
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("eio.plan".to_string(), plan.name.clone());
    metadata.insert(
        "eio.gates".to_string(),
        path.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    for p in &plan.params {
        if let Some((gate, candidate)) = p.candidate {
            if path[gate] != candidate {
                continue;
            }
        }
        let name = if p.role == Role::Constant {
            let short = p.name.trim_start_matches("net.");
            if !wrapper {
                let data = values.get(&p.name).ok_or_else(|| InteropError::Value {
                    name: p.name.clone(),
                    message: format!("missing (the {} plan needs it)", plan.name),
                })?;
                metadata.insert(format!("eio.{short}"), format!("{data:?}"));
                continue;
            }
            short.to_string()
        } else {
            let Some(name) = dverge_name(plan, &p.name) else {
                return Err(InteropError::UnsupportedPlan {
                    layout: "DVERGE".into(),
                    plan: plan.name.clone(),
                    reason: format!("no DVERGE ResNet tensor corresponds to {}", p.name),
                });
            };
            if wrapper {
                format!("model.{name}")
            } else {
                name
            }
        };
        let (shape, dtype, bytes) = encode(plan, values, &p.name, options.dtype)?;
        out.push(Out {
            name,
            shape,
            dtype,
            bytes,
        });
    }
    serialize(out, metadata)
}

/// The whole RGN under the authors' `net.model.*` / `net.normalizer.*` keys, as safetensors
/// bytes; a shared conv is written under every candidate's name.
///
/// # Errors
/// [`InteropError::Value`] for a missing or mis-sized value.
pub fn export_authors(
    values: &BTreeMap<String, Vec<f64>>,
    plan: &Plan,
    options: &ExportOptions,
) -> Result<Vec<u8>, InteropError> {
    let mut out = Vec::new();
    for p in &plan.params {
        let (shape, dtype, bytes) = encode(plan, values, &p.name, options.dtype)?;
        let shared = plan.sharing == Sharing::SharedConv
            && p.candidate.is_none()
            && p.name.ends_with(".candidate_ops.0.0.weight");
        if shared {
            let stem = p.name.trim_end_matches(".candidate_ops.0.0.weight");
            for c in 0..plan.n {
                out.push(Out {
                    name: format!("{stem}.candidate_ops.{c}.0.weight"),
                    shape: shape.clone(),
                    dtype,
                    bytes: bytes.clone(),
                });
            }
        } else {
            out.push(Out {
                name: p.name.clone(),
                shape,
                dtype,
                bytes,
            });
        }
    }
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("eio.plan".to_string(), plan.name.clone());
    metadata.insert("eio.n".to_string(), plan.n.to_string());
    serialize(out, metadata)
}
