//! DVERGE (Yang et al., NeurIPS 2020, "DVERGE: Diversifying Vulnerabilities for Enhanced
//! Robust Generation of Ensembles"): one iteration of vulnerability diversification over N
//! members, as the public code (`train/train_dverge.py`) runs it.
//!
//! For members f_1..f_N, a source batch (x_s, y_s), a target batch x_t and the distillation
//! layer l (drawn by `eio_spec::sampler::draw_layer` under `dverge.layer_schedule`: DVERGE
//! draws it once per epoch):
//!
//! ```text
//! x'_j = x'_{f_j,l}(x_t, x_s)          every j, before any update (feature distillation, Eq. 2)
//! L_i  = Σ_{j≠i} CE(f_i(x'_j), y_s)  [+ CE(f_i(x^adv_i), y_s)]   (a sum over j, not a mean)
//! f_i  ← optimiser_i step with ∇L_i,  i = 1..N in order
//! ```
//!
//! This is EIO's Eq. 3-4 with members in place of paths (the same distillation
//! [`eq2_distill`], along each member's all-zero plain path, and the same cross-training sum,
//! the crate-private `eio::cross_train`) except that every member has its own weights and its
//! own optimiser and steps right after its own backward. x^adv_i (with `dverge.plus_adv`) is
//! train-mode PGD against member i alone with `train.adv` ([`pgd_train_mode`],
//! [`AttackSettings::training`]: random start, CE).
//!
//! Facts of the public code this follows (rivals.md): the distillation's settings are
//! `[distill]`'s DVERGE defaults (ε 0.07, step 0.007, 10 steps, no random start, momentum 1
//! on the per-sample L1-normalised gradient, features before ReLU, train-mode BatchNorm);
//! each member distils its own x'_j from the same (x_s, x_t), all before any update; only
//! y_s is used. With `--plus-adv` the code computes `coeff·Σ_{j≠i} CE + CE(adv)` with
//! `--dverge-coeff` (`dverge.coeff`, default 1); the report's `cross_ce` is that weighted sum.
//!
//! # Order of the forwards, and so of the running statistics
//!
//! Read from `train_dverge.py` (models in `train()` throughout, so every forward updates the
//! BatchNorm running statistics of the layers it reaches):
//!
//! 1. for each member j in order: `Linf_distillation(m_j, x_s, x_t)` — per step, a forward of
//!    z to layer l, then one of x_t to layer l (`gradient_wrt_feature` calls
//!    `get_features(source)` before `get_features(target)`; `get_features` stops at layer l,
//!    so only the BatchNorms up to it move); then, with `--plus-adv`, `Linf_PGD(m_j, x_s)` —
//!    one full forward per step from a random start. Both for member j before member j + 1,
//!    which fixes the order of the random draws (the PGD start, and a distillation start when
//!    `distill.random_start` is set): distil 1, PGD 1, distil 2, PGD 2, ...
//! 2. for each member i in order: full forwards f_i(x'_j) for j ≠ i in increasing j, then
//!    f_i(x^adv_i); one backward of L_i; member i's optimiser step. Member i's forwards use its
//!    weights before its own step (no other member's step touches them).
//!
//! Since the members share no tensors, only the order within one member matters for its
//! statistics; the interleaving of members matters for the random stream. The running
//! statistics here follow that order exactly: each forward is committed as it runs.

use eio_spec::config::Config;
use eio_spec::Plan;
use ndarray::Array4;
use rand::Rng;

use crate::attack::{pgd_train_mode, AttackSettings};
use crate::distill::eq2_distill;
use crate::eio::cross_train;
use crate::ensemble::{member_path, optimiser_step, MethodReport};
use crate::model::Gradients;
use crate::optim::Optimiser;
use crate::state::ModelState;

/// One DVERGE iteration of `members` (see the module documentation): each member distils
/// its own x'_j from (`source`, `target`) at `layer` (1-based) with `config.distill`, and with
/// `config.dverge.plus_adv` makes its PGD batch (`config.train.adv`); then member i, in order,
/// trains on the other members' x'_j (and its PGD batch) with the source `labels` and takes
/// `optimisers[i]`'s step. `rng` supplies the random starts, in the order of the module
/// documentation.
///
/// The report: `loss` = Σ_i L_i; terms `("cross_ce", Σ_i Σ_{j≠i} CE(f_i(x'_j), y_s))` and,
/// with `plus_adv`, `("adv_ce", Σ_i CE(f_i(x^adv_i), y_s))`; `distill_loss` the mean over
/// members of each distillation's loss before its last step; the sign ties of every
/// distillation.
///
/// # Panics
/// If `members` and `optimisers` differ in length, or the batches do not fit the plan.
#[allow(clippy::too_many_arguments)] // the members, their optimisers, the settings, the batches, the layer and the rng
pub fn dverge_iteration<R: Rng + ?Sized>(
    plan: &Plan,
    members: &mut [ModelState],
    optimisers: &mut [Optimiser],
    config: &Config,
    source: &Array4<f64>,
    labels: &[usize],
    target: &Array4<f64>,
    layer: usize,
    rng: &mut R,
) -> MethodReport {
    assert_eq!(
        members.len(),
        optimisers.len(),
        "dverge_iteration: one optimiser per member"
    );
    let path = member_path(plan);
    let settings = config
        .dverge
        .plus_adv
        .then(|| AttackSettings::training(&config.train.adv, config.eval.cw_kappa));
    let mut distilled = Vec::with_capacity(members.len());
    let mut adversarial = Vec::new();
    let mut distill_loss = 0.0;
    let mut sign_ties = 0;
    for state in members.iter_mut() {
        let d = eq2_distill(
            plan,
            state,
            &path,
            layer,
            target,
            source,
            &config.distill,
            rng,
        );
        distill_loss += d.losses.last().copied().unwrap_or(f64::NAN);
        sign_ties += d.sign_ties;
        distilled.push(d.images);
        if let Some(settings) = &settings {
            adversarial.push(pgd_train_mode(
                plan, state, &path, source, labels, settings, rng,
            ));
        }
    }
    // `--dverge-coeff` weighs the cross-training sum when the adversarial term is on.
    let scale = if settings.is_some() {
        config.dverge.coeff
    } else {
        1.0
    };
    let mut loss = 0.0;
    let mut cross_ce = 0.0;
    let mut adv_ce = 0.0;
    for (i, (state, optimiser)) in members.iter_mut().zip(optimisers.iter_mut()).enumerate() {
        let others: Vec<&Array4<f64>> = distilled
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, x)| x)
            .collect();
        let mut grads = Gradients::default();
        let cross_i = cross_train(plan, state, &path, &others, labels, scale, &mut grads);
        let adv_i = match adversarial.get(i) {
            Some(x) => cross_train(plan, state, &path, &[x], labels, 1.0, &mut grads),
            None => 0.0,
        };
        cross_ce += cross_i;
        adv_ce += adv_i;
        loss += cross_i + adv_i;
        optimiser_step(plan, state, optimiser, &grads);
    }
    let mut terms = vec![("cross_ce", cross_ce)];
    if settings.is_some() {
        terms.push(("adv_ce", adv_ce));
    }
    MethodReport {
        loss,
        terms,
        distill_loss: Some(distill_loss / distilled.len().max(1) as f64),
        sign_ties,
    }
}
