//! Eq. 3-4 and Algorithm 1: one training iteration of Ensemble-in-One, and the clean
//! pre-training iteration that precedes it.
//!
//! For the layer l and paths P_1..P_p drawn by `eio_spec::sampler::draw_iteration`
//! (Algorithm 1 lines 11-12):
//!
//! ```text
//! X'_i   = x'_{P_i,l}(X_t, X_s)                                   (lines 15-18, Eq. 2)
//! L_i    = c · Σ_{j≠i} CE(f_{P_i}(X'_j), Y_s)  [+ c · CE(f_{P_i}(X^adv_i), Y_s)]   (line 20, Eq. 3)
//! ∇_N    = Σ_i ∇ L_i                                              (lines 19-23, Eq. 4)
//! N      ← SGD step with ∇_N                                      (line 24)
//! ```
//!
//! where c = 1 for `eio.loss_scale = "sum"` (Eq. 4) or 1/p for `"divide-by-p"` (the authors'
//! code), and CE is the batch-mean cross-entropy with the *source* labels. Every forward of the
//! cross-training runs in train-mode BN and updates the running statistics it touches, in the
//! order i = 1..p, j = 1..p. The optional PGD-AT term attacks each path in train-mode BN and
//! updates running statistics, as the authors' `gen_adv_iFGSM` does on a model in `train()`.
//! Parameters that no sampled path used get a zero gradient
//! (`eio.unused_params = "step"`) or none at all, so SGD skips them (`"skip"`).

use eio_spec::config::{BnMode, Config, LossScale, UnusedParams};
use eio_spec::plan::Role;
use eio_spec::sampler::IterationDraw;
use eio_spec::{Path, Plan};
use ndarray::{Array4, ArrayD};
use rand::Rng;

use crate::attack::{pgd_train_mode, AttackSettings};
use crate::distill::eq2_distill;
use crate::loss::cross_entropy;
use crate::model::{backward, logits, Gradients};
use crate::optim::Sgd;
use crate::state::ModelState;

/// A batch of source images with labels, and the target images they are distilled towards.
#[derive(Debug, Clone)]
pub struct EioBatch {
    /// X_s, `[N, C, H, W]` in [0, 1].
    pub source: Array4<f64>,
    /// Y_s.
    pub labels: Vec<usize>,
    /// X_t, the same shape as `source`.
    pub target: Array4<f64>,
}

/// What one EIO iteration did.
#[derive(Debug, Clone)]
pub struct IterationReport {
    pub layer: usize,
    pub paths: Vec<Path>,
    /// L_i for each path (after the loss scale).
    pub path_losses: Vec<f64>,
    /// Each path's feature-matching loss before its last distillation step.
    pub distill_losses: Vec<f64>,
    /// Sign ties over all distillations.
    pub sign_ties: usize,
}

