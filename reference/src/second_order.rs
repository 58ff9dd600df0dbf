//! Exact second-order gradients: the derivative, with respect to the weights and to the input,
//! of a functional of the input gradient ∇ₓL.
//!
//! GAL (Kariyappa & Qureshi 2019, "Improving Adversarial Robustness of Ensembles with
//! Diversity Training"; SPEC.md, GAL) and TRS (Yang et al., NeurIPS 2021, "TRS: Transferability
//! Reduced Ensemble via Promoting Gradient Diversity and Model Smoothness"; SPEC.md, TRS) train
//! on losses R(g₁, …, g_M) of the members' input gradients gₘ = ∇ₓLₘ: GAL's coherence
//! (log Σ exp of pairwise cosines), TRS's L_cos (mean |cos|) and L_smooth (2·mean_b ‖g_b‖²).
//! Their weight gradient needs the derivative of gₘ with respect to θ, and by the chain rule
//!
//! ```text
//! ∂R/∂θ = (∂g/∂θ)ᵀ v = ∂⟨g, v⟩/∂θ     with v = ∂R/∂g held fixed
//! ```
//!
//! so one vector-Jacobian product of the map θ ↦ g per member, [`input_gradient_vjp`], is what
//! they need; its ∂⟨g, v⟩/∂x is the input-space counterpart (TRS's PGD direction
//! ∇_z Mag(∂CE(z)/∂z) is it with v = ∂Mag/∂g).
//!
//! # Definitions
//!
//! L(x, θ) is the batch-mean cross-entropy of the logits z of one forward pass along a path
//! (train- or eval-mode BatchNorm, as the [`Trace`] says), g = ∇ₓL (the input's shape, pixel
//! space before the normaliser), and for a fixed direction v of the input's shape
//!
//! ```text
//! s(θ, x) = ⟨g, v⟩ = Σ g ⊙ v
//! ```
//!
//! # Method: reverse over forward
//!
//! s is the directional derivative s = d/dt L(x + t v) at t = 0. A tangent (forward-mode)
//! pass runs alongside the primal one: every node output y gets a tangent ẏ = (dy/dx) v, with
//! ẋ = v at the input ([`tangents`]). Then
//!
//! ```text
//! s = Σ_b ⟨∂L/∂z_b, ż_b⟩
//! ```
//!
//! and s is back-propagated through both the primal and the tangent computations: every node
//! gets a primal cotangent ȳ = ∂s/∂y and a tangent cotangent ẏ̄ = ∂s/∂ẏ, and parameter
//! gradients accumulate from both ([`reverse_over_forward`]). At the input, ȳ is ∂s/∂x and ẏ̄
//! is ∂s/∂v = g (s is linear in v), a check on the whole walk.
//!
//! Per-op rules, x the op's input, ẋ its tangent, ȳ and ẏ̄ the incoming cotangents:
//!
//! ```text
//! loss (CE, batch mean, p_b = softmax(z_b), e_b one-hot label, B the batch):
//!     ∂s/∂ż_b = (p_b − e_b)/B
//!     ∂s/∂z_b = (p_b ⊙ ż_b − p_b ⟨p_b, ż_b⟩)/B        (the softmax Jacobian applied to ż_b)
//! Linear, Conv (y = W x [+ b]):
//!     ẏ = W ẋ (no bias);  x̄ = Wᵀȳ;  ẋ̄ = Wᵀẏ̄;  W̄ = dW(x, ȳ) + dW(ẋ, ẏ̄);  b̄ = Σ ȳ
//! Normalize (fixed affine (x − mean)/std):
//!     ẏ = ẋ/std;  x̄ = ȳ/std;  ẋ̄ = ẏ̄/std
//! ReLU, LeakyReLU (f″ = 0 almost everywhere):
//!     ẏ = f′(x) ẋ;  x̄ = f′(x) ȳ;  ẋ̄ = f′(x) ẏ̄
//! Add, Flatten, GlobalAvgPool (linear): the same map on both
//! MaxPool2 (the argmax is locally constant; ties as max_pool2x2_backward):
//!     ẏ = ẋ at the argmax of x;  x̄, ẋ̄ = ȳ, ẏ̄ scattered to the argmax of x
//! BatchNorm, eval (y = γ (x − rm)/σ + β, σ = √(rv + ε)):
//!     ẏ = γ ẋ/σ;  ẋ̄ = γ ẏ̄/σ;  x̄ = γ ȳ/σ;  γ̄ = Σ ȳ x̂ + Σ ẏ̄ ẋ/σ;  β̄ = Σ ȳ
//! BatchNorm, train (per channel over its N = B·H·W values; μ, σ = √(biased var + ε) of x):
//!     ẋ̂ = (ẋ − mean(ẋ) − x̂ mean(x̂ ẋ))/σ;  ẏ = γ ẋ̂
//!     β̄ = Σ ȳ;  γ̄ = Σ ȳ x̂ + Σ ẏ̄ ẋ̂
//!     ẋ̄ = (γ/σ)(ẏ̄ − mean(ẏ̄) − x̂ mean(x̂ ẏ̄))
//!     x̄ = (first-order BatchNorm backward of ȳ) + (second-order term through ẋ̂(x)),
//!         see ops::batch_norm::batch_norm2d_tangent_backward
//! ```
//!
//! Running statistics are buffers: they are not part of s, get no gradient, and these
//! functions never commit them (a caller commits `trace.running` when the pass is one that
//! updates them). In eval mode the tangent and backward read the running statistics of
//! `state`, so pass the state the forward pass read; in train mode nothing reads them, so a
//! training step may commit `trace.running` before calling [`input_gradient_vjp`].
//!
//! Every rule is checked against central finite differences of the first-order function
//! θ ↦ ⟨input_gradient(θ).grad, v⟩ (and x ↦ …) in `tests/second_order.rs`.

