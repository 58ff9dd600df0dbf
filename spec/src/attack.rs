//! What an L-inf attack is, and how the white-box protocol of Sec. 4.1 names and seeds its
//! adversarial versions. Both engines run attacks from these values.
//!
//! An attack is PGD (Madry et al.) with three optional, composable parts, each with its paper:
//!
//! ```text
//! x_0     = clamp(x + U(−ε, ε), 0, 1)  with random_start, else x
//! g_k     = ∇_x L(T_k(x_k), y)                      T_k: input diversity (identity if off)
//!                                                   ∇ through the model with SGM's scaling
//! m_k     = μ·m_{k−1} + g_k / max(‖g_k‖₁, 1e−12)    per sample, with momentum (else m_k = g_k)
//! x_{k+1} = clamp(clamp(x_k + α·sign(m_k), x − ε, x + ε), 0, 1)
//! ```
//!
//! * [`AttackSettings::momentum`]: MI-FGSM (Dong et al. 2018), decay μ (1.0 in Dong et al.,
//!   advertorch and torchattacks); the per-sample L1 normalisation is the one of Eq. 2's
//!   distillation momentum (DVERGE), floored at 1e-12.
//! * [`AttackSettings::input_diversity`]: DI²-FGSM (Xie et al. 2019); with momentum it is
//!   M-DI²-FGSM. At every step, with probability p, the batch is resized to a random size and
//!   zero-padded back at a random offset ([`InputDiversity::draw`]); the gradient flows through
//!   the transform. Draw order within a step: the transform's draw, then a randomised target's
//!   EOT paths.
//! * [`AttackSettings::skip_gradient`]: SGM (Wu et al. 2020) for ResNets: in the backward pass
//!   the gradient into every residual (conv) branch is multiplied by γ, the skip path keeps 1
//!   ([`SkipGradient`], [`crate::plan::Plan::residual_blocks`]).
//!
//! Versions: for each ε of `eval.eps` (index e), each loss of `eval.losses` (index k) and each
//! restart r < `eval.restarts`, one version named `pgd-<loss>-r<restart>`. Its random start
//! comes from [`crate::rng::Stream::AttackStart`] split [`stream_index`]`(e, k, r)` =
//! e·2^32 + k·2^16 + r, so adding an ε never changes another ε's starts.

use std::ops::Range;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::{AttackLoss, EvalConfig, TrainPgdConfig};

/// One attack run (see the module docs for the update rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackSettings {
    /// L-inf radius, in [0, 1] pixel units.
    pub eps: f64,
    /// Step size α.
    pub step_size: f64,
    /// Number of steps.
    pub steps: usize,
    /// Start uniformly in the eps ball instead of at x.
    pub random_start: bool,
    /// The maximised loss.
    pub loss: AttackLoss,
    /// κ of the C&W losses.
    pub cw_kappa: f64,
    /// MI-FGSM momentum decay μ; `None` is plain PGD (sign of the raw gradient).
    pub momentum: Option<f64>,
    /// DI²-FGSM's input transform; `None` is none.
    pub input_diversity: Option<InputDiversity>,
    /// SGM's gradient scaling through residual branches; `None` is the plain gradient.
    pub skip_gradient: Option<SkipGradient>,
}

impl AttackSettings {
    /// The white-box attack of `eval` at radius `eps` with `loss` (step ε · step_fraction).
    pub fn white_box(eval: &EvalConfig, eps: f64, loss: AttackLoss) -> Self {
        AttackSettings {
            eps,
            step_size: eps * eval.step_fraction,
            steps: eval.steps,
            random_start: eval.random_start,
            loss,
            cw_kappa: eval.cw_kappa,
            momentum: None,
            input_diversity: None,
            skip_gradient: None,
        }
    }

