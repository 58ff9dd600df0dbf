//! The RGN as an interpreter of the `eio-spec` plan: forward to any node along one path
//! (Eq. 1 selects each gated op's candidate), and backward by hand to every parameter and to
//! the input.
//!
//! A forward returns a [`Trace`]: every node's output up to the requested node, and, in train
//! mode, the BatchNorm running statistics as PyTorch would leave them. The caller commits those
//! with [`ModelState::commit`] when the pass is one that updates them, in the order PyTorch
//! would run the passes. [`backward`] takes gradients seeded at any nodes (the logits for a
//! loss, a distillation layer for Eq. 2) and walks the plan in reverse. Gradients of tensors
//! used by several nodes (a shared conv seen by several candidates across passes) add up.
//! [`backward_with`] is the same walk with SGM's rescaling at the residual adds (the transfer
//! attacks of the black-box suite).

use std::collections::BTreeMap;

use eio_spec::attack::SkipGradient;
use eio_spec::config::BnMode;
use eio_spec::plan::{NodeId, Op, Plan, ResidualBlock};
use eio_spec::Path;
use ndarray::{Array1, Array2, Array4, ArrayD, Ix1, Ix2, Ix4, IxDyn};

use crate::ops;
use crate::state::ModelState;

/// The outputs of one forward pass along one path.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The path the pass took.
    pub path: Path,
    /// BatchNorm behaviour of the pass.
    pub mode: BnMode,
    /// Output of every node up to and including the last one computed.
    pub outputs: Vec<ArrayD<f64>>,
    /// Running statistics after the pass, per BatchNorm tensor name prefix (train mode only).
    pub running: Vec<RunningUpdate>,
}

/// New running statistics of one BatchNorm after a train-mode pass.
#[derive(Debug, Clone)]
pub struct RunningUpdate {
    pub mean_name: String,
    pub var_name: String,
    pub counter_name: String,
    pub stats: ops::BnRunningStats,
}

impl Trace {
    /// The output of node `id`.
    ///
    /// # Panics
    /// If the pass stopped before `id`.
    pub fn output(&self, id: NodeId) -> &ArrayD<f64> {
        &self.outputs[id]
    }

    /// The logits of a pass that ran to the end, `[batch, classes]`.
    ///
    /// # Panics
    /// If the pass stopped early.
    pub fn logits(&self) -> Array2<f64> {
        to2(self
            .outputs
            .last()
            .expect("a pass computes at least the input"))
    }
}

impl ModelState {
    /// Stores the running statistics a train-mode pass produced (PyTorch updates them during
    /// the forward; the reference makes that update explicit).
    pub fn commit(&mut self, trace: &Trace) {
        for update in &trace.running {
            self.tensors.insert(
                update.mean_name.clone(),
                update.stats.running_mean.clone().into_dyn(),
            );
            self.tensors.insert(
                update.var_name.clone(),
                update.stats.running_var.clone().into_dyn(),
            );
            self.counters.insert(
                update.counter_name.clone(),
                update.stats.num_batches_tracked,
            );
        }
    }
}

/// Gradients of a scalar objective.
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    /// By tensor name; only tensors the pass used appear.
    pub params: BTreeMap<String, ArrayD<f64>>,
    /// With respect to the input batch, `[N, C, H, W]`.
    pub input: Option<Array4<f64>>,
}

impl Gradients {
    /// Adds `grad` to the gradient of `name`.
    pub fn accumulate(&mut self, name: &str, grad: ArrayD<f64>) {
        match self.params.get_mut(name) {
            Some(total) => *total += &grad,
            None => {
                self.params.insert(name.to_string(), grad);
            }
        }
    }

    /// Adds every gradient of `other` (the sum over passes, Algorithm 1 line 22).
    pub fn add(&mut self, other: Gradients) {
        for (name, grad) in other.params {
            self.accumulate(&name, grad);
        }
        if let Some(input) = other.input {
            self.input = Some(match self.input.take() {
                Some(total) => total + input,
                None => input,
            });
        }
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) {
        for grad in self.params.values_mut() {
            grad.mapv_inplace(|g| g * factor);
        }
        if let Some(input) = &mut self.input {
            input.mapv_inplace(|g| g * factor);
        }
    }
}

