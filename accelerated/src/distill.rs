//! Eq. 2 on the device: projected sign-gradient descent towards the layer-l feature of x_t
//! (the semantics and every switch are documented in `eio_reference::distill`).
//!
//! One difference in work, none in results: the reference (like DVERGE and the authors' code)
//! recomputes f^l_P(x_t) at every step. With eval-mode BatchNorm that pass reads nothing the
//! steps change (the weights are fixed and an eval pass updates no running statistics), so it
//! runs once here and every step compares against the same tensor the recomputation would
//! give. Train-mode BatchNorm keeps the per-step target pass: each one updates the running
//! statistics, after the source pass, as PyTorch does.

use candle_core::{Result, Tensor};
use eio_spec::config::{BnMode, DistillConfig};
use eio_spec::{Path, Plan};
use rand::Rng;

use crate::model::{forward_groups, input_gradient};
use crate::ops;
use crate::path_batching::PathBatching;
use crate::state::ModelState;

/// Gradient entries with |g| below this count as sign ties.
pub const SIGN_TIE: f64 = 1e-12;

/// What a distillation produced.
#[derive(Debug, Clone)]
pub struct Distilled {
    /// x', `[N, C, H, W]`.
    pub images: Tensor,
    /// The feature-matching loss before each step.
    pub losses: Vec<f64>,
    /// Entries whose step direction had |m| < [`SIGN_TIE`], summed over steps.
    pub sign_ties: usize,
}

/// A uniform start in the eps ball, clamped to [0, 1], from host draws of
/// `eio_spec::rng::uniform_start` (the reference draws the same numbers).
pub(crate) fn random_start<R: Rng + ?Sized>(x: &Tensor, eps: f64, rng: &mut R) -> Result<Tensor> {
    let noise = eio_spec::rng::uniform_start(x.elem_count(), eps, rng);
    let noise = Tensor::from_vec(noise, x.dims(), x.device())?.to_dtype(x.dtype())?;
    (x + noise)?.clamp(0.0, 1.0)
}

/// z ← clamp(clamp(z + α·direction, x − ε, x + ε), 0, 1) with direction already signed.
pub(crate) fn project(z: &Tensor, x: &Tensor, eps: f64) -> Result<Tensor> {
    z.minimum(&(x + eps)?)?
        .maximum(&(x - eps)?)?
        .clamp(0.0, 1.0)
}

/// Eq. 2 for `path` at layer `layer` (1-based): see `eio_reference::distill::eq2_distill`.
///
/// # Errors
/// On a device error.
#[allow(clippy::too_many_arguments)] // the arguments of x'_{P,l}(x_t, x_s), plus the model, settings and rng
pub fn eq2_distill<R: Rng + ?Sized>(
    plan: &Plan,
    state: &mut ModelState,
    path: &Path,
    layer: usize,
    x_t: &Tensor,
    x_s: &Tensor,
    config: &DistillConfig,
    rng: &mut R,
) -> Result<Distilled> {
    let mut one = lock_step(
        plan,
        state,
        std::slice::from_ref(path),
        layer,
        (x_t, x_s),
        config,
        rng,
    )?;
    Ok(one.pop().expect("one distillation per path"))
}

/// [`eq2_distill`] for each of `paths` in turn (Algorithm 1 line 17, the p distillations of
/// one iteration), with the same results. [`PathBatching::Batched`] with eval-mode BatchNorm,
/// where nothing a distillation reads changes between them, advances them in lock-step: each
/// step is one path-batched pass over one copy of the batch per path ([`forward_groups`]).
/// Train-mode BatchNorm updates running statistics at every step, in the order of the paths,
/// so those distillations always run one after the other.
///
/// # Errors
/// On a device error.
#[allow(clippy::too_many_arguments)] // as eq2_distill, with the paths and their schedule
pub fn eq2_distill_paths<R: Rng + ?Sized>(
    plan: &Plan,
    state: &mut ModelState,
    paths: &[Path],
    layer: usize,
    (x_t, x_s): (&Tensor, &Tensor),
    config: &DistillConfig,
    batching: PathBatching,
    rng: &mut R,
) -> Result<Vec<Distilled>> {
    match (config.bn_mode, batching) {
        (BnMode::Eval, PathBatching::Batched) => {
            lock_step(plan, state, paths, layer, (x_t, x_s), config, rng)
        }
        _ => paths
            .iter()
            .map(|path| eq2_distill(plan, state, path, layer, x_t, x_s, config, rng))
            .collect(),
    }
}

/// The distillations of `paths` in lock-step, one group of images per path (for one path,
/// [`eq2_distill`] itself).
fn lock_step<R: Rng + ?Sized>(
    plan: &Plan,
    state: &mut ModelState,
    paths: &[Path],
    layer: usize,
    (x_t, x_s): (&Tensor, &Tensor),
    config: &DistillConfig,
    rng: &mut R,
) -> Result<Vec<Distilled>> {
    let eps = config.eps;
    let alpha = config.step_size();
    let feature = plan.feature_node(layer, config.feature, config.first_layer_before_relu);
    let groups = paths.len();
    let copies = |x: &Tensor| Tensor::cat(&vec![x; groups], 0);
    let x_s = copies(x_s)?;
    let x_t = copies(x_t)?;
    // Each path's start, drawn in the order of the paths (as one distillation after another).
    let mut z = if config.random_start {
        let n = x_s.dim(0)? / groups;
        let starts = (0..groups)
            .map(|g| random_start(&x_s.narrow(0, g * n, n)?, eps, rng))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&starts, 0)?
    } else {
        x_s.clone()
    };
    let mut momentum: Option<Tensor> = None;
    let mut losses = vec![Vec::with_capacity(config.steps); groups];
    let mut sign_ties = vec![Tensor::zeros((), candle_core::DType::F64, x_s.device())?; groups];
    let fixed_target = match config.bn_mode {
        BnMode::Eval if config.steps > 0 => Some(
            forward_groups(plan, state, paths, &x_t, BnMode::Eval, feature)?
                .output(feature)
                .clone(),
        ),
        _ => None,
    };
    for _ in 0..config.steps {
        let source = forward_groups(plan, state, paths, &z, config.bn_mode, feature)?;
        state.commit(&source);
        let target = match &fixed_target {
            Some(t) => t.clone(),
            None => {
                let target = forward_groups(plan, state, paths, &x_t, config.bn_mode, feature)?;
                state.commit(&target);
                target.output(feature).clone()
            }
        };
        let (loss, grad) = ops::mse_groups(source.output(feature), &target, groups)?;
        for (all, loss) in losses.iter_mut().zip(loss) {
            all.push(loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?);
        }
        let grad = input_gradient(plan, state, &source, &[(feature, grad)])?;
        let direction = if config.momentum {
            let m = ops::l1_momentum(momentum.as_ref(), &grad, config.momentum_decay)?;
            momentum = Some(m.clone());
            m
        } else {
            grad
        };
        let n = direction.dim(0)? / groups;
        for (g, ties) in sign_ties.iter_mut().enumerate() {
            *ties = (&*ties + ops::count_below(&direction.narrow(0, g * n, n)?, SIGN_TIE)?)?;
        }
        z = project(&(z - (ops::sign(&direction)? * alpha)?)?, &x_s, eps)?;
    }
    let n = z.dim(0)? / groups;
    losses
        .into_iter()
        .zip(sign_ties)
        .enumerate()
        .map(|(g, (losses, ties))| {
            Ok(Distilled {
                images: z.narrow(0, g * n, n)?,
                losses,
                sign_ties: ties.to_scalar::<f64>()? as usize,
            })
        })
        .collect()
}
