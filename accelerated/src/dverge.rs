//! DVERGE (Yang et al., NeurIPS 2020; the public code's `train/train_dverge.py`) on the
//! device: one iteration of vulnerability diversification over N members. The equations, the
//! departures of the public code from the paper and the exact order of the forwards (and so
//! of the BatchNorm running statistics and the random draws) are documented in
//! `eio_reference::dverge`; this is the same sequence of passes, sharing EIO's distillation
//! ([`eq2_distill`]) and cross-training (`eio::cross_train`, crate-private).

use candle_core::{Result, Tensor};
use eio_spec::config::Config;
use eio_spec::Plan;
use rand::Rng;

use crate::attack::{pgd_train_mode, AttackSettings};
use crate::distill::eq2_distill;
use crate::eio::cross_train;
use crate::ensemble::{member_path, optimiser_step, MethodReport};
use crate::model::Gradients;
use crate::optim::Optimiser;
use crate::path_batching::PathBatching;
use crate::state::ModelState;

/// One DVERGE iteration (`eio_reference::dverge::dverge_iteration`): for each member j in
/// order, Eq. 2's distillation of its own x'_j from (`source`, `target`) at `layer` with
/// `config.distill` along its plain path, then (with `config.dverge.plus_adv`) its train-mode
/// PGD batch from `config.train.adv`; then for each member i in order,
/// L_i = Σ_{j≠i} CE(f_i(x'_j), y_s) [+ CE(f_i(x^adv_i), y_s)] with the source `labels`
/// (`[B]`, u32), its backward and `optimisers[i]`'s step. `rng` supplies the random starts.
///
/// The report: `loss` = Σ_i L_i; terms `("cross_ce", ..)` and, with `plus_adv`,
/// `("adv_ce", ..)`; `distill_loss` the mean over members of each distillation's loss
/// before its last step; the sign ties of every distillation.
///
/// # Errors
/// On a device error, or if `members` and `optimisers` differ in length.
#[allow(clippy::too_many_arguments)] // the members, their optimisers, the settings, the batches, the layer and the rng
pub fn dverge_iteration<R: Rng + ?Sized>(
    plan: &Plan,
    members: &mut [ModelState],
    optimisers: &mut [Optimiser],
    config: &Config,
    source: &Tensor,
    labels: &Tensor,
    target: &Tensor,
    layer: usize,
    rng: &mut R,
) -> Result<MethodReport> {
    if members.len() != optimisers.len() {
        candle_core::bail!(
            "dverge_iteration: {} members, {} optimisers",
            members.len(),
            optimisers.len()
        );
    }
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
        )?;
        distill_loss += d.losses.last().copied().unwrap_or(f64::NAN);
        sign_ties += d.sign_ties;
        distilled.push(d.images);
        if let Some(settings) = &settings {
            adversarial.push(pgd_train_mode(
                plan, state, &path, source, labels, settings, rng,
            )?);
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
        let others: Vec<&Tensor> = distilled
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, x)| x)
            .collect();
        let mut grads = Gradients::default();
        let batching = (&path, PathBatching::for_device(labels.device()));
        let cross_i = cross_train(plan, state, batching, &others, labels, scale, &mut grads)?;
        let adv_i = match adversarial.get(i) {
            Some(x) => cross_train(plan, state, batching, &[x], labels, 1.0, &mut grads)?,
            None => 0.0,
        };
        cross_ce += cross_i;
        adv_ce += adv_i;
        loss += cross_i + adv_i;
        optimiser_step(plan, state, optimiser, &grads)?;
    }
    let mut terms = vec![("cross_ce", cross_ce)];
    if settings.is_some() {
        terms.push(("adv_ce", adv_ce));
    }
    Ok(MethodReport {
        loss,
        terms,
        distill_loss: Some(distill_loss / distilled.len().max(1) as f64),
        sign_ties,
    })
}
