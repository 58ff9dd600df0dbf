//! L-inf attacks on the device against one path, an ensemble (log of the mean softmax) or the
//! randomised RGN with EOT (semantics in `eio_reference::attack`): PGD (Madry et al.) and its
//! transfer variants, each a switch of [`AttackSettings`] (update rule in
//! `eio_spec::attack`):
//!
//! * momentum, MI-FGSM (Dong et al. 2018, "Boosting Adversarial Attacks with Momentum"):
//!   the sign of m_k = μ·m_{k−1} + g_k / ‖g_k‖₁ per sample ([`ops::l1_momentum`]);
//! * input diversity, DI²-FGSM (Xie et al. 2019, "Improving Transferability of Adversarial
//!   Examples with Input Diversity"), M-DI²-FGSM with momentum: the gradient at T(x_k) for a
//!   random resize-and-pad T, mapped back through T's adjoint ([`ops::input_diversity`]);
//! * SGM (Wu et al. 2020, "Skip Connections Matter"): the backward pass scales every residual
//!   branch's gradient by γ ([`crate::model::input_gradient_with`]).

use candle_core::{DType, Result, Tensor};
use eio_spec::attack::SkipGradient;
use eio_spec::config::{AttackLoss, BnMode};
use eio_spec::{Path, Plan};
use rand::Rng;

use crate::distill::{project, random_start, SIGN_TIE};
use crate::model::{eval_logits, forward_groups, input_gradient, input_gradient_with, logits};
use crate::ops;
use crate::path_batching::PathBatching;
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
        AttackLoss::CwDverge => ops::cw_dverge_loss(output, labels, kappa),
    }
}

/// What the attack loss differentiates and how: the loss, its κ and SGM's scaling.
#[derive(Debug, Clone, Copy)]
struct Objective<'a> {
    loss: AttackLoss,
    kappa: f64,
    skip: Option<&'a SkipGradient>,
}

fn path_loss_grad(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    mode: BnMode,
    x: &Tensor,
    labels: &Tensor,
    objective: Objective<'_>,
) -> Result<(Tensor, Tensor)> {
    let (z, trace) = logits(plan, state, path, x, mode)?;
    let (l, g) = loss_of(&z, labels, objective.loss, objective.kappa)?;
    Ok((
        l,
        input_gradient_with(plan, state, &trace, &[(plan.logits(), g)], objective.skip)?,
    ))
}

