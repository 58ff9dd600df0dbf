//! Sec. 3.4 of the paper: derive one path of a trained RGN as a plain network, and fold its
//! BatchNorms into the convolutions for deployment.
//!
//! A derived path is stored as the `model.n = 1` network of the same architecture: every
//! gated tensor of the RGN's chosen candidate (Eq. 1 with the gate vector fixed) is copied to
//! candidate 0 of the plain network, every shared tensor as it is. It then fine-tunes and
//! evaluates like any plain network.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::{DType, Tensor};
use eio_spec::config::Config;
use eio_spec::plan::{NodeId, Op};
use eio_spec::{Path, Plan};
use serde::Serialize;

use crate::ops;
use crate::state::ModelState;
use crate::EngineError;

/// The config of the plain network a path of `config`'s RGN becomes (`model.n = 1`;
/// `derive.*` unchanged).
pub fn derived_config(config: &Config) -> Config {
    let mut derived = config.clone();
    derived.model.n = 1;
    derived
}

/// Pairs (plain-network name, RGN name) of every tensor, for `path`.
fn name_pairs(rgn: &Plan, plain: &Plan, path: &Path) -> Vec<(String, String)> {
    let zeros = Path::new(vec![0; plain.k()]);
    let mut pairs = Vec::new();
    for (a, b) in plain.nodes.iter().zip(&rgn.nodes) {
        match (&a.op, &b.op) {
            (Op::Normalize { mean, std }, Op::Normalize { mean: m, std: s }) => {
                pairs.push((mean.clone(), m.clone()));
                pairs.push((std.clone(), s.clone()));
            }
            (Op::Conv { weight, .. }, Op::Conv { weight: w, .. }) => {
                pairs.push((weight.select(&zeros).clone(), w.select(path).clone()));
            }
            (Op::BatchNorm { params, .. }, Op::BatchNorm { params: p, .. }) => {
                let (x, y) = (params.select(&zeros), p.select(path));
                pairs.push((x.weight.clone(), y.weight.clone()));
                pairs.push((x.bias.clone(), y.bias.clone()));
                pairs.push((x.running_mean.clone(), y.running_mean.clone()));
                pairs.push((x.running_var.clone(), y.running_var.clone()));
                pairs.push((x.num_batches_tracked.clone(), y.num_batches_tracked.clone()));
            }
            (Op::Linear { params, .. }, Op::Linear { params: p, .. }) => {
                let (x, y) = (params.select(&zeros), p.select(path));
                pairs.push((x.weight.clone(), y.weight.clone()));
                pairs.push((x.bias.clone(), y.bias.clone()));
            }
            _ => {}
        }
    }
    pairs
}

/// The plain network of `path` through the RGN `state` of `config`: returns its config and
/// state (same device and dtype).
///
/// # Errors
/// A path that does not fit the RGN ([`EngineError::Device`] is never returned; a bad path is
/// reported as [`EngineError::MissingTensor`] naming the gate), or a device error.
pub fn derive_path(
    config: &Config,
    state: &ModelState,
    path: &Path,
) -> Result<(Config, ModelState), EngineError> {
    let rgn = config.plan().map_err(|e| EngineError::Device {
        requested: "model".into(),
        reason: e.to_string(),
    })?;
    rgn.path_space()
        .check(path)
        .map_err(|e| EngineError::MissingTensor {
            name: format!("path {path}: {e}"),
        })?;
    let derived = derived_config(config);
    let plain = derived.plan().map_err(|e| EngineError::Device {
        requested: "model".into(),
        reason: e.to_string(),
    })?;
    let mut out = ModelState {
        tensors: BTreeMap::new(),
        counters: BTreeMap::new(),
    };
    for (to, from) in name_pairs(&rgn, &plain, path) {
        if let Some(t) = state.tensors.get(&from) {
            out.tensors.insert(to, t.clone());
        } else if let Some(&c) = state.counters.get(&from) {
            out.counters.insert(to, c);
        } else {
            return Err(EngineError::MissingTensor { name: from });
        }
    }
    Ok((derived, out))
}

