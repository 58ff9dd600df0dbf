//! GAL on the device: semantics, equations and the public code's behaviour in
//! `eio_reference::gal`.

use candle_core::{Result, Tensor};
use eio_spec::config::{BnMode, Config};
use eio_spec::noise::gaussian_noise;
use eio_spec::Plan;
use rand::Rng;

use crate::ensemble::{member_path, optimiser_step, scalar, MethodReport};
use crate::model::{backward, logits};
use crate::ops;
use crate::optim::Optimiser;
use crate::second_order::{input_gradient, input_gradient_vjp};
use crate::state::ModelState;

/// One GAL batch (`eio_reference::gal::gal_iteration`).
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If there are fewer than 2 members.
pub fn gal_iteration<R: Rng + ?Sized>(
    plan: &Plan,
    members: &mut [ModelState],
    optimisers: &mut [Optimiser],
    config: &Config,
    images: &Tensor,
    labels: &Tensor,
    rng: &mut R,
) -> Result<MethodReport> {
    let n = members.len();
    assert!(n >= 2, "GAL needs at least 2 members");
    let (b, c, h, w) = images.dims4()?;
    let noise = gaussian_noise(
        rng,
        b,
        c * h * w,
        config.gal.noise_std,
        config.gal.noise_probability,
    );
    let noise = Tensor::from_vec(noise, (b, c, h, w), images.device())?.to_dtype(images.dtype())?;
    let x = (images + noise)?;
    let path = member_path(plan);
    let mut firsts = Vec::with_capacity(n);
    for state in members.iter_mut() {
        let first = input_gradient(plan, state, &path, &x, labels, BnMode::Train)?;
        state.commit(&first.trace);
        if config.gal.second_forward {
            let (_, again) = logits(plan, state, &path, &x, BnMode::Train)?;
            state.commit(&again);
        }
        firsts.push(first);
    }
    let grads: Vec<&Tensor> = firsts.iter().map(|f| &f.grad).collect();
    let (coherence, directions) = coherence(&grads, config.gal.log_offset)?;
    let mut ce_sum = 0.0;
    for (m, (state, optimiser)) in members.iter_mut().zip(optimisers.iter_mut()).enumerate() {
        let first = &firsts[m];
        ce_sum += first.loss;
        let (_, seed) = ops::cross_entropy(&first.logits, labels)?;
        let seed = (seed / n as f64)?;
        let mut total = backward(plan, state, &first.trace, &[(plan.logits(), seed)])?;
        let v = (&directions[m] * config.gal.coherence)?;
        let mut second = input_gradient_vjp(plan, state, &first.trace, labels, &v)?;
        second.input = None;
        total.add(second)?;
        optimiser_step(plan, state, optimiser, &total)?;
    }
    Ok(MethodReport {
        loss: ce_sum / n as f64 + config.gal.coherence * coherence,
        terms: vec![("ce", ce_sum), ("coherence", coherence)],
        distill_loss: None,
        sign_ties: 0,
    })
}

/// The coherence and ∂coh/∂g_m per member (`eio_reference::gal::coherence`).
///
/// # Errors
/// On a device error.
pub fn coherence(grads: &[&Tensor], offset: f64) -> Result<(f64, Vec<Tensor>)> {
    let batch = grads[0].dim(0)? as f64;
    let exps = ops::pair_cosines(grads)?
        .into_iter()
        .map(|c| c.exp())
        .collect::<Result<Vec<_>>>()?;
    let mut sums = (exps[0].ones_like()? * offset)?;
    for e in &exps {
        sums = (sums + e)?;
    }
    let value = scalar(&sums.log()?.sum_all()?)? / batch;
    let weights = exps
        .iter()
        .map(|e| (e / &sums)? / batch)
        .collect::<Result<Vec<_>>>()?;
    Ok((value, ops::pair_directions(grads, &weights)?))
}
