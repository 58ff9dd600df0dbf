//! What an L-inf PGD attack is, and how the white-box protocol of Sec. 4.1 names and seeds
//! its adversarial versions. Both engines run attacks from these values.
//!
//! Versions: for each ε of `eval.eps` (index e), each loss of `eval.losses` (index k) and each
//! restart r < `eval.restarts`, one version named `pgd-<loss>-r<restart>`. Its random start
//! comes from [`crate::rng::Stream::AttackStart`] split [`stream_index`]`(e, k, r)` =
//! e·2^32 + k·2^16 + r, so adding an ε never changes another ε's starts.

use crate::config::{AttackLoss, EvalConfig, TrainPgdConfig};

/// One PGD run: x_{k+1} = clamp(clamp(x_k + step_size·sign(∇L), x − eps, x + eps), 0, 1).
#[derive(Debug, Clone, PartialEq)]
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
    /// κ of the C&W loss.
    pub cw_kappa: f64,
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
        }
    }
}

/// The name of one white-box adversarial version: `pgd-<loss>-r<restart>`.
pub fn version_name(loss: AttackLoss, restart: usize) -> String {
    let loss = match loss {
        AttackLoss::Ce => "ce",
        AttackLoss::Cw => "cw",
    };
    format!("pgd-{loss}-r{restart}")
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
}
