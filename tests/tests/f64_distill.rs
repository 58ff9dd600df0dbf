//! Whole Eq. 2 distillations, f64 CPU against the reference, step by step: per-step losses,
//! final images and the state afterwards within 1e-9, with sign ties (|m| < 1e-12) counted and
//! reported, and allowed to make the runs differ only at a step where a tie was counted (see
//! `eio_tests::checks::check_distill`).

use eio_spec::config::{BnMode, Sharing};
use eio_spec::plan::FeatureSite;
use eio_spec::Preset;
use eio_tests::cases::{distill_config, pass_case, proptest_config, NetSpec, PassCase};
use eio_tests::checks::{check_distill, note};
use eio_tests::engine::or_skip;
use eio_tests::{Accelerated, Reference, Tolerance};
use proptest::prelude::*;

proptest! {
    #![proptest_config(proptest_config(12))]

    /// Every switch of Eq. 2 (random start, momentum and its decay, BN mode, feature site,
    /// layer-1-before-ReLU), 1-4 steps, any layer.
    #[test]
    fn distillation_matches_reference(case in pass_case(), config in distill_config()) {
        let fx = case.fixture();
        let rng = fx.rng.clone();
        // check_distill prints a visible note whenever either engine counted a sign tie.
        or_skip(
            "f64_distill::distillation_matches_reference",
            check_distill(&Reference, &Accelerated::f64_cpu(), &fx, &config, &rng, Tolerance::F64_STRICT),
        );
    }
}

/// The official preset's distillation (random start, plain sign steps, eval-mode BN, features
/// after the ReLU but layer 1 before it) and DVERGE's (momentum, train-mode BN, before the
/// ReLU), 10 steps, at the stem (layer 1), a block and the logits.
#[test]
fn preset_distillations_match_reference() {
    for preset in [Preset::Official, Preset::Dverge] {
        let config = preset.config().expect("shipped preset").distill;
        assert_eq!(config.steps, 10);
        for (layer, seed) in [(1, 21), (4, 22), (8, 23)] {
            let case = PassCase {
                net: NetSpec::tiny(Sharing::SharedConv),
                path: "0101101".parse().expect("a path"),
                layer,
                batch: 2,
                seed,
            };
            let fx = case.fixture();
            if let Some(s) = or_skip(
                "f64_distill::preset_distillations_match_reference",
                check_distill(
                    &Reference,
                    &Accelerated::f64_cpu(),
                    &fx,
                    &config,
                    &fx.rng,
                    Tolerance::F64_STRICT,
                ),
            ) {
                if s.ties != (0, 0) {
                    note(&format!(
                        "note: {} preset, layer {layer}: sign ties {:?}",
                        preset.name(),
                        s.ties
                    ));
                }
            }
        }
    }
    // Sanity of the presets the test relies on.
    let official = Preset::Official.config().expect("shipped preset").distill;
    assert_eq!(official.bn_mode, BnMode::Eval);
    assert_eq!(official.feature, FeatureSite::AfterRelu);
}

/// Source = target without a random start: the feature difference, hence every gradient entry,
/// is exactly 0, so every entry of every step is a sign tie (sign 0, no move) on both engines.
/// Exercises the tie rule's step-by-step replay, which must find no difference.
#[test]
fn exact_zero_gradients_are_counted_ties() {
    let case = PassCase {
        net: NetSpec::tiny(Sharing::Independent),
        path: "0110100".parse().expect("a path"),
        layer: 3,
        batch: 2,
        seed: 24,
    };
    let mut fx = case.fixture();
    fx.targets = fx.images.clone();
    let mut config = Preset::Official.config().expect("shipped preset").distill;
    config.random_start = false;
    config.steps = 3;
    let s = or_skip(
        "f64_distill::exact_zero_gradients_are_counted_ties",
        check_distill(
            &Reference,
            &Accelerated::f64_cpu(),
            &fx,
            &config,
            &fx.rng,
            Tolerance::F64_STRICT,
        ),
    );
    if let Some(s) = s {
        let all = config.steps * fx.images.data.len();
        assert_eq!(s.ties, (all, all), "every entry of every step is a tie");
        assert_eq!(s.diverged_at, None);
    }
}
