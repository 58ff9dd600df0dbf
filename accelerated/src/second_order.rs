//! Exact second-order gradients: the derivative, with respect to the weights and to the input,
//! of a functional of the input gradient ∇ₓL, for the rival methods that train on losses of
//! the members' input gradients (GAL's gradient alignment, TRS's gradient similarity and
//! smoothness). The same API and semantics as `eio_reference::second_order`, which documents
//! the method and checks every rule against finite differences.
//!
//! L(x, θ) is the batch-mean cross-entropy of the logits of one forward pass along a path (with
//! BatchNorm in the trace's mode), g = ∇ₓL the input gradient (pixel space, before the
//! normaliser), and for a direction v of x's shape
//!
//! ```text
//! s(θ, x) = ⟨g, v⟩ = d/dt L(x + t·v) at t = 0.
//! ```
//!
//! [`input_gradient_vjp`] gives ∂s/∂θ for every tensor the pass used and ∂s/∂x, by
//! reverse-over-forward differentiation: a tangent pass alongside the trace's primal pass
//! ([`tangents`], input tangent v), s = Σ_b ⟨∂L/∂z_b, ż_b⟩ at the logits
//! ([`cross_entropy_seeds`]), then one backward walk through both computations
//! ([`reverse_over_forward`]), with a primal cotangent ȳ = ∂s/∂y and a tangent cotangent
//! ẏ̄ = ∂s/∂ẏ per node:
//!
//! | op | tangent | backward |
//! |---|---|---|
//! | conv, linear | ẏ = W ẋ ([`ops::conv2d`], [`ops::linear_tangent`]) | x̄ = Wᵀȳ, ẋ̄ = Wᵀẏ̄, W̄ = dW(x, ȳ) + dW(ẋ, ẏ̄), b̄ = Σ ȳ |
//! | normalise | ẏ = ẋ / std | both by / std |
//! | ReLU, LeakyReLU | ẏ = f'(x) ẋ | x̄ = f'(x) ȳ, ẋ̄ = f'(x) ẏ̄ |
//! | add, flatten, global average pool | the op itself | its backward, on both |
//! | 2x2 max pool | ẋ at x's first maxima ([`ops::max_pool2_tangent`]) | the max-pool backward at x, on both |
//! | BatchNorm | ẏ = γ ẋ̂ ([`ops::batch_norm_tangent`]) | [`ops::batch_norm_second_backward`] |
//!
//! Every op runs through the [`ops`] seam (f32 and f64, CPU or CUDA; nothing is read back to
//! the host but [`InputGradient::loss`]).
//!
//! Running statistics are buffers: they get no gradient, and these functions never commit them
//! (a train-mode trace holds them for the caller to [`ModelState::commit`]). In eval mode the
//! tangent reads the trace's saved statistics, i.e. those of the state the forward pass read.

use candle_core::{DType, Result, Tensor};
use eio_spec::config::BnMode;
use eio_spec::plan::{NodeId, Op, Plan};
use eio_spec::Path;

use crate::model::{self, Gradients, Trace};
use crate::ops;
use crate::state::ModelState;

/// First order at x: the loss, the logits, g = ∇ₓL and the primal trace.
#[derive(Debug, Clone)]
pub struct InputGradient {
    /// L, the batch-mean cross-entropy of the logits.
    pub loss: f64,
    /// The logits z, `[N, classes]`.
    pub logits: Tensor,
    /// g = ∇ₓL, the input's shape `[N, C, H, W]`.
    pub grad: Tensor,
    /// The forward pass (its running statistics are not committed).
    pub trace: Trace,
}

/// The batch-mean cross-entropy L of the logits of `x` (`[N, C, H, W]`, pixels in [0, 1]) along
/// `path` with BatchNorm in `mode`, against `labels` (`[N]`, u32), and its input gradient
/// g = ∇ₓL (the first order that [`input_gradient_vjp`] differentiates again). The same ops as
/// [`model::forward`] to the logits, [`ops::cross_entropy`] and [`model::input_gradient`]. The running
/// statistics of a train-mode pass stay in the trace.
///
/// # Errors
/// On a device error.
pub fn input_gradient(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    x: &Tensor,
    labels: &Tensor,
    mode: BnMode,
) -> Result<InputGradient> {
    // A full trace: the tangents read every node's output.
    let trace = model::forward(plan, state, path, x, mode, plan.logits())?;
    let logits = trace.last().clone();
    let (loss, seed) = ops::cross_entropy(&logits, labels)?;
    let grad = model::input_gradient(plan, state, &trace, &[(plan.logits(), seed)])?;
    Ok(InputGradient {
        loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        logits,
        grad,
        trace,
    })
}

