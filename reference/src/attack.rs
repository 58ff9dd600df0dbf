//! L-inf PGD (Madry et al.) against one path, an ensemble, or the randomised RGN, with the
//! transfer attacks of the black-box suite (DVERGE's protocol, used by the paper's Table 1):
//! MI-FGSM momentum (Dong et al. 2018), DI²-FGSM input diversity (Xie et al. 2019) and SGM
//! (Wu et al. 2020), each optional and composable ([`AttackSettings`]; the update rule is in
//! `eio_spec::attack`'s module docs):
//!
//! ```text
//! x_0     = clamp(x + U(−ε, ε), 0, 1)   with random_start, else x
//! g_k     = T_kᵀ ∇L(T_k(x_k), y)         T_k: input_diversity of this step's draw (or identity);
//!                                        ∇ through model::backward_with (SGM) when set
//! m_k     = μ·m_{k−1} + g_k / max(‖g_k‖₁, 1e−12)   per sample, with momentum (else m_k = g_k)
//! x_{k+1} = clamp(clamp(x_k + α·sign(m_k), x − ε, x + ε), 0, 1)
//! ```
//!
//! L is the batch-mean cross-entropy, the C&W margin loss (`-relu(z_y - max_{k≠y} z_k + κ)`)
//! or DVERGE's masked C&W (`cw-dverge`, [`crate::loss::cw_dverge_loss`]), all maximised. What L
//! differentiates ([`Target`]):
//! * one path: its logits z;
//! * an ensemble: the log of the mean softmax of its members (DVERGE's ensemble output),
//!   used in place of z;
//! * the randomised RGN (a fresh path per forward, Sec. 3.4): expectation over transformation
//!   (Athalye et al. 2018), the gradient averaged over `eot` freshly sampled paths.
//!
//! With SGM every member's and every path's backward is rescaled.

use eio_spec::attack::SkipGradient;
use eio_spec::config::{AttackLoss, BnMode};
use eio_spec::{Path, Plan};
use ndarray::{Array2, Array4};
use rand::Rng;

use crate::distill::{sign, SIGN_TIE};
use crate::input_diversity::{input_diversity, input_diversity_backward};
use crate::loss::{
    cross_entropy, cw_dverge_loss, cw_loss, log_mean_softmax, log_mean_softmax_backward,
    LossAndGrad,
};
use crate::model::{backward, backward_with, logits};
use crate::momentum::l1_momentum;
use crate::state::ModelState;

/// The probability floor of the ensemble output (DVERGE clamps the mean softmax at 1e-40).
pub const ENSEMBLE_PROB_FLOOR: f64 = crate::loss::ENSEMBLE_PROB_FLOOR;

/// One PGD run's settings (defined once, in `eio-spec`).
pub use eio_spec::attack::AttackSettings;

/// One member of an ensemble: a model state and the path through it.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub plan: &'a Plan,
    pub state: &'a ModelState,
    pub path: &'a Path,
}

/// What is attacked and classified.
#[derive(Debug, Clone)]
pub enum Target<'a> {
    /// One path of an RGN (or a plain network with n = 1).
    Path {
        plan: &'a Plan,
        state: &'a ModelState,
        path: &'a Path,
        mode: BnMode,
    },
    /// An ensemble, through the log of its members' mean softmax (eval-mode BN).
    Ensemble(Vec<Member<'a>>),
    /// The whole RGN deployed with random gates: every forward draws a fresh path (Eq. 1);
    /// gradients average `eot` forwards (eval-mode BN).
    Randomised {
        plan: &'a Plan,
        state: &'a ModelState,
        eot: usize,
    },
}

fn loss_of(
    output: &Array2<f64>,
    labels: &[usize],
    loss: AttackLoss,
    kappa: f64,
) -> LossAndGrad<ndarray::Ix2> {
    match loss {
        AttackLoss::Ce => cross_entropy(output, labels),
        AttackLoss::Cw => cw_loss(output, labels, kappa),
        AttackLoss::CwDverge => cw_dverge_loss(output, labels, kappa),
    }
}

