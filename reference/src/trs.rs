//! TRS (Yang et al., NeurIPS 2021, "TRS: Transferability Reduced Ensemble via Promoting
//! Gradient Diversity and Model Smoothness"), as its public code trains it
//! (`train/Empirical/trainer.py` `TRS_Trainer`, `utils_ensemble.py` `Cosine`, `Magnitude`),
//! for N members in general:
//!
//! ```text
//! g_m      = ∇_x CE(f_m(x), y)                  (batch-mean CE, train-mode BN)
//! L_cos    = mean_{i<j} mean_b |cos(g_i,b, g_j,b)|                       (crate::alignment)
//! x̃        = x, or with trs.plus_adv: [first ⌊B/2⌋ images of x ; the rest moved by the PGD
//!            below, against labels of that half]
//! L_smooth = mean_m 2 · mean_b ‖∇_x̃ CE(f_m(x̃), y)‖²
//! loss     = Σ_m CE_m + trs.scale · (trs.coeff · L_cos + trs.lamda · L_smooth)
//! ```
//!
//! The PGD maximises the smoothness term itself: 6 steps (`trs.pgd_steps`) of size
//! radius · `trs.pgd_step_fraction` from a uniform random start, ascending
//! mean_m 2·mean_b‖∇ CE_m‖² by its sign (with `trs.pgd_accumulate`, as the public code, the
//! sign of the gradients summed over the steps so far: it never zeroes `adv.grad`); its input gradient is second order
//! (`crate::second_order::input_gradient_vjp`'s `input`), and so are the weight gradients of
//! both terms. The radius is annealed by epoch (`TrsConfig::radius`).
//!
//! Where the public code is specific, this is general: its pair loss is written for exactly
//! 3 members and divides by 3 (here: the mean over the N(N−1)/2 pairs and over the N
//! members). It runs the PGD even without `--plus-adv`, where the result is unused and only
//! the running statistics change; here the PGD runs only with `trs.plus_adv`.
//!
//! Running statistics, in the public code's order (every forward in train mode updates them):
//! each member's forward at x; the PGD's forwards (step by step, member by member); each
//! member's forward at x̃; each member's forward at x for the logged accuracy
//! (`Ensemble(models)(inputs)`).

use eio_spec::config::{BnMode, Config};
use eio_spec::{Path, Plan};
use ndarray::{concatenate, s, Array1, Array4, Axis};
use rand::Rng;

use crate::alignment::{pair_cosines, pair_directions};
use crate::attack::{start, step};
use crate::ensemble::{member_path, optimiser_step, MethodReport};
use crate::loss::cross_entropy;
use crate::model::{backward, logits, Gradients};
use crate::optim::Optimiser;
use crate::second_order::{input_gradient, input_gradient_vjp, InputGradient};
use crate::state::ModelState;

/// One TRS batch with the smoothness PGD at `radius`; `rng` supplies its random start.
///
/// # Panics
/// If there are fewer than 2 members, or the batch does not fit the plan.
#[allow(clippy::too_many_arguments)] // the batch, its PGD radius and stream, the models and settings
pub fn trs_iteration<R: Rng + ?Sized>(
    plan: &Plan,
    members: &mut [ModelState],
    optimisers: &mut [Optimiser],
    config: &Config,
    images: &Array4<f64>,
    labels: &[usize],
    radius: f64,
    rng: &mut R,
) -> MethodReport {
    let t = &config.trs;
    let n = members.len();
    assert!(n >= 2, "TRS needs at least 2 members");
    let path = member_path(plan);
    let firsts: Vec<InputGradient> = members
        .iter_mut()
        .map(|state| {
            let first = input_gradient(plan, state, &path, images, labels, BnMode::Train);
            state.commit(&first.trace);
            first
        })
        .collect();
    let smooth_images = if t.plus_adv {
        let half = images.dim().0 / 2;
        let adv = smoothness_pgd(
            plan,
            members,
            &path,
            &images.slice(s![half.., .., .., ..]).to_owned(),
            &labels[half..],
            radius,
            t.pgd_steps,
            radius * t.pgd_step_fraction,
            t.pgd_accumulate,
            rng,
        );
        concatenate![Axis(0), images.slice(s![..half, .., .., ..]), adv]
    } else {
        images.clone()
    };
    let smooth: Vec<InputGradient> = members
        .iter_mut()
        .map(|state| {
            let at = input_gradient(plan, state, &path, &smooth_images, labels, BnMode::Train);
            state.commit(&at.trace);
            at
        })
        .collect();
    for state in members.iter_mut() {
        let (_, logged) = logits(plan, state, &path, images, BnMode::Train);
        state.commit(&logged);
    }
    let (report, gradients) = trs_gradients(plan, members, config, labels, &firsts, &smooth);
    for ((state, optimiser), grads) in members
        .iter_mut()
        .zip(optimisers.iter_mut())
        .zip(&gradients)
    {
        optimiser_step(plan, state, optimiser, grads);
    }
    report
}