use eio_spec::config::BnMode;
use eio_spec::plan::{NodeId, Op, Plan};
use eio_spec::Path;
use ndarray::{Array1, Array2, Array4, ArrayD, Ix1, IxDyn};

use crate::loss::{cross_entropy, softmax};
use crate::model::{self, accumulate, seeded, to2, to4, Gradients, Trace};
use crate::ops;
use crate::state::ModelState;

/// First order at x: the loss, the logits, g = ∇ₓL and the primal trace.
#[derive(Debug, Clone)]
pub struct InputGradient {
    /// L, the batch-mean cross-entropy of the logits.
    pub loss: f64,
    /// The logits z, `[batch, classes]`.
    pub logits: Array2<f64>,
    /// g = ∇ₓL, the input's shape `[N, C, H, W]`.
    pub grad: Array4<f64>,
    /// The forward pass (its running statistics are not committed).
    pub trace: Trace,
}

/// The cross-entropy L of the logits of one pass along `path` at `x` (BatchNorm in `mode`),
/// and its input gradient g = ∇ₓL (the first order GAL and TRS differentiate again with
/// [`input_gradient_vjp`]). The running statistics of a train-mode pass stay in the trace.
///
/// # Panics
/// As [`model::forward`] and [`cross_entropy`].
pub fn input_gradient(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    x: &Array4<f64>,
    labels: &[usize],
    mode: BnMode,
) -> InputGradient {
    let (logits, trace) = model::logits(plan, state, path, x, mode);
    let ce = cross_entropy(&logits, labels);
    let grads = model::backward(plan, state, &trace, &[(plan.logits(), ce.grad.into_dyn())]);
    InputGradient {
        loss: ce.value,
        logits,
        grad: grads.input.expect("a full pass reaches the input"),
        trace,
    }
}

/// ∂⟨∇ₓL, v⟩/∂θ (`params`, by tensor name, only the tensors the pass used) and ∂⟨∇ₓL, v⟩/∂x
/// (`input`), for the pass in `trace` (from [`input_gradient`] or [`model::logits`], run to
/// the logits) and the same `labels`. L is the batch-mean cross-entropy; BatchNorm behaves as
/// `trace.mode` says. For a loss R(g) of the input gradient (GAL, TRS), `v = ∂R/∂g` gives
/// ∂R/∂θ and ∂R/∂x.
///
/// # Panics
/// If the trace stopped before the logits, `v` is not the input's shape, or the labels do not
/// fit the logits.
pub fn input_gradient_vjp(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    labels: &[usize],
    v: &Array4<f64>,
) -> Gradients {
    let end = plan.logits();
    assert_eq!(
        trace.outputs.len(),
        end + 1,
        "input_gradient_vjp: the pass must run to the logits (node {end})"
    );
    let tangents = tangents(plan, state, trace, v);
    let seeds = cross_entropy_seeds(&trace.logits(), labels, &to2(&tangents[end]));
    reverse_over_forward(
        plan,
        state,
        trace,
        &tangents,
        &[(end, seeds.logits.into_dyn())],
        &[(end, seeds.logits_tangent.into_dyn())],
    )
    .gradients
}