/// An ensemble's output log(mean softmax) at `x`, the loss `loss_grad` gives there with its
/// gradient at that output, and the loss's gradient with respect to `x` (each member's
/// back-propagated with SGM's scaling when `skip` is set, summed in member order).
fn ensemble_loss_grad<L>(
    members: &[Member<'_>],
    x: &Tensor,
    skip: Option<&SkipGradient>,
    loss_grad: impl FnOnce(&Tensor) -> Result<(L, Tensor)>,
) -> Result<(L, Tensor)> {
    let mut outs = Vec::with_capacity(members.len());
    for m in members {
        outs.push(logits(m.plan, m.state, m.path, x, BnMode::Eval)?);
    }
    let zs: Vec<Tensor> = outs.iter().map(|(z, _)| z.clone()).collect();
    let log_p = ops::log_mean_softmax(&zs, ENSEMBLE_PROB_FLOOR)?;
    let (l, g) = loss_grad(&log_p)?;
    let member_grads = ops::log_mean_softmax_backward(&zs, ENSEMBLE_PROB_FLOOR, &g)?;
    let mut total = x.zeros_like()?;
    for ((m, (_, trace)), g) in members.iter().zip(&outs).zip(member_grads) {
        let grad = input_gradient_with(m.plan, m.state, trace, &[(m.plan.logits(), g)], skip)?;
        total = (total + grad)?;
    }
    Ok((l, total))
}

impl<'a> Target<'a> {
    /// The target of a list of members on their fixed paths: one member alone (eval-mode BN),
    /// several as an ensemble through the mean softmax.
    pub fn of_members(members: Vec<Member<'a>>) -> Target<'a> {
        match members.as_slice() {
            [one] => Target::Path {
                plan: one.plan,
                state: one.state,
                path: one.path,
                mode: BnMode::Eval,
            },
            _ => Target::Ensemble(members),
        }
    }
}

impl Target<'_> {
    /// The attack loss at `x` and its gradient with respect to `x`, back-propagated with SGM's
    /// scaling when `skip` is set (`eio_reference::attack::Target::loss_and_input_grad`).
    /// `rng` draws the paths of a randomised target.
    ///
    /// # Errors
    /// On a device error.
    pub fn loss_and_input_grad<R: Rng + ?Sized>(
        &self,
        x: &Tensor,
        labels: &Tensor,
        loss: AttackLoss,
        kappa: f64,
        skip: Option<&SkipGradient>,
        rng: &mut R,
    ) -> Result<(Tensor, Tensor)> {
        let objective = Objective { loss, kappa, skip };
        match self {
            Target::Path {
                plan,
                state,
                path,
                mode,
            } => path_loss_grad(plan, state, path, *mode, x, labels, objective),
            Target::Ensemble(members) => ensemble_loss_grad(members, x, skip, |log_p| {
                loss_of(log_p, labels, loss, kappa)
            }),
            Target::Randomised { plan, state, eot } => {
                let mut total_loss = x.zeros_like()?.sum_all()?;
                let mut total = x.zeros_like()?;
                for _ in 0..*eot {
                    let path = plan.path_space().sample(rng);
                    let (l, g) =
                        path_loss_grad(plan, state, &path, BnMode::Eval, x, labels, objective)?;
                    total_loss = (total_loss + l)?;
                    total = (total + g)?;
                }
                let k = *eot as f64;
                Ok(((total_loss / k)?, (total / k)?))
            }
        }
    }

    /// Whether every image's output and gradient depend on that image alone (eval-mode
    /// BatchNorm), so that a batch of several groups gives each group its own values.
    fn per_image(&self) -> bool {
        !matches!(
            self,
            Target::Path {
                mode: BnMode::Train,
                ..
            }
        )
    }

    /// [`Target::loss_and_input_grad`]'s gradient for each group of a batch of one group of
    /// images per version (`labels`: one group's), with group g's objective and, for a
    /// randomised target, its EOT paths drawn from `versions[g]`'s stream: each group's rows
    /// are the gradient its own call gives. Only for a [`Target::per_image`] target.
    fn grouped_input_grad<R: Rng>(
        &self,
        x: &Tensor,
        labels: &Tensor,
        objectives: &[Objective<'_>],
        versions: &mut [(AttackSettings, R)],
    ) -> Result<Tensor> {
        // Each group's loss gradient at its rows of `output`.
        let seed = |output: &Tensor| -> Result<Tensor> {
            let n = labels.dim(0)?;
            let grads = objectives
                .iter()
                .enumerate()
                .map(|(g, o)| Ok(loss_of(&output.narrow(0, g * n, n)?, labels, o.loss, o.kappa)?.1))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&grads, 0)
        };
        match self {
            Target::Path {
                plan, state, path, ..
            } => {
                let (z, trace) = logits(plan, state, path, x, BnMode::Eval)?;
                input_gradient(plan, state, &trace, &[(plan.logits(), seed(&z)?)])
            }
            Target::Ensemble(members) => {
                Ok(ensemble_loss_grad(members, x, None, |log_p| Ok(((), seed(log_p)?)))?.1)
            }
            Target::Randomised { plan, state, eot } => {
                let mut total = x.zeros_like()?;
                for _ in 0..*eot {
                    let paths: Vec<Path> = versions
                        .iter_mut()
                        .map(|(_, rng)| plan.path_space().sample(rng))
                        .collect();
                    let trace =
                        forward_groups(plan, state, &paths, x, BnMode::Eval, plan.logits())?;
                    let g = seed(trace.last())?;
                    total = (total + input_gradient(plan, state, &trace, &[(plan.logits(), g)])?)?;
                }
                total / *eot as f64
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
                mode: BnMode::Eval,
            } => eval_logits(plan, state, path, x)?,
            Target::Path {
                plan,
                state,
                path,
                mode,
            } => logits(plan, state, path, x, *mode)?.0,
            Target::Ensemble(members) => {
                let mut zs = Vec::with_capacity(members.len());
                for m in members {
                    zs.push(eval_logits(m.plan, m.state, m.path, x)?);
                }
                ops::log_mean_softmax(&zs, ENSEMBLE_PROB_FLOOR)?
            }
            Target::Randomised { plan, state, .. } => {
                let path = plan.path_space().sample(rng);
                eval_logits(plan, state, &path, x)?
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

/// What an attack run produced.
#[derive(Debug, Clone)]
pub struct AttackRun {
    /// The adversarial images, `[N, C, H, W]`.
    pub images: Tensor,
    /// Entries whose step direction had |d| < [`SIGN_TIE`], summed over steps (their sign is
    /// not resolved by the arithmetic: another engine may step them differently).
    pub sign_ties: usize,
}

/// The attack of `settings` from `x` (`eio_reference::attack::pgd_run`); the model is only
/// read (see [`pgd_train_mode`]). `rng` supplies, in order: the random start
/// (`eio_spec::rng::uniform_start`), then at every step the input-diversity draw
/// ([`eio_spec::attack::InputDiversity::draw`] with the image width as the side, so images
/// must be square) and a randomised target's EOT paths. Each step:
///
/// ```text
/// g_k     = Tᵀ ∇L(T(x_k))          T: the step's input diversity (identity if none drawn),
///                                  ∇ with SGM's scaling when set
/// d_k     = l1_momentum(d_{k−1}, g_k, μ)  with momentum μ, else g_k
/// x_{k+1} = clamp(clamp(x_k + α·sign(d_k), x − ε, x + ε), 0, 1)
/// ```
///
/// # Errors
/// On a device error, or an input-diversity draw that does not fit the images.
pub fn pgd_run<R: Rng + ?Sized>(
    target: &Target<'_>,
    x: &Tensor,
    labels: &Tensor,
    settings: &AttackSettings,
    rng: &mut R,
) -> Result<AttackRun> {
    let mut adv = if settings.random_start {
        random_start(x, settings.eps, rng)?
    } else {
        x.clone()
    };
    let side = x.dim(3)?;
    let skip = settings.skip_gradient.as_ref();
    let mut momentum: Option<Tensor> = None;
    let mut sign_ties = Tensor::zeros((), DType::F64, x.device())?;
    for _ in 0..settings.steps {
        let diversity = settings
            .input_diversity
            .and_then(|di| di.draw(side, rng).map(|draw| (draw, di.interpolation)));
        let input = match &diversity {
            Some((draw, interpolation)) => ops::input_diversity(&adv, draw, *interpolation)?,
            None => adv.clone(),
        };
        let (_, grad) = target.loss_and_input_grad(
            &input,
            labels,
            settings.loss,
            settings.cw_kappa,
            skip,
            rng,
        )?;
        let grad = match &diversity {
            Some((draw, interpolation)) => {
                ops::input_diversity_backward(&grad, draw, *interpolation)?
            }
            None => grad,
        };
        let direction = match settings.momentum {
            Some(decay) => {
                let m = ops::l1_momentum(momentum.as_ref(), &grad, decay)?;
                momentum = Some(m.clone());
                m
            }
            None => grad,
        };
        sign_ties = (sign_ties + ops::count_below(&direction, SIGN_TIE)?)?;
        adv = project(
            &(adv + (ops::sign(&direction)? * settings.step_size)?)?,
            x,
            settings.eps,
        )?;
    }
    Ok(AttackRun {
        images: adv,
        sign_ties: sign_ties.to_scalar::<f64>()? as usize,
    })
}

/// The attacks of `versions` (each its settings and its own random stream) from `x`: the runs
/// of [`pgd_run`] for each version in turn, with the same results, each handed to `each` with
/// the version's index. [`PathBatching::Batched`] runs them in lock-step, one group of images
/// per version (the restarts, losses and radii of an evaluation in one pass per step; a
/// randomised target's EOT paths drawn per group, [`crate::model::forward_groups`]), wherever
/// that gives the same bits: plain or momentum PGD with one number of steps and one momentum
/// against an eval-mode target. Otherwise they run one after the other, each run handed over
/// as soon as it is done, so that only one version's images are held at a time.
///
/// # Errors
/// As [`pgd_run`], or the first error of `each`.
pub fn pgd_versions<R: Rng, E: From<candle_core::Error>>(
    target: &Target<'_>,
    (x, labels): (&Tensor, &Tensor),
    versions: &mut [(AttackSettings, R)],
    batching: PathBatching,
    mut each: impl FnMut(usize, AttackRun) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let lock_step = batching == PathBatching::Batched
        && versions.len() > 1
        && target.per_image()
        && versions.iter().all(|(s, _)| {
            s.steps == versions[0].0.steps
                && s.momentum == versions[0].0.momentum
                && s.input_diversity.is_none()
                && s.skip_gradient.is_none()
        });
    if lock_step {
        for (v, run) in pgd_lock_step(target, x, labels, versions)?
            .into_iter()
            .enumerate()
        {
            each(v, run)?;
        }
    } else {
        for (v, (settings, rng)) in versions.iter_mut().enumerate() {
            each(v, pgd_run(target, x, labels, settings, rng)?)?;
        }
    }
    Ok(())
}

/// The lock-step runs of [`pgd_versions`].
fn pgd_lock_step<R: Rng>(
    target: &Target<'_>,
    x: &Tensor,
    labels: &Tensor,
    versions: &mut [(AttackSettings, R)],
) -> Result<Vec<AttackRun>> {
    let (groups, n) = (versions.len(), x.dim(0)?);
    // Per image of the batch: its version's ε and step size.
    let per_image = |value: fn(&AttackSettings) -> f64| {
        let values: Vec<f64> = versions
            .iter()
            .flat_map(|(s, _)| std::iter::repeat_n(value(s), n))
            .collect();
        Tensor::from_vec(values, (groups * n, 1, 1, 1), x.device())?.to_dtype(x.dtype())
    };
    let (eps, step) = (per_image(|s| s.eps)?, per_image(|s| s.step_size)?);
    let xs = Tensor::cat(&vec![x; groups], 0)?;
    let (upper, lower) = (xs.broadcast_add(&eps)?, xs.broadcast_sub(&eps)?);
    let starts = versions
        .iter_mut()
        .map(|(s, rng)| match s.random_start {
            true => random_start(x, s.eps, rng),
            false => Ok(x.clone()),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut adv = Tensor::cat(&starts, 0)?;
    let objectives: Vec<Objective> = versions
        .iter()
        .map(|(s, _)| Objective {
            loss: s.loss,
            kappa: s.cw_kappa,
            skip: None,
        })
        .collect();
    let mut momentum: Option<Tensor> = None;
    let mut sign_ties = vec![Tensor::zeros((), DType::F64, x.device())?; groups];
    for _ in 0..versions[0].0.steps {
        let grad = target.grouped_input_grad(&adv, labels, &objectives, versions)?;
        let direction = match versions[0].0.momentum {
            Some(decay) => {
                let m = ops::l1_momentum(momentum.as_ref(), &grad, decay)?;
                momentum = Some(m.clone());
                m
            }
            None => grad,
        };
        for (g, ties) in sign_ties.iter_mut().enumerate() {
            *ties = (&*ties + ops::count_below(&direction.narrow(0, g * n, n)?, SIGN_TIE)?)?;
        }
        adv = (adv + ops::sign(&direction)?.broadcast_mul(&step)?)?
            .minimum(&upper)?
            .maximum(&lower)?
            .clamp(0.0, 1.0)?;
    }
    sign_ties
        .into_iter()
        .enumerate()
        .map(|(g, ties)| {
            Ok(AttackRun {
                images: adv.narrow(0, g * n, n)?,
                sign_ties: ties.to_scalar::<f64>()? as usize,
            })
        })
        .collect()
}

/// The adversarial images of [`pgd_run`].
///
/// # Errors
/// As [`pgd_run`].
pub fn pgd<R: Rng + ?Sized>(
    target: &Target<'_>,
    x: &Tensor,
    labels: &Tensor,
    settings: &AttackSettings,
    rng: &mut R,
) -> Result<Tensor> {
    Ok(pgd_run(target, x, labels, settings, rng)?.images)
}

/// L-inf PGD against one path in train-mode BN, updating running statistics at every step
/// (the authors' PGD-AT term; see `eio_reference::attack::pgd_train_mode`). Always plain PGD:
/// the momentum, input-diversity and SGM settings are not read.
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