/// The TRS loss of the members' first-order passes at x (`firsts`) and at x̃ (`smooth`), one
/// per member from [`input_gradient`], and its gradient with respect to each member's
/// parameters: ∂CE_m/∂θ_m + scale·(coeff·∂⟨g_m, ∂L_cos/∂g_m⟩ + lamda·∂⟨g̃_m, ∂L_smooth/∂g̃_m⟩)/∂θ_m
/// (x̃ held fixed: the PGD that made it is not differentiated, as in the public code).
pub fn trs_gradients(
    plan: &Plan,
    members: &[ModelState],
    config: &Config,
    labels: &[usize],
    firsts: &[InputGradient],
    smooth: &[InputGradient],
) -> (MethodReport, Vec<Gradients>) {
    let t = &config.trs;
    let n = members.len();
    let grads: Vec<&Array4<f64>> = firsts.iter().map(|f| &f.grad).collect();
    let (cos_loss, cos_directions) = alignment(&grads);
    let smooth_loss = smooth.iter().map(|s| magnitude(&s.grad)).sum::<f64>() / n as f64;
    let batch = firsts[0].grad.dim().0 as f64;
    let mut ce_sum = 0.0;
    let mut gradients = Vec::with_capacity(n);
    for (m, state) in members.iter().enumerate() {
        let first = &firsts[m];
        ce_sum += first.loss;
        let ce = cross_entropy(&first.logits, labels);
        let mut total = backward(
            plan,
            state,
            &first.trace,
            &[(plan.logits(), ce.grad.into_dyn())],
        );
        let v_cos = &cos_directions[m] * (t.scale * t.coeff);
        let mut second = input_gradient_vjp(plan, state, &first.trace, labels, &v_cos);
        second.input = None;
        total.add(second);
        // ∂(2·mean_b‖g‖²)/∂g = 4g/B, averaged over the N members.
        let v_smooth = &smooth[m].grad * (t.scale * t.lamda * 4.0 / (batch * n as f64));
        let mut second = input_gradient_vjp(plan, state, &smooth[m].trace, labels, &v_smooth);
        second.input = None;
        total.add(second);
        gradients.push(total);
    }
    let report = MethodReport {
        loss: ce_sum + t.scale * (t.coeff * cos_loss + t.lamda * smooth_loss),
        terms: vec![("ce", ce_sum), ("cos", cos_loss), ("smooth", smooth_loss)],
        distill_loss: None,
        sign_ties: 0,
    };
    (report, gradients)
}

/// `Magnitude`: 2 · mean_b ‖g_b‖².
pub fn magnitude(grad: &Array4<f64>) -> f64 {
    2.0 * grad.iter().map(|v| v * v).sum::<f64>() / grad.dim().0 as f64
}

/// L_cos = mean over pairs i < j of mean_b |cos(g_i,b, g_j,b)|, and ∂L_cos/∂g_m per member.
pub fn alignment(grads: &[&Array4<f64>]) -> (f64, Vec<Array4<f64>>) {
    let batch = grads[0].dim().0 as f64;
    let cos = pair_cosines(grads);
    let count = cos.len() as f64;
    let value = cos.iter().map(|c| c.mapv(f64::abs).sum()).sum::<f64>() / batch / count;
    let weights: Vec<Array1<f64>> = cos
        .iter()
        .map(|c| c.mapv(|v| sign(v) / (batch * count)))
        .collect();
    (value, pair_directions(grads, &weights))
}

/// TRS's `PGD`: ascend mean_m Magnitude(∇_x CE_m) by its sign from a uniform start, every
/// member in train mode (each forward updates its running statistics); with `accumulate`
/// each step follows the sign of the gradients summed over the steps so far.
#[allow(clippy::too_many_arguments)] // the PGD's images, labels, radius, steps, size and stream
fn smoothness_pgd<R: Rng + ?Sized>(
    plan: &Plan,
    members: &mut [ModelState],
    path: &Path,
    x: &Array4<f64>,
    labels: &[usize],
    eps: f64,
    steps: usize,
    alpha: f64,
    accumulate: bool,
    rng: &mut R,
) -> Array4<f64> {
    let n = members.len() as f64;
    let batch = x.dim().0 as f64;
    let mut adv = start(x, eps, true, rng);
    let mut direction = Array4::zeros(x.dim());
    for _ in 0..steps {
        if !accumulate {
            direction.fill(0.0);
        }
        for state in members.iter_mut() {
            let at = input_gradient(plan, state, path, &adv, labels, BnMode::Train);
            state.commit(&at.trace);
            let v = &at.grad * (4.0 / (batch * n));
            direction += &input_gradient_vjp(plan, state, &at.trace, labels, &v)
                .input
                .expect("the pass starts at the input");
        }
        adv = step(&adv, &direction, x, alpha, eps);
    }
    adv
}

/// PyTorch's sign: 0 at 0.
fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}
