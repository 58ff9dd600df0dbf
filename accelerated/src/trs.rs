//! TRS on the device: semantics, equations, the public code's behaviour and where eio
//! generalises it in `eio_reference::trs`.

use candle_core::{Result, Tensor};
use eio_spec::config::{BnMode, Config};
use eio_spec::{Path, Plan};
use rand::Rng;

use crate::distill::{project, random_start};
use crate::ensemble::{member_path, optimiser_step, scalar, MethodReport};
use crate::model::{backward, logits};
use crate::ops;
use crate::optim::Optimiser;
use crate::second_order::{input_gradient, input_gradient_vjp, InputGradient};
use crate::state::ModelState;

/// One TRS batch with the smoothness PGD at `radius` (`eio_reference::trs::trs_iteration`).
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If there are fewer than 2 members.
#[allow(clippy::too_many_arguments)] // the batch, its PGD radius and stream, the models and settings
pub fn trs_iteration<R: Rng + ?Sized>(
    plan: &Plan,
    members: &mut [ModelState],
    optimisers: &mut [Optimiser],
    config: &Config,
    images: &Tensor,
    labels: &Tensor,
    radius: f64,
    rng: &mut R,
) -> Result<MethodReport> {
    let t = &config.trs;
    let n = members.len();
    assert!(n >= 2, "TRS needs at least 2 members");
    let path = member_path(plan);
    let mut firsts: Vec<InputGradient> = Vec::with_capacity(n);
    for state in members.iter_mut() {
        let first = input_gradient(plan, state, &path, images, labels, BnMode::Train)?;
        state.commit(&first.trace);
        firsts.push(first);
    }
    let grads: Vec<&Tensor> = firsts.iter().map(|f| &f.grad).collect();
    let (cos_loss, cos_directions) = alignment(&grads)?;

    let smooth_images = if t.plus_adv {
        let b = images.dim(0)?;
        let half = b / 2;
        let adv = smoothness_pgd(
            plan,
            members,
            &path,
            &images.narrow(0, half, b - half)?,
            &labels.narrow(0, half, b - half)?,
            radius,
            t.pgd_steps,
            radius * t.pgd_step_fraction,
            t.pgd_accumulate,
            rng,
        )?;
        Tensor::cat(&[&images.narrow(0, 0, half)?, &adv], 0)?
    } else {
        images.clone()
    };
    let mut smooth: Vec<InputGradient> = Vec::with_capacity(n);
    for state in members.iter_mut() {
        let at = input_gradient(plan, state, &path, &smooth_images, labels, BnMode::Train)?;
        state.commit(&at.trace);
        smooth.push(at);
    }
    let mut smooth_loss = 0.0;
    for s in &smooth {
        smooth_loss += magnitude(&s.grad)?;
    }
    smooth_loss /= n as f64;
    for state in members.iter_mut() {
        let (_, logged) = logits(plan, state, &path, images, BnMode::Train)?;
        state.commit(&logged);
    }

    let batch = images.dim(0)? as f64;
    let mut ce_sum = 0.0;
    for (m, (state, optimiser)) in members.iter_mut().zip(optimisers.iter_mut()).enumerate() {
        let first = &firsts[m];
        ce_sum += first.loss;
        let (_, seed) = ops::cross_entropy(&first.logits, labels)?;
        let mut total = backward(plan, state, &first.trace, &[(plan.logits(), seed)])?;
        let v_cos = (&cos_directions[m] * (t.scale * t.coeff))?;
        let mut second = input_gradient_vjp(plan, state, &first.trace, labels, &v_cos)?;
        second.input = None;
        total.add(second)?;
        let v_smooth = (&smooth[m].grad * (t.scale * t.lamda * 4.0 / (batch * n as f64)))?;
        let mut second = input_gradient_vjp(plan, state, &smooth[m].trace, labels, &v_smooth)?;
        second.input = None;
        total.add(second)?;
        optimiser_step(plan, state, optimiser, &total)?;
    }
    Ok(MethodReport {
        loss: ce_sum + t.scale * (t.coeff * cos_loss + t.lamda * smooth_loss),
        terms: vec![("ce", ce_sum), ("cos", cos_loss), ("smooth", smooth_loss)],
        distill_loss: None,
        sign_ties: 0,
    })
}

/// `Magnitude`: 2 · mean_b ‖g_b‖².
///
/// # Errors
/// On a device error.
pub fn magnitude(grad: &Tensor) -> Result<f64> {
    Ok(2.0 * scalar(&grad.sqr()?.sum_all()?)? / grad.dim(0)? as f64)
}

/// L_cos and ∂L_cos/∂g_m per member (`eio_reference::trs::alignment`).
///
/// # Errors
/// On a device error.
pub fn alignment(grads: &[&Tensor]) -> Result<(f64, Vec<Tensor>)> {
    let batch = grads[0].dim(0)? as f64;
    let cos = ops::pair_cosines(grads)?;
    let count = cos.len() as f64;
    let mut value = 0.0;
    let mut weights = Vec::with_capacity(cos.len());
    for c in &cos {
        value += scalar(&c.abs()?.sum_all()?)? / batch / count;
        weights.push((ops::sign(c)? / (batch * count))?);
    }
    Ok((value, ops::pair_directions(grads, &weights)?))
}

/// TRS's `PGD` (`eio_reference::trs`): ascend mean_m Magnitude(∇_x CE_m) by its sign (of the
/// summed gradients with `accumulate`).
#[allow(clippy::too_many_arguments)] // the PGD's images, labels, radius, steps, size and stream
fn smoothness_pgd<R: Rng + ?Sized>(
    plan: &Plan,
    members: &mut [ModelState],
    path: &Path,
    x: &Tensor,
    labels: &Tensor,
    eps: f64,
    steps: usize,
    alpha: f64,
    accumulate: bool,
    rng: &mut R,
) -> Result<Tensor> {
    let n = members.len() as f64;
    let batch = x.dim(0)? as f64;
    let mut adv = random_start(x, eps, rng)?;
    let mut direction = adv.zeros_like()?;
    for _ in 0..steps {
        if !accumulate {
            direction = direction.zeros_like()?;
        }
        for state in members.iter_mut() {
            let at = input_gradient(plan, state, path, &adv, labels, BnMode::Train)?;
            state.commit(&at.trace);
            let v = (&at.grad * (4.0 / (batch * n)))?;
            let g = input_gradient_vjp(plan, state, &at.trace, labels, &v)?
                .input
                .expect("the pass starts at the input");
            direction = (direction + g)?;
        }
        adv = project(&(adv + (ops::sign(&direction)? * alpha)?)?, x, eps)?;
    }
    Ok(adv)
}