    /// The PGD adversarial-training attack of `adv` (cross-entropy).
    pub fn training(adv: &TrainPgdConfig, cw_kappa: f64) -> Self {
        AttackSettings {
            eps: adv.eps,
            step_size: adv.step_size,
            steps: adv.steps,
            random_start: adv.random_start,
            loss: AttackLoss::Ce,
            cw_kappa,
            momentum: None,
            input_diversity: None,
            skip_gradient: None,
        }
    }
}

/// Per-sample L1 floor of the momentum normalisation (as Eq. 2's distillation momentum).
pub const MOMENTUM_L1_FLOOR: f64 = 1e-12;

/// How DI²-FGSM resizes (rivals.md: torchattacks uses bilinear, `align_corners = False`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interpolation {
    /// Bilinear, PyTorch's `F.interpolate(mode="bilinear", align_corners=False)`: source
    /// coordinate (i + 0.5)·in/out − 0.5, clamped below at 0; the neighbour index clamped to
    /// the last row/column.
    Bilinear,
    /// Nearest, PyTorch's `F.interpolate(mode="nearest")`: source index
    /// min(floor(i · f32(in/out)), in − 1), computed in f32 as PyTorch does (a few size pairs
    /// differ from the exact floor(i·in/out); none at sides 28 and 32 with the default sizes).
    Nearest,
}

/// Input diversity (Xie et al. 2019), as torchattacks implements it for a square input of
/// side S: a size s uniform in [floor(S·resize_rate), S) (28..=31 for S = 32 at 0.9), a resize
/// of the whole batch to s x s, then zero padding back to S x S with the top offset uniform in
/// [0, S − s) and the left offset likewise (one draw for the whole batch); applied with
/// probability `probability` at every step, else the batch is used as is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InputDiversity {
    /// Probability of transforming at a step. Default 0.5 (M-DI²-FGSM's p).
    pub probability: f64,
    /// The smallest size as a fraction of the input side. Default 0.9 (torchattacks).
    pub resize_rate: f64,
    /// Default bilinear.
    pub interpolation: Interpolation,
}

impl Default for InputDiversity {
    fn default() -> Self {
        InputDiversity {
            probability: 0.5,
            resize_rate: 0.9,
            interpolation: Interpolation::Bilinear,
        }
    }
}

/// One draw of the input-diversity transform for a batch: resize to `size` x `size`, then pad
/// with `top` rows above and `left` columns to the left (the rest below and to the right).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiversityDraw {
    pub size: usize,
    pub top: usize,
    pub left: usize,
}

impl InputDiversity {
    /// The sizes a draw can take for input side `side`: [floor(side·rate), side), never empty
    /// (at least `side − 1`).
    pub fn sizes(&self, side: usize) -> Range<usize> {
        let low = ((side as f64 * self.resize_rate).floor() as usize).min(side.saturating_sub(1));
        low.max(1)..side
    }

    /// The transform of one step: `None` (identity) with probability 1 − p, else a size and
    /// offsets. Draws, in order: one uniform f64 in [0, 1) (applied if below p), then the size,
    /// the top and the left offset (only when applied).
    pub fn draw<R: Rng + ?Sized>(&self, side: usize, rng: &mut R) -> Option<DiversityDraw> {
        let u: f64 = rng.random();
        if u >= self.probability {
            return None;
        }
        let size = rng.random_range(self.sizes(side));
        let slack = side - size;
        let top = rng.random_range(0..slack);
        let left = rng.random_range(0..slack);
        Some(DiversityDraw { size, top, left })
    }
}

