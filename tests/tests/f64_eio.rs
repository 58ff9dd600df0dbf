//! One Eq. 4 EIO iteration (Algorithm 1 lines 11-24) and clean pre-training (lines 4-5), f64
//! CPU against the reference at 1e-9:
//! the layer and paths drawn by `eio_spec`, every path's loss, every path's last distillation
//! loss, the sign ties, and every tensor and counter of the state after the SGD step. The
//! presets' training settings with random Algorithm 1 switches (p, loss scale, unused
//! parameters, the PGD-AT term) and random distillation switches.

use eio_spec::config::Sharing;
use eio_spec::rng::Seeds;
use eio_spec::Preset;
use eio_tests::cases::{
    distill_config, eio_switches, pass_case, perturbed_values, proptest_config, NetSpec,
};
use eio_tests::checks::{check_eio, check_pretrain, eio_iteration};
use eio_tests::engine::or_skip;
use eio_tests::{Accelerated, Reference, Tolerance};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

proptest! {
    #![proptest_config(proptest_config(10))]

    #[test]
    fn one_iteration_matches_reference(
        case in pass_case(),
        switches in eio_switches(),
        distill in distill_config(),
        iteration in 0u64..1000,
    ) {
        let plan = case.net.plan();
        let config = switches.config(case.net.model(), distill);
        let seeds = Seeds::new(case.seed);
        let values = perturbed_values(&plan, case.seed);
        let mut rng = ChaCha8Rng::seed_from_u64(case.seed ^ 0xe10);
        let it = eio_iteration(&plan, &config, &seeds, iteration, case.batch, &mut rng);
        or_skip(
            "f64_eio::one_iteration_matches_reference",
            check_eio(&Reference, &Accelerated::f64_cpu(), &plan, &config, &values, &[it], Tolerance::F64_STRICT),
        );
    }
}

proptest! {
    #![proptest_config(proptest_config(8))]

    /// Two clean pre-training iterations (Algorithm 1 lines 4-5) along two paths, with the
    /// preset's SGD and unused-parameter rule.
    #[test]
    fn pretraining_matches_reference(case in pass_case(), switches in eio_switches()) {
        let fx = case.fixture();
        let config = switches.config(case.net.model(), Default::default());
        let batches = vec![
            (fx.path.clone(), fx.images.clone(), fx.labels.clone()),
            (fx.other_path.clone(), fx.targets.clone(), fx.labels.clone()),
        ];
        or_skip(
            "f64_eio::pretraining_matches_reference",
            check_pretrain(&Reference, &Accelerated::f64_cpu(), &fx.plan, &config, &fx.values, &batches, Tolerance::F64_STRICT),
        );
    }
}

/// The official preset end to end on the tiny ResNet-8 (p = 3, 10 distillation steps), from
/// the plan's unperturbed initial values as training starts.
#[test]
fn official_iteration_matches_reference() {
    let net = NetSpec::tiny(Sharing::SharedConv);
    let plan = net.plan();
    let mut config = Preset::Official.config().expect("shipped preset");
    config.model = net.model();
    let seeds = Seeds::new(config.seed);
    let values = eio_tests::cases::initial_values(&plan, config.seed);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let it = eio_iteration(&plan, &config, &seeds, 0, 2, &mut rng);
    or_skip(
        "f64_eio::official_iteration_matches_reference",
        check_eio(
            &Reference,
            &Accelerated::f64_cpu(),
            &plan,
            &config,
            &values,
            &[it],
            Tolerance::F64_STRICT,
        ),
    );
}
