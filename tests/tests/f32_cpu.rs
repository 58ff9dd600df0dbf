//! The f32 CPU engine against the f64 reference.
//!
//! * Single passes at 1e-4 relative ([`Tolerance::F32`]): the same forward and gradient checks
//!   as the f64 suite, on batches of 2 or 3 images (see `eio_tests::cases::F32_BATCHES` for why
//!   not 1).
//! * Multi-step sign attacks: f32 rounding can flip the sign of a gradient element that is
//!   small, after which the trajectories legitimately part, so a whole run is held to a bound
//!   and the first step to exactness where f32 resolves the sign (see
//!   `eio_tests::checks::check_sign_attack_f32`). The same holds for the transfer attacks
//!   (momentum PGD, M-DI²-FGSM, SGM): a first momentum step has the gradient's signs, and the
//!   first step's gradient is taken through its input-diversity draw and SGM's backward.

use eio_tests::cases::{
    attack_case, net_spec, pass_case_over, proptest_config, transfer_attack_case, Transfer,
    F32_BATCHES,
};
use eio_tests::checks::{check_sign_attack_f32, check_single_passes, note};
use eio_tests::engine::or_skip;
use eio_tests::{Accelerated, Reference, Tolerance};
use proptest::prelude::*;

/// Bound on |L_f32 − L_ref| for the attack loss at each engine's own final images. Without a
/// flipped sign the difference is f32 evaluation error (observed ≤ 8e-7 over 128 cases). A
/// flip can only happen where |g_i| < 1e-3 · max|g| (see `F32_SIGN_RESOLVED`) and moves one
/// pixel by at most 2α ≤ 0.035, changing the loss by at most 0.035 · 1e-3 · max|g| per flip
/// and step (max|g| ≤ ~0.1 for these batch-mean losses), so 1e-3 allows hundreds of flips. A
/// wrong step on a resolved element is caught exactly by the first-step comparison.
const LOSS_BOUND: f64 = 1e-3;

/// At most one image of a batch may end classified differently (a logit margin within the
/// loss bound of a tie).
const MAX_FLIPS: usize = 1;

proptest! {
    #![proptest_config(proptest_config(16))]

    #[test]
    fn single_passes_match_reference(case in pass_case_over(net_spec(), F32_BATCHES)) {
        let fx = case.fixture();
        or_skip(
            "f32_cpu::single_passes_match_reference",
            check_single_passes(&Reference, &Accelerated::f32_cpu(), &fx, Tolerance::F32),
        );
    }

    #[test]
    fn sign_attacks_match_reference(case in pass_case_over(net_spec(), F32_BATCHES), attack in attack_case()) {
        let fx = case.fixture();
        let rng = fx.rng.clone();
        if let Some(s) = or_skip(
            "f32_cpu::sign_attacks_match_reference",
            check_sign_attack_f32(&Reference, &Accelerated::f32_cpu(), &fx, &attack, &rng, LOSS_BOUND, MAX_FLIPS),
        ) {
            note(&format!(
                "f32 first PGD step: compared {} pixels, skipped {} with |g| < 1e-3·max|g|; final loss diff {:.2e}, {} prediction flips ({:?} {:?}, {} steps)",
                s.compared, s.skipped, s.loss_diff, s.prediction_flips, attack.target, attack.loss, attack.steps
            ));
        }
    }

}

proptest! {
    #![proptest_config(proptest_config(10))]

    /// Momentum PGD, M-DI²-FGSM and SGM (with any of the three losses), as the sign attacks
    /// above.
    #[test]
    fn transfer_attacks_match_reference(
        case in pass_case_over(net_spec(), F32_BATCHES),
        attack in prop_oneof![
            transfer_attack_case(Transfer::Momentum),
            transfer_attack_case(Transfer::MomentumDiversity),
            transfer_attack_case(Transfer::SkipGradient),
        ],
    ) {
        let fx = case.fixture();
        let rng = fx.rng.clone();
        if let Some(s) = or_skip(
            "f32_cpu::transfer_attacks_match_reference",
            check_sign_attack_f32(&Reference, &Accelerated::f32_cpu(), &fx, &attack, &rng, LOSS_BOUND, MAX_FLIPS),
        ) {
            note(&format!(
                "f32 first transfer-attack step: compared {} pixels, skipped {} with |g| < 1e-3·max|g|; final loss diff {:.2e}, {} prediction flips ({:?} {:?}, momentum {:?}, DI {:?}, SGM {:?}, {} steps)",
                s.compared, s.skipped, s.loss_diff, s.prediction_flips, attack.target, attack.loss, attack.momentum, attack.input_diversity, attack.skip_gradient, attack.steps
            ));
        }
    }
}