/// A plain network with every conv→BatchNorm pair folded into one convolution with bias:
/// for BN (γ, β, running mean μ, running variance σ²) after conv W,
/// `W'[o] = W[o] · γ[o] / sqrt(σ²[o] + eps)` and `b'[o] = β[o] − μ[o] · γ[o] / sqrt(σ²[o] + eps)`,
/// so `W' * x + b'` equals eval-mode `BN(W * x)`.
#[derive(Debug, Clone)]
pub struct FoldedNetwork {
    plan: Plan,
    /// Folded conv weight and bias by conv node.
    convs: HashMap<NodeId, (Tensor, Tensor)>,
    /// BatchNorm nodes absorbed into the conv before them (identity at run time).
    folded: BTreeSet<NodeId>,
    /// Everything else (normaliser, linear layers, unfolded BNs) as in the network.
    state: ModelState,
}

/// What folding did.
#[derive(Debug, Clone, Serialize)]
pub struct FoldedSummary {
    pub folded_pairs: usize,
    pub unfolded_batch_norms: usize,
}

impl FoldedNetwork {
    /// Folds the plain network `state` of `plan` (`model.n = 1`).
    ///
    /// # Errors
    /// A device error.
    pub fn fold(plan: &Plan, state: &ModelState) -> Result<Self, EngineError> {
        let zeros = Path::new(vec![0; plan.k()]);
        let mut consumers = vec![0usize; plan.nodes.len()];
        for node in &plan.nodes {
            for &i in &node.inputs {
                consumers[i] += 1;
            }
        }
        let mut convs = HashMap::new();
        let mut folded = BTreeSet::new();
        for (id, node) in plan.nodes.iter().enumerate() {
            let Op::BatchNorm { params, .. } = &node.op else {
                continue;
            };
            let input = node.inputs[0];
            let Op::Conv { weight, .. } = &plan.nodes[input].op else {
                continue;
            };
            if consumers[input] != 1 {
                continue;
            }
            let names = params.select(&zeros);
            let host = |name: &str| -> Result<Vec<f64>, EngineError> {
                Ok(state
                    .tensor(name)
                    .flatten_all()?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?)
            };
            let (gamma, beta) = (host(&names.weight)?, host(&names.bias)?);
            let (mean, var) = (host(&names.running_mean)?, host(&names.running_var)?);
            let w = state.tensor(weight.select(&zeros));
            let dims = w.dims().to_vec();
            let per_out = dims[1..].iter().product::<usize>();
            let mut wv = host(weight.select(&zeros))?;
            let mut bias = Vec::with_capacity(dims[0]);
            for o in 0..dims[0] {
                let scale = gamma[o] / (var[o] + ops::BN_EPS).sqrt();
                for v in &mut wv[o * per_out..(o + 1) * per_out] {
                    *v *= scale;
                }
                bias.push(beta[o] - mean[o] * scale);
            }
            let (device, dtype) = (w.device(), w.dtype());
            let wt = Tensor::from_vec(wv, dims.as_slice(), device)?.to_dtype(dtype)?;
            let bt = Tensor::from_vec(bias, (1, dims[0], 1, 1), device)?.to_dtype(dtype)?;
            convs.insert(input, (wt, bt));
            folded.insert(id);
        }
        Ok(FoldedNetwork {
            plan: plan.clone(),
            convs,
            folded,
            state: state.clone(),
        })
    }