/// SGM, the skip-gradient method (Wu et al. 2020): in the backward pass through a ResNet, the
/// gradient entering every residual block's conv branch is multiplied by `gamma` and the skip
/// path keeps it whole.
///
/// At each residual add y = r + s ([`crate::plan::Plan::residual_blocks`]) with upstream
/// gradient g: with `normalise`, first g ← g / std(g) (the unbiased standard deviation over all
/// elements of the batch's tensor, `torch.std`; SGM's optional per-block normalisation); then
/// dL/dr = γ·g (γ = 1 for a block excluded by `exclude_stage_first`) and dL/ds = g.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SkipGradient {
    /// Default 0.2 (SGM's ResNet setting, DVERGE's `sgm_0.2`).
    pub gamma: f64,
    /// Divide the gradient at each block output by its standard deviation. Default false.
    pub normalise: bool,
    /// Keep γ = 1 in the first block of every stage, as SGM's code does (it skips modules named
    /// `*.0.relu`). Default false: every residual branch is scaled.
    pub exclude_stage_first: bool,
}

impl Default for SkipGradient {
    fn default() -> Self {
        SkipGradient {
            gamma: 0.2,
            normalise: false,
            exclude_stage_first: false,
        }
    }
}

impl SkipGradient {
    /// The factor on the residual branch of `block`.
    pub fn branch_factor(&self, block: &crate::plan::ResidualBlock) -> f64 {
        if self.exclude_stage_first && block.first_in_stage {
            1.0
        } else {
            self.gamma
        }
    }
}

/// The name of one white-box adversarial version: `pgd-<loss>-r<restart>`.
pub fn version_name(loss: AttackLoss, restart: usize) -> String {
    format!("pgd-{}-r{restart}", loss.name())
}

/// Every version the white-box protocol of `eval` produces at one ε, in attack order.
pub fn white_box_versions(eval: &EvalConfig) -> Vec<String> {
    eval.losses
        .iter()
        .flat_map(|&loss| (0..eval.restarts).map(move |r| version_name(loss, r)))
        .collect()
}

/// The stream split of the attack at ε index `eps_index`, loss index `loss_index`, restart
/// `restart`.
pub fn stream_index(eps_index: usize, loss_index: usize, restart: usize) -> u64 {
    ((eps_index as u64) << 32) | ((loss_index as u64) << 16) | restart as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_stream_indices_are_distinct() {
        let eval = EvalConfig {
            losses: vec![AttackLoss::Ce, AttackLoss::Cw],
            restarts: 3,
            ..EvalConfig::default()
        };
        assert_eq!(
            white_box_versions(&eval),
            [
                "pgd-ce-r0",
                "pgd-ce-r1",
                "pgd-ce-r2",
                "pgd-cw-r0",
                "pgd-cw-r1",
                "pgd-cw-r2"
            ]
        );
        let mut seen = std::collections::HashSet::new();
        for e in 0..7 {
            for k in 0..2 {
                for r in 0..5 {
                    assert!(seen.insert(stream_index(e, k, r)));
                }
            }
        }
        let s = AttackSettings::white_box(&eval, 0.03, AttackLoss::Cw);
        assert!((s.step_size - 0.006).abs() < 1e-15);
        assert_eq!((s.steps, s.loss), (50, AttackLoss::Cw));
    }

    #[test]
    fn diversity_draws_stay_in_torchattacks_ranges() {
        use rand::SeedableRng;
        let di = InputDiversity::default();
        assert_eq!(di.sizes(32), 28..32);
        assert_eq!(di.sizes(28), 25..28);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut applied = 0;
        let mut sizes = std::collections::BTreeSet::new();
        for _ in 0..4000 {
            if let Some(d) = di.draw(32, &mut rng) {
                applied += 1;
                assert!((28..32).contains(&d.size), "{d:?}");
                assert!(d.top < 32 - d.size && d.left < 32 - d.size, "{d:?}");
                sizes.insert(d.size);
            }
        }
        assert_eq!(sizes.into_iter().collect::<Vec<_>>(), [28, 29, 30, 31]);
        // Binomial(4000, 0.5): 2000 ± 4.5 sd.
        assert!(
            (1860..=2140).contains(&applied),
            "{applied} of 4000 applied"
        );
        let never = InputDiversity {
            probability: 0.0,
            ..di
        };
        assert!((0..100).all(|_| never.draw(32, &mut rng).is_none()));
    }
}