/// Algorithm 1 lines 13-24 for the layer and paths of `draw` (lines 11-12, from
/// `eio_spec::sampler::draw_iteration`): distil, cross-train, one SGD step.
/// `rng` supplies the distillation (and adversarial-term) random starts.
///
/// # Panics
/// If the batch or paths do not fit the plan.
pub fn eq4_iteration<R: Rng + ?Sized>(
    plan: &Plan,
    state: &mut ModelState,
    optimiser: &mut Sgd,
    config: &Config,
    batch: &EioBatch,
    draw: &IterationDraw,
    rng: &mut R,
) -> IterationReport {
    let (layer, paths) = (draw.layer, draw.paths.as_slice());
    let p = paths.len();
    let mut distilled = Vec::with_capacity(p);
    let mut distill_losses = Vec::with_capacity(p);
    let mut sign_ties = 0;
    for path in paths {
        let d = eq2_distill(
            plan,
            state,
            path,
            layer,
            &batch.target,
            &batch.source,
            &config.distill,
            rng,
        );
        distill_losses.push(d.losses.last().copied().unwrap_or(f64::NAN));
        sign_ties += d.sign_ties;
        distilled.push(d.images);
    }
    let adversarial: Vec<Array4<f64>> = if config.eio.adversarial_term {
        let settings = AttackSettings::training(&config.train.adv, config.eval.cw_kappa);
        paths
            .iter()
            .map(|path| {
                pgd_train_mode(
                    plan,
                    state,
                    path,
                    &batch.source,
                    &batch.labels,
                    &settings,
                    rng,
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    let scale = match config.eio.loss_scale {
        LossScale::Sum => 1.0,
        LossScale::DivideByP => 1.0 / p as f64,
    };
    let mut total = Gradients::default();
    let mut path_losses = Vec::with_capacity(p);
    for (i, path) in paths.iter().enumerate() {
        let mut inputs: Vec<&Array4<f64>> = distilled
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, x)| x)
            .collect();
        if let Some(adv) = adversarial.get(i) {
            inputs.push(adv);
        }
        path_losses.push(cross_train(
            plan,
            state,
            path,
            &inputs,
            &batch.labels,
            scale,
            &mut total,
        ));
    }
    sgd_step(plan, state, optimiser, &total, config.eio.unused_params);
    IterationReport {
        layer,
        paths: paths.to_vec(),
        path_losses,
        distill_losses,
        sign_ties,
    }
}

/// Line 20 for one path (DVERGE's cross-training for one member): for each batch of `inputs`
/// in order, a train-mode forward along `path` whose running statistics are committed, then
/// `scale`·CE(f_P(x), `labels`) (batch mean). Returns the sum of those terms and adds their
/// gradients into `total` (the sum over passes, line 22).
pub(crate) fn cross_train(
    plan: &Plan,
    state: &mut ModelState,
    path: &Path,
    inputs: &[&Array4<f64>],
    labels: &[usize],
    scale: f64,
    total: &mut Gradients,
) -> f64 {
    let mut loss = 0.0;
    for x in inputs {
        let (out, trace) = logits(plan, state, path, x, BnMode::Train);
        state.commit(&trace);
        let ce = cross_entropy(&out, labels);
        loss += scale * ce.value;
        let seed = (ce.grad * scale).into_dyn();
        total.add(backward(plan, state, &trace, &[(plan.logits(), seed)]));
    }
    loss
}

/// Algorithm 1 lines 4-5: train one path on a clean batch (train-mode BN, batch-mean CE), then
/// one SGD step. Returns the loss.
pub fn pretrain_iteration(
    plan: &Plan,
    state: &mut ModelState,
    optimiser: &mut Sgd,
    path: &Path,
    images: &Array4<f64>,
    labels: &[usize],
    unused: UnusedParams,
) -> f64 {
    let (out, trace) = logits(plan, state, path, images, BnMode::Train);
    state.commit(&trace);
    let ce = cross_entropy(&out, labels);
    let grads = backward(plan, state, &trace, &[(plan.logits(), ce.grad.into_dyn())]);
    sgd_step(plan, state, optimiser, &grads, unused);
    ce.value
}

/// Algorithm 1 line 24 over every learnable tensor of the plan. A tensor with no gradient gets
/// a zero one under [`UnusedParams::Step`] and is skipped under [`UnusedParams::Skip`].
pub fn sgd_step(
    plan: &Plan,
    state: &mut ModelState,
    optimiser: &mut Sgd,
    grads: &Gradients,
    unused: UnusedParams,
) {
    for spec in plan.params.iter().filter(|p| p.role == Role::Learnable) {
        let zero;
        let grad = match (grads.params.get(&spec.name), unused) {
            (Some(g), _) => Some(g),
            (None, UnusedParams::Step) => {
                zero = ArrayD::zeros(spec.shape.as_slice());
                Some(&zero)
            }
            (None, UnusedParams::Skip) => None,
        };
        let param = state
            .tensors
            .get_mut(&spec.name)
            .unwrap_or_else(|| panic!("model state has no tensor {:?}", spec.name));
        optimiser.step_param(&spec.name, param, grad);
    }
}
