//! PGD and the white-box evaluation, f64 CPU against the reference at 1e-9: adversarial images,
//! the attack loss and input gradient at the result, and the predictions, for CE and C&W
//! against one path (BN train or eval), an ensemble of 2 members and the randomised RGN with
//! EOT over 2 paths; then the all-or-nothing report, exactly.

use eio_spec::config::{AttackLoss, EvalConfig};
use eio_spec::rng::Seeds;
use eio_tests::cases::{
    attack_case, pass_case, pass_case_over, proptest_config, small_net_spec, TargetKind,
};
use eio_tests::checks::{check_pgd, check_white_box};
use eio_tests::engine::{or_skip, Engine};
use eio_tests::{Accelerated, Reference, Tolerance};
use proptest::prelude::*;

proptest! {
    #![proptest_config(proptest_config(16))]

    #[test]
    fn pgd_matches_reference(case in pass_case(), attack in attack_case()) {
        let fx = case.fixture();
        let rng = fx.rng.clone();
        or_skip(
            "f64_attack::pgd_matches_reference",
            check_pgd(&Reference, &Accelerated::f64_cpu(), &fx, &attack, &rng, Tolerance::F64_STRICT),
        );
    }
}

proptest! {
    #![proptest_config(proptest_config(3))]

    /// 2 ε, 2 restarts, CE and C&W, 2 steps, against each kind of target, on ResNet-8 at
    /// width 1/4 (the reference runs 24 attacks per target); the labels are the reference's
    /// clean predictions so that robustness is not trivially 0.
    #[test]
    fn white_box_matches_reference(case in pass_case_over(small_net_spec(), 1..=3), seed in any::<u64>()) {
        let fx = case.fixture();
        let config = EvalConfig {
            images: fx.images.batch(),
            eps: vec![0.02, 0.05],
            steps: 2,
            restarts: 2,
            losses: vec![AttackLoss::Ce, AttackLoss::Cw],
            eot_samples: 2,
            batch_size: fx.images.batch(),
            ..EvalConfig::default()
        };
        let seeds = Seeds::new(seed);
        for kind in [
            TargetKind::Path(eio_spec::config::BnMode::Eval),
            TargetKind::Ensemble,
            TargetKind::Randomised,
        ] {
            let target = fx.target(kind);
            let labels = Reference
                .predict(&target, &fx.images, fx.rng.clone())
                .expect("the reference runs everything");
            or_skip(
                "f64_attack::white_box_matches_reference",
                check_white_box(&Reference, &Accelerated::f64_cpu(), &target, &fx.images, &labels, &config, &seeds),
            );
        }
    }
}