/// The seeds of s = Σ_b ⟨∂L/∂z_b, ż_b⟩ for L the batch-mean cross-entropy.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropySeeds {
    /// s itself: ⟨∇_z L, ż⟩ = ⟨∇ₓL, v⟩.
    pub value: f64,
    /// ∂s/∂z_b = (p_b ⊙ ż_b − p_b ⟨p_b, ż_b⟩)/B, `[B, K]`.
    pub logits: Array2<f64>,
    /// ∂s/∂ż_b = (p_b − e_b)/B = ∇_z L, `[B, K]`.
    pub logits_tangent: Array2<f64>,
}

/// The loss seeds of [`reverse_over_forward`] for L = batch-mean cross-entropy of `logits`
/// with `labels`, given the logits' tangent ż (`logits_tangent`, from [`tangents`]):
/// with p_b = softmax(z_b), e_b the one-hot label and B the batch,
///
/// ```text
/// s        = Σ_b ⟨(p_b − e_b)/B, ż_b⟩
/// ∂s/∂ż_b  = (p_b − e_b)/B
/// ∂s/∂z_b  = (p_b ⊙ ż_b − p_b ⟨p_b, ż_b⟩)/B
/// ```
///
/// # Panics
/// If the labels do not fit the logits (as [`cross_entropy`]) or the shapes differ.
pub fn cross_entropy_seeds(
    logits: &Array2<f64>,
    labels: &[usize],
    logits_tangent: &Array2<f64>,
) -> CrossEntropySeeds {
    assert_eq!(
        logits.shape(),
        logits_tangent.shape(),
        "cross_entropy_seeds: logits_tangent shape {:?} != logits shape {:?}",
        logits_tangent.shape(),
        logits.shape()
    );
    let grad = cross_entropy(logits, labels).grad;
    let p = softmax(logits);
    let (batch, classes) = logits.dim();
    let b = batch as f64;
    let mut value = 0.0;
    let mut seed = Array2::<f64>::zeros((batch, classes));
    for n in 0..batch {
        let mut p_dot = 0.0;
        for k in 0..classes {
            p_dot += p[[n, k]] * logits_tangent[[n, k]];
            value += grad[[n, k]] * logits_tangent[[n, k]];
        }
        for k in 0..classes {
            seed[[n, k]] = (p[[n, k]] * logits_tangent[[n, k]] - p[[n, k]] * p_dot) / b;
        }
    }
    CrossEntropySeeds {
        value,
        logits: seed,
        logits_tangent: grad,
    }
}

/// The tangent ẏ = (dy/dx) v of every node output of the pass in `trace` (same length as
/// `trace.outputs`), for the input direction `v` (`[N, C, H, W]`): the forward-mode pass of
/// the module documentation, at fixed parameters.
///
/// # Panics
/// If `v` is not the shape of the trace's input.
pub fn tangents(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    v: &Array4<f64>,
) -> Vec<ArrayD<f64>> {
    assert_eq!(
        v.shape(),
        trace.outputs[0].shape(),
        "tangents: v shape {:?} != input shape {:?}",
        v.shape(),
        trace.outputs[0].shape()
    );
    let path = &trace.path;
    let mut out: Vec<ArrayD<f64>> = Vec::with_capacity(trace.outputs.len());
    for id in 0..trace.outputs.len() {
        let node = &plan.nodes[id];
        let x = |k: usize| &trace.outputs[node.inputs[k]];
        let dx = |k: usize| &out[node.inputs[k]];
        let dy: ArrayD<f64> = match &node.op {
            Op::Input => v.clone().into_dyn(),
            // The tangent of an affine map is its linear part: (x − mean)/std ↦ ẋ/std.
            Op::Normalize { std, .. } => {
                let std = to1(state.tensor(std));
                let zero = Array1::zeros(std.len());
                ops::normalize(&to4(dx(0)), &zero, &std).into_dyn()
            }
            Op::Conv {
                stride,
                padding,
                weight,
                ..
            } => ops::conv2d(
                &to4(dx(0)),
                &to4(state.tensor(weight.select(path))),
                *stride,
                *padding,
            )
            .into_dyn(),
            Op::BatchNorm { params, .. } => {
                let names = params.select(path);
                ops::batch_norm::batch_norm2d_tangent(
                    &to4(x(0)),
                    &to1(state.tensor(&names.weight)),
                    &running_of(state, names),
                    trace.mode,
                    ops::BN_EPS,
                    &to4(dx(0)),
                )
                .into_dyn()
            }
            // f′(x) ẋ, elementwise: the backward of an elementwise map applied to ẋ.
            Op::Relu => ops::relu_backward(x(0), dx(0)),
            Op::LeakyRelu { slope } => ops::leaky_relu_backward(x(0), *slope, dx(0)),
            Op::Add => ops::residual_add(dx(0), dx(1)),
            Op::MaxPool2 => ops::pool::max_pool2x2_tangent(&to4(x(0)), &to4(dx(0))).into_dyn(),
            Op::GlobalAvgPool => ops::global_avg_pool(&to4(dx(0))).into_dyn(),
            Op::Flatten => {
                let shape = trace.outputs[id].shape().to_vec();
                dx(0)
                    .as_standard_layout()
                    .into_owned()
                    .into_shape_with_order(IxDyn(&shape))
                    .expect("flatten keeps the element count")
            }
            Op::Linear { params, .. } => {
                let names = params.select(path);
                let weight = to2(state.tensor(&names.weight));
                let no_bias = Array1::zeros(weight.nrows());
                ops::linear(&to2(dx(0)), &weight, &no_bias).into_dyn()
            }
        };
        out.push(dy);
    }
    out
}

