//! ADP (Pang et al. 2019, DVERGE's port `train/train_adp.py`) on the device: one iteration
//! over N members on one batch. The loss, its terms, its gradient and the order of the passes
//! are documented in `eio_reference::adp`; the loss and its gradient with respect to the
//! logits are the seam's [`ops::rivals::adp_loss`].

use candle_core::{Result, Tensor};
use eio_spec::config::{BnMode, Config};
use eio_spec::Plan;

use crate::ensemble::{member_path, optimiser_step, scalar, MethodReport};
use crate::model::{backward, logits};
use crate::ops;
use crate::optim::Optimiser;
use crate::state::ModelState;

/// One ADP iteration (`eio_reference::adp::adp_iteration`): train-mode forwards of every
/// member in member order on `images` (each committing its running statistics), the loss
/// L = Σ_m CE_m − α·H − β·D of `config.adp` on `labels` (`[B]`, u32), then each member's
/// backward and its own optimiser's step.
///
/// The report: `loss` = L; terms `("ce", CE)`, `("entropy", H)`, `("log_det", D)` unweighted;
/// no distillation.
///
/// # Errors
/// On a device error, or if `members` and `optimisers` differ in length or are empty.
pub fn adp_iteration(
    plan: &Plan,
    members: &mut [ModelState],
    optimisers: &mut [Optimiser],
    config: &Config,
    images: &Tensor,
    labels: &Tensor,
) -> Result<MethodReport> {
    if members.len() != optimisers.len() {
        candle_core::bail!(
            "adp_iteration: {} members, {} optimisers",
            members.len(),
            optimisers.len()
        );
    }
    let path = member_path(plan);
    let mut outputs = Vec::with_capacity(members.len());
    let mut traces = Vec::with_capacity(members.len());
    for state in members.iter_mut() {
        let (z, trace) = logits(plan, state, &path, images, BnMode::Train)?;
        state.commit(&trace);
        outputs.push(z);
        traces.push(trace);
    }
    let terms = ops::rivals::adp_loss(&outputs, labels, &config.adp)?;
    for (((state, optimiser), trace), grad) in members
        .iter_mut()
        .zip(optimisers.iter_mut())
        .zip(&traces)
        .zip(&terms.grads)
    {
        let grads = backward(plan, state, trace, &[(plan.logits(), grad.clone())])?;
        optimiser_step(plan, state, optimiser, &grads)?;
    }
    let ce = scalar(&terms.ce)?;
    let entropy = scalar(&terms.entropy)?;
    let log_det = scalar(&terms.log_det)?;
    Ok(MethodReport {
        loss: ce - config.adp.alpha * entropy - config.adp.beta * log_det,
        terms: vec![("ce", ce), ("entropy", entropy), ("log_det", log_det)],
        distill_loss: None,
        sign_ties: 0,
    })
}