/// ∂⟨∇ₓL, v⟩/∂θ ([`Gradients::params`], by tensor name, only the tensors the pass used) and
/// ∂⟨∇ₓL, v⟩/∂x ([`Gradients::input`]) for the pass in `trace` (from [`input_gradient`] or
/// [`model::forward`], run to the logits: a full trace) and the same `labels` (`[N]`, u32). L is the
/// batch-mean cross-entropy; BatchNorm behaves as `trace.mode` says (train mode through the
/// batch statistics). For a loss R(g) of the input gradient (GAL, TRS), `v = ∂R/∂g` gives
/// ∂R/∂θ and ∂R/∂x.
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If the trace stopped before the logits or `v` is not the input's shape.
pub fn input_gradient_vjp(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    labels: &Tensor,
    v: &Tensor,
) -> Result<Gradients> {
    let end = plan.logits();
    assert_eq!(
        trace.len(),
        end + 1,
        "input_gradient_vjp: the pass must run to the logits (node {end})"
    );
    let tangents = tangents(plan, state, trace, v)?;
    let seeds = cross_entropy_seeds(trace.last(), labels, &tangents[end])?;
    Ok(reverse_over_forward(
        plan,
        state,
        trace,
        &tangents,
        &[(end, seeds.logits)],
        &[(end, seeds.logits_tangent)],
    )?
    .gradients)
}

/// The seeds of s = Σ_b ⟨∂L/∂z_b, ż_b⟩ for L the batch-mean cross-entropy.
#[derive(Debug, Clone)]
pub struct CrossEntropySeeds {
    /// s itself, ⟨∇_z L, ż⟩ = ⟨∇ₓL, v⟩: a scalar tensor on the logits' device.
    pub value: Tensor,
    /// ∂s/∂z_b = (p_b ⊙ ż_b − p_b ⟨p_b, ż_b⟩)/B, `[B, K]`.
    pub logits: Tensor,
    /// ∂s/∂ż_b = (p_b − e_b)/B = ∇_z L, `[B, K]`.
    pub logits_tangent: Tensor,
}

/// The loss seeds of [`reverse_over_forward`] for L = batch-mean cross-entropy of `logits`
/// with `labels` (`[B]`, u32), given the logits' tangent ż (`logits_tangent`, from
/// [`tangents`]); see [`ops::cross_entropy_tangent_backward`].
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If the shapes of the logits and their tangent differ.
pub fn cross_entropy_seeds(
    logits: &Tensor,
    labels: &Tensor,
    logits_tangent: &Tensor,
) -> Result<CrossEntropySeeds> {
    assert_eq!(
        logits.dims(),
        logits_tangent.dims(),
        "cross_entropy_seeds: logits_tangent shape != logits shape"
    );
    let (value, seed, tangent_seed) =
        ops::cross_entropy_tangent_backward(logits, logits_tangent, labels)?;
    Ok(CrossEntropySeeds {
        value,
        logits: seed,
        logits_tangent: tangent_seed,
    })
}

/// The tangent ẏ = (dy/dx) v of every node output of the pass in `trace` (same length as
/// `trace.outputs`) for the input direction `v` (`[N, C, H, W]`), at fixed parameters.
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If `v` is not the shape of the trace's input.
pub fn tangents(plan: &Plan, state: &ModelState, trace: &Trace, v: &Tensor) -> Result<Vec<Tensor>> {
    assert_eq!(
        v.dims(),
        trace.output(0).dims(),
        "tangents: v shape != input shape"
    );
    let path = trace.one_path()?;
    let train = trace.mode == BnMode::Train;
    let mut out: Vec<Tensor> = Vec::with_capacity(trace.len());
    for (id, node) in plan.nodes[..trace.len()].iter().enumerate() {
        let x = |k: usize| trace.output(node.inputs[k]);
        let dx = |k: usize| &out[node.inputs[k]];
        let dy = match &node.op {
            Op::Input => v.clone(),
            // The tangent of the affine (x − mean)/std is its linear part ẋ/std.
            Op::Normalize { std, .. } => ops::normalize_backward(state.tensor(std), dx(0))?,
            Op::Conv {
                stride,
                padding,
                weight,
                ..
            } => ops::conv2d(dx(0), state.tensor(weight.select(path)), *stride, *padding)?,
            Op::BatchNorm { params, .. } => {
                let gamma = state.tensor(&params.select(path).weight);
                ops::batch_norm_tangent(gamma, &trace.bn[&id], dx(0), train)?.0
            }
            // f'(x) ẋ, elementwise: the backward of an elementwise map applied to ẋ.
            Op::Relu => ops::relu_backward(x(0), dx(0))?,
            Op::LeakyRelu { slope } => ops::leaky_relu_backward(x(0), *slope, dx(0))?,
            Op::Add => (dx(0) + dx(1))?,
            Op::MaxPool2 => ops::max_pool2_tangent(x(0), dx(0))?,
            Op::GlobalAvgPool => ops::global_avg_pool(dx(0))?,
            Op::Flatten => dx(0).flatten_from(1)?,
            Op::Linear { params, .. } => {
                ops::linear_tangent(dx(0), state.tensor(&params.select(path).weight))?
            }
        };
        out.push(dy);
    }
    Ok(out)
}