pub(crate) fn to4(a: &ArrayD<f64>) -> Array4<f64> {
    a.clone()
        .into_dimensionality::<Ix4>()
        .expect("the plan says this node is a feature map")
}

pub(crate) fn to2(a: &ArrayD<f64>) -> Array2<f64> {
    a.clone()
        .into_dimensionality::<Ix2>()
        .expect("the plan says this node is a vector")
}

fn to1(a: &ArrayD<f64>) -> Array1<f64> {
    a.clone()
        .into_dimensionality::<Ix1>()
        .expect("a per-channel tensor")
}

fn running_of(state: &ModelState, names: &eio_spec::plan::BnNames) -> ops::BnRunningStats {
    ops::BnRunningStats {
        running_mean: to1(state.tensor(&names.running_mean)),
        running_var: to1(state.tensor(&names.running_var)),
        num_batches_tracked: state
            .counters
            .get(&names.num_batches_tracked)
            .copied()
            .unwrap_or(0),
    }
}

/// Runs the plan's nodes 0..=`end` along `path` on `input` (`[N, C, H, W]`, pixels in [0, 1]).
///
/// # Panics
/// If `path` or `input` do not fit the plan (check paths with `plan.path_space()`).
pub fn forward(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    input: &Array4<f64>,
    mode: BnMode,
    end: NodeId,
) -> Trace {
    let mut outputs: Vec<ArrayD<f64>> = Vec::with_capacity(end + 1);
    let mut running = Vec::new();
    for id in 0..=end {
        let (out, update) = forward_node(plan, state, path, id, &outputs, input, mode);
        running.extend(update);
        outputs.push(out);
    }
    Trace {
        path: path.clone(),
        mode,
        outputs,
        running,
    }
}

/// The output of node `id` along `path`, given the outputs of the nodes before it
/// (`outputs[k]` for every k < `id`) and the input batch; in train mode a BatchNorm node also
/// returns its new running statistics. [`forward`] is this in a loop; a test can run it with
/// some adds replaced (SGM's scaled graph, `grad_check::sgm_scaled_logits`).
///
/// # Panics
/// If `outputs` lacks an input of the node, or `path` or `input` do not fit the plan.
pub fn forward_node(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    id: NodeId,
    outputs: &[ArrayD<f64>],
    input: &Array4<f64>,
    mode: BnMode,
) -> (ArrayD<f64>, Option<RunningUpdate>) {
    let node = &plan.nodes[id];
    let x = |k: usize| &outputs[node.inputs[k]];
    let out: ArrayD<f64> = match &node.op {
        Op::Input => input.clone().into_dyn(),
        Op::Normalize { mean, std } => ops::normalize(
            &to4(x(0)),
            &to1(state.tensor(mean)),
            &to1(state.tensor(std)),
        )
        .into_dyn(),
        Op::Conv {
            stride,
            padding,
            weight,
            ..
        } => ops::conv2d(
            &to4(x(0)),
            &to4(state.tensor(weight.select(path))),
            *stride,
            *padding,
        )
        .into_dyn(),
        Op::BatchNorm { params, .. } => {
            let names = params.select(path);
            let result = ops::batch_norm2d(
                &to4(x(0)),
                &to1(state.tensor(&names.weight)),
                &to1(state.tensor(&names.bias)),
                &running_of(state, names),
                mode,
                ops::BN_EPS,
                ops::BN_MOMENTUM,
            );
            let update = (mode == BnMode::Train).then(|| RunningUpdate {
                mean_name: names.running_mean.clone(),
                var_name: names.running_var.clone(),
                counter_name: names.num_batches_tracked.clone(),
                stats: result.running,
            });
            return (result.output.into_dyn(), update);
        }
        Op::Relu => ops::relu(x(0)),
        Op::LeakyRelu { slope } => ops::leaky_relu(x(0), *slope),
        Op::Add => ops::residual_add(x(0), x(1)),
        Op::MaxPool2 => ops::max_pool2x2(&to4(x(0))).into_dyn(),
        Op::GlobalAvgPool => ops::global_avg_pool(&to4(x(0))).into_dyn(),
        Op::Flatten => {
            let batch = x(0).shape()[0];
            let features = node.shape.numel();
            x(0).as_standard_layout()
                .into_owned()
                .into_shape_with_order(IxDyn(&[batch, features]))
                .expect("flatten keeps the element count")
        }
        Op::Linear { params, .. } => {
            let names = params.select(path);
            ops::linear(
                &to2(x(0)),
                &to2(state.tensor(&names.weight)),
                &to1(state.tensor(&names.bias)),
            )
            .into_dyn()
        }
    };
    (out, None)
}

