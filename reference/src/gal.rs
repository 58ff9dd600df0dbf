//! GAL (Kariyappa & Qureshi 2019, "Improving Adversarial Robustness of Ensembles with
//! Diversity Training"), as DVERGE's port (`train/train_gal.py`) trains it:
//!
//! ```text
//! x̃        = x + noise           (per image with probability gal.noise_probability,
//!                                  N(0, gal.noise_std²) per pixel, not clamped)
//! g_m      = ∇_x̃ CE(f_m(x̃), y)    (batch-mean CE, input pixel space, train-mode BN)
//! cos_ij,b = cos(g_i,b, g_j,b)     over the pairs i < j          (crate::alignment)
//! coh      = mean_b log(Σ_{i<j} exp(cos_ij,b) + gal.log_offset)
//! loss     = (Σ_m CE_m) / N + gal.coherence · coh
//! ```
//!
//! The coherence depends on the input gradients, so its weight gradient is second order:
//! with v_m = ∂coh/∂g_m, ∂coh/∂θ_m = ∂⟨g_m, v_m⟩/∂θ_m at fixed v_m
//! (`crate::second_order::input_gradient_vjp`). Each member takes its own optimiser step
//! (one Adam over all members in the public code, which is the same update).
//!
//! Running statistics: each member's forward runs in train mode and updates them; with
//! `gal.second_forward` (the public code's `m(inputs.clone().detach())` for the CE term) a
//! second train-mode forward of the same images updates them again. Its outputs equal the
//! first's (batch statistics), so the loss and gradients are those of the first pass.

use eio_spec::config::{BnMode, Config};
use eio_spec::noise::gaussian_noise;
use eio_spec::Plan;
use ndarray::{Array1, Array4};
use rand::Rng;

use crate::alignment::{pair_cosines, pair_directions};
use crate::ensemble::{member_path, optimiser_step, MethodReport};
use crate::loss::cross_entropy;
use crate::model::{backward, logits, Gradients};
use crate::optim::Optimiser;
use crate::second_order::{input_gradient, input_gradient_vjp, InputGradient};
use crate::state::ModelState;

/// One GAL batch: noise from `rng` (`eio_spec::noise::gaussian_noise`), then the loss above
/// and one optimiser step per member.
///
/// # Panics
/// If there are fewer than 2 members, or the batch does not fit the plan.
pub fn gal_iteration<R: Rng + ?Sized>(
    plan: &Plan,
    members: &mut [ModelState],
    optimisers: &mut [Optimiser],
    config: &Config,
    images: &Array4<f64>,
    labels: &[usize],
    rng: &mut R,
) -> MethodReport {
    let n = members.len();
    assert!(n >= 2, "GAL needs at least 2 members");
    let (b, c, h, w) = images.dim();
    let noise = gaussian_noise(
        rng,
        b,
        c * h * w,
        config.gal.noise_std,
        config.gal.noise_probability,
    );
    let x = images + &Array4::from_shape_vec((b, c, h, w), noise).expect("noise of the batch");
    let path = member_path(plan);
    let mut firsts = Vec::with_capacity(n);
    for state in members.iter_mut() {
        let first = input_gradient(plan, state, &path, &x, labels, BnMode::Train);
        state.commit(&first.trace);
        if config.gal.second_forward {
            let (_, again) = logits(plan, state, &path, &x, BnMode::Train);
            state.commit(&again);
        }
        firsts.push(first);
    }
    let (report, gradients) = gal_gradients(plan, members, config, labels, &firsts);
    for ((state, optimiser), grads) in members
        .iter_mut()
        .zip(optimisers.iter_mut())
        .zip(&gradients)
    {
        optimiser_step(plan, state, optimiser, grads);
    }
    report
}

/// The GAL loss of the members' first-order passes `firsts` (one per member, from
/// [`input_gradient`] at the same noisy batch) and its gradient with respect to each member's
/// parameters: (1/N)·∂CE_m/∂θ_m + coherence · ∂⟨g_m, v_m⟩/∂θ_m with v_m = ∂coh/∂g_m.
pub fn gal_gradients(
    plan: &Plan,
    members: &[ModelState],
    config: &Config,
    labels: &[usize],
    firsts: &[InputGradient],
) -> (MethodReport, Vec<Gradients>) {
    let n = members.len();
    let grads: Vec<&Array4<f64>> = firsts.iter().map(|f| &f.grad).collect();
    let (coherence, directions) = coherence(&grads, config.gal.log_offset);
    let mut ce_sum = 0.0;
    let mut gradients = Vec::with_capacity(n);
    for (m, state) in members.iter().enumerate() {
        let first = &firsts[m];
        ce_sum += first.loss;
        let ce = cross_entropy(&first.logits, labels);
        let seed = (ce.grad / n as f64).into_dyn();
        let mut total = backward(plan, state, &first.trace, &[(plan.logits(), seed)]);
        let v = &directions[m] * config.gal.coherence;
        let mut second = input_gradient_vjp(plan, state, &first.trace, labels, &v);
        second.input = None;
        total.add(second);
        gradients.push(total);
    }
    let report = MethodReport {
        loss: ce_sum / n as f64 + config.gal.coherence * coherence,
        terms: vec![("ce", ce_sum), ("coherence", coherence)],
        distill_loss: None,
        sign_ties: 0,
    };
    (report, gradients)
}

/// The coherence coh = mean_b log(Σ_{i<j} exp(cos(g_i,b, g_j,b)) + offset) and ∂coh/∂g_m for
/// every member m.
pub fn coherence(grads: &[&Array4<f64>], offset: f64) -> (f64, Vec<Array4<f64>>) {
    let batch = grads[0].dim().0 as f64;
    let exps: Vec<Array1<f64>> = pair_cosines(grads)
        .into_iter()
        .map(|c| c.mapv(f64::exp))
        .collect();
    let mut sums = Array1::from_elem(grads[0].dim().0, offset);
    for e in &exps {
        sums += e;
    }
    let value = sums.mapv(f64::ln).sum() / batch;
    // ∂coh/∂cos_ij,b = exp(cos_ij,b) / (sums_b · B)
    let weights: Vec<Array1<f64>> = exps.iter().map(|e| e / &sums / batch).collect();
    (value, pair_directions(grads, &weights))
}