/// The result of [`reverse_over_forward`].
#[derive(Debug, Clone, Default)]
pub struct SecondOrderGradients {
    /// ∂s/∂θ for every tensor the pass used, and ∂s/∂x (`input`, the primal cotangent of the
    /// input node).
    pub gradients: Gradients,
    /// ∂s/∂v, the tangent cotangent of the input node (g itself for s = ⟨g, v⟩).
    pub tangent_input: Option<Tensor>,
}

fn add(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        Some(total) => (total + g)?,
        None => g,
    });
    Ok(())
}

/// Back-propagates a scalar s through the pass in `trace` and its tangent pass `tangents`
/// (from [`tangents`]): `seeds` are ∂s/∂y and `tangent_seeds` ∂s/∂ẏ at the given nodes (for
/// s = ⟨∇ₓL, v⟩ with the cross-entropy, [`cross_entropy_seeds`] at the logits). Each node's
/// primal and tangent cotangents follow the per-op rules of the module documentation;
/// parameter gradients from both add up. A node reached by one flow only takes the other's
/// cotangent as zero.
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If a seed's node was not computed by the pass or its shape differs from the node's output,
/// or `tangents` does not match the trace.
pub fn reverse_over_forward(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    tangents: &[Tensor],
    seeds: &[(NodeId, Tensor)],
    tangent_seeds: &[(NodeId, Tensor)],
) -> Result<SecondOrderGradients> {
    let last = trace.len() - 1;
    assert_eq!(
        tangents.len(),
        last + 1,
        "reverse_over_forward: {} tangents for a pass of {} nodes",
        tangents.len(),
        last + 1
    );
    // ∂s/∂y and ∂s/∂ẏ per node.
    let mut primal: Vec<Option<Tensor>> = vec![None; last + 1];
    let mut tangent: Vec<Option<Tensor>> = vec![None; last + 1];
    for (slots, seeds) in [(&mut primal, seeds), (&mut tangent, tangent_seeds)] {
        for (id, grad) in seeds {
            assert!(
                *id <= last,
                "seed at node {id}, but the pass stopped at node {last}"
            );
            assert_eq!(
                grad.dims(),
                trace.output(*id).dims(),
                "seed shape at node {id}"
            );
            add(&mut slots[*id], grad.clone())?;
        }
    }
    let path = trace.one_path()?;
    let train = trace.mode == BnMode::Train;
    let mut result = SecondOrderGradients::default();
    let grads = &mut result.gradients;
    for id in (0..=last).rev() {
        let (g, tg) = match (primal[id].take(), tangent[id].take()) {
            (None, None) => continue,
            (g, tg) => {
                let out = trace.output(id);
                (
                    g.map_or_else(|| out.zeros_like(), Ok)?,
                    tg.map_or_else(|| out.zeros_like(), Ok)?,
                )
            }
        };
        let node = &plan.nodes[id];
        let x = |k: usize| trace.output(node.inputs[k]);
        let dx = |k: usize| &tangents[node.inputs[k]];
        let input = |k: usize| node.inputs[k];
        match &node.op {
            Op::Input => {
                grads.input = Some(g);
                result.tangent_input = Some(tg);
            }
            Op::Normalize { std, .. } => {
                let std = state.tensor(std);
                add(&mut primal[input(0)], ops::normalize_backward(std, &g)?)?;
                add(&mut tangent[input(0)], ops::normalize_backward(std, &tg)?)?;
            }
            Op::Conv {
                stride,
                padding,
                weight,
                ..
            } => {
                let name = weight.select(path);
                let w = state.tensor(name);
                // Primal y = W x, tangent ẏ = W ẋ (bilinear in W and ẋ).
                let (gx, gw) = ops::conv2d_backward(x(0), w, &g, *stride, *padding)?;
                let (tgx, tgw) = ops::conv2d_backward(dx(0), w, &tg, *stride, *padding)?;
                grads.accumulate(name, (gw + tgw)?)?;
                add(&mut primal[input(0)], gx)?;
                add(&mut tangent[input(0)], tgx)?;
            }
            Op::BatchNorm { params, .. } => {
                let names = params.select(path);
                let gamma = state.tensor(&names.weight);
                let saved = &trace.bn[&id];
                let (_, dx_hat) = ops::batch_norm_tangent(gamma, saved, dx(0), train)?;
                let bn =
                    ops::batch_norm_second_backward(gamma, saved, dx(0), &dx_hat, &g, &tg, train)?;
                grads.accumulate(&names.weight, bn.gamma)?;
                grads.accumulate(&names.bias, bn.beta)?;
                add(&mut primal[input(0)], bn.input)?;
                add(&mut tangent[input(0)], bn.tangent_input)?;
            }
            // ẏ = f'(x) ẋ with f'' = 0 almost everywhere: both flows through f'(x).
            Op::Relu => {
                add(&mut primal[input(0)], ops::relu_backward(x(0), &g)?)?;
                add(&mut tangent[input(0)], ops::relu_backward(x(0), &tg)?)?;
            }
            Op::LeakyRelu { slope } => {
                add(
                    &mut primal[input(0)],
                    ops::leaky_relu_backward(x(0), *slope, &g)?,
                )?;
                add(
                    &mut tangent[input(0)],
                    ops::leaky_relu_backward(x(0), *slope, &tg)?,
                )?;
            }
            Op::Add => {
                add(&mut primal[input(0)], g.clone())?;
                add(&mut primal[input(1)], g)?;
                add(&mut tangent[input(0)], tg.clone())?;
                add(&mut tangent[input(1)], tg)?;
            }
            Op::MaxPool2 => {
                add(&mut primal[input(0)], ops::max_pool2_backward(x(0), &g)?)?;
                add(&mut tangent[input(0)], ops::max_pool2_backward(x(0), &tg)?)?;
            }
            Op::GlobalAvgPool => {
                let dims = x(0).dims4()?;
                add(
                    &mut primal[input(0)],
                    ops::global_avg_pool_backward(dims, &g)?,
                )?;
                add(
                    &mut tangent[input(0)],
                    ops::global_avg_pool_backward(dims, &tg)?,
                )?;
            }
            Op::Flatten => {
                add(&mut primal[input(0)], g.reshape(x(0).dims())?)?;
                add(&mut tangent[input(0)], tg.reshape(x(0).dims())?)?;
            }
            Op::Linear { params, .. } => {
                let names = params.select(path);
                let w = state.tensor(&names.weight);
                // Primal y = x Wᵀ + b, tangent ẏ = ẋ Wᵀ (no bias).
                let (gx, gw, gb) = ops::linear_backward(x(0), w, &g)?;
                let (tgx, tgw, _) = ops::linear_backward(dx(0), w, &tg)?;
                grads.accumulate(&names.weight, (gw + tgw)?)?;
                grads.accumulate(&names.bias, gb)?;
                add(&mut primal[input(0)], gx)?;
                add(&mut tangent[input(0)], tgx)?;
            }
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;
    use eio_spec::config::{Activation, Arch, ModelConfig, Sharing, VggGating};
    use eio_spec::plan::{Init, Role};
    use eio_spec::rng::Seeds;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn resnet(activation: Activation) -> ModelConfig {
        ModelConfig {
            arch: Arch::Resnet,
            depth: 8,
            width: 0.25,
            n: 2,
            sharing: Sharing::Independent,
            classes: 4,
            in_channels: 3,
            input_size: 8,
            activation,
            leaky_slope: 0.1,
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2023, 0.1994, 0.2010],
            vgg_gated: VggGating::Convs,
        }
    }

    fn vgg() -> ModelConfig {
        ModelConfig {
            arch: Arch::Vgg16,
            depth: 16,
            width: 1.0 / 16.0,
            input_size: 32,
            classes: 3,
            vgg_gated: VggGating::ConvsAndClassifier,
            ..resnet(Activation::Relu)
        }
    }

    /// The plan's initial values with BatchNorm and biases moved away from their defaults.
    fn values(plan: &Plan, seed: u64) -> HashMap<String, Vec<f64>> {
        let mut values: HashMap<_, _> = plan
            .initial_values(&Seeds::new(seed), 0)
            .into_iter()
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for spec in &plan.params {
            let v = values.get_mut(&spec.name).expect("every tensor");
            let range = match (spec.role, &spec.init) {
                (Role::RunningStat, Init::Zeros) => -0.3..0.3,
                (Role::RunningStat, _) | (Role::Learnable, Init::Ones) => 0.5..1.5,
                (Role::Learnable, Init::Zeros) => -0.5..0.5,
                _ => continue,
            };
            for x in v.iter_mut() {
                *x = rng.random_range(range.clone());
            }
        }
        values
    }

    fn uniform(rng: &mut ChaCha8Rng, dims: &[usize], lo: f64, hi: f64) -> Tensor {
        let count = dims.iter().product();
        let data: Vec<f64> = (0..count).map(|_| rng.random_range(lo..hi)).collect();
        Tensor::from_vec(data, dims, &Device::Cpu).expect("tensor")
    }

    fn dot(a: &Tensor, b: &Tensor) -> f64 {
        a.mul(b)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.to_scalar::<f64>())
            .expect("dot")
    }

    /// s = ⟨∂L/∂x, v⟩ at (values, x).
    #[allow(clippy::too_many_arguments)]
    fn s_at(
        plan: &Plan,
        values: &HashMap<String, Vec<f64>>,
        path: &Path,
        x: &Tensor,
        labels: &Tensor,
        v: &Tensor,
        mode: BnMode,
    ) -> f64 {
        let state =
            ModelState::from_values(plan, values.clone(), &Device::Cpu, DType::F64).expect("state");
        let ig = input_gradient(plan, &state, path, x, labels, mode).expect("input gradient");
        dot(&ig.grad, v)
    }

    /// Central differences of s along a random direction of every learnable tensor (one at a
    /// time and all together) and of the input, against the exact ∂s/∂θ and ∂s/∂x. Steps of
    /// 1e-6 keep a ReLU kink or a max-pool tie from falling between the two evaluations; the
    /// difference quotient is then good to about 1e-9 of s's scale.
    fn check_finite_differences(model: &ModelConfig, mode: BnMode, batch: usize, seed: u64) {
        let plan = Plan::build(model).expect("plan");
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5ec0);
        let path = plan.path_space().sample(&mut rng);
        let values = values(&plan, seed);
        let state = ModelState::from_values(&plan, values.clone(), &Device::Cpu, DType::F64)
            .expect("state");
        let dims = [batch, model.in_channels, model.input_size, model.input_size];
        let x = uniform(&mut rng, &dims, 0.0, 1.0);
        let v = uniform(&mut rng, &dims, -1.0, 1.0);
        let labels: Vec<u32> = (0..batch)
            .map(|_| rng.random_range(0..model.classes as u32))
            .collect();
        let labels = Tensor::from_vec(labels, batch, &Device::Cpu).expect("labels");
        let ig = input_gradient(&plan, &state, &path, &x, &labels, mode).expect("input gradient");
        let grads = input_gradient_vjp(&plan, &state, &ig.trace, &labels, &v).expect("vjp");
        // The parts: s itself, and ∂s/∂v = g at the input (s is linear in v).
        let tangents = tangents(&plan, &state, &ig.trace, &v).expect("tangents");
        let end = plan.logits();
        let seeds = cross_entropy_seeds(&ig.logits, &labels, &tangents[end]).expect("seeds");
        let s_value = seeds.value.to_scalar::<f64>().expect("s");
        assert!((s_value - dot(&ig.grad, &v)).abs() <= 1e-12 * s_value.abs().max(1e-3));
        let walk = reverse_over_forward(
            &plan,
            &state,
            &ig.trace,
            &tangents,
            &[(end, seeds.logits)],
            &[(end, seeds.logits_tangent)],
        )
        .expect("walk");
        let dv = walk.tangent_input.expect("∂s/∂v");
        let g_scale = ig
            .grad
            .abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f64>());
        let diff = (&dv - &ig.grad)
            .and_then(|t| t.abs())
            .and_then(|t| t.max_all());
        let diff = diff.and_then(|t| t.to_scalar::<f64>()).expect("diff");
        assert!(
            diff <= 1e-12 * g_scale.expect("scale"),
            "∂s/∂v is not g: {diff:e}"
        );
        let s = |values: &HashMap<String, Vec<f64>>, x: &Tensor| {
            s_at(&plan, values, &path, x, &labels, &v, mode)
        };
        let s0 = s(&values, &x);
        let h = 1e-6;
        let check = |what: &str, exact: f64, plus: f64, minus: f64| {
            let fd = (plus - minus) / (2.0 * h);
            let scale = exact.abs().max(s0.abs()).max(1e-3);
            assert!(
                (fd - exact).abs() <= 1e-6 * scale,
                "{model:?} {mode:?}: {what}: exact {exact:e}, finite differences {fd:e}"
            );
        };
        // The input.
        let d = uniform(&mut rng, &dims, -1.0, 1.0);
        let input = grads.input.as_ref().expect("∂s/∂x");
        check(
            "∂s/∂x",
            dot(input, &d),
            s(&values, &(&x + (&d * h).expect("step")).expect("x+")),
            s(&values, &(&x - (&d * h).expect("step")).expect("x-")),
        );
        // Each tensor with a gradient, then all of them together.
        assert!(!grads.params.is_empty());
        let mut directions = HashMap::new();
        for (name, grad) in &grads.params {
            let spec = plan.params.iter().find(|p| &p.name == name).expect("spec");
            assert_eq!(spec.role, Role::Learnable, "{name}");
            let dir: Vec<f64> = (0..spec.numel())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let exact = dot(
                grad,
                &Tensor::from_vec(dir.clone(), spec.shape.as_slice(), &Device::Cpu).expect("dir"),
            );
            let moved = |sign: f64| {
                let mut moved = values.clone();
                for (p, d) in moved.get_mut(name).expect("tensor").iter_mut().zip(&dir) {
                    *p += sign * h * d;
                }
                s(&moved, &x)
            };
            check(&format!("∂s/∂{name}"), exact, moved(1.0), moved(-1.0));
            directions.insert(name.clone(), (dir, exact));
        }
        let total: f64 = directions.values().map(|(_, e)| e).sum();
        let moved = |sign: f64| {
            let mut moved = values.clone();
            for (name, (dir, _)) in &directions {
                for (p, d) in moved.get_mut(name).expect("tensor").iter_mut().zip(dir) {
                    *p += sign * h * d;
                }
            }
            s(&moved, &x)
        };
        check("∂s/∂θ", total, moved(1.0), moved(-1.0));
    }

    #[test]
    fn resnet_matches_finite_differences() {
        for (activation, mode, batch, seed) in [
            (Activation::Relu, BnMode::Train, 2, 1),
            (Activation::Relu, BnMode::Eval, 2, 2),
            (Activation::LeakyRelu, BnMode::Train, 3, 3),
            (Activation::LeakyRelu, BnMode::Eval, 1, 4),
            (Activation::Relu, BnMode::Train, 1, 5),
        ] {
            check_finite_differences(&resnet(activation), mode, batch, seed);
        }
    }

    #[test]
    fn vgg_matches_finite_differences() {
        check_finite_differences(&vgg(), BnMode::Train, 2, 6);
        check_finite_differences(&vgg(), BnMode::Eval, 1, 7);
    }

    /// With v = 0, s is zero for every θ: every ∂s/∂θ is exactly 0. A train-mode trace holds
    /// its running statistics for the caller.
    #[test]
    fn zero_direction_gives_zero() {
        let plan = Plan::build(&resnet(Activation::Relu)).expect("plan");
        let state = ModelState::from_values(&plan, values(&plan, 9), &Device::Cpu, DType::F64)
            .expect("state");
        let path = Path::new(vec![0; plan.k()]);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x = uniform(&mut rng, &[2, 3, 8, 8], 0.0, 1.0);
        let labels = Tensor::new(&[0u32, 3], &Device::Cpu).expect("labels");
        let ig = input_gradient(&plan, &state, &path, &x, &labels, BnMode::Train).expect("ig");
        assert!(!ig.trace.running.is_empty());
        let grads = input_gradient_vjp(
            &plan,
            &state,
            &ig.trace,
            &labels,
            &x.zeros_like().expect("0"),
        )
        .expect("vjp");
        for (name, g) in &grads.params {
            let max = g
                .abs()
                .and_then(|g| g.max_all())
                .and_then(|g| g.to_scalar::<f64>())
                .expect("max");
            assert_eq!(max, 0.0, "{name}");
        }
    }
}