/// The result of [`reverse_over_forward`].
#[derive(Debug, Clone, Default)]
pub struct SecondOrderGradients {
    /// ∂s/∂θ for every tensor the pass used, and ∂s/∂x (`input`, the primal cotangent of the
    /// input node).
    pub gradients: Gradients,
    /// ∂s/∂v, the tangent cotangent of the input node (g itself for s = ⟨g, v⟩).
    pub tangent_input: Option<Array4<f64>>,
}

/// Back-propagates a scalar s through the pass in `trace` and its tangent pass `tangents`
/// (from [`tangents`]): `seeds` are ∂s/∂y and `tangent_seeds` ∂s/∂ẏ at the given nodes (for
/// s = ⟨∇ₓL, v⟩ with the cross-entropy, [`cross_entropy_seeds`] at the logits). Each node's
/// primal and tangent cotangents follow the per-op rules of the module documentation;
/// parameter gradients from both add up.
///
/// # Panics
/// If a seed's node was not computed by the pass or its shape differs from the node's output,
/// or `tangents` does not match the trace.
pub fn reverse_over_forward(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    tangents: &[ArrayD<f64>],
    seeds: &[(NodeId, ArrayD<f64>)],
    tangent_seeds: &[(NodeId, ArrayD<f64>)],
) -> SecondOrderGradients {
    let last = trace.outputs.len() - 1;
    assert_eq!(
        tangents.len(),
        last + 1,
        "reverse_over_forward: {} tangents for a pass of {} nodes",
        tangents.len(),
        last + 1
    );
    let mut primal = seeded(trace, seeds);
    let mut tangent = seeded(trace, tangent_seeds);
    let path = &trace.path;
    let mut result = SecondOrderGradients::default();
    let grads = &mut result.gradients;
    for id in (0..=last).rev() {
        let (y_bar, dy_bar) = (primal[id].take(), tangent[id].take());
        if y_bar.is_none() && dy_bar.is_none() {
            continue;
        }
        let node = &plan.nodes[id];
        let x = |k: usize| &trace.outputs[node.inputs[k]];
        let dx = |k: usize| &tangents[node.inputs[k]];
        // x̄ and ẋ̄ contributions to input k of this node.
        let mut to_input = |k: usize, bar: Option<ArrayD<f64>>, dbar: Option<ArrayD<f64>>| {
            if let Some(bar) = bar {
                accumulate(&mut primal[node.inputs[k]], bar);
            }
            if let Some(dbar) = dbar {
                accumulate(&mut tangent[node.inputs[k]], dbar);
            }
        };
        // A linear map that is the same on both flows (its backward `f`).
        let both = |f: &dyn Fn(&ArrayD<f64>) -> ArrayD<f64>| {
            (y_bar.as_ref().map(f), dy_bar.as_ref().map(f))
        };
        match &node.op {
            Op::Input => {
                grads.input = y_bar.as_ref().map(to4);
                result.tangent_input = dy_bar.as_ref().map(to4);
            }
            Op::Normalize { std, .. } => {
                let std = to1(state.tensor(std));
                let (bar, dbar) = both(&|g| ops::normalize_backward(&std, &to4(g)).into_dyn());
                to_input(0, bar, dbar);
            }
            Op::Conv {
                stride,
                padding,
                weight,
                ..
            } => {
                let name = weight.select(path);
                let w = to4(state.tensor(name));
                let mut bar = None;
                let mut dbar = None;
                // Primal: y = W x.
                if let Some(g) = &y_bar {
                    let r = ops::conv2d_backward(&to4(x(0)), &w, &to4(g), *stride, *padding);
                    grads.accumulate(name, r.weight.into_dyn());
                    bar = Some(r.input.into_dyn());
                }
                // Tangent: ẏ = W ẋ, bilinear in (W, ẋ).
                if let Some(g) = &dy_bar {
                    let r = ops::conv2d_backward(&to4(dx(0)), &w, &to4(g), *stride, *padding);
                    grads.accumulate(name, r.weight.into_dyn());
                    dbar = Some(r.input.into_dyn());
                }
                to_input(0, bar, dbar);
            }
            Op::BatchNorm { params, .. } => {
                let names = params.select(path);
                let gamma = to1(state.tensor(&names.weight));
                let running = running_of(state, names);
                let input = to4(x(0));
                let mut bar: Option<ArrayD<f64>> = None;
                let mut dbar = None;
                if let Some(g) = &y_bar {
                    let r = ops::batch_norm2d_backward(
                        &input,
                        &gamma,
                        &running,
                        trace.mode,
                        ops::BN_EPS,
                        &to4(g),
                    );
                    grads.accumulate(&names.weight, r.gamma.into_dyn());
                    grads.accumulate(&names.bias, r.beta.into_dyn());
                    bar = Some(r.input.into_dyn());
                }
                if let Some(g) = &dy_bar {
                    let r = ops::batch_norm::batch_norm2d_tangent_backward(
                        &input,
                        &gamma,
                        &running,
                        trace.mode,
                        ops::BN_EPS,
                        &to4(dx(0)),
                        &to4(g),
                    );
                    grads.accumulate(&names.weight, r.gamma.into_dyn());
                    // β does not enter ẏ; it still is a tensor the pass used.
                    grads.accumulate(&names.bias, ArrayD::zeros(IxDyn(&[gamma.len()])));
                    let second = r.input.into_dyn();
                    bar = Some(match bar {
                        Some(first) => first + second,
                        None => second,
                    });
                    dbar = Some(r.tangent.into_dyn());
                }
                to_input(0, bar, dbar);
            }
            // ẏ = f′(x) ẋ with f″ = 0 almost everywhere: both flows through f′(x).
            Op::Relu => {
                let (bar, dbar) = both(&|g| ops::relu_backward(x(0), g));
                to_input(0, bar, dbar);
            }
            Op::LeakyRelu { slope } => {
                let (bar, dbar) = both(&|g| ops::leaky_relu_backward(x(0), *slope, g));
                to_input(0, bar, dbar);
            }
            Op::Add => {
                to_input(0, y_bar.clone(), dy_bar.clone());
                to_input(1, y_bar, dy_bar);
            }
            Op::MaxPool2 => {
                let input = to4(x(0));
                let (bar, dbar) = both(&|g| ops::max_pool2x2_backward(&input, &to4(g)).into_dyn());
                to_input(0, bar, dbar);
            }
            Op::GlobalAvgPool => {
                let dim = to4(x(0)).dim();
                let (bar, dbar) = both(&|g| ops::global_avg_pool_backward(dim, &to2(g)).into_dyn());
                to_input(0, bar, dbar);
            }
            Op::Flatten => {
                let shape = x(0).shape().to_vec();
                let (bar, dbar) = both(&|g| {
                    g.clone()
                        .into_shape_with_order(IxDyn(&shape))
                        .expect("unflatten keeps the element count")
                });
                to_input(0, bar, dbar);
            }
            Op::Linear { params, .. } => {
                let names = params.select(path);
                let w = to2(state.tensor(&names.weight));
                let mut bar = None;
                let mut dbar = None;
                // Primal: y = x Wᵀ + b.
                if let Some(g) = &y_bar {
                    let r = ops::linear_backward(&to2(x(0)), &w, &to2(g));
                    grads.accumulate(&names.weight, r.weight.into_dyn());
                    grads.accumulate(&names.bias, r.bias.into_dyn());
                    bar = Some(r.input.into_dyn());
                }
                // Tangent: ẏ = ẋ Wᵀ, no bias.
                if let Some(g) = &dy_bar {
                    let r = ops::linear_backward(&to2(dx(0)), &w, &to2(g));
                    grads.accumulate(&names.weight, r.weight.into_dyn());
                    grads.accumulate(&names.bias, ArrayD::zeros(IxDyn(&[w.nrows()])));
                    dbar = Some(r.input.into_dyn());
                }
                to_input(0, bar, dbar);
            }
        }
    }
    result
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
