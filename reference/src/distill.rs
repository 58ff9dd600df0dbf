//! Eq. 2: distilling the non-robust features of one path.
//!
//! ```text
//! x'_{P,l}(x_t, x_s) = argmin_z ‖f^l_P(z) − f^l_P(x_t)‖²   s.t.  ‖z − x_s‖_∞ ≤ ε_d,  z ∈ [0, 1]
//! ```
//!
//! approximated, as in DVERGE, by projected sign-gradient descent (`eio_spec::config::DistillConfig`
//! holds every switch):
//!
//! ```text
//! z_0     = clamp(x_s + U(−ε_d, ε_d), 0, 1)   with random_start, else x_s
//! g_k     = ∇_z MSE(f^l_P(z_k), f^l_P(x_t))            (mean over all feature elements)
//! m_k     = μ·m_{k−1} + g_k / max(‖g_k‖₁, 1e−12)        (per sample; with momentum, else m_k = g_k;
//!                                                      crate::momentum::l1_momentum)
//! z_{k+1} = clamp(clamp(z_k − α·sign(m_k), x_s − ε_d, x_s + ε_d), 0, 1)
//! ```
//!
//! with α = ε_d · step_fraction. In each step the source batch's forward runs before the
//! target's (DVERGE and the authors' code recompute f^l_P(x_t) every step); in train-mode BN
//! both forwards use batch statistics and each updates the running statistics of the BNs it
//! reaches, in that order. The feature is read where `distill.feature` and
//! `distill.first_layer_before_relu` say ([`Plan::feature_node`]).

use eio_spec::config::DistillConfig;
use eio_spec::{Path, Plan};
use ndarray::Array4;
use rand::Rng;

use crate::loss::mse_loss;
use crate::model::{backward, forward};
use crate::momentum::l1_momentum;
use crate::state::ModelState;

/// Gradient entries with |g| below this count as sign ties (sign(0) = 0 in PyTorch, and an
/// f32 engine may round a tiny gradient to either side).
pub const SIGN_TIE: f64 = 1e-12;

/// What a distillation produced.
#[derive(Debug, Clone)]
pub struct Distilled {
    /// x', `[N, C, H, W]`.
    pub images: Array4<f64>,
    /// The feature-matching loss before each step.
    pub losses: Vec<f64>,
    /// Entries whose step direction had |m| < [`SIGN_TIE`], summed over steps.
    pub sign_ties: usize,
}

/// Eq. 2 for path `path` at distillation layer `layer` (1-based), moving `x_s` towards the
/// layer-`layer` features of `x_t`. `rng` supplies the random start (from
/// `eio_spec::rng::Stream::DistillStart`). With `distill.bn_mode = "train"` the running
/// statistics in `state` are updated, as PyTorch would.
///
/// # Panics
/// If the batches differ in shape or do not fit the plan.
#[allow(clippy::too_many_arguments)] // the arguments of x'_{P,l}(x_t, x_s), plus the model, settings and rng
pub fn eq2_distill<R: Rng + ?Sized>(
    plan: &Plan,
    state: &mut ModelState,
    path: &Path,
    layer: usize,
    x_t: &Array4<f64>,
    x_s: &Array4<f64>,
    config: &DistillConfig,
    rng: &mut R,
) -> Distilled {
    assert_eq!(
        x_t.dim(),
        x_s.dim(),
        "target and source batches differ in shape"
    );
    let eps = config.eps;
    let alpha = config.step_size();
    let feature = plan.feature_node(layer, config.feature, config.first_layer_before_relu);
    let mut z = if config.random_start {
        let noise = eio_spec::rng::uniform_start(x_s.len(), eps, rng);
        let noise = Array4::from_shape_vec(x_s.raw_dim(), noise).expect("one draw per element");
        (x_s + &noise).mapv(|v| v.clamp(0.0, 1.0))
    } else {
        x_s.clone()
    };
    let mut momentum: Option<Array4<f64>> = None;
    let mut losses = Vec::with_capacity(config.steps);
    let mut sign_ties = 0;
    for _ in 0..config.steps {
        let source = forward(plan, state, path, &z, config.bn_mode, feature);
        state.commit(&source);
        let target = forward(plan, state, path, x_t, config.bn_mode, feature);
        state.commit(&target);
        let loss = mse_loss(source.output(feature), target.output(feature));
        losses.push(loss.value);
        let grad = backward(plan, state, &source, &[(feature, loss.grad)])
            .input
            .expect("the pass starts at the input");
        let direction = if config.momentum {
            let m = l1_momentum(momentum.as_ref(), &grad, config.momentum_decay);
            momentum = Some(m.clone());
            m
        } else {
            grad
        };
        sign_ties += direction.iter().filter(|g| g.abs() < SIGN_TIE).count();
        z = ndarray::Zip::from(&z)
            .and(&direction)
            .and(x_s)
            .map_collect(|&zi, &d, &s| {
                let stepped = zi - alpha * sign(d);
                stepped.clamp(s - eps, s + eps).clamp(0.0, 1.0)
            });
    }
    Distilled {
        images: z,
        losses,
        sign_ties,
    }
}

/// sign(x) with sign(0) = 0, as `torch.sign`.
pub(crate) fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}