/// The logits along `path`, `[N, classes]`, and the trace of the pass.
pub fn logits(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    input: &Array4<f64>,
    mode: BnMode,
) -> (Array2<f64>, Trace) {
    let trace = forward(plan, state, path, input, mode, plan.logits());
    (trace.logits(), trace)
}

/// Back-propagates `seeds` (dL/d(output) at the given nodes) through the pass in `trace`,
/// returning dL/d(tensor) for every tensor the pass used and dL/d(input).
///
/// # Panics
/// If a seed's node was not computed by the pass or its shape differs from the node's output.
pub fn backward(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    seeds: &[(NodeId, ArrayD<f64>)],
) -> Gradients {
    backward_with(plan, state, trace, seeds, None)
}

/// [`backward`], with the skip-gradient method when `skip` is given: SGM (Wu et al. 2020,
/// "Skip Connections Matter: On the Transferability of Adversarial Examples Generated with
/// ResNets"), used by the black-box suite's SGM versions.
///
/// At each residual add y = r + s of [`Plan::residual_blocks`] (`inputs[0]` the residual
/// branch r, `inputs[1]` the skip path s) with upstream gradient g = dL/dy:
///
/// ```text
/// g   ← g / std(g)     with skip.normalise; std unbiased over all elements of the batch's
///                      tensor (torch.std); left as is when std(g) is 0 or not finite
/// dr  = f · g          f = skip.branch_factor(block): γ, or 1 for an excluded first block
/// ds  = g
/// ```
///
/// Every other node, and every node of a plan without residual blocks (VGG), back-propagates
/// as in [`backward`]; the parameter gradients are those of the same rescaled flow. The
/// result is the exact gradient of the "scaled graph" whose adds compute
/// y₀ + c·(f·(r − r₀) + (s − s₀)) around the traced pass (c = 1/std(g), or 1), which
/// `grad_check::sgm_scaled_logits` evaluates for the finite-difference tests.
///
/// # Panics
/// As [`backward`].
pub fn backward_with(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    seeds: &[(NodeId, ArrayD<f64>)],
    skip: Option<&SkipGradient>,
) -> Gradients {
    let residual: BTreeMap<NodeId, ResidualBlock> = match skip {
        Some(_) => plan
            .residual_blocks()
            .into_iter()
            .map(|block| (block.add, block))
            .collect(),
        None => BTreeMap::new(),
    };
    let last = trace.outputs.len() - 1;
    let node_grads = &mut seeded(trace, seeds);
    let path = &trace.path;
    let mut grads = Gradients::default();
    for id in (0..=last).rev() {
        let Some(g) = node_grads[id].take() else {
            continue;
        };
        let node = &plan.nodes[id];
        let x = |k: usize| &trace.outputs[node.inputs[k]];
        let mut to_input =
            |k: usize, grad: ArrayD<f64>| accumulate(&mut node_grads[node.inputs[k]], grad);
        match &node.op {
            Op::Input => grads.input = Some(to4(&g)),
            Op::Normalize { std, .. } => to_input(
                0,
                ops::normalize_backward(&to1(state.tensor(std)), &to4(&g)).into_dyn(),
            ),
            Op::Conv {
                stride,
                padding,
                weight,
                ..
            } => {
                let name = weight.select(path);
                let r = ops::conv2d_backward(
                    &to4(x(0)),
                    &to4(state.tensor(name)),
                    &to4(&g),
                    *stride,
                    *padding,
                );
                grads.accumulate(name, r.weight.into_dyn());
                to_input(0, r.input.into_dyn());
            }
            Op::BatchNorm { params, .. } => {
                let names = params.select(path);
                let r = ops::batch_norm2d_backward(
                    &to4(x(0)),
                    &to1(state.tensor(&names.weight)),
                    &running_of(state, names),
                    trace.mode,
                    ops::BN_EPS,
                    &to4(&g),
                );
                grads.accumulate(&names.weight, r.gamma.into_dyn());
                grads.accumulate(&names.bias, r.beta.into_dyn());
                to_input(0, r.input.into_dyn());
            }
            Op::Relu => to_input(0, ops::relu_backward(x(0), &g)),
            Op::LeakyRelu { slope } => to_input(0, ops::leaky_relu_backward(x(0), *slope, &g)),
            Op::Add => match (skip, residual.get(&id)) {
                (Some(sgm), Some(block)) => {
                    let g = if sgm.normalise { divide_by_std(g) } else { g };
                    let factor = sgm.branch_factor(block);
                    to_input(0, g.mapv(|v| factor * v));
                    to_input(1, g);
                }
                _ => {
                    let r = ops::residual_add_backward(&g);
                    to_input(0, r.lhs);
                    to_input(1, r.rhs);
                }
            },
            Op::MaxPool2 => to_input(
                0,
                ops::max_pool2x2_backward(&to4(x(0)), &to4(&g)).into_dyn(),
            ),
            Op::GlobalAvgPool => to_input(
                0,
                ops::global_avg_pool_backward(to4(x(0)).dim(), &to2(&g)).into_dyn(),
            ),
            Op::Flatten => to_input(
                0,
                g.into_shape_with_order(IxDyn(x(0).shape()))
                    .expect("unflatten keeps the element count"),
            ),
            Op::Linear { params, .. } => {
                let names = params.select(path);
                let r =
                    ops::linear_backward(&to2(x(0)), &to2(state.tensor(&names.weight)), &to2(&g));
                grads.accumulate(&names.weight, r.weight.into_dyn());
                grads.accumulate(&names.bias, r.bias.into_dyn());
                to_input(0, r.input.into_dyn());
            }
        }
    }
    grads
}

