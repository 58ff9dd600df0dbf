//! f64 optimisers against the reference at 1e-9: SGD (momentum 0.9, Nesterov or not, coupled
//! weight decay) and Adam (with and without weight decay) over 3 steps on a plan's learnable
//! tensors, with `None` gradients for some tensors in some steps (PyTorch skips them: no decay,
//! buffers untouched or not yet created).

use eio_spec::plan::Role;
use eio_tests::cases::{net_spec, perturbed_values, proptest_config, NetSpec};
use eio_tests::checks::check_optimiser;
use eio_tests::engine::{or_skip, Optimiser, StepGrads, Values};
use eio_tests::{Accelerated, Reference, Tolerance};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Learnable initial values and 3 steps of gradients: tensor i has a gradient at step s unless
/// (i + s) % 3 == 0 (so some tensors start late, some pause, some skip the last step) or a
/// seeded coin says `None` (probability 1/4).
fn setup(net: &NetSpec, seed: u64) -> (eio_spec::Plan, Values, Vec<StepGrads>) {
    let plan = net.plan();
    let all = perturbed_values(&plan, seed);
    let learnable: Vec<_> = plan
        .params
        .iter()
        .filter(|p| p.role == Role::Learnable)
        .collect();
    let params: Values = learnable
        .iter()
        .map(|p| (p.name.clone(), all[&p.name].clone()))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let steps = (0..3)
        .map(|s| {
            let mut grads = StepGrads::new();
            for (i, p) in learnable.iter().enumerate() {
                let coin = rng.random_range(0..4);
                if (i + s) % 3 != 0 && coin != 0 {
                    let g = (0..p.numel())
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect();
                    grads.insert(p.name.clone(), g);
                }
            }
            grads
        })
        .collect();
    (plan, params, steps)
}

proptest! {
    #![proptest_config(proptest_config(8))]

    #[test]
    fn sgd_matches_reference(
        net in net_spec(),
        seed in any::<u64>(),
        nesterov in any::<bool>(),
        weight_decay in prop_oneof![Just(1e-4), Just(5e-2)],
    ) {
        let (plan, params, steps) = setup(&net, seed);
        let sgd = Optimiser::Sgd { lr: 0.1, momentum: 0.9, weight_decay, nesterov };
        or_skip(
            "f64_optim::sgd_matches_reference",
            check_optimiser(&Reference, &Accelerated::f64_cpu(), &plan, sgd, &params, &steps, Tolerance::F64_STRICT),
        );
    }

    #[test]
    fn adam_matches_reference(
        net in net_spec(),
        seed in any::<u64>(),
        weight_decay in prop_oneof![Just(0.0), Just(1e-2)],
    ) {
        let (plan, params, steps) = setup(&net, seed);
        let adam = Optimiser::Adam { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay };
        or_skip(
            "f64_optim::adam_matches_reference",
            check_optimiser(&Reference, &Accelerated::f64_cpu(), &plan, adam, &params, &steps, Tolerance::F64_STRICT),
        );
    }
}