impl Target<'_> {
    /// The attack loss at `x` and its gradient with respect to `x`, through SGM's rescaled
    /// backward ([`backward_with`]) in every member and every path when `skip` is given. `rng`
    /// draws the paths of a randomised target.
    pub fn loss_and_input_grad<R: Rng + ?Sized>(
        &self,
        x: &Array4<f64>,
        labels: &[usize],
        loss: AttackLoss,
        kappa: f64,
        skip: Option<&SkipGradient>,
        rng: &mut R,
    ) -> (f64, Array4<f64>) {
        match self {
            Target::Path {
                plan,
                state,
                path,
                mode,
            } => path_loss_grad(plan, state, path, *mode, x, labels, loss, kappa, skip),
            Target::Ensemble(members) => {
                let outputs: Vec<(Array2<f64>, crate::model::Trace)> = members
                    .iter()
                    .map(|m| logits(m.plan, m.state, m.path, x, BnMode::Eval))
                    .collect();
                let member_logits: Vec<Array2<f64>> =
                    outputs.iter().map(|(z, _)| z.clone()).collect();
                let log_p = log_mean_softmax(&member_logits, ENSEMBLE_PROB_FLOOR);
                let l = loss_of(&log_p, labels, loss, kappa);
                let member_grads =
                    log_mean_softmax_backward(&member_logits, ENSEMBLE_PROB_FLOOR, &l.grad);
                let mut grad = Array4::zeros(x.raw_dim());
                for ((m, (_, trace)), g) in members.iter().zip(&outputs).zip(member_grads) {
                    let seed = [(m.plan.logits(), g.into_dyn())];
                    let grads = backward_with(m.plan, m.state, trace, &seed, skip);
                    grad += &grads.input.expect("the pass starts at the input");
                }
                (l.value, grad)
            }
            Target::Randomised { plan, state, eot } => {
                let mut total_loss = 0.0;
                let mut grad = Array4::zeros(x.raw_dim());
                for _ in 0..*eot {
                    let path = plan.path_space().sample(rng);
                    let (l, g) = path_loss_grad(
                        plan,
                        state,
                        &path,
                        BnMode::Eval,
                        x,
                        labels,
                        loss,
                        kappa,
                        skip,
                    );
                    total_loss += l;
                    grad += &g;
                }
                let k = *eot as f64;
                (total_loss / k, grad / k)
            }
        }
    }

    /// The predicted class of each image (a randomised target draws one path per call).
    pub fn predict<R: Rng + ?Sized>(&self, x: &Array4<f64>, rng: &mut R) -> Vec<usize> {
        let scores = match self {
            Target::Path {
                plan,
                state,
                path,
                mode,
            } => logits(plan, state, path, x, *mode).0,
            Target::Ensemble(members) => {
                let member_logits: Vec<Array2<f64>> = members
                    .iter()
                    .map(|m| logits(m.plan, m.state, m.path, x, BnMode::Eval).0)
                    .collect();
                log_mean_softmax(&member_logits, ENSEMBLE_PROB_FLOOR)
            }
            Target::Randomised { plan, state, .. } => {
                let path = plan.path_space().sample(rng);
                logits(plan, state, &path, x, BnMode::Eval).0
            }
        };
        scores
            .rows()
            .into_iter()
            .map(|row| {
                // The first maximal class, as torch.argmax.
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
            .collect()
    }
}

#[allow(clippy::too_many_arguments)]
fn path_loss_grad(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    mode: BnMode,
    x: &Array4<f64>,
    labels: &[usize],
    loss: AttackLoss,
    kappa: f64,
    skip: Option<&SkipGradient>,
) -> (f64, Array4<f64>) {
    let (z, trace) = logits(plan, state, path, x, mode);
    let l = loss_of(&z, labels, loss, kappa);
    let seed = [(plan.logits(), l.grad.into_dyn())];
    let grads = backward_with(plan, state, &trace, &seed, skip);
    (l.value, grads.input.expect("the pass starts at the input"))
}

/// What one attack run produced.
#[derive(Debug, Clone)]
pub struct AttackRun {
    /// The adversarial images, `[N, C, H, W]`.
    pub images: Array4<f64>,
    /// Entries whose step direction had |d| < [`SIGN_TIE`] (no or an unreliable step),
    /// summed over steps: counted, as Eq. 2's, so that engines can be compared honestly.
    pub sign_ties: usize,
}

/// The attack of `settings` from `x` with labels `labels` (the update rule of the module
/// docs). `rng` supplies, in this order: the random start (from
/// `eio_spec::rng::Stream::AttackStart` or the black-box suite's stream), then at every step
/// the input-diversity draw (`InputDiversity::draw` with side = the image width) when set,
/// then a randomised target's EOT paths. The model is only read: a train-mode target uses
/// batch statistics without updating the running ones (see [`pgd_train_mode`] for the variant
/// that updates them).
///
/// # Panics
/// If `x` does not fit the target's plan, or an input-diversity draw does not fit the image
/// (the width is used as the side, so images must be square).
pub fn pgd_run<R: Rng + ?Sized>(
    target: &Target<'_>,
    x: &Array4<f64>,
    labels: &[usize],
    settings: &AttackSettings,
    rng: &mut R,
) -> AttackRun {
    let eps = settings.eps;
    let side = x.dim().3;
    let mut adv = start(x, eps, settings.random_start, rng);
    let mut momentum: Option<Array4<f64>> = None;
    let mut sign_ties = 0;
    for _ in 0..settings.steps {
        let transform = settings
            .input_diversity
            .and_then(|di| di.draw(side, rng).map(|draw| (draw, di.interpolation)));
        let transformed =
            transform.map(|(draw, interpolation)| input_diversity(&adv, &draw, interpolation));
        let (_, g) = target.loss_and_input_grad(
            transformed.as_ref().unwrap_or(&adv),
            labels,
            settings.loss,
            settings.cw_kappa,
            settings.skip_gradient.as_ref(),
            rng,
        );
        let grad = match transform {
            Some((draw, interpolation)) => input_diversity_backward(&g, &draw, interpolation),
            None => g,
        };
        let direction = match settings.momentum {
            Some(decay) => {
                let m = l1_momentum(momentum.as_ref(), &grad, decay);
                momentum = Some(m.clone());
                m
            }
            None => grad,
        };
        sign_ties += direction.iter().filter(|d| d.abs() < SIGN_TIE).count();
        adv = step(&adv, &direction, x, settings.step_size, eps);
    }
    AttackRun {
        images: adv,
        sign_ties,
    }
}

/// L-inf PGD from `x` with labels `labels`: the images of [`pgd_run`] (plain PGD when
/// `settings` sets no momentum, input diversity or SGM).
pub fn pgd<R: Rng + ?Sized>(
    target: &Target<'_>,
    x: &Array4<f64>,
    labels: &[usize],
    settings: &AttackSettings,
    rng: &mut R,
) -> Array4<f64> {
    pgd_run(target, x, labels, settings, rng).images
}

/// L-inf PGD against one path with train-mode BN that, like a PyTorch attack run on a model
/// left in `train()` mode, updates the running statistics at every step (the authors' PGD-AT
/// term, `gen_adv_iFGSM`, runs this way inside the EIO iteration). Always plain PGD: the
/// momentum, input-diversity and SGM settings are not read.
pub fn pgd_train_mode<R: Rng + ?Sized>(
    plan: &Plan,
    state: &mut ModelState,
    path: &Path,
    x: &Array4<f64>,
    labels: &[usize],
    settings: &AttackSettings,
    rng: &mut R,
) -> Array4<f64> {
    let eps = settings.eps;
    let mut adv = start(x, eps, settings.random_start, rng);
    for _ in 0..settings.steps {
        let (z, trace) = logits(plan, state, path, &adv, BnMode::Train);
        state.commit(&trace);
        let l = loss_of(&z, labels, settings.loss, settings.cw_kappa);
        let grad = backward(plan, state, &trace, &[(plan.logits(), l.grad.into_dyn())])
            .input
            .expect("the pass starts at the input");
        adv = step(&adv, &grad, x, settings.step_size, eps);
    }
    adv
}

/// One projected sign step: clamp(clamp(a + α·sign(g), x − ε, x + ε), 0, 1).
pub(crate) fn step(
    adv: &Array4<f64>,
    grad: &Array4<f64>,
    x: &Array4<f64>,
    alpha: f64,
    eps: f64,
) -> Array4<f64> {
    ndarray::Zip::from(adv)
        .and(grad)
        .and(x)
        .map_collect(|&a, &g, &orig| {
            (a + alpha * sign(g))
                .clamp(orig - eps, orig + eps)
                .clamp(0.0, 1.0)
        })
}

/// The PGD start: clamp(x + U(−ε, ε), 0, 1), or x itself.
pub(crate) fn start<R: Rng + ?Sized>(
    x: &Array4<f64>,
    eps: f64,
    random: bool,
    rng: &mut R,
) -> Array4<f64> {
    if random {
        let noise = eio_spec::rng::uniform_start(x.len(), eps, rng);
        let noise = Array4::from_shape_vec(x.raw_dim(), noise).expect("one draw per element");
        (x + &noise).mapv(|v| v.clamp(0.0, 1.0))
    } else {
        x.clone()
    }
}
