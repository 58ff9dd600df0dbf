//! L-inf PGD on the device against one path, an ensemble (log of the mean softmax) or the
//! randomised RGN with EOT (semantics in `eio_reference::attack`).

use candle_core::{Result, Tensor};
use eio_spec::config::{AttackLoss, BnMode};
use eio_spec::{Path, Plan};
use rand::Rng;

use crate::distill::{project, random_start};
use crate::model::{input_gradient, logits};
use crate::ops;
use crate::state::ModelState;

/// The probability floor of the ensemble output (DVERGE clamps the mean softmax at 1e-40).
pub const ENSEMBLE_PROB_FLOOR: f64 = 1e-40;

/// One PGD run's settings (defined once, in `eio-spec`).
pub use eio_spec::attack::AttackSettings;

/// One member of an ensemble.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub plan: &'a Plan,
    pub state: &'a ModelState,
    pub path: &'a Path,
}

/// What is attacked and classified.
#[derive(Debug, Clone)]
pub enum Target<'a> {
    Path {
        plan: &'a Plan,
        state: &'a ModelState,
        path: &'a Path,
        mode: BnMode,
    },
    Ensemble(Vec<Member<'a>>),
    Randomised {
        plan: &'a Plan,
        state: &'a ModelState,
        eot: usize,
    },
}

/// The attack loss of `output` and its gradient.
pub(crate) fn loss_of(
    output: &Tensor,
    labels: &Tensor,
    loss: AttackLoss,
    kappa: f64,
) -> Result<(Tensor, Tensor)> {
    match loss {
        AttackLoss::Ce => ops::cross_entropy(output, labels),
        AttackLoss::Cw => ops::cw_loss(output, labels, kappa),
    }
}

#[allow(clippy::too_many_arguments)]
fn path_loss_grad(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    mode: BnMode,
    x: &Tensor,
    labels: &Tensor,
    loss: AttackLoss,
    kappa: f64,
) -> Result<(Tensor, Tensor)> {
    let (z, trace) = logits(plan, state, path, x, mode)?;
    let (l, g) = loss_of(&z, labels, loss, kappa)?;
    Ok((
        l,
        input_gradient(plan, state, &trace, &[(plan.logits(), g)])?,
    ))
}

impl Target<'_> {
    /// The attack loss at `x` and its gradient with respect to `x`.
    ///
    /// # Errors
    /// On a device error.
    pub fn loss_and_input_grad<R: Rng + ?Sized>(
        &self,
        x: &Tensor,
        labels: &Tensor,
        loss: AttackLoss,
        kappa: f64,
        rng: &mut R,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Target::Path {
                plan,
                state,
                path,
                mode,
            } => path_loss_grad(plan, state, path, *mode, x, labels, loss, kappa),
            Target::Ensemble(members) => {
                let mut outs = Vec::with_capacity(members.len());
                for m in members {
                    outs.push(logits(m.plan, m.state, m.path, x, BnMode::Eval)?);
                }
                let zs: Vec<Tensor> = outs.iter().map(|(z, _)| z.clone()).collect();
                let log_p = ops::log_mean_softmax(&zs, ENSEMBLE_PROB_FLOOR)?;
                let (l, g) = loss_of(&log_p, labels, loss, kappa)?;
                let member_grads = ops::log_mean_softmax_backward(&zs, ENSEMBLE_PROB_FLOOR, &g)?;
                let mut total = x.zeros_like()?;
                for ((m, (_, trace)), g) in members.iter().zip(&outs).zip(member_grads) {
                    let grad = input_gradient(m.plan, m.state, trace, &[(m.plan.logits(), g)])?;
                    total = (total + grad)?;
                }
                Ok((l, total))
            }
            Target::Randomised { plan, state, eot } => {
                let mut total_loss = x.zeros_like()?.sum_all()?;
                let mut total = x.zeros_like()?;
                for _ in 0..*eot {
                    let path = plan.path_space().sample(rng);
                    let (l, g) =
                        path_loss_grad(plan, state, &path, BnMode::Eval, x, labels, loss, kappa)?;
                    total_loss = (total_loss + l)?;
                    total = (total + g)?;
                }
                let k = *eot as f64;
                Ok(((total_loss / k)?, (total / k)?))
            }
        }
    }

    /// The predicted class of each image (first maximum; a randomised target draws one path).
    ///
    /// # Errors
    /// On a device error.
    pub fn predict<R: Rng + ?Sized>(&self, x: &Tensor, rng: &mut R) -> Result<Vec<usize>> {
        let scores = match self {
            Target::Path {
                plan,
                state,
                path,
                mode,
            } => logits(plan, state, path, x, *mode)?.0,
            Target::Ensemble(members) => {
                let mut zs = Vec::with_capacity(members.len());
                for m in members {
                    zs.push(logits(m.plan, m.state, m.path, x, BnMode::Eval)?.0);
                }
                ops::log_mean_softmax(&zs, ENSEMBLE_PROB_FLOOR)?
            }
            Target::Randomised { plan, state, .. } => {
                let path = plan.path_space().sample(rng);
                logits(plan, state, &path, x, BnMode::Eval)?.0
            }
        };
        first_argmax(&scores)
    }
}

/// Row-wise index of the first maximum, as `torch.argmax` (computed on the host so ties
/// resolve the same way on every device).
pub(crate) fn first_argmax(scores: &Tensor) -> Result<Vec<usize>> {
    let rows = scores.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
    Ok(rows
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |best, (k, &v)| {
                    if v > best.1 {
                        (k, v)
                    } else {
                        best
                    }
                })
                .0
        })
        .collect())
}

/// L-inf PGD from `x`; the model is only read (see [`pgd_train_mode`]).
///
/// # Errors
/// On a device error.
pub fn pgd<R: Rng + ?Sized>(
    target: &Target<'_>,
    x: &Tensor,
    labels: &Tensor,
    settings: &AttackSettings,
    rng: &mut R,
) -> Result<Tensor> {
    let mut adv = if settings.random_start {
        random_start(x, settings.eps, rng)?
    } else {
        x.clone()
    };
    for _ in 0..settings.steps {
        let (_, grad) =
            target.loss_and_input_grad(&adv, labels, settings.loss, settings.cw_kappa, rng)?;
        adv = project(
            &(adv + (ops::sign(&grad)? * settings.step_size)?)?,
            x,
            settings.eps,
        )?;
    }
    Ok(adv)
}

/// L-inf PGD against one path in train-mode BN, updating running statistics at every step
/// (the authors' PGD-AT term; see `eio_reference::attack::pgd_train_mode`).
///
/// # Errors
/// On a device error.
pub fn pgd_train_mode<R: Rng + ?Sized>(
    plan: &Plan,
    state: &mut ModelState,
    path: &Path,
    x: &Tensor,
    labels: &Tensor,
    settings: &AttackSettings,
    rng: &mut R,
) -> Result<Tensor> {
    let mut adv = if settings.random_start {
        random_start(x, settings.eps, rng)?
    } else {
        x.clone()
    };
    for _ in 0..settings.steps {
        let (z, trace) = logits(plan, state, path, &adv, BnMode::Train)?;
        state.commit(&trace);
        let (_, g) = loss_of(&z, labels, settings.loss, settings.cw_kappa)?;
        let grad = input_gradient(plan, state, &trace, &[(plan.logits(), g)])?;
        adv = project(
            &(adv + (ops::sign(&grad)? * settings.step_size)?)?,
            x,
            settings.eps,
        )?;
    }
    Ok(adv)
}