    /// How many pairs were folded and how many BatchNorms stay.
    pub fn summary(&self) -> FoldedSummary {
        let bns = self
            .plan
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::BatchNorm { .. }))
            .count();
        FoldedSummary {
            folded_pairs: self.folded.len(),
            unfolded_batch_norms: bns - self.folded.len(),
        }
    }

    /// The logits of `x` (`[N, C, H, W]` in [0, 1]).
    ///
    /// # Errors
    /// A device error.
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let zeros = Path::new(vec![0; self.plan.k()]);
        let state = &self.state;
        let mut outputs: Vec<Tensor> = Vec::with_capacity(self.plan.nodes.len());
        for (id, node) in self.plan.nodes.iter().enumerate() {
            let input = |k: usize| &outputs[node.inputs[k]];
            let out = match &node.op {
                Op::Input => x.clone(),
                Op::Normalize { mean, std } => {
                    ops::normalize(input(0), state.tensor(mean), state.tensor(std))?
                }
                Op::Conv {
                    stride,
                    padding,
                    weight,
                    ..
                } => match self.convs.get(&id) {
                    Some((w, b)) => {
                        ops::conv2d(input(0), w, *stride, *padding)?.broadcast_add(b)?
                    }
                    None => ops::conv2d(
                        input(0),
                        state.tensor(weight.select(&zeros)),
                        *stride,
                        *padding,
                    )?,
                },
                Op::BatchNorm { params, .. } => {
                    if self.folded.contains(&id) {
                        input(0).clone()
                    } else {
                        let names = params.select(&zeros);
                        ops::batch_norm(
                            input(0),
                            state.tensor(&names.weight),
                            state.tensor(&names.bias),
                            state.tensor(&names.running_mean),
                            state.tensor(&names.running_var),
                            false,
                        )?
                        .0
                    }
                }
                Op::Relu => ops::relu(input(0))?,
                Op::LeakyRelu { slope } => ops::leaky_relu(input(0), *slope)?,
                Op::Add => (input(0) + input(1))?,
                Op::MaxPool2 => ops::max_pool2(input(0))?,
                Op::GlobalAvgPool => ops::global_avg_pool(input(0))?,
                Op::Flatten => input(0).flatten_from(1)?,
                Op::Linear { params, .. } => {
                    let names = params.select(&zeros);
                    ops::linear(
                        input(0),
                        state.tensor(&names.weight),
                        state.tensor(&names.bias),
                    )?
                }
            };
            outputs.push(out);
        }
        outputs
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("the plan has no nodes".into()))
    }

    /// The deployment tensors: folded convs as `<module>.weight` / `<module>.bias` (the
    /// module is the conv weight's name without `.weight`), the rest under `spec` names
    /// (folded BatchNorms are gone).
    ///
    /// # Errors
    /// A device error.
    pub fn tensors(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        let zeros = Path::new(vec![0; self.plan.k()]);
        let mut out = BTreeMap::new();
        let mut dropped = BTreeSet::new();
        for (id, node) in self.plan.nodes.iter().enumerate() {
            match &node.op {
                Op::Conv { weight, .. } => {
                    let name = weight.select(&zeros);
                    if let Some((w, b)) = self.convs.get(&id) {
                        let module = name.strip_suffix(".weight").unwrap_or(name);
                        out.insert(format!("{module}.weight"), w.clone());
                        out.insert(format!("{module}.bias"), b.flatten_all()?);
                        dropped.insert(name.clone());
                    }
                }
                Op::BatchNorm { params, .. } if self.folded.contains(&id) => {
                    let n = params.select(&zeros);
                    for name in [&n.weight, &n.bias, &n.running_mean, &n.running_var] {
                        dropped.insert(name.clone());
                    }
                }
                _ => {}
            }
        }
        for (name, t) in &self.state.tensors {
            if !dropped.contains(name) && !out.contains_key(name) {
                out.insert(name.clone(), t.clone());
            }
        }
        Ok(out)
    }

    /// Writes [`FoldedNetwork::tensors`] as safetensors with their checksum, through
    /// [`crate::safe_write::write_atomically`].
    ///
    /// # Errors
    /// [`EngineError::Io`] naming the file, or a device error.
    pub fn save(&self, path: &std::path::Path) -> Result<(), EngineError> {
        let tensors = self.tensors()?;
        let named: Vec<(String, &Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
        crate::state::write_tensors(path, &named, &[])
    }
}
