//! f64 CPU accelerated engine against the reference at 1e-9 relative ([`Tolerance::F64_STRICT`]):
//! forward outputs at every distillation layer (before and after its ReLU) and the logits, the
//! state after the pass, and the loss, input gradient and every parameter gradient of CE and
//! C&W at the logits and of MSE at a layer (before and after its ReLU), each in BatchNorm train
//! and eval mode.

use eio_spec::config::{Activation, Arch, ModelConfig, Sharing, VggGating};
use eio_spec::{Path, Plan};
use eio_tests::cases::{pass_case, proptest_config, Fixture, NetSpec, PassCase};
use eio_tests::checks::check_single_passes;
use eio_tests::engine::or_skip;
use eio_tests::{Accelerated, Reference, Tolerance};
use proptest::prelude::*;

proptest! {
    #![proptest_config(proptest_config(16))]

    /// Random small ResNets (both sharing modes, n in 1..=3, ReLU or LeakyReLU), paths,
    /// layers and batches.
    #[test]
    fn single_passes_match_reference(case in pass_case()) {
        let fx = case.fixture();
        or_skip(
            "f64_passes::single_passes_match_reference",
            check_single_passes(&Reference, &Accelerated::f64_cpu(), &fx, Tolerance::F64_STRICT),
        );
    }
}

/// The same case under both sharing modes, so neither depends on the strategy's draws: with
/// shared convs every candidate reads candidate 0's conv, with independent ones each its own.
#[test]
fn both_sharing_modes() {
    for sharing in [Sharing::Independent, Sharing::SharedConv] {
        for n in [2, 3] {
            let net = NetSpec {
                n,
                ..NetSpec::tiny(sharing)
            };
            let plan = net.plan();
            // A path through the last candidate at every other gate.
            let path = Path::new(
                (0..plan.k())
                    .map(|g| if g % 2 == 0 { 0 } else { (n - 1) as u8 })
                    .collect(),
            );
            let case = PassCase {
                net,
                path,
                layer: 3,
                batch: 2,
                seed: 7 + n as u64,
            };
            or_skip(
                "f64_passes::both_sharing_modes",
                check_single_passes(
                    &Reference,
                    &Accelerated::f64_cpu(),
                    &case.fixture(),
                    Tolerance::F64_STRICT,
                ),
            );
        }
    }
}

/// VGG-16 (width 1/16, 32x32) covers the ops ResNets do not use: 2x2 max pooling and its
/// first-maximum routing, flatten, and a gated classifier (`convs-and-classifier`).
#[test]
fn vgg16_passes() {
    for (gating, sharing, seed) in [
        (VggGating::Convs, Sharing::SharedConv, 11),
        (VggGating::ConvsAndClassifier, Sharing::Independent, 12),
    ] {
        let model = ModelConfig {
            arch: Arch::Vgg16,
            depth: 16,
            width: 1.0 / 16.0,
            n: 2,
            sharing,
            classes: 3,
            in_channels: 3,
            input_size: 32,
            activation: Activation::Relu,
            leaky_slope: 0.1,
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2023, 0.1994, 0.2010],
            vgg_gated: gating,
        };
        let plan = Plan::build(&model).expect("tiny VGG-16");
        let path = Path::new((0..plan.k()).map(|g| (g % 2) as u8).collect());
        let fx = Fixture::new(plan, path, 5, 1, seed);
        or_skip(
            "f64_passes::vgg16_passes",
            check_single_passes(
                &Reference,
                &Accelerated::f64_cpu(),
                &fx,
                Tolerance::F64_STRICT,
            ),
        );
    }
}

/// Input sizes other than 8 (odd and even): strided convs whose transposed gradient needs an
/// output padding of 0 or 1, and 1x1 downsampling shortcuts over odd maps.
#[test]
fn other_input_sizes() {
    for (input_size, seed) in [(7, 41), (9, 42), (6, 43)] {
        let case = PassCase {
            net: NetSpec {
                input_size,
                ..NetSpec::tiny(Sharing::Independent)
            },
            path: "1010011".parse().expect("a path"),
            layer: 6,
            batch: 2,
            seed,
        };
        or_skip(
            "f64_passes::other_input_sizes",
            check_single_passes(
                &Reference,
                &Accelerated::f64_cpu(),
                &case.fixture(),
                Tolerance::F64_STRICT,
            ),
        );
    }
}