/// One slot per node of the pass in `trace`, holding the sum of the `seeds` placed at it
/// (dL/d(output) at those nodes); the other slots are empty.
///
/// # Panics
/// If a seed's node was not computed by the pass or its shape differs from the node's output.
pub(crate) fn seeded(trace: &Trace, seeds: &[(NodeId, ArrayD<f64>)]) -> Vec<Option<ArrayD<f64>>> {
    let last = trace.outputs.len() - 1;
    let mut slots: Vec<Option<ArrayD<f64>>> = vec![None; last + 1];
    for (id, grad) in seeds {
        assert!(
            *id <= last,
            "seed at node {id}, but the pass stopped at node {last}"
        );
        assert_eq!(
            grad.shape(),
            trace.outputs[*id].shape(),
            "seed shape at node {id}"
        );
        accumulate(&mut slots[*id], grad.clone());
    }
    slots
}

/// Adds `g` into a node's gradient slot (a node read by several others sums their gradients).
pub(crate) fn accumulate(slot: &mut Option<ArrayD<f64>>, g: ArrayD<f64>) {
    match slot {
        Some(total) => *total += &g,
        None => *slot = Some(g),
    }
}

/// g / std(g), std the unbiased standard deviation over all elements (`torch.std`: the sum of
/// squared deviations from the mean over E − 1); g itself when that is 0 or not finite (a
/// constant gradient, e.g. all zeros, or fewer than 2 elements), where torch would produce
/// inf or NaN.
fn divide_by_std(g: ArrayD<f64>) -> ArrayD<f64> {
    let count = g.len() as f64;
    let mean = g.iter().sum::<f64>() / count;
    let squares: f64 = g.iter().map(|v| (v - mean) * (v - mean)).sum();
    let std = (squares / (count - 1.0)).sqrt();
    if std > 0.0 && std.is_finite() {
        g.mapv(|v| v / std)
    } else {
        g
    }
}
